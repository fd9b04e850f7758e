"""Fingerprints of the Hessian each GPTQ solve starts from, per module: where two runs part.

Two runs of GPTQModel (stock and ours) give different checkpoints under ``--deterministic`` from
layer 0's k/v_proj on (docs/performance.md, round 12), though each part, tested alone, gives the
same bits. A module's packed weight depends on its Hessian and on the solve; comparing the
Hessians the solves start from tells which of the two differs first.

GPTQModel 7.6 finalizes a task's Hessian with ``GPTQ.finalize_hessian`` before solving it, on its
own per-module path and on our batched one alike; the first finalized 2-D Hessian of each module
(by its full name) is hashed (its float32 bytes, copied to the host: one device sync per module, so a
diagnostic, not a timing run). At the same moment the module's weight, which the solve reads next,
is hashed too (``weights``): equal Hessians and weights with unequal qweights put the difference in
the solve; an unequal weight puts it in how the layer was loaded.

Inside the solve, the inverse factor is printed too (``inverses``): every call of GPTQModel's
``GPTQ.hessian_inverse`` (stock's solve, once per shared-Hessian cohort) and of the batched solve's
``gptq_first_inverse`` (ours) maps the digest of the Hessian it is given (ordered, dead columns set,
before its damp) to the digest of the factor it returns. Two runs' factors for the same Hessian equal
put the difference in the column loop; unequal, in the inverse (``inverse_modules`` names, for stock,
the module whose solve computed it).

    with HessianPrints() as prints:
        model.quantize(...)
    row["hessian_prints"], row["weight_prints"] = prints.digests, prints.weights
    row["inverse_prints"], row["inverse_modules"] = prints.inverses, prints.inverse_modules
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

DIGEST_CHARS = 16


def digest(tensor: Any) -> str:
    """Hash of a tensor's values, dtype and shape (the same bytes on any device)."""
    import torch

    host = tensor.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=DIGEST_CHARS // 2)
    h.update(f"{host.dtype}{tuple(host.shape)}".encode())
    h.update(host.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class HessianPrints:
    """Records ``{task name: digest}`` of the Hessian (``digests``) and the weight (``weights``) of every
    GPTQ task finalized inside the block, then restores."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self.weights: dict[str, str] = {}  # {task name: digest of its module's weight at that moment}
        self.inverses: dict[str, str] = {}  # {digest of the Hessian an inverse is given: digest of its factor}
        self.inverse_modules: dict[str, str] = {}  # {that Hessian digest: the module whose solve computed it} (stock)
        self._lock = threading.Lock()
        self._originals: list[tuple[Any, str, Any]] = []  # (owner, attribute, original) of every patch

    def __enter__(self) -> HessianPrints:
        from gptqmodel.quantization.gptq import GPTQ

        original = GPTQ.finalize_hessian
        prints = self

        def finalize_hessian(task, *args, **kwargs):
            result = original(task, *args, **kwargs)
            named = getattr(task, "_named_module", None)  # its full name: task.name is the layer's relative one
            name = getattr(named, "full_name", None) or getattr(task, "name", None)
            if name is not None and getattr(result, "ndim", 0) == 2:
                with prints._lock:
                    known = name in prints.digests
                if not known:  # one digest (and device sync) per module
                    value = digest(result)
                    weight = getattr(getattr(task, "module", None), "weight", None)
                    weight_value = digest(weight.data) if weight is not None else None
                    with prints._lock:
                        if name not in prints.digests:  # another thread may have been first
                            prints.digests[name] = value
                            if weight_value is not None:
                                prints.weights[name] = weight_value
            return result

        self._originals = [(GPTQ, "finalize_hessian", original)]
        GPTQ.finalize_hessian = finalize_hessian
        self._patch_inverses(GPTQ)
        return self

    def _record_inverse(self, hessian_digest: str, factor: Any, module: str | None) -> None:
        if factor is None or getattr(factor, "ndim", 0) != 2:
            return
        value = digest(factor)
        with self._lock:
            self.inverses.setdefault(hessian_digest, value)
            if module is not None:
                self.inverse_modules.setdefault(hessian_digest, module)

    def _patch_inverses(self, GPTQ: Any) -> None:  # noqa: N803 - GPTQModel's class
        from defuser_quant.integrations.gptqmodel import batched

        stock_inverse, ours_inverse = GPTQ.hessian_inverse, batched.gptq_first_inverse
        prints = self

        def hessian_inverse(task, H, *args, **kwargs):
            key = digest(H)  # before the call: it adds its damp to H's diagonal (and takes it off again)
            result = stock_inverse(task, H, *args, **kwargs)
            named = getattr(task, "_named_module", None)
            prints._record_inverse(key, result[0] if isinstance(result, tuple) else result,
                                   getattr(named, "full_name", None) or getattr(task, "name", None))
            return result

        def gptq_first_inverse(H, damp):
            key = digest(H)  # before the call: it adds its damp to H's diagonal in place
            result = ours_inverse(H, damp)
            prints._record_inverse(key, result[0], None)
            return result

        self._originals += [(GPTQ, "hessian_inverse", stock_inverse), (batched, "gptq_first_inverse", ours_inverse)]
        GPTQ.hessian_inverse = hessian_inverse
        batched.gptq_first_inverse = gptq_first_inverse

    def __exit__(self, *exc: object) -> None:
        for owner, attribute, original in reversed(self._originals):
            setattr(owner, attribute, original)
        self._originals = []


def compare(base: dict[str, str], other: dict[str, str], first: int = 8,
            names: dict[str, str] | None = None) -> dict[str, Any]:
    """How many keys (modules) have equal digests, and the first differing ones in the order ``base``'s
    run recorded them (its solve order), each shown as ``names[key]`` where given."""
    names = names or {}
    common = [key for key in base if key in other]
    differ = [names.get(key, key) for key in common if base[key] != other[key]]
    return {"modules": len(common), "equal": len(common) - len(differ), "first_differing": differ[:first],
            "only_in_base": len(set(base) - set(other)), "only_in_other": len(set(other) - set(base))}


def compare_inverses(base: dict[str, str], other: dict[str, str], names: dict[str, str] | None = None,
                     first: int = 8) -> dict[str, Any]:
    """:func:`compare` for the inverse prints (keyed by Hessian digest): the Hessians both runs
    inverted, how many factors are equal, the first differing named by the base run's modules."""
    result = compare(base, other, first, names)
    return {"hessians": result.pop("modules"), **result}
