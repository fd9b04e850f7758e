"""Fine-grained FP8 (Transformers' ``quant_method: fp8``) experts, defused and kept FP8.

Transformers loads these checkpoints (fused ``experts.gate_up_proj`` float8_e4m3fn ``[E, 2I, H]``
with ``gate_up_proj_scale_inv`` ``[E, 2I/bn, H/bk]``, or per-expert keys it merges) into its own
fused ``FP8Experts``. ``defuse_fp8_experts`` turns each of those into a ``DefusedFP8Experts``: the
project's ``DefusedExperts`` whose per-expert ``gate_proj``/``up_proj``/``down_proj`` are
Transformers' own ``FP8Linear``, with ``weight`` and ``weight_scale_inv`` (and static
``activation_scale``) zero-copy views of the fused tensors, and a forward that is ``FP8Experts``'
eager loop (float32 accumulation, the block's own ``_apply_gate``).

Without a CUDA/XPU device (or below compute capability 8.9) Transformers has no FP8 kernels and
forces ``dequantize=True``; and in that mode it loads *fused* FP8 expert tensors without their
scales (the ``*_scale_inv`` keys are reported unexpected, the raw FP8 values become the weights).
``load_fp8`` therefore refuses such a load unless dequantization was asked for explicitly
(``quantization_config=FineGrainedFP8Config(dequantize=True)``), and then applies the scales of
fused expert tensors itself before defusing the float model.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.defuse import convert_model
from ..core.defused import DefusedExpert, DefusedExperts, FusedTensorSpec, GateFunction
from ..core.layout import ExpertLayout
from ..core.naming import projection_names
from ..core.patching import is_patched
from .errors import LoadError

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
DEQUANTIZE_HINT = "quantization_config=FineGrainedFP8Config(dequantize=True)"
_EXPERT_SEGMENT = re.compile(r"(^|\.)experts(\.|$)")


def fp8_experts_class() -> type[nn.Module] | None:
    """Transformers' ``FP8Experts`` (None when the installed Transformers has none)."""
    try:
        from transformers.integrations.finegrained_fp8 import FP8Experts
    except ImportError:  # pragma: no cover - Transformers without fine-grained FP8
        return None
    return FP8Experts


def is_fp8_experts(module: nn.Module) -> bool:
    """True for a (fused) Transformers ``FP8Experts`` block."""
    cls = fp8_experts_class()
    return cls is not None and isinstance(module, cls)


