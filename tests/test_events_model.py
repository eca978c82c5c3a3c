"""Pure parts of the events package: ids, JSON, aggregation, templates, policy, signing."""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from proxy.events.aggregate import RejectionAggregator
from proxy.events.model import (
    Event,
    UlidSource,
    _base32,
    batch_id,
    iso,
    new_event_id,
    parse_iso,
)
from proxy.events.policy import (
    TokenBucket,
    Verdict,
    backoff,
    classify,
    parse_retry_after,
)
from proxy.events.signing import (
    decode_secret,
    delivery_body,
    delivery_id,
    sign,
)
from proxy.events.template import check, placeholders, render
from tests.test_events_support import SECRET

NOW = 1_700_000_000.0


def test_ids_are_unique_sortable_and_dot_free() -> None:
    ids = [new_event_id(NOW + i / 10_000) for i in range(5000)]
    same_ms = [new_event_id(NOW) for _ in range(1000)]
    assert len(set(ids + same_ms)) == 6000
    assert ids == sorted(ids)
    assert same_ms == sorted(same_ms)  # monotonic within one millisecond
    assert all(i.startswith("evt_") and len(i) == 30 and "." not in i for i in ids)


def test_event_json_is_kept_byte_for_byte() -> None:
    event = Event.create("link.created", {"code": "abc", "destination": "https://é.example"}, NOW)
    assert event.raw.startswith(b'{"id":"evt_')
    again = Event.from_json(event.raw)
    assert again == event and again.raw == event.raw
    body = again.fields()
    assert body["timestamp"] == "2023-11-14T22:13:20.000Z"
    assert body["expires_at"] == ""  # a field of the type that was not sent
    with pytest.raises(ValueError, match="not an event"):
        Event.from_json(b'{"id": 1}')
    with pytest.raises(ValueError, match="unknown event type"):
        Event.create("link.exploded", {}, NOW)


def test_batch_id_depends_on_the_set_of_events_only() -> None:
    a, b = new_event_id(NOW), new_event_id(NOW)
    assert batch_id([a, b]) == batch_id([b, a]) != batch_id([a])
    assert batch_id([a, b]).startswith("batch_")


def test_aggregator_counts_every_rejection_in_exactly_one_window() -> None:
    agg = RejectionAggregator(interval=1.0)
    emitted = []
    t = NOW
    for i in range(50_000):  # 50,000 rejections over 5 seconds from one client
        t = NOW + i * 0.0001
        assert agg.add("login", "1.2.3.4", t, route="api")
        emitted += agg.due(t)
    emitted += agg.drain()
    assert sum(w.count for w in emitted) == 50_000
    assert len(emitted) == 5
    first = emitted[0].data()
    assert first["rule"] == "login" and first["client"] == "1.2.3.4" and first["route"] == "api"
    assert first["first_seen"] == "2023-11-14T22:13:20.000Z"


def test_aggregator_windows_are_per_rule_and_client_and_bounded() -> None:
    agg = RejectionAggregator(interval=10.0, max_keys=2)
    assert agg.add("r1", "a", NOW) and agg.add("r2", "a", NOW + 1) and agg.add("r1", "a", NOW + 2)
    assert not agg.add("r1", "b", NOW + 3)  # a third window would exceed max_keys
    assert agg.due(NOW + 9.9) == []
    closed = agg.due(NOW + 10)
    assert [(w.rule, w.count) for w in closed] == [("r1", 2)]
    assert agg.next_due() == NOW + 11
    assert [(w.rule, w.count) for w in agg.due(NOW + 11)] == [("r2", 1)]
    assert len(agg) == 0


def test_templates_accept_only_known_plain_placeholders() -> None:
    assert placeholders("{client} hit {{literal}} {rule}") == ["client", "rule"]
    assert check("{client} hit {rule} {count}x", "rate_limit.rejected") == []
    assert check("{code} {client}", "link.deleted") == [
        "unknown placeholder {client} for link.deleted (fields: id, type, timestamp, code)"
    ]
    assert check("{count:>5}", "rate_limit.rejected") == [
        "placeholder {count:>5} is not a plain {name}"
    ]
    assert check("{data.code}", "link.deleted") == ["placeholder {data.code} is not a plain {name}"]
    assert check("{oops", "ping")[0].startswith("bad template '{oops'")
    event = Event.create("link.deleted", {"code": "x1"}, NOW)
    assert render("{type}: {code} ({{gone}})", event) == "link.deleted: x1 ({gone})"


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (301, Verdict.RETRY),
        (400, Verdict.DEAD),
        (401, Verdict.DEAD),
        (404, Verdict.DEAD),
        (408, Verdict.RETRY),
        (409, Verdict.RETRY),
        (410, Verdict.GONE),
        (413, Verdict.DEAD),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (502, Verdict.RETRY),
        (503, Verdict.RETRY),
    ],
)
def test_status_classification(status: int, verdict: Verdict) -> None:
    assert classify(status).verdict is verdict


