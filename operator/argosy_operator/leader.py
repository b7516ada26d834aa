"""Leader election: one active operator replica, the others standing by (the I/O half of lease.py).

A standby keeps kopf's watches and indexes warm (reading only) but runs no reconcile
and writes nothing until it holds the Lease; then `on_started` starts the work queue.
The leader renews every retry period; when it could not renew for the renew deadline
(an API server it cannot reach, a stalled process) `on_stopped` stops its work before
any other replica may take over, and it goes back to standing by. On a clean shutdown
it releases the Lease, so a standby takes over at its next look instead of waiting for
the Lease to expire.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import socket
import time
from collections.abc import Callable

from argosy_operator import lease
from argosy_operator.kubeapi import ApiError, KubeApi

logger = logging.getLogger(__name__)


def default_identity() -> str:
    """The pod name (hostname) plus a random suffix: a restarted pod is a new candidate."""
    base = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{base}_{random.getrandbits(40):010x}"


def micro_time(moment: datetime.datetime | None = None) -> str:
    moment = moment or datetime.datetime.now(datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        api: KubeApi,
        *,
        namespace: str,
        name: str,
        identity: str,
        on_started: Callable[[], None],
        on_stopped: Callable[[], None],
        timings: lease.LeaseTimings | None = None,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timings = timings or lease.LeaseTimings()
        self._on_started = on_started
        self._on_stopped = on_stopped
        self.leading = False
        self._seen: lease.LeaseRecord | None = None
        self._seen_at = 0.0
        self._step_down: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        logger.info("leader election: Lease %s/%s as %s (standing by until it is ours)",
                    self.namespace, self.name, self.identity)
        self._task = asyncio.create_task(self._run(), name="leader-election")

    async def stop(self) -> None:
        """Stop campaigning; a leader stops its work and releases the Lease."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.leading:
            self._lose("shutting down")
            try:
                await asyncio.wait_for(self._release(), timeout=self.timings.retry_period)
            except (ApiError, OSError, TimeoutError) as e:
                logger.warning("could not release Lease %s/%s: %s", self.namespace, self.name, e)

    async def _run(self) -> None:
        period = self.timings.retry_period
        while True:
            try:
                # One attempt may not outlive the renew deadline's margin.
                ours = await asyncio.wait_for(self._attempt(), timeout=self.timings.renew_deadline - period)
            except (ApiError, OSError, TimeoutError) as e:
                logger.warning("leader election: Lease %s/%s unavailable: %s", self.namespace, self.name, e)
                ours = False
            if ours:
                self._renewed()
            # Jitter keeps two candidates from reading the Lease in lockstep.
            await asyncio.sleep(period * (1.0 + 0.2 * random.random()) if not self.leading else period)

    async def _attempt(self) -> bool:
        """Read the Lease and create, renew or take it when we may; True when it is ours now."""
        live = await self.api.get(lease.LEASE_API_VERSION, "Lease", self.namespace, self.name)
        record = lease.LeaseRecord.from_lease(live) if live is not None else None
        now = time.monotonic()
        if record is None or not record.same_as(self._seen):
            self._seen, self._seen_at = record, now
        action = lease.decide(record, self.identity, unchanged_for=now - self._seen_at)
        if action is lease.Action.WAIT:
            if self.leading:  # somebody else holds it: we lost it without noticing in time
                self._lose(f"the Lease is held by {record.holder if record else '?'}")
            return False
        body = lease.lease_body(self.name, self.namespace, self.identity, micro_time(), self.timings, record)
        try:
            written = await (self.api.create(body) if record is None else self.api.replace(body))
        except ApiError as e:
            if e.status == 409:  # another candidate wrote first (or created it): theirs
                return False
            raise
        self._seen, self._seen_at = lease.LeaseRecord.from_lease(written), time.monotonic()
        if action is lease.Action.TAKE and record is not None:
            logger.info("leader election: took Lease %s/%s from %r", self.namespace, self.name, record.holder)
        return True

    def _renewed(self) -> None:
        loop = asyncio.get_running_loop()
        if self._step_down is not None:
            self._step_down.cancel()
        # A timer, not a check after the next attempt: a hung request cannot delay the step-down.
        self._step_down = loop.call_later(self.timings.renew_deadline, self._lose,
                                          f"not renewed for {self.timings.renew_deadline:.0f} s")
        if not self.leading:
            self.leading = True
            logger.info("leader election: leading (Lease %s/%s)", self.namespace, self.name)
            self._on_started()

    def _lose(self, why: str) -> None:
        if self._step_down is not None:
            self._step_down.cancel()
            self._step_down = None
        if self.leading:
            self.leading = False
            logger.warning("leader election: stopped leading: %s; standing by", why)
            self._on_stopped()

    async def _release(self) -> None:
        live = await self.api.get(lease.LEASE_API_VERSION, "Lease", self.namespace, self.name)
        if live is None:
            return
        record = lease.LeaseRecord.from_lease(live)
        if record.holder != self.identity:
            return
        await self.api.replace(lease.released_body(self.name, self.namespace, micro_time(), record))
        logger.info("leader election: released Lease %s/%s", self.namespace, self.name)
