"""Named queries: parameters by name in queries.sql, numbered for PostgreSQL at import."""

from __future__ import annotations

import pytest

from herder.sql.queries import QUERIES, Queries


def one(sql: str) -> Queries:
    return Queries(f"-- preamble\n\n-- name: q\n-- why it looks like this\n{sql}\n")


def test_names_are_numbered_in_order_of_first_appearance() -> None:
    queries = one("SELECT :b, :a, :b")
    assert queries["q"] == "-- why it looks like this\nSELECT $1, $2, $1"
    assert queries.bind("q", a="A", b="B") == (queries["q"], "B", "A")


def test_casts_literals_comments_and_quotes_are_no_parameters() -> None:
    queries = one(
        "SELECT :ids::bigint[], x::int, ':no', 'it''s :no', \"a:no\", $$ :no $$, $t$ :no $t$"
        " /* :no */ -- :no\nFROM y WHERE z = :z"
    )
    assert queries["q"].endswith(
        "SELECT $1::bigint[], x::int, ':no', 'it''s :no', \"a:no\", $$ :no $$, $t$ :no $t$"
        " /* :no */ -- :no\nFROM y WHERE z = $2"
    )
    assert queries.bind("q", ids=[1], z=2)[1:] == ([1], 2)


def test_a_query_without_parameters_binds_nothing() -> None:
    queries = one("SELECT 1")
    assert queries.bind("q") == (queries["q"],)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT $1",  # positional
        "SELECT :a, $2",  # mixed
        "SELECT :Job",
        "SELECT :1st",
    ],
)
def test_positional_parameters_and_bad_names_are_refused_at_load(sql: str) -> None:
    with pytest.raises(ValueError, match="query q"):
        one(sql)


def test_bind_refuses_a_missing_or_an_unknown_argument() -> None:
    queries = one("SELECT :a, :b")
    with pytest.raises(TypeError, match="missing :b"):
        queries.bind("q", a=1)
    with pytest.raises(TypeError, match="no parameter :c"):
        queries.bind("q", a=1, b=2, c=3)


def test_the_batch_writes_share_their_parameters_but_the_lease_and_the_attempts() -> None:
    """Named, the two batch writes cannot be handed each other's arguments: write_batch
    renews the lease, write_last_batch sets max_attempts, and neither takes the other."""
    common = {
        "job_id": 1,
        "generation": 1,
        "preparer": "d",
        "seqs": [],
        "payloads": [],
        "prepared_before": 0,
        "prepared_after": 0,
    }
    QUERIES.bind("write_batch", **common, lease_seconds=30.0)
    QUERIES.bind("write_last_batch", **common, max_attempts=3)
    with pytest.raises(TypeError, match="no parameter :max_attempts"):
        QUERIES.bind("write_batch", **common, lease_seconds=30.0, max_attempts=3)
    with pytest.raises(TypeError, match="missing :max_attempts"):
        QUERIES.bind("write_last_batch", **common, lease_seconds=30.0)
