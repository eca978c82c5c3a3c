"""From a request and its route's rules to one verdict.

Per request: pick the rules that apply (route list, then each rule's own
``match``), identify the client per rule, answer from the local deny cache
when a client is known to be over a limit (no storage call), otherwise decide
every quota of every rule in ONE store call. When the store fails or the
breaker is open, each rule's ``on_storage_error`` decides: ``allow`` (fail
open), ``deny`` (fail closed: 503), or ``local`` (an in-process limiter with
the limit divided by ``storage.expected_instances``). This is the only place
where fail-open/closed is decided.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from proxy.config import Config, HeaderPolicy, StorageConfig
from proxy.errors import StorageError
from proxy.limits.algorithms import Outcome
from proxy.limits.breaker import Breaker
from proxy.limits.headers import (
    Quoted,
    render,
    render_one,
    retry_after_seconds,
)
from proxy.limits.identity import RequestView, client_ip, identify
from proxy.limits.plans import CandidateRules, RulePlan, checks_for
from proxy.limits.store import Check, LimitStore, MemoryLimitStore
from proxy.limitspec import LimitRule
from proxy.metrics import Children, Metrics, counter_inc, histogram_observe

log = logging.getLogger("sluice.limits")
DENY_CACHE_MAX = 100_000
STORE = "*"  # the whole store's breaker (no Cluster, or no slot map yet)


@dataclass(slots=True)
class RuleDecision:
    """What happened to one rule for one request (for metrics, events and logs)."""

    rule: LimitRule
    client: str
    allowed: bool
    outcomes: list[Outcome]
    result: str  # allowed | rejected | shadow_rejected | degraded
    retry_after_ms: float = 0.0


@dataclass(slots=True)
class Verdict:
    """``status`` is None when the request may go on; else the answer to send."""

    status: int | None = None
    body: dict[str, object] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    decisions: list[RuleDecision] = field(default_factory=list)
    degraded: bool = False


ALLOW = Verdict()
DEFAULT_HEADERS = HeaderPolicy()


@dataclass(slots=True)
class _Pending:
    plan: RulePlan
    client: str
    cost: int
    checks: Sequence[Check]


def _tag(key: str) -> str:
    """A key's ``{hash tag}`` (its Cluster slot)."""
    return key[key.find("{") : key.find("}") + 1]


def _checks_of(pending: list[_Pending]) -> Sequence[Check]:
    """All checks of one request, in rule order (one rule's own, as kept, when alone)."""
    return pending[0].checks if len(pending) == 1 else [c for p in pending for c in p.checks]


def _live(verdict: Verdict) -> str:
    return "allowed" if verdict.status is None else "rejected"


def _client_and_cost(
    rule: LimitRule, config: Config, request: RequestView, ip: str, route: str
) -> tuple[str, int] | Verdict | None:
    """Who the rule counts and at what cost; None when the rule does not apply to a
    request without its key (``on_missing_key: allow``), a Verdict when the request
    is refused before any count (403 unidentified, 400 bad cost)."""
    client = identify(rule.key, request, ip, route)
    if client is None:
        policy = config.clients.on_missing_key
        if policy == "allow":
            return None
        if policy == "deny":
            return Verdict(
                403,
                {
                    "error": "client_not_identified",
                    "rule": rule.name,
                    "message": f"rule {rule.name} needs {rule.key}",
                },
            )
        client = "anonymous"
    cost = rule.cost
    if rule.cost_header is not None:
        raw = request.headers.get(rule.cost_header)
        if raw is not None:
            if not raw.isdigit() or int(raw) < 1:
                return Verdict(
                    400,
                    {
                        "error": "bad_cost",
                        "rule": rule.name,
                        "message": f"{rule.cost_header} must be a positive integer",
                    },
                )
            cost = int(raw)
    return client, cost


def _candidate_pending(
    candidate: CandidateRules, request: RequestView, ip: str
) -> list[_Pending] | None:
    """The candidate's checks for this request; None if it would refuse it outright."""
    out: list[_Pending] = []
    for name in candidate.rule_names:
        plan = candidate.plans[name]
        rule = plan.rule
        if rule.match is not None and not rule.match.matches(
            request.method, request.path, request.headers.get("Host") or "", request.headers
        ):
            continue
        found = _client_and_cost(rule, candidate.config, request, ip, candidate.route)
        if found is None:
            continue
        if isinstance(found, Verdict):
            return None
        client, cost = found
        out.append(_Pending(plan, client, cost, checks_for(plan, client, cost)))
    return out


