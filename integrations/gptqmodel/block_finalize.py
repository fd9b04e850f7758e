"""The ``block_finalize`` part of :func:`~.overhead.lean_bookkeeping` (a default where the process has 16 cores or more,
``overhead.MANY_CORE_PARTS``): a layer's expert projections of one role in one experts block (its 128 ``gate_proj``,
say) finalized together, by one worker.

GPTQModel 7.6 finalizes each quantized module on its own CPU worker task (``GPTQProcessor.submodule_finalize``): it
creates the quantized module, then ``pack_module`` -> ``PackableQuantLinear.pack_block`` registers its ``g_idx`` and
float16 ``scales``, runs the C++ pack extension (``pack_block_cpu``, which releases the interpreter lock) for
``qweight`` and ``qzeros``, and the v2 -> v1 zero-point conversion follows. At Qwen3-30B-A3B shape the extension takes
about 16 ms a module and the Python around it about 2 ms (this CPU, one thread: the module's constructor 0.65 ms, most
of it 48 ``nn.Module.__setattr__`` calls; ``pack_block``'s and ``pack_module``'s bookkeeping and the conversion the
rest). On eight workers the last layer's 388 finalizes are then bounded twice over at about 0.8 s: by the extension
(388 x 16 ms over eight threads) and by the Python, which the threads take turns at under one interpreter lock
(388 x 2 ms). Adding workers (``tail_workers``, round 42) lifts only the first bound, packing on the GPU
(``BatchedSolve(pack=True)``, round 45) only the second, and neither shortened the runs.

Here the first finalize task of such a group to run takes the group: it finalizes its own module with GPTQModel's own
``submodule_finalize`` (the reference), then every other processed member of the group itself, while the members' own
tasks, on the other workers, wait for their module and return. For each member it hands the extension call to a pool
of :data:`EXT_THREADS` threads at once (all of them before the first module is made), and keeps on the worker only
GPTQModel's ``create_quant_module`` (the quantized module as GPTQModel makes it), the buffer registrations
``pack_block`` makes, in its order, with the tensors it would register, and the conversion as one subtraction; then the
state and result pops and the weight's removal, as ``submodule_finalize`` ends. The same calls with the same inputs:
the same modules and buffers. What a member's finalize drops (its popped state and result, its weight) is freed by the
member's own task, not by the group's worker (a tensor's deallocation gives up the interpreter lock, and beside busy
threads the worker waited up to a switch interval for it each time), and its results are copied after the processor's
lock is let go, not under it.

Checked, not assumed: the reference's own inputs (its weight, scales, zeros and ``g_idx``, read before GPTQModel's
finalize takes them) go through this path's tensor step, and its buffers must equal, in name, order, dtype, shape and
value, the ones GPTQModel's finalize registered (and its zero-point format); a group where they differ is left to
GPTQModel (its members' own tasks run its finalize), with a warning. A member whose step raises is left untouched for
its own task (the tensors are built before its quantized module is made, and its state is popped last). Only for
GPTQModel 7.6's own functions (compared by source digest), its GPTQ processor without EoRA, activation modes, GPTAQ,
FOEM or a ``dynamic`` config, ``pack_impl`` ``"cpu"``/``"block"``, a packable 2/4/8-bit kernel class with GPTQModel's
``pack_block``, int32 words and neither ``GPTQMODEL_DISABLE_PACK_EXT`` nor
``GPTQMODEL_PACK_THREADS`` set, and bias-free ``nn.Linear`` expert projections of our blocks; anything else runs
GPTQModel's per-module finalize, counted by reason. A group whose reference cannot be checked (the extension does not
load in this process, say, where GPTQModel's ``pack_block`` falls back to its Python path) is left to GPTQModel too.

The group's worker makes its members' quantized modules with GPTQModel's ``create_quant_module`` for the first two;
where a copy of the first one's module, taken before its buffers (:func:`clone_module`), can stand in for the second
as GPTQModel made it (:func:`same_module_state`: the same attributes, equal, and nothing mutable shared with the
template), the later members are such copies (the constructor and its checks are the same per module Python with the same arguments), else every member is
made by GPTQModel's function.

With ``device_words`` (the opt-in part of that name), each layer's groups are packed on the layer's CUDA device when
GPTQModel's ``post_quantize`` gets the layer, before it moves it to the CPU (:func:`.packing.pack_words`, the
extension's float32 steps); the reference is checked with its device words (words that differ send the group back to
the extension, with a warning), and each member takes its words where its finalize's inputs (weight fingerprint,
scales, zeros, ``g_idx``) are the ones packed, else the extension packs it.

Words packed before the finalize by ``BatchedSolve(pack_ahead=True)`` (GPTQModel's own extension on background threads,
started as each module's result is taken, so a layer's gate/up projections are packed during its down subset) or
``BatchedSolve(pack=True)`` are taken by the members here too (:func:`.packing.take_packed`: only where the member's
inputs are the ones they were packed from, else the extension runs), and the reference's own
``pack_block`` takes its words the same way, then is checked against the extension's.

Measured on two 16-core H100 hosts (rounds 48 and 51, ``gptqmodel_cuda_2layers_round48[abc]_h100x1.json``,
``gptqmodel_cuda_2layers_round51a_h100x1.json``): the quantize was shorter than without the part in seven of eight pairs
and as long in one (the last layer's finalize window 0.44-0.79 s against 0.62-1.33 s). On a 2-core CPU (one extension
thread) its finalize window was twice as long, so it is a default only with 16 cores or more.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import pack_kernel, packing
from .compat import patched, source_digest
from .tail_workers import threads_beside

logger = logging.getLogger(__name__)

__all__ = ["DIGESTS", "EXT_THREADS", "RELEASE_REGION", "THREAD_PREFIX", "WAIT_REGION", "WORD_CHUNK", "WORD_DEVICES",
           "BlockFinalizeStats", "block_finalize", "clone_module", "ext_inputs", "internals_refusal", "pack_tensors",
           "same_module_state"]

#: sha256[:16] of the GPTQModel 7.6.0 functions this stands in for (their steps are the ones reproduced here).
DIGESTS = {
    "GPTQProcessor.submodule_finalize": "4f3ef982d74faba6",
    "pack_module": "b25a300545e8c25e",
    "PackableQuantLinear.pack_block": "eed0c79e645a59f9",
    "convert_gptq_v2_to_v1_format_module": "e4a9be9bb69ae931",
    "create_quant_module": "8a6faa7befab55c8",
}
#: Most threads running the pack extension for a group's members (GPTQModel's pack scaled up to 16 callers on a
#: 16-core host, ``pack_scaling_h200host_round40.json``); two of the process's cores are left to the main thread and
#: GPTQModel's device workers, which go on with the next layer meanwhile.
EXT_THREADS = 16
#: GPTQModel's v2 -> v1 zero-point offsets (``convert_gptq_v2_to_v1_format_module``) for the widths packed here.
V1_OFFSETS = {2: 0b01010101010101010101010101010101, 4: 0b00010001000100010001000100010001,
              8: 0b00000001000000010000000100000001}
#: Name prefix of the extension pool's threads (packing.py's pack-ahead pool is "defuser-quant-pack").
THREAD_PREFIX = "defuser-quant-block-finalize"
#: GPTQModel region timer names of a member's two steps outside GPTQModel's own ``create`` and ``pack`` regions (each a
#: timeline span): its group worker waiting for its tensors from the pool, and the state and result pops and the
#: weight's removal after its buffers (round 67: the last layer's window is not bound by the extension, the groups'
#: order or the switch interval; these say which step of a member is).
WAIT_REGION = "block_finalize_wait"
RELEASE_REGION = "block_finalize_release"
_BLOCK_IN = 8192  # pack_block's default block_in, which pack_module leaves as is
_ENV_REFUSED = ("GPTQMODEL_DISABLE_PACK_EXT", "GPTQMODEL_PACK_THREADS")
#: Devices whose layers' words ``device_words`` packs at the layer's end (on the CPU the extension on the pool is faster
#: than torch's operations on the main thread; the tests add the CPU to check the words there).
WORD_DEVICES = frozenset({"cuda"})
#: Members packed per ``packing.pack_words`` call at a layer's end: one host copy (a wait for the GPU) each, about
#: 45 MB of GPU working memory per member at 768 x 2048 (a Qwen3-30B-A3B layer: 24 calls, about 0.7 GB at a time).
WORD_CHUNK = 16


@dataclass
class BlockFinalizeStats:
    """What :func:`block_finalize` did in one run."""

    groups: int = 0  # groups taken by a worker
    checked: int = 0  # references whose buffers this path reproduced
    mismatched: int = 0  # references it did not reproduce (or could not check): the group left to GPTQModel
    batched: int = 0  # members finalized by their group's worker (the references not counted)
    ext_threads: int = 0  # threads of the extension pool (0: never used)
    cloned: int = 0  # members made as a copy of their group's checked template instead of GPTQModel's constructor
    left: Counter = field(default_factory=Counter)  # "<reason>" -> finalizes left to GPTQModel's own
    words_packed: int = 0  # device_words: members whose words were packed on their layer's device at its end
    words_used: int = 0  # ... that their group's worker took instead of running the extension
    words_seconds: float = 0.0  # main-thread seconds spent packing them (before the layer's move to the CPU)
    words_left: Counter = field(default_factory=Counter)  # "<reason>" -> members (or groups) packed by the extension
    stolen: int = 0  # steal_groups: groups taken by a waiting member's task instead of one of their own members'
    words_ahead: int = 0  # members that took words packed before their finalize (BatchedSolve's pack_ahead or pack)
    row_packed: int = 0  # row_pack: modules (references' checks included) whose words pack_kernel made
    row_pack_refused: str | None = None  # row_pack: why GPTQModel's extension packed instead (the kernel not built)

    def as_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "checked": self.checked, "mismatched": self.mismatched,
                "batched": self.batched, "ext_threads": self.ext_threads, "cloned": self.cloned, "stolen": self.stolen,
                "left": dict(self.left), "words_packed": self.words_packed, "words_used": self.words_used,
                "words_seconds": round(self.words_seconds, 3), "words_left": dict(self.words_left),
                "words_ahead": self.words_ahead, "row_packed": self.row_packed,
                "row_pack_refused": self.row_pack_refused}


def internals_refusal() -> str | None:
    """Why the installed GPTQModel's finalize is not the one reproduced here (None: it is)."""
    from gptqmodel.looper.gptq_processor import GPTQProcessor
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear
    from gptqmodel.utils import model as model_utils

    functions = {
        "GPTQProcessor.submodule_finalize": getattr(GPTQProcessor, "submodule_finalize", None),
        "pack_module": getattr(model_utils, "pack_module", None),
        "PackableQuantLinear.pack_block": getattr(PackableQuantLinear, "pack_block", None),
        "convert_gptq_v2_to_v1_format_module": getattr(model_utils, "convert_gptq_v2_to_v1_format_module", None),
        "create_quant_module": getattr(model_utils, "create_quant_module", None),
    }
    for name, fn in functions.items():
        if fn is None or source_digest(fn) != DIGESTS[name]:
            return f"GPTQModel's {name} is not 7.6.0's"
    return None


