"""The job schema's backend/method/scheme check: what it accepts, the backend turns into a real
quantizer configuration; what a backend cannot run is refused up front (naming the field, the
value and what is allowed), not minutes into the job."""

from __future__ import annotations

import itertools
from typing import get_args

import pytest

from defuser_quant.jobs.config import Backend, JobConfigError, Method, Scheme, parse_job_config

COMBINATIONS = list(itertools.product(get_args(Backend), get_args(Method), get_args(Scheme)))


def _job(backend: str, method: str, scheme: str) -> dict:
    return {
        "model": {"path": "some/model"},
        "output": {"dir": "out"},
        "quantization": {"backend": backend, "method": method, "scheme": scheme},
    }


def _accepted(backend: str, method: str, scheme: str):
    try:
        return parse_job_config(_job(backend, method, scheme))
    except JobConfigError as exc:
        assert "quantization:" in str(exc) and str(exc).count("\n") == 1, exc  # refused for this reason only
        return None


def test_each_backend_accepts_some_combinations():
    accepted = {b for b, m, s in COMBINATIONS if _accepted(b, m, s) is not None}
    assert accepted == set(get_args(Backend))


def _gptqmodel_can_run(method: str, scheme: str) -> bool:
    """Whether the gptqmodel backend can express the scheme as a real ``QuantizeConfig``."""
    from gptqmodel import QuantizeConfig

    from defuser_quant.jobs.backends.gptqmodel import _BITS

    if scheme not in _BITS or method not in ("gptq", "awq"):
        return False
    QuantizeConfig(bits=_BITS[scheme], group_size=128, method=method)
    return True


@pytest.mark.parametrize("backend,method,scheme", COMBINATIONS)
def test_accepted_combinations_build_the_real_quantizer_config(backend, method, scheme):
    cfg = _accepted(backend, method, scheme)
    if cfg is None:
        pytest.skip("refused by the schema (checked below)")
    if backend == "gptqmodel":
        assert _gptqmodel_can_run(method, scheme)
    else:
        from defuser_quant.jobs.backends.llmcompressor import _quant_modifiers

        modifiers = _quant_modifiers(cfg)
        assert modifiers and type(modifiers[-1]).__module__.startswith("llmcompressor.")


@pytest.mark.parametrize("method,scheme", [(m, s) for b, m, s in COMBINATIONS if b == "gptqmodel"])
def test_gptqmodel_refuses_what_its_backend_cannot_run(method, scheme):
    if _gptqmodel_can_run(method, scheme):
        pytest.skip("runnable")
    with pytest.raises(JobConfigError) as info:
        parse_job_config(_job("gptqmodel", method, scheme))
    message = str(info.value)
    assert "quantization" in message and "allowed" in message
    assert (repr(scheme) in message) or (repr(method) in message)


def test_fp8_with_gptqmodel_names_the_scheme_and_the_allowed_ones():
    with pytest.raises(JobConfigError, match=r"scheme 'FP8_DYNAMIC' is not available for gptqmodel/gptq; allowed: W4A16, W8A16"):
        parse_job_config(_job("gptqmodel", "gptq", "FP8_DYNAMIC"))
