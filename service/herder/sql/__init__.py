"""Named SQL queries, read once from ``queries.sql`` beside ``schema.sql``."""

from __future__ import annotations

from importlib import resources

from herder.sql.queries import QUERIES

__all__ = ["QUERIES", "schema_sql"]


def schema_sql() -> str:
    return resources.files(__name__).joinpath("schema.sql").read_text()
