"""Health checks run on this host: HTTP, TCP, gRPC health, TTL, alias.

One asyncio task per probed check (HTTP/TCP/gRPC) runs the blocking probe
from `meshproto.probes` on a small thread pool, every Interval, with Consul's
SuccessBeforePassing / FailuresBeforeCritical rules. TTL checks turn critical
when their TTL lapses without a pass/warn/fail. Alias checks are recomputed
whenever another check of the node changes. Every change is reported through
`on_change(check_id)`, which the agent turns into an `UpdateChecks` push.

The runner keeps running with the control plane away: results land in the
local state and reach the catalog with the next successful sync.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from agents.state import CheckState, LocalState
from meshproto import probes

log = logging.getLogger("mesh.agent.checks")

PROBED = ("http", "tcp", "grpc")


class CheckRunner:
    """Runs the local state's checks; `sync()` after every state change."""

    def __init__(
        self,
        state: LocalState,
        on_change: Callable[[str], None],
        *,
        concurrency: int = 8,
        record: Callable[[CheckState], None] | None = None,
    ) -> None:
        self.state = state
        self.on_change = on_change
        self.record = record
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="mesh-agent-check")
        self.tasks: dict[str, tuple[dict, asyncio.Task]] = {}
        self.ttl_timers: dict[str, asyncio.TimerHandle] = {}
        self.streaks: dict[str, int | None] = {}

    def sync(self) -> None:
        """Start, restart or stop check tasks to match the local state."""
        wanted = {cid: c for cid, c in self.state.checks.items() if c.kind in PROBED}
        for cid, (defn, task) in list(self.tasks.items()):
            if cid not in wanted or wanted[cid].definition != defn:
                task.cancel()
                del self.tasks[cid]
                self.streaks.pop(cid, None)
        for cid, check in wanted.items():
            if cid not in self.tasks:
                task = asyncio.get_running_loop().create_task(
                    self._loop(cid, dict(check.definition)), name=f"check:{cid}"
                )
                self.tasks[cid] = (dict(check.definition), task)
        for cid in list(self.ttl_timers):
            c = self.state.checks.get(cid)
            if c is None or c.kind != "ttl":
                self.ttl_timers.pop(cid).cancel()
        for cid, c in self.state.checks.items():
            if c.kind == "ttl" and cid not in self.ttl_timers:
                self._arm_ttl(c)
        self.update_aliases()

    def kick(self, check_id: str) -> None:
        """Probe now (then every Interval): e.g. a sidecar just started listening."""
        entry = self.tasks.get(check_id)
        if entry is None:
            return
        definition, task = entry
        task.cancel()
        task = asyncio.get_running_loop().create_task(
            self._loop(check_id, definition, first_delay=0.0), name=f"check:{check_id}"
        )
        self.tasks[check_id] = (definition, task)

    async def _loop(
        self, check_id: str, definition: dict, first_delay: float | None = None
    ) -> None:
        check = self.state.checks[check_id]
        interval = max(check.interval, 0.1)
        timeout = probes.probe_timeout(check.timeout, interval)
        kind = check.kind
        # Stagger the first run a little (as Consul does) without delaying it much.
        if first_delay is None:
            first_delay = random.uniform(0, min(interval, 0.5))
        await asyncio.sleep(first_delay)
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                result = await loop.run_in_executor(
                    self.pool, probes.run, kind, definition, timeout
                )
            except Exception as exc:  # a malformed definition must not kill the loop
                result = probes.Result(probes.CRITICAL, f"check failed: {exc}")
            self._apply(check_id, definition, result)
            await asyncio.sleep(max(interval - (loop.time() - started), 0.05))

    def _apply(self, check_id: str, definition: dict, result: probes.Result) -> None:
        check = self.state.checks.get(check_id)
        if check is None or check.definition != definition:
            return  # replaced while it ran; the new task reports for the new definition
        if probes.uses_thresholds(definition):
            apply, streak = probes.threshold_step(
                self.streaks.get(check_id),
                result.status,
                int(definition.get("SuccessBeforePassing") or 0),
                int(definition.get("FailuresBeforeCritical") or 0),
            )
            self.streaks[check_id] = streak
            if not apply:
                return
        self.set(check_id, result.status, result.output)

    def set(self, check_id: str, status: str, output: str) -> bool:
        """Record a result (from a probe or the TTL API); reports it when it changed."""
        changed = self.state.set_result(check_id, status, output)
        check = self.state.checks.get(check_id)
        if check is not None and self.record is not None:
            self.record(check)
        if changed:
            log.info(
                "check status",
                extra={"check_id": check_id, "status": status, "output": output[:200]},
            )
            self.on_change(check_id)
            self.update_aliases(skip=check_id)
        return changed

    # --- TTL ---------------------------------------------------------------------

    def ttl_update(self, check_id: str, status: str, output: str) -> None:
        """pass/warn/fail/update on a TTL check: record it and re-arm its timer."""
        check = self.state.checks[check_id]
        timer = self.ttl_timers.pop(check_id, None)
        if timer is not None:
            timer.cancel()
        self.set(check_id, status, output)
        self._arm_ttl(check)

    def _arm_ttl(self, check: CheckState) -> None:
        ttl = check.ttl
        if ttl <= 0:
            return
        loop = asyncio.get_running_loop()
        self.ttl_timers[check.check_id] = loop.call_later(ttl, self._ttl_expired, check.check_id)

    def _ttl_expired(self, check_id: str) -> None:
        self.ttl_timers.pop(check_id, None)
        check = self.state.checks.get(check_id)
        if check is None or check.status == probes.CRITICAL:
            return
        self.set(check_id, probes.CRITICAL, probes.ttl_expired_output(check.output))

    # --- alias ---------------------------------------------------------------------

    def update_aliases(self, skip: str = "") -> None:
        """Alias checks: the worst of the aliased service's and the node's checks."""
        for c in list(self.state.checks.values()):
            if c.kind != "alias" or c.check_id == skip:
                continue
            sid = c.definition.get("AliasService") or ""
            rows = [
                (o.service_id, o.name, o.status, o.output)
                for o in sorted(self.state.checks.values(), key=lambda x: x.check_id)
                if o.check_id != c.check_id
                and o.kind != "alias"
                and (not o.service_id or o.service_id == sid)
            ]
            result = probes.alias_result(
                rows, sid, self.state_node_name, sid in self.state.services
            )
            if self.state.set_result(c.check_id, result.status, result.output):
                self.on_change(c.check_id)

    state_node_name = ""

    async def close(self) -> None:
        for _, task in self.tasks.values():
            task.cancel()
        for timer in self.ttl_timers.values():
            timer.cancel()
        await asyncio.gather(*(t for _, t in self.tasks.values()), return_exceptions=True)
        self.tasks.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