def pack_tensors(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                 words: tuple[torch.Tensor, torch.Tensor], bits: int, pack_dtype: torch.dtype,
                 to_v1: bool, views: bool = False) -> dict[str, torch.Tensor]:
    """The buffers ``pack_block`` (extension path) registers, in its order, then the v1 conversion: ``g_idx``,
    ``scales`` (float16, [groups, out]), ``qweight``, ``qzeros``. ``words`` is the extension's result for
    :func:`ext_inputs` of the same tensors; ``views``: they may share storage with other tensors (words packed on the
    device, views of their group's host copy), so each buffer made from them gets its own."""
    if g_idx.numel() != weight.shape[1]:
        raise ValueError(f"g_idx length {g_idx.numel()} != in_features {weight.shape[1]}")
    # conversions and copies only where they change something: every torch call gives up the interpreter lock, even
    # one that returns its input (benchmarks/gil_drops.py)
    qweight = _own(words[0], pack_dtype, views)
    qzeros = _own(words[1], pack_dtype, views and not to_v1)  # the v1 subtraction makes a new tensor anyway
    if to_v1:
        qzeros = qzeros - V1_OFFSETS[bits]
    # one copy, float16 and contiguous at once (pack_block's ``scales.T.contiguous()`` then ``.to(float16)``, the same
    # values), always its own storage
    half = scales.T.to(dtype=torch.float16, memory_format=torch.contiguous_format, copy=True)
    return {"g_idx": _on_cpu(g_idx), "scales": half, "qweight": qweight, "qzeros": qzeros}


