"""A whole Qwen3-30B-A3B-shape model (48 layers, random bf16 weights) quantized end to end in one process.

Builds a random qwen3_moe of Qwen3-30B-A3B shape (48 layers, 128 experts, hidden 2048,
moe_intermediate 768, top-8, 32/4 heads of 128, vocab 151936: ~61 GB in bf16, fits one 141 GB
H200) directly on the device in bf16 (no CPU init, no 61 GB save + reload), then runs GPTQ W4A16
(group 128) over 128 x 256 calibration tokens (the bundled corpus, tokenized by the shipped tiny
model's tokenizer) through ONE backend and saves the checkpoint:

* ``--backend llmcompressor``: llm-compressor 0.14 ``oneshot`` on the in-memory model with our
  ``DefuseModifier`` (routed, grouped expert GEMMs) before ``GPTQModifier``; ``--routing all``
  calibrates every expert on every token, as stock llm-compressor does (the like-for-like baseline);
* ``--backend gptqmodel``: GPTQModel 7.6 with our plugin (``install()`` +
  ``quantize_with_defuser(grouped=True, batched_solve=True)``). GPTQModel only loads from a path,
  so ``GPTQModel.load`` gets a folder holding the config and tokenizer only, and its Hugging Face
  weight loading (``gptqmodel.models.loader._hf_loader_from_pretrained_with_dynamic_module_retry``)
  is replaced, for this process, by the random build here; everything else of its load (our
  defusing, its model definition, the tokenizer) runs as shipped. The model is built on the GPU and
  then moved to the CPU (``--gptqmodel-model-device``), where GPTQModel's own loader puts every
  model it quantizes (``offload_to_disk=False``: a 61 GB disk offload would not fit the 64 GB disk).

``--stock`` runs the same backend as shipped, for the side-by-side baseline (``"variant": "stock"``;
the default output name gets ``_stock``): llm-compressor's ``oneshot`` with the same
``GPTQModifier`` and no ``DefuseModifier`` (``defuser_quant.integrations.llmcompressor`` is not
imported: llm-compressor linearizes the MoE itself and calibrates all experts, its default
``moe_calibrate_all_experts``); GPTQModel without ``install()`` (it defuses with the ``defuser``
package on load, after the random build replaces its weight loading) and a plain
``model.quantize`` with the same calibration rows, batch size and kernel. Stock runs give no
coverage report (``coverage_totals`` is null); the checkpoint's expert projections are still
counted. Stock layers are slower (~20-30 s each at full size): use ``--deadline`` for a partial
run with measured layers and a labelled projection. ``benchmarks/whole_model_compare.py`` compares
two such JSON files.

Per decoder layer the time is recorded as it goes (a forward pre-hook on every layer: layer i
runs from its first call to layer i+1's first call; the last one to the end of calibration).
``--deadline SECONDS`` (default 540, counted from the start of this process): a layer is not
started when the median layer time so far would carry it past ``deadline - --reserve``; the run
then stops, writes the JSON with the layers done (``"status": "partial"``) and a projection for all
layers (labelled ``projection``: never a measurement) and exits 4. A watchdog does the same at the
deadline itself if the run is still busy (e.g. in the save). The JSON is also rewritten after every
layer (``"status": "running"``), so even a killed process leaves what it measured.

Exit codes: 0 complete, every expert projection quantized; 1 error or not every expert quantized;
3 complete but GPTQModel's GPTQ solves fell back from its CUDA block-update extension (the JSON's
``fallback`` and ``error`` say so: the timings are not comparable); 4 stopped at the deadline
(partial JSON written).

JSON (``--output``, default ``$OUT/whole_model_<backend>[_stock|_all]_<device>[_tiny].json`` when ``$OUT``
is set, else ``benchmarks/results/``): command, versions, GPU, shape, calibration ``routing``, stage times (imports, build,
calibration data, quantize, save), per-layer seconds, peak GPU memory, peak RSS, expert
projections quantized (read back from the checkpoint), coverage totals, checkpoint bytes, the
backend's path records (GPTQModel: which GPTQ solve kernels ran, batched solves; llm-compressor:
stage clock, grouped block calls) and a DeepSeek-V3-size projection (assumptions in the JSON).

    python benchmarks/whole_model_gpu.py --backend llmcompressor            # one H200, <= 9 minutes
    python benchmarks/whole_model_gpu.py --backend gptqmodel
    python benchmarks/whole_model_gpu.py --backend llmcompressor --stock --deadline 540   # partial: exit 4
    GPTQMODEL_CPU_WORKERS=2 python benchmarks/whole_model_gpu.py --backend gptqmodel --device cpu --tiny --layers 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROCESS_T0 = time.perf_counter()

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _args import check_shape, whole  # noqa: E402
from distributed_gpu import IGNORE  # noqa: E402  llm-compressor's ignore list of the other benchmarks
from gptqmodel_gpu import TINY as _GPTQMODEL_TINY  # noqa: E402
from gptqmodel_gpu import add_shape_args, warm_gptq_extension  # noqa: E402

logger = logging.getLogger("whole_model_gpu")

TOKENIZER = ROOT / "defuser_quant" / "assets" / "tiny-qwen3-moe"
#: the tiny shape of gptqmodel_gpu.py; the vocabulary must hold the shipped tokenizer's 4096 ids
TINY = {**_GPTQMODEL_TINY, "vocab": 4096}
EXIT_OK, EXIT_ERROR, EXIT_FALLBACK, EXIT_DEADLINE = 0, 1, 3, 4
# How each backend calibrates its experts as shipped (the ``routing`` of a --stock result)
STOCK_ROUTING = {"llmcompressor": "all (llm-compressor's default moe_calibrate_all_experts)",
                 "gptqmodel": "routed (GPTQModel's default: QuantizeConfig.moe is None)"}
#: DeepSeek-V3 MoE layer shape for the projection (config.json of deepseek-ai/DeepSeek-V3)
DEEPSEEK_V3 = dict(layers=61, first_dense_layers=3, routed_experts=256, shared_experts=1, hidden=7168, intermediate=2048, top_k=8)


class DeadlineReached(RuntimeError):
    """Raised from a layer's pre-hook: the next layer would not finish before the deadline."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", required=True, choices=["llmcompressor", "gptqmodel"])
    p.add_argument("--stock", action="store_true",
                   help="the backend as shipped (no DefuseModifier / no plugin): the baseline for whole_model_compare.py")
    p.add_argument("--routing", default=None, choices=["routed", "all"],
                   help="ours' calibration routing (default routed); 'all' sends every token through every expert, "
                        "as stock llm-compressor calibrates (not with --stock: stock runs calibrate as shipped)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny shape for a CPU smoke run: " + json.dumps(TINY))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 48; 2 with --tiny)")
    add_shape_args(p)
    p.add_argument("--batch-size", type=whole(1), default=8, help="GPTQModel calibration batch size")
    p.add_argument("--deadline", type=float, default=540.0, help="seconds from process start (default 540)")
    p.add_argument("--reserve", type=float, default=None,
                   help="seconds kept free before the deadline when deciding to start a layer (default 75 on CUDA "
                        "at full size, for the save, else 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gptq-kernel", default=None,
                   help="GPTQModel BACKEND for packing (default gptq_triton on CUDA, auto on CPU)")
    p.add_argument("--gptqmodel-model-device", default="cpu", choices=["cpu", "cuda"],
                   help="where the built model lives when GPTQModel gets it (default cpu: GPTQModel's own loader's place)")
    p.add_argument("--save-dir", type=Path, default=None, help="checkpoint folder, kept (default: a temp dir, removed)")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep the temp dir (its path is logged)")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            if key != "layers" or args.layers is None:
                setattr(args, key, value)
    if args.layers is None:
        args.layers = 48
    if args.layers < 1:
        p.error("--layers must be >= 1")
    check_shape(p, args)
    if args.deadline <= 0:
        p.error("--deadline must be > 0 seconds")
    if args.stock and args.routing is not None:
        p.error("--routing is ours' setting: a --stock run calibrates as the backend ships (drop --routing)")
    if args.routing is None and not args.stock:
        args.routing = "routed"
    if args.reserve is None:
        args.reserve = 75.0 if args.device == "cuda" and not args.tiny else 0.0
    if args.gptq_kernel is None:
        args.gptq_kernel = "gptq_triton" if args.device == "cuda" else "auto"
    return args


