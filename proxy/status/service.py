"""What the status page shows, gathered in one worker for the whole instance.

Every ``interval`` seconds the service samples the instance's metrics into a
ring (the charts: decisions per second per rule) and drains its rejection
tally into the shared clients leaderboard. ``status()`` answers the panels;
each panel that needs storage is fetched with its own deadline, so a dead
Redis shows as that panel's error (and the storage panel's degraded state)
instead of a page that never loads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from proxy import __version__
from proxy.errors import StorageError
from proxy.limits.identity import masked
from proxy.status.boards import ClientBoard, open_client_board
from proxy.status.clients import (
    TOP_LIMIT,
    WINDOWS,
    Tally,
    TopClient,
    minute_of,
    window_minutes,
)
from proxy.status.sampler import read_totals
from proxy.status.series import Key, Ring, quantile

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = logging.getLogger("sluice.status")
RESULTS = ("allowed", "rejected", "shadow_rejected", "degraded")
PANEL_TIMEOUT = 1.5
IDLE_INTERVAL = 10.0  # seconds between samples while nobody has looked at the page lately
WATCHED_FOR = 600.0  # seconds after the last look during which samples come every interval
BOARD_CACHE = 5.0  # seconds a leaderboard answer is reused (several tabs, several panels)
RATE_WINDOW = 60.0  # seconds the panels' rates and p99 are computed over
WHATIF_WINDOW = 300.0  # seconds the what-if comparison covers


class StatusService:
    def __init__(
        self,
        runtime: Runtime,
        *,
        interval: float = 2.0,
        history: int = 300,
        board: ClientBoard | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.interval = interval
        self.clock = clock
        self.ring = Ring(history)
        self.tally = Tally()
        self.board = (
            board if board is not None else open_client_board(runtime.snapshot.config.storage)
        )
        self._task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()  # wakes the sampler: closing, or the page opened
        self._closing = False
        self._last_warning = 0.0
        self._hooked = False
        self._watched = 0.0  # monotonic time of the last status()/series() call
        self._tops: dict[tuple[str, str], tuple[float, asyncio.Task[list[TopClient]]]] = {}

    # -- wiring -------------------------------------------------------------------------

    def start(self) -> None:
        if not self._hooked:
            self.runtime.limiter.on_reject.append(self.rejected)
            self.runtime.limiter.on_candidate_reject.append(self.candidate_rejected)
            self._hooked = True
        if self._task is None:
            self._closing = False
            self.sample()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def rejected(self, rule: str, client: str, route: str) -> None:
        """The limiter's rejection hook: one dict increment."""
        self.tally.add("live", rule, client)

    def candidate_rejected(self, rule: str, client: str) -> None:
        self.tally.add("candidate", rule, client)

    async def close(self) -> None:
        if self._hooked:
            self.runtime.limiter.on_reject.remove(self.rejected)
            self.runtime.limiter.on_candidate_reject.remove(self.candidate_rejected)
            self._hooked = False
        if self._task is not None:  # let a flush in progress finish: its counts are out
            self._closing = True
            self._kick.set()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()
        for _, task in self._tops.values():
            task.cancel()
        await self.board.close()

    async def _run(self) -> None:
        """Sample every ``interval`` while the page is being looked at (and for a while
        after), every ``IDLE_INTERVAL`` otherwise; the metrics are read on a thread, so
        the loop is not held while every worker's files are summed."""
        idle = max(self.interval, IDLE_INTERVAL)
        while True:
            watched = time.monotonic() - self._watched < WATCHED_FOR
            self._kick.clear()
            try:
                await asyncio.wait_for(self._kick.wait(), self.interval if watched else idle)
            except TimeoutError:
                pass
            if self._closing:
                return
            try:
                await self.sample_async()
                await self.flush()
            except Exception:  # never let the page's bookkeeping die silently
                log.exception("status sampler failed")

    # -- bookkeeping --------------------------------------------------------------------

    def sample(self) -> None:
        self.ring.add(self.clock(), read_totals(self.runtime.metrics))

    async def sample_async(self) -> None:
        at = self.clock()  # when read, not when the thread is done
        totals = await asyncio.to_thread(read_totals, self.runtime.metrics)
        self.ring.add(at, totals)

    async def flush(self) -> None:
        """Move the tally to the leaderboard store under the current minute; on a store
        error the counts go back into the tally for the next try."""
        if not len(self.tally):
            return
        drained = self.tally.drain()
        show = self.runtime.snapshot.config.logging.show_keys
        minute = minute_of(self.clock())
        for board, counts in drained.items():
            shown: dict[tuple[str, str], int] = {}
            for (rule, client), n in counts.items():
                key = (rule, client if show else masked(client))
                shown[key] = shown.get(key, 0) + n
            try:
                await self.board.add(board, minute, shown)
            except StorageError as exc:
                self.tally.merge(((board, r, c), n) for (r, c), n in counts.items())
                self._warn(f"clients leaderboard not updated: {exc}")

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            log.warning(message)

    # -- answers ------------------------------------------------------------------------

    def series(self) -> dict[str, Any]:
        """Decisions per second per rule, per result, one point per sample interval."""
        self._watch()
        config = self.runtime.snapshot.config
        rules: dict[str, dict[str, list[float]]] = {}
        keys: list[Key] = [("decisions", r, res) for r in config.limits for res in RESULTS]
        rates = self.ring.rates(keys)
        for rule in config.limits:
            rules[rule] = {res: _rounded(rates[("decisions", rule, res)]) for res in RESULTS}
        out: dict[str, Any] = {
            "interval": self.interval,
            "start": self.ring.start(),
            "times": [round(t, 3) for t in self.ring.times()],
            "rules": rules,
        }
        candidate = self.runtime.snapshot.candidate
        if candidate is not None and candidate.config is not None:
            names = list(candidate.config.limits)
            keys = [("whatif", r, res) for r in names for res in RESULTS]
            rates = self.ring.rates(keys)
            out["whatif"] = {
                "rules": {
                    r: {res: _rounded(rates[("whatif", r, res)]) for res in RESULTS} for r in names
                }
            }
        return out

    def _watch(self) -> None:
        """The page asked: sample at the full rate (at once, if it had slowed down)."""
        now = time.monotonic()
        if now - self._watched >= WATCHED_FOR:
            self._kick.set()
        self._watched = now

    async def status(self) -> dict[str, Any]:
        self._watch()
        config = self.runtime.snapshot.config
        span, grown = self.ring.increase(RATE_WINDOW)
        clients, links, webhooks, whatif = await asyncio.gather(
            _panel(self._clients()),
            _panel(self._links()),
            _panel(self._webhooks()),
            self._whatif(),
        )
        return {
            "generated_at": round(self.clock(), 3),
            "instance": {"version": __version__, "pid": os.getpid()},
            "config": self._config(),
            "decisions": _decisions(config.limits, span, grown),
            "storage": self._storage(span, grown),
            "clients": clients,
            "links": links,
            "webhooks": webhooks,
            "whatif": whatif,
        }

    async def _whatif(self) -> dict[str, Any]:
        """The candidate against the live rules over the last ``WHATIF_WINDOW`` seconds."""
        candidate = self.runtime.snapshot.candidate
        if candidate is None:
            return {"enabled": False}
        out: dict[str, Any] = {"enabled": True, **candidate.describe()}
        if candidate.config is None:
            out["summary"] = "The candidate file failed to load and is ignored."
            return out
        span, grown = self.ring.increase(WHATIF_WINDOW)
        out.update(compare(grown, span))
        out["decisions"] = _decisions(candidate.config.limits, span, grown, "whatif")
        out["clients"] = await _panel(self._candidate_clients())
        return out

    async def _candidate_clients(self) -> dict[str, Any]:
        top = await self._top("candidate", "5m")
        return {
            "5m": [{"rule": t.rule, "client": t.client, "rejections": t.rejections} for t in top]
        }

    def _config(self) -> dict[str, Any]:
        runtime = self.runtime
        source = runtime.snapshot.config.source
        return {
            "path": source.path,
            "sha256": source.sha256,
            "loaded_at": source.loaded_at,
            "rules": list(runtime.snapshot.config.limits),
            "routes": [r.name for r in runtime.snapshot.config.routes],
            "last_reload_error": runtime.reload_error,
            "last_reload_error_at": runtime.reload_error_at if runtime.reload_error else None,
        }

    def _storage(self, span: float, grown: dict[Key, float]) -> dict[str, Any]:
        limiter = self.runtime.limiter
        storage = self.runtime.snapshot.config.storage
        any_open = self.ring.latest().get(("breaker_open",), 0.0) > 0
        degraded = limiter.degraded or any_open
        buckets = [(float(key[1]), value) for key, value in grown.items() if key[0] == "storage_le"]
        p99 = quantile(0.99, buckets)
        return {
            "url": storage.safe_url,
            "state": "degraded" if degraded else "ok",
            "breaker": limiter.breaker_state,
            "open_nodes": limiter.open_nodes,
            "any_worker_breaker_open": any_open,
            "last_error": limiter.last_error,
            "p99_ms": round(p99 * 1000, 3) if p99 is not None else None,
            "calls_per_second": _per_second(grown.get(("storage_count",), 0.0), span),
            "errors_per_second": _per_second(grown.get(("storage_errors",), 0.0), span),
            "window_seconds": round(span, 3),
        }

    async def _top(self, board: str, window: str) -> list[TopClient]:
        """The board's leaderboard, one store query per ``BOARD_CACHE`` seconds however
        many tabs ask; callers that time out leave the query running for the next."""
        now = time.monotonic()
        found = self._tops.get((board, window))
        if found is None or found[0] <= now or (found[1].done() and found[1].exception()):
            minutes = window_minutes(window, self.clock())
            task = asyncio.get_running_loop().create_task(self.board.top(board, minutes, TOP_LIMIT))
            found = self._tops[(board, window)] = (now + BOARD_CACHE, task)
        return await asyncio.shield(found[1])

    async def _clients(self) -> dict[str, Any]:
        out: dict[str, Any] = {"store": self.board.location}
        for window in WINDOWS:
            top = await self._top("live", window)
            out[window] = [
                {"rule": t.rule, "client": t.client, "rejections": t.rejections} for t in top
            ]
        return out

    async def _links(self) -> dict[str, Any]:
        links = self.runtime.links
        if links is None:
            return {"enabled": False}
        if links.store is None:
            raise StorageError(f"link store {links.location} unavailable: {links.last_error}")
        top = await links.timed("top", links.store.top("hour", now=self.clock(), limit=TOP_LIMIT))
        return {
            "enabled": True,
            "window": "1h",
            "top": [{"code": e.code, "clicks": e.clicks} for e in top],
        }

    async def _webhooks(self) -> dict[str, Any]:
        notifier = self.runtime.notifier
        if notifier is None:
            return {"enabled": False, "subscriptions": []}
        statuses = await notifier.status()
        return {"enabled": True, "subscriptions": [st.as_dict() for st in statuses]}


