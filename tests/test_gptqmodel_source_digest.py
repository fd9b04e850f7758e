"""``integrations.gptqmodel.compat.source_digest``: the digest of a function's source that tells GPTQModel's own
function from another release's or a patch's, read once per function object (every run checks dozens)."""

from __future__ import annotations

import functools
import hashlib
import inspect

from defuser_quant.integrations.gptqmodel import compat


def _first() -> int:
    return 1


def _second() -> int:
    return 2


def test_the_digest_is_the_sources_and_each_function_is_read_once(monkeypatch):
    reads: list = []
    original = inspect.getsource

    def counting(obj):
        reads.append(obj)
        return original(obj)

    monkeypatch.setattr(inspect, "getsource", counting)
    compat._digest_of.cache_clear()
    want = hashlib.sha256(original(_first).encode()).hexdigest()[:16]
    assert compat.source_digest(_first) == want == compat.source_digest(_first)
    assert reads == [_first]  # the second call remembered it

    @functools.wraps(_first)
    def wrapper():  # a wrapper is read through to the function it wraps
        return _first()

    assert compat.source_digest(wrapper) == want and reads == [_first]
    assert compat.source_digest(_second) != want and reads == [_first, _second]  # a patch is another function


def test_what_has_no_source_gives_none():
    assert compat.source_digest(len) is None
    assert compat.source_digest(functools.partial(_first)) is None  # not hashable by source, not a function
