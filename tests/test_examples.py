"""The report-extraction example (examples/documents.py), run by a real daemon against a
real database, plus unit tests of its payload parsing and text extraction."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from typing import Any

import pytest
from examples import documents
from examples.documents import Extraction, Search

import herder
from herder import db
from tests.support import running_daemon, wait_finished, wait_for

APPS = ["examples.documents"]


# ---------------------------------------------------------------- helpers


@pytest.fixture
async def reports(conn: db.Connection) -> db.Connection:
    """``conn``, with the example's tables installed."""
    await documents.install(conn)
    return conn


async def submit(conn: db.Connection, payload: dict[str, Any]) -> int:
    job_id: int = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, payload) VALUES ($1, $2) RETURNING id",
        documents.KIND,
        payload,
    )
    return job_id


async def wait_run_summary(conn: db.Connection, job_id: int) -> dict[str, Any]:
    """on_finished runs after the settlement commits: wait for the row it writes."""

    async def summary() -> dict[str, Any] | None:
        row = await conn.fetchrow("SELECT * FROM reports.extraction_runs WHERE job_id = $1", job_id)
        return dict(row) if row else None

    return await wait_for(summary, what=f"extraction_runs row of job {job_id}")


async def task_rows(conn: db.Connection, job_id: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, payload, status, message, result, attempts FROM herder.tasks"
        " WHERE job_id = $1 ORDER BY id",
        job_id,
    )
    return [dict(r) for r in rows]


