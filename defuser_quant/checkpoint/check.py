"""``check_checkpoint``: is a (quantized) MoE checkpoint fit to serve? Headers and scales only.

Where the experts blocks are, how many experts each has and what the family's per-expert
checkpoints call their projections come from the model built on ``meta`` (the same planner
``convert_model`` uses); what is stored comes from the safetensors headers. Only scale tensors
(and pack-quantized's two-element ``weight_shape``) are read, never a weight.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .check_quant import QuantFacts, quant_facts, scale_problems
from .errors import CheckpointError
from .meta import ExpertBlock, build_meta_model, load_config, scan_blocks
from .source import SourceReader, TensorInfo, read_headers, shard_files

logger = logging.getLogger(__name__)
TARGETS = ("vllm", "transformers")
LOAD_LINE = "import defuser_quant; model = defuser_quant.load({path!r})"
_FUSED_QUANT_LEAVES = re.compile(r"(qweight|qzeros|scales|g_idx|weight_packed|weight_scale|weight_shape|weight_zero_point)$")


@dataclass(frozen=True)
class Problem:
    """One reason the checkpoint is not fit: ``where`` (a module path) and ``what``."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class CheckResult:
    """The verdict of ``check_checkpoint``; ``fit`` when there is no problem."""

    checkpoint: str
    target: str
    quantization: str  # the config's quant_method, or "none"
    layout: str  # per-expert, fused or mixed
    blocks: int = 0
    experts: int = 0
    projections: int = 0
    quantized: int = 0
    schemes: dict[str, int] = field(default_factory=dict)  # description -> expert projections
    not_quantized: list[Problem] = field(default_factory=list)  # expert projections left float, with the reason
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fit(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "checkpoint": self.checkpoint,
            "target": self.target,
            "fit": self.fit,
            "quantization": self.quantization,
            "layout": self.layout,
            "blocks": self.blocks,
            "experts": self.experts,
            "expert_projections": self.projections,
            "expert_projections_quantized": self.quantized,
            "schemes": self.schemes,
            "not_quantized": [{"where": p.where, "reason": p.what} for p in self.not_quantized],
            "problems": [{"where": p.where, "what": p.what} for p in self.problems],
            "notes": self.notes,
        }

    def summary(self) -> str:
        schemes = ", ".join(f"{n} {d}" for d, n in self.schemes.items())
        lines = [
            f"{self.checkpoint}: {'fit' if self.fit else 'NOT fit'} for {self.target}; {self.blocks} experts block(s), "
            f"{self.experts} experts, {self.layout}; expert projections {self.quantized}/{self.projections} quantized ({schemes})"
        ]
        lines += [f"  not quantized: {p.where}: {p.what}" for p in self.not_quantized[:20]]
        if len(self.not_quantized) > 20:
            lines.append(f"  not quantized: (+{len(self.not_quantized) - 20} more; --json lists all)")
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _quant_config(config: Any) -> dict[str, Any]:
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is None:
        return {}
    return dict(qcfg) if isinstance(qcfg, dict) else qcfg.to_dict()