def default_output(args: argparse.Namespace) -> Path:
    variant = "_stock" if args.stock else ("_all" if args.routing == "all" else "")
    name = f"whole_model_{args.backend}{variant}_{args.device}{'_tiny' if args.tiny else ''}.json"
    out = os.environ.get("OUT")
    return Path(out) / name if out else HERE / "results" / name


# ----- the model ------------------------------------------------------------------------------
def make_config(args: argparse.Namespace, tokenizer: Any) -> Any:
    """A Qwen3MoeConfig of the benchmark shape (bf16)."""
    from transformers import Qwen3MoeConfig

    if args.vocab < len(tokenizer):
        raise SystemExit(f"--vocab {args.vocab} is smaller than the tokenizer's {len(tokenizer)} ids; raise --vocab")
    return Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate * 4,
        moe_intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, num_experts=args.experts,
        num_experts_per_tok=args.top_k, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )


def build_random_model(config: Any, device: str, seed: int) -> Any:
    """The model built on ``device`` in bf16 without Transformers' init, then filled on the device:
    norm weights 1, every other parameter N(0, initializer_range) from a seeded generator."""
    import torch
    from transformers import Qwen3MoeForCausalLM
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device), no_init_weights():
            model = Qwen3MoeForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(seed)
    std = float(getattr(config, "initializer_range", 0.02))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
    return model.eval()


