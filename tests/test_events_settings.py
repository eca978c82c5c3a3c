"""``notifications:`` → NotificationsSettings, and the exact file:line errors."""

from __future__ import annotations

import textwrap
from dataclasses import replace

import pytest

from proxy.confread import Problems, Section
from proxy.events.model import EVENT_TYPES, Event
from proxy.events.settings import DEFAULT_SCHEDULE, NotificationsSettings, read_notifications
from proxy.yamlsrc import parse
from tests.test_events_support import SECRET

ENV = {"HOOK_SECRET": SECRET, "OLD_SECRET": "a-plain-passphrase-of-32-bytes!!"}


def read(
    text: str, *, limits: tuple[str, ...] | None = None
) -> tuple[NotificationsSettings, list[str]]:
    root, early = parse(textwrap.dedent(text), "rules.yaml", ENV)
    problems = Problems("rules.yaml")
    problems.items.extend(early)
    top = Section(root, "", problems)
    settings = read_notifications(top.section("notifications"), limits=limits)
    top.finish("listen")
    return settings, [str(p) for p in sorted(problems.items, key=lambda p: p.line)]


def test_defaults() -> None:
    settings, problems = read("listen: 0.0.0.0:8000\n")
    assert problems == []
    assert settings == NotificationsSettings()
    assert settings.aggregate == 10.0 and settings.buffer == 10000
    assert settings.critical == {"storage.degraded", "storage.recovered"}
    assert DEFAULT_SCHEDULE[:6] == (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)
    assert set(DEFAULT_SCHEDULE[6:]) == {3600.0}
    assert 23 * 3600 < sum(DEFAULT_SCHEDULE) <= 24 * 3600


def test_a_full_webhook() -> None:
    settings, problems = read(
        """
        notifications:
          aggregate: 30s
          buffer: 500
          critical: [storage.degraded]
          webhooks:
            - name: ops
              url: https://hooks.example.com/sluice
              secrets: [${HOOK_SECRET}, "${OLD_SECRET}"]
              events: [rate_limit.rejected, storage.degraded]
              rules: [login]
              format: slack
              templates:
                rate_limit.rejected: "{client} hit {rule} {count} times"
              batch: {max_events: 20, max_wait: 2s}
              rate: 5
              timeout: 3s
              retry: {schedule: [1s, 1m], jitter: 0.5}
            - url: http://127.0.0.1:9000/hook
              secret: ${HOOK_SECRET}
              retry: [10s, 1h]
              enabled: false
        """,
        limits=("login",),
    )
    assert problems == []
    assert settings.aggregate == 30.0 and settings.buffer == 500
    ops, second = settings.webhooks
    assert ops.name == "ops" and len(ops.keys) == 2 and ops.format == "slack"
    assert ops.events == {"rate_limit.rejected", "storage.degraded"}
    assert ops.batch.max_events == 20 and ops.batch.max_wait == 2.0 and ops.batched
    assert ops.rate == 5.0 and ops.timeout == 3.0
    assert ops.retry.schedule == (1.0, 60.0) and ops.retry.jitter == 0.5
    assert "secret" not in repr(ops).lower().replace("secrets", "")  # keys are not shown
    assert second.name == "webhook1" and second.events == set(EVENT_TYPES)
    assert second.retry.schedule == (10.0, 3600.0) and not second.enabled
    assert settings.active == (ops,)
    assert ops.safe_url == "https://hooks.example.com/sluice"
    slack = replace(ops, url="https://u:pw@hooks.slack.com:8443/services/T0/B0/secret?x=1")
    assert slack.safe_url == "https://hooks.slack.com:8443/services/…"
    login = Event.create("rate_limit.rejected", {"rule": "login", "client": "a"}, 0)
    other = Event.create("rate_limit.rejected", {"rule": "search", "client": "a"}, 0)
    degraded = Event.create("storage.degraded", {"backend": "redis"}, 0)
    assert ops.wants(login) and not ops.wants(other) and ops.wants(degraded)
    assert not ops.wants(Event.create("link.deleted", {"code": "x"}, 0))


