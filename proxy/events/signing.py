"""Standard Webhooks signing, and the body of one delivery.

Headers: ``webhook-id``, ``webhook-timestamp`` (Unix seconds of this attempt)
and ``webhook-signature``: ``v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>``,
one per configured secret, space-separated (key rotation: receivers accept any).

Secrets: ``whsec_<base64>`` is decoded (as the reference libraries do); any
other string is used as its UTF-8 bytes (receivers pass ``secret.encode()``).
Either way the key must be 24 to 64 bytes, as the specification asks.

Bodies (see ``delivery_body``):

* ``batch.max_events == 1`` (the default): one request per event; the body is
  the event object and ``webhook-id`` is the event id.
* ``batch.max_events > 1``: the body is a JSON array of event objects and
  ``webhook-id`` is ``batch_`` + a digest of the sorted event ids. A failed
  batch is retried as the same batch (same id). Receivers should still dedupe
  on each event's ``id``: a batch whose sender crashed mid-flight may be
  regrouped by the instance that takes it over.
* ``format: slack``: ``{"text": ...}``, one line per event from its template.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence

from proxy.events.model import Event, batch_id
from proxy.events.template import DEFAULT_TEMPLATES, render

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64


def decode_secret(text: str) -> bytes:
    """The HMAC key of a configured secret; ``ValueError`` says what is wrong."""
    if text.startswith(SECRET_PREFIX):
        encoded = text[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error as exc:
            raise ValueError("a whsec_ secret must be base64 after the prefix") from exc
    else:
        key = text.encode()
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(
            f"secret is {len(key)} bytes; use {MIN_KEY_BYTES} to {MAX_KEY_BYTES} random bytes "
            "(e.g. whsec_ + base64 of 32 random bytes)"
        )
    return key


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt."""
    if not keys:
        raise ValueError("at least one signing key is needed")
    if "." in msg_id:
        raise ValueError(f"a webhook id may not contain '.': {msg_id!r}")
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": " ".join(signature(k, msg_id, int(timestamp), body) for k in keys),
    }


def delivery_id(events: Sequence[Event], batched: bool) -> str:
    """The ``webhook-id`` of a delivery: the event id alone, or the batch id."""
    if not batched and len(events) == 1:
        return events[0].id
    return batch_id([e.id for e in events])


def delivery_body(
    events: Sequence[Event], batched: bool, fmt: str, templates: Mapping[str, str]
) -> bytes:
    """The exact bytes sent (and signed) for ``events``."""
    if fmt == "slack":
        lines = [
            render(templates.get(e.type) or DEFAULT_TEMPLATES.get(e.type, "{type} {id}"), e)
            for e in events
        ]
        return json.dumps({"text": "\n".join(lines)}, ensure_ascii=False).encode()
    if not batched and len(events) == 1:
        return events[0].raw
    return b"[" + b",".join(e.raw for e in events) + b"]"