class DefusedFP8Experts(DefusedExperts):
    """A defused ``FP8Experts``: per-expert ``FP8Linear`` views, ``FP8Experts``' eager forward.

    ``fuse_model`` refuses it (its projections are not ``nn.Linear``): FP8 experts are not
    re-fused; reload the checkpoint for the fused ``FP8Experts``.
    """

    block_size: tuple[int, int] | None = None
    activation_scheme: str = "dynamic"

    def new_output(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``FP8Experts`` accumulates in float32."""
        return torch.zeros_like(hidden_states, dtype=torch.float32)

    def routed_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Operation for operation ``FP8Experts.forward`` (eager): routing indices past the experts
        (expert-parallel sentinels) are skipped, outputs summed in float32, cast back at the end."""
        final_hidden_states = self.new_output(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero(as_tuple=False).view(-1)
        for expert_idx in expert_hit.tolist():
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            proj_out = self[expert_idx](hidden_states[token_idx])
            routing_weights = top_k_weights[token_idx, top_k_pos, None]
            weighted_out = proj_out * routing_weights.to(proj_out.dtype)
            final_hidden_states.index_add_(0, token_idx, weighted_out.to(final_hidden_states.dtype))
        return final_hidden_states.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 block_size={self.block_size}, activation_scheme={self.activation_scheme}"


@dataclass
class _Plan:
    path: str
    module: nn.Module
    block: DefusedFP8Experts
    fused_names: tuple[str, ...]


def _refuse(path: str, what: str) -> LoadError:
    return LoadError(
        f"{path} (FP8Experts): {what}; defuser-quant does not model that FP8 variant, so the block is not defused. "
        "Use the fused FP8Experts from stock from_pretrained, or load it dequantized with " + DEQUANTIZE_HINT
    )


def _fp8_linear(weight: torch.Tensor, scale_inv: torch.Tensor, act_scale: torch.Tensor | None,
                block_size: tuple[int, int], scheme: str, scale_fmt: str, requires_grad: bool, deepgemm_off: bool) -> nn.Module:
    """Transformers' ``FP8Linear`` around existing tensors (built on meta: nothing allocated)."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    out_features, in_features = weight.shape
    with torch.device("meta"):
        linear = FP8Linear(in_features, out_features, block_size=block_size, activation_scheme=scheme, scale_fmt=scale_fmt)
    linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
    linear.weight_scale_inv = nn.Parameter(scale_inv, requires_grad=scale_inv.is_floating_point() and requires_grad)
    if act_scale is not None:
        linear.activation_scale = nn.Parameter(act_scale, requires_grad=False)
    linear._hf_quantized_needs_local_tp = True
    if deepgemm_off:
        linear._deepgemm_disabled = True
    return linear


def plan_fp8_block(path: str, module: nn.Module, model_type: str | None = None) -> _Plan:
    """Validate one ``FP8Experts`` and build its ``DefusedFP8Experts`` (views only; ``module`` unchanged).

    Raises ``LoadError`` for what it does not model: a bias, per-tensor (no block) scales, weights
    that are not float8_e4m3fn (FP4 experts), a gate/up split inside a scale block
    (``I % block_n != 0``), scale grids of another shape, or any extra parameter or child.
    """
    has_gate = bool(getattr(module, "has_gate", True))
    in_name = "gate_up_proj" if has_gate else "up_proj"
    block_size = getattr(module, "block_size", None)
    if getattr(module, "has_bias", False) or any(
        getattr(module, f"{n}_bias", None) is not None for n in (in_name, "down_proj")
    ):
        raise _refuse(path, "it has expert biases")
    if block_size is None:
        raise _refuse(path, "its scales are per tensor (weight_block_size is None), not per block")
    bn, bk = (int(b) for b in block_size)
    scheme = getattr(module, "activation_scheme", "dynamic")
    static = scheme == "static"
    if scheme not in ("dynamic", "static"):
        raise _refuse(path, f"activation_scheme {scheme!r}")
    if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
        raise _refuse(path, "its layout is transposed or interleaved")
    names = [in_name, f"{in_name}_scale_inv", "down_proj", "down_proj_scale_inv"]
    if static:
        names += ["gate_up_proj_activation_scale", "down_proj_activation_scale"]
    params = dict(module.named_parameters(recurse=False))
    extra = sorted((set(params) | {n for n, _ in module.named_buffers(recurse=False)}) - set(names))
    missing = [n for n in names if n not in params]
    if extra or missing:
        raise _refuse(path, f"it holds {extra} and lacks {missing}" if missing else f"it holds {extra}")
    for name, child in module.named_children():
        if name != "act_fn" or next(child.parameters(), None) is not None or next(child.buffers(), None) is not None:
            raise _refuse(path, f"it has a child module {name!r} ({type(child).__name__})")
    w_in, s_in, w_down, s_down = (params[n] for n in names[:4])
    for name, w in ((in_name, w_in), ("down_proj", w_down)):
        if w.dtype != FP8_DTYPE:
            raise _refuse(path, f"{name} is {w.dtype}, not float8_e4m3fn (FP4 or dequantized experts)")
        if w.dim() != 3:
            raise _refuse(path, f"{name} has shape {list(w.shape)}, not [E, out, in]")
    experts, rows, hidden = w_in.shape
    inter = rows // 2 if has_gate else rows
    if tuple(w_down.shape) != (experts, hidden, inter):
        raise _refuse(path, f"{in_name} {list(w_in.shape)} and down_proj {list(w_down.shape)} disagree")
    if has_gate and inter % bn:
        raise _refuse(path, f"the intermediate size {inter} is not a multiple of the block size {bn}, so a scale block spans gate and up rows")
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    want = {f"{in_name}_scale_inv": (experts, cdiv(rows, bn), cdiv(hidden, bk)),
            "down_proj_scale_inv": (experts, cdiv(hidden, bn), cdiv(inter, bk))}
    for name, shape in want.items():
        if tuple(params[name].shape) != shape:
            raise _refuse(path, f"{name} has shape {list(params[name].shape)}, expected {list(shape)} for block size {[bn, bk]}")
    if static:
        for name in names[4:]:
            if tuple(params[name].shape) != (experts,):
                raise _refuse(path, f"{name} has shape {list(params[name].shape)}, expected [{experts}]")
    ue8m0 = getattr(torch, "float8_e8m0fnu", None)
    if s_in.dtype != s_down.dtype or s_in.dtype not in (torch.float32, ue8m0):
        raise _refuse(path, f"its scales are {s_in.dtype} and {s_down.dtype}, not both float32 or both float8_e8m0fnu (ue8m0)")
    scale_fmt = "float" if s_in.dtype == torch.float32 else "ue8m0"
    config = getattr(module, "config", None)
    names_ = projection_names(getattr(config, "model_type", None), has_gate, model_type)
    deepgemm_off = bool(getattr(module, "_deepgemm_disabled", False))
    layout = ExpertLayout(has_gate=has_gate, has_bias=False, is_transposed=False, is_concatenated=True)
    gate_fn = GateFunction(module, layout)
    act_in = params["gate_up_proj_activation_scale"].detach() if static else None
    act_down = params["down_proj_activation_scale"].detach() if static else None
    w_in_d, s_in_d, w_down_d, s_down_d = (t.detach() for t in (w_in, s_in, w_down, s_down))
    sb = inter // bn if has_gate else 0
    expert_modules = []
    for e in range(experts):
        make = lambda w, s, a: _fp8_linear(w, s, a, (bn, bk), scheme, scale_fmt, w_in.requires_grad, deepgemm_off)  # noqa: E731
        projections = {}
        if has_gate:
            projections[names_.gate] = make(w_in_d[e, :inter], s_in_d[e, :sb], None if act_in is None else act_in[e])
            projections[names_.up] = make(w_in_d[e, inter:], s_in_d[e, sb:], None if act_in is None else act_in[e])
        else:
            projections[names_.up] = make(w_in_d[e], s_in_d[e], None if act_in is None else act_in[e])
        projections[names_.down] = make(w_down_d[e], s_down_d[e], None if act_down is None else act_down[e])
        expert_modules.append(DefusedExpert(names_, projections, gate_fn))
    specs = {
        in_name: FusedTensorSpec(in_name, tuple(w_in.shape), False, w_in.requires_grad, False),
        "down_proj": FusedTensorSpec("down_proj", tuple(w_down.shape), False, w_down.requires_grad, False),
    }
    block = DefusedFP8Experts(module, layout, names_, expert_modules, specs)
    block.block_size = (bn, bk)
    block.activation_scheme = scheme
    return _Plan(path, module, block, tuple(names))


def defuse_fp8_experts(model: nn.Module) -> list[str]:
    """Replace every ``FP8Experts`` of ``model`` by a ``DefusedFP8Experts`` (zero copy), in place.

    All or nothing: every block is validated before any is replaced; ``LoadError`` names the first
    block that cannot be defused and the model is left as it was. Returns the converted paths.
    """
    plans = [plan_fp8_block(path, module) for path, module in model.named_modules() if is_fp8_experts(module)]
    _apply(model, plans)
    return [p.path for p in plans]


def _apply(model: nn.Module, plans: list[_Plan]) -> None:
    """Swap the planned blocks in (nothing here can fail half way: plans are validated)."""
    for plan in plans:
        parent_path, _, attr = plan.path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, plan.block)
        for name in plan.fused_names:  # the shell keeps its config and gate, not the tensors (views live on)
            del plan.module._parameters[name]
    if plans:
        logger.info("defused %d FP8Experts block(s), experts kept FP8", len(plans))


# ----- load --------------------------------------------------------------------------------------


def _requested_dequantize(qcfg: Any, kwargs: dict[str, Any]) -> bool:
    user = kwargs.get("quantization_config")
    if user is not None and hasattr(user, "dequantize"):
        return bool(user.dequantize)
    return bool(qcfg.get("dequantize", False) if isinstance(qcfg, dict) else getattr(qcfg, "dequantize", False))


def _fp8_device_problem() -> str | None:
    """Why Transformers would dequantize FP8 weights here, or None when it keeps them FP8."""
    xpu = getattr(torch, "xpu", None)
    if not torch.cuda.is_available() and not (xpu is not None and xpu.is_available()):
        return "there is no CUDA or XPU device (Transformers has no CPU FP8 kernels and would load them dequantized)"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            return f"the GPU has compute capability {major}.{minor}, below the 8.9 Transformers' FP8 kernels need (it would dequantize them)"
    return None


def _expert_key_problems(info: dict, allowed_unexpected: set[str]) -> list[str]:
    problems = []
    for kind in ("missing_keys", "unexpected_keys"):
        keys = sorted(k for k in info.get(kind, ()) if _EXPERT_SEGMENT.search(k) and k not in allowed_unexpected)
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')}: {', '.join(keys[:4])}")
    mismatched = sorted(k[0] for k in info.get("mismatched_keys", ()) if _EXPERT_SEGMENT.search(k[0]))
    if mismatched:
        problems.append(f"{len(mismatched)} mismatched keys: {', '.join(mismatched[:4])}")
    return problems


def _fused_fp8_in_file(root: Path) -> dict[str, tuple[str, str, str]]:
    """``{fused expert tensor: (its file, its scale key, the scale's file)}`` for 3-D FP8 tensors
    stored with a ``<name>_scale_inv``."""
    from ..checkpoint.source import read_headers, shard_files

    headers = read_headers(root, shard_files(root))
    return {
        name: (info.file, f"{name}_scale_inv", headers[f"{name}_scale_inv"].file) for name, info in headers.items()
        if info.dtype == "F8_E4M3" and len(info.shape) == 3 and f"{name}_scale_inv" in headers
    }


def _read_tensor(root: Path, file: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(root / file), "pt") as f:
        return f.get_tensor(key)


def _apply_fused_scales(model: nn.Module, root: Path, unexpected: set[str]) -> list[str]:
    """Dequantize fused FP8 expert tensors Transformers loaded without their scales, in place.

    Only tensors whose ``*_scale_inv`` key Transformers reported unexpected, and only when the
    loaded values are exactly the stored FP8 values (so a Transformers that applies the scales
    itself is never scaled twice). Returns the fixed parameter names.
    """
    fixed = []
    for name, (file, scale_key, scale_file) in sorted(_fused_fp8_in_file(root).items()):
        if scale_key not in unexpected:
            continue
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise LoadError(
                f"{root}: the fused FP8 tensor {name} has no parameter of that name in the model, so its scales "
                "cannot be applied; load it on a GPU (kept FP8)"
            ) from None
        stored = _read_tensor(root, file, name)
        scales = _read_tensor(root, scale_file, scale_key).float()
        if tuple(stored.shape) != tuple(param.shape):
            raise LoadError(f"{root}: {name} is {list(stored.shape)} in the file but {list(param.shape)} in the model")
        rows, cols = stored.shape[-2:]
        bn, bk = -(-rows // scales.shape[-2]), -(-cols // scales.shape[-1])
        with torch.no_grad():
            for e in range(stored.shape[0]):  # one expert at a time: bounded float32 scratch
                raw = stored[e].to(param.dtype)
                if not torch.equal(param[e].detach().cpu(), raw):
                    raise LoadError(
                        f"{root}: {name} did not load as its raw FP8 values while its scales were left unused; "
                        "this Transformers dequantizes differently than defuser-quant knows: not loading it"
                    )
                scale = scales[e].repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]
                param[e].copy_((stored[e].float() * scale).to(param.dtype))
        fixed.append(name)
    return fixed


def load_fp8(root: Path, config: Any, cls: type, kwargs: dict[str, Any]) -> tuple[nn.Module, int]:
    """Load a fine-grained FP8 checkpoint with experts defused: kept FP8 (``DefusedFP8Experts``) on a
    device with FP8 kernels, or dequantized to float when ``FineGrainedFP8Config(dequantize=True)``
    is passed. Returns the model and how many expert projections are FP8."""
    qcfg = config.quantization_config
    dequantize = _requested_dequantize(qcfg, kwargs)
    if is_patched(config.model_type):
        raise LoadError(
            f"{root}: {config.model_type!r} is patched by replace_fused_blocks, but FP8 checkpoints load through "
            "Transformers' FP8Experts and are defused after loading: call restore_fused_blocks() before defuser_quant.load"
        )
    if not dequantize:
        problem = _fp8_device_problem()
        if problem is not None:
            raise LoadError(
                f"{root}: this FP8 checkpoint's experts stay FP8 only on a CUDA/XPU device with FP8 kernels, and {problem}; "
                f"load it on such a GPU (device_map='cuda'), or pass {DEQUANTIZE_HINT} to load it dequantized to float"
            )
    model, info = cls.from_pretrained(str(root), **{**kwargs, "output_loading_info": True})
    unexpected = set(info.get("unexpected_keys", ()))
    allowed = set()
    if dequantize:
        fixed = _apply_fused_scales(model, root, unexpected)
        if fixed:
            logger.info(
                "%s: applied the block scales of %d fused FP8 expert tensor(s) Transformers' dequantize path loads "
                "without them (its load report lists their *_scale_inv as UNEXPECTED)", root, len(fixed),
            )
        allowed = {f"{name}_scale_inv" for name in fixed}
        allowed |= {k for k in unexpected if k.endswith("activation_scale")}  # dequantized: activations float
    problems = _expert_key_problems(info, allowed)
    if problems:
        raise LoadError(
            f"{root}: expert tensors of the checkpoint did not load as stored ({'; '.join(problems)}); "
            "check it with `defuser-quant check CKPT`"
        )
    fp8_blocks = [p for p, m in model.named_modules() if is_fp8_experts(m)]
    if not dequantize and not fp8_blocks:
        raise LoadError(
            f"{root}: no experts block loaded as Transformers' FP8Experts (the FP8 integration dequantized them or "
            f"does not cover this family); pass {DEQUANTIZE_HINT} to load it as float on purpose"
        )
    plans = [plan_fp8_block(p, model.get_submodule(p), config.model_type) for p in fp8_blocks]
    # Everything else (float experts the FP8 config left out, or all of them when dequantized) the usual way.
    convert_model(model, filter=[f"-:^{re.escape(p)}$" for p in fp8_blocks], show_progress=False)
    _apply(model, plans)
    count = sum(
        1 for plan in plans for expert in plan.block for name in expert.names.as_tuple()
        if getattr(expert, name).weight.dtype == FP8_DTYPE
    )
    if dequantize:
        logger.info("%s: FP8 experts dequantized to %s on request", root, next(model.parameters()).dtype)
    return model, count
