"""Runs kinds' ``on_finished`` hooks from the outbox the settling transaction wrote.

Each settlement to SUCCESS, WARNING or FAILURE commits one outbox row with it, so a
daemon dying right after a settlement leaves the hook pending; any daemon that knows the
kind runs it and deletes the row. The runner renews the row's lease while the hook runs
(a hook longer than the lease is not run twice), and its done-write is fenced by the
run's attempt (a stale runner cannot mark another run done).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import anyio
import structlog

from herder.kinds import KIND_CODE_ERRORS, FinishedJob, describe, get_kind, known_kinds
from herder.resilience import keep_renewing, retrying
from herder.signals import Wakeup
from herder.store import FinishHookClaim, Store

log = structlog.get_logger("herder.hooks")

#: Runs of one hook started before it is given up (each ended by its daemon dying): a
#: hook that kills its process every time must not take every daemon down in turn.
MAX_HOOK_ATTEMPTS = 3


class HookRunner:
    def __init__(self, store: Store, name: str, *, lease: float, poll_interval: float) -> None:
        self.store = store
        self.name = name
        self.lease = lease
        self.poll_interval = poll_interval
        self.wakeup = Wakeup()

    async def run(self) -> None:
        while True:
            claim = await self.store.claim_finish_hook(known_kinds(), self.lease, self.name)
            if claim is None:
                await self.wakeup.wait(self.poll_interval)
                continue
            async with anyio.create_task_group() as tg:
                tg.start_soon(keep_renewing, "hook lease", self._renewer(claim), self.lease / 3)
                await self._run_once(claim)
                tg.cancel_scope.cancel()

    async def _run_once(self, claim: FinishHookClaim) -> None:
        if claim.attempts > MAX_HOOK_ATTEMPTS:
            log.error(
                "on_finished given up: every earlier run ended with its daemon",
                job_id=claim.id,
                kind=claim.kind,
                runs=claim.attempts - 1,
            )
        else:
            await self._run_hook(claim)
        # Still holding (and renewing) the run: a done-write that fails is tried again,
        # never dropped, or the hook would run a second time.
        await retrying(
            "record on_finished done", functools.partial(self.store.finish_hook_done, claim)
        )

    def _renewer(self, claim: FinishHookClaim) -> Renew:
        async def renew() -> bool:
            await self.store.renew_finish_hook(claim, self.name, self.lease)
            return True

        return renew

    async def _run_hook(self, claim: FinishHookClaim) -> None:
        kind = get_kind(claim.kind)
        hook = kind.on_finished_fn if kind else None
        if hook is None:
            return
        job = FinishedJob(
            id=claim.id,
            kind=claim.kind,
            payload=claim.payload,
            status=claim.status,
            message=claim.message,
            owner=claim.owner,
            pool=self.store.app_pool,
        )
        bound = log.bind(job_id=claim.id, kind=claim.kind)
        try:
            # The kind's timeout bounds its hook as it bounds its tasks.
            with anyio.move_on_after(kind.timeout if kind and kind.timeout else float("inf")):
                await hook(job)
                bound.info("on_finished ran")
                return
            bound.error("on_finished timed out", timeout=kind.timeout if kind else None)
        except KIND_CODE_ERRORS as exc:  # the kind's code; it runs once, failing or not
            bound.error("on_finished raised", error=describe(exc), exc_info=exc)


Renew = Callable[[], Awaitable[bool]]
