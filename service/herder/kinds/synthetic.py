"""The built-in ``synthetic`` kind, for demos, tests and benchmarks.

Payload: ``tasks`` (int >= 0, required), ``prepare_ms`` and ``task_ms`` (sleeps, default
0), ``fail``, ``warn`` and ``flaky`` (lists of task indices). Anything else, or a value
of the wrong type, fails the job before a single task exists.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from herder.kinds import JSON, InvalidPayload, JobContext, Kind, Retry, TaskContext, warn

synthetic = Kind("synthetic", max_attempts=3, backoff=0.05, max_backoff=1.0, prepare_resumes=True)

_INDEX_LISTS = ("fail", "warn", "flaky")
_KEYS = frozenset({"tasks", "prepare_ms", "task_ms", *_INDEX_LISTS})


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    tasks: int
    prepare_ms: float = 0
    task_ms: float = 0
    fail: frozenset[int] = frozenset()
    warn: frozenset[int] = frozenset()
    flaky: frozenset[int] = frozenset()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(payload: dict[str, JSON], key: str) -> float:
    value = payload.get(key, 0)
    if not (_is_int(value) or isinstance(value, float)) or value < 0:
        raise InvalidPayload(f"payload key {key!r} must be a number >= 0, got {value!r}")
    return float(value)


def _indices(payload: dict[str, JSON], key: str) -> frozenset[int]:
    value = payload.get(key, [])
    if not isinstance(value, list) or not all(_is_int(i) and i >= 0 for i in value):
        raise InvalidPayload(
            f"payload key {key!r} must be a list of task indices (ints >= 0), got {value!r}"
        )
    return frozenset(value)


def parse_payload(payload: JSON) -> SyntheticSpec:
    if not isinstance(payload, dict):
        raise InvalidPayload(f"payload must be a JSON object, got {payload!r}")
    unknown = sorted(set(payload) - _KEYS)
    if unknown:
        raise InvalidPayload(
            f"unknown payload key {unknown[0]!r} (allowed: {', '.join(sorted(_KEYS))})"
        )
    if "tasks" not in payload:
        raise InvalidPayload("payload key 'tasks' is required")
    tasks = payload["tasks"]
    if not _is_int(tasks) or tasks < 0:
        raise InvalidPayload(f"payload key 'tasks' must be an int >= 0, got {tasks!r}")
    return SyntheticSpec(
        tasks=tasks,
        prepare_ms=_number(payload, "prepare_ms"),
        task_ms=_number(payload, "task_ms"),
        **{key: _indices(payload, key) for key in _INDEX_LISTS},
    )


def task_payload(spec: SyntheticSpec, i: int) -> dict[str, JSON]:
    payload: dict[str, JSON] = {"i": i}
    if spec.task_ms:
        payload["ms"] = spec.task_ms
    for key in _INDEX_LISTS:
        if i in getattr(spec, key):
            payload[key] = True
    return payload


async def sleep_ms(ms: float) -> None:
    """Sleep ``ms`` milliseconds, at least one: uvloop counts whole milliseconds and does
    not sleep at all for 0.5 (asyncio took about 1 ms for it anyway)."""
    await anyio.sleep(max(ms, 1.0) / 1000)


@synthetic.prepare
async def prepare(job: JobContext) -> AsyncIterator[JSON]:
    spec = parse_payload(job.payload)
    if spec.tasks > job.max_tasks:
        # The count is known up front: refuse before a single task is written.
        raise InvalidPayload(
            f"payload key 'tasks' asks for {spec.tasks} tasks; the limit is "
            f"{job.max_tasks} (herder.settings max_tasks_per_job)"
        )
    for i in range(job.resume_from, spec.tasks):
        if spec.prepare_ms:
            await sleep_ms(spec.prepare_ms)
        yield task_payload(spec, i)


@synthetic.process
async def process(task: TaskContext) -> JSON:
    payload = task.payload
    i = payload["i"]
    if "ms" in payload:
        await sleep_ms(payload["ms"])
    if payload.get("fail"):
        raise RuntimeError(f"synthetic failure of task {i}")
    if payload.get("flaky") and task.attempt == 1:
        raise Retry(f"synthetic flaky task {i}, first attempt")
    if payload.get("warn"):
        return warn(f"synthetic warning for task {i}")
    return None
