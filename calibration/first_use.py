"""First-use rehearsals: the CUDA kernels a calibration run will launch, launched once ahead on a thread of their own.

CUDA loads a kernel the first time a process launches it (``CUDA_MODULE_LOADING=LAZY``, the default), and
the launching thread waits for the load. In a fresh process every kernel of a run pays this once. On one H100
(``benchmarks/results/llmc_all_torchprof_round45c_h100x1.json``, round 45) llm-compressor's ``oneshot`` with
``DefuseModifier(routing="all")`` loaded 183 kernels lazily, 16 ms each on average under the profiler; GPTQModel's
first solve steps took 0.57-0.69 s cold against 5-6 ms warm (``first_use_probe_round44b_h100x1.json``).

Each ``rehearse_*`` function here launches, once, on small tensors of its own, the kernels a step of the run
will launch at the run's shapes and dtypes: the attention (:func:`rehearse_attention`), the half-precision
products of the attention and router projections (:func:`rehearse_linears`), the GPTQ Hessian products
(:func:`rehearse_hessian_products`) and the grouped expert forward (:func:`rehearse_grouped_experts`).
:class:`Rehearsal` runs such steps on a background thread and CUDA stream while the run's own thread does its
set-up on the CPU, so the loads overlap that work. Nothing the run computes changes: a rehearsal allocates
its own tensors (zeros, or random data from a generator of its own: the run's random state is left alone),
reads no model tensor and keeps nothing. A step that fails is logged and counted; the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from defuser_quant.core.model_config import text_config

logger = logging.getLogger(__name__)

__all__ = ["ATTENTION_STEPS", "Rehearsal", "RehearsalStats", "rehearse_attention", "rehearse_grouped_experts",
           "rehearse_hessian_products", "rehearse_linears", "timed_step"]

#: The calls :func:`rehearse_attention` makes (``attention_masked`` for ``sdpa`` only).
ATTENTION_STEPS = ("projections", "attention", "attention_masked")


def timed_step(device: torch.device, timings: dict[str, float] | None, name: str, run: Callable[[], Any]) -> Any:
    """``run()``; with ``timings``, its seconds there under ``name``, the device synchronized first."""
    begin = time.perf_counter()
    out = run()
    if timings is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[name] = time.perf_counter() - begin
    return out


class _AttentionStandIn(torch.nn.Module):
    """What Transformers' attention functions read from the attention module calling them."""

    def __init__(self, groups: int, head_dim: int) -> None:
        super().__init__()
        self.is_causal, self.num_key_value_groups, self.head_dim = True, groups, head_dim
        self.eval()


