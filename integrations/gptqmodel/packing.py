"""GPTQModel's packed words for batched experts, computed on the solve's device.

GPTQModel packs each finished module on a CPU finalize worker:
``PackableQuantLinear.pack_block`` hands the dequantized weight, the transposed scales and zeros
and ``g_idx`` to its C++ extension (``pack_block_ext.pack_block_cpu``), which returns the
module's int32 ``qweight`` and ``qzeros``. At Qwen3-30B-A3B shape that is 13-30 ms of host time
per expert projection on an H200 host, 5-12 s per layer summed over the workers.

:func:`pack_words` does the extension's float32 operations (add, multiply, divide, round half
to even, clamp; each correctly rounded on the CPU and on CUDA) for a stack of modules at once:
with ``BatchedSolve(pack=True)`` (opt-in: it did not pay on an H200, docs/performance.md round
18) the batched solve packs a chunk's modules while they are still on its device. The words reach
GPTQModel through the extension's own call: inside :func:`served_pack_words`,
``pack_block`` runs unchanged, and its call of ``pack_block_cpu`` returns the words
computed for that module when every input it passes (bits, word size, the weight, scales, zeros
and ``g_idx``) is the one they were computed from; otherwise, or for a module without words, the
extension runs as stock. Everything else ``pack_block`` does (its buffers, checks, the Python
fallback where the extension is off or missing, the v2 -> v1 zero-point conversion after it) is
GPTQModel's. ``benchmarks/pack_exactness.py`` compares the words with the extension's on the CPU
and CUDA (``benchmarks/results/pack_exactness_cuda_round18.json``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .tail_workers import threads_beside

logger = logging.getLogger(__name__)

__all__ = ["PACK_AHEAD_THREADS", "PACK_BITS", "PackStats", "PackedWords", "host_copies", "offer_pack_words",
           "pack_ahead", "pack_ahead_threads", "pack_stack", "pack_words", "packable", "served_pack_words",
           "take_packed", "take_words", "weight_fingerprint"]

#: Bit widths with a whole number of codes per 32-bit word (the extension's only widths).
PACK_BITS = (2, 4, 8)
_MASK32 = (1 << 32) - 1
_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_INT = {torch.int32: np.int32, torch.int64: np.int64}


def pack_words(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
               bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack_block_cpu``'s ``(qweight, qzeros)`` for ``B`` modules at once, on ``weight``'s device.

    ``weight`` [B, out, in] (the dequantized weights, any float dtype), ``scales`` and ``zeros``
    [B, groups, out] (as ``pack_block`` passes them: transposed), ``g_idx`` [in] shared by the
    modules or [B, in] per module. Returns int32 ``qweight`` [B, in / 32 * bits, out] and
    ``qzeros`` [B, groups, out / 32 * bits].
    """
    if bits not in PACK_BITS:
        raise ValueError(f"pack_words packs 2, 4 or 8 bits (whole codes per 32-bit word), got {bits}")
    B, out, inp = weight.shape
    groups = scales.shape[1]
    if inp % 32 or out % 32:
        raise ValueError(f"in and out features must be multiples of 32, got {inp} x {out}")
    per_word = 32 // bits
    maxq = float((1 << bits) - 1)
    shifts = torch.arange(per_word, device=weight.device, dtype=torch.int64) * bits
    s = scales.to(torch.float32)
    z = zeros.to(torch.int32)
    offset = z.to(torch.float32) * s  # the extension's scale_zeros, [B, G, out]
    divisor = torch.where(s == 0, torch.full_like(s, 1e-6), s)  # its zero-scale guard (the offset keeps 0)
    g = g_idx.to(torch.int64)
    g = torch.where(g < 0, g + groups, g)
    if g.dim() == 1:
        col_offset = offset.index_select(1, g)  # [B, in, out]
        col_divisor = divisor.index_select(1, g)
    else:
        index = g.unsqueeze(-1).expand(B, inp, out)
        col_offset = torch.gather(offset, 1, index)
        col_divisor = torch.gather(divisor, 1, index)
    q = torch.round((weight.to(torch.float32) + col_offset.transpose(1, 2)) / col_divisor.transpose(1, 2))
    q = torch.clamp(q, 0.0, maxq).to(torch.int64)
    # word k of bit plane p in block b holds inputs b*32 + p*per_word + (0..per_word-1)
    words = (q.view(B, out, inp // 32, bits, per_word) << shifts).sum(-1) & _MASK32
    qweight = words.view(B, out, inp // 32 * bits).to(torch.int32).transpose(1, 2).contiguous()
    zwords = (z.to(torch.int64).view(B, groups, out // per_word, per_word) << shifts).sum(-1) & _MASK32
    return qweight, zwords.to(torch.int32)


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """Exact integer row and column sums of the bits of ``weight`` ([..., out, in]), int64,
    ``[..., out + in]``: the same on any device, so a weight packed on the GPU is recognised on
    the CPU (a changed element changes its row's and its column's sum). Summed in int32 where no sum can leave it
    (16-bit or narrower elements, at most 65,536 a row or column): the same values as int64 sums without an int64 copy
    of the weight (12.6 MB for a 768x2048 bf16 weight; 2.1 -> 0.8 ms on one CPU thread). On the CPU the sums are
    numpy's, which cast in small buffers: torch's widen the whole weight first, and 14 threads fingerprinting members
    side by side, as block_finalize's pool does, took 1.3-2.7 ms a member that way against 0.64-0.74 ms with numpy's
    on a 2-core CPU (``benchmarks/fingerprint_threads.py``)."""
    bits = weight.contiguous().view(_SAME_SIZE_INT[weight.element_size()])
    longest = max(bits.shape[-1], bits.shape[-2])
    exact_in_int32 = longest << (8 * bits.element_size() - 1) <= 1 << 31  # |element| <= 2**(8 * size - 1)
    accumulate = torch.int32 if exact_in_int32 else torch.int64
    sums = _bit_sums_numpy if bits.device.type == "cpu" else _bit_sums_torch
    return sums(bits, accumulate).to(torch.int64)


def _bit_sums_torch(bits: torch.Tensor, accumulate: torch.dtype) -> torch.Tensor:
    return torch.cat([bits.sum(-1, dtype=accumulate), bits.sum(-2, dtype=accumulate)], dim=-1)


def _bit_sums_numpy(bits: torch.Tensor, accumulate: torch.dtype) -> torch.Tensor:
    array, dtype = bits.detach().numpy(), _NUMPY_INT[accumulate]
    return torch.from_numpy(np.concatenate([array.sum(-1, dtype=dtype), array.sum(-2, dtype=dtype)], axis=-1))


def packable(bits: int, rows: int, columns: int) -> bool:
    """Whether :func:`pack_words` packs a ``rows x columns`` weight at ``bits``."""
    return int(bits) in PACK_BITS and rows % 32 == 0 and columns % 32 == 0


def pack_stack(weights: list[torch.Tensor], scales: list[torch.Tensor], zeros: list[torch.Tensor],
               g_idx: list[torch.Tensor], bits: int, shared_g_idx: bool, per_call: int = 8) -> list[torch.Tensor]:
    """Each module's ``(qweight, qzeros, weight fingerprint)`` on the weights' device, flattened in
    order, packed ``per_call`` modules at a time (bounding the working memory: ~45 MB per 768 x 2048
    module). ``scales`` and ``zeros`` as the solve returns them ([out, groups]); ``shared_g_idx``:
    every module has ``g_idx[0]``."""
    out: list[torch.Tensor] = []
    for i in range(0, len(weights), per_call):
        part = slice(i, i + per_call)
        weight = torch.stack(weights[part])
        qweight, qzeros = pack_words(weight, torch.stack(scales[part]).transpose(1, 2),
                                     torch.stack(zeros[part]).transpose(1, 2),
                                     g_idx[0] if shared_g_idx else torch.stack(g_idx[part]), bits)
        fingerprint = weight_fingerprint(weight)
        for b in range(weight.shape[0]):
            out += [qweight[b], qzeros[b], fingerprint[b]]
    return out


def host_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` on the CPU, in order, with their shapes and dtypes: one copy per dtype (a
    flat concatenation moved at once; each result is a contiguous view of its dtype's copy)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for indices in by_dtype.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices]).cpu()
        pieces = flat.split([tensors[i].numel() for i in indices])
        for i, piece in zip(indices, pieces, strict=True):
            out[i] = piece.view(tensors[i].shape)
    return out  # type: ignore[return-value]


@dataclass
class PackedWords:
    """One module's words and the inputs they were packed from (all on the CPU)."""

    bits: int
    qweight: torch.Tensor  # int32 [in / 32 * bits, out]
    qzeros: torch.Tensor  # int32 [groups, out / 32 * bits]
    scales: torch.Tensor  # [out, groups], as the solve returns them to GPTQModel
    zeros: torch.Tensor  # [out, groups]
    g_idx: torch.Tensor  # [in]
    fingerprint: torch.Tensor  # weight_fingerprint of the dequantized weight
    dtypes: tuple[torch.dtype, ...] | None = None  # packed by the extension itself: its inputs' dtypes, checked too

    def matches(self, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                bits: int, word_bits: int) -> bool:
        """Whether the extension's arguments are the inputs these words were packed from."""
        return int(word_bits) == 32 and self._same(weight, scales.T, zeros.T, g_idx, g_idx.dtype, bits)

    def matches_inputs(self, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                       bits: int) -> bool:
        """:meth:`matches` for the tensors ``pack_block`` starts from (``scales``/``zeros`` [out, groups], ``g_idx``
        of any integer dtype: the extension gets it as int32), without making the extension's transposed copies."""
        return self._same(weight, scales, zeros, g_idx, torch.int32, bits)

    def _same(self, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
              g_idx_dtype: torch.dtype, bits: int) -> bool:
        # torch calls only where needed: each gives up the interpreter lock (benchmarks/gil_drops.py)
        return (
            int(bits) == self.bits
            and (self.dtypes is None or self.dtypes == (weight.dtype, scales.dtype, zeros.dtype, g_idx_dtype))
            and weight.dim() == 2 and weight.shape == (self.qweight.shape[1], self.g_idx.numel())
            and scales.device.type == zeros.device.type == g_idx.device.type == "cpu"
            and torch.equal(scales, self.scales) and torch.equal(zeros, self.zeros)
            and torch.equal(g_idx if g_idx.dtype == self.g_idx.dtype else g_idx.to(self.g_idx.dtype), self.g_idx)
            and torch.equal(weight_fingerprint(weight if weight.device.type == "cpu" else weight.cpu()),
                            self.fingerprint)
        )


@dataclass
class PackStats:
    """What :func:`served_pack_words` did in one run."""

    offered: int = 0  # modules whose words the solve computed (or started computing ahead)
    served: int = 0  # ... that GPTQModel's pack_block took instead of running the extension
    refused: int = 0  # ... whose pack_block inputs differed: the extension ran (stock)
    failed: int = 0  # packs started ahead that raised: the extension ran (stock)
    taken_back: int = 0  # packs queued ahead but not started when pack_block asked: it packed them itself
    waited_seconds: float = 0.0  # pack_block waiting for a pack started ahead to finish

    def as_dict(self) -> dict[str, Any]:
        return {"offered": self.offered, "served": self.served, "refused": self.refused, "failed": self.failed,
                "taken_back": self.taken_back, "waited_seconds": round(self.waited_seconds, 3)}


@dataclass
class _Registry:
    stats: PackStats = field(default_factory=PackStats)
    words: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)  # nn.Linear -> PackedWords
    pending: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)  # nn.Linear -> Future
    lock: threading.Lock = field(default_factory=threading.Lock)
    current: threading.local = field(default_factory=threading.local)  # the module pack_block is packing
    original_ext: Any = None  # GPTQModel's pack_block_cpu, unpatched


_active: _Registry | None = None


def offer_pack_words(module: nn.Module, words: PackedWords) -> None:
    """Keep ``words`` for ``module``'s pack (inside :func:`served_pack_words`; else nothing)."""
    registry = _active
    if registry is None:
        return
    with registry.lock:
        registry.words[module] = words
        registry.stats.offered += 1


#: Most threads packing ahead (:func:`pack_ahead`); GPTQModel's extension runs with the interpreter lock released.
#: A Qwen3-30B-A3B layer's 256 gate/up projections take about 12-25 ms each in the extension: on twelve threads
#: about 0.3 s, inside the layer's down subset that follows them. (On an H100 host in round 66 the subsets beside
#: twelve such threads grew by more than the finalizes saved: docs/performance.md.)
PACK_AHEAD_THREADS = 12
#: Cores left to the main thread and GPTQModel's device workers, which go on with the layer meanwhile.
PACK_AHEAD_SPARE_CORES = 4
_pack_pool: ThreadPoolExecutor | None = None
_pack_pool_lock = threading.Lock()


def pack_ahead_threads() -> int:
    """How many threads pack ahead in this process: :data:`PACK_AHEAD_THREADS` at most, the cores this process may
    run on but :data:`PACK_AHEAD_SPARE_CORES`, at least one."""
    return threads_beside(PACK_AHEAD_THREADS, spare=PACK_AHEAD_SPARE_CORES)


def _pack_threads() -> ThreadPoolExecutor:
    global _pack_pool
    with _pack_pool_lock:
        if _pack_pool is None:
            _pack_pool = ThreadPoolExecutor(max_workers=pack_ahead_threads(), thread_name_prefix="defuser-quant-pack")
        return _pack_pool


def pack_ahead(module: nn.Module, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor, bits: int) -> bool:
    """Start ``module``'s words with GPTQModel's own extension, on the pack-ahead threads, from the
    inputs its ``pack_block`` will pass (``weight`` [out, in] complete on its device, moved to the
    CPU there; ``scales``/``zeros`` [out, groups] and ``g_idx`` on the CPU, as the batched solve
    hands them over). ``pack_block`` then takes them where its inputs are these, waiting for them if
    they are being packed, or packing them itself if their pack has not started yet (so the finalize
    workers never sit waiting behind a queue). Inside :func:`served_pack_words` only; returns whether
    it was queued."""
    registry = _active
    if registry is None or int(bits) not in PACK_BITS or not (scales.device.type == zeros.device.type ==
                                                              g_idx.device.type == "cpu"):
        return False
    extension = registry.original_ext  # GPTQModel's own, not the serving patch
    ready = None
    if weight.device.type == "cuda":  # the weight as the caller's stream has it now, copied on a stream of the job's
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(weight.device))

    def job() -> PackedWords:
        w = _host_copy(weight, ready)  # what pack_block hands the extension (its copy=False move)
        s, z, g = scales.T.contiguous(), zeros.T.contiguous(), g_idx.to(dtype=torch.int32)
        qweight, qzeros = extension(w, s, z, g, int(bits), 32, 8192, 1)
        return PackedWords(int(bits), qweight, qzeros, scales, zeros, g_idx, weight_fingerprint(w),
                           dtypes=(w.dtype, s.dtype, z.dtype, g.dtype))

    future = _pack_threads().submit(job)
    with registry.lock:
        registry.pending[module] = future
        registry.stats.offered += 1
    return True


def _host_copy(weight: torch.Tensor, ready: Any) -> torch.Tensor:
    """``weight`` on the CPU. A CUDA weight is copied on a side stream once ``ready`` (an event recorded where the
    weight was handed over) has passed, so the copy neither queues behind the work on the device's default stream
    (the layer's next forward) nor holds that work up."""
    if ready is None:
        return weight.detach().to("cpu")
    stream = torch.cuda.Stream(device=weight.device)
    stream.wait_event(ready)
    with torch.cuda.stream(stream):
        return weight.detach().to("cpu")


def take_words(module: Any, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
               bits: int, word_bits: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``module``'s words (a ``nn.Linear`` or GPTQModel ``NamedModule``; offered by the solve or packed ahead) for the
    extension's arguments ``weight`` .. ``word_bits``, each its own storage, where these are the inputs they were
    packed from; None (the caller runs the extension, as stock) where there are none, they were packed from other
    inputs, their pack ahead raised or had not started yet (it is taken back). A pack ahead under way is waited for.
    Each module's words are taken once; outside :func:`served_pack_words`, always None."""
    words = _take(module, lambda w: w.matches(weight, scales, zeros, g_idx, bits, word_bits))
    if words is None:
        return None
    return words.qweight.clone(), words.qzeros.clone()  # each its own storage (the words may be views of a host copy)


def take_packed(module: Any, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                bits: int) -> PackedWords | None:
    """:func:`take_words` for the tensors ``pack_block`` starts from (:meth:`PackedWords.matches_inputs`: no transposed
    copies made), returning the words as they are: ``qweight`` and ``qzeros`` may be views of a host copy, for the
    caller to copy."""
    return _take(module, lambda w: w.matches_inputs(weight, scales, zeros, g_idx, bits))


def _take(module: Any, match: Callable[[PackedWords], bool]) -> PackedWords | None:
    registry = _active
    if registry is None:
        return None
    module = _linear_of(module)
    with registry.lock:
        words = registry.words.pop(module, None)
        pending = registry.pending.pop(module, None)
    # packed ahead (never together with offered words: BatchedSolve's pack and pack_ahead exclude each other)
    if pending is not None:
        if pending.cancel():  # not started yet: the caller packs it, now
            with registry.lock:
                registry.stats.taken_back += 1
        else:  # being packed: wait for it
            t0 = time.perf_counter()
            try:
                words = pending.result()
            except Exception as exc:  # the caller's own pack, as stock
                logger.debug("a pack started ahead failed (%s); GPTQModel's extension packs the module", exc)
                with registry.lock:
                    registry.stats.failed += 1
            with registry.lock:
                registry.stats.waited_seconds += time.perf_counter() - t0
    if words is None:
        return None
    served = match(words)
    with registry.lock:
        registry.stats.served += served
        registry.stats.refused += not served
    if not served:
        logger.debug("packed words of a batched module did not match pack_block's inputs; GPTQModel's extension packs it")
        return None
    return words


def _linear_of(module: Any) -> Any:
    """The ``nn.Linear`` behind a GPTQModel ``NamedModule`` (or the module itself)."""
    return getattr(module, "module", module)


@contextmanager
def served_pack_words() -> Iterator[PackStats]:
    """Inside the block, GPTQModel's ``pack_block`` takes offered words in place of its extension's
    result where the inputs match (see the module docstring); restored after."""
    global _active
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear
    from gptqmodel.nn_modules.qlinear import pack_block_ext

    if _active is not None:
        raise RuntimeError("served_pack_words() is already active (one GPTQModel quantization at a time)")
    registry = _Registry()
    original_block, original_ext = PackableQuantLinear.pack_block, pack_block_ext.pack_block_cpu
    registry.original_ext = original_ext

    @functools.wraps(original_block)
    def pack_block(self, linear, *args, **kwargs):
        registry.current.module = _linear_of(linear)
        try:
            return original_block(self, linear, *args, **kwargs)
        finally:
            registry.current.module = None

    @functools.wraps(original_ext)
    def pack_block_cpu(weight, scales, zeros, g_idx, bits, word_bits, block_in, threads):
        module = getattr(registry.current, "module", None)
        words = take_words(module, weight, scales, zeros, g_idx, bits, word_bits) if module is not None else None
        if words is not None:
            return words
        return original_ext(weight, scales, zeros, g_idx, bits, word_bits, block_in, threads)

    PackableQuantLinear.pack_block, pack_block_ext.pack_block_cpu = pack_block, pack_block_cpu
    _active = registry
    try:
        yield registry.stats
    finally:
        PackableQuantLinear.pack_block, pack_block_ext.pack_block_cpu = original_block, original_ext
        _active = None
        registry.words.clear()
        for future in list(registry.pending.values()):  # packs nobody asked for (a run that ended early)
            future.cancel()
        registry.pending.clear()
