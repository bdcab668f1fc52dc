"""Where a client's key may be (`keys.headers`): `Authorization: Bearer <key>`, a bare
`Authorization: <key>` with the key prefix (one seed's own curl example sends it so), Azure's
`api-key` and the Anthropic-style `x-api-key`. Pure, no I/O.

Every header a client may put a key in is dropped before the upstream (policy.REQUEST_DROP),
accepted here or not. The same key in different headers is one key; two different keys are
refused before Redis is asked anything: edge will not guess which one the client meant. One
header repeated is malformed (none of them is a list header), as test T22 holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from edge.keys import bearer_token

AUTHORIZATION = b"authorization"


class Found(Enum):
    KEY = "key"  # one key (in one header or several)
    MISSING = "missing"  # no accepted header at all
    UNUSABLE = "unusable"  # an accepted header, but nothing in it is a key's shape
    CONFLICT = "conflict"  # two different keys


class KeyHeaders:
    """The key a request presents, from its credential headers (name, value) as they came."""

    def __init__(self, accepted: Iterable[str], prefix: str) -> None:
        names = set(accepted)
        self.bearer = bool(names & {"authorization", "bearer"})
        self.bare = "authorization" in names
        self.others = frozenset(n.encode("ascii") for n in names & {"api-key", "x-api-key"})
        self.prefix = prefix.encode("ascii")

    def find(self, credentials: list[tuple[bytes, bytes]]) -> tuple[Found, bytes | None]:
        """What the headers hold, and the key when there is exactly one."""
        if len(credentials) == 1:  # the usual request: one header
            name, value = credentials[0]
            if name == AUTHORIZATION and self.bearer:
                token = bearer_token(value)
                if token is not None:
                    return Found.KEY, token
        key: bytes | None = None
        seen = False
        names: set[bytes] = set()
        for name, value in credentials:
            if name in names and self._accepts(name):
                other = next(v for n, v in credentials if n == name)
                return (Found.CONFLICT if other != value else Found.UNUSABLE), None
            names.add(name)
            token = self._token(name, value)
            if token is None:
                seen = seen or self._accepts(name)
                continue
            seen = True
            if key is not None and token != key:
                return Found.CONFLICT, None
            key = token
        if key is not None:
            return Found.KEY, key
        return (Found.UNUSABLE if seen else Found.MISSING), None

    def _accepts(self, name: bytes) -> bool:
        return self.bearer if name == AUTHORIZATION else name in self.others

    def _token(self, name: bytes, value: bytes) -> bytes | None:
        if name == AUTHORIZATION:
            if not self.bearer:
                return None
            token = bearer_token(value)
            if token is None and self.bare and value.startswith(self.prefix):
                token = value
            return token
        if name in self.others:
            return value or None
        return None