class Limiter:
    """Per worker; survives reloads (store, breaker, deny cache), takes plans per request."""

    def __init__(
        self,
        store: LimitStore,
        storage: StorageConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.local = MemoryLimitStore()
        self.metrics = metrics
        self.clock = clock
        self._storage = storage
        # The store's breaker; on Redis Cluster one more per master (``node_of``), so a
        # dead master degrades only the clients whose keys it holds. ``breaker_state``
        # is the worst of them; transitions of that are what is logged and emitted.
        self.breaker = self._new_breaker()
        self._store_breakers = {STORE: self.breaker}
        self.node_breakers: dict[str, Breaker] = {}
        self.breaker_state = "closed"
        cluster = getattr(store, "cluster", False)
        node_of = getattr(store, "node_of", None) if cluster else None
        self._node_of: Callable[[str], str | None] | None = node_of
        self._masters: Callable[[], Sequence[str]] | None = (
            getattr(store, "masters", None) if cluster else None
        )
        self._known_masters: Sequence[str] | None = None
        self.deny_cache: dict[tuple[str, str, int], tuple[float, list[Outcome]]] = {}
        self.storage_calls = 0
        self.last_error: str | None = None
        self.on_transition: list[Callable[[str, str], None]] = []
        self.on_reject: list[Callable[[str, str, str], None]] = []  # (rule, client, route)
        # (rule, client): a candidate rule would reject a request the live rules admit
        self.on_candidate_reject: list[Callable[[str, str], None]] = []
        # A Redis Cluster store splits a call whose keys span slots (``redis_limits``):
        # candidate checks on another slot than the live ones are then decided apart.
        self._cluster = bool(getattr(store, "cluster", False))
        self._whatif_decisions = Children(metrics.whatif_decisions)
        self._whatif_requests = Children(metrics.whatif_requests)
        self._decisions = Children(metrics.decisions)
        self._cache_hits = Children(metrics.deny_cache_hits)
        self._incs: dict[tuple[str, str], Callable[[], None]] = {}
        self._latency = histogram_observe(metrics.storage_latency.labels("ratelimit"))
        self._last_log = 0.0

    @property
    def degraded(self) -> bool:
        return self.breaker_state != "closed"

    @property
    def open_nodes(self) -> list[str]:
        """Cluster masters whose breaker is not closed (their clients are degraded)."""
        return sorted(n for n, b in self.node_breakers.items() if b.state != "closed")

    def _new_breaker(self, node: str = STORE) -> Breaker:
        def changed(old: str, new: str) -> None:
            if node != STORE:
                log.info("storage breaker of %s: %s → %s", node, old, new)
            self._recompute()

        return Breaker(
            self._storage.breaker_failures,
            self._storage.breaker_reset,
            clock=self.clock,
            on_change=changed,
        )

    def _recompute(self) -> None:
        """The worst state of the breakers in use; its changes are what is reported."""
        states = {self.breaker.state, *(b.state for b in self.node_breakers.values())}
        worst = "open" if "open" in states else "half_open" if "half_open" in states else "closed"
        if worst != self.breaker_state:
            previous, self.breaker_state = self.breaker_state, worst
            self._breaker_changed(previous, worst)

    def _breakers_for(self, checks: Sequence[Check]) -> dict[str, Breaker]:
        """The breakers a call on ``checks`` goes through, by master: its masters' on a
        Cluster whose slot map is known, else the store's."""
        if self._node_of is None:
            return self._store_breakers
        self._follow_slot_map()
        found: dict[str, Breaker] = {}
        for check in checks:
            node = self._node_of(check.key)
            if node is None:
                return self._store_breakers
            if node not in found:
                breaker = self.node_breakers.get(node)
                if breaker is None:
                    breaker = self.node_breakers[node] = self._new_breaker(node)
                found[node] = breaker
        if self.breaker.state != "closed":  # the map is known again: the store answers
            self.breaker.success()
        return found

    def _follow_slot_map(self) -> None:
        """Forget the breakers of masters the slot map no longer names (failed over,
        removed): nothing would probe them, and they would report degraded forever."""
        if self._masters is None:
            return
        masters = self._masters()
        if masters is self._known_masters:
            return
        self._known_masters = masters
        gone = [node for node in self.node_breakers if node not in masters]
        for node in gone:
            del self.node_breakers[node]
        if gone:
            log.info("storage breakers dropped for masters no longer serving: %s", gone)
            self._recompute()

    def _breaker_changed(self, old: str, new: str) -> None:
        self.metrics.breaker_open.set(0 if new == "closed" else 1)
        if new == "open" and old == "closed":
            log.error("storage degraded: circuit breaker open (%s)", self.last_error)
        elif new == "closed":
            log.warning("storage recovered: circuit breaker closed")
        for callback in self.on_transition:
            callback(old, new)

    async def check(
        self,
        config: Config,
        plans: Mapping[str, RulePlan],
        rule_names: Sequence[str],
        request: RequestView,
        peer: str | None,
        route: str,
        headers: HeaderPolicy = DEFAULT_HEADERS,
        candidate: CandidateRules | None = None,
    ) -> Verdict:
        """Decide one request; ``headers`` is the route's choice of header families;
        ``candidate``, what-if rules decided beside the live ones (never the answer)."""
        pending: list[_Pending] = []
        ip: str | None = None
        for name in rule_names:
            plan = plans[name]
            rule = plan.rule
            if rule.match is not None and not rule.match.matches(
                request.method, request.path, request.headers.get("Host") or "", request.headers
            ):
                continue
            if ip is None:
                ip = client_ip(peer, request.headers, config.clients.trusted_proxies)
            found = _client_and_cost(rule, config, request, ip, route)
            if found is None:
                continue
            if isinstance(found, Verdict):
                return found
            client, cost = found
            if not rule.shadow and self.deny_cache:
                cached = self.deny_cache.get((rule.name, client, cost))
                if cached is not None:
                    now = self.clock()
                    if cached[0] > now:
                        if candidate is not None:  # no store call: the candidate is not asked
                            self._whatif_requests("rejected", "not_evaluated").inc()
                        return self._cached_denial(plan, client, cached, now, headers, route)
                    del self.deny_cache[(rule.name, client, cost)]
            pending.append(_Pending(plan, client, cost, checks_for(plan, client, cost)))
        if candidate is None:
            if not pending:
                return ALLOW
            # ``_decide`` without a candidate, inlined: one coroutine less per request.
            outcomes = await self._call(_checks_of(pending))
            if outcomes is None:
                return self._degraded(pending, headers, route)
            return self._verdict(pending, outcomes, headers, route)
        if ip is None:  # the client address as the live config sees it (its proxies)
            ip = client_ip(peer, request.headers, config.clients.trusted_proxies)
        shadow = _candidate_pending(candidate, request, ip)
        if shadow is None:  # the candidate would answer 400/403: no comparison for it
            verdict = await self._decide(pending, headers, route) if pending else Verdict()
            self._whatif_requests(_live(verdict), "not_evaluated").inc()
            return verdict
        return await self._decide(pending, headers, route, (candidate, shadow))

    async def _decide(
        self,
        pending: list[_Pending],
        headers: HeaderPolicy,
        route: str,
        shadow: tuple[CandidateRules, list[_Pending]] | None = None,
    ) -> Verdict:
        if shadow is None:
            outcomes = await self._call(_checks_of(pending))
            if outcomes is None:
                return self._degraded(pending, headers, route)
            return self._verdict(pending, outcomes, headers, route)
        candidate, along = shadow
        apart: list[_Pending] = []
        if self._cluster and along:
            # Only candidate checks on the live checks' slots ride along in their call,
            # so the candidate never splits (or fails) the live decision.
            tags = {_tag(c.key) for p in pending for c in p.checks}
            apart = [p for p in along if any(_tag(c.key) not in tags for c in p.checks)]
            along = [p for p in along if p not in apart]
        checks = [c for p in pending for c in p.checks]
        n = len(checks)
        checks += [c for p in along for c in p.checks]
        outcomes = await self._call(checks) if checks else []
        if outcomes is None:
            verdict = self._degraded(pending, headers, route) if pending else Verdict()
            self._whatif_requests(_live(verdict), "not_evaluated").inc()
            return verdict
        verdict = self._verdict(pending, outcomes[:n], headers, route) if pending else Verdict()
        shadow_outcomes = outcomes[n:]
        if apart:
            extra = await self._call_apart(apart, verdict)
            if extra is None:
                self._whatif_requests(_live(verdict), "not_evaluated").inc()
                return verdict
            along, shadow_outcomes = along + apart, shadow_outcomes + extra
        self._whatif(candidate, along, shadow_outcomes, verdict)
        return verdict

    async def _call(self, checks: Sequence[Check]) -> list[Outcome] | None:
        """One store call behind its breaker(s); None when it failed or was not made."""
        breakers = self._store_breakers if self._node_of is None else self._breakers_for(checks)
        probes: list[Breaker] = []  # half-open breakers whose one probe this call is
        for breaker in breakers.values():
            if breaker.state == "closed":  # the common case: nothing to ask
                continue
            if not breaker.allow():
                for probe in probes:
                    probe.abandon()
                return None
            if breaker.state == "half_open":
                probes.append(breaker)
        started = time.perf_counter()
        try:
            outcomes = await self.store.decide(checks)
        except StorageError as exc:
            self._storage_failed(exc, breakers)
            return None
        except BaseException:  # cancelled (the client went away), or a bug: free the probes
            for probe in probes:
                probe.abandon()
            raise
        self.storage_calls += 1
        self._latency(time.perf_counter() - started)
        for breaker in breakers.values():
            breaker.success()
        return outcomes

    async def _call_apart(self, apart: list[_Pending], verdict: Verdict) -> list[Outcome] | None:
        """Candidate checks on other Cluster slots: a second call, made only for a request
        the live rules admitted (shadow checks are charged only then) and while the
        breaker is closed; its failure only leaves this comparison out."""
        checks = [c for p in apart for c in p.checks]
        if verdict.status is not None:
            return None
        if any(b.state != "closed" for b in self._breakers_for(checks).values()):
            return None  # one of its masters is down: no probe taken, no wait
        try:
            return await self.store.decide(checks)
        except StorageError:
            return None

    def _whatif(
        self,
        candidate: CandidateRules,
        pending: list[_Pending],
        outcomes: list[Outcome],
        verdict: Verdict,
    ) -> None:
        """Count the candidate's decisions and the request's live-vs-candidate answer."""
        live = _live(verdict)
        admitted = True
        i = 0
        for p in pending:
            n = len(p.checks)
            allowed = all(o.allowed for o in outcomes[i : i + n])
            i += n
            name = p.plan.rule.name
            own = candidate.config.limits[name]
            if allowed:
                result = "allowed"
            elif own.shadow:
                result = "shadow_rejected"
            else:
                result = "rejected"
                admitted = False
                if live == "allowed":
                    for callback in self.on_candidate_reject:
                        callback(name, p.client)
            self._whatif_decisions(name, result).inc()
        self._whatif_requests(live, "allowed" if admitted else "rejected").inc()

    def _storage_failed(self, exc: StorageError, breakers: dict[str, Breaker]) -> None:
        """A failed call counts against the breakers of the masters that failed it (a
        call across slots says which: ``failed_keys``); the others answered."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        self.metrics.storage_errors.labels(type(exc).__name__).inc()
        failed = (
            {self._node_of(k) for k in exc.failed_keys}
            if exc.failed_keys and self._node_of is not None
            else None
        )
        for node, breaker in breakers.items():
            if failed is None or node in failed:
                breaker.failure()
            else:
                breaker.success()
        now = self.clock()
        if now - self._last_log > 5:
            self._last_log = now
            log.warning("rate-limit storage call failed: %s", self.last_error)

    def _count(self, rule: str, result: str) -> None:
        """One decision into ``sluice_ratelimit_decisions_total`` (the child's bound
        ``inc`` is kept per label pair: no label validation on the request path)."""
        inc = self._incs.get((rule, result))
        if inc is None:
            inc = self._incs[(rule, result)] = counter_inc(self._decisions(rule, result))
        inc()

    def _verdict(
        self,
        pending: list[_Pending],
        outcomes: list[Outcome],
        headers: HeaderPolicy,
        route: str,
        degraded: bool = False,
    ) -> Verdict:
        if len(outcomes) == 1 and not degraded:  # one rule of one quota: the common case
            only = outcomes[0]
            p = pending[0]
            rule = p.plan.rule
            if only.allowed and not rule.shadow:
                self._count(rule.name, "allowed")
                return Verdict(
                    None,
                    None,
                    render_one(p.plan.labels[0], p.plan.policy_items[0], only, headers.families)
                    if headers.on_allowed
                    else {},
                    [RuleDecision(rule, p.client, True, outcomes, "allowed")],
                )
        verdict = Verdict(degraded=degraded)
        quoted: list[Quoted] = []
        denied: list[Outcome] = []
        i = 0
        for p in pending:
            n = len(p.checks)
            mine = outcomes[i : i + n]
            i += n
            allowed = True
            retry = 0.0
            for o in mine:
                if not o.allowed:
                    retry = o.retry_after_ms if allowed else max(retry, o.retry_after_ms)
                    allowed = False
            rule = p.plan.rule
            if allowed:
                result = "degraded" if degraded else "allowed"
            else:
                result = "shadow_rejected" if rule.shadow else "rejected"
            self._count(rule.name, result)
            verdict.decisions.append(RuleDecision(rule, p.client, allowed, mine, result, retry))
            if rule.shadow:
                continue
            quoted.extend(
                Quoted(lb, pi, o)
                for lb, pi, o in zip(p.plan.labels, p.plan.policy_items, mine, strict=True)
            )
            if not allowed:
                denied.extend(o for o in mine if not o.allowed)
                self._rejected(rule.name, p.client, route)
                if not degraded:  # a local fallback's denial must not outlive the outage
                    self._remember_denial(rule.name, p.client, p.cost, retry, mine)
        families = headers.families
        if denied:
            first = next(d for d in verdict.decisions if d.result == "rejected")
            seconds = retry_after_seconds(denied)
            verdict.status = 429
            verdict.body = {
                "error": "rate_limited",
                "rule": first.rule.name,
                "retry_after": seconds,
            }
            verdict.headers = render(quoted, families, seconds)
        elif headers.on_allowed:
            verdict.headers = render(quoted, families)
        return verdict

    def _rejected(self, rule: str, client: str, route: str) -> None:
        """Tell the listeners (the events emitter: one aggregated event per client and rule
        per interval); they must not block."""
        for callback in self.on_reject:
            callback(rule, client, route)

    def _remember_denial(
        self, rule: str, client: str, cost: int, retry_ms: float, outcomes: list[Outcome]
    ) -> None:
        if retry_ms <= 0:
            return
        if len(self.deny_cache) >= DENY_CACHE_MAX:
            now = self.clock()
            for key in [k for k, (until, _) in self.deny_cache.items() if until <= now]:
                del self.deny_cache[key]
            while len(self.deny_cache) >= DENY_CACHE_MAX:
                del self.deny_cache[next(iter(self.deny_cache))]
        self.deny_cache[(rule, client, cost)] = (self.clock() + retry_ms / 1000, outcomes)

    def _cached_denial(
        self,
        plan: RulePlan,
        client: str,
        cached: tuple[float, list[Outcome]],
        now: float,
        headers: HeaderPolicy,
        route: str,
    ) -> Verdict:
        until, outcomes = cached
        left_ms = (until - now) * 1000
        current = [
            Outcome(
                o.allowed,
                o.limit,
                o.remaining,
                max(0.0, o.reset_ms - (o.retry_after_ms - left_ms)),
                left_ms if not o.allowed else 0.0,
            )
            for o in outcomes
        ]
        rule = plan.rule
        self._cache_hits(rule.name).inc()
        self._count(rule.name, "rejected")
        self._rejected(rule.name, client, route)
        seconds = retry_after_seconds([o for o in current if not o.allowed])
        quoted = [
            Quoted(lb, pi, o)
            for lb, pi, o in zip(plan.labels, plan.policy_items, current, strict=True)
        ]
        return Verdict(
            429,
            {"error": "rate_limited", "rule": rule.name, "retry_after": seconds},
            render(quoted, headers.families, seconds),
            [RuleDecision(rule, client, False, current, "rejected", left_ms)],
        )

    def _degraded(self, pending: list[_Pending], headers: HeaderPolicy, route: str) -> Verdict:
        local = [p for p in pending if p.plan.rule.on_storage_error == "local"]
        for p in pending:
            if p.plan.rule.on_storage_error == "deny" and not p.plan.rule.shadow:
                self._count(p.plan.rule.name, "degraded")
                return Verdict(
                    503,
                    {
                        "error": "rate_limit_unavailable",
                        "rule": p.plan.rule.name,
                        "message": "rate-limit storage is unavailable",
                    },
                    {"Retry-After": "1"},
                    degraded=True,
                )
        for p in pending:
            if p.plan.rule.on_storage_error == "allow":
                self._count(p.plan.rule.name, "degraded")
        if not local:
            return Verdict(degraded=True)
        local_pending = [
            _Pending(
                p.plan,
                p.client,
                p.cost,
                [
                    Check(c.key, lp, c.cost, c.shadow)
                    for c, lp in zip(p.checks, p.plan.local_policies, strict=True)
                ],
            )
            for p in local
        ]
        outcomes = self.local.decide_now([c for p in local_pending for c in p.checks])
        return self._verdict(local_pending, outcomes, headers, route, degraded=True)

    async def close(self) -> None:
        await self.store.close()
        await self.local.close()
