"""API keys: format, checksum, hashing and the Redis key names that hold them. Pure, no I/O.

A key is `<prefix><kid><secret><checksum>` (GitHub-token style):
- `kid`: 12 base62 characters, the public id shown in listings, logs and the admin API;
- `secret`: 32 base62 characters from `secrets` (190 bits);
- `checksum`: CRC32 of everything before it, 6 base62 characters, so a typo or a string that
  merely looks like a key is rejected without any I/O.
Redis stores only the SHA-256 of the whole key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import zlib
from typing import NamedTuple

ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
KID_LEN = 12
SECRET_LEN = 32
CHECKSUM_LEN = 6
BODY_LEN = KID_LEN + SECRET_LEN + CHECKSUM_LEN


def base62(number: int, width: int) -> str:
    """`number` in base62, left-padded with '0' to `width` characters."""
    digits = []
    while number:
        number, rem = divmod(number, 62)
        digits.append(ALPHABET[rem])
    return "".join(reversed(digits)).rjust(width, "0")


def checksum(text: bytes) -> bytes:
    return base62(zlib.crc32(text), CHECKSUM_LEN).encode("ascii")


def _random(length: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def new_kid() -> str:
    return _random(KID_LEN)


def make_key(prefix: str, kid: str) -> str:
    """A fresh key for `kid`: new secret, checksum appended."""
    body = f"{prefix}{kid}{_random(SECRET_LEN)}".encode("ascii")
    return (body + checksum(body)).decode("ascii")


def key_hash(key: str | bytes) -> str:
    """What Redis stores: sha256 hex of the whole key."""
    raw = key.encode("ascii") if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()


KNOWN_KEYS = 65536  # hashes of well-formed keys remembered per process (~10 MB at most)


class ParsedKey(NamedTuple):
    kid: str
    hash: str


class KeyFormat:
    """Recognises well-formed keys for one prefix, from the raw header bytes, without I/O."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.prefix_bytes = prefix.encode("ascii")
        self._kid_start = len(self.prefix_bytes)
        self._shape = re.compile(re.escape(self.prefix_bytes) + b"[0-9A-Za-z]{%d}" % BODY_LEN)
        self._length = len(self.prefix_bytes) + BODY_LEN
        self._known: dict[str, ParsedKey] = {}  # by hash: keys that already parsed

    def parse(self, token: bytes) -> ParsedKey | None:
        """The key's kid and hash if `token` is a well-formed key with a valid checksum.

        The hash is needed anyway; a key whose hash parsed before (a bounded table of hashes,
        never of keys) skips the shape and checksum checks, which cost more than the hash."""
        if len(token) != self._length:
            return None
        digest = hashlib.sha256(token).hexdigest()
        known = self._known.get(digest)
        if known is not None:
            return known
        if self._shape.fullmatch(token) is None:
            return None
        if checksum(token[:-CHECKSUM_LEN]) != token[-CHECKSUM_LEN:]:
            return None
        kid = token[self._kid_start : self._kid_start + KID_LEN].decode("ascii")
        parsed = ParsedKey(kid, digest)
        if len(self._known) >= KNOWN_KEYS:
            self._known.clear()  # rare, and the next requests refill it
        self._known[digest] = parsed
        return parsed


def bearer_token(value: bytes) -> bytes | None:
    """The credentials of an `Authorization: Bearer <token>` value, else None.

    The scheme is case-insensitive (RFC 9110 §11.1); exactly one space separates it from the
    token, and the token itself is checked by `KeyFormat.parse`.
    """
    if len(value) > 7 and value[6:7] == b" " and value[:6].lower() == b"bearer":
        return value[7:]
    return None


def record_key(kid: str) -> str:
    """The key record. `{kid}` is a Redis Cluster hash tag: record and buckets share one slot,
    so the admission script may touch all three on any cluster."""
    return f"edge:key:{{{kid}}}"


def admit_keys(kid: str) -> tuple[str, str, str, str, str]:
    """admit.lua's KEYS, all in the record's slot: the record, the minute and day buckets of
    requests, the minute and day buckets of LLM tokens."""
    base = record_key(kid)
    return base, base + ":m", base + ":d", base + ":tm", base + ":td"


def bucket_keys(kid: str) -> tuple[str, str]:
    """The minute and day request buckets of `kid`."""
    return record_key(kid) + ":m", record_key(kid) + ":d"


def settle_keys(kid: str, settlement: str) -> tuple[str, str, str, str]:
    """settle.lua's KEYS: the record, the two LLM-token buckets, and the id of one settlement
    (`settlement`: random hex), which makes a settlement sent twice count once."""
    base = record_key(kid)
    return base, base + ":tm", base + ":td", f"{base}:s:{settlement}"


def usage_day_key(kid: str, date: str) -> str:
    """The usage history of `kid` for one UTC day (`date`: YYYY-MM-DD), written by the scripts
    (lua/include/usage.lua) under the record's hash tag."""
    return f"{record_key(kid)}:day:{date}"


def usage_hour_key(kid: str, hour: str) -> str:
    """The usage history of `kid` for one UTC hour (`hour`: YYYY-MM-DDTHH)."""
    return f"{record_key(kid)}:hour:{hour}"


RECORD_PREFIX = "edge:key:{"
RECORD_PATTERN = RECORD_PREFIX + "*}"
_KID = re.compile(f"[0-9A-Za-z]{{{KID_LEN}}}")


def kid_of(name: str | bytes) -> str | None:
    """The inverse of `record_key`: the kid a record name holds, or None for any other name
    (a bucket, or something an operator stored under edge's prefix)."""
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
    if not (text.startswith(RECORD_PREFIX) and text.endswith("}")):
        return None
    kid = text[len(RECORD_PREFIX) : -1]
    return kid if _KID.fullmatch(kid) else None
