"""Bounded per-process hints the proxy keeps about keys between requests (never decisions:
a wrong hint costs time, not correctness)."""

from __future__ import annotations


class KidHints:
    """A bounded set of key ids (kids), or key hashes, with a property worth remembering
    between requests."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._kids: dict[str, None] = {}

    def __contains__(self, kid: str) -> bool:
        return kid in self._kids

    def note(self, kid: str, present: bool) -> None:
        if not present:
            self._kids.pop(kid, None)
            return
        if len(self._kids) >= self.size:
            del self._kids[next(iter(self._kids))]  # the oldest
        self._kids[kid] = None