async def extracted(conn: db.Connection) -> dict[int, dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM reports.extracted_fields ORDER BY document_id")
    return {r["document_id"]: dict(r) for r in rows}


def as_extraction(row: dict[str, Any]) -> Extraction:
    return Extraction(row["laterality"], tuple(row["sizes_mm"]), row["birads"], row["impression"])


async def insert_reports(conn: db.Connection, *texts: str, modality: str = "MG") -> list[int]:
    rows = await conn.fetch(
        "INSERT INTO reports.documents (patient, modality, body)"
        " SELECT 'P000001', $1, unnest($2::text[]) RETURNING id",
        modality,
        list(texts),
    )
    return sorted(r["id"] for r in rows)


# ---------------------------------------------------------------- end to end


async def test_job_extracts_every_document_exactly_once(
    reports: db.Connection, db_url: str
) -> None:
    conn = reports
    n, batch = 600, 64
    ids = await documents.seed(conn, n, seed=0)
    expected = {
        doc_id: documents.extract(r.body)
        for doc_id, r in zip(ids, documents.generate(n, seed=0), strict=True)
    }
    empty = {doc_id for doc_id, e in expected.items() if e.empty}
    assert 0 < len(empty) < n, "the seed must mix reports with and without findings"

    async with running_daemon(db_url, apps=APPS):
        job_id = await submit(conn, {"batch_size": batch})
        job = await wait_finished(conn, job_id)
        summary = await wait_run_summary(conn, job_id)

    # One task per batch, in id order, covering every document once.
    tasks = await task_rows(conn, job_id)
    assert len(tasks) == math.ceil(n / batch)
    batches = [t["payload"]["ids"] for t in tasks]
    assert [len(b) for b in batches[:-1]] == [batch] * (len(batches) - 1)
    assert [i for b in batches for i in b] == ids

    # Every document extracted exactly once, to what the extractor says about its text.
    rows = await extracted(conn)
    assert await conn.fetchval("SELECT count(*) FROM reports.extracted_fields") == n
    assert sorted(rows) == ids
    assert {r["job_id"] for r in rows.values()} == {job_id}
    assert {doc_id: as_extraction(r) for doc_id, r in rows.items()} == expected
    assert {doc_id for doc_id, r in rows.items() if not r["has_findings"]} == empty

    # A batch holding a report with nothing to extract ends WARNING, and says how many.
    warned = [t for t in tasks if t["status"] == "WARNING"]
    assert {t["status"] for t in tasks} <= {"SUCCESS", "WARNING"}
    assert len(warned) == sum(1 for b in batches if empty & set(b))
    for t in warned:
        missing = len(empty & set(t["payload"]["ids"]))
        assert t["message"].startswith(f"{missing} of {len(t['payload']['ids'])} documents")
    assert job["status"] == "WARNING"
    assert sum(t["result"]["documents"] for t in tasks) == n
    assert sum(t["result"]["with_findings"] for t in tasks) == n - len(empty)

    assert (
        await conn.fetchval(
            "SELECT count(*) FROM reports.extraction_runs WHERE job_id = $1", job_id
        )
        == 1
    )
    assert summary["status"] == "WARNING"
    assert summary["documents"] == n
    assert summary["with_findings"] == n - len(empty)


KNOWN_MAMMOGRAM = """\
CLINICAL HISTORY: Palpable lump in the left breast.
TECHNIQUE: Bilateral CC and MLO views, 1 mm tomosynthesis slices.
FINDINGS: Irregular spiculated mass in the left breast at 2 o'clock measuring 1.2 x 0.8 cm.
IMPRESSION: Suspicious 1.2 cm mass in the left breast; biopsy is recommended.
BI-RADS Category 4c: Suspicious."""

KNOWN_CHEST_CT = """\
TECHNIQUE: Axial images at 1.25 mm slice thickness.
COMPARISON: CT from 2021, which showed a 3 mm nodule in the left lower lobe.
FINDINGS: Solid nodule in the right upper lobe measuring 7 mm. A second nodule, 0.45 cm,
in the right middle lobe.
IMPRESSION:
1. Two right-sided pulmonary nodules, the largest 7 mm.
2. Follow-up CT in 12 months."""

KNOWN_BREAST_US = """\
FINDINGS: At 10 o'clock in the right breast, 3 cm from the nipple, there is a
15 x 9 x 7 mm hypoechoic oval mass. BIRADS: 3
IMPRESSION: Probably benign mass"""


async def test_known_reports_are_extracted_exactly(reports: db.Connection, db_url: str) -> None:
    conn = reports
    mammogram, chest_ct, breast_us = await insert_reports(
        conn, KNOWN_MAMMOGRAM, KNOWN_CHEST_CT, KNOWN_BREAST_US
    )
    async with running_daemon(db_url, apps=APPS):
        job_id = await submit(conn, {})
        job = await wait_finished(conn, job_id)
        summary = await wait_run_summary(conn, job_id)

    assert job["status"] == "SUCCESS", job["message"]
    rows = await extracted(conn)
    assert as_extraction(rows[mammogram]) == Extraction(
        "left", (12.0,), "4C", "Suspicious 1.2 cm mass in the left breast; biopsy is recommended."
    )
    # Not the 1.25 mm slices (technique) nor the prior 3 mm nodule on the left (comparison).
    assert as_extraction(rows[chest_ct]) == Extraction(
        "right", (7.0, 4.5), None, "Two right-sided pulmonary nodules, the largest 7 mm."
    )
    # "3 cm from the nipple" is a location, not a size.
    assert as_extraction(rows[breast_us]) == Extraction(
        "right", (15.0,), "3", "Probably benign mass."
    )
    assert all(r["has_findings"] for r in rows.values())
    assert (summary["status"], summary["documents"], summary["with_findings"]) == ("SUCCESS", 3, 3)
    (task,) = await task_rows(conn, job_id)
    assert task["result"] == {"documents": 3, "with_findings": 3}


@pytest.mark.parametrize(
    "payload",
    [
        {"modality": "MG", "batch_size": 50},
        {"since": "2024-06-01", "batch_size": 40},
        {"modality": "US", "since": "2024-01-01", "batch_size": 25},
    ],
    ids=["modality", "since", "modality+since"],
)
async def test_filters_restrict_the_tasks(
    reports: db.Connection, db_url: str, payload: dict[str, Any]
) -> None:
    conn = reports
    n = 600
    ids = await documents.seed(conn, n, seed=1)
    since = payload.get("since")
    start = datetime.combine(date.fromisoformat(since), datetime.min.time(), UTC) if since else None
    wanted = [
        doc_id
        for doc_id, r in zip(ids, documents.generate(n, seed=1), strict=True)
        if payload.get("modality", r.modality) == r.modality
        and (start is None or r.created >= start)
    ]
    assert 0 < len(wanted) < n

    async with running_daemon(db_url, apps=APPS):
        job_id = await submit(conn, payload)
        await wait_finished(conn, job_id)
        summary = await wait_run_summary(conn, job_id)

    tasks = await task_rows(conn, job_id)
    assert len(tasks) == math.ceil(len(wanted) / payload["batch_size"])
    assert [i for t in tasks for i in t["payload"]["ids"]] == wanted
    assert sorted(await extracted(conn)) == wanted
    assert summary["documents"] == len(wanted)


INVALID: list[tuple[dict[str, Any], str]] = [
    ({"batch_size": 10, "colour": "red"}, "'colour'"),
    ({"batch_size": 0}, "'batch_size'"),
    ({"batch_size": 10_001}, "'batch_size'"),
    ({"batch_size": "100"}, "'batch_size'"),
    ({"batch_size": True}, "'batch_size'"),
    ({"modality": "XR"}, "'modality'"),
    ({"modality": 3}, "'modality'"),
    ({"since": "last week"}, "'since'"),
    ({"since": "2024-02-30"}, "'since'"),
    ({"since": 20240101}, "'since'"),
]


async def test_invalid_payload_fails_the_job_before_any_task(
    reports: db.Connection, db_url: str
) -> None:
    conn = reports
    await documents.seed(conn, 50)
    async with running_daemon(db_url, apps=APPS):
        jobs = [(await submit(conn, payload), key) for payload, key in INVALID]
        for job_id, key in jobs:
            job = await wait_finished(conn, job_id)
            assert job["status"] == "FAILURE"
            assert key in job["message"], job["message"]
            summary = await wait_run_summary(conn, job_id)
            assert (summary["status"], summary["documents"]) == ("FAILURE", 0)
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM herder.tasks WHERE job_id = ANY($1::bigint[])",
            [job_id for job_id, _ in jobs],
        )
        == 0
    )
    assert await conn.fetchval("SELECT count(*) FROM reports.extracted_fields") == 0


