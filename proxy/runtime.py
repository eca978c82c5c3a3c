"""What one worker serves with, and how a new config replaces the old one.

A ``Snapshot`` is immutable: the frozen config plus everything derived from
it (router, upstream clients). A request reads ``runtime.snapshot`` once and
uses that object to the end, so a reload never changes a request mid-flight.
Reload builds the next snapshot off to the side and swaps one reference; a
file that fails validation changes nothing but the reported error.

Per-worker resources that need the event loop (the link store, the click
recorder) are opened by ``start()`` and closed by ``close()``.

``events`` is the internal events hook: callables ``(type, data)`` that
``emit`` calls in order, on the request path, so each must return at once
(append to a buffer). Emitted here: ``link.created``, ``link.deleted`` and
``redirect.followed``. With webhooks configured, ``start()`` opens the
``Notifier`` (outbox + delivery worker) and attaches it to this hook and to
the limiter's rejection and breaker callbacks (``proxy.events.wiring``).
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy import config as configmod
from proxy.config import Config, Upstream
from proxy.errors import ConfigError
from proxy.events.metrics import EventMetrics
from proxy.events.service import Notifier, open_outbox
from proxy.events.wiring import attach
from proxy.forward import UpstreamClient
from proxy.limits.engine import Limiter
from proxy.limits.plans import RulePlan, plan_rules
from proxy.limits.store import LimitStore
from proxy.linkservice import LinkService
from proxy.metrics import Metrics
from proxy.routing import Router
from proxy.status.service import StatusService
from proxy.storage.factory import open_limit_store
from proxy.whatif import Candidate, file_signature, load_candidate

log = logging.getLogger("sluice.runtime")
EventHook = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    router: Router
    upstreams: dict[str, UpstreamClient]
    plans: dict[str, RulePlan]
    candidate: Candidate | None = None  # what-if rules evaluated in shadow (proxy.whatif)

    def trusted(self, peer: str | None) -> bool:
        if not peer or not self.config.clients.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.config.clients.trusted_proxies)


class Runtime:
    def __init__(
        self, config: Config, metrics: Metrics | None = None, store: LimitStore | None = None
    ) -> None:
        self.metrics = metrics or Metrics()
        self.path = Path(config.source.path)
        self.limiter = Limiter(
            store or open_limit_store(config.storage), config.storage, self.metrics
        )
        self.snapshot = self._build(config, {})
        self.reload_error: str | None = None
        self.reload_error_at: float | None = None
        self.metrics.config_loaded.set(config.source.loaded_at)
        self._retired: set[asyncio.Task[None]] = set()
        self._stale: set[UpstreamClient] = set()  # replaced pools still finishing requests
        self.events: list[EventHook] = []
        self.links: LinkService | None = (
            LinkService(config.storage, config.redirects, self.metrics)
            if config.redirects is not None
            else None
        )
        self._last_event_error = 0.0
        self._started = False
        self.notifier: Notifier | None = None
        self._detach_events: Callable[[], None] | None = None
        self.status: StatusService | None = None

    async def start(self) -> None:
        """Open what needs the running loop (link store, events outbox); idempotent."""
        if self._started:
            return
        self._started = True
        config = self.snapshot.config
        if config.notifications.webhooks:
            await self._start_notifier(config)
        if self.links is not None:
            await self.links.start()
        self.status = StatusService(self)
        self.status.start()

    async def _start_notifier(self, config: Config) -> None:
        storage = config.storage
        outbox = open_outbox(storage.url, storage.data_dir, connect_timeout=storage.connect_timeout)
        self.notifier = Notifier(
            config.notifications, outbox, metrics=EventMetrics(self.metrics.registry)
        )
        await self.notifier.start()
        self._detach_events = attach(self.notifier, self.limiter, storage.scheme, self.events)

    def emit(self, type_: str, data: dict[str, Any]) -> None:
        """Hand an event to every hook; a failing hook is logged, never raised."""
        for hook in self.events:
            try:
                hook(type_, data)
            except Exception:
                now = time.monotonic()
                if now - self._last_event_error > 5:
                    self._last_event_error = now
                    log.exception("events hook %r failed on %s", hook, type_)

    def _build(self, config: Config, current: dict[str, UpstreamClient]) -> Snapshot:
        clients: dict[str, UpstreamClient] = {}
        for name, upstream in config.upstreams.items():
            old = current.get(name)
            clients[name] = old if old and old.upstream == upstream else self._client(upstream)
        candidate = load_candidate(config.candidate, config.storage) if config.candidate else None
        self.metrics.whatif_candidate_ok.set(0 if candidate and not candidate.usable else 1)
        return Snapshot(
            config,
            Router(config.routes),
            clients,
            plan_rules(config.limits, config.storage),
            candidate,
        )

    def _client(self, upstream: Upstream) -> UpstreamClient:
        return UpstreamClient(upstream, self.metrics)

    def reload(self) -> bool:
        """Load the file again; keep serving the last good config if it is bad."""
        try:
            new = configmod.load(self.path)
        except ConfigError as exc:
            self.reload_error = str(exc)
            self.reload_error_at = time.time()
            self.metrics.reloads.labels("failed").inc()
            self.metrics.config_ok.set(0)
            log.error(
                "reload of %s failed; the last good config keeps serving:\n%s", self.path, exc
            )
            self._reload_candidate()  # an edited candidate is still taken (and not retried)
            return False
        old = self.snapshot
        if new.source.sha256 == old.config.source.sha256:
            self.reload_error = None
            self.metrics.config_ok.set(1)
            self._reload_candidate()
            return True
        for what in ("listen", "admin", "storage"):
            if getattr(new, what) != getattr(old.config, what):
                log.warning(
                    "%s changed in %s: listeners and storage change only on restart",
                    what,
                    self.path,
                )
        self.snapshot = self._build(new, old.upstreams)
        if gc.get_freeze_count():
            # The worker froze what startup built (``worker.tune_gc``), the first config
            # with it; that config has reference cycles, so once replaced only the
            # collector could free it. Unfrozen at the first config change (once).
            gc.unfreeze()
        if self.notifier is not None:
            self.notifier.apply(new.notifications)
        elif new.notifications.webhooks:
            log.warning("notifications: webhooks added in %s: takes effect on restart", self.path)
        if self.links is not None and new.redirects is not None:
            self.links.configure(new.redirects)
        elif (new.redirects is None) != (old.config.redirects is None):
            log.warning("redirects: added or removed in %s: takes effect on restart", self.path)
        self.reload_error = None
        self.metrics.reloads.labels("ok").inc()
        self.metrics.config_ok.set(1)
        self.metrics.config_loaded.set(new.source.loaded_at)
        log.info("reloaded %s (sha256 %s)", self.path, new.source.sha256[:12])
        kept = set(map(id, self.snapshot.upstreams.values()))
        stale = [c for c in old.upstreams.values() if id(c) not in kept]
        if stale:
            self._stale.update(stale)
            task = asyncio.get_running_loop().create_task(self._retire(stale))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        return True

    def candidate_changed(self) -> bool:
        """True when the candidate file on disk differs from the one loaded."""
        cand = self.snapshot.candidate
        return cand is not None and file_signature(cand.path) != cand.signature

    def _reload_candidate(self) -> None:
        """Load the candidate file again if it changed (the live rules did not)."""
        snap = self.snapshot
        if snap.candidate is None or not self.candidate_changed():
            return
        candidate = load_candidate(snap.candidate.path, snap.config.storage)
        self.metrics.whatif_candidate_ok.set(1 if candidate.usable else 0)
        self.snapshot = Snapshot(snap.config, snap.router, snap.upstreams, snap.plans, candidate)

    async def _retire(self, clients: list[UpstreamClient]) -> None:
        """Close replaced upstream pools once requests already using them are done."""
        await asyncio.gather(*(client.retire() for client in clients))
        self._stale.difference_update(clients)

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
        await asyncio.gather(*self._retired, return_exceptions=True)
        for stale in self._stale:
            await stale.close()
        for client in self.snapshot.upstreams.values():
            await client.close()
        if self.links is not None:
            await self.links.close()
        if self.status is not None:
            await self.status.close()
        if self._detach_events is not None:
            self._detach_events()
        if self.notifier is not None:
            await self.notifier.close()  # flushes what is still in memory to the outbox
        await self.limiter.close()
