"""edge/proxy/fail_open.py: what may be admitted while Redis is away. No I/O."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge.keys import ParsedKey
from edge.proxy.admission import HAS_BALANCE, SCOPED_ROUTES, Code, Decision
from edge.proxy.fail_open import FailOpen

KEY = ParsedKey("AAAAAAAAAAAA", "a" * 64)
ADMITTED = Decision(Code.ADMITTED, "pro", 200, 50_000, 199, 300, 49_999, 1_700, 0)


def test_only_a_validated_key_with_the_same_hash() -> None:
    cache = FailOpen(ttl=60)
    assert cache.admit(KEY) is None  # never seen
    cache.note(KEY, ADMITTED)
    decision = cache.admit(KEY)
    assert decision is not None and decision.code == Code.ADMITTED and decision.plan == "pro"
    assert cache.admit(KEY._replace(hash="b" * 64)) is None  # a forged secret for that id


def test_a_rate_limited_key_was_validated_too() -> None:
    cache = FailOpen(ttl=60)
    cache.note(KEY, ADMITTED._replace(code=Code.MINUTE_EMPTY, retry_ms=900))
    decision = cache.admit(KEY)
    assert decision is not None and decision.retry_ms == 0


@pytest.mark.parametrize("code", [Code.PAUSED, Code.REVOKED, Code.EXPIRED, Code.PLAN_MISSING])
def test_a_key_seen_gone_is_forgotten(code: Code) -> None:
    cache = FailOpen(ttl=60)
    cache.note(KEY, ADMITTED)
    cache.note(KEY, Decision(code, "pro"))
    assert cache.admit(KEY) is None


def test_a_wrong_secret_for_the_id_does_not_evict_the_real_key() -> None:
    cache = FailOpen(ttl=60)
    cache.note(KEY, ADMITTED)
    cache.note(KEY._replace(hash="b" * 64), Decision(Code.UNKNOWN, ""))
    assert cache.admit(KEY) is not None
    cache.note(KEY, Decision(Code.UNKNOWN, ""))  # the real hash no longer matches (rotated)
    assert cache.admit(KEY) is None


@pytest.mark.parametrize(
    "decision",
    [ADMITTED._replace(credits=10, flags=HAS_BALANCE), ADMITTED._replace(flags=SCOPED_ROUTES)],
    ids=["metered", "scoped"],
)
def test_metered_or_scoped_keys_are_never_admitted_without_redis(decision: Decision) -> None:
    cache = FailOpen(ttl=60)
    cache.note(KEY, ADMITTED)
    cache.note(KEY, decision)
    assert cache.admit(KEY) is None


def test_ttl_expiry_and_size() -> None:
    cache = FailOpen(ttl=0.05)
    cache.note(KEY, ADMITTED)
    time.sleep(0.06)
    assert cache.admit(KEY) is None
    cache = FailOpen(ttl=60)
    cache.note(KEY, ADMITTED._replace(expires=int(time.time()) - 1))
    assert cache.admit(KEY) is None
    small = FailOpen(ttl=60, size=2)
    keys = [ParsedKey(f"{i:012d}", f"{i:064d}") for i in range(3)]
    for key in keys:
        small.note(key, ADMITTED)
    assert small.admit(keys[0]) is None and small.admit(keys[2]) is not None


def test_a_change_made_through_this_instance_forgets_the_key() -> None:
    cache = FailOpen(ttl=60)
    cache.note(KEY, ADMITTED)
    cache.forget(KEY.kid)
    assert cache.admit(KEY) is None
    cache.note(KEY, ADMITTED)  # validated again after the change: remembered again
    assert cache.admit(KEY) is not None


def test_workers_of_one_instance_hear_each_others_changes(tmp_path: Path) -> None:
    """Two workers share the supervisor's directory: a change through one is honoured by the
    other before it admits anything without Redis; a validation after the change stands."""
    one = FailOpen(ttl=60, shared_dir=str(tmp_path))
    two = FailOpen(ttl=60, shared_dir=str(tmp_path))
    other = ParsedKey("BBBBBBBBBBBB", "b" * 64)
    two.note(KEY, ADMITTED)
    two.note(other, ADMITTED)
    one.forget(KEY.kid)
    assert two.admit(KEY) is None
    assert two.admit(other) is not None
    two.note(KEY, ADMITTED)
    assert two.admit(KEY) is not None  # validated after the change


def test_a_new_worker_does_not_replay_old_changes(tmp_path: Path) -> None:
    FailOpen(ttl=60, shared_dir=str(tmp_path)).forget(KEY.kid)
    late = FailOpen(ttl=60, shared_dir=str(tmp_path))
    late.note(KEY, ADMITTED)
    assert late.admit(KEY) is not None