def _own(tensor: torch.Tensor, dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """``tensor`` as ``dtype``, in storage of its own where it may be ``shared``."""
    if tensor.dtype != dtype:
        return tensor.to(dtype=dtype)
    return tensor.clone() if shared else tensor


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.device.type == "cpu" else tensor.to("cpu")


def ext_inputs(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
               bits: int) -> tuple:
    """The arguments ``pack_block`` hands the extension (weight [out, in] on the CPU; scales/zeros [groups, out])."""
    weight = weight.detach() if weight.requires_grad else weight  # a weight already detached is not viewed again
    g_idx = _on_cpu(g_idx)
    return (_on_cpu(weight), scales.T.contiguous(), zeros.T.contiguous(),
            g_idx if g_idx.dtype == torch.int32 else g_idx.to(dtype=torch.int32), int(bits), 32, _BLOCK_IN, 1)


def clone_module(template: nn.Module, name: str) -> nn.Module:
    """A new module of ``template``'s class with its attributes: containers copied (one level), objects that point
    back at ``template`` copied and pointed at the new module, ``name`` set. Only used where :func:`same_module_state`
    found such a copy able to stand in for what GPTQModel's constructor makes (see :class:`_Maker`)."""
    new = type(template).__new__(type(template))
    state = {}
    for key, value in template.__dict__.items():
        if isinstance(value, (dict, set, list)):
            value = value.copy()
        elif _points_at(value, template):
            value = _copy_pointing(value, template, new)
        state[key] = value
    state["name"] = name
    new.__dict__.update(state)
    return new


def _points_at(value: Any, target: Any) -> bool:
    fields = getattr(value, "__dict__", None)
    return (isinstance(fields, dict) and not isinstance(value, (type, nn.Module, torch.Tensor))
            and any(v is target for v in fields.values()))


def _copy_pointing(value: Any, old: Any, new: Any) -> Any:
    copied = object.__new__(type(value))
    copied.__dict__.update({k: (new if v is old else v) for k, v in value.__dict__.items()})
    return copied


_IMMUTABLE = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)


def same_module_state(fresh: nn.Module, copy: nn.Module) -> bool:
    """Whether ``copy`` (a :func:`clone_module`) can stand in for ``fresh`` (what GPTQModel's constructor made): the
    same class and attribute names, and each attribute equal in a way that shares nothing mutable with another module.
    An attribute is the same object in both (shared by the constructor too: enum members, classes), an equal immutable
    value, a container the copy has its own of, holding such values, or an object pointing back at its own module
    whose fields are such values. Anything else (a tensor attribute, a nested container, another object) makes the
    copy unusable: it would share that object with its template."""
    if type(fresh) is not type(copy) or list(vars(fresh)) != list(vars(copy)):
        return False
    return all(_same_attribute(vars(fresh)[k], vars(copy)[k], fresh, copy, top=True) for k in vars(fresh))


def _same_attribute(a: Any, b: Any, a_self: Any, b_self: Any, top: bool = False) -> bool:
    if a is a_self or b is b_self:
        return a is a_self and b is b_self
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, _IMMUTABLE):
        return a == b
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same_attribute(x, y, a_self, b_self) for x, y in zip(a, b))
    if top and isinstance(a, dict):  # copied one level by clone_module: its values must be shared or immutable
        return list(a) == list(b) and all(_same_attribute(a[k], b[k], a_self, b_self) for k in a)
    if top and isinstance(a, list):
        return len(a) == len(b) and all(_same_attribute(x, y, a_self, b_self) for x, y in zip(a, b))
    if top and isinstance(a, set):
        return a == b and all(isinstance(x, _IMMUTABLE) for x in a)
    if top and _points_at(a, a_self) and _points_at(b, b_self):  # copied by clone_module, pointed at its module
        return list(vars(a)) == list(vars(b)) and all(
            _same_attribute(vars(a)[k], vars(b)[k], a_self, b_self) for k in vars(a))
    return False


