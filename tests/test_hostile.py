"""Property test: random hostile inputs through two real daemons.

Each example is a scenario: a few jobs (valid synthetic payloads; payloads PostgreSQL
accepts and Python cannot decode, wrong types, unknown keys, odd unicode, too many
tasks; jobs of a test kind whose tasks raise exceptions with odd messages, return
results that are not JSON or too big, raise SystemExit/KeyboardInterrupt/GeneratorExit,
ask for retries with weird delays, hang until the kind's timeout; slow and crashing
on_finished hooks; a kind without prepare), and controls (cancel, resume, retry,
restart) at random moments, all served by two daemons on one database.

After each: both daemons alive and healthy, every job settled with a message, nothing
stranded, no task past its attempt budget, and exactly one on_finished run per
settlement to SUCCESS, WARNING or FAILURE (settlements are recorded by a trigger on
herder.jobs, hook runs by the hook itself, both in tables of the test database).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import anyio
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import herder
from herder import db
from herder.kinds import Kind
from herder.states import JOB_FINISHED
from tests.faults import Watch, describe, faulty_daemon
from tests.support import wait_for

T = TypeVar("T")
LEASE = 1.0
MAX_TASKS = 500  # herder.settings max_tasks_per_job in the test database
HOOKED_KINDS = ("hostile", "timed", "noprep")

# ----------------------------------------------------------------- the hostile kind

MESSAGES = {
    "nul": "bad\x00byte",
    "surrogate": "lone \ud800 half",
    "long": "long " * 20_000,  # 100 KB
    "empty": "",
    "unicode": "\u202e\u2028 \U0001f980 \ufeff\u0301",
    "control": "a\r\nb\x1b[31m\x7f",
}
DELAYS: dict[str, float | None] = {
    "negative": -1.0,
    "nan": math.nan,
    "inf": math.inf,
    "huge": 1e308,
    "tiny": 0.01,
    "none": None,
}


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


RESULTS: dict[str, Callable[[], Any]] = {
    "nan": lambda: math.nan,
    "inf_in_list": lambda: [1, math.inf],
    "set": lambda: {1, 2},
    "object": object,
    "bytes": lambda: b"\xff\xfe",
    "huge": lambda: "x" * (2 * 1024 * 1024),
    "nul": lambda: {"k": "a\x00b"},
    "surrogate": lambda: ["\udfff"],
    "bigint": lambda: 10**5000,
    "deep": lambda: _deep(5000),
    "ok": lambda: {"fine": [1, "two", None]},
}


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


def _exception(name: str, message: str) -> BaseException:
    if name == "unprintable":
        return UnprintableError(message)
    if name == "bytes-args":
        return Exception(message.encode("utf-8", "surrogatepass"), 3)
    if name == "value":
        return ValueError(message)
    return RuntimeError(message)


EXITS: dict[str, Callable[[], BaseException]] = {
    "SystemExit": lambda: SystemExit(3),
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
}


def declare_kinds(make_kind: Callable[..., Kind]) -> None:
    """hostile: the behaviours; timed: the same with a timeout (which bounds its hooks
    too), for jobs with a task that hangs; noprep: a kind without prepare."""
    for name, timeout in (("hostile", None), ("timed", 0.4)):
        kind = make_kind(name, max_attempts=2, backoff=0.05, max_backoff=0.2, timeout=timeout)
        kind.prepare(prepare_items)
        kind.process(process_item)
        kind.on_finished(record_hook_run)

    noprep = make_kind("noprep", max_attempts=2, backoff=0.05, max_backoff=0.2)

    @noprep.process
    async def noprep_process(task: herder.TaskContext) -> herder.JSON:
        return None

    noprep.on_finished(record_hook_run)


async def prepare_items(job: herder.JobContext) -> AsyncIterator[herder.JSON]:
    for item in job.payload["items"]:
        yield item


async def process_item(task: herder.TaskContext) -> herder.JSON:
    item = task.payload
    do = item["do"]
    if do == "warn":
        return herder.warn(MESSAGES[item["msg"]])
    if do == "raise":
        raise _exception(item["exc"], MESSAGES[item["msg"]])
    if do == "exit":
        raise EXITS[item["exc"]]()
    if do == "retry":
        raise herder.Retry("asked to retry", delay=DELAYS[item["delay"]])
    if do == "result":
        return RESULTS[item["value"]]()
    if do in ("hang", "sleep"):
        await anyio.sleep(item["ms"] / 1000)
    return None


async def record_hook_run(job: herder.FinishedJob) -> None:
    """Counts its run in a table first (so that two runs at once both count), then may
    be slow (longer than the lease) and may crash."""
    await job.pool.execute(
        "INSERT INTO public.hostile_hook_runs (job_id, status) VALUES ($1, $2)",
        job.id,
        job.status,
    )
    payload = job.payload if isinstance(job.payload, dict) else {}
    hook_ms = payload.get("hook_ms", 0)
    if isinstance(hook_ms, int) and hook_ms > 0:
        await anyio.sleep(hook_ms / 1000)
    if payload.get("hook_raise"):
        raise RuntimeError("on_finished crashed \x00 after recording its run")


SETUP = f"""
UPDATE herder.settings SET value = {MAX_TASKS} WHERE name = 'max_tasks_per_job';
CREATE TABLE IF NOT EXISTS public.hostile_settlements (
    job_id bigint, status text, at timestamptz DEFAULT clock_timestamp());
