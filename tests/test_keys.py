"""edge/keys.py: key format, checksum and hashing, without I/O."""

from __future__ import annotations

import hashlib
import zlib

import pytest

from edge.keys import (
    ALPHABET,
    BODY_LEN,
    CHECKSUM_LEN,
    KID_LEN,
    KeyFormat,
    admit_keys,
    base62,
    bearer_token,
    bucket_keys,
    key_hash,
    kid_of,
    make_key,
    new_kid,
    record_key,
    settle_keys,
)
from tests.support.keys import secret_part

FMT = KeyFormat("gw_sk_")


def test_made_keys_parse_back_to_their_kid_and_hash() -> None:
    for _ in range(200):
        kid = new_kid()
        key = make_key("gw_sk_", kid)
        assert key.startswith("gw_sk_") and len(key) == len("gw_sk_") + BODY_LEN
        parsed = FMT.parse(key.encode())
        assert parsed is not None
        assert parsed.kid == kid
        assert parsed.hash == hashlib.sha256(key.encode()).hexdigest() == key_hash(key)


def test_secret_has_at_least_160_bits() -> None:
    secret_len = BODY_LEN - KID_LEN - CHECKSUM_LEN
    import math

    assert secret_len * math.log2(len(ALPHABET)) >= 160


def test_checksum_is_crc32_of_everything_before_it_in_base62() -> None:
    key = make_key("gw_sk_", new_kid())
    body, check = key[:-CHECKSUM_LEN], key[-CHECKSUM_LEN:]
    assert check == base62(zlib.crc32(body.encode()), CHECKSUM_LEN)


def _flip(key: str, index: int) -> str:
    c = key[index]
    return key[:index] + ("A" if c != "A" else "B") + key[index + 1 :]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda k: "sk_" + k[6:],  # wrong prefix
        lambda k: "gw_pk_" + k[6:],
        lambda k: k[:-1],  # too short
        lambda k: k + "A",  # too long
        lambda k: k[:20] + "-" + k[21:],  # alphabet
        lambda k: k[:20] + "_" + k[21:],
        lambda k: _flip(k, 30),  # secret typo: checksum no longer matches
        lambda k: _flip(k, len(k) - 1),  # checksum typo
        lambda k: k + " ",
        lambda k: " " + k,
        lambda k: "",
    ],
)
def test_malformed_keys_are_rejected(mutate) -> None:  # type: ignore[no-untyped-def]
    key = make_key("gw_sk_", new_kid())
    assert FMT.parse(mutate(key).encode()) is None


def test_a_known_key_parses_the_same_and_its_neighbours_still_fail(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Parsed keys are remembered by hash: a repeat skips the checks but answers the same, a
    one-character typo of a remembered key is still refused, and the table stays bounded."""
    fmt = KeyFormat("gw_sk_")
    key = make_key("gw_sk_", new_kid())
    first = fmt.parse(key.encode())
    assert first is not None and fmt.parse(key.encode()) == first
    assert fmt.parse(_flip(key, 30).encode()) is None
    assert fmt.parse(_flip(key, len(key) - 1).encode()) is None
    assert key.encode() not in repr(fmt.__dict__).encode()  # hashes are kept, never keys
    monkeypatch.setattr("edge.keys.KNOWN_KEYS", 3)
    for _ in range(10):
        assert fmt.parse(make_key("gw_sk_", new_kid()).encode()) is not None
        assert len(fmt._known) <= 3


def test_other_prefixes() -> None:
    for prefix in ("gp-", "gk-prx-", "sk_"):
        fmt = KeyFormat(prefix)
        key = make_key(prefix, new_kid())
        assert fmt.parse(key.encode()) is not None
        assert FMT.parse(key.encode()) is None or prefix == "gw_sk_"


def test_secret_part_is_the_random_segment() -> None:
    kid = new_kid()
    key = make_key("gw_sk_", kid)
    secret = secret_part(key)
    assert len(secret) == BODY_LEN - KID_LEN - CHECKSUM_LEN
    assert key == "gw_sk_" + kid + secret + key[-CHECKSUM_LEN:]


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (b"Bearer abc", b"abc"),
        (b"bearer abc", b"abc"),
        (b"BEARER abc", b"abc"),
        (b"Bearer  abc", b" abc"),  # then rejected by the key format
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"Bearer\tabc", None),
        (b"Basic abc", None),
        (b"Bearerabc", None),
    ],
)
def test_bearer_token(value: bytes, token: bytes | None) -> None:
    assert bearer_token(value) == token


def test_redis_key_names_share_one_hash_tag() -> None:
    kid = new_kid()
    record = record_key(kid)
    minute, day = bucket_keys(kid)
    assert admit_keys(kid) == (record, minute, day, record + ":tm", record + ":td")
    assert record == f"edge:key:{{{kid}}}"
    for name in (*admit_keys(kid), *settle_keys(kid, "0123abcd")):
        assert name[name.index("{") + 1 : name.index("}")] == kid


def test_kid_of_inverts_record_key() -> None:
    kid = new_kid()
    assert kid_of(record_key(kid)) == kid
    assert kid_of(record_key(kid).encode()) == kid
    minute, day = bucket_keys(kid)
    for other in (minute, day, "edge:key:{short}", "edge:key:{" + kid + "}x", "other", b"\xff"):
        assert kid_of(other) is None
