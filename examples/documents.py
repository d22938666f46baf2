"""Example app: extract structured fields from radiology reports.

Modelled on the report system herder was built for (DESIGN-NOTES.md): a job searches the
``reports.documents`` table and becomes one task per batch of matching documents; each
task pulls laterality, lesion sizes, the BI-RADS category and the impression out of its
reports with regular expressions and upserts them into ``reports.extracted_fields``;
when the job settles, one summary row lands in ``reports.extraction_runs``.

Try it::

    python -m examples.documents 5000            # create reports.* and seed 5000 reports
    herder run --app examples.documents
    psql -c "SELECT herder.submit_job('extract_reports', '{\"modality\": \"MG\"}')"

Job payload: ``batch_size`` (int 1..10000, default 100), ``modality`` (one of
``MODALITIES``), ``since`` (ISO date: reports created on or after it). Anything else
fails the job before a task exists.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

import herder

if TYPE_CHECKING:
    Connection = asyncpg.Connection[asyncpg.Record]

KIND = "extract_reports"
MODALITIES = ("MG", "US", "CT", "MR", "CR")
MAX_BATCH = 10_000

#: How long a task waits behind another transaction's locks before giving up and letting
#: herder retry it later; a task stuck behind a lock would otherwise hold a worker.
LOCK_TIMEOUT = "5s"

# Errors that say "not now" rather than "never": the connection dropped, the server is
# restarting or overloaded, or another transaction held the rows.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.LockNotAvailableError,
)

# prepare_resumes=True: a preparation resumed after a crash continues after the last
# document id already handed out (see _resume_cursor) instead of re-reading and skipping
# earlier batches, and a report committed meanwhile cannot shift the batch boundaries.
extract_reports = herder.Kind(
    KIND,
    max_attempts=5,
    retry_on=TRANSIENT_DB_ERRORS,
    timeout=120.0,
    backoff=0.5,
    prepare_resumes=True,
)


# ---------------------------------------------------------------- the job payload


@dataclass(frozen=True, slots=True)
class Search:
    batch_size: int = 100
    modality: str | None = None
    since: date | None = None


_PAYLOAD_KEYS = ("batch_size", "modality", "since")


def parse_payload(payload: herder.JSON) -> Search:
    """Validate a job payload; every complaint names the offending key."""
    if not isinstance(payload, dict):
        raise herder.InvalidPayload(f"payload must be a JSON object, got {payload!r}")
    for key in sorted(payload):
        if key not in _PAYLOAD_KEYS:
            raise herder.InvalidPayload(
                f"unknown payload key {key!r} (allowed: {', '.join(_PAYLOAD_KEYS)})"
            )
    batch_size = payload.get("batch_size", 100)
    # bool is an int subclass; {"batch_size": true} is a mistake, not a batch of 1.
    if not isinstance(batch_size, int) or isinstance(batch_size, bool):
        raise herder.InvalidPayload(f"payload key 'batch_size' must be an int, got {batch_size!r}")
    if not 1 <= batch_size <= MAX_BATCH:
        raise herder.InvalidPayload(
            f"payload key 'batch_size' must be between 1 and {MAX_BATCH}, got {batch_size}"
        )
    modality = payload.get("modality")
    if modality is not None and modality not in MODALITIES:
        # A typo would otherwise match nothing and "succeed" with no tasks.
        raise herder.InvalidPayload(
            f"payload key 'modality' must be one of {', '.join(MODALITIES)}, got {modality!r}"
        )
    since = payload.get("since")
    since_date: date | None = None
    if since is not None:
        if not isinstance(since, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", since):
            raise herder.InvalidPayload(
                f"payload key 'since' must be an ISO date (YYYY-MM-DD), got {since!r}"
            )
        try:
            since_date = date.fromisoformat(since)
        except ValueError as exc:
            raise herder.InvalidPayload(f"payload key 'since' is not a date: {exc}") from exc
    return Search(batch_size=batch_size, modality=modality, since=since_date)


# ---------------------------------------------------------------- extraction


@dataclass(frozen=True, slots=True)
class Extraction:
    laterality: str | None = None
    sizes_mm: tuple[float, ...] = ()
    birads: str | None = None
    impression: str | None = None

    @property
    def empty(self) -> bool:
        return (
            self.laterality is None
            and not self.sizes_mm
            and self.birads is None
            and self.impression is None
        )


_SECTIONS = "CLINICAL HISTORY|INDICATION|TECHNIQUE|COMPARISON|FINDINGS|IMPRESSION|ADDENDUM"
_HEADER = rf"^[ \t]*(?:{_SECTIONS})[ \t]*:"
# Technique (slice thickness, probe frequency) and comparison (prior studies) describe
# something other than what this study found, so no field is read from them.
_NOT_FINDINGS = re.compile(
    rf"^[ \t]*(?:TECHNIQUE|COMPARISON)[ \t]*:.*?(?={_HEADER}|\Z)", re.MULTILINE | re.DOTALL
)
_SIDE = re.compile(r"\b(left|right|bilateral(?:ly)?)\b", re.IGNORECASE)
_SIZE = re.compile(
    r"(?<![\w.])(\d+(?:\.\d+)?(?:\s*[x×]\s*\d+(?:\.\d+)?)*)\s*-?\s*(mm|cm)\b"
    # "2 cm from the nipple" locates a lesion; it does not measure it.
    r"(?!\s+from\b)",
    re.IGNORECASE,
)
_DIMENSION = re.compile(r"\d+(?:\.\d+)?")
_BIRADS = re.compile(r"\bBI-?RADS(?:\s+category)?\s*[:#]?\s*([0-6])([ABC])?\b", re.IGNORECASE)
_IMPRESSION = re.compile(
    # A leading list number ("1. ") is not the end of the sentence; "1.4 cm" is not either.
    r"^[ \t]*IMPRESSION[ \t]*:\s*(?:\d+[.)]\s+)?(.+?)(?:[.!?](?=\s|\Z)|\n\s*\n|\Z)",
    re.MULTILINE | re.DOTALL,
)


def _millimetres(value: str, unit: str) -> float:
    # Decimal, so that 1.2 cm is 12.0 mm and not 12.000000000000002.
    mm = Decimal(value) * (10 if unit.lower() == "cm" else 1)
    return float(round(mm, 1))


def extract(text: str) -> Extraction:
    """Pull the structured fields out of one report's text."""
    findings = _NOT_FINDINGS.sub("", text)

    sides = {m.lower().removesuffix("ly") for m in _SIDE.findall(findings)}
    laterality = None
    if "bilateral" in sides or {"left", "right"} <= sides:
        laterality = "bilateral"
    elif sides:
        (laterality,) = sides

    sizes: list[float] = []
    for match in _SIZE.finditer(findings):
        # A lesion's size is its largest dimension, as follow-up guidelines measure it.
        size = max(_millimetres(d, match.group(2)) for d in _DIMENSION.findall(match.group(1)))
        if size not in sizes:  # the impression usually repeats the findings' numbers
            sizes.append(size)

    # The last category is the report's overall assessment; earlier ones may be per side.
    categories = _BIRADS.findall(findings)
    birads = None
    if categories:
        number, letter = categories[-1]
        birads = number + letter.upper() if number == "4" else number

    impression = None
    if m := _IMPRESSION.search(text):
        impression = " ".join(m.group(1).split()) + "."

    return Extraction(laterality, tuple(sizes), birads, impression)