def test_retry_after_seconds_and_http_dates() -> None:
    assert parse_retry_after("7", NOW) == 7.0
    assert parse_retry_after(None, NOW) is None
    assert parse_retry_after("soon", NOW) is None
    date = datetime.fromtimestamp(NOW + 30, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(date, NOW) == pytest.approx(30.0)
    assert parse_retry_after("999999999", NOW) == 86400.0


def test_backoff_follows_the_schedule_with_full_jitter() -> None:
    schedule = (5.0, 30.0)
    rng = random.Random(1)
    assert backoff(schedule, 1, 0.0, rng) == 5.0
    assert backoff(schedule, 2, 0.0, rng) == 30.0
    assert backoff(schedule, 3, 0.0, rng) is None  # exhausted: dead letter
    draws = [backoff(schedule, 2, 1.0, rng) for _ in range(2000)]
    assert all(d is not None and 0 < d <= 30.0 for d in draws)
    assert 12 < sum(d or 0 for d in draws) / len(draws) < 18  # uniform over (0, 30]


def test_token_bucket() -> None:
    bucket = TokenBucket(2.0, NOW)
    for _ in range(2):
        assert bucket.ready_in(NOW) == 0.0
        bucket.take(NOW)
    assert bucket.ready_in(NOW) == 0.5
    assert bucket.ready_in(NOW + 0.25) == 0.25
    assert bucket.ready_in(NOW + 0.5) == 0.0


def test_signatures_verify_with_the_reference_library() -> None:
    body = Event.create("ping", {"message": "hi"}, NOW).raw
    key = decode_secret(SECRET)
    now = int(datetime.now(UTC).timestamp())
    headers = sign([key], "evt_X", now, body)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, headers)["data"] == {"message": "hi"}
    # a raw (non-whsec) secret is used as its UTF-8 bytes
    raw = "a-plain-passphrase-of-32-bytes!!"
    assert Webhook(raw.encode()).verify(body, sign([decode_secret(raw)], "evt_X", now, body))


def test_wrong_secret_tampering_and_old_timestamps_fail() -> None:
    body = b'{"id":"evt_X"}'
    now = int(datetime.now(UTC).timestamp())
    other = "whsec_" + base64.b64encode(b"another secret of 24 bytes!!").decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, sign([decode_secret(SECRET)], "evt_X", now, body))
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body + b" ", sign([decode_secret(SECRET)], "evt_X", now, body))
    with pytest.raises(WebhookVerificationError, match="too old"):
        old = sign([decode_secret(SECRET)], "evt_X", now - 600, body)
        Webhook(SECRET).verify(body, old)


