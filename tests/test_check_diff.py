"""``sluice check --diff``: the pure comparison (``proxy.diff``), then once through the CLI."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from proxy.config import Config, loads
from proxy.diff import SECTIONS, diff
from tests.proc import run_sluice
from tests.test_cli import clean_env

SECRET_A = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRET_B = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"

OLD = f"""\
listen: 127.0.0.1:18000
admin:
  listen: 127.0.0.1:18001
  tokens:
    - {{name: ci, token: ci-token-0123456789abcdef, scope: read}}
    - {{name: ops, token: ops-token-0123456789abcdef, scope: write}}
storage: {{url: "redis://:hunter2@10.0.0.5:6379/0", timeout: 50ms}}
upstreams:
  api: http://127.0.0.1:9000
  legacy: http://127.0.0.1:9001
clients: {{trusted_proxies: [10.0.0.0/8]}}
limits:
  - {{name: per_minute, key: "header:X-API-Key | ip", algorithm: fixed_window, limit: 100,
     window: 1m}}
  - {{name: bucket, algorithm: token_bucket, capacity: 10, refill: 5/s}}
  - {{name: old_rule, limit: 5, window: 1s}}
routes:
  - {{name: api, match: {{path_prefix: /api/}}, upstream: api, limits: [per_minute]}}
  - {{name: web, match: {{path_prefix: /web/}}, upstream: api}}
  - {{name: legacy, match: {{path_prefix: /}}, upstream: legacy, limits: [old_rule]}}
redirects: {{prefix: /s/, code_secret: first-code-secret-0123456789}}
notifications:
  webhooks:
    - {{name: ops, url: "https://hooks.slack.com/services/T000/B000/XXXX", secret: {SECRET_A},
       events: [rate_limit.rejected], format: slack}}
    - {{name: audit, url: "https://audit.example.com/in", secret: {SECRET_A}}}
"""

NEW = f"""\
listen: 127.0.0.1:18100
admin:
  listen: 127.0.0.1:18001
  tokens:
    - {{name: ci, token: ci-token-0123456789abcdef, scope: write}}
    - {{name: ops, token: ops-token-rotated-0123456789, scope: write}}
    - {{name: deploy, token: deploy-token-0123456789ab, scope: read}}