CREATE TABLE IF NOT EXISTS public.hostile_hook_runs (
    job_id bigint, status text, at timestamptz DEFAULT clock_timestamp());
CREATE OR REPLACE FUNCTION public.hostile_record_settlement() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO public.hostile_settlements (job_id, status) VALUES (NEW.id, NEW.status);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS hostile_settlement ON herder.jobs;
CREATE TRIGGER hostile_settlement AFTER UPDATE OF status ON herder.jobs FOR EACH ROW
    WHEN (NEW.status IN ('SUCCESS', 'WARNING', 'FAILURE')
          AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION public.hostile_record_settlement();
"""

# ----------------------------------------------------------------- strategies


@dataclass(frozen=True)
class JobSpec:
    kind: str
    #: JSON text as a psql user would type it (jsonb may keep what Python cannot read).
    payload: str


@dataclass(frozen=True)
class Control:
    after_ms: int
    action: str
    job: int


@dataclass(frozen=True)
class Scenario:
    jobs: list[JobSpec]
    controls: list[Control]


def _item() -> st.SearchStrategy[dict[str, Any]]:
    messages = st.sampled_from(sorted(MESSAGES))
    return st.one_of(
        st.just({"do": "ok"}),
        st.fixed_dictionaries({"do": st.just("warn"), "msg": messages}),
        st.fixed_dictionaries(
            {
                "do": st.just("raise"),
                "msg": messages,
                "exc": st.sampled_from(["value", "runtime", "unprintable", "bytes-args"]),
            }
        ),
        st.fixed_dictionaries({"do": st.just("exit"), "exc": st.sampled_from(sorted(EXITS))}),
        st.fixed_dictionaries({"do": st.just("retry"), "delay": st.sampled_from(sorted(DELAYS))}),
        st.fixed_dictionaries({"do": st.just("result"), "value": st.sampled_from(sorted(RESULTS))}),
        st.fixed_dictionaries({"do": st.just("hang"), "ms": st.integers(1000, 5000)}),
        st.fixed_dictionaries({"do": st.just("sleep"), "ms": st.integers(0, 200)}),
    )


def _hostile_job() -> st.SearchStrategy[JobSpec]:
    payloads = st.fixed_dictionaries(
        {"items": st.lists(_item(), min_size=0, max_size=5)},
        optional={"hook_ms": st.sampled_from([0, 50, 1500]), "hook_raise": st.booleans()},
    )
    return payloads.map(_hostile_spec)


def _hostile_spec(payload: dict[str, Any]) -> JobSpec:
    items: list[dict[str, Any]] = payload["items"]
    hangs = any(item["do"] == "hang" for item in items)
    return JobSpec("timed" if hangs else "hostile", json.dumps(payload))


def _indices() -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, 5), max_size=3, unique=True)


def _valid_synthetic() -> st.SearchStrategy[JobSpec]:
    payloads = st.fixed_dictionaries(
        {"tasks": st.integers(0, 6)},
        optional={
            "fail": _indices(),
            "warn": _indices(),
            "flaky": _indices(),
            "task_ms": st.integers(0, 30),
        },
    )
    return payloads.map(lambda p: JobSpec("synthetic", json.dumps(p)))


#: Text that jsonb accepts (no NUL, no lone surrogate) but that is odd anyway.
_odd_text = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=20
) | st.sampled_from(["\u202e", "\u2028", "\ufeff", "\U0001f980", "e\u0301", "\\", '"'])

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _odd_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(_odd_text, children, max_size=3)
    ),
    max_leaves=8,
)

HOSTILE_PAYLOADS = [
    '{"tasks": 1e5000}',
    '{"tasks": 2, "fail": [1e5000]}',
    '{"tasks": -1e5000}',
    '{"tasks": ' + "[" * 3000 + "]" * 3000 + "}",
    "[" * 3000 + "]" * 3000,
    '{"tasks": 100000000000000000000000000}',
    f'{{"tasks": {MAX_TASKS + 1}}}',
    '{"tasks": 2, "bogus": 1}',
    '{"tasks": "3"}',
    '{"tasks": -1}',
    '{"tasks": 2.5}',
    '{"tasks": true}',
    '{"tasks": 1, "fail": "x"}',
    '{"tasks": 1, "task_ms": -5}',
    '{"\\u202e": "\\ud83e\\udd80", "tasks": 1}',
    "[]",
    '"just a string"',
    "null",
    "{}",
]


def _hostile_payload() -> st.SearchStrategy[str]:
    return st.sampled_from(HOSTILE_PAYLOADS) | _json.map(json.dumps)


def _job() -> st.SearchStrategy[JobSpec]:
    return st.one_of(
        _hostile_job(),
        _valid_synthetic(),
        _hostile_payload().map(lambda p: JobSpec("synthetic", p)),
        (_hostile_payload() | _valid_synthetic().map(lambda j: j.payload)).map(
            lambda p: JobSpec("noprep", p)
        ),
    )


def scenarios() -> st.SearchStrategy[Scenario]:
    controls = st.builds(
        Control,
        st.integers(0, 300),
        st.sampled_from(["cancel", "resume", "retry", "restart"]),
        st.integers(0, 3),
    )
    return st.builds(
        Scenario, st.lists(_job(), min_size=1, max_size=4), st.lists(controls, max_size=4)
    )


# ----------------------------------------------------------------- one example


async def play(url: str, scenario: Scenario) -> list[str]:
    """Run one scenario; return what is wrong (nothing, when all holds)."""
    problems: list[str] = []
    conn = await db.connect(url)
    try:
        await conn.execute(
            "TRUNCATE herder.jobs CASCADE; "
            "TRUNCATE public.hostile_settlements, public.hostile_hook_runs"
        )
        config: dict[str, Any] = {"lease_seconds": LEASE, "concurrency": 4}
        async with faulty_daemon(url, **config) as one, faulty_daemon(url, **config) as two:
            watches = [one, two]
            ids = []
            for job in scenario.jobs:
                ids.append(
                    await conn.fetchval(
                        "INSERT INTO herder.jobs (kind, payload) VALUES ($1, $2::text::jsonb) "
                        "RETURNING id",
                        job.kind,
                        job.payload,
                    )
                )
            for control in scenario.controls:
                await anyio.sleep(control.after_ms / 1000)  # a random moment: the input
                await conn.fetchval(
                    f"SELECT herder.{control.action}_job($1)", ids[control.job % len(ids)]
                )

            def all_alive() -> bool:
                return all(w.alive for w in watches)

            async def settled() -> bool:
                if not all_alive():
                    return True
                n = await conn.fetchval(
                    "SELECT count(*) FROM herder.jobs WHERE status = ANY($1)", list(JOB_FINISHED)
                )
                return bool(n == len(ids))

            async def hooks_drained() -> bool:
                return not all_alive() or await _pending_hooks(conn) == 0

            try:
                await wait_for(settled, timeout=15, what="every job to settle")
                await wait_for(hooks_drained, timeout=2 * LEASE + 4, what="on_finished hooks")
            except AssertionError as exc:
                problems.append(str(exc))
            for i, watch in enumerate(watches):
                if watch.died is not None:
                    problems.append(f"daemon {i + 1} died: {describe(watch.died)}")
                elif not await _healthy(watch):
                    problems.append(f"daemon {i + 1}: /healthz is not 200")
            problems += await _check(conn, ids)
    finally:
        await conn.close()
    return problems


async def _healthy(watch: Watch) -> bool:
    url = f"http://127.0.0.1:{watch.daemon.health_port}/healthz"

    async def ok() -> bool:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http,
            http.get(url) as response,
        ):
            return response.status == 200

    try:
        await wait_for(ok, timeout=3, interval=0.2, what="/healthz")
    except (AssertionError, aiohttp.ClientError, TimeoutError):
        return False
    return True


async def _pending_hooks(conn: db.Connection) -> int:
    if await conn.fetchval("SELECT to_regclass('herder.finish_hooks') IS NOT NULL"):
        n: int = await conn.fetchval("SELECT count(*) FROM herder.finish_hooks")
    else:
        n = await conn.fetchval("SELECT count(*) FROM herder.jobs WHERE finish_pending")
    return n


async def _check(conn: db.Connection, ids: list[int]) -> list[str]:
    problems: list[str] = []
    jobs = await conn.fetch(
        "SELECT id, kind, status, message, max_attempts, left(payload::text, 80) AS payload "
        "FROM herder.jobs WHERE id = ANY($1::bigint[]) ORDER BY id",
        ids,
    )
    settlements = Counter(
        (r["job_id"], r["status"])
        for r in await conn.fetch("SELECT job_id, status FROM public.hostile_settlements")
    )
    runs = Counter(
        (r["job_id"], r["status"])
        for r in await conn.fetch("SELECT job_id, status FROM public.hostile_hook_runs")
    )
    for job in jobs:
        label = f"job {job['id']} ({job['kind']} {job['payload']})"
        if job["status"] not in JOB_FINISHED:
            problems.append(f"{label} did not settle: {job['status']} {_short(job['message'])}")
        elif job["message"] is None:
            problems.append(f"{label} settled {job['status']} with no message")
        tasks = await conn.fetch(
            "SELECT seq, status, attempts, attempts_base, left(message, 100) AS message "
            "FROM herder.tasks WHERE job_id = $1 ORDER BY seq",
            job["id"],
        )
        for t in tasks:
            if t["attempts"] - t["attempts_base"] > job["max_attempts"]:
                problems.append(
                    f"{label} task {t['seq']}: {t['attempts']} attempts (base "
                    f"{t['attempts_base']}) over the budget of {job['max_attempts']}"
                )
            if job["status"] in JOB_FINISHED and t["status"] in ("PENDING", "IN_PROGRESS"):
                problems.append(f"{label} settled with task {t['seq']} {t['status']}")
        if job["kind"] in HOOKED_KINDS:
            for status in ("SUCCESS", "WARNING", "FAILURE"):
                settled, ran = settlements[job["id"], status], runs[job["id"], status]
                if settled != ran:
                    problems.append(
                        f"{label}: {settled} settlements to {status}, "
                        f"but on_finished ran {ran} times for them"
                    )
    return problems


def _short(text: str | None) -> str:
    return repr(text if text is None or len(text) < 200 else text[:200] + "...")


def run_in_fresh_loop(coro: Coroutine[Any, Any, T]) -> T:
    """One example's event loop. A handler's KeyboardInterrupt or SystemExit that gets
    past a daemon would stop the loop (asyncio re-raises them): that is a failure of the
    example, not a reason to stop the test session."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    except (KeyboardInterrupt, SystemExit) as exc:
        raise AssertionError(
            f"{type(exc).__name__} from a handler got past the daemon and stopped the loop"
        ) from exc
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            with contextlib.suppress(BaseException):  # best effort: the example failed
                loop.run_until_complete(
                    asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
                )
        loop.close()


async def _setup(url: str) -> None:
    conn = await db.connect(url)
    try:
        await conn.execute(SETUP)
    finally:
        await conn.close()


def _items(*items: dict[str, Any], **options: Any) -> JobSpec:
    return _hostile_spec({"items": list(items), **options})


#: The containment cases, always run (Phase.explicit) before the random ones.
EXAMPLES = [
    Scenario(
        [
            JobSpec("synthetic", '{"tasks": 1e5000}'),
            JobSpec("synthetic", HOSTILE_PAYLOADS[3]),  # nesting Python cannot decode
            JobSpec("noprep", "[]"),
            JobSpec("synthetic", f'{{"tasks": {MAX_TASKS + 1}}}'),
            JobSpec("synthetic", '{"tasks": 3, "flaky": [1]}'),
        ],
        [],
    ),
    Scenario(
        [
            _items(
                *({"do": "raise", "msg": m, "exc": e} for m in MESSAGES for e in ("value",)),
                {"do": "raise", "msg": "empty", "exc": "unprintable"},
                {"do": "warn", "msg": "nul"},
                {"do": "warn", "msg": "surrogate"},
                *({"do": "exit", "exc": e} for e in EXITS),
            )
        ],
        [],
    ),
    Scenario(
        [
            _items(*({"do": "retry", "delay": d} for d in DELAYS)),
            _items(*({"do": "result", "value": r} for r in RESULTS)),
            _items({"do": "hang", "ms": 3000}, {"do": "ok"}),
        ],
        [],
    ),
    Scenario(
        [
            _items({"do": "ok"}, hook_ms=1500),
            _items({"do": "raise", "msg": "empty", "exc": "value"}, hook_ms=1500),
        ],
        [Control(400, "restart", 0), Control(200, "retry", 1)],
    ),
]


def test_hostile_inputs_never_stop_or_fool_the_daemons(
    db_url: str, make_kind: Callable[..., Kind]
) -> None:
    declare_kinds(make_kind)
    run_in_fresh_loop(_setup(db_url))

    @settings(
        max_examples=15,
        deadline=None,
        # The scenarios run for seconds each; shrinking one would take minutes. The
        # failing example is printed in full instead.
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(scenarios())
    @example(EXAMPLES[0])
    @example(EXAMPLES[1])
    @example(EXAMPLES[2])
    @example(EXAMPLES[3])
    def scenario_holds(scenario: Scenario) -> None:
        problems = run_in_fresh_loop(play(db_url, scenario))
        assert not problems, "\n".join(problems)

    scenario_holds()
