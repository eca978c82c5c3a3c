"""Pure tests of short codes: generated (keyed permutation + base62) and custom."""

from __future__ import annotations

import itertools
import random
import statistics
import time

import pytest

from proxy.links.codes import (
    ALPHABET,
    BASE,
    MAX_LENGTH,
    RESERVED_CODES,
    Codec,
    check_custom_code,
    is_code,
    looks_generated,
)
from proxy.links.errors import CodeSpaceExhausted, LinkError

SECRET = "test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec(SECRET)


def _value(code: str) -> int:
    value = 0
    for char in code:
        value = value * BASE + ALPHABET.index(char)
    return value


def test_a_million_consecutive_codes_are_unique_and_fast(codec: Codec) -> None:
    started = time.perf_counter()
    codes = codec.encode_many(range(1, 1_000_001))
    elapsed = time.perf_counter() - started
    assert len(set(codes)) == 1_000_000
    assert all(len(c) == 7 and looks_generated(c) for c in codes[:1000])
    assert elapsed < 10, f"encoding a million codes took {elapsed:.1f}s"


def test_consecutive_codes_show_no_sequential_pattern(codec: Codec) -> None:
    codes = codec.encode_many(range(1, 100_001))
    pairs = list(itertools.pairwise(codes))
    # A shared first character happens by chance 1 time in 62.
    shared_first = sum(a[0] == b[0] for a, b in pairs) / len(pairs)
    assert shared_first < 0.03
    # Bit distance between consecutive permuted values: ~half of ~41.7 bits, spread out.
    distances = [bin(_value(a) ^ _value(b)).count("1") for a, b in pairs]
    assert 19.5 < statistics.mean(distances) < 22.0
    assert statistics.pstdev(distances) > 2.0
    # Order is not preserved: about half of consecutive pairs go "down".
    ascending = sum(a < b for a, b in pairs) / len(pairs)
    assert 0.48 < ascending < 0.52
    # Every position uses the whole alphabet about evenly (chi-square, 61 dof).
    for position in range(7):
        counts = [0] * BASE
        for code in codes:
            counts[ALPHABET.index(code[position])] += 1
        expected = len(codes) / BASE
        chi2 = sum((c - expected) ** 2 / expected for c in counts)
        assert chi2 < 120, f"position {position}: chi2 {chi2:.0f}"


def test_codes_are_stable_for_a_secret_and_differ_between_secrets(codec: Codec) -> None:
    # Pinned: a change to the algorithm would make new codes collide with stored ones.
    assert Codec("x" * 32).encode_many([0, 1, 2, 3]) == ["31NW5ar", "qlQRumA", "xEjenD5", "cddWvVS"]
    assert Codec(SECRET).encode(42) == codec.encode(42)
    other = Codec("another-secret-0123456789")
    same = sum(
        a == b
        for a, b in zip(codec.encode_many(range(1000)), other.encode_many(range(1000)), strict=True)
    )
    assert same == 0


def test_decode_inverts_encode_across_lengths(codec: Codec) -> None:
    rng = random.Random(7)
    span7 = BASE**7
    counters = [0, 1, span7 - 1, span7, span7 + 1, span7 + BASE**8 - 1, span7 + BASE**8]
    counters += [rng.randrange(span7) for _ in range(200)]
    codes = codec.encode_many(counters)
    assert codes == [codec.encode(n) for n in counters]
    for counter, code in zip(counters, codes, strict=True):
        assert codec.decode(code) == counter
    assert [len(c) for c in codes[:7]] == [7, 7, 7, 8, 8, 8, 9]
    assert codec.decode("my-code") is None
    assert codec.decode("abc") is None


def test_min_length_and_secret_are_checked() -> None:
    assert len(Codec(SECRET, min_length=9).encode(5)) == 9
    with pytest.raises(ValueError, match="min_length"):
        Codec(SECRET, min_length=6)
    with pytest.raises(ValueError, match="16 bytes"):
        Codec("short")
    last = sum(BASE**n for n in range(MAX_LENGTH - 1, MAX_LENGTH + 1))
    with pytest.raises(CodeSpaceExhausted):
        Codec(SECRET, min_length=MAX_LENGTH - 1).encode(last)


@pytest.mark.parametrize("code", ["abc", "my-code", "a_b", "Promo_2024", "summer", "x" * 6 + "-"])
def test_custom_codes_accepted(code: str) -> None:
    assert check_custom_code(code) == code
    assert is_code(code)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("ab", "3 to 64 characters"),
        ("a" * 65, "3 to 64 characters"),
        ("has space", "only contain letters, digits"),
        ("caf\u00e9", "only contain letters, digits"),
        ("a/b", "only contain letters, digits"),
        ("admin", "reserved"),
        ("Admin", "reserved"),
        ("METRICS", "reserved"),
        ("healthz", "reserved"),
        ("abcdefg", "must contain '-' or '_'"),
        ("summer2024", "must contain '-' or '_'"),
    ],
)
def test_custom_codes_refused(code: str, reason: str) -> None:
    with pytest.raises(LinkError) as info:
        check_custom_code(code)
    assert info.value.status == 400
    assert reason in info.value.reason


def test_no_custom_code_can_equal_a_generated_one(codec: Codec) -> None:
    for code in codec.encode_many(range(0, 5000)):
        with pytest.raises(LinkError):
            check_custom_code(code)
    assert {"api", "admin", "metrics", "healthz", "readyz", "static", "s"} <= RESERVED_CODES