@dataclass
class _Member:
    group: "_Group"
    done: threading.Event = field(default_factory=threading.Event)
    finalized: bool = False  # by the group's worker (else: its own task runs GPTQModel's finalize)
    error: Exception | None = None  # what GPTQModel's finalize of this reference raised on another member's task
    # what its finalize dropped (its state's results, its weight), freed by its own task rather than its group's worker:
    # a tensor's deallocation gives up the interpreter lock, and beside busy threads each took the worker up to a
    # switch interval to get it back (docs/performance.md round 67)
    dropped: list | None = None


@dataclass
class _Group:
    members: list = field(default_factory=list)  # NamedModules, in process order
    taken: bool = False
    stock: str | None = None  # why the group is left to GPTQModel
    proc: Any = None  # the GPTQ processor that processed the members
    layer: Any = None  # the members' GPTQModel layer index
    words: dict | None = None  # device_words: NamedModule -> packing.PackedWords, packed at the layer's end


class _Finalizer:
    def __init__(self, gptq_model: Any, paths: frozenset[str], stats: BlockFinalizeStats, steal: bool = False,
                 priority: Any = None, row_pack: bool = False) -> None:
        self.gptq_model, self.paths, self.stats, self.steal, self.row_pack = gptq_model, paths, stats, steal, row_pack
        self.pause: Callable[[], None] = priority.pause if priority is not None else _no_pause
        self.lock = threading.Lock()
        self.groups: dict[tuple, _Group] = {}
        self.members: dict[Any, _Member] = {}  # NamedModule -> its state here
        self.why_not: dict[Any, str] = {}  # NamedModule processed under the part -> why it is not a member
        self.refusals: dict[int, str | None] = {}  # id(processor) -> why its finalizes stay stock
        self.pool: ThreadPoolExecutor | None = None
        self.original: Callable | None = None
        self.closed = False

    # --- what is eligible --------------------------------------------------------------------------------------
    def _processor_refusal(self, proc: Any) -> str | None:
        from gptqmodel.looper.gptq_processor import GPTQProcessor
        from gptqmodel.nn_modules.qlinear import PackableQuantLinear

        q = proc.qcfg
        kernel = getattr(self.gptq_model, "qlinear_kernel", None)
        impl = (getattr(q, "pack_impl", "original") or "original").lower()
        quant_type = str(getattr(kernel, "QUANT_TYPE", ""))
        checks = [
            (type(proc) is GPTQProcessor, "not GPTQModel's GPTQ processor"),
            (not getattr(proc, "calculate_w_wq_diff", False), "EoRA's weight difference"),
            (not getattr(q, "activation_mode", None), "an activation mode"),
            (getattr(q, "gptaq", None) is None and getattr(q, "foem", None) is None, "GPTAQ or FOEM"),
            (getattr(q, "dynamic", None) is None, "a dynamic per-module config"),
            (impl in {"cpu", "block", "pack_block"}, f"pack_impl {impl!r}"),
            (isinstance(kernel, type) and issubclass(kernel, PackableQuantLinear)
             and getattr(kernel, "pack_block", None) is PackableQuantLinear.pack_block
             and quant_type != "qqq" and not quant_type.startswith("awq_") and quant_type != "llm-awq",
             "a kernel without GPTQModel's own pack_block"),
            (int(getattr(q, "runtime_bits", 0)) in V1_OFFSETS, "a width other than 2, 4 or 8 bits"),
            (getattr(q, "pack_dtype", None) == torch.int32, "words other than int32"),
            (not [name for name in _ENV_REFUSED if os.environ.get(name)], "a GPTQMODEL pack environment setting"),
        ]
        for ok, why in checks:
            if not ok:
                return why
        return None  # the extension is loaded by the reference's own pack, on a finalize worker, as stock

    def _member_refusal(self, proc: Any, module: Any) -> str | None:
        with self.lock:
            if id(proc) not in self.refusals:
                self.refusals[id(proc)] = self._processor_refusal(proc)
            why = self.refusals[id(proc)]
        if why is not None:
            return why
        inner = getattr(module, "module", None)
        if getattr(module, "full_name", None) not in self.paths:
            return "not an expert projection of our blocks"
        if not isinstance(inner, nn.Linear) or inner.bias is not None:
            return "not a bias-free nn.Linear"
        return None

    # --- the patches -------------------------------------------------------------------------------------------
    def patch_process(self, original: Callable) -> Callable:
        finalizer = self

        @functools.wraps(original)
        def process(self, module, *args, **kwargs):
            out = original(self, module, *args, **kwargs)
            finalizer.record(self, module)
            return out

        return process

    def record(self, proc: Any, module: Any) -> None:
        """Note a processed module: a member of its group, or why not."""
        why = self._member_refusal(proc, module)
        with self.lock:
            if why is not None:
                self.why_not[module] = why
            elif module not in self.members:
                group = self.groups.setdefault(_group_key(proc, module),
                                               _Group(proc=proc, layer=getattr(module, "layer_index", None)))
                group.members.append(module)
                self.members[module] = _Member(group)

    def patch_post_quantize(self, original: Callable) -> Callable:
        finalizer = self

        @functools.wraps(original)
        def post_quantize(self, module, *args, **kwargs):
            finalizer.pack_layer(module)  # before the layer leaves its device
            return original(self, module, *args, **kwargs)

        return post_quantize

    def pack_layer(self, layer: nn.Module) -> None:
        """``device_words``: every untaken group of ``layer``'s expert projections packed on the layer's device, from
        the processed scales, zeros and ``g_idx`` its finalize will read (a group that cannot be is left to the
        extension, counted by reason). Runs on the main thread before GPTQModel moves the layer to the CPU."""
        inside = {id(m) for m in layer.modules()}
        with self.lock:
            groups = [g for g in self.groups.values() if not g.taken and g.words is None and not self.closed
                      and id(getattr(g.members[0], "module", None)) in inside]
        t0 = time.perf_counter()
        for group in groups:
            try:
                words = _pack_group(group)
            except Exception as exc:  # noqa: BLE001 - the extension packs the group on the pool, as without words
                why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, _NoWords) else str(exc)
                with self.lock:
                    self.stats.words_left[why] += len(group.members)
                continue
            with self.lock:
                group.words = words
                self.stats.words_packed += len(words)
        if groups:
            with self.lock:
                self.stats.words_seconds += time.perf_counter() - t0

    def patch_submodule_finalize(self, original: Callable) -> Callable:
        finalizer = self
        self.original = original

        @functools.wraps(original)
        def submodule_finalize(self, module, model, **kwargs):
            return finalizer.finalize(self, module, model, kwargs)

        return submodule_finalize

    def finalize(self, proc: Any, module: Any, model: Any, kwargs: dict) -> Any:
        original = self.original
        self.pause()  # every finalize task, GPTQModel's own (references, other modules) too, waits out a layer load
        with self.lock:
            member = self.members.get(module)
            runner = member is not None and not member.group.taken and not self.closed
            if runner:
                member.group.taken = True
            elif member is None or not member.group.taken:  # not a member, or the part has ended untaken
                self.stats.left[self.why_not.get(module, "not processed under the part")] += 1
                member = None
        if member is None:
            return original(proc, module, model, **kwargs)
        if runner:
            return self._run_group(member.group, proc, module, member, model, kwargs)
        if self.steal:
            self._steal(proc, member, model, kwargs)
        member.done.wait()
        member.dropped = None  # freed here, on this member's own task
        if member.error is not None:  # its group was taken by another member's task and GPTQModel's finalize raised
            raise member.error
        if member.finalized:
            return None
        with self.lock:
            self.stats.left[member.group.stock or "its group's worker left it"] += 1
        return original(proc, module, model, **kwargs)

    def _steal(self, proc: Any, own: _Member, model: Any, kwargs: dict) -> None:
        """``steal_groups``: while another worker makes ``own``'s group, this member's task takes every group of the
        same processor and layer that no task has taken yet (all of them are processed and on the CPU: a layer's
        finalize tasks are handed out after its ``post_quantize``), its first member the reference."""
        while True:
            with self.lock:
                group = None if self.closed else next(
                    (g for g in self.groups.values() if not g.taken and g.stock is None and g.proc is proc
                     and g.layer == own.group.layer and g.members), None)
                if group is None:
                    return
                group.taken = True
                self.stats.stolen += 1
                ref = group.members[0]
                ref_member = self.members[ref]
            self._run_group(group, proc, ref, ref_member, model, kwargs, stolen=True)

    # --- one group ---------------------------------------------------------------------------------------------
    def _run_group(self, group: _Group, proc: Any, ref: Any, ref_member: _Member, model: Any, kwargs: dict,
                   stolen: bool = False) -> Any:
        """Finalize ``group``: ``ref`` by GPTQModel's function, checked, then the other members here. ``stolen``: run on
        another member's task, so what GPTQModel's finalize of ``ref`` raises goes to ``ref``'s own task."""
        with self.lock:
            self.stats.groups += 1
        others = [m for m in group.members if m is not ref]
        try:
            why, snapshot, to_v1 = None, None, False
            try:
                snapshot = _inputs(proc, ref, model)
            except Exception as exc:  # GPTQModel's finalize below reads them its own way (and raises as stock)
                why = f"its inputs could not be read ({type(exc).__name__}: {exc})"
            try:
                out = self.original(proc, ref, model, **kwargs)  # the reference: GPTQModel's own finalize
            except Exception as exc:
                if not stolen:
                    raise
                ref_member.error, group.stock = exc, f"its reference's finalize raised {type(exc).__name__}"
                return None  # the members' own tasks run GPTQModel's finalize, as after a reference of their own
            ref_member.finalized = True
            if snapshot is not None:
                try:
                    qref = model.model.get_submodule(ref.full_name)
                    to_v1 = _to_v1(proc.qcfg, qref)  # one kernel class and config for the whole group
                    why = self._check_words(group, ref, qref, snapshot, to_v1)
                except Exception as exc:  # the extension does not load, say: GPTQModel's pack_block fell back
                    why = f"the check raised {type(exc).__name__}: {exc}"
            if why is not None:
                group.stock = why
                with self.lock:
                    self.stats.mismatched += 1
                logger.warning("block_finalize: %s's quantized buffers differ from this path's (%s); GPTQModel "
                               "finalizes its group one module at a time", ref.full_name, why)
                return out
            with self.lock:
                self.stats.checked += 1
            self._finalize_members(proc, model, group, others, int(qref.bits), qref.pack_dtype, to_v1)
            return out
        finally:
            group.words = None  # the layer's host copies of its words (about 0.3 GB a Qwen3-30B-A3B layer) go now
            ref_member.done.set()
            for m in others:  # anything not finalized goes back to its own task
                self.members[m].done.set()

    def _check_words(self, group: _Group, ref: Any, qref: nn.Module, snapshot: tuple, to_v1: bool) -> str | None:
        """The reference checked with its device-packed words where its group has them (their members then take
        theirs; words that differ are dropped, with a warning, and the extension packs the group), else with the
        extension's."""
        words = (group.words or {}).get(ref)
        if words is not None:
            why = self._check(qref, snapshot, to_v1, words)
            if why is None:
                return None
            logger.warning("block_finalize: %s's words packed on its device differ from GPTQModel's (%s); the "
                           "extension packs its group", ref.full_name, why)
            with self.lock:
                self.stats.words_left[f"the reference's device words differ ({why})"] += len(group.members)
        group.words = None
        return self._check(qref, snapshot, to_v1)

    def _check(self, qmodule: nn.Module, snapshot: tuple, to_v1: bool,
               words: packing.PackedWords | None = None) -> str | None:
        """Why the reference's buffers (GPTQModel's) differ from this path's for its own inputs (None: equal), with
        the extension's words for them or the given device-packed ``words``."""
        weight, scales, zeros, g_idx = snapshot
        bits = int(qmodule.bits)
        args = ext_inputs(weight, scales, zeros, g_idx, bits)
        if words is None:
            result = self._ext()(*args)
        elif not words.matches(*args[:6]):
            return "its inputs are not the ones its words were packed from"
        else:
            result = (words.qweight, words.qzeros)
        mine = pack_tensors(weight, scales, zeros, g_idx, result, bits, qmodule.pack_dtype, to_v1)
        theirs = [(name, buf) for name, buf in qmodule._buffers.items() if name in mine]
        if [name for name, _ in theirs] != list(mine):
            return f"buffers {[name for name, _ in theirs]}, expected {list(mine)}"
        for name, buf in theirs:
            if buf is None or buf.dtype != mine[name].dtype or not torch.equal(buf, mine[name]):
                return f"{name} differs"
        if getattr(qmodule, "bias", None) is not None:
            return "a bias buffer"
        if to_v1 and qmodule.qzero_format() != 1:
            return "the zero-point format is not v1"
        return None

    def _ext(self) -> Callable:
        """The pack for this path's words: GPTQModel's extension, or with ``row_pack`` :mod:`.pack_kernel` where it is
        built (each group's reference is checked with it against GPTQModel's own finalize, as with the extension)."""
        from gptqmodel.nn_modules.qlinear.pack_block_ext import pack_block_cpu

        if not self.row_pack:
            return pack_block_cpu
        kernel = pack_kernel.load()
        if kernel is None:
            self.stats.row_pack_refused = "pack_kernel could not be built here"
            return pack_block_cpu

        def pack(weight, scales, zeros, g_idx, bits, word_bits, block_in, threads):
            # the extension's arguments (ext_inputs): 32-bit words always, 2/4/8 bits (_processor_refusal), one thread
            words = kernel(weight, scales, zeros, g_idx, int(bits))
            with self.lock:
                self.stats.row_packed += 1
            return words

        return pack

    def _finalize_members(self, proc: Any, model: Any, group: _Group, members: list, bits: int,
                          pack_dtype: torch.dtype, to_v1: bool) -> None:
        try:
            pool, ext, fmt = self._pool(), self._ext(), _format(proc.qcfg)
        except Exception as exc:  # the part has ended: every member goes back to its own task
            logger.debug("block_finalize: members left to GPTQModel's finalize (%s)", exc)
            return
        words = group.words or {}

        def tensors_of(module: Any) -> tuple[dict[str, torch.Tensor], bool]:
            """A member's buffers, from its device-packed words where they are for its inputs, else the extension."""
            self.pause()
            inputs = _inputs(proc, module, model)
            packed = words.get(module)
            if packed is not None and packed.matches_inputs(*inputs, bits):
                result, used, views = (packed.qweight, packed.qzeros), "device", True  # views of the group's copy
            # else words packed ahead of the finalize (BatchedSolve's pack_ahead or pack), for these inputs only
            elif (ahead := packing.take_packed(module, *inputs, bits)) is not None:
                result, used, views = (ahead.qweight, ahead.qzeros), "ahead", True
            else:
                result, used, views = ext(*ext_inputs(*inputs, bits)), None, False
            return pack_tensors(*inputs, result, bits, pack_dtype, to_v1, views=views), used

        pending: list[tuple[Any, Future]] = []
        for module in members:  # every member's tensors handed out first: they are made while the modules are
            try:
                pending.append((module, pool.submit(tensors_of, module)))
            except Exception as exc:  # its own task runs GPTQModel's finalize
                _leave(module, exc)
                self.members[module].done.set()
        maker = _Maker()
        timer = getattr(model, "quant_region_timer", None)
        for module, future in pending:
            try:
                t0 = time.perf_counter()
                tensors, used = future.result()
                if timer is not None:
                    timer.record(WAIT_REGION, time.perf_counter() - t0, source=module.full_name)
                self.pause()
                copied, self.members[module].dropped = self._finalize_one(proc, model, module, tensors, fmt, to_v1,
                                                                          maker)
                self.members[module].finalized = True
                with self.lock:
                    self.stats.batched += 1
                    self.stats.cloned += copied
                    self.stats.words_used += used == "device"
                    self.stats.words_ahead += used == "ahead"
                    if module in words and used != "device":
                        self.stats.words_left["a member's inputs are not the ones its words were packed from"] += 1
            except Exception as exc:
                _leave(module, exc)
            finally:
                self.members[module].done.set()

    def _finalize_one(self, proc: Any, model: Any, module: Any, tensors: dict[str, torch.Tensor], fmt: Any,
                      to_v1: bool, maker: "_Maker") -> tuple[bool, list]:
        """``submodule_finalize``'s steps for one member whose buffers are ``tensors`` (``fmt`` and ``to_v1``: its
        group's format and zero-point conversion, read once; ``maker`` makes its group's quantized modules); returns
        whether its module was made as a copy, and what the steps dropped (the popped state and result, the removed
        weight), still referenced so that the member's own task frees it."""
        from gptqmodel.utils.module_locks import parent_module_lock

        timer = getattr(model, "quant_region_timer", None)
        t0 = time.perf_counter()
        with parent_module_lock(module.full_name):
            qmodule, copied = maker.make(proc, model, module, fmt)
            t1 = time.perf_counter()
            for name, tensor in tensors.items():
                qmodule.register_buffer(name, tensor)
                if name == "scales" and not hasattr(qmodule, "bias"):
                    qmodule.bias = None  # pack_block's step after the scales
            if to_v1:
                qmodule.qzero_format(format=1)
        t2 = time.perf_counter()
        with proc.lock:
            dropped = [module.state.pop(key, None) for key in ("w", "w_wq_diff", "q_zeros", "q_scales", "q_g_idx")]
        dropped.append(proc.result_pop(module.full_name))
        dropped.append(module.module._parameters.get("weight"))  # a bias-free nn.Linear (_member_refusal)
        module.unregister_parameter("weight")
        if timer is not None:
            timer.record("submodule_finalize_create", t1 - t0, source=module.full_name)
            timer.record("submodule_finalize_pack", t2 - t1, source=module.full_name)
            timer.record(RELEASE_REGION, time.perf_counter() - t2, source=module.full_name)
        return copied, dropped

    def _pool(self) -> ThreadPoolExecutor:
        with self.lock:
            if self.closed:
                raise RuntimeError("block_finalize has ended")
            if self.pool is None:
                self.stats.ext_threads = threads_beside(EXT_THREADS, spare=2)
                self.pool = ThreadPoolExecutor(max_workers=self.stats.ext_threads,
                                               thread_name_prefix=THREAD_PREFIX)
            return self.pool

    def close(self) -> None:
        with self.lock:
            self.closed = True
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        # the members' states stay: after an exception or Ctrl-C GPTQModel's finalize tasks may still be running, and a
        # member whose group a worker has taken must wait for it, not be finalized a second time as stock (its state is
        # gone by then); they go with this object, once no task uses it


