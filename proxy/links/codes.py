"""Short codes: generated ones (a keyed permutation of a counter) and custom ones.

Generated codes
---------------
A store hands out counter values that never repeat (Redis ``INCR``, the SQLite
row id). ``Codec.encode(n)`` maps counter ``n`` to a code of exactly
``min_length`` base62 characters (``0-9A-Za-z``) through a keyed permutation of
``[0, 62**min_length)``, so two counters never give the same code and no
collision check is needed. When a length's ``62**L`` codes are used up the
codec moves to ``L + 1`` characters (a separate permutation), up to
``MAX_LENGTH``; codes of different lengths cannot be equal.

The permutation is a type-1 generalised Feistel network (the structure of
CAST-256) over ``k`` branches of ``w`` bits, ``k * w`` the smallest width
covering ``62**L`` (7 chars: 6 branches of 7 bits, 42 bits), with cycle
walking to stay inside ``[0, 62**L)`` (about 1.25 steps on average). Each of
the ``12 * k`` rounds applies its own round function, ``w`` bits to ``w`` bits:
HMAC-SHA256 of the secret over (length, round, block), tabulated once per
codec as a 256-byte table. A round is then one ``bytes.translate`` plus one
XOR over a whole batch: a million codes take about 2 s here, base62 included,
where one HMAC call per round per code (2.5-4.5 us each, measured) would take
10-20 s even with 4 rounds. One code alone takes ~80 us. Any Feistel network is a
bijection whatever its round functions, so uniqueness holds by construction;
unguessability rests on the secret tables (heuristically: a 42-bit block
cannot be a strong cipher, and guessing is bounded by the redirect rate limit
anyway, not by cryptography).

Keep the secret: codes generated under another secret (or imported from a
store that had one) can collide with new ones. Stores therefore insert
generated codes with an atomic "create if absent" and, only in that unusual
case, move on to the next counter value (bounded).

Custom codes
------------
``[A-Za-z0-9_-]{3,64}``, case-sensitive, not a reserved word (compared
case-insensitively), and never of the generated form: a custom code of 7 or
more characters must contain ``-`` or ``_``. Generated codes are always 7+
characters of base62 only, so no custom code can ever equal a present or
future generated code, whatever ``min_length`` becomes.
"""

from __future__ import annotations

import hmac
import re
from array import array
from collections.abc import Sequence

from proxy.links.errors import CodeSpaceExhausted, LinkError

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BASE = len(ALPHABET)
MIN_LENGTH = 7  # shortest generated code; also the custom-code "generated form" threshold
MAX_LENGTH = 10
ROUNDS_PER_BRANCH = 12  # type-1 full diffusion takes 2(k-1) rounds; this is 6x that

RESERVED_CODES: frozenset[str] = frozenset(
    {
        "s", "api", "admin", "metrics", "healthz", "readyz", "livez", "static", "assets",
        "favicon.ico", "robots.txt", "login", "logout", "status", "www", "new", "links",
    }
)  # fmt: skip

CODE_SYNTAX = re.compile(r"[A-Za-z0-9_-]{3,64}")
_GENERATED_FORM = re.compile(rf"[0-9A-Za-z]{{{MIN_LENGTH},}}")
_PAIRS = [a + b for a in ALPHABET for b in ALPHABET]
_DIGITS = {c: i for i, c in enumerate(ALPHABET)}


def is_code(text: str) -> bool:
    """Whether ``text`` could name a link (generated or custom); cheap, for lookups."""
    return CODE_SYNTAX.fullmatch(text) is not None


def looks_generated(code: str) -> bool:
    """Whether ``code`` has the form of a generated code (7+ chars of base62 only)."""
    return _GENERATED_FORM.fullmatch(code) is not None


def check_custom_code(code: str) -> str:
    """Return ``code`` if it is acceptable as a custom code; else raise ``LinkError(400)``."""
    if not 3 <= len(code) <= 64:
        raise LinkError(400, f"a custom code must be 3 to 64 characters long, got {len(code)}")
    if not CODE_SYNTAX.fullmatch(code):
        raise LinkError(400, "a custom code may only contain letters, digits, '-' and '_'")
    if code.lower() in RESERVED_CODES:
        raise LinkError(400, f"the code {code!r} is reserved")
    if looks_generated(code):
        raise LinkError(
            400,
            f"a custom code of {MIN_LENGTH} or more characters must contain '-' or '_' "
            "(so that it can never equal a generated code)",
        )
    return code


def _span(length: int) -> int:
    """How many codes of ``length`` characters exist (62**length)."""
    return int(BASE**length)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _layout(length: int) -> tuple[int, int]:
    """(branches, bits per branch) of the narrowest network covering ``62**length``."""
    bits = (_span(length) - 1).bit_length()
    while True:
        for width in (8, 7, 6, 5):
            if bits % width == 0 and bits // width >= 4:
                return bits // width, width
        bits += 1