def _default_bits(qcfg: dict[str, Any]) -> int | None:
    if "bits" in qcfg:
        return qcfg["bits"]
    for group in (qcfg.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if weights.get("num_bits"):
            return weights["num_bits"]
    return None


def excluded_by_config(module: str, qcfg: dict[str, Any]) -> str | None:
    """Why ``quantization_config`` leaves ``module`` unquantized, or None when it does not."""
    for entry in qcfg.get("ignore") or []:  # compressed-tensors: names or "re:<regex>"
        if entry == module or (entry.startswith("re:") and re.match(entry[3:], module)):
            return f"quantization_config.ignore has {entry!r}"
    for entry in qcfg.get("modules_to_not_convert") or []:
        if _skipped_by(module, entry):
            return f"quantization_config.modules_to_not_convert has {entry!r}"
    for rule in qcfg.get("dynamic") or {}:  # GPTQModel: "-:<regex>" skips matching modules
        if rule.startswith("-:") and re.match(rule[2:], module):
            return f"quantization_config.dynamic has {rule!r}"
    return None


def _skipped_by(module: str, entry: str) -> bool:
    """True when Transformers' quantizers leave ``module`` unconverted for the ``modules_to_not_convert``
    entry (their ``should_convert_module``: a prefix, a regex matched at the start, or a name suffix,
    so AutoAWQ-style ``["gate", "down_proj"]`` covers every ``...down_proj``)."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # pragma: no cover - older Transformers: prefix semantics
        return module == entry or module.startswith(entry + ".")
    try:
        return not should_convert_module(module, [entry])
    except re.error:  # an entry that is no valid regex: Transformers would raise on it; compare literally
        return module == entry or module.startswith(entry + ".") or module.endswith(entry)


def model_named(infos: dict[str, TensorInfo], model: Any) -> dict[str, TensorInfo]:
    """``infos`` keyed by the model's names: the renamings of the model's checkpoint conversion mapping
    applied as ``from_pretrained`` applies them (merges are not: per-expert keys stay per-expert)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    renamed: dict[str, TensorInfo] = {}
    for name, info in infos.items():
        key = rename_source_key(name, renamings, [])[0] if renamings else name
        if key in renamed:
            raise CheckpointError(f"tensors {renamed[key].name} and {name} both map to {key}")
        renamed[key] = info
    return renamed


_FP8_NOTES = {
    "per-expert": (
        "{block}: stock Transformers merges these fine-grained FP8 experts into its fused FP8Experts (kept FP8 on a GPU "
        "with FP8 kernels, dequantized into float fused tensors elsewhere); to load them defused and FP8: {line}"
    ),
    "fused": (
        "{block}: stock Transformers keeps these fused FP8 experts in its FP8Experts on a GPU with FP8 kernels; where it "
        "dequantizes instead (no CUDA/XPU device, compute capability < 8.9, or dequantize=True), Transformers (5.17 through 5.25 checked) leaves "
        "their *_scale_inv unused and loads the raw FP8 values as weights (wrong outputs, a load-report warning only); "
        "defuser_quant.load refuses there, or applies the scales with FineGrainedFP8Config(dequantize=True); "
        "defused and FP8: {line}"
    ),
}


def _fused_fp8_scheme(weight: TensorInfo, scale: TensorInfo | None) -> str | None:
    """``fp8 8-bit block AxB`` for a fused FP8 experts tensor ``[E, R, C]`` with a ``[E, r, c]`` ``*_scale_inv``."""
    if scale is None or not weight.dtype.startswith("F8") or len(weight.shape) != 3 or len(scale.shape) != 3:
        return None
    rows, cols = weight.shape[1] // max(scale.shape[1], 1), weight.shape[2] // max(scale.shape[2], 1)
    return f"fp8 8-bit block {rows}x{cols}"


class _Checker:
    def __init__(self, root: Path, target: str):
        self.root = root
        self.target = target
        config = load_config(root, local_only=True)
        self.qcfg = _quant_config(config)
        self.method = self.qcfg.get("quant_method", "none")
        self.bits = _default_bits(self.qcfg)
        model = build_meta_model(config)
        self.blocks = scan_blocks(model).blocks
        # Checkpoint names -> the model's (mixtral stores ``block_sparse_moe`` for the model's ``mlp``).
        self.infos = model_named(read_headers(root, shard_files(root)), model)
        self.modules: dict[str, dict[str, TensorInfo]] = defaultdict(dict)
        for name, info in self.infos.items():
            module, _, leaf = name.rpartition(".")
            self.modules[module][leaf] = info
        if not self.blocks:
            raise CheckpointError(f"{root}: {type(config).__name__} has no fused experts blocks; nothing for check to verify")
        self.result = CheckResult(str(root), target, self.method, "per-expert")
        self.facts: dict[str, QuantFacts] = {}

    def problem(self, where: str, what: str) -> None:
        self.result.problems.append(Problem(where, what))

    def facts_of(self, module: str, reader: SourceReader) -> QuantFacts:
        if module not in self.facts:
            leaves = self.modules[module]
            facts = quant_facts(leaves, reader, self.bits)
            if facts.scheme == "unknown":
                self.problem(module, f"stored tensors not understood ({facts.detail})")
            for what in scale_problems(leaves, reader):
                self.problem(module, what)
            self.facts[module] = facts
        return self.facts[module]

    def run(self) -> CheckResult:
        layouts = set()
        with SourceReader(self.root) as reader:
            for block in self.blocks:
                layouts.add(self.check_block(block, reader))
            self.check_units(reader)
        if len(layouts) > 1:
            self.problem("checkpoint", "experts blocks are stored in different layouts (per-expert and fused)")
        self.result.layout = "mixed" if len(layouts) > 1 else layouts.pop()
        if not self.qcfg:
            self.result.notes.append("the checkpoint is not quantized (no quantization_config)")
        return self.result

    def check_block(self, block: ExpertBlock, reader: SourceReader) -> str:
        prefix = block.path + "."
        experts: dict[int, set[str]] = defaultdict(set)
        fused: list[str] = []
        for name in self.infos:
            if name.startswith(prefix):
                head, _, rest = name[len(prefix):].partition(".")
                if head.isdigit():
                    experts[int(head)].add(rest.partition(".")[0])
                else:
                    fused.append(name)
        self.result.blocks += 1
        if experts and fused:
            self.problem(block.path, f"both per-expert and fused tensors stored ({fused[0]}): one layout per block")
        if fused and not experts:
            self.check_fused(block, fused, reader)
            return "fused"
        if not experts:
            self.problem(block.path, f"no tensors stored for this experts block (expected {block.path}.0.{block.names.up}...)")
            return "per-expert"
        self.check_per_expert(block, experts, reader)
        return "per-expert"

    def check_per_expert(self, block: ExpertBlock, experts: dict[int, set[str]], reader: SourceReader) -> None:
        names = block.names.as_tuple()
        count = block.shapes.num_experts
        self.result.experts += count
        slabs = max((block.slab_count(t) for t in block.tensors), default=count)  # longcat_flash: + identity experts
        unread = sorted(i for i in set(experts) - set(range(count)) if i < slabs)
        if unread:
            self.result.notes.append(f"{block.path}: {len(unread)} weightless (identity) experts' slabs stored; nothing reads them")
        for index in sorted(set(experts) - set(range(slabs))):
            self.problem(f"{block.path}.{index}", f"expert index beyond the {count} experts the config declares")
        schemes: dict[str, set[str]] = defaultdict(set)
        for index in range(count):
            where = f"{block.path}.{index}"
            if index not in experts:
                self.problem(where, "expert missing: none of its tensors are stored")
                continue
            for extra in sorted(experts[index] - set(names)):
                self.problem(f"{where}.{extra}", f"unexpected projection name: per-expert checkpoints of this family name them {'/'.join(names)}")
            for name in names:
                if name not in experts[index]:
                    self.problem(f"{where}.{name}", "projection missing")
                    continue
                schemes[name].add(self.count_projection(f"{where}.{name}", reader).describe())
            if block.names.gate and {block.names.gate, block.names.up} <= experts[index]:
                self.same_scheme(where, [f"{where}.{block.names.gate}", f"{where}.{block.names.up}"], "gate and up", reader)
        for name, found in schemes.items():
            if len(found) > 1:
                self.problem(f"{block.path}.*.{name}", f"experts of one layer quantized differently ({', '.join(sorted(found))}): engines run a layer's experts as one kernel")
        self.transformers_verdict(block, "per-expert")

    def count_projection(self, module: str, reader: SourceReader) -> QuantFacts:
        facts = self.facts_of(module, reader)
        self.result.projections += 1
        self.result.schemes[facts.describe()] = self.result.schemes.get(facts.describe(), 0) + 1
        if facts.quantized:
            self.result.quantized += 1
        elif facts.scheme == "float" and self.qcfg:
            reason = excluded_by_config(module, self.qcfg)
            if reason is None:
                self.problem(module, f"left unquantized ({self.modules[module]['weight'].dtype}) in a {self.method} checkpoint, and quantization_config does not exclude it")
            else:
                self.result.not_quantized.append(Problem(module, reason))
        return facts

    def same_scheme(self, where: str, modules: list[str], unit: str, reader: SourceReader) -> None:
        described = {m: self.facts_of(m, reader) for m in modules}
        kinds = {(f.scheme, f.bits, f.group, f.asymmetric) for f in described.values()}
        if len(kinds) > 1:
            parts = ", ".join(f"{m.rpartition('.')[2]} {f.describe()}" for m, f in described.items())
            self.problem(where, f"{unit} quantized differently ({parts}): serving engines fuse them into one matrix")

    def check_fused(self, block: ExpertBlock, fused: list[str], reader: SourceReader) -> None:
        self.result.experts += block.shapes.num_experts
        expected = {block.path + "." + t.path for t in block.tensors}
        for name in sorted(fused):
            info = self.infos[name]
            if name in expected and info.dtype in ("BF16", "F16", "F32", "F8_E4M3", "F8_E5M2"):
                self.result.projections += 1
                self.result.quantized += info.dtype.startswith("F8")
                scheme = _fused_fp8_scheme(info, self.infos.get(f"{name}_scale_inv")) or info.dtype
                self.result.schemes[scheme] = self.result.schemes.get(scheme, 0) + 1
            elif name.endswith("_scale_inv") and name.removesuffix("_scale_inv") in expected:
                for what in scale_problems({"weight_scale_inv": info}, reader):
                    self.problem(name, what)
            elif _FUSED_QUANT_LEAVES.search(name) or name not in expected:
                self.problem(name, "fused packed/unknown experts key: no per-expert loader of a serving engine or Transformers maps it; write per-expert experts")
        for missing in sorted(expected - set(fused)):
            self.problem(missing, "fused experts tensor missing")
        if self.target == "vllm":
            self.result.notes.append(f"{block.path}: stored fused ({block.description}); serving engines load per-expert names, see `defuser-quant convert --to per-expert`")
        self.transformers_verdict(block, "fused")

    def transformers_verdict(self, block: ExpertBlock, layout: str) -> None:
        if self.target != "transformers":
            return
        line = LOAD_LINE.format(path=str(self.root))
        if self.method == "fp8" and (layout == "fused" or block.stock_per_expert):  # FP8Experts on a GPU, float elsewhere
            self.result.notes.append(_FP8_NOTES[layout].format(block=block.path, line=line.removesuffix(")") + ", device_map='cuda')"))
            return
        if layout != "per-expert":
            return
        if self.method in ("gptq", "awq"):
            self.problem(block.path, f"stock Transformers would load these {self.method} experts randomly initialised (per-expert quantized tensors do not map onto fused experts); use: {line}")
        elif not block.stock_per_expert:  # quantized or not: nothing maps the per-expert keys
            self.problem(block.path, f"stock Transformers does not map this family's per-expert checkpoint: experts would be randomly initialised; use: {line}")
        elif self.method != "none":
            self.result.notes.append(f"{block.path}: stock Transformers would dequantize these {self.method} experts into float fused tensors; to keep them quantized: {line}")

    def check_units(self, reader: SourceReader) -> None:
        """Outside the experts: q/k/v of an attention and gate/up of a dense MLP share a scheme."""
        inside = tuple(b.path + "." for b in self.blocks)
        parents: dict[str, set[str]] = defaultdict(set)
        for module in self.modules:
            if not module.startswith(inside):
                parent, _, leaf = module.rpartition(".")
                parents[parent].add(leaf)
        for parent, leaves in sorted(parents.items()):
            for unit in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
                if set(unit) <= leaves:
                    self.same_scheme(parent, [f"{parent}.{leaf}" for leaf in unit], "/".join(unit), reader)


def check_checkpoint(path: str | Path, target: str = "vllm") -> CheckResult:
    """Verify the checkpoint directory ``path`` for ``target`` (``vllm``: serving engines' per-expert
    loaders; ``transformers``: also what stock Transformers would do with the experts).

    Raises ``CheckpointError`` on bad input (no directory, no config, not safetensors, not MoE).
    """
    if target not in TARGETS:
        raise CheckpointError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    return _Checker(root, target).run()


def job_verdict(output_dir: str | Path, target: str = "vllm", limit: int = 50) -> dict[str, Any]:
    """``check_checkpoint`` of a job's output as a ``job.json`` section (problems capped at ``limit``);
    a check that cannot run says why instead of failing the job whose result is already written."""
    try:
        result = check_checkpoint(output_dir, target)
    except Exception as exc:  # noqa: BLE001 - the job's result is written: a failing check must not lose it
        logger.warning("defuser-quant check of %s could not run: %s", output_dir, exc)
        message = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
        return {"fit": None, "target": target, "error": message}
    verdict = result.to_dict()
    del verdict["checkpoint"], verdict["schema_version"]  # the job's output_dir; job.json has its own version
    verdict["problems_total"] = len(verdict["problems"])
    verdict["problems"] = verdict["problems"][:limit]
    verdict["not_quantized"] = verdict["not_quantized"][:limit]
    return verdict