def test_rotation_signs_with_every_secret() -> None:
    other = "whsec_" + base64.b64encode(b"another secret of 24 bytes!!").decode()
    body = b"{}"
    now = int(datetime.now(UTC).timestamp())
    headers = sign([decode_secret(other), decode_secret(SECRET)], "evt_X", now, body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(SECRET).verify(body, headers)
    Webhook(other).verify(body, headers)


def test_secrets_are_checked() -> None:
    with pytest.raises(ValueError, match="secret is 5 bytes"):
        decode_secret("short")
    with pytest.raises(ValueError, match="base64"):
        decode_secret("whsec_not*base64")
    assert len(decode_secret(SECRET)) == 32


def test_bodies_single_batch_and_slack() -> None:
    a = Event.create("link.deleted", {"code": "a"}, NOW)
    b = Event.create("link.deleted", {"code": "b"}, NOW)
    assert delivery_body([a], False, "standard", {}) == a.raw
    assert delivery_id([a], False) == a.id
    assert delivery_body([a, b], True, "standard", {}) == b"[" + a.raw + b"," + b.raw + b"]"
    assert delivery_id([a], True) == batch_id([a.id])
    slack = delivery_body([a, b], True, "slack", {"link.deleted": "gone: {code}"})
    assert slack == b'{"text": "gone: a\\ngone: b"}'


def _iso_reference(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def test_cached_time_formats_match_datetime() -> None:
    rng = random.Random(7)
    stamps = [rng.uniform(0, 4e9) for _ in range(20_000)]
    stamps += [NOW + k / 1000 for k in range(2000)]  # every millisecond of two seconds
    stamps += [NOW + 0.9999995, NOW + 0.9994999, NOW + 0.0005, 0.0, 1e-7, NOW - 1.5e-7]
    for ts in stamps:
        text = iso(ts)
        assert text == _iso_reference(ts), ts
        reference = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        assert parse_iso(text) == reference
    offset = datetime(2024, 5, 1, 10, tzinfo=UTC).timestamp()
    assert parse_iso("2024-05-01T12:00:00+02:00") == offset


def test_base32_matches_the_bit_by_bit_encoding() -> None:
    def reference(value: int, length: int) -> str:
        out = []
        for _ in range(length):
            out.append("0123456789ABCDEFGHJKMNPQRSTVWXYZ"[value & 31])
            value >>= 5
        return "".join(reversed(out))

    rng = random.Random(3)
    for _ in range(2000):
        value = rng.getrandbits(rng.choice((7, 50, 128, 140)))
        for length in (1, 2, 3, 16, 22, 25, 26):
            assert _base32(value, length) == reference(value, length)
    source = UlidSource()
    source._last_ms, source._last_rand = -1, 0
    first = source.new(NOW)  # fresh random bits
    ms, rand = source._last_ms, source._last_rand
    assert first == reference((ms << 80) | rand, 26)
    for step in range(1, 3000):  # the counter crosses the cached high bits
        assert source.new(NOW) == reference((ms << 80) | (rand + step), 26)


def test_event_json_is_what_json_dumps_writes() -> None:
    cases: list[dict[str, object]] = [
        {"code": "abc", "destination": "https://é.example/\u2028", "variant": None},
        {"nested": {"list": [1, 2.5, True, None], "quote": '"\\\n'}, "n": 10**20},
        {"odd": object(), "when": datetime(2024, 1, 1, tzinfo=UTC)},  # default=str
    ]
    for data in cases:
        event = Event.create("link.created", data, NOW + 0.123)
        body = {"id": event.id, "type": event.type, "timestamp": iso(event.timestamp), "data": data}
        expected = json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str)
        assert event.raw == expected.encode()
    # Ids and types that would need escaping take the general path.
    odd = Event('evt_"q"', "link.created", NOW, {"code": "x"})
    assert json.loads(odd.raw)["id"] == 'evt_"q"'
    looped: dict[str, object] = {}
    looped["self"] = looped
    with pytest.raises(ValueError, match="Circular"):
        Event.create("link.created", looped, NOW)


def test_stored_events_parse_their_data_on_demand() -> None:
    event = Event.create("redirect.followed", {"code": "hot", "variant": 2}, NOW + 0.5)
    stored = Event.from_json(event.raw)
    assert (stored.id, stored.type, stored.timestamp) == (event.id, event.type, NOW + 0.5)
    assert stored.data == {"code": "hot", "variant": 2} and stored == event
    assert stored.fields()["code"] == "hot"
    # JSON in another shape (spaces, other key order) is parsed the ordinary way.
    other = json.dumps({"type": "link.deleted", "id": "evt_1", "timestamp": iso(NOW), "data": {}})
    parsed = Event.from_json(other)
    assert (parsed.id, parsed.type, parsed.data) == ("evt_1", "link.deleted", {})
    broken = Event.from_json(event.raw[:-2] + b"!}}")  # the head is fine, the data is not
    with pytest.raises(ValueError, match="not an event"):
        dict(broken.data)


def test_ids_count_up_across_milliseconds_between_draws() -> None:
    source = UlidSource(reseed=1.0)
    first = source.new(NOW)
    start = source._last_rand
    later = [source.new(NOW + k / 1000) for k in range(1, 999)]  # within the second
    assert source._last_rand == start + 998
    assert [first, *later] == sorted({first, *later})
    source.new(NOW + 1.0)  # a second on: new random bits (same start: 1 in 2**80)
    assert source._last_rand != start + 999
    assert source.new(NOW - 5) > later[-1]  # a clock stepping back keeps the order