class _Network:
    """The keyed permutation of ``[0, 62**length)`` (type-1 GFN + cycle walking)."""

    def __init__(self, secret: bytes, length: int) -> None:
        self.size = _span(length)
        self.branches, self.width = _layout(length)
        mask = (1 << self.width) - 1
        self.shifts = [self.width * i for i in range(self.branches)]
        self.tables: list[bytes] = []
        for rnd in range(ROUNDS_PER_BRANCH * self.branches):
            raw = b"".join(
                hmac.digest(
                    secret, b"sluice.links.codes.v1|%d|%d|%d" % (length, rnd, block), "sha256"
                )
                for block in range(8)
            )
            self.tables.append(bytes(x & mask for x in raw))

    def _split(self, values: Sequence[int]) -> list[bytes]:
        """One byte string per branch, one byte per value (lane-wise, at C speed:
        the values are packed as 64-bit words into one int, each branch masked
        out in place, then every 8th byte taken)."""
        count = len(values)
        packed = int.from_bytes(array("Q", values).tobytes(), "little")
        mask = int.from_bytes(bytes([(1 << self.width) - 1, 0, 0, 0, 0, 0, 0, 0]) * count, "little")
        return [((packed >> s) & mask).to_bytes(8 * count, "little")[::8] for s in self.shifts]

    def _join(self, lanes: list[bytes]) -> list[int]:
        count = len(lanes[0])
        packed = 0
        for lane, shift in zip(lanes, self.shifts, strict=True):
            words = bytearray(8 * count)
            words[::8] = lane
            packed |= int.from_bytes(words, "little") << shift
        out = array("Q")
        out.frombytes(packed.to_bytes(8 * count, "little"))
        return out.tolist()

    def _forward(self, values: Sequence[int]) -> list[int]:
        xs = self._split(values)
        for table in self.tables:
            x0 = xs[0]
            xs = [_xor(xs[1], x0.translate(table)), *xs[2:], x0]
        return self._join(xs)

    def _backward(self, values: Sequence[int]) -> list[int]:
        ys = self._split(values)
        for table in reversed(self.tables):
            x0 = ys[-1]
            ys = [x0, _xor(ys[0], x0.translate(table)), *ys[1:-1]]
        return self._join(ys)

    def _walk(self, values: Sequence[int], backward: bool) -> list[int]:
        step = self._backward if backward else self._forward
        out = step(values)
        pending = [i for i, v in enumerate(out) if v >= self.size]
        while pending:  # cycle walking: re-apply until the value is back in range
            for i, v in zip(pending, step([out[i] for i in pending]), strict=True):
                out[i] = v
            pending = [i for i in pending if out[i] >= self.size]
        return out

    def permute(self, values: Sequence[int]) -> list[int]:
        return self._walk(values, backward=False)

    def invert(self, values: Sequence[int]) -> list[int]:
        return self._walk(values, backward=True)


def _base62(value: int, length: int) -> str:
    text = ""
    for _ in range(length // 2):
        value, pair = divmod(value, BASE * BASE)
        text = _PAIRS[pair] + text
    return ALPHABET[value] + text if length % 2 else text


class Codec:
    """Counter ⇄ generated code for one secret and minimum length (pure; cheap to share).

    ``encode_many`` processes a batch lane-wise (each round is one
    ``bytes.translate`` and one big-int XOR for the whole batch).
    """

    def __init__(self, secret: str | bytes, min_length: int = MIN_LENGTH) -> None:
        if not MIN_LENGTH <= min_length <= MAX_LENGTH:
            raise ValueError(f"min_length must be {MIN_LENGTH} to {MAX_LENGTH}, got {min_length}")
        key = secret.encode() if isinstance(secret, str) else secret
        if len(key) < 16:
            raise ValueError("the code secret must be at least 16 bytes long")
        self._key = key
        self.min_length = min_length
        self._networks: dict[int, _Network] = {}

    def _network(self, length: int) -> _Network:
        net = self._networks.get(length)
        if net is None:
            net = self._networks[length] = _Network(self._key, length)
        return net

    def _locate(self, counter: int) -> tuple[int, int]:
        """(code length, index within that length's permutation) of ``counter``."""
        if counter < 0:
            raise ValueError(f"counter must be >= 0, got {counter}")
        index, length = counter, self.min_length
        while index >= _span(length):
            index -= _span(length)
            length += 1
            if length > MAX_LENGTH:
                raise CodeSpaceExhausted(counter)
        return length, index

    def encode(self, counter: int) -> str:
        return self.encode_many([counter])[0]

    def encode_many(self, counters: Sequence[int]) -> list[str]:
        if not counters:
            return []
        length = self.min_length
        if 0 <= min(counters) and max(counters) < _span(length):  # the usual case: one length
            return [_base62(v, length) for v in self._network(length).permute(counters)]
        groups: dict[int, list[tuple[int, int]]] = {}
        for pos, counter in enumerate(counters):
            length, index = self._locate(counter)
            groups.setdefault(length, []).append((pos, index))
        out = [""] * len(counters)
        for length, items in groups.items():
            permuted = self._network(length).permute([index for _, index in items])
            for (pos, _), value in zip(items, permuted, strict=True):
                out[pos] = _base62(value, length)
        return out

    def decode(self, code: str) -> int | None:
        """The counter that ``encode`` turns into ``code``, or None if no counter does."""
        length = len(code)
        if not self.min_length <= length <= MAX_LENGTH or not looks_generated(code):
            return None
        value = 0
        for char in code:
            value = value * BASE + _DIGITS[char]
        index = self._network(length).invert([value])[0]
        return index + sum(_span(n) for n in range(self.min_length, length))