class _Maker:
    """Makes one group's quantized modules: GPTQModel's ``create_quant_module`` for the first two members; when a copy
    of the first (:func:`clone_module`, taken before its buffers) has the second's state (:func:`same_module_state`),
    the later members are such copies, put in place with GPTQModel's ``recurse_setattr`` (the constructor and its
    checks are per module Python the group's worker would otherwise run for every member, with the same arguments)."""

    def __init__(self) -> None:
        self.candidate: nn.Module | None = None  # a copy of the first member's module, before its buffers
        self.template: nn.Module | None = None  # ... once checked against the second's
        self.checked = False

    def make(self, proc: Any, model: Any, module: Any, fmt: Any) -> tuple[nn.Module, bool]:
        """``module``'s quantized module, put in its place, and whether it is a copy."""
        from gptqmodel.utils.model import create_quant_module, recurse_setattr

        if self.template is not None:
            qmodule = clone_module(self.template, module.full_name)
            recurse_setattr(model.model, module.full_name, qmodule)
            return qmodule, True
        q = proc.qcfg
        create_quant_module(
            name=module.full_name, linear_cls=model.qlinear_kernel, bits=q.runtime_bits, desc_act=q.desc_act,
            dynamic=q.dynamic, group_size=q.group_size, module=model.model, submodule=module, sym=q.sym,
            device=q.device, lm_head_name=model.lm_head, pack_dtype=q.pack_dtype, format=fmt,
            register_buffers=False,
        )
        qmodule = model.model.get_submodule(module.full_name)
        if self.candidate is None:
            self.candidate = clone_module(qmodule, qmodule.name)
        elif not self.checked:
            self.checked = True
            if same_module_state(qmodule, clone_module(self.candidate, module.full_name)):
                self.template = self.candidate
            else:
                logger.debug("block_finalize: a copy of %s's quantized module differs from GPTQModel's for the next "
                             "member; its group's modules are made by GPTQModel's constructor", module.full_name)
        return qmodule, False


