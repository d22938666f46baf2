"""The worker side of a daemon: a claimer, N executors and a batching completer.

The claimer keeps a bounded local queue filled with tasks claimed in batches; executors
run them (``execution.py``), each executor in a cancel scope it reuses across tasks (see
``_executor``); the completer writes their outcomes and settles their jobs
(``completer.py``). Every claimed task is *held* until its outcome is written (or it is
handed back on shutdown), and the heartbeat renews the leases of everything held.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import anyio
import structlog

from herder.completer import Completer
from herder.execution import canceled, execute
from herder.kinds import plain
from herder.metrics import Metrics
from herder.resilience import TRANSIENT, Backoff, keep_renewing, retrying, supervise
from herder.signals import Wakeup
from herder.states import TaskStatus
from herder.store import ClaimedTask, Outcome, Store

log = structlog.get_logger("herder.worker")

# Why a running task's scope was cancelled; decides what is written for it.
_JOB_STOPPED = "job stopped"
_SHUTDOWN = "shutdown"
#: Seconds of work per executor the daemon holds by default (see Worker.room).
PREFETCH_HORIZON = 1.0
#: Seconds between two recounts of the queued work (see Worker._rebalance).
REBALANCE_EVERY = 0.25
#: Weight of the newest handler time in its kind's moving average.
TASK_SECONDS_WEIGHT = 0.2
#: Seconds each shutdown write (outcomes, hand-back) is retried before the daemon exits.
SHUTDOWN_WRITES = 10.0
#: An executor lets the event loop run other things at least once per this many tasks.
YIELD_EVERY = 32


class LocalQueue:
    """The claimed tasks waiting for an executor: the highest priority first, then in the
    order claimed. A claim of urgent work made while tasks of lower priority wait runs
    before them."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, ClaimedTask]] = []
        self._added = itertools.count()

    def add(self, tasks: list[ClaimedTask]) -> None:
        for task in tasks:
            heapq.heappush(self._heap, (-task.priority, next(self._added), task))

    def pop(self) -> ClaimedTask:
        return heapq.heappop(self._heap)[2]

    def clear(self) -> None:
        self._heap.clear()

    def take_last(self, keep: Callable[[list[ClaimedTask]], int]) -> list[ClaimedTask]:
        """Remove and return the tasks that would run last, past the first ``keep(tasks in
        running order)`` of them."""
        entries = sorted(self._heap)
        kept = keep([entry[2] for entry in entries])
        self._heap = entries[:kept]  # a sorted list is a heap
        return [entry[2] for entry in entries[kept:]]

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[ClaimedTask]:
        return (entry[2] for entry in self._heap)


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
        kinds: list[str] | None = None,
        fair: bool = True,
    ) -> None:
        """``kinds``: the kinds this daemon serves (None: any); ``fair``: claims share
        capacity across owners and jobs (see herder.claim_tasks)."""
        self.store = store
        self.kinds = kinds
        self.fair = fair
        self.name = name
        self.metrics = metrics
        self.concurrency = concurrency
        self.lease = lease
        self.poll_interval = poll_interval
        self._fixed_prefetch = prefetch
        #: Moving average of handler time, by kind.
        self._kind_seconds: dict[str, float] = {}
        #: What the next claimed task is expected to cost: the dearest kind of the last
        #: claim (tasks come in runs of one job), a whole horizon before anything is known.
        self._next_task_seconds = PREFETCH_HORIZON
        #: Expected seconds of the tasks claimed and not yet done (queued or running),
        #: each counted as its kind's time when it was claimed, and its total.
        self._work_of: dict[tuple[int, int], float] = {}
        self._work_seconds = 0.0
        self._next_rebalance = 0.0
        self.claim_batch = claim_batch
        self.completer = Completer(
            store,
            metrics,
            batch=complete_batch,
            flush_seconds=flush_seconds,
            poll_interval=poll_interval,
            on_written=self._written,
            held_jobs=lambda: self.held_job_ids,
        )
        self.wakeup = Wakeup()  # new tasks may be claimable
        self._capacity = Wakeup()  # held tasks were written back
        self._work = Wakeup()  # the local queue has tasks
        self._idle = Wakeup()  # nothing is running
        self._queue = LocalQueue()
        #: Every claimed attempt not yet written back, by (task id, attempt).
        self._held: dict[tuple[int, int], ClaimedTask] = {}
        self._running: dict[tuple[int, int], _Slot] = {}  # the slot running each attempt
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
        plain.set_thread_limit(self.concurrency)
        with contextlib.suppress(*TRANSIENT):
            self.max_result_bytes = await self.store.max_result_bytes()
        async with anyio.create_task_group() as tg:
            tg.start_soon(supervise, "claimer", self._claimer)
            tg.start_soon(supervise, "completer", self.completer.run)
            tg.start_soon(supervise, "settler", self.completer.run_settler)
            tg.start_soon(keep_renewing, "task leases", self._renew, self.lease / 3)
            task_status.started()
            async with anyio.create_task_group() as executors:
                for _ in range(self.concurrency):
                    executors.start_soon(self._executor)
            # Executors are done (shutdown): let the completer drain, then stop.
            await self.completer.drain()
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
            await retrying(
                "write outcomes at shutdown", self.completer.flush, timeout=SHUTDOWN_WRITES
            )
            with anyio.move_on_after(SHUTDOWN_WRITES), contextlib.suppress(*TRANSIENT):
                await self.completer.settle()  # or the next sweep, of any daemon, settles them
            held = list(self._held)
            handed_back = await retrying(
                "hand back tasks at shutdown",
                lambda: self.store.release_tasks(held, self.name),
                timeout=SHUTDOWN_WRITES,
            )
        log.info("handed back unfinished tasks", tasks=handed_back)
        self._held.clear()
        self._queue.clear()
        self._work_of.clear()
        self._work_seconds = 0.0

    # ------------------------------------------------------------ claiming

    def task_seconds(self, kind: str) -> float:
        """What a task of ``kind`` is expected to take: its kind's moving average, or a
        whole horizon while the kind is unmeasured (start small)."""
        return self._kind_seconds.get(kind, PREFETCH_HORIZON)

    def room(self) -> tuple[int, int]:
        """(how many tasks to claim now, the least claim worth making).

        Short tasks want a deep local queue, so that a claim is always in flight while
        the executors drain the last one. Long tasks want a shallow one, so that a fleet
        shares them instead of one daemon hoarding what others could run. So by default
        the daemon holds about PREFETCH_HORIZON seconds of work per executor, counted
        task by task from each one's kind (a kind's history says nothing of another's),
        and never more than two claim batches. ``--prefetch`` fixes a count instead.
        Tasks done but not yet written are bounded separately, by as many again.
        """
        unfinished = len(self._queue) + len(self._running)
        if self._fixed_prefetch:
            limit = self._fixed_prefetch
            room = min(limit - unfinished, 2 * limit - len(self._held))
            return room, max(1, min(self.claim_batch, limit) // 4)
        budget = self.concurrency * PREFETCH_HORIZON
        per_task = max(self._next_task_seconds, 1e-6)
        limit = min(2 * self.claim_batch, max(1, int(budget / per_task)))
        room = min(
            int((budget - self._work_seconds) / per_task),
            limit - unfinished,
            2 * limit - len(self._held),
        )
        return room, max(1, min(self.claim_batch, limit) // 4)

    async def _claimer(self) -> None:
        if self._claim_in_doubt:
            await self._hand_back_orphans()
        while self._claiming:
            await self._rebalance()
            # Room is measured in work not yet done: waiting on the completer's write
            # too would idle the executors once per batch.
            room, least = self.room()
            if room < least:
                await self._capacity.wait(self.poll_interval)
                continue
            asked = min(room, self.claim_batch)
            self._claim_in_doubt = True
            claimed = await self.store.claim_tasks(
                asked, self.name, self.lease, self.kinds, fair=self.fair
            )
            self._claim_in_doubt = False
            if not self._claiming:
                # Shutdown began while the claim was in flight: these never ran.
                with anyio.CancelScope(shield=True):
                    await self.store.release_tasks((t.key for t in claimed), self.name)
                return
            if claimed:
                self._next_task_seconds = max(self.task_seconds(t.kind) for t in claimed)
                claimed = await self._trim(claimed)
                for task in claimed:
                    self._work_of[task.key] = cost = self.task_seconds(task.kind)
                    self._work_seconds += cost
                self.metrics.claimed(len(claimed))
                for task in claimed:
                    self._held[task.key] = task
                # Jobs move to IN_PROGRESS before any of their tasks runs. This write is
                # retried, never abandoned: the tasks are held, and must be queued.
                starting = sorted({t.job_id for t in claimed if t.job_status == "PENDING"})
                if starting:
                    await self._start_jobs(starting)
                self._queue.add(claimed)
                self._work.set()
            if len(claimed) < asked:
                await self.wakeup.wait(self._idle_wait())

    async def _rebalance(self) -> None:
        """Hand back queued tasks that turned out to be more work than the budget. A kind's
        times can change (a job of 100 ms tasks after a run of no-op tasks of the same
        kind): tasks claimed while it looked instant are counted again, at most every
        REBALANCE_EVERY seconds, at what the kind now takes, and the excess goes back for
        an idle daemon, or a later claim, to take."""
        if self._fixed_prefetch or time.monotonic() < self._next_rebalance:
            return
        self._next_rebalance = time.monotonic() + REBALANCE_EVERY
        for task in self._queue:
            cost = self.task_seconds(task.kind)
            self._work_seconds += cost - self._work_of.get(task.key, cost)
            self._work_of[task.key] = cost
        budget = self.concurrency * PREFETCH_HORIZON
        if self._work_seconds <= 1.5 * budget:
            return
        free = budget - (self._work_seconds - sum(self._work_of[t.key] for t in self._queue))

        def within_budget(queued: list[ClaimedTask]) -> int:
            work = 0.0
            for kept, task in enumerate(queued):
                work += self._work_of[task.key]
                if work > free:
                    return kept
            return len(queued)

        extra = self._queue.take_last(within_budget)
        if not extra:
            return
        try:
            await self.store.release_tasks((t.key for t in extra), self.name)
        except Exception as exc:  # they stay, and run here later
            log.warning("could not hand back tasks beyond the budget", error=str(exc))
            self._queue.add(extra)
            return
        for task in extra:
            self._held.pop(task.key, None)
            self._work_seconds -= self._work_of.pop(task.key, 0.0)
        # The next claim is likely to bring these back: size it at what they now take.
        self._next_task_seconds = max(
            self._next_task_seconds, *(self.task_seconds(t.kind) for t in extra)
        )
        self._capacity.set()

    async def _trim(self, claimed: list[ClaimedTask]) -> list[ClaimedTask]:
        """Hand back at once what a claim brought beyond the work budget. A claim is sized
        by the tasks of the last one; this one may bring a kind that takes far longer, or
        one not measured yet, and those must stay claimable by an idle daemon."""
        if self._fixed_prefetch:
            return claimed
        free = self.concurrency * PREFETCH_HORIZON - self._work_seconds
        kept, work = 0, 0.0
        for task in claimed:
            work += self.task_seconds(task.kind)
            if work > free and kept:
                break
            kept += 1
        if kept == len(claimed):
            return claimed
        extra = claimed[kept:]
        try:
            await self.store.release_tasks((t.key for t in extra), self.name)
        except Exception as exc:  # they run here, later: nothing is lost
            log.warning("could not hand back tasks beyond the budget", error=str(exc))
            return claimed
        return claimed[:kept]

    async def _start_jobs(self, job_ids: list[int]) -> None:
        """PENDING -> IN_PROGRESS for the jobs whose first tasks were just claimed, tried
        until it goes through (or shutdown hands the tasks back). Should it never go
        through, the tasks still run: settlement sets a job's started_at itself."""
        backoff = Backoff(0.05, 2.0)
        while self._claiming:
            try:
                latencies = await self.store.start_jobs(job_ids)
            except Exception as exc:
                log.warning("could not mark jobs started; retrying", error=str(exc))
                await backoff.wait()
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
                    task = self._queue.pop()
                    if self._queue:
                        self._work.set()
                    self._finish(await self._run_in(slot, task))
                    task = None
                    ran += 1
                    if ran % YIELD_EVERY == 0:
                        # Handlers that never suspend would otherwise keep the loop from
                        # the claimer and completer until the whole local queue is done.
                        await anyio.lowlevel.checkpoint()
                    if slot.scope.cancel_called:
                        break  # the cancel came too late for its task: use a fresh slot
            if task is not None and _SHUTDOWN not in slot.reason:
                self._finish(canceled(task, "canceled while running"))

    async def _run_in(self, slot: _Slot, task: ClaimedTask) -> Outcome:
        self._running[task.key] = slot
        try:
            started = time.monotonic()
            outcome = await execute(task, self.store.app_pool, self.max_result_bytes)
            outcome.seconds = seconds = time.monotonic() - started
            mean = self._kind_seconds.get(task.kind)
            self._kind_seconds[task.kind] = (
                seconds if mean is None else mean + (seconds - mean) * TASK_SECONDS_WEIGHT
            )
            return outcome
        finally:
            del self._running[task.key]
            if not self._running:
                self._idle.set()

    def _finish(self, outcome: Outcome) -> None:
        self._work_seconds -= self._work_of.pop(outcome.key, 0.0)
        if outcome.status == TaskStatus.PENDING:
            # A retry: the claimer looks for it again when it falls due (see _idle_wait).
            self._next_retry_due = min(self._next_retry_due, time.monotonic() + outcome.delay)
        self.completer.add(outcome)
        self._capacity.set()

    # ------------------------------------------------------------ written back

    def _written(self, batch: list[Outcome]) -> None:
        """The completer wrote these outcomes: their tasks are no longer held."""
        for outcome in batch:
            self._held.pop(outcome.key, None)
        self._capacity.set()
        if any(o.status == TaskStatus.PENDING for o in batch):
            self.wakeup.set()