def rehearse_attention(device: torch.device | str, config: Any, dtype: torch.dtype,
                       timings: dict[str, float] | None = None, *, tokens: int = 256,
                       eager: Callable[..., Any] | None = None) -> bool:
    """The model's registered attention function (``config._attn_implementation`` in Transformers'
    ``ALL_ATTENTION_FUNCTIONS``; for ``eager``, the ``eager`` function given, the modeling file's
    ``eager_attention_forward``) once on ``device``, on random queries, keys and values of the model's head
    counts, head size and ``dtype``: causal without a mask, and for ``sdpa`` also with a boolean mask (the
    calibration's padded batches take that kernel; ``eager`` gets a float causal mask); before it, products
    of the attention projections' shapes in ``dtype`` (the first half-precision products of the run). Layer
    0's first forward through the attention waited for these kernels' first use in rounds 42-44. False, and
    nothing run, where the implementation is eager without an ``eager`` function or not registered, or the
    config has no head counts; ``timings`` as :func:`timed_step`'s."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    text = text_config(config)
    implementation = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    if implementation == "eager" and eager is not None:
        attention = eager
    elif not implementation or implementation == "eager" or implementation not in ALL_ATTENTION_FUNCTIONS:
        return False
    else:
        attention = ALL_ATTENTION_FUNCTIONS[implementation]
    heads, hidden = getattr(text, "num_attention_heads", None), getattr(text, "hidden_size", None)
    if not isinstance(heads, int) or not isinstance(hidden, int) or heads < 1:
        return False  # a config without the usual head counts: nothing this knows how to shape
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    device = torch.device(device)
    module = _AttentionStandIn(heads // kv_heads, head_dim)
    generator = torch.Generator().manual_seed(0)  # the run's random state is left alone

    def tensor(count: int) -> torch.Tensor:
        return torch.randn(1, count, tokens, head_dim, generator=generator).to(device=device, dtype=dtype)

    def call(name: str, mask: torch.Tensor | None) -> None:
        timed_step(device, timings, name, lambda: attention(module, tensor(heads), tensor(kv_heads), tensor(kv_heads),
                                                            mask, dropout=0.0, scaling=head_dim ** -0.5))

    def projections() -> None:
        rows = torch.randn(8 * tokens, hidden, generator=generator).to(device=device, dtype=dtype)
        queries = torch.nn.functional.linear(rows, torch.zeros(heads * head_dim, hidden, device=device, dtype=dtype))
        torch.nn.functional.linear(queries, torch.zeros(hidden, heads * head_dim, device=device, dtype=dtype))
        torch.nn.functional.linear(rows, torch.zeros(kv_heads * head_dim, hidden, device=device, dtype=dtype))

    with torch.inference_mode():
        timed_step(device, timings, "projections", projections)
        if attention is eager:  # the additive float mask eager attention takes
            upper = torch.ones(tokens, tokens, dtype=torch.bool, device=device).triu(1)
            call("attention", torch.zeros(1, 1, tokens, tokens, device=device, dtype=dtype).masked_fill(upper, -1e4))
        else:
            call("attention", None)
        if implementation == "sdpa":
            call("attention_masked", torch.ones(1, 1, tokens, tokens, dtype=torch.bool, device=device).tril())
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
    return True


def rehearse_linears(device: torch.device | str, dtype: torch.dtype, shapes: Iterable[tuple[int, int]],
                     tokens: int = 256) -> int:
    """``F.linear`` of ``tokens`` rows through a zero weight of each distinct ``(out, in)`` of ``shapes``, in
    ``dtype`` (a calibration call's projections: the GEMM kernel depends on the three sizes); returns how many."""
    device = torch.device(device)
    done = 0
    with torch.no_grad():
        for out_features, in_features in dict.fromkeys((int(o), int(i)) for o, i in shapes):
            rows = torch.zeros(tokens, in_features, device=device, dtype=dtype)
            torch.nn.functional.linear(rows, torch.zeros(out_features, in_features, device=device, dtype=dtype))
            done += 1
    return done


def rehearse_hessian_products(device: torch.device | str, dtype: torch.dtype, widths: Iterable[int],
                              tokens: int = 256) -> int:
    """A GPTQ Hessian add for ``tokens`` input rows of each distinct width, in float32 from ``dtype`` rows:
    as llm-compressor's ``accumulate_hessian`` writes it (``H += inp.matmul(inp.t())`` on the transposed,
    scaled rows) and as the batched hooks take it (``torch.mm(X.T, X)`` then one ``_foreach_add_``, and for
    equal spans on a GPU one ``bmm`` over two of them, ``calibration.gram``); returns how many widths."""
    device = torch.device(device)
    done = 0
    with torch.no_grad():
        for width in dict.fromkeys(int(w) for w in widths):
            rows = torch.zeros(tokens, width, device=device, dtype=dtype)
            hessian = torch.zeros(width, width, device=device, dtype=torch.float32)
            inp = math.sqrt(2) * rows.t().to(dtype=torch.float32)
            hessian += inp.matmul(inp.t())
            scaled = math.sqrt(2) * rows.to(dtype=torch.float32)
            torch._foreach_add_([hessian], [torch.mm(scaled.t(), scaled)])
            pair = scaled.expand(2, -1, -1)
            torch._foreach_add_([hessian, hessian.clone()], list(torch.bmm(pair.transpose(1, 2), pair).unbind(0)))
            done += 1
    return done


def rehearse_grouped_experts(device: torch.device | str, dtype: torch.dtype, hidden: int, intermediate: int,
                             top_k: int, gate_fn: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor], *,
                             gated: bool = True, tokens: int = 256, experts: int = 2) -> None:
    """The grouped expert forward's kernels (``calibration.grouped``) once, for ``experts`` zero experts of
    the block's sizes: the routing sort and bounds, the row gathers, one grouped GEMM per projection in
    ``dtype``, the block's own ``gate_fn`` (``gate_fn(gate, up)``; ``gate`` None when not ``gated``), the
    weighting and the combine."""
    from .grouped import _grouped_mm

    device = torch.device(device)

    def project(x: torch.Tensor, out_features: int, in_features: int, offs: torch.Tensor) -> torch.Tensor:
        weight = torch.zeros(experts, out_features, in_features, device=device, dtype=dtype)
        return _grouped_mm(x, weight.transpose(-2, -1), offs)

    with torch.no_grad():
        index = torch.arange(tokens * top_k, device=device).remainder(experts).view(tokens, top_k)
        weights = torch.full((tokens, top_k), 1.0 / top_k, device=device, dtype=dtype)
        hidden_states = torch.zeros(tokens, hidden, device=device, dtype=dtype)
        expert_ids, perm = torch.sort(index.T.reshape(-1), stable=True)
        bounds = torch.searchsorted(expert_ids, torch.arange(experts + 1, device=device, dtype=expert_ids.dtype))
        offs = bounds[1:].to(torch.int32)
        torch.cat([bounds, expert_ids[:1], expert_ids[-1:]]).tolist()
        token_idx, slot_idx = perm % tokens, perm // tokens
        x = hidden_states[token_idx]
        gate = project(x, intermediate, hidden, offs) if gated else None
        up = project(x, intermediate, hidden, offs)
        out = project(gate_fn(gate, up), hidden, intermediate, offs)
        weighted = out * weights[token_idx, slot_idx, None]
        final = torch.zeros_like(hidden_states)
        position = torch.empty_like(perm)
        position[perm] = torch.arange(perm.numel(), device=device)
        slot_order = torch.sort(index, dim=1, stable=True).indices
        rows = position[slot_order * tokens + torch.arange(tokens, device=device)[:, None]]
        contributions = weighted.to(final.dtype)[rows]
        for j in range(top_k):
            final += contributions[:, j]