@pytest.mark.parametrize(
    ("yaml", "expected"),
    [
        (
            """
            notifications:
              webhooks:
                - url: https://x.example/h
                  secret: ${HOOK_SECRET}
                  events: [rate_limit.rejectd]
            """,
            "rules.yaml:6: notifications.webhooks[0].events: unknown event type "
            "'rate_limit.rejectd' (did you mean 'rate_limit.rejected'?)",
        ),
        (
            """
            notifications:
              webhooks:
                - url: ftp://x.example/h
                  secret: ${HOOK_SECRET}
            """,
            "rules.yaml:4: notifications.webhooks[0].url: expected an http:// or https:// URL, "
            "got 'ftp://x.example/h'",
        ),
        (
            """
            notifications:
              webhooks:
                - url: https://x.example/h
                  secret: ${HOOK_SECRET}
                  events: [link.deleted]
                  format: slack
                  templates:
                    link.deleted: "{code} removed by {client}"
            """,
            "rules.yaml:9: notifications.webhooks[0].templates.link.deleted: unknown placeholder "
            "{client} for link.deleted (fields: id, type, timestamp, code)",
        ),
        (
            """
            notifications:
              webhooks:
                - url: https://x.example/h
                  secret: ${HOOK_SECRET}
                  templates:
                    link.deleted: "{count:03d}"
            """,
            "rules.yaml:7: notifications.webhooks[0].templates.link.deleted: "
            "placeholder {count:03d} is not a plain {name}",
        ),
        (
            """
            notifications:
              webhooks:
                - url: https://x.example/h
            """,
            "rules.yaml:4: notifications.webhooks[0].secret: required key is missing",
        ),
        (
            """
            notifications:
              webhooks:
                - url: https://x.example/h
                  secret: hunter2
            """,
            "rules.yaml:5: notifications.webhooks[0].secret: secret is 7 bytes; use 24 to 64 "
            "random bytes (e.g. whsec_ + base64 of 32 random bytes)",
        ),
        (
            """
            notifications:
              webhooks:
                - url: https://x.example/h
                  secret: ${HOOK_SECRET}
                  retry: [5s, soon]
            """,
            "rules.yaml:6: notifications.webhooks[0].retry[1]: bad duration 'soon' "
            "(use 500ms, 10s, 1m, 1h or 1d)",
        ),
        (
            """
            notifications:
              webhooks:
                - {name: a, url: "https://x.example/h", secret: "${HOOK_SECRET}"}
                - {name: a, url: "https://y.example/h", secret: "${HOOK_SECRET}"}
            """,
            "rules.yaml:5: notifications.webhooks[1].name: duplicate webhook name 'a'",
        ),
        (
            """
            notifications:
              webhooks:
                - {name: "a b", url: "https://x.example/h", secret: "${HOOK_SECRET}"}
            """,
            "rules.yaml:4: notifications.webhooks[0].name: use 1-64 of A-Z a-z 0-9 _ . - "
            "in a webhook name, got 'a b'",
        ),
        (
            """
            notifications:
              webhooks:
                - url: https://x.example/h
                  secret: ${HOOK_SECRET}
                  timout: 5s
            """,
            "rules.yaml:6: notifications.webhooks[0].timout: unknown key (did you mean 'timeout'?)",
        ),
        (
            """
            notifications:
              critical: [storage.degraded, storage.down]
            """,
            "rules.yaml:3: notifications.critical: unknown event type 'storage.down' "
            "(did you mean 'storage.degraded'?)",
        ),
        (
            """
            notifications:
              webhooks:
                - url: https://x.example/h
                  secret: ${HOOK_SECRET}
                  batch: {max_events: 5000}
            """,
            "rules.yaml:6: notifications.webhooks[0].batch.max_events: at most 1000, got 5000",
        ),
        (
            """
            notifications:
              webhooks:
                - url: https://x.example/h
                  secret: ${HOOK_SECRET}
                  rules: [logn]
            """,
            "rules.yaml:6: notifications.webhooks[0].rules: unknown limit 'logn' "
            "(known: login) (did you mean 'login'?)",
        ),
    ],
)
def test_errors_name_file_line_and_key(yaml: str, expected: str) -> None:
    _, problems = read(yaml, limits=("login",))
    assert problems == [expected]


def test_every_problem_is_reported_at_once() -> None:
    _, problems = read(
        """
        notifications:
          buffer: 0
          webhooks:
            - url: mailto:ops@example.com
              secret: short
              events: [nope]
              rate: -1
        """
    )
    assert problems == [
        "rules.yaml:3: notifications.buffer: must be at least 1, got 0",
        "rules.yaml:5: notifications.webhooks[0].url: expected an http:// or https:// URL, "
        "got 'mailto:ops@example.com'",
        "rules.yaml:6: notifications.webhooks[0].secret: secret is 5 bytes; use 24 to 64 "
        "random bytes (e.g. whsec_ + base64 of 32 random bytes)",
        "rules.yaml:7: notifications.webhooks[0].events: unknown event type 'nope'",
        "rules.yaml:8: notifications.webhooks[0].rate: expected requests per second "
        "(a number above 0), got -1",
    ]