# ---------------------------------------------------------------- the kind


def _batch_query(search: Search) -> tuple[str, list[Any]]:
    # Keyset pagination: each batch starts after the previous batch's last id, so a page
    # costs the same at the millionth document as at the first (OFFSET would not). Filters
    # are added only when given, so that the planner can use the matching index.
    where = ["id > $1"]
    params: list[Any] = []
    if search.modality is not None:
        params.append(search.modality)
        where.append(f"modality = ${len(params) + 2}")
    if search.since is not None:
        # A day in a payload is a UTC day, whatever the session's TimeZone setting is.
        params.append(search.since)
        where.append(f"created >= (${len(params) + 2}::date)::timestamp AT TIME ZONE 'UTC'")
    query = f"SELECT id FROM reports.documents WHERE {' AND '.join(where)} ORDER BY id LIMIT $2"
    return query, params


async def _resume_cursor(job: herder.JobContext) -> int:
    """The last document id in the tasks an interrupted preparation already committed."""
    last: int | None = await job.pool.fetchval(
        "SELECT max((payload->'ids'->>-1)::bigint) FROM herder.tasks WHERE job_id = $1",
        job.id,
    )
    return last or 0


@extract_reports.prepare
async def prepare(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
    search = parse_payload(job.payload)
    query, params = _batch_query(search)
    last = await _resume_cursor(job) if job.resume_from else 0
    while True:
        rows = await job.pool.fetch(query, last, search.batch_size, *params)
        if not rows:
            return
        ids = [row["id"] for row in rows]
        yield {"ids": ids}
        if len(ids) < search.batch_size:
            return
        last = ids[-1]


_UPSERT = """
INSERT INTO reports.extracted_fields AS f
    (document_id, job_id, laterality, sizes_mm, birads, impression, has_findings)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (document_id) DO UPDATE
SET job_id = EXCLUDED.job_id, laterality = EXCLUDED.laterality, sizes_mm = EXCLUDED.sizes_mm,
    birads = EXCLUDED.birads, impression = EXCLUDED.impression,
    has_findings = EXCLUDED.has_findings, extracted_at = clock_timestamp()
"""


@extract_reports.process
async def process(task: herder.TaskContext) -> herder.JSON:
    ids = [int(i) for i in task.payload["ids"]]
    async with task.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('lock_timeout', $1, true)", LOCK_TIMEOUT)
        # Ordered by id, so two jobs over overlapping documents lock rows in the same
        # order and cannot deadlock each other.
        rows = await conn.fetch(
            "SELECT id, body FROM reports.documents WHERE id = ANY($1::bigint[]) ORDER BY id",
            ids,
        )
        found = [(row["id"], extract(row["body"])) for row in rows]
        await conn.executemany(
            _UPSERT,
            [
                (
                    doc_id,
                    task.job_id,
                    e.laterality,
                    list(e.sizes_mm),
                    e.birads,
                    e.impression,
                    not e.empty,
                )
                for doc_id, e in found
            ],
        )
    empty = [doc_id for doc_id, e in found if e.empty]
    result = {"documents": len(found), "with_findings": len(found) - len(empty)}
    problems = []
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        problems.append(f"{len(empty)} of {len(found)} documents yielded no fields (ids {shown})")
    if len(found) < len(ids):
        # Deleted between preparation and now: nothing to extract, but worth saying.
        problems.append(f"{len(ids) - len(found)} documents no longer exist")
    if problems:
        return herder.warn("; ".join(problems), result)
    return result


@extract_reports.on_finished
async def finished(job: herder.FinishedJob) -> None:
    # The totals come from the tasks' results, not from extracted_fields: a later job may
    # already have re-extracted some of these documents. Upserted, because the hook runs
    # again after a crash mid-hook and after restart_job.
    await job.pool.execute(
        """
        INSERT INTO reports.extraction_runs
            (job_id, status, message, documents, with_findings)
        SELECT $1, $2, $3,
               coalesce(sum((result->>'documents')::int), 0),
               coalesce(sum((result->>'with_findings')::int), 0)
        FROM herder.tasks WHERE job_id = $1
        ON CONFLICT (job_id) DO UPDATE
        SET status = EXCLUDED.status, message = EXCLUDED.message,
            documents = EXCLUDED.documents, with_findings = EXCLUDED.with_findings,
            created = clock_timestamp()
        """,
        job.id,
        job.status,
        job.message,
    )


# ---------------------------------------------------------------- setup and sample data

_INSTALL_LOCK = 0x7265706F72747301  # any fixed key; serialises installs from many hosts


async def install(conn: Connection) -> None:
    """Create the app's tables (idempotent)."""
    sql = Path(__file__).with_name("documents.sql").read_text()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _INSTALL_LOCK)
        await conn.execute(sql)