def _failed(task: asyncio.Task[Any]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)


async def _panel(call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await asyncio.wait_for(call, PANEL_TIMEOUT)
    except StorageError as exc:
        return {"error": str(exc)}
    except TimeoutError:
        return {"error": f"storage did not answer within {PANEL_TIMEOUT:g}s"}


def _per_second(count: float, span: float) -> float:
    return round(count / span, 3) if span > 0 else 0.0


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


def compare(grown: dict[Key, float], span: float) -> dict[str, Any]:
    """The what-if summary from ``("whatif_requests", live, candidate)`` increases.

    Exact: how many of all compared requests the candidate would reject that the
    live rules admit (``more_rejected``). A lower bound: how many the live rules
    reject that the candidate would let through (``fewer_rejected``; the deny cache
    answers most repeated rejections without asking the candidate)."""

    def n(live: str, cand: str) -> int:
        return round(grown.get(("whatif_requests", live, cand), 0.0))

    cands = ("allowed", "rejected", "not_evaluated")
    total = sum(n(lv, c) for lv in ("allowed", "rejected") for c in cands)
    live_rejected = sum(n("rejected", c) for c in cands)
    more, fewer = n("allowed", "rejected"), n("rejected", "allowed")
    skipped = n("allowed", "not_evaluated") + n("rejected", "not_evaluated")

    def pct(x: int) -> float:
        return round(100.0 * x / total, 2) if total else 0.0

    minutes = max(1, round(span / 60))
    if not total:
        summary = "No request has been compared with the candidate yet."
    else:
        summary = (
            f"With the candidate, {pct(more)}% more requests would be rejected "
            f"({more} of {total} in the last {minutes} min, all admitted by the live rules, "
            f"which reject {pct(live_rejected)}%)"
        )
        summary += f"; at least {fewer} they reject would pass." if fewer else "."
    return {
        "window_seconds": round(span, 3),
        "compared": total,
        "not_evaluated": skipped,
        "live_rejected": live_rejected,
        "more_rejected": more,
        "fewer_rejected_at_least": fewer,
        "live_rejected_pct": pct(live_rejected),
        "more_rejected_pct": pct(more),
        "summary": summary,
    }


def _decisions(
    rules: Any, span: float, grown: dict[Key, float], kind: str = "decisions"
) -> dict[str, Any]:
    """Per rule: each result per second over the window, and ``counts`` in it."""
    per_rule: dict[str, Any] = {}
    for rule in rules:
        counts = {res: round(grown.get((kind, rule, res), 0.0)) for res in RESULTS}
        per_rule[rule] = {res: _per_second(n, span) for res, n in counts.items()}
        per_rule[rule]["counts"] = counts
    return {"window_seconds": round(span, 3), "rules": per_rule}