def _no_pause() -> None:
    return None


class _NoWords(Exception):
    """A group whose words are not packed on its layer's device (the extension packs them on the pool)."""


def _pack_group(group: _Group) -> dict:
    """``device_words`` for one group: NamedModule -> :class:`.packing.PackedWords`, packed on the members' device
    ``WORD_CHUNK`` at a time from the processed scales, zeros and ``g_idx`` (read as the finalize reads them; the
    words record them, and a member takes its words only where its finalize's inputs are these)."""
    proc, members = group.proc, list(group.members)
    bits = int(proc.qcfg.runtime_bits)
    weights = [getattr(getattr(m, "module", None), "weight", None) for m in members]
    if not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
        raise _NoWords("a member without a 2-D weight")
    device = weights[0].device
    if device.type not in WORD_DEVICES:
        raise _NoWords(f"weights on {device.type}")
    if any(w.device != device or w.shape != weights[0].shape for w in weights):
        raise _NoWords("members on several devices or of several shapes")
    if not packing.packable(bits, *weights[0].shape):
        raise _NoWords(f"{bits}-bit words of a {tuple(weights[0].shape)} weight")
    states = []
    for m in members:
        m.stream_sync()
        with proc.lock:
            states.append((m.state["q_scales"], m.state["q_zeros"], m.state["q_g_idx"]))
    if not all(t.device.type == "cpu" for st in states for t in st):
        raise _NoWords("processed tensors not on the CPU")
    shared = all(torch.equal(st[2], states[0][2]) for st in states)
    g_idx = states[0][2].to(device) if shared else None
    words: dict = {}
    with torch.inference_mode():
        for i in range(0, len(members), WORD_CHUNK):
            part = range(i, min(i + WORD_CHUNK, len(members)))
            weight = torch.stack([weights[j].detach() for j in part])
            scales = torch.stack([states[j][0] for j in part]).to(device).transpose(1, 2)
            zeros = torch.stack([states[j][1] for j in part]).to(device).transpose(1, 2)
            index = g_idx if shared else torch.stack([states[j][2] for j in part]).to(device)
            qweight, qzeros = packing.pack_words(weight, scales, zeros, index, bits)
            host = packing.host_copies([qweight, qzeros, packing.weight_fingerprint(weight)])
            for b, j in enumerate(part):
                sc, ze, gi = states[j]
                words[members[j]] = packing.PackedWords(bits, host[0][b], host[1][b], sc, ze, gi, host[2][b])
    return words