storage: {{url: "redis://:swordfish@10.0.0.5:6379/0", timeout: 100ms}}
upstreams:
  api: {{url: http://127.0.0.1:9000, read_timeout: 5s}}
  next: http://127.0.0.1:9002
clients: {{trusted_proxies: [10.0.0.0/8, 192.168.0.0/16]}}
limits:
  - {{name: per_minute, key: "header:X-API-Key", algorithm: sliding_window_log, limit: 200,
     window: 1m, shadow: true, cost: "header:X-Cost", match: {{methods: [POST]}}}}
  - {{name: bucket, algorithm: token_bucket, capacity: 10, refill: 5/s, on_storage_error: deny}}
  - {{name: new_rule, key: ip/64, algorithm: gcra, limit: 60, window: 1m, burst: 10}}
routes:
  - {{name: web, match: {{path_prefix: /web/}}, upstream: api}}
  - name: api
    match: {{path_prefix: /api/v2/, methods: [GET]}}
    upstream: api
    limits: [per_minute, bucket]
    rate_limit_headers: {{families: [ietf], on_allowed: false}}
  - {{name: next, match: {{path_prefix: /}}, upstream: next, limits: [new_rule]}}
redirects:
  prefix: /go/
  code_secret: second-code-secret-0123456789
  analytics_queue: 500
  miss_limit: false
  deny_hosts: [evil.example]
notifications:
  aggregate: 1m
  webhooks:
    - {{name: ops, url: "https://hooks.slack.com/services/T000/B000/YYYY",
       secrets: [{SECRET_B}, {SECRET_A}], events: [rate_limit.rejected, storage.degraded],
       format: slack, rate: 2}}
    - {{name: pager, url: "https://pager.example.com/hook", secret: {SECRET_B},
       events: [storage.degraded], enabled: false}}
server: {{max_body_size: 1MB, keepalive_timeout: 30s}}
logging: {{level: debug, format: json, access: "sample:0.01", show_keys: true}}
"""

EXPECTED = [
    "~ listen: 127.0.0.1:18000 → 127.0.0.1:18100 (needs restart)",
    "~ admin.tokens.ci.scope: read → write",
    "~ admin.tokens.ops.token: changed",
    "+ admin.tokens.deploy: scope read",
    "~ storage.url: changed (needs restart)",
    "~ storage.timeout: 50ms → 100ms (needs restart)",
    "~ server.max_body_size: 104857600 → 1000000",
    "~ server.keepalive_timeout: 75s → 30s (needs restart)",
    "- upstreams.legacy",
    "~ upstreams.api.read_timeout: 30s → 5s",
    "+ upstreams.next: http://127.0.0.1:9002",
    "~ clients.trusted_proxies: [10.0.0.0/8] → [10.0.0.0/8, 192.168.0.0/16]",
    "- limits.old_rule",
    "~ limits.per_minute.algorithm: fixed_window → sliding_window_log (counts afresh)",
    "~ limits.per_minute.quotas: 100/1m → 200/1m (changed quotas count afresh)",
    "~ limits.per_minute.cost: 1 → header:X-Cost",
    "~ limits.per_minute.key: header:X-API-Key | ip → header:X-API-Key",
    "~ limits.per_minute.shadow: false → true",
    "~ limits.per_minute.match: none → POST",
    "~ limits.bucket.on_storage_error: allow → deny",
    "+ limits.new_rule: gcra 60/1m burst 10 by [ip/64], storage down → allow",
    "- routes.legacy",
    "~ routes.api.match: prefix=/api/ → GET prefix=/api/v2/",
    "~ routes.api.limits: [per_minute] → [per_minute, bucket]",
    "~ routes.api.headers: families [x-ratelimit, ietf], on_allowed true"
    " → families [ietf], on_allowed false",
    "+ routes.next: prefix=/ → next [new_rule]",
    "~ routes order: api, web → web, api (first match wins)",
    "~ redirects.prefix: /s/ → /go/",
    "~ redirects.miss_limit: 20/1m → off",
    "~ redirects.analytics_queue: 10000 → 500 (needs restart)",
    "~ redirects.code_secret: changed (needs restart)",
    "~ redirects.deny_hosts: [] → [evil.example]",
    "~ notifications.aggregate: 10s → 1m",
    "- notifications.webhooks.audit",
    "~ notifications.webhooks.ops.url: changed",
    "~ notifications.webhooks.ops.secret: changed (1 → 2 secrets)",
    "~ notifications.webhooks.ops.events: [rate_limit.rejected]"
    " → [rate_limit.rejected, storage.degraded]",
    "~ notifications.webhooks.ops.rate: none → 2/s",
    "+ notifications.webhooks.pager: https://pager.example.com/hook events [storage.degraded]"
    " (disabled)",
    "~ logging.level: info → debug",
    "~ logging.format: text → json (needs restart)",
    "~ logging.access: false → sample:0.01",
    "~ logging.show_keys: false → true",
]


def config(text: str, name: str = "rules.yaml") -> Config:
    return loads(text, name, env={})


def test_every_kind_of_change_in_reference_order() -> None:
    assert diff(config(OLD), config(NEW)) == EXPECTED


def test_secrets_never_printed() -> None:
    printed = "\n".join(diff(config(OLD), config(NEW)) + diff(config(NEW), config(OLD)))
    for secret in (
        "hunter2",
        "swordfish",
        "ops-token",
        "ci-token",
        "deploy-token",
        "code-secret",
        "XXXX",
        "YYYY",
        "B000",
        SECRET_A[6:],
        SECRET_B[6:],
    ):
        assert secret not in printed


def test_identical_configs_have_no_changes() -> None:
    assert diff(config(OLD), config(OLD, "elsewhere.yaml")) == []
    # moving entries down the file (other line numbers) changes nothing either
    assert diff(config(OLD), config("# a comment\n\n" + OLD)) == []


def test_reverse_direction() -> None:
    lines = diff(config(NEW), config(OLD))
    assert "+ upstreams.legacy: http://127.0.0.1:9001" in lines
    assert "- limits.new_rule" in lines
    assert "~ storage.url: changed (needs restart)" in lines
    assert "- notifications.webhooks.pager" in lines
    added = [line for line in lines if line.startswith("+ notifications.webhooks.audit: ")]
    assert added == [
        "+ notifications.webhooks.audit: https://audit.example.com/in events [link.created,"
        " link.deleted, ping, rate_limit.rejected, redirect.followed, storage.degraded,"
        " storage.recovered]"
    ]


def test_restart_only_sections() -> None:
    base = "listen: 127.0.0.1:18000\n"
    assert diff(config(base), config(base + "redirects: {prefix: /s/}\n")) == [
        "+ redirects: prefix /s/, status 302, limits [] (needs restart)"
    ]
    assert diff(config(base + "redirects: {host: go.example.com}\n"), config(base)) == [
        "- redirects (needs restart)"
    ]
    # a first webhook needs a delivery worker, which only a start opens
    hook = (
        "notifications: {webhooks: [{name: a, url: 'https://h.example/x', "
        f"secret: {SECRET_A}}}]}}\n"
    )
    (line,) = diff(config(base), config(base + hook))
    assert line.startswith("+ notifications.webhooks.a: https://h.example/x events [")
    assert line.endswith("] (needs restart)")
    assert diff(config(base), config(base + "admin: {listen: 127.0.0.1:18009}\n")) == [
        "~ admin.listen: 127.0.0.1:8001 → 127.0.0.1:18009 (needs restart)"
    ]
    assert diff(config(base), config(base + "mode: decide\n")) == ["~ mode: proxy → decide"]


def test_every_config_section_is_compared() -> None:
    # a new Config field needs its comparison (and its place) in proxy.diff.SECTIONS
    assert sorted(SECTIONS) == sorted(f.name for f in fields(Config) if f.name != "source")


# ---------------------------------------------------------------- through the CLI


def test_check_diff_command(tmp_path: Path) -> None:
    (tmp_path / "old.yaml").write_text(OLD)
    (tmp_path / "new.yaml").write_text(NEW)
    result = run_sluice(["check", "--diff", "old.yaml", "new.yaml"], cwd=tmp_path, env=clean_env())
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        f"old.yaml → new.yaml: {len(EXPECTED)} changes",
        *(f"  {line}" for line in EXPECTED),
    ]

    same = run_sluice(["check", "--diff", "old.yaml", "old.yaml"], cwd=tmp_path, env=clean_env())
    assert (same.returncode, same.stdout, same.stderr) == (
        0,
        "old.yaml → old.yaml: no changes\n",
        "",
    )

    (tmp_path / "bad.yaml").write_text("listen: nope\n")
    bad = run_sluice(["check", "--diff", "old.yaml", "bad.yaml"], cwd=tmp_path, env=clean_env())
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == "bad.yaml:1: listen: expected host:port, got 'nope'\n"

    usage = run_sluice(["check", "--diff", "old.yaml"], cwd=tmp_path, env=clean_env())
    assert usage.returncode == 2
    assert "check --diff takes exactly two files: OLD NEW" in usage.stderr