@dataclass(frozen=True, slots=True)
class Report:
    patient: str
    modality: str
    body: str
    created: datetime


def _side(rng: random.Random) -> str:
    return rng.choice(("left", "right"))


def _cm(rng: random.Random, low: float, high: float) -> str:
    return f"{rng.uniform(low, high):.1f}"


def _mammogram(rng: random.Random) -> str:
    side = _side(rng)
    clock = rng.randint(1, 12)
    history = rng.choice(
        ("Screening mammogram.", f"Palpable lump in the {side} breast.", "Annual follow-up.")
    )
    head = (
        f"CLINICAL HISTORY: {history}\n"
        "TECHNIQUE: Bilateral CC and MLO views with tomosynthesis, 1 mm reconstructions.\n"
    )
    roll = rng.random()
    if roll < 0.5:
        return head + (
            "FINDINGS: The breasts are heterogeneously dense. No suspicious mass, "
            "calcification or architectural distortion.\n"
            "IMPRESSION: No mammographic evidence of malignancy. BI-RADS 1: Negative."
        )
    if roll < 0.8:
        mm = rng.randint(4, 15)
        return head + (
            f"FINDINGS: Stable {mm} mm circumscribed oval mass in the {side} breast at "
            f"{clock} o'clock, unchanged since {rng.randint(2018, 2022)}.\n"
            f"IMPRESSION: Benign-appearing stable mass in the {side} breast. BI-RADS 2: Benign."
        )
    a, b = _cm(rng, 1.0, 3.5), _cm(rng, 0.5, 1.0)
    letter = rng.choice("ABC")
    return head + (
        f"FINDINGS: Irregular spiculated mass in the {side} breast at {clock} o'clock "
        f"measuring {a} x {b} cm, with associated pleomorphic calcifications.\n"
        f"IMPRESSION: Suspicious {a} cm mass in the {side} breast; ultrasound-guided biopsy "
        f"is recommended. BI-RADS Category 4{letter}: Suspicious."
    )