@dataclass
class RehearsalStats:
    """What a :class:`Rehearsal` did: each step's seconds (launch to its kernels' end), the failures."""

    seconds: dict[str, float] = field(default_factory=dict)
    not_run: list[str] = field(default_factory=list)  # steps that returned False: nothing they know how to rehearse
    failed: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None  # why nothing was rehearsed
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"seconds": {k: round(v, 4) for k, v in self.seconds.items()}, "not_run": list(self.not_run),
                    "failed": dict(self.failed), "skipped": self.skipped}


class Rehearsal:
    """Runs ``(name, step)`` pairs, in order, on a background thread and a CUDA stream of its own (see the
    module docstring). :meth:`join` waits for every step started so far; a step that raises is logged and
    counted in :attr:`stats` and the next one runs; one that returns False rehearsed nothing (``not_run``)."""

    THREAD_NAME = "defuser-quant-rehearsal"

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.stats = RehearsalStats()
        self._threads: list[threading.Thread] = []

    def start(self, steps: Sequence[tuple[str, Callable[[], Any]]]) -> None:
        """Run ``steps`` on a new background thread (after the steps started before it)."""
        previous = self._threads[-1] if self._threads else None
        thread = threading.Thread(target=self._run, args=(list(steps), previous), name=self.THREAD_NAME)
        self._threads.append(thread)
        thread.start()

    def start_from(self, plan: Callable[[], Sequence[tuple[str, Callable[[], Any]]]], name: str) -> None:
        """:meth:`start` the steps ``plan()`` returns (called here, on the caller's thread: it may read the
        model); a ``plan`` that raises is logged and counted under ``name``, and nothing starts."""
        try:
            steps = plan()
        except Exception as exc:  # an optimization only
            self._failed(name, exc)
            return
        self.start(steps)

    def _failed(self, name: str, exc: Exception) -> None:
        with self.stats.lock:
            self.stats.failed[name] = f"{type(exc).__name__}: {exc}"
        logger.warning("defuser-quant's kernel rehearsal %r failed (%s: %s); the run goes on without it", name,
                       type(exc).__name__, exc)

    def _run(self, steps: list[tuple[str, Callable[[], Any]]], previous: threading.Thread | None) -> None:
        if previous is not None:
            previous.join()
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        for name, step in steps:
            begin = time.perf_counter()
            try:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    ran = step()
                    if stream is not None:
                        stream.synchronize()
            except Exception as exc:  # an optimization only: the run launches these kernels itself
                self._failed(name, exc)
                continue
            with self.stats.lock:
                if ran is False:
                    self.stats.not_run.append(name)
                else:
                    self.stats.seconds[name] = time.perf_counter() - begin

    def join(self) -> RehearsalStats:
        """Wait for every step started so far; the stats."""
        for thread in self._threads:
            thread.join()
        return self.stats