def _leave(module: Any, exc: BaseException) -> None:
    logger.debug("block_finalize: %s left to GPTQModel's finalize (%s: %s)", getattr(module, "full_name", module),
                 type(exc).__name__, exc)


def _group_key(proc: Any, module: Any) -> tuple:
    full_name = str(getattr(module, "full_name", ""))
    block, _, role = full_name.rpartition(".")
    block = block.rpartition(".")[0]  # drop the expert index: <experts block>.<e>.<role>
    weight = getattr(getattr(module, "module", None), "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    return id(proc), getattr(module, "layer_index", None), block, role, shape


def _inputs(proc: Any, module: Any, model: Any) -> tuple[torch.Tensor, ...]:
    """The weight (the layer's module in the model, as ``submodule_finalize`` looks it up), the processed ``zeros`` and
    ``scales`` and a copy of ``g_idx``, read as GPTQModel's finalize reads them (after the stream sync, taken from the
    state under the processor's lock), without popping them. Nothing writes these results and this path only reads
    ``scales`` and ``zeros`` (its buffers are new tensors made from them), so only ``g_idx``, which becomes a buffer,
    is copied, after the lock is let go: a copy, and the copy's deallocation, each give up the interpreter lock, and a
    holder copying under the processor's lock kept every other reader (and the group workers' state pops) waiting
    until it got the interpreter lock back (``benchmarks/gil_drops.py``)."""
    module.stream_sync()
    with proc.lock:
        zeros, scales, g_idx = module.state["q_zeros"], module.state["q_scales"], module.state["q_g_idx"]
    g_idx = g_idx.clone()
    if not (zeros.device.type == scales.device.type == g_idx.device.type == "cpu"):
        raise ValueError("the processed tensors are not on the CPU")
    layer = model.model.get_submodule(module.full_name)
    weight = layer.weight.detach()
    if weight.device.type != "cpu":
        raise ValueError("the weight is not on the CPU")
    return weight, scales, zeros, g_idx


def _format(qcfg: Any) -> Any:
    from gptqmodel.quantization.config import resolve_quant_format

    return resolve_quant_format(qcfg.format, qcfg.method)


def _to_v1(q: Any, qmodule: nn.Module) -> bool:
    """Whether ``pack_module``, handed the processor's config ``q``, converts ``qmodule``'s zero points to v1."""
    from gptqmodel.quantization.config import FORMAT, METHOD

    return (q.export_quant_method() == METHOD.GPTQ and _format(q) == FORMAT.GPTQ
            and bool(getattr(type(qmodule), "REQUIRES_FORMAT_V2", False)))


@contextmanager
def block_finalize(gptq_model: Any, paths: frozenset[str], device_words: bool = False,
                   steal_groups: bool = False, priority: Any = None,
                   row_pack: bool = False) -> Iterator[BlockFinalizeStats]:
    """Inside the block, GPTQModel's finalizes of our expert projections are taken a group at a time (see the
    module docstring); restored after, once every group's extension calls are done. ``device_words``: each layer's
    groups are also packed on the layer's device (:data:`WORD_DEVICES`) when GPTQModel's ``post_quantize`` gets the
    layer, before it moves it to the CPU; their members take those words instead of running the extension.
    ``steal_groups``: a member's task whose group another worker has taken first takes the groups of its layer that
    no task has reached yet, so a layer's groups are made side by side instead of one after another.
    ``priority`` (a :class:`~.load_priority.LoadPriority`): while a layer load holds it, every finalize task (before
    it starts), the group workers and the extension threads (before each member) wait at its ``pause()``.
    ``row_pack``: the members' words (and the references' checks) from :mod:`.pack_kernel` instead of GPTQModel's
    extension, where the kernel is built here (else the extension, said in ``row_pack_refused``)."""
    from gptqmodel.looper.gptq_processor import GPTQProcessor
    from gptqmodel.models.base import BaseQModel

    stats = BlockFinalizeStats()
    finalizer = _Finalizer(gptq_model, paths, stats, steal=steal_groups, priority=priority, row_pack=row_pack)
    with ExitStack() as stack:
        stack.callback(finalizer.close)  # last: after GPTQModel's functions are back
        stack.enter_context(patched(GPTQProcessor, "process", finalizer.patch_process(GPTQProcessor.process)))
        stack.enter_context(patched(GPTQProcessor, "submodule_finalize",
                                    finalizer.patch_submodule_finalize(GPTQProcessor.submodule_finalize)))
        if device_words:  # outermost post_quantize: the layer is still on its device
            stack.enter_context(patched(BaseQModel, "post_quantize",
                                        finalizer.patch_post_quantize(BaseQModel.post_quantize)))
        yield stats