async def test_restart_reextracts_without_duplicating(reports: db.Connection, db_url: str) -> None:
    conn = reports
    n = 200
    await documents.seed(conn, n, seed=2)
    async with running_daemon(db_url, apps=APPS):
        job_id = await submit(conn, {"batch_size": 50})
        await wait_finished(conn, job_id)
        first = await wait_run_summary(conn, job_id)
        before = await extracted(conn)

        assert await conn.fetchval("SELECT herder.restart_job($1)", job_id)
        await wait_finished(conn, job_id)

        async def summary_rewritten() -> bool:
            created = await conn.fetchval(
                "SELECT created FROM reports.extraction_runs WHERE job_id = $1", job_id
            )
            return bool(created > first["created"])

        await wait_for(summary_rewritten, what="on_finished after the restart")

    after = await extracted(conn)
    assert len(after) == n
    assert {k: as_extraction(v) for k, v in after.items()} == {
        k: as_extraction(v) for k, v in before.items()
    }
    assert all(after[k]["extracted_at"] > before[k]["extracted_at"] for k in after)
    runs = await conn.fetch("SELECT * FROM reports.extraction_runs WHERE job_id = $1", job_id)
    assert len(runs) == 1
    assert runs[0]["documents"] == n
    assert len(await task_rows(conn, job_id)) == 4


