"""Runs kinds' ``on_finished`` hooks from the outbox the settling transaction wrote.

The settlement and the pending hook commit together, so a daemon dying right after a
settlement leaves the hook pending; any daemon that knows the kind runs it (after the
claim's lease, if the first one died mid-hook) and marks it done.
"""

from __future__ import annotations

import structlog

from herder.kinds import FinishedJob, get_kind, known_kinds
from herder.signals import Wakeup
from herder.store import Store

log = structlog.get_logger("herder.hooks")


class HookRunner:
    def __init__(self, store: Store, *, lease: float, poll_interval: float) -> None:
        self.store = store
        self.lease = lease
        self.poll_interval = poll_interval
        self.wakeup = Wakeup()

    async def run(self) -> None:
        while True:
            claim = await self.store.claim_finish_hook(known_kinds(), self.lease)
            if claim is None:
                await self.wakeup.wait(self.poll_interval)
                continue
            kind = get_kind(claim.kind)
            hook = kind.on_finished_fn if kind else None
            if hook is not None:
                job = FinishedJob(
                    id=claim.id,
                    kind=claim.kind,
                    payload=claim.payload,
                    status=claim.status,
                    message=claim.message,
                    owner=claim.owner,
                    pool=self.store.app_pool,
                )
                try:
                    await hook(job)
                    log.info("on_finished ran", job_id=claim.id, kind=claim.kind)
                except Exception:  # the kind's code; it runs once, failing or not
                    log.exception("on_finished raised", job_id=claim.id, kind=claim.kind)
            await self.store.finish_hook_done(claim.id)