def _ultrasound(rng: random.Random) -> str:
    side = _side(rng)
    if rng.random() < 0.5:
        a, b = _cm(rng, 0.5, 4.0), _cm(rng, 0.3, 0.5)
        return (
            f"INDICATION: Flank pain.\nTECHNIQUE: Grayscale and color Doppler, 5 MHz probe.\n"
            f"FINDINGS: Simple cyst in the lower pole of the {side} kidney measuring "
            f"{a} x {b} cm. No hydronephrosis.\n"
            f"IMPRESSION: Simple {side} renal cyst; no follow-up needed."
        )
    clock = rng.randint(1, 12)
    dims = sorted((rng.randint(4, 18) for _ in range(3)), reverse=True)
    return (
        f"INDICATION: Further evaluation of a mammographic finding, {side} breast.\n"
        f"FINDINGS: At {clock} o'clock in the {side} breast, {rng.randint(1, 8)} cm from the "
        f"nipple, there is a {dims[0]} x {dims[1]} x {dims[2]} mm hypoechoic oval mass with "
        "circumscribed margins.\n"
        "IMPRESSION: Probably benign mass, likely fibroadenoma. Short-interval follow-up "
        "in 6 months. BI-RADS 3: Probably benign."
    )


def _ct(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.4:
        side, lobe = _side(rng), rng.choice(("upper", "lower"))
        mm = rng.randint(3, 12)
        return (
            "CLINICAL HISTORY: Smoker, cough.\n"
            "TECHNIQUE: Axial images of the chest at 1.25 mm slice thickness.\n"
            "COMPARISON: CT chest from 2021, which showed a 3 mm nodule.\n"
            f"FINDINGS: Solid pulmonary nodule in the {side} {lobe} lobe measuring {mm} mm "
            f"(series 3, image {rng.randint(20, 90)}). No lymphadenopathy.\n"
            f"IMPRESSION: {mm} mm {side} {lobe} lobe nodule. Follow-up CT in 12 months per "
            "Fleischner guidelines."
        )
    if roll < 0.7:
        return (
            "CLINICAL HISTORY: Fall, headache.\n"
            "TECHNIQUE: Non-contrast CT of the head, 5 mm axial sections.\n"
            "FINDINGS: No intracranial hemorrhage, mass effect or midline shift. "
            "The ventricles are normal in size.\n"
            "IMPRESSION: No acute intracranial abnormality."
        )
    left_mm, right_mm = rng.randint(2, 9), rng.randint(2, 9)
    return (
        "INDICATION: Hematuria.\n"
        "FINDINGS: Bilateral non-obstructing renal calculi, "
        f"{left_mm} mm on the left and {right_mm} mm on the right. No hydronephrosis.\n"
        "IMPRESSION:\n1. Bilateral non-obstructing nephrolithiasis.\n2. No hydronephrosis."
    )


def _mr(rng: random.Random) -> str:
    if rng.random() < 0.5:
        side = _side(rng)
        return (
            f"INDICATION: Knee pain after a twisting injury, {side} knee.\n"
            "FINDINGS: Complex tear of the posterior horn of the medial meniscus. "
            "The cruciate ligaments are intact. Small joint effusion.\n"
            f"IMPRESSION: Complex medial meniscal tear of the {side} knee."
        )
    mm = rng.randint(3, 9)
    return (
        "INDICATION: Headache.\n"
        "FINDINGS: Scattered T2 hyperintense foci in the periventricular white matter, "
        f"the largest {mm} mm. No restricted diffusion.\n"
        "IMPRESSION: Nonspecific white matter foci, most likely chronic small vessel disease."
    )


def _radiograph(rng: random.Random) -> str:
    head = "INDICATION: Cough and fever.\nFINDINGS: PA and lateral views of the chest. "
    roll = rng.random()
    if roll < 0.6:
        return head + (
            "The lungs are clear. No pleural effusion or pneumothorax. The "
            "cardiomediastinal silhouette is normal.\n"
            "IMPRESSION: No acute cardiopulmonary process."
        )
    side = _side(rng)
    if roll < 0.85:
        return head + (
            f"Airspace consolidation in the {side} lower lobe with a small {side} pleural "
            "effusion.\n"
            f"IMPRESSION: {side.capitalize()} lower lobe pneumonia. Follow-up radiograph in "
            "6 weeks to document resolution."
        )
    return head + (
        f"A {rng.randint(8, 25)} mm rounded opacity projects over the {side} mid zone.\n"
        "IMPRESSION: Pulmonary nodule; CT of the chest is recommended."
    )


def _nothing_to_extract(rng: random.Random) -> str:
    # Real archives hold these too: notes with no report structure and no findings.
    return rng.choice(
        (
            "Examination not performed: the patient did not attend the appointment.",
            "Prior images have been requested for comparison; the final report will follow.",
            f"The results were discussed with the referring physician by telephone on "
            f"{rng.randint(1, 28)}/{rng.randint(1, 12)}.",
        )
    )


_WRITERS = {"MG": _mammogram, "US": _ultrasound, "CT": _ct, "MR": _mr, "CR": _radiograph}
_START = datetime(2023, 1, 1, tzinfo=UTC)


def generate(n: int, *, seed: int = 0) -> list[Report]:
    """n varied, realistic reports; the same n and seed always give the same reports."""
    rng = random.Random(seed)
    reports = []
    for _ in range(n):
        modality = rng.choices(MODALITIES, weights=(30, 20, 25, 15, 10))[0]
        writer = _nothing_to_extract if rng.random() < 0.06 else _WRITERS[modality]
        created = _START + timedelta(minutes=rng.randrange(2 * 365 * 24 * 60))
        reports.append(Report(f"P{rng.randrange(10**6):06d}", modality, writer(rng), created))
    return reports


async def seed(conn: Connection, n: int, *, seed: int = 0) -> list[int]:
    """Insert ``generate(n, seed=seed)`` into reports.documents; returns the new ids in order."""
    reports = generate(n, seed=seed)
    ids: list[int] = []
    for start in range(0, n, 10_000):
        chunk: Sequence[Report] = reports[start : start + 10_000]
        rows = await conn.fetch(
            """
            INSERT INTO reports.documents (patient, modality, body, created)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
            RETURNING id
            """,
            [r.patient for r in chunk],
            [r.modality for r in chunk],
            [r.body for r in chunk],
            [r.created for r in chunk],
        )
        ids.extend(sorted(row["id"] for row in rows))
    return ids


async def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.documents",
        description="Create the reports.* tables and seed them with generated reports.",
    )
    parser.add_argument("count", type=int, nargs="?", default=1000, help="reports to add")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("set DATABASE_URL or pass --database-url")
    conn = await asyncpg.connect(args.database_url)
    try:
        await install(conn)
        ids = await seed(conn, args.count, seed=args.seed)
    finally:
        await conn.close()
    print(
        f"reports.documents: added {len(ids)} reports"
        + (f" (ids {ids[0]}..{ids[-1]})" if ids else "")
    )


if __name__ == "__main__":
    asyncio.run(_main())
