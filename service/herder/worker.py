"""The worker side of a daemon: a claimer, N executors and a batching completer.

The claimer keeps a bounded local queue filled with tasks claimed in batches; executors
run them, each executor in a cancel scope it reuses across tasks (see ``_executor``);
the completer writes outcomes many per statement, and the settler settles the jobs that
may have finished. Every claimed task is *held* until its
outcome is written (or it is handed back on shutdown), and the heartbeat renews the
leases of everything held.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import structlog

from herder.db import NotStorable, Undecodable, encode_json
from herder.kinds import Kind, Retry, TaskContext, TaskWarning, describe, get_kind, message_of
from herder.metrics import Metrics
from herder.resilience import TRANSIENT, keep_renewing, retrying, supervise
from herder.signals import Wakeup
from herder.states import TaskStatus
from herder.store import ClaimedTask, Outcome, Store

log = structlog.get_logger("herder.worker")

# Why a running task's scope was cancelled; decides what is written for it.
_JOB_STOPPED = "job stopped"
#: Seconds of work the local queue holds by default (see Worker.prefetch).
PREFETCH_HORIZON = 1.0
#: Weight of the newest handler time in the moving average.
TASK_SECONDS_WEIGHT = 0.05
_SHUTDOWN = "shutdown"
#: Seconds each shutdown write (outcomes, hand-back) is retried before the daemon exits.
SHUTDOWN_WRITES = 10.0
#: An executor lets the event loop run other things at least once per this many tasks.
YIELD_EVERY = 32


@dataclass(slots=True)
class _Slot:
    """An executor's cancel scope, shared by the tasks it runs one after another."""

    scope: anyio.CancelScope
    #: Why the scope was cancelled: _JOB_STOPPED or _SHUTDOWN.
    reason: list[str] = field(default_factory=list)