def calibration_samples(args: argparse.Namespace, tokenizer: Any) -> list:
    """``args.samples`` packed rows of ``args.seq_len`` tokens from the bundled corpus (the project's data layer)."""
    from defuser_quant.calibration.data import CalibrationDataConfig, build_calibration_samples

    cfg = CalibrationDataConfig(source="builtin:pydoc", num_samples=args.samples, seq_len=args.seq_len, mode="pack",
                                seed=args.seed)
    samples = build_calibration_samples(cfg, tokenizer)
    if len(samples) != args.samples:
        raise SystemExit(f"the corpus gives {len(samples)} rows of {args.seq_len} tokens, not {args.samples}")
    return samples


# ----- per-layer clock with the deadline -------------------------------------------------------
@dataclass
class LayerClock:
    """Start time of every decoder layer (its first forward call), and the stop rule.

    ``deadline`` and ``reserve`` are seconds since ``t0``. Layer ``i`` is refused (``DeadlineReached``
    raised from its pre-hook, and from every hook after) when ``now + median layer time >
    deadline - reserve``; the first layer always starts.
    """

    total: int
    t0: float
    deadline: float
    reserve: float = 0.0
    sync: Callable[[], None] = lambda: None
    on_layer: Callable[[], None] = lambda: None
    starts: list[float] = field(default_factory=list)
    end: float | None = None
    stopped: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _handles: list = field(default_factory=list)

    def attach(self, layers: list) -> None:
        if len(layers) != self.total:
            raise RuntimeError(f"found {len(layers)} decoder layers, expected {self.total}")
        self._handles = [layer.register_forward_pre_hook(lambda *_, i=i: self.enter(i)) for i, layer in enumerate(layers)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def seconds(self) -> list[float]:
        """Seconds of every finished layer."""
        bounds = self.starts + ([self.end] if self.end is not None else [])
        return [round(b - a, 3) for a, b in zip(bounds, bounds[1:])]

    def enter(self, index: int) -> None:
        with self._lock:
            if self.stopped:
                raise DeadlineReached(self.stopped)
            if index < len(self.starts):
                return  # a later call of a layer already running (more batches, the replay pass)
            if index != len(self.starts):
                raise RuntimeError(f"decoder layer {index} started before layer {len(self.starts)}")
            self.sync()
            stamp = time.perf_counter()
            now = stamp - self.t0
            # the previous layer ends now: it counts in the median
            done = [b - a for a, b in zip(self.starts, self.starts[1:] + [stamp])]
            if done and now + statistics.median(done) > self.deadline - self.reserve:
                self.end = stamp  # the layers before this one are done
                self.stopped = (f"layer {index} not started at {now:.1f}s: median layer {statistics.median(done):.1f}s "
                                f"would pass deadline {self.deadline:.0f}s - reserve {self.reserve:.0f}s")
                logger.warning("deadline: %s", self.stopped)
                raise DeadlineReached(self.stopped)
            self.starts.append(stamp)
            if done:
                logger.info("layer %d/%d done in %.2fs (%.1fs since start)", index, self.total, done[-1], now)
        self.on_layer()

    def finish(self) -> None:
        with self._lock:
            if self.end is None and self.starts and not self.stopped:
                self.sync()
                self.end = time.perf_counter()


# ----- projections -------------------------------------------------------------------------
def projection(args: argparse.Namespace, layer_s: list[float], layers_done: int) -> dict[str, Any]:
    """Projections from the measured layer times, labelled as such."""
    if not layer_s:
        return {"label": "PROJECTION (not a measurement)", "note": "no layer finished: nothing to project from"}
    median = statistics.median(layer_s)
    out: dict[str, Any] = {"label": "PROJECTION (not a measurement)", "per_layer_s_used": round(median, 3),
                           "per_layer_s_is": "median of the measured layer times"}
    if args.tiny or args.device != "cuda":
        out["warning"] = f"measured with --device {args.device}{' --tiny' if args.tiny else ''}: the projections show the arithmetic only"
    if layers_done < args.layers:
        out["all_layers_quantize_s"] = round(sum(layer_s) + (args.layers - layers_done) * median, 1)
        out["all_layers_note"] = (f"{layers_done} measured layers + {args.layers - layers_done} x median; "
                                  "excludes the save and everything after the last layer")
    ds = DEEPSEEK_V3
    ds_experts = ds["routed_experts"] + ds["shared_experts"]
    factor = (ds_experts * ds["hidden"] * ds["intermediate"]) / (args.experts * args.hidden * args.intermediate)
    ds_layer = median * factor
    expert_bytes = ds_experts * 3 * ds["hidden"] * ds["intermediate"] * 2
    out["deepseek_v3"] = {
        "shape": ds,
        "scale_factor": round(factor, 3),
        "per_layer_s": round(ds_layer, 1),
        "quantize_s": round(ds_layer * ds["layers"], 0),
        "quantize_h": round(ds_layer * ds["layers"] / 3600, 2),
        "bf16_expert_bytes_per_layer": expert_bytes,
        "assumptions": [
            "per-layer time scales with expert count x per-expert GEMM/solve size: "
            f"({ds_experts} x {ds['hidden']} x {ds['intermediate']}) / ({args.experts} x {args.hidden} x {args.intermediate})"
            f" = {factor:.2f}, applied to the median layer time measured at this shape",
            "the shared expert counts as one more expert of the same size; all 61 layers are counted as MoE "
            f"(DeepSeek-V3's first {ds['first_dense_layers']} are dense: slightly high)",
            "same calibration tokens (samples x seq_len) and top-8; attention (MLA), the router and fixed per-layer "
            "overheads are scaled by the same factor",
            "excludes streaming ~1.3 TB of bf16 weights layer by layer (one layer's experts alone are "
            f"{expert_bytes / 2**30:.1f} GiB bf16: the model does not fit one GPU) and the save",
        ],
    }
    return out


# ----- the run -----------------------------------------------------------------------------
class Run:
    """Everything measured so far, and the JSON written from it at any point."""

    def __init__(self, args: argparse.Namespace, argv: list[str] | None):
        import torch

        self.args = args
        self.cuda = args.device == "cuda"
        self.out = args.output or default_output(args)
        self.clock: LayerClock | None = None
        self.stages: dict[str, float] = {}
        self.extra: dict[str, Any] = {}
        self.status = "running"
        self.error: str | None = None
        self._lock = threading.Lock()
        self.payload: dict[str, Any] = {
            "command": "python benchmarks/whole_model_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "backend": args.backend,
            "variant": "stock" if args.stock else "ours",
            "variant_is": ("the backend as shipped: no DefuseModifier / no defuser-quant plugin" if args.stock else
                           f"the backend with defuser-quant's integration (DefuseModifier {args.routing} grouped / "
                           f"GPTQModel plugin {args.routing} grouped + batched solve)"),
            "routing": STOCK_ROUTING[args.backend] if args.stock else args.routing,
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if self.cuda else None,
            "versions": versions(),
            "shape": {k: getattr(args, k) for k in ("layers", "experts", "hidden", "intermediate", "top_k", "heads",
                                                     "kv_heads", "head_dim", "vocab")},
            "calibration": {"samples": args.samples, "seq_len": args.seq_len, "tokens": args.samples * args.seq_len,
                            "source": "builtin:pydoc packed, tokenizer of defuser_quant/assets/tiny-qwen3-moe"},
            "quantization": "GPTQ W4A16, group 128",
            **({"batch_size": args.batch_size, "gptq_kernel": args.gptq_kernel} if args.backend == "gptqmodel" else {}),
            "deadline_s": args.deadline,
            "reserve_s": args.reserve,
        }

    def write(self) -> None:
        import torch

        with self._lock:
            clock = self.clock
            layer_s = clock.seconds() if clock else []
            done = len(layer_s)
            data = dict(self.payload)
            data.update(
                status=self.status,
                error=self.error,
                stopped=clock.stopped if clock else None,
                wall_s=round(time.perf_counter() - PROCESS_T0, 2),
                stages_s={k: round(v, 2) for k, v in self.stages.items()},
                layers={"total": self.args.layers, "done": done, "seconds": layer_s,
                        "median_s": round(statistics.median(layer_s), 3) if layer_s else None,
                        "note": "layer i: from its first forward call to layer i+1's (the last: to the end of calibration); "
                                "includes its calibration forward, GPTQ solves and propagation"},
                peak_gpu_bytes=torch.cuda.max_memory_allocated() if self.cuda else None,
                peak_gpu_bytes_is="torch.cuda.max_memory_allocated after the build (quantize + save; the build's own: "
                                  "peak_gpu_bytes_build)",
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                **self.extra,
            )
            data["projection"] = projection(self.args, layer_s, done)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.out.with_name(self.out.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
            tmp.replace(self.out)

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name] = seconds
        logger.info("stage %s: %.2fs", name, seconds)

    def built(self) -> None:
        """After the build: its peak GPU memory apart; ``peak_gpu_bytes`` is then quantize + save's."""
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            self.extra["peak_gpu_bytes_build"] = torch.cuda.max_memory_allocated()
            self.extra["gpu_bytes_after_build"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.write()


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "llmcompressor", "compressed-tensors", "gptqmodel", "defuser"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["defuser_quant_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                     capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["defuser_quant_commit"] = None
    return out


def _sync(cuda: bool) -> Callable[[], None]:
    if not cuda:
        return lambda: None
    import torch

    return torch.cuda.synchronize


def write_source(args: argparse.Namespace, tokenizer: Any, src: Path) -> Any:
    """The config and tokenizer (no weights) in ``src``: what the quantizers read from a model's path."""
    config = make_config(args, tokenizer)
    config.save_pretrained(src)
    tokenizer.save_pretrained(src)
    return config


LLMC_INTEGRATION = "defuser_quant.integrations.llmcompressor"


def block_llmcompressor_integration() -> None:
    """Make importing our llm-compressor integration fail in this process (``--stock``).

    Importing it changes llm-compressor's MoE linearization (defuser-quant's zero-copy
    ``DefusedExperts`` instead of ``LinearExperts2D`` copies) even for recipes without
    ``DefuseModifier``; ``_llmc_stages.install`` imports it when it can. A stock baseline must not.
    """
    if sys.modules.get(LLMC_INTEGRATION) is not None:
        raise RuntimeError(f"--stock but {LLMC_INTEGRATION} is already imported: the baseline would not be stock")
    sys.modules[LLMC_INTEGRATION] = None  # type: ignore[assignment]  # import -> ImportError


def experts_classes(model: Any) -> list[str]:
    """Sorted class names (module.qualname) of the ``mlp.experts`` blocks of ``model``."""
    return sorted({f"{type(m).__module__}.{type(m).__qualname__}" for name, m in model.named_modules()
                   if name.endswith("mlp.experts")})


def run_llmcompressor(run: Run, tokenizer: Any, samples: list, save_dir: Path, work: Path) -> None:
    """``oneshot`` on the in-memory model with DefuseModifier (routed, grouped) + GPTQModifier; with
    ``--stock`` the same ``oneshot`` and GPTQModifier alone (llm-compressor's own MoE linearization)."""
    import torch
    from defuser_quant.calibration.data import to_hf_dataset

    from _llmc_stages import install as install_stage_clock

    args = run.args
    t0 = time.perf_counter()
    dq_llmc = None
    if args.stock:
        block_llmcompressor_integration()
    else:
        import defuser_quant.integrations.llmcompressor as dq_llmc
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.pipelines.sequential import pipeline as sequential

    run.stage("imports_backend", time.perf_counter() - t0)
    t0 = time.perf_counter()
    config = write_source(args, tokenizer, work / "src")
    model = build_random_model(config, args.device, args.seed)
    model.config.name_or_path = str(work / "src")  # oneshot reads the config at the model's path
    _sync(run.cuda)()
    run.stage("build", time.perf_counter() - t0)
    run.built()
    recipe: list = [GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)]
    defuse = None
    if dq_llmc is not None:
        defuse = dq_llmc.DefuseModifier(routing=args.routing)
        recipe.insert(0, defuse)
    stage_clock = install_stage_clock(run.cuda)
    callbacks = sequential.LifecycleCallbacks
    calibration_end = callbacks.calibration_end  # a bound classmethod

    def ended(*a: Any, **k: Any) -> Any:
        run.clock.finish()
        return calibration_end(*a, **k)

    run.clock.attach(list(model.model.layers))
    callbacks.calibration_end = ended
    t0 = time.perf_counter()
    try:
        oneshot(model=model, processor=tokenizer, dataset=to_hf_dataset(samples), recipe=recipe, output_dir=str(save_dir),
                num_calibration_samples=len(samples), max_seq_length=args.seq_len, shuffle_calibration_samples=False)
        _sync(run.cuda)()
    finally:
        callbacks.calibration_end = calibration_end
        run.clock.detach()
        totals = stage_clock.totals()
        run.extra["llmcompressor_stages"] = totals
        use = None if defuse is None else defuse.grouped_use
        run.extra["grouped_use"] = None if use is None else {"grouped": use.grouped, "fallbacks": dict(use.fallbacks)}
        oneshot_s = time.perf_counter() - t0
        save_s = totals.get("save", {}).get("s", 0.0)
        run.stage("quantize", oneshot_s - save_s)
        run.stage("save", save_s)
        run.extra["quantize_includes"] = "oneshot minus its post_process (save): setup, tracing, calibration, solves, finalize"
    run.extra["coverage_totals"] = None if defuse is None or defuse.coverage is None else defuse.coverage.totals.model_dump()
    classes = experts_classes(model)
    run.extra["experts_classes"] = classes
    if args.stock and any(not c.startswith("llmcompressor.") for c in classes):
        raise RuntimeError(f"--stock but the experts blocks after oneshot are {classes}, not llm-compressor's own "
                           "linearization: the baseline would not be stock")
    if args.stock:
        run.extra["coverage_is"] = "null: stock llm-compressor gives no coverage report"
    del model
    if run.cuda:
        torch.cuda.empty_cache()


def gptqmodel_hooks() -> dict[str, str]:
    """Where the GPTQModel attributes our ``install()`` rebinds come from (``gptqmodel.*``/``defuser``: stock)."""
    from gptqmodel.models import auto, loader, writer

    out = {}
    for module, name in ((loader, "defuser"), (loader, "_convert_model_with_defuser"),
                         (writer, "get_state_dict_for_save"), (auto, "check_and_get_model_definition")):
        value = getattr(module, name)
        where = value.__name__ if isinstance(value, type(sys)) else \
            f"{getattr(value, '__module__', None) or type(value).__module__}.{getattr(value, '__qualname__', type(value).__qualname__)}"
        out[f"{module.__name__}.{name}"] = where
    return out


def _stock_origin(where: str) -> bool:
    """``where`` (from :func:`gptqmodel_hooks`) is GPTQModel's or the ``defuser`` package's own."""
    return where.startswith("gptqmodel.") or where == "defuser" or where.startswith("defuser.")


def run_gptqmodel(run: Run, tokenizer: Any, samples: list, save_dir: Path, work: Path) -> None:
    """GPTQModel.load (weights built here, not read) + quantize_with_defuser(grouped, batched_solve) + save;
    with ``--stock`` no ``install()`` and a plain ``model.quantize`` (GPTQModel + Defuser as shipped)."""
    args = run.args
    t0 = time.perf_counter()
    from defuser_quant.calibration.data import to_gptqmodel_examples
    from defuser_quant.integrations.gptqmodel import workable_cpu_pool
    from defuser_quant.integrations.gptqmodel.kernels import quant_linear_classes, record_gptq_kernels

    workable_cpu_pool()  # stock too: GPTQModel 7.6's pools refuse to load with one CPU worker (install() does it for ours)
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.models import loader as gptq_loader

    if not args.stock:  # stock: GPTQModel defuses with the defuser package on load, as shipped
        from defuser_quant.integrations.gptqmodel import install, quantize_with_defuser

        install()
    run.stage("imports_backend", time.perf_counter() - t0)
    if run.cuda:
        jit_s, jit_ok = warm_gptq_extension()
        run.extra["gptq_extension"] = {"warmup_s": jit_s, "available": jit_ok}
        run.stage("gptq_extension_warmup", jit_s or 0.0)
    src = work / "src"
    write_source(args, tokenizer, src)
    original = gptq_loader._hf_loader_from_pretrained_with_dynamic_module_retry
    built: dict[str, float] = {}

    def random_weights(loader: Any, path: str, config: Any = None, **kwargs: Any) -> Any:
        start = time.perf_counter()
        model = build_random_model(config, args.device, args.seed)
        _sync(run.cuda)()
        built["build_on_device"] = time.perf_counter() - start
        built["bf16_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if args.gptqmodel_model_device != args.device:
            start = time.perf_counter()
            model = model.to(args.gptqmodel_model_device)
            built["move_to_" + args.gptqmodel_model_device] = time.perf_counter() - start
        return model

    hooks = gptqmodel_hooks()
    run.extra["gptqmodel_hooks"] = hooks
    if args.stock and any(not _stock_origin(where) for where in hooks.values()):
        raise RuntimeError(f"--stock but GPTQModel's hooks are not all its own: {hooks}; the baseline would not be stock")
    t0 = time.perf_counter()
    gptq_loader._hf_loader_from_pretrained_with_dynamic_module_retry = random_weights
    try:
        model = GPTQModel.load(str(src), QuantizeConfig(bits=4, group_size=128, offload_to_disk=False))
    finally:
        gptq_loader._hf_loader_from_pretrained_with_dynamic_module_retry = original
    if not built:
        raise RuntimeError("GPTQModel.load did not go through its Hugging Face loader: the random build never ran")
    run.stage("build", time.perf_counter() - t0)
    source_bytes = int(built.pop("bf16_bytes"))
    run.extra["build_parts_s"] = {k: round(v, 2) for k, v in built.items()}
    run.extra["source_model_bytes"] = source_bytes
    run.built()
    run.clock.attach(list(model.model.model.layers))
    t0 = time.perf_counter()
    try:
        with record_gptq_kernels(stages=False, model=model.model) as kernels:
            examples, backend = to_gptqmodel_examples(samples), BACKEND(args.gptq_kernel)
            if args.stock:
                result = None
                model.quantize(examples, batch_size=args.batch_size, backend=backend)
            else:
                result = quantize_with_defuser(model, examples, routing=args.routing, policy="warn",
                                               batch_size=args.batch_size, backend=backend, grouped=True,
                                               batched_solve=True)
        run.clock.finish()
    finally:
        run.clock.detach()
        run.stage("quantize", time.perf_counter() - t0)
        run.extra["kernels"] = kernels.as_dict()
        run.extra["kernels_label"] = kernels.label()
        run.extra["fallback"] = kernels.fallback_reason() if run.cuda else None
    if result is None:
        run.extra.update(solve=None, coverage_totals=None,
                         coverage_is="null: stock GPTQModel gives no coverage report")
    else:
        run.extra["solve"] = result.solve.as_dict() if result.solve is not None else None
        run.extra["coverage_totals"] = result.coverage.totals.model_dump()
    run.extra["quant_linear_after_quantize"] = quant_linear_classes(model.model)
    run.write()
    # GPTQModel's save logs the size change against the weight files at the model's path (none
    # here: it would divide by zero); it gets the built model's bf16 size instead, for that log line.
    from gptqmodel.models import writer as gptq_writer

    files_size = gptq_writer.get_model_files_size
    gptq_writer.get_model_files_size = lambda path: source_bytes / 2**20
    t0 = time.perf_counter()
    try:
        model.save(str(save_dir))
    finally:
        gptq_writer.get_model_files_size = files_size
    run.stage("save", time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    import torch

    from _source import use_source_checkout

    use_source_checkout()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu --tiny)")
    if args.device == "cuda":
        torch.cuda.init()  # the allocator's stats raise "Invalid device argument" before CUDA is initialised
        torch.cuda.reset_peak_memory_stats()
    from transformers import AutoTokenizer

    run = Run(args, argv)
    run.stage("imports", time.perf_counter() - PROCESS_T0)
    run.clock = LayerClock(total=args.layers, t0=PROCESS_T0, deadline=args.deadline, reserve=args.reserve,
                           sync=_sync(run.cuda), on_layer=run.write)
    finished = threading.Event()

    def watchdog() -> None:
        if finished.wait(max(0.0, args.deadline - (time.perf_counter() - PROCESS_T0))):
            return
        run.status = "partial"
        run.error = f"watchdog: still running at the deadline ({args.deadline:.0f}s)"
        if run.clock.stopped is None:
            run.clock.stopped = run.error
        run.write()
        logger.error("%s; wrote %s, exiting %d", run.error, run.out, EXIT_DEADLINE)
        os._exit(EXIT_DEADLINE)

    threading.Thread(target=watchdog, daemon=True, name="deadline-watchdog").start()
    work = Path(tempfile.mkdtemp(prefix="whole_model_"))
    save_dir = args.save_dir or work / "checkpoint"
    code = EXIT_ERROR
    try:
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
        samples = calibration_samples(args, tokenizer)
        run.stage("calibration_data", time.perf_counter() - t0)
        if args.backend == "llmcompressor":
            run_llmcompressor(run, tokenizer, samples, save_dir, work)
        else:
            run_gptqmodel(run, tokenizer, samples, save_dir, work)
        from defuser_quant.jobs.checkpoint_facts import expert_projection_counts

        total, quantized = expert_projection_counts(save_dir)
        expected = args.layers * args.experts * 3
        run.extra.update(expert_projections=total, expert_projections_quantized=quantized,
                         expert_projections_expected=expected,
                         all_experts_quantized=total == quantized == expected,
                         checkpoint_bytes=sum(f.stat().st_size for f in save_dir.glob("*.safetensors")))
        run.status = "complete"
        code = EXIT_OK if run.extra["all_experts_quantized"] else EXIT_ERROR
        if code:
            run.error = f"{quantized}/{total} expert projections quantized in the checkpoint, {expected} expected"
        elif run.extra.get("fallback"):
            run.error = f"GPTQModel fell back to a slower path, the timings are not comparable: {run.extra['fallback']}"
            code = EXIT_FALLBACK
    except BaseException as exc:  # noqa: BLE001  the JSON is written for every ending
        if run.clock.stopped:  # our pre-hook stopped it (the backend may have wrapped the exception)
            run.status, code = "partial", EXIT_DEADLINE
        else:
            run.status, run.error = "error", f"{type(exc).__name__}: {exc}"
            logger.exception("run failed")
            if not isinstance(exc, Exception):
                raise
    finally:
        finished.set()
        run.write()
        if not args.keep_checkpoint:
            shutil.rmtree(work, ignore_errors=True)  # a --save-dir of the caller's is kept
    logger.info("status %s (exit %d); wrote %s", run.status, code, run.out)
    return code


def exit_now(code: int) -> None:
    """Exit with ``code`` without waiting for the backend's threads: after a deadline stop GPTQModel's
    finalize workers are still busy, and an ordinary interpreter exit then aborts (exit 134)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    rc = main()
    if rc == EXIT_DEADLINE:
        exit_now(rc)
    sys.exit(rc)