async def test_lock_timeout_is_retried(
    reports: db.Connection, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transient database error (here: another transaction holding the table) retries
    the task instead of failing it, and the retry leaves no duplicate."""
    conn = reports
    monkeypatch.setattr(documents, "LOCK_TIMEOUT", "100ms")
    doc_ids = await insert_reports(conn, KNOWN_MAMMOGRAM, KNOWN_BREAST_US)
    locker = await db.connect(db_url)
    locking = locker.transaction()
    try:
        await locking.start()
        await locker.execute("LOCK TABLE reports.extracted_fields IN SHARE MODE")
        async with running_daemon(db_url, apps=APPS):
            job_id = await submit(conn, {})

            async def failed_once() -> bool:
                message = await conn.fetchval(
                    "SELECT message FROM herder.tasks WHERE job_id = $1", job_id
                )
                return message is not None and "lock timeout" in message

            await wait_for(failed_once, what="the first attempt to hit the lock timeout")
            await locking.rollback()
            job = await wait_finished(conn, job_id)
            await wait_run_summary(conn, job_id)
    finally:
        await locker.close()

    assert job["status"] == "SUCCESS", job["message"]
    (task,) = await task_rows(conn, job_id)
    assert task["attempts"] >= 2
    assert sorted(await extracted(conn)) == doc_ids


async def test_resumed_preparation_continues_after_the_last_committed_batch(
    reports: db.Connection, db_url: str
) -> None:
    """A coordinator that died after committing some tasks: the next one picks up after
    the last document id those tasks hold, even if earlier documents changed meanwhile
    (skipping a count of re-read batches would then shift every later batch)."""
    conn = reports
    ids = await documents.seed(conn, 100)
    # UNVERIFIED: no daemon runs here, and none would claim it.
    job_id = await conn.fetchval(
        "INSERT INTO herder.jobs (kind, payload, status) VALUES ($1, $2, 'UNVERIFIED')"
        " RETURNING id",
        documents.KIND,
        {"batch_size": 15},
    )
    pool = await db.create_pool(db_url)
    try:

        def context(resume_from: int) -> herder.JobContext:
            return herder.JobContext(
                id=job_id,
                kind=documents.KIND,
                payload={"batch_size": 15},
                priority=0,
                owner="test",
                resume_from=resume_from,
                pool=pool,
            )

        async def prepared(resume_from: int) -> list[list[int]]:
            payloads: AsyncIterator[herder.JSON] = documents.prepare(context(resume_from))
            return [p["ids"] async for p in payloads]

        full = await prepared(0)
        assert [i for b in full for i in b] == ids
        assert len(full) == 7
        await conn.execute(
            "INSERT INTO herder.tasks (job_id, seq, payload)"
            " SELECT $1, seq - 1, jsonb_build_object('ids', ids)"
            " FROM unnest($2::jsonb[]) WITH ORDINALITY AS b(ids, seq)",
            job_id,
            full[:3],
        )
        await conn.execute("DELETE FROM reports.documents WHERE id = $1", full[1][0])
        assert await prepared(3) == full[3:]
    finally:
        await pool.close()


# ---------------------------------------------------------------- unit tests


@pytest.mark.parametrize(
    ("payload", "search"),
    [
        ({}, Search()),
        ({"batch_size": 1}, Search(batch_size=1)),
        ({"batch_size": 10_000, "modality": "CT"}, Search(batch_size=10_000, modality="CT")),
        ({"since": "2024-02-29"}, Search(since=date(2024, 2, 29))),
    ],
)
def test_parse_payload_accepts(payload: dict[str, Any], search: Search) -> None:
    assert documents.parse_payload(payload) == search


@pytest.mark.parametrize(("payload", "key"), [*INVALID, (["batch_size"], "JSON object")])
def test_parse_payload_rejects_naming_the_key(payload: Any, key: str) -> None:
    with pytest.raises(herder.InvalidPayload, match=key):
        documents.parse_payload(payload)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            KNOWN_MAMMOGRAM,
            Extraction(
                "left",
                (12.0,),
                "4C",
                "Suspicious 1.2 cm mass in the left breast; biopsy is recommended.",
            ),
        ),
        ("FINDINGS: 2.5 cm cyst.", Extraction(None, (25.0,), None, None)),
        (
            "FINDINGS: 3-mm nodule, 1.0 x 2.2 x 0.5 cm mass.",
            Extraction(None, (3.0, 22.0), None, None),
        ),
        (
            "FINDINGS: 5 mm stone on the left, 5 mm stone on the right.",
            Extraction("bilateral", (5.0,), None, None),
        ),
        ("FINDINGS: Bilaterally symmetric.", Extraction("bilateral", (), None, None)),
        ("BI-RADS 2. Later addendum: BI-RADS 0", Extraction(None, (), "0", None)),
        ("IMPRESSION: Normal", Extraction(None, (), None, "Normal.")),
        (
            "IMPRESSION:  No change\n  since 2022. Stable.",
            Extraction(None, (), None, "No change since 2022."),
        ),
        ("Examination not performed.", Extraction()),
        ("", Extraction()),
    ],
)
def test_extract(text: str, expected: Extraction) -> None:
    assert documents.extract(text) == expected


def test_extract_is_empty_only_when_nothing_was_found() -> None:
    assert Extraction().empty
    assert not Extraction(birads="1").empty
    assert not Extraction(sizes_mm=(1.0,)).empty


def test_generate_is_deterministic_and_varied() -> None:
    reports = documents.generate(500, seed=7)
    assert reports == documents.generate(500, seed=7)
    assert reports != documents.generate(500, seed=8)
    assert {r.modality for r in reports} == set(documents.MODALITIES)
    extractions = [documents.extract(r.body) for r in reports]
    assert any(e.empty for e in extractions)
    assert any(e.birads for e in extractions)
    assert any(e.laterality == "bilateral" for e in extractions)
    assert len({r.body for r in reports}) > 100
