"""What one stored Linear is, from its tensor headers: scheme, bits, group size; and its scales.

GPTQModel writes ``qweight/qzeros/scales[/g_idx]`` (GPTQ packs along the input dimension, AWQ
along the output one); llm-compressor writes ``weight_packed/weight_scale/weight_shape``
(pack-quantized, with ``weight_zero_point`` when asymmetric, as its AWQ writes) or an FP8
``weight`` with ``weight_scale``; Transformers' fine-grained FP8 writes
``weight`` with ``weight_scale_inv``. Anything else with no float ``weight`` is not understood.
"""

from __future__ import annotations

from dataclasses import dataclass

from .source import SourceReader, TensorInfo

SCALE_LEAVES = ("scales", "weight_scale", "weight_scale_inv", "weight_global_scale")
FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class QuantFacts:
    """How one Linear is stored: ``scheme`` (float, gptq, awq, pack-quantized, fp8, int8, unknown),
    ``bits`` and ``group`` (an int group size, or ``channel``/``tensor``/``block AxB``)."""

    scheme: str
    bits: int | None = None
    group: int | str | None = None
    detail: str = ""  # why ``unknown``
    asymmetric: bool = False  # stored zero points (compressed-tensors ``weight_zero_point``)

    @property
    def quantized(self) -> bool:
        return self.scheme not in ("float", "unknown")

    def describe(self) -> str:
        if not self.quantized:
            return self.scheme
        group = f" group {self.group}" if isinstance(self.group, int) else f" {self.group}" if self.group else ""
        return f"{self.scheme} {self.bits}-bit{group}{' asymmetric' if self.asymmetric else ''}"


def _div(a: int, b: int) -> int | None:
    return a // b if b and a % b == 0 else None


def _group_of(in_features: int | None, groups: int) -> int | str | None:
    if in_features is None:
        return None
    return _div(in_features, groups)


def quant_facts(leaves: dict[str, TensorInfo], reader: SourceReader, default_bits: int | None) -> QuantFacts:
    """The storage facts of the Linear whose tensors (leaf name -> header) are ``leaves``."""
    if "qweight" in leaves and "scales" in leaves:
        qw, sc = leaves["qweight"].shape, leaves["scales"].shape
        if len(qw) != 2 or len(sc) != 2:
            return QuantFacts("unknown", detail=f"qweight {list(qw)} / scales {list(sc)} are not 2-D")
        if qw[1] == sc[1]:  # GPTQ: int32 rows pack 32/bits input features
            in_features = leaves["g_idx"].shape[0] if "g_idx" in leaves else None
            bits = _div(qw[0] * 32, in_features) if in_features else default_bits
            in_features = in_features or (_div(qw[0] * 32, bits) if bits else None)
            return QuantFacts("gptq", bits, _group_of(in_features, sc[0]))
        bits = _div(qw[1] * 32, sc[1])  # AWQ: int32 columns pack 32/bits output features
        return QuantFacts("awq", bits, _group_of(qw[0], sc[0]))
    if "weight_packed" in leaves and "weight_scale" in leaves:
        packed, scale = leaves["weight_packed"].shape, leaves["weight_scale"].shape
        in_features = None
        if "weight_shape" in leaves:  # two int64s: the only non-scale tensor read
            in_features = int(reader.tensor(leaves["weight_shape"])[-1])
        bits = _div(packed[-1] * 32, in_features) if in_features else default_bits
        group = _group_of(in_features, scale[-1] if len(scale) == 2 else 1)
        return QuantFacts("pack-quantized", bits, group, asymmetric="weight_zero_point" in leaves)
    weight = leaves.get("weight")
    if weight is None:
        return QuantFacts("unknown", detail=f"no weight tensor among {sorted(leaves)}")
    if weight.dtype in FLOAT_DTYPES and not any(leaf in leaves for leaf in SCALE_LEAVES):
        return QuantFacts("float")
    scale = leaves.get("weight_scale") or leaves.get("weight_scale_inv")
    if weight.dtype in FP8_DTYPES | {"I8"} and scale is not None:
        scheme = "int8" if weight.dtype == "I8" else "fp8"
        if scale.numel == 1:
            group: int | str | None = "tensor"
        elif len(scale.shape) == 2 and scale.shape[1] == 1:
            group = "channel"
        elif len(scale.shape) == 2 and len(weight.shape) == 2:
            group = f"block {_div(weight.shape[0], scale.shape[0])}x{_div(weight.shape[1], scale.shape[1])}"
        else:
            group = _group_of(weight.shape[-1], scale.shape[-1])
        return QuantFacts(scheme, 8, group)
    return QuantFacts("unknown", detail=f"weight {weight.dtype} with {sorted(set(leaves) - {'weight'})}")


def scale_problems(leaves: dict[str, TensorInfo], reader: SourceReader) -> list[str]:
    """Non-finite or zero entries of the scale tensors among ``leaves`` (reads only those)."""
    problems = []
    for leaf in SCALE_LEAVES:
        info = leaves.get(leaf)
        if info is None:
            continue
        values = reader.tensor(info).float()
        reader.maybe_release()
        nan, inf, zero = int(values.isnan().sum()), int(values.isinf().sum()), int((values == 0).sum())
        for count, what in ((nan, "NaN"), (inf, "infinite"), (zero, "zero")):
            if count:
                problems.append(f"{leaf} has {count} {what} value(s) of {values.numel()}")
    return problems