class Worker:
    def __init__(
        self,
        store: Store,
        name: str,
        *,
        metrics: Metrics,
        concurrency: int,
        lease: float,
        poll_interval: float,
        prefetch: int | None = None,
        claim_batch: int = 1000,
        complete_batch: int = 1000,
        flush_seconds: float = 0.002,
    ) -> None:
        self.store = store
        self.name = name
        self.metrics = metrics
        self.concurrency = concurrency
        self.lease = lease
        self.poll_interval = poll_interval
        self._fixed_prefetch = prefetch
        self._mean_task_seconds: float | None = None  # moving average of handler time
        self.claim_batch = claim_batch
        self.complete_batch = complete_batch
        self.flush_seconds = flush_seconds
        self.wakeup = Wakeup()  # new tasks may be claimable
        self._capacity = Wakeup()  # held tasks were written back
        self._work = Wakeup()  # the local queue has tasks
        self._outcomes_ready = Wakeup()
        #: Jobs of written outcomes, for the settler.
        self._unsettled: set[int] = set()
        self._settle_ready = Wakeup()
        self._completer_done = anyio.Event()
        self._idle = Wakeup()  # nothing is running
        self._queue: deque[ClaimedTask] = deque()
        #: Every claimed attempt not yet written back, by (task id, attempt).
        self._held: dict[tuple[int, int], ClaimedTask] = {}
        self._running: dict[tuple[int, int], _Slot] = {}  # the slot running each attempt
        self._outcomes: list[Outcome] = []
        self._flush_lock = anyio.Lock()
        self._claiming = True
        self._executing = True
        self._next_retry_due = float("inf")
        #: A claim failed: its reply may have been lost after the claim committed.
        self._claim_in_doubt = False
        #: herder.settings max_result_bytes (read when the worker starts).
        self.max_result_bytes = 1 << 20

    # ------------------------------------------------------------ introspection

    @property
    def held(self) -> list[tuple[int, int]]:
        """(task id, attempt) of every attempt this worker holds."""
        return list(self._held)

    @property
    def held_job_ids(self) -> set[int]:
        return {t.job_id for t in self._held.values()}

    @property
    def running_count(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------ control

    def stop_jobs(self, job_ids: set[int]) -> None:
        """Cancel the running tasks of jobs that were canceled or restarted."""
        for key, slot in list(self._running.items()):
            task = self._held.get(key)
            if task is not None and task.job_id in job_ids:
                slot.reason.append(_JOB_STOPPED)
                slot.scope.cancel()
        # Tasks still waiting in the local queue are settled when an executor reaches them.
        for task in self._queue:
            if task.job_id in job_ids:
                task.stopped = True

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with contextlib.suppress(*TRANSIENT):
            self.max_result_bytes = await self.store.max_result_bytes()
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervise, "claimer", self._claimer)
            tg.start_soon(supervise, "completer", self._completer)
            tg.start_soon(supervise, "settler", self._settler)
            tg.start_soon(keep_renewing, "task leases", self._renew, self.lease / 3)
            task_status.started()
            async with anyio.create_task_group() as executors:
                for _ in range(self.concurrency):
                    executors.start_soon(self._executor)
            # Executors are done (shutdown): let the completer drain, then stop.
            self._outcomes_ready.set()
            await self._completer_done.wait()
            tg.cancel_scope.cancel()

    async def _renew(self) -> bool:
        """Renew every held attempt's lease; False when some row was locked and should be
        tried again soon (a lease must not run out because someone held a lock)."""
        held = set(self._held)
        renewed = await self.store.renew_task_leases(held, self.name, self.lease)
        missed = (held - renewed) & set(self._held)  # not written back meanwhile
        return not missed

    async def shutdown(self, timeout: float) -> None:
        """Stop claiming; let running tasks finish for up to ``timeout`` seconds; cancel
        the rest and hand every unfinished task back to PENDING with its attempt unspent."""
        self._claiming = False
        self._executing = False
        self.wakeup.set()
        self._work.set()
        with anyio.move_on_after(timeout):
            while self._running:
                await self._idle.wait()
        for slot in self._running.values():
            slot.reason.append(_SHUTDOWN)
            slot.scope.cancel()
        while self._running:
            await self._idle.wait()
        with anyio.CancelScope(shield=True):
            # Outcomes first (a finished task must not be handed back to run again),
            # then the rest, each tried again until it goes through or time runs out.
            await retrying("write outcomes at shutdown", self._flush, timeout=SHUTDOWN_WRITES)
            with anyio.move_on_after(SHUTDOWN_WRITES), contextlib.suppress(*TRANSIENT):
                await self._settle()  # or the next sweep, of any daemon, settles them
            held = list(self._held)
            handed_back = await retrying(
                "hand back tasks at shutdown",
                lambda: self.store.release_tasks(held, self.name),
                timeout=SHUTDOWN_WRITES,
            )
        log.info("handed back unfinished tasks", tasks=handed_back)
        self._held.clear()
        self._queue.clear()

    # ------------------------------------------------------------ claiming

    @property
    def prefetch(self) -> int:
        """How many tasks this daemon holds at most (claimed, running or being written).

        Short tasks want a deep local queue, two claim batches, so that a claim is always
        in flight while the executors drain the last one. Long tasks want a shallow one, so
        that a fleet shares them instead of one daemon hoarding what others could run. So
        by default it holds about PREFETCH_HORIZON seconds of work for its executors,
        judged by a moving average of handler times, between `concurrency` and two batches.
        """
        if self._fixed_prefetch:
            return self._fixed_prefetch
        if self._mean_task_seconds is None:
            return 4 * self.concurrency
        per_executor = PREFETCH_HORIZON / max(self._mean_task_seconds, 1e-6)
        return int(
            min(2 * self.claim_batch, max(self.concurrency, self.concurrency * per_executor))
        )

    async def _claimer(self) -> None:
        if self._claim_in_doubt:
            await self._hand_back_orphans()
        while self._claiming:
            prefetch = self.prefetch
            # Room is measured in work not yet done: waiting on the completer's write
            # too would idle the executors once per batch. Tasks done but not yet
            # written are bounded separately, by another `prefetch`.
            unfinished = len(self._queue) + len(self._running)
            room = min(prefetch - unfinished, 2 * prefetch - len(self._held))
            if room < max(1, min(self.claim_batch, prefetch) // 4):
                await self._capacity.wait(self.poll_interval)
                continue
            asked = min(room, self.claim_batch)
            self._claim_in_doubt = True
            claimed = await self.store.claim_tasks(asked, self.name, self.lease)
            self._claim_in_doubt = False
            if not self._claiming:
                # Shutdown began while the claim was in flight: these never ran.
                with anyio.CancelScope(shield=True):
                    await self.store.release_tasks((t.key for t in claimed), self.name)
                return
            if claimed:
                self.metrics.claimed(len(claimed))
                for task in claimed:
                    self._held[task.key] = task
                # Jobs move to IN_PROGRESS before any of their tasks runs. This write is
                # retried, never abandoned: the tasks are held, and must be queued.
                starting = sorted({t.job_id for t in claimed if t.job_status == "PENDING"})
                if starting:
                    await self._start_jobs(starting)
                self._queue.extend(claimed)
                self._work.set()
            if len(claimed) < asked:
                await self.wakeup.wait(self._idle_wait())

    async def _start_jobs(self, job_ids: list[int]) -> None:
        """PENDING -> IN_PROGRESS for the jobs whose first tasks were just claimed, tried
        until it goes through (or shutdown hands the tasks back). Should it never go
        through, the tasks still run: settlement sets a job's started_at itself."""
        delay = 0.05
        while self._claiming:
            try:
                latencies = await self.store.start_jobs(job_ids)
            except Exception as exc:
                log.warning("could not mark jobs started; retrying", error=str(exc))
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            for latency in latencies:
                self.metrics.start_latency.observe(latency)
            return

    async def _hand_back_orphans(self) -> None:
        """After a claim that failed, the claim may have committed all the same (its reply
        lost): tasks the database says this worker runs but that it does not hold go back
        to PENDING with their attempt unspent, instead of waiting out their lease. No
        claim is in flight here: only the claimer claims."""
        orphans = await self.store.my_running_tasks(self.name) - set(self._held)
        if orphans:
            handed_back = await self.store.release_tasks(orphans, self.name)
            log.warning("handed back tasks of a claim whose reply was lost", tasks=handed_back)
        self._claim_in_doubt = False

    def _idle_wait(self) -> float:
        """Sleep until the poll, or sooner if a retry we scheduled falls due."""
        due = self._next_retry_due - time.monotonic()
        if due <= 0:
            self._next_retry_due = float("inf")
            return 0
        return min(self.poll_interval, due + 0.005)

    # ------------------------------------------------------------ executing

    async def _executor(self) -> None:
        """Run tasks from the local queue until shutdown.

        A cancel scope per task would cost more than a no-op task, so each executor runs
        many tasks in one scope (a slot). Stopping a running task cancels its slot's
        scope; the executor then records the task and opens a new slot.
        """
        ran = 0
        while self._executing:
            slot = _Slot(anyio.CancelScope())
            task: ClaimedTask | None = None
            with slot.scope:
                while self._executing:
                    if not self._queue:
                        await self._work.wait()
                        continue
                    task = self._queue.popleft()
                    if self._queue:
                        self._work.set()
                    self._finish(task, await self._run_in(slot, task))
                    task = None
                    ran += 1
                    if ran % YIELD_EVERY == 0:
                        # Handlers that never suspend would otherwise keep the loop from
                        # the claimer and completer until the whole local queue is done.
                        await anyio.lowlevel.checkpoint()
                    if slot.scope.cancel_called:
                        break  # the cancel came too late for its task: use a fresh slot
            if task is not None and _SHUTDOWN not in slot.reason:
                self._finish(
                    task, self._outcome(task, TaskStatus.CANCELED, "canceled while running")
                )

    async def _run_in(self, slot: _Slot, task: ClaimedTask) -> Outcome | None:
        self._running[task.key] = slot
        try:
            started = time.monotonic()
            outcome = await self._execute(task)
            if outcome is not None:
                outcome.seconds = seconds = time.monotonic() - started
                mean = self._mean_task_seconds
                self._mean_task_seconds = (
                    seconds if mean is None else mean + (seconds - mean) * TASK_SECONDS_WEIGHT
                )
            return outcome
        finally:
            del self._running[task.key]
            if not self._running:
                self._idle.set()

    def _finish(self, task: ClaimedTask, outcome: Outcome | None) -> None:
        """Queue an outcome for the completer (None: the task is handed back instead)."""
        if outcome is not None:
            outcome.kind = task.kind
            self._outcomes.append(outcome)
            self._outcomes_ready.set()
        self._capacity.set()

    async def _execute(self, task: ClaimedTask) -> Outcome | None:
        attempt = task.attempts - task.attempts_base
        kind = get_kind(task.kind)
        if task.stopped:
            return self._outcome(task, TaskStatus.CANCELED, "canceled before it started")
        if kind is None:
            return self._outcome(task, TaskStatus.FAILURE, f"unknown kind {task.kind!r}")
        if isinstance(task.payload, Undecodable):
            return self._outcome(
                task, TaskStatus.FAILURE, f"task payload cannot be decoded: {task.payload.error}"
            )
        context = TaskContext(
            id=task.id,
            job_id=task.job_id,
            seq=task.seq,
            payload=task.payload,
            attempt=attempt,
            max_attempts=kind.max_attempts,
            pool=self.store.app_pool,
        )
        try:
            return self._result_outcome(task, await _call(kind, context))
        except _TimedOut:
            return self._failed(task, kind, attempt, f"timed out after {kind.timeout}s", None, True)
        except Retry as exc:
            message = message_of(exc) or "retry requested"
            return self._failed(task, kind, attempt, message, exc.delay, True)
        except Exception as exc:
            retriable = isinstance(exc, kind.retry_on)
            message = message_of(exc) or type(exc).__name__
            return self._failed(task, kind, attempt, message, None, retriable)
        except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
            # The handler's own end, not the daemon's: its task fails, never retried.
            return self._failed(task, kind, attempt, describe(exc), None, False)

    def _result_outcome(self, task: ClaimedTask, value: Any) -> Outcome:
        status, message = TaskStatus.SUCCESS, None
        if isinstance(value, TaskWarning):
            status, message, value = TaskStatus.WARNING, _text(value.message), value.result
        if value is None:
            return self._outcome(task, status, message)
        try:
            result = encode_json(value)
        except NotStorable as exc:
            return self._outcome(
                task,
                TaskStatus.FAILURE,
                f"process returned a result PostgreSQL cannot store: {exc}",
            )
        except Exception as exc:  # TypeError, ValueError, or a hostile __eq__/__str__
            return self._outcome(
                task,
                TaskStatus.FAILURE,
                f"process returned a result that is not JSON: {describe(exc)}",
            )
        if len(result) > self.max_result_bytes:
            return self._outcome(
                task,
                TaskStatus.FAILURE,
                f"process returned a result of {len(result)} bytes; the limit is "
                f"{self.max_result_bytes} (herder.settings max_result_bytes)",
            )
        return self._outcome(task, status, message, result_json=result.decode())

    def _failed(
        self,
        task: ClaimedTask,
        kind: Kind,
        attempt: int,
        message: str,
        delay: float | None,
        retriable: bool,
    ) -> Outcome:
        trace = _traceback()
        if retriable and attempt < kind.max_attempts:
            wait = _retry_delay(kind, attempt, delay)
            self._next_retry_due = min(self._next_retry_due, time.monotonic() + wait)
            return self._outcome(
                task,
                TaskStatus.PENDING,
                f"attempt {attempt} failed: {message}",
                traceback=trace,
                delay=wait,
            )
        if retriable:
            message = f"gave up after {attempt} attempts: {message}"
        log.warning(
            "task failed", job_id=task.job_id, task_id=task.id, attempt=attempt, error=message
        )
        return self._outcome(task, TaskStatus.FAILURE, message, traceback=trace)

    @staticmethod
    def _outcome(
        task: ClaimedTask,
        status: TaskStatus,
        message: str | None,
        *,
        result_json: str | None = None,
        traceback: str | None = None,
        delay: float = 0.0,
    ) -> Outcome:
        return Outcome(
            task.id,
            task.job_id,
            task.attempts,
            status.value,
            message,
            result_json,
            traceback,
            delay,
        )

    # ------------------------------------------------------------ completing

    async def _completer(self) -> None:
        while True:
            if not self._outcomes:
                if not self._executing and not self._running:
                    self._completer_done.set()
                    return
                await self._outcomes_ready.wait(self.poll_interval)
                continue
            if len(self._outcomes) < self.complete_batch:
                await anyio.sleep(self.flush_seconds)  # let a batch gather
            await self._flush()

    async def _flush(self) -> None:
        async with self._flush_lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        while self._outcomes:
            batch = self._outcomes[: self.complete_batch]
            # Removed only once written: a database outage retries the same batch, and
            # writing an outcome twice changes nothing (the second is fenced out).
            applied = await self._write(batch)
            del self._outcomes[: len(batch)]
            for outcome in batch:
                self._held.pop(outcome.key, None)
            self.metrics.finished((o.kind, o.status, o.seconds) for o in batch)
            self._capacity.set()
            if len(applied) < len(batch):
                stale = len(batch) - len(applied)
                log.info("discarded stale outcomes (canceled, rescued or restarted)", tasks=stale)
            if any(o.status == TaskStatus.PENDING for o in batch):
                self.wakeup.set()
            self._unsettled.update(job_id for _, job_id in applied)
            self._settle_ready.set()

    async def _settler(self) -> None:
        """Settles the jobs whose tasks the completer wrote. Apart from the completer, so
        that the next batch of outcomes is written while these jobs settle: with many
        small jobs, settling inline made every flush twice as long."""
        while True:
            await self._settle_ready.wait(self.poll_interval)
            await self._settle()

    async def _settle(self) -> None:
        # A job this worker still holds a task of cannot settle yet (that task is
        # running, or whoever took it from us settles), so it is not even asked: the
        # candidate query is the costliest part of settling a big job.
        jobs, self._unsettled = self._unsettled - self.held_job_ids, set()
        if not jobs:
            return
        try:
            self.metrics.settled(await self.store.settle(jobs))
        except BaseException:
            self._unsettled |= jobs  # tried again when the settler restarts
            raise

    async def _write(self, batch: list[Outcome]) -> list[tuple[int, int]]:
        """complete_tasks, contained: when PostgreSQL refuses the batch for what one
        outcome holds (anything but the database being away), the outcomes are written
        one by one, and each refused one as a FAILURE that says why."""
        try:
            return await self.store.complete_tasks(batch)
        except TRANSIENT:
            raise
        except asyncpg.PostgresError as exc:
            log.error("completion batch refused; writing one by one", error=str(exc))
        applied: list[tuple[int, int]] = []
        for outcome in batch:
            try:
                applied += await self.store.complete_tasks([outcome])
            except TRANSIENT:
                raise
            except asyncpg.PostgresError as exc:
                log.error("outcome refused", task_id=outcome.task_id, error=str(exc))
                refused = Outcome(
                    outcome.task_id,
                    outcome.job_id,
                    outcome.attempt,
                    TaskStatus.FAILURE.value,
                    f"the database refused the task's outcome: {exc}",
                    kind=outcome.kind,
                    seconds=outcome.seconds,
                )
                applied += await self.store.complete_tasks([refused])
        return applied


def _text(value: object) -> str:
    return value if isinstance(value, str) else message_of(Exception(value))


def _traceback() -> str:
    try:
        return traceback.format_exc()
    except Exception:  # a hostile exception can break the formatting too
        return "(the traceback could not be formatted)"


def _retry_delay(kind: Kind, attempt: int, asked: object) -> float:
    """The delay a Retry asked for, clamped to [0, the kind's max_backoff]; the kind's
    own backoff when it asked for none, or for something that is not a number."""
    if asked is None:
        return kind.retry_delay(attempt)
    try:
        delay = float(asked)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return kind.retry_delay(attempt)
    if math.isnan(delay):
        return kind.retry_delay(attempt)
    return min(max(delay, 0.0), kind.max_backoff)


class _TimedOut(Exception):
    """The kind's timeout expired. Distinct from a TimeoutError the handler raises itself,
    which is an ordinary failure (retried only if the kind declares it retriable)."""


async def _call(kind: Kind, context: TaskContext) -> Any:
    if kind.timeout is None:
        return await kind.process_fn(context)
    with anyio.move_on_after(kind.timeout) as deadline:
        return await kind.process_fn(context)
    if deadline.cancelled_caught:
        raise _TimedOut
    raise AssertionError("unreachable: the handler neither returned nor timed out")
