"""What-if rollouts: a candidate rules file evaluated in shadow beside the live one.

``rules.yaml`` may say ``candidate: rules.next.yaml``. That file is a whole
rules file, the one the operator means to promote; of it Sluice uses the
routes (to find which candidate rules apply to a request), the redirect
prefix's ``limits`` and the ``limits`` themselves. Its listeners, storage,
upstreams and notifications are not used.

Every request that reaches the limiting step (a matched route, or a short
link) is compared; the candidate's rules for it go into the same store call
as the live ones (one round trip on Redis) as shadow checks under keys of
their own (``sl:{client}:c:…``, so a candidate rule that equals a live one
does not share its counters). Like every shadow rule they never change the
answer, and they are charged only for requests the live rules let through:
"how many requests the live rules admit would the candidate reject" is
exact, over all compared requests. What a looser candidate would let through
is only a lower bound: a request the live deny cache answers makes no store
call, so the candidate is not asked (``candidate="not_evaluated"``), and
candidate counters are not charged for what the live rules refuse.

On Redis Cluster, candidate checks on another slot than every live check of
the request (a candidate rule keyed on another identity) are decided in a
second call after the live answer, only for requests the live rules admit;
if that call fails the request is ``not_evaluated``. The live call never
carries a check on a slot of its own for the candidate, so the candidate
cannot split or fail it.

A candidate that fails to load is reported (status page, ``/readyz``, log)
and ignored; the live config keeps serving unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy import config as configmod
from proxy.config import Config, StorageConfig
from proxy.errors import ConfigError
from proxy.limits.plans import CandidateRules, RulePlan, candidate_plans, plan_rules
from proxy.match import HeaderLookup
from proxy.routing import Router

log = logging.getLogger("sluice.whatif")
REDIRECT_ROUTE = "redirects"  # as proxy.redirects.ROUTE (which imports the runtime)


@dataclass(frozen=True, slots=True)
class Candidate:
    path: str
    config: Config | None = None  # None when the file failed to load
    error: str | None = None
    plans: Mapping[str, RulePlan] = field(default_factory=dict)
    router: Router | None = None
    signature: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) when loaded

    @property
    def usable(self) -> bool:
        return self.config is not None

    def for_route(
        self, method: str, path: str, host: str, headers: HeaderLookup
    ) -> CandidateRules | None:
        """The candidate rules for a proxied or decided request (none may apply: the
        request still counts, as one the candidate would let through)."""
        if self.config is None or self.router is None:
            return None
        route = self.router.route_for(method, path, host, headers)
        if route is None:
            return CandidateRules(self.config, self.plans, (), "none")
        return CandidateRules(self.config, self.plans, route.limits, route.name)

    def for_redirects(self) -> CandidateRules | None:
        if self.config is None:
            return None
        names = self.config.redirects.limits if self.config.redirects is not None else ()
        return CandidateRules(self.config, self.plans, names, REDIRECT_ROUTE)

    def describe(self) -> dict[str, object]:
        cfg = self.config
        return {
            "path": self.path,
            "ok": cfg is not None,
            "error": self.error,
            "sha256": cfg.source.sha256 if cfg else None,
            "loaded_at": cfg.source.loaded_at if cfg else None,
            "rules": list(cfg.limits) if cfg else [],
        }


def file_signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_candidate(path: str, storage: StorageConfig) -> Candidate:
    """Load and check a candidate file; never raises for a bad file (the error is kept)."""
    signature = file_signature(path)
    try:
        cand = configmod.load(path)
    except ConfigError as exc:
        log.error("candidate rules %s ignored (the live config keeps serving):\n%s", path, exc)
        return Candidate(path, error=str(exc), signature=signature)
    if cand.candidate is not None:
        log.warning("candidate rules %s name a candidate of their own: ignored", path)
    plans = candidate_plans(plan_rules(cand.limits, storage))
    log.info("candidate rules %s loaded: %d rules in shadow", path, len(plans))
    return Candidate(path, cand, None, plans, Router(cand.routes), signature)
