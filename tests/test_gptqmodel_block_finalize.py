"""The ``block_finalize`` lean part (integrations.gptqmodel.block_finalize): a layer's expert projections of one role
in one experts block finalized by one worker, after GPTQModel's own finalize of the first (the reference, checked
against this path's tensors). Real GPTQModel 7.6 runs on the tiny qwen3_moe: the checkpoint is the one without the
part; a reference that differs, a member that fails, a refused configuration and a changed GPTQModel leave the work
to GPTQModel's own finalize; Ctrl-C restores it and stops the extension threads."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("gptqmodel")

from gptqmodel.looper.gptq_processor import GPTQProcessor  # noqa: E402

from defuser_quant.integrations.gptqmodel import block_finalize as bf  # noqa: E402
from defuser_quant.integrations.gptqmodel import overhead  # noqa: E402
from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS, OPT_IN, internals_mismatch  # noqa: E402
from test_gptqmodel_layer_ahead import _run, _run_result, _same  # noqa: E402
from test_gptqmodel_overhead import _load  # noqa: E402
from test_gptqmodel_plugin import plugin, tiny  # noqa: E402, F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
PART = DEFAULT_PARTS | {"block_finalize"}


@pytest.fixture(scope="module")
def stock(plugin, tiny, tmp_path_factory):  # noqa: F811
    """The checkpoint without the part."""
    stats, tensors = _run(plugin, tiny, tmp_path_factory.mktemp("block_finalize_stock"), "stock", parts=DEFAULT_PARTS)
    assert stats.block_finalize is None
    return tensors


def _experts(tensors: dict) -> list[str]:
    return [k for k in tensors if ".experts." in k and k.endswith(".qweight")]


@pytest.fixture
def region_records(monkeypatch):
    """(region, source) of every GPTQModel region timer sample of the run."""
    from gptqmodel.utils.logger import QuantizationRegionTimer

    seen: list[tuple[str, str | None]] = []
    original = QuantizationRegionTimer.record

    def record(self, region, duration, *, source=None):
        seen.append((region, source))
        return original(self, region, duration, source=source)

    monkeypatch.setattr(QuantizationRegionTimer, "record", record)
    return seen


@pytest.mark.slow
def test_each_group_is_finalized_by_one_worker_and_the_checkpoint_is_the_same(plugin, tiny, tmp_path, stock,  # noqa: F811
                                                                              region_records):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import _timeline

    stats, tensors = _run(plugin, tiny, tmp_path, "block", parts=PART)
    s = stats.block_finalize
    projections = len(_experts(tensors))
    assert stats.disabled == {} and s.groups > 0 and s.mismatched == 0 and s.checked == s.groups
    assert s.batched == projections - s.groups  # every member but the references, by its group's worker
    # each member's wait for its tensors and its release step are timed, under the names the timeline reads
    assert (_timeline.BLOCK_FINALIZE_WAIT, _timeline.BLOCK_FINALIZE_RELEASE) == (bf.WAIT_REGION, bf.RELEASE_REGION)
    for region in (bf.WAIT_REGION, bf.RELEASE_REGION):
        sources = [source for name, source in region_records if name == region]
        assert len(sources) == len(set(sources)) == s.batched and all(".experts." in x for x in sources)
    assert s.ext_threads >= 1
    assert not [t for t in threading.enumerate() if t.name.startswith(bf.THREAD_PREFIX)]  # the pool ended with the run
    assert set(s.left) == {"not an expert projection of our blocks"}  # attention modules: GPTQModel's finalize
    assert _same(tensors, stock) and projections > 0


@pytest.mark.slow
def test_the_part_is_a_default_only_where_the_process_has_sixteen_cores(plugin, tiny, tmp_path, stock,  # noqa: F811
                                                                        monkeypatch):
    assert overhead.MANY_CORE_PARTS == {"block_finalize": 16} and "block_finalize" not in OPT_IN | DEFAULT_PARTS
    assert "block_finalize" in overhead.default_parts(16) and "block_finalize" not in overhead.default_parts(15)
    monkeypatch.setattr(overhead, "cores", lambda: 16)
    stats, tensors = _run(plugin, tiny, tmp_path, "many_cores", parts=True)  # lean_bookkeeping=True
    assert stats.block_finalize is not None and stats.block_finalize.groups > 0 and _same(tensors, stock)
    assert stats.as_dict()["parts"] == sorted(overhead.default_parts(16))  # what ran, recorded with the result
    monkeypatch.setattr(overhead, "cores", lambda: 15)
    stats, _ = _run(plugin, tiny, tmp_path, "fewer_cores", parts=True)
    assert stats.block_finalize is None and "block_finalize" not in stats.parts


STEAL = PART | {"steal_groups"}


@pytest.fixture
def layer_order(monkeypatch):
    """Every group run of the part, in order: its reference's name and whether another member's task took it."""
    seen: list[tuple[str, str]] = []
    original = bf._Finalizer._run_group

    def run_group(self, group, proc, ref, ref_member, model, kwargs, stolen=False):
        seen.append((ref.full_name, "stolen" if stolen else "own"))
        return original(self, group, proc, ref, ref_member, model, kwargs, stolen=stolen)

    monkeypatch.setattr(bf._Finalizer, "_run_group", run_group)
    return seen


@pytest.mark.slow
def test_stolen_groups_give_the_same_checkpoint(plugin, tiny, tmp_path, stock, layer_order):  # noqa: F811
    assert "steal_groups" in OPT_IN
    stats, tensors = _run(plugin, tiny, tmp_path, "steal", parts=STEAL)
    s = stats.block_finalize
    assert stats.disabled == {} and s.mismatched == 0 and s.checked == s.groups
    assert s.stolen >= 1 and s.stolen == sum(1 for _, how in layer_order if how == "stolen")
    stolen_refs = [name for name, how in layer_order if how == "stolen"]
    assert all(name.endswith((".up_proj", ".down_proj")) for name in stolen_refs)  # the gate group is reached first
    assert s.batched == len(_experts(tensors)) - s.groups  # every member but the references, stolen groups too
    assert _same(tensors, stock)


def test_a_stolen_reference_that_raises_hands_the_error_to_its_own_task():
    # Not a real run: GPTQModel's worker pool ends the process (os._exit) when a finalize task raises, stock too.
    finalizer = bf._Finalizer(object(), frozenset(), bf.BlockFinalizeStats(), steal=True)
    proc = object()
    own_group, other = bf._Group(proc=proc, layer=1), bf._Group(proc=proc, layer=1)
    later = bf._Group(proc=proc, layer=2)  # another layer's group: not processed yet, never stolen
    own, ref, member, next_layer = object(), object(), object(), object()
    own_group.members, other.members, later.members = [own], [ref, member], [next_layer]
    own_group.taken = True  # another worker makes it
    finalizer.groups = {"own": own_group, "other": other, "later": later}
    for module, group in ((own, own_group), (ref, other), (member, other), (next_layer, later)):
        finalizer.members[module] = bf._Member(group)
    boom = RuntimeError("GPTQModel's finalize failed")

    def original(proc_, module, model, **kwargs):
        if module is ref:
            raise boom
        return None

    finalizer.original = original
    finalizer.members[own].done.set()  # its group's worker is done with it
    finalizer.members[own].finalized = True
    assert finalizer.finalize(proc, own, None, {}) is None  # own's task stole `other`, then returned
    assert other.taken and not later.taken and finalizer.stats.stolen == 1
    assert finalizer.members[ref].error is boom and finalizer.members[ref].done.is_set()
    assert finalizer.members[member].done.is_set() and not finalizer.members[member].finalized
    with pytest.raises(RuntimeError) as raised:  # the reference's own task raises what its finalize raised
        finalizer.finalize(proc, ref, None, {})
    assert raised.value is boom
    assert other.stock == "its reference's finalize raised RuntimeError"
    finalizer.finalize(proc, member, None, {})  # the member's own task runs GPTQModel's finalize, as stock
    assert finalizer.stats.left[other.stock] == 1
    finalizer.close()


def _quantized_modules(plugin, tiny, parts) -> dict:  # noqa: F811
    """Every expert projection's quantized module of an in-memory run (no disk offload)."""
    model = _load(tiny["src"], False)
    result = plugin.quantize_with_defuser(model, tiny["calibration"][:16], batch_size=4, grouped=True,
                                          batched_solve=True, lean_bookkeeping=parts)
    modules = {name: m for name, m in model.model.named_modules() if ".experts." in name and hasattr(m, "qweight")}
    return {"stats": result.bookkeeping, "modules": modules}


def _state(module) -> dict:
    """A quantized module as GPTQModel leaves it: its buffers in order, its other attributes, its zero-point format."""
    out = {"class": type(module), "qzero_format": module.qzero_format(),
           "buffers": [(name, b.dtype, b.tolist()) for name, b in module._buffers.items() if b is not None],
           "parameters": list(module._parameters)}
    for key, value in vars(module).items():
        if not key.startswith("_") and key != "training":
            out[key] = value.tolist() if isinstance(value, torch.Tensor) else value
    return out


@pytest.mark.slow
def test_the_quantized_modules_are_gptqmodels_in_every_attribute(plugin, tiny):  # noqa: F811
    part, stock = _quantized_modules(plugin, tiny, PART), _quantized_modules(plugin, tiny, DEFAULT_PARTS)
    assert part["stats"].block_finalize.batched > 0 and part["modules"].keys() == stock["modules"].keys()
    for name, module in part["modules"].items():
        assert _state(module) == _state(stock["modules"][name]), name


@pytest.mark.slow
def test_a_reference_that_differs_leaves_its_group_to_gptqmodel(plugin, tiny, tmp_path, stock, monkeypatch, caplog):  # noqa: F811
    original = bf.pack_tensors

    def off_by_one(*args, **kwargs):
        out = original(*args, **kwargs)
        out["qzeros"] = out["qzeros"] + 1
        return out

    monkeypatch.setattr(bf, "pack_tensors", off_by_one)
    with caplog.at_level(logging.WARNING, logger=bf.__name__):
        stats, tensors = _run(plugin, tiny, tmp_path, "differs", parts=PART)
    s = stats.block_finalize
    assert s.groups > 0 and s.mismatched == s.groups and s.checked == 0 and s.batched == 0
    assert s.left["qzeros differs"] == len(_experts(tensors)) - s.groups
    assert "differ from this path's (qzeros differs)" in caplog.text
    assert _same(tensors, stock)


@pytest.mark.slow
def test_an_extension_that_does_not_load_here_leaves_every_group_to_gptqmodel(plugin, tiny, tmp_path, stock,  # noqa: F811
                                                                               monkeypatch):
    def missing(self):
        raise ImportError("no pack_block_cpu here")

    monkeypatch.setattr(bf._Finalizer, "_ext", missing)
    stats, tensors = _run(plugin, tiny, tmp_path, "noext", parts=PART)
    s = stats.block_finalize
    assert s.groups > 0 and s.mismatched == s.groups and s.batched == 0
    assert s.left["the check raised ImportError: no pack_block_cpu here"] == len(_experts(tensors)) - s.groups
    assert _same(tensors, stock)


@pytest.mark.slow
def test_a_member_that_fails_is_finalized_by_its_own_task(plugin, tiny, tmp_path, stock, monkeypatch):  # noqa: F811
    original = bf._Finalizer._finalize_one
    failed: list[str] = []

    def flaky(self, proc, model, module, *rest):
        if module.full_name.endswith(".up_proj"):  # every up_proj the group's worker makes (not the reference)
            failed.append(module.full_name)
            raise RuntimeError("a member's step fails")
        return original(self, proc, model, module, *rest)

    monkeypatch.setattr(bf._Finalizer, "_finalize_one", flaky)
    stats, tensors = _run(plugin, tiny, tmp_path, "flaky", parts=PART)
    s = stats.block_finalize
    ups = [k for k in _experts(tensors) if ".up_proj." in k]
    assert len(failed) == len(ups) - s.groups // 3  # each layer's up_proj group: all but its reference
    assert s.left["its group's worker left it"] == len(failed)
    assert s.batched == len(_experts(tensors)) - s.groups - len(failed)
    assert _same(tensors, stock)


@pytest.mark.slow
def test_a_group_under_way_when_the_part_closes_finishes_and_its_members_go_to_their_own_tasks(
        plugin, tiny, tmp_path, stock, monkeypatch):  # noqa: F811
    """The part closed while a group's worker is making its members (Ctrl-C: the main thread leaves the block while
    GPTQModel's finalize tasks still run): the worker stops at the members its pool had not started, every one of them
    is finalized by its own task as stock, nothing raises, and the checkpoint is stock's."""
    original = bf._Finalizer._finalize_one
    closed: list[str] = []

    def closing(self, proc, model, module, *rest):
        if not closed:
            closed.append(module.full_name)
            self.close()  # the pool's members not started yet are cancelled; the part's map of members let go
        return original(self, proc, model, module, *rest)

    monkeypatch.setattr(bf._Finalizer, "_finalize_one", closing)
    stats, tensors = _run(plugin, tiny, tmp_path, "closed_mid_group", parts=PART)
    s = stats.block_finalize
    assert len(closed) == 1 and s.groups >= 1
    assert s.batched < len(_experts(tensors)) - s.groups  # the rest went to their own tasks
    assert s.left["its group's worker left it"] + s.left["not processed under the part"] > 0
    assert _same(tensors, stock)


@pytest.mark.slow
def test_what_a_member_drops_is_freed_by_its_own_task_not_its_groups_worker(plugin, tiny, tmp_path, stock,  # noqa: F811
                                                                            monkeypatch):
    """A tensor's deallocation gives up the interpreter lock: the group's worker hands the member's popped state and
    removed weight to the member's own task, which frees them."""
    import weakref

    original_one, original_members = bf._Finalizer._finalize_one, bf._Finalizer._finalize_members
    original_finalize = bf._Finalizer.finalize
    local = threading.local()  # where each thread is: in a group's run, or in a member's own task
    made, freed = set(), {}

    def in_group(self, *args):
        local.group = True
        try:
            return original_members(self, *args)
        finally:
            local.group = False

    def watched(self, proc, model, module, *rest):
        copied, dropped = original_one(self, proc, model, module, *rest)
        made.add(module.full_name)
        tensors = [t for t in dropped if isinstance(t, torch.Tensor)]
        assert any(isinstance(t, torch.nn.Parameter) for t in tensors)  # its weight, still referenced
        for t in tensors:
            weakref.finalize(t, lambda name=module.full_name: freed.setdefault(name, set()).add(
                (getattr(local, "task", None), bool(getattr(local, "group", False)))))
        return copied, dropped

    def finalize(self, proc, module, model, kwargs):
        previous, local.task = getattr(local, "task", None), module.full_name
        try:
            return original_finalize(self, proc, module, model, kwargs)
        finally:
            local.task = previous

    monkeypatch.setattr(bf._Finalizer, "_finalize_members", in_group)
    monkeypatch.setattr(bf._Finalizer, "_finalize_one", watched)
    monkeypatch.setattr(bf._Finalizer, "finalize", finalize)
    stats, tensors = _run(plugin, tiny, tmp_path, "dropped", parts=PART)
    assert stats.block_finalize.batched == len(made) > 0 and set(freed) == made
    for name, where in freed.items():
        assert where == {(name, False)}, name  # on its own task, outside any group's run
    assert _same(tensors, stock)


@pytest.mark.slow
def test_a_pack_environment_setting_keeps_every_finalize_gptqmodels(plugin, tiny, tmp_path, stock, monkeypatch):  # noqa: F811
    monkeypatch.setenv("GPTQMODEL_PACK_THREADS", "1")
    stats, tensors = _run(plugin, tiny, tmp_path, "env", parts=PART)
    s = stats.block_finalize
    assert s.groups == 0 and s.batched == 0
    assert s.left["a GPTQMODEL pack environment setting"] == len([k for k in tensors if k.endswith(".qweight")])
    assert _same(tensors, stock)


def test_another_gptqmodel_finalize_keeps_the_part_stock(monkeypatch):
    assert internals_mismatch().get("block_finalize") is None

    def submodule_finalize(self, module, model, **kwargs):
        return None

    monkeypatch.setattr(GPTQProcessor, "submodule_finalize", submodule_finalize)
    assert internals_mismatch()["block_finalize"] == "GPTQModel's GPTQProcessor.submodule_finalize is not 7.6.0's"


def test_ctrl_c_restores_gptqmodels_finalize_and_stops_the_extension_threads():
    process, finalize = GPTQProcessor.process, GPTQProcessor.submodule_finalize
    with pytest.raises(KeyboardInterrupt):
        with bf.block_finalize(object(), frozenset()) as stats:
            assert GPTQProcessor.submodule_finalize is not finalize and GPTQProcessor.process is not process
            raise KeyboardInterrupt
    assert GPTQProcessor.process is process and GPTQProcessor.submodule_finalize is finalize
    assert stats.as_dict()["groups"] == 0
    assert not [t for t in threading.enumerate() if t.name.startswith(bf.THREAD_PREFIX)]


def test_a_group_nobody_took_before_the_end_runs_gptqmodels_finalize():
    calls = []
    finalizer = bf._Finalizer(object(), frozenset({"m"}), bf.BlockFinalizeStats())
    finalizer.original = lambda proc, module, model, **kwargs: calls.append(module)
    member = object()
    group = bf._Group(members=[member])
    finalizer.members[member] = bf._Member(group)
    finalizer.close()  # the part ended before the group's first finalize
    finalizer.members[member] = bf._Member(group)
    finalizer.finalize(None, member, None, {})  # returns at once: no worker waits for a group nobody runs
    assert calls == [member] and finalizer.stats.left["not processed under the part"] == 1


WORDS = PART | {"device_words"}


@pytest.fixture
def words_here(monkeypatch):
    """``device_words`` packs layers on the CPU too (by default only CUDA layers: there the extension on the pool is faster)."""
    monkeypatch.setattr(bf, "WORD_DEVICES", frozenset({"cpu", "cuda"}))


def _clones(stats, tensors) -> int:
    """Members made as copies: each group's members but the reference and the first two (GPTQModel's constructor)."""
    return len(_experts(tensors)) - 3 * stats.block_finalize.groups


@pytest.mark.slow
def test_device_words_give_the_same_checkpoint_without_the_extension(plugin, tiny, tmp_path, stock, words_here,  # noqa: F811
                                                                      ext_calls):
    stats, tensors = _run(plugin, tiny, tmp_path, "words", parts=WORDS)
    s = stats.block_finalize
    projections = len(_experts(tensors))
    assert stats.disabled == {} and s.mismatched == 0 and s.checked == s.groups > 0
    assert s.words_packed == projections and s.words_used == s.batched == projections - s.groups
    assert s.words_left == {} and s.words_seconds > 0
    assert ext_calls == []  # neither the references' checks nor the members ran this path's extension call
    assert s.cloned == _clones(stats, tensors) > 0
    assert _same(tensors, stock)


@pytest.mark.slow
def test_device_words_that_differ_leave_their_group_to_the_extension(plugin, tiny, tmp_path, stock, words_here,  # noqa: F811
                                                                      monkeypatch, caplog):
    original = bf.packing.pack_words

    def flipped(*args, **kwargs):
        qweight, qzeros = original(*args, **kwargs)
        return qweight ^ 1, qzeros

    monkeypatch.setattr(bf.packing, "pack_words", flipped)
    with caplog.at_level(logging.WARNING, logger=bf.__name__):
        stats, tensors = _run(plugin, tiny, tmp_path, "words_differ", parts=WORDS)
    s = stats.block_finalize
    projections = len(_experts(tensors))
    assert s.words_packed == projections and s.words_used == 0 and s.checked == s.groups and s.mismatched == 0
    assert s.words_left == {"the reference's device words differ (qweight differs)": projections}
    assert s.batched == projections - s.groups  # the extension packed every member instead
    assert "words packed on its device differ from GPTQModel's (qweight differs)" in caplog.text
    assert _same(tensors, stock)


@pytest.mark.slow
def test_a_member_whose_weight_changed_since_its_words_takes_the_extensions(plugin, tiny, tmp_path, stock, words_here,  # noqa: F811
                                                                            monkeypatch):
    original = bf._pack_group
    changed: list[str] = []

    def one_stale(group):
        words = original(group)
        module, packed = list(words.items())[-1]  # a member, never the reference (the group's first to finalize)
        packed.fingerprint = packed.fingerprint + 1  # as if its weight had changed after the layer's end
        changed.append(module.full_name)
        return words

    monkeypatch.setattr(bf, "_pack_group", one_stale)
    stats, tensors = _run(plugin, tiny, tmp_path, "words_stale", parts=WORDS)
    s = stats.block_finalize
    assert len(changed) == s.groups and s.words_used == s.batched - len(changed)
    assert s.words_left == {"a member's inputs are not the ones its words were packed from": len(changed)}
    assert _same(tensors, stock)


@pytest.mark.slow
def test_device_words_stay_off_where_the_layers_are_not_on_a_word_device(plugin, tiny, tmp_path, stock):  # noqa: F811
    stats, tensors = _run(plugin, tiny, tmp_path, "words_cpu", parts=WORDS)  # the tiny model runs on the CPU
    s = stats.block_finalize
    assert s.words_packed == 0 and s.words_used == 0 and s.batched == len(_experts(tensors)) - s.groups
    assert s.words_left == {"weights on cpu": len(_experts(tensors))}
    assert _same(tensors, stock)


@pytest.mark.slow
def test_a_copy_that_differs_from_gptqmodels_module_is_not_used(plugin, tiny, monkeypatch):  # noqa: F811
    original = bf.clone_module

    def marked(template, name):
        module = original(template, name)
        module.__dict__["marked"] = True  # a copy GPTQModel's constructor would not make
        return module

    monkeypatch.setattr(bf, "clone_module", marked)
    part, stock = _quantized_modules(plugin, tiny, PART), _quantized_modules(plugin, tiny, DEFAULT_PARTS)
    s = part["stats"].block_finalize
    assert s.batched > 0 and s.cloned == 0
    for name, module in part["modules"].items():
        assert not hasattr(module, "marked") and _state(module) == _state(stock["modules"][name]), name


def test_a_members_inputs_are_read_under_the_processors_lock_and_copied_after_it(monkeypatch):
    from types import SimpleNamespace

    class OwnedLock:
        def __init__(self):
            self.lock, self.owner, self.entered = threading.Lock(), None, 0

        def __enter__(self):
            self.lock.acquire()
            self.owner, self.entered = threading.get_ident(), self.entered + 1

        def __exit__(self, *exc):
            self.owner = None
            self.lock.release()

    lock = OwnedLock()
    state = {"q_zeros": torch.full((4, 2), 8.0), "q_scales": torch.rand(4, 2),
             "q_g_idx": torch.arange(8, dtype=torch.int32) // 4}
    before = {k: v.clone() for k, v in state.items()}
    module = SimpleNamespace(state=state, stream_sync=lambda: None, full_name="m.experts.0.gate_proj")
    linear = torch.nn.Linear(8, 4, bias=False)
    model = SimpleNamespace(model=SimpleNamespace(get_submodule=lambda name: linear))
    copies_under_lock: list[bool] = []
    original = torch.Tensor.clone

    def clone(self, *args, **kwargs):
        copies_under_lock.append(lock.owner == threading.get_ident())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", clone)
    weight, scales, zeros, g_idx = bf._inputs(SimpleNamespace(lock=lock), module, model)
    assert lock.entered == 1 and copies_under_lock == [False]  # a copy gives up the interpreter lock
    assert torch.equal(scales, before["q_scales"]) and torch.equal(zeros, before["q_zeros"])
    assert torch.equal(g_idx, before["q_g_idx"]) and weight is not None and torch.equal(weight, linear.weight)
    assert g_idx is not state["q_g_idx"]  # it becomes a buffer: its own storage; scales and zeros are only read
    assert set(state) == set(before)  # read, not popped: GPTQModel's finalize pops them


@pytest.mark.parametrize("half", [False, True])
def test_the_buffers_are_pack_blocks_own_tensors_never_views_of_the_inputs(half):
    """pack_tensors' scales in one copy and ext_inputs without a second view of a detached weight: the values of
    GPTQModel's pack_block steps (``scales.T.contiguous()`` then float16; the weight as it is), in storage of their own
    even where the transposed scales are already float16 and contiguous (no copy would be made by .contiguous())."""
    weight = torch.randn(8, 64).to(torch.bfloat16)
    scales = torch.rand(8, 2) * 0.01 + 1e-3
    if half:  # [out, groups] laid out so that .T is contiguous and already float16
        scales = scales.to(torch.float16).T.contiguous().T
    zeros, g_idx = torch.full((8, 2), 8.0), torch.arange(64, dtype=torch.int32) // 32
    words = (torch.zeros(8, 8, dtype=torch.int32), torch.full((2, 1), 0x88888888 - (1 << 32), dtype=torch.int32))
    args = bf.ext_inputs(weight, scales, zeros, g_idx, 4)
    assert args[0] is weight and torch.equal(args[1], scales.T.contiguous()) and args[1].is_contiguous()
    grad = torch.nn.Parameter(weight.float())
    assert not bf.ext_inputs(grad, scales, zeros, g_idx, 4)[0].requires_grad  # a parameter is still detached
    mine = bf.pack_tensors(weight, scales, zeros, g_idx, words, 4, torch.int32, to_v1=True)
    want = scales.T.contiguous().to(dtype=torch.float16)
    assert mine["scales"].dtype == torch.float16 and mine["scales"].is_contiguous()
    assert torch.equal(mine["scales"], want) and mine["scales"].untyped_storage().data_ptr() != \
        scales.untyped_storage().data_ptr()
    assert torch.equal(mine["qzeros"], words[1] - bf.V1_OFFSETS[4]) and list(mine) == ["g_idx", "scales", "qweight",
                                                                                       "qzeros"]


@pytest.mark.parametrize("to_v1", [False, True])
@pytest.mark.parametrize("pack_dtype", [torch.int32, torch.int64])
def test_words_that_are_views_give_buffers_of_their_own_made_in_one_step(to_v1, pack_dtype):
    """Device words are views of their group's host copy: each buffer made from them has its own storage (holding a
    view would keep the whole copy alive), with the values of the extension's words; words the caller owns are taken
    as they are where nothing changes them (every torch call gives up the interpreter lock)."""
    weight, scales = torch.randn(8, 64).to(torch.bfloat16), torch.rand(8, 2) + 0.1
    zeros, g_idx = torch.full((8, 2), 8.0), torch.arange(64, dtype=torch.int32) // 32
    host = torch.arange(64 + 2, dtype=torch.int32)  # one flat copy holding both words, as a group's host copy does
    words = (host[:64].view(8, 8), host[64:].view(2, 1))
    want = (words[0].to(pack_dtype), words[1].to(pack_dtype) - (bf.V1_OFFSETS[4] if to_v1 else 0))
    for views in (True, False):
        mine = bf.pack_tensors(weight, scales, zeros, g_idx, words, 4, pack_dtype, to_v1=to_v1, views=views)
        assert torch.equal(mine["qweight"], want[0]) and torch.equal(mine["qzeros"], want[1])
        assert mine["qweight"].dtype == mine["qzeros"].dtype == pack_dtype
        shares = [mine[name].untyped_storage().data_ptr() == host.untyped_storage().data_ptr()
                  for name in ("qweight", "qzeros")]
        if views or pack_dtype != torch.int32:
            assert shares == [False, False]
        else:  # the caller's own words: qweight taken as it is, qzeros only where the v1 subtraction made a new one
            assert shares == [True, not to_v1]


def test_a_module_copy_has_its_own_containers_and_points_at_itself():
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization.config import FORMAT

    def make(name):
        return TorchLinear(bits=4, group_size=32, desc_act=False, sym=True, in_features=64, out_features=32,
                           pack_dtype=torch.int32, bias=False, name=name, lm_head_name="lm_head",
                           register_buffers=False, format=FORMAT.GPTQ)

    template, built = make("a.0.up_proj"), make("a.1.up_proj")
    copy = bf.clone_module(template, "a.1.up_proj")
    assert type(copy) is TorchLinear and copy.name == "a.1.up_proj" and template.name == "a.0.up_proj"
    assert copy._weight_metadata._module is copy and template._weight_metadata._module is template
    assert bf.same_module_state(built, copy) and not bf.same_module_state(make("a.2.up_proj"), copy)
    copy.register_buffer("qweight", torch.zeros(2, dtype=torch.int32))
    assert "qweight" in copy._buffers and template._buffers == {}  # its own buffer dict
    assert not bf.same_module_state(built, copy)  # a buffer more
    built.register_buffer("qweight", torch.zeros(2, dtype=torch.int32))
    assert not bf.same_module_state(built, copy)  # equal, but a tensor of its own: never assumed shareable


def test_a_copy_that_would_share_a_mutable_attribute_cannot_stand_in():
    from torch import nn

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.cache = {"hits": []}  # a nested list: a copy of the dict would share it
            self.scale = torch.ones(2)  # a tensor attribute: a copy would share it

    template, built = Cached(), Cached()
    copy = bf.clone_module(template, "x")
    built.name = "x"  # what clone_module sets on the copy
    assert copy.cache is not template.cache and copy.cache["hits"] is template.cache["hits"]
    assert not bf.same_module_state(built, copy)  # equal values, but shared objects: refused
    del template.scale, built.scale
    copy = bf.clone_module(template, "x")
    assert not bf.same_module_state(built, copy)  # still the nested list
    template.cache = built.cache = {"hits": 0}
    assert bf.same_module_state(built, bf.clone_module(template, "x"))  # immutable values: a copy can stand in



def test_ctrl_c_restores_post_quantize_with_device_words():
    from gptqmodel.models.base import BaseQModel

    post = BaseQModel.post_quantize
    with pytest.raises(KeyboardInterrupt):
        with bf.block_finalize(object(), frozenset(), device_words=True):
            assert BaseQModel.post_quantize is not post
            raise KeyboardInterrupt
    assert BaseQModel.post_quantize is post


def test_device_words_and_stolen_groups_without_block_finalize_are_refused_by_name(plugin, tiny, tmp_path):  # noqa: F811
    stats, _ = _run(plugin, tiny, tmp_path, "words_alone",
                    parts=DEFAULT_PARTS | {"device_words", "steal_groups", "row_pack"})
    assert stats.disabled == {"device_words": "needs the block_finalize part",
                              "steal_groups": "needs the block_finalize part",
                              "row_pack": "needs the block_finalize part"} and stats.block_finalize is None
    assert stats.parts == sorted(DEFAULT_PARTS)  # the refused parts are not recorded as run


@pytest.mark.slow
def test_ctrl_c_while_a_layer_is_packed_restores_gptqmodel(plugin, tiny, tmp_path, words_here, monkeypatch):  # noqa: F811
    from gptqmodel.models.base import BaseQModel

    original, calls = bf._pack_group, []

    def interrupted(group):
        calls.append(group)
        if len(calls) == 2:  # the first layer's second group
            raise KeyboardInterrupt
        return original(group)

    monkeypatch.setattr(bf, "_pack_group", interrupted)
    post, process, finalize = BaseQModel.post_quantize, GPTQProcessor.process, GPTQProcessor.submodule_finalize
    with pytest.raises(KeyboardInterrupt):
        _run(plugin, tiny, tmp_path, "words_interrupted", parts=WORDS)
    assert len(calls) == 2
    assert (BaseQModel.post_quantize, GPTQProcessor.process, GPTQProcessor.submodule_finalize) == (post, process, finalize)
    assert not [t for t in threading.enumerate() if t.name.startswith(bf.THREAD_PREFIX)]


@pytest.mark.slow
def test_a_groups_device_words_are_let_go_once_its_members_are_made(plugin, tiny, tmp_path, words_here, monkeypatch):  # noqa: F811
    import gc
    import weakref

    original_pack, original_run = bf._pack_group, bf._Finalizer._run_group
    packed: dict[int, list] = {}  # id(group) -> weak references to its words
    alive_after: list[int] = []

    def kept(group):
        words = original_pack(group)
        packed[id(group)] = [weakref.ref(w.qweight) for w in words.values()]
        return words

    def run_group(self, group, *args):
        out = original_run(self, group, *args)
        gc.collect()
        alive_after.append(len([r for r in packed.get(id(group), []) if r() is not None]))
        return out

    monkeypatch.setattr(bf, "_pack_group", kept)
    monkeypatch.setattr(bf._Finalizer, "_run_group", run_group)
    stats, _ = _run(plugin, tiny, tmp_path, "words_freed", parts=WORDS)
    assert stats.block_finalize.words_used > 0 and len(alive_after) == stats.block_finalize.groups > 0
    assert alive_after == [0] * len(alive_after)  # each group's words gone when its worker is done, not at the end


def _run_ahead(plugin, tiny, tmp_path, name, parts=PART, **settings):  # noqa: F811
    """A run with ``parts`` and ``BatchedSolve(pack_ahead=True)`` (or ``**settings`` over it): (result, tensors)."""
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    return _run_result(plugin, tiny, tmp_path, name, parts=parts,
                       batched_solve=BatchedSolve(**({"pack_ahead": True} | settings)))


@pytest.fixture
def packs_done_first(monkeypatch):
    """Every finalize task waits until the packs started ahead so far have run (on a 2-core host the one pack thread
    may still be busy when a layer's finalizes start, and a pack not started yet is taken back)."""
    from concurrent.futures import wait

    original = bf._Finalizer.finalize

    def finalize(self, proc, module, model, kwargs):
        registry = bf.packing._active
        if registry is not None:
            with registry.lock:
                pending = list(registry.pending.values())
            wait(pending)
        return original(self, proc, module, model, kwargs)

    monkeypatch.setattr(bf._Finalizer, "finalize", finalize)


@pytest.fixture
def ext_calls(monkeypatch):
    """The shapes of the weights this path's extension calls packed (the references' checks and members without
    words)."""
    calls: list = []
    original = bf._Finalizer._ext

    def counted(self):
        ext = original(self)

        def call(*args):
            calls.append(tuple(args[0].shape))
            return ext(*args)

        return call

    monkeypatch.setattr(bf._Finalizer, "_ext", counted)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("how", ["pack_ahead", "pack", "pack_steal"])
def test_members_take_the_words_packed_ahead_and_the_checkpoint_is_the_same(plugin, tiny, tmp_path, stock,  # noqa: F811
                                                                            packs_done_first, ext_calls, how):
    """Words packed ahead on background threads (``pack_ahead``) or by the batched solve (``pack``; ``pack_steal``
    with ``steal_groups``: stolen groups' members take theirs too)."""
    settings = {} if how == "pack_ahead" else {"pack_ahead": False, "pack": True}
    parts = STEAL if how == "pack_steal" else PART
    result, tensors = _run_ahead(plugin, tiny, tmp_path, how, parts=parts, **settings)
    s, pack = result.bookkeeping.block_finalize, result.solve.pack
    assert s.mismatched == 0 and s.checked == s.groups > 0 and s.batched == len(_experts(tensors)) - s.groups
    assert (s.stolen >= 1) == (how == "pack_steal")
    assert s.words_ahead == s.batched  # no member ran the extension ...
    assert len(ext_calls) == s.groups  # ... only each reference's check did, against the words its pack_block took
    assert pack.refused == pack.failed == pack.taken_back == 0
    assert pack.served >= s.words_ahead + s.groups  # the references' pack_block took theirs (attention ones too)
    assert s.as_dict()["words_ahead"] == s.words_ahead
    assert _same(tensors, stock)


@pytest.mark.slow
def test_a_member_whose_weight_changed_since_its_words_were_packed_takes_the_extensions(plugin, tiny, tmp_path,  # noqa: F811
                                                                                       stock, packs_done_first,
                                                                                       ext_calls, monkeypatch):
    original = bf._Finalizer._finalize_members
    changed: list[str] = []

    def one_stale(self, proc, model, group, members, *args):
        member = members[-1]  # never the reference (finalized before the members are handed out)
        registry = bf.packing._active
        with registry.lock:
            pending = registry.pending.get(member.module)
        pending.result().fingerprint += 1  # as if its weight had changed after the pack
        changed.append(member.full_name)
        return original(self, proc, model, group, members, *args)

    monkeypatch.setattr(bf._Finalizer, "_finalize_members", one_stale)
    result, tensors = _run_ahead(plugin, tiny, tmp_path, "ahead_stale")
    s, pack = result.bookkeeping.block_finalize, result.solve.pack
    assert len(changed) == s.groups > 0 and pack.refused == len(changed)
    assert s.words_ahead == s.batched - len(changed)
    assert len(ext_calls) == s.groups + len(changed)  # those members: the extension's words
    assert _same(tensors, stock)


@pytest.mark.slow
def test_packs_not_started_when_the_finalize_asks_are_packed_by_the_extension(plugin, tiny, tmp_path, stock,  # noqa: F811
                                                                            ext_calls, monkeypatch):
    import threading as _threading

    release = _threading.Event()
    monkeypatch.setattr(bf.packing, "PACK_AHEAD_THREADS", 1)
    monkeypatch.setattr(bf.packing, "_pack_pool", None)
    bf.packing._pack_threads().submit(release.wait)  # the only pack thread, busy through the run
    try:
        result, tensors = _run_ahead(plugin, tiny, tmp_path, "ahead_busy")
    finally:
        release.set()
        bf.packing._pack_threads().shutdown(wait=True)
    s, pack = result.bookkeeping.block_finalize, result.solve.pack
    assert s.words_ahead == 0 and pack.served == 0 and pack.taken_back == pack.offered > 0
    assert len(ext_calls) == s.groups + s.batched
    assert _same(tensors, stock)


ROWS = PART | {"row_pack"}


@pytest.mark.slow
def test_row_packed_words_give_the_same_checkpoint(plugin, tiny, tmp_path, stock):  # noqa: F811
    """``row_pack``: every member's words, and each reference's check, from pack_kernel instead of the extension."""
    if bf.pack_kernel.load() is None:
        pytest.skip("the pack kernel could not be built here (no C++ compiler)")
    assert "row_pack" in OPT_IN and "row_pack" not in DEFAULT_PARTS
    stats, tensors = _run(plugin, tiny, tmp_path, "rows", parts=ROWS)
    s = stats.block_finalize
    assert stats.disabled == {} and s.groups > 0 and s.mismatched == 0 and s.checked == s.groups
    assert s.batched == len(_experts(tensors)) - s.groups and s.row_pack_refused is None
    assert s.row_packed == s.groups + s.batched  # each reference's check and each member
    assert _same(tensors, stock)


@pytest.mark.slow
def test_a_row_kernel_that_differs_leaves_its_group_to_gptqmodel(plugin, tiny, tmp_path, stock, monkeypatch):  # noqa: F811
    from gptqmodel.nn_modules.qlinear.pack_block_ext import pack_block_cpu

    def off_by_one(weight, scales, zeros, g_idx, bits):
        qweight, qzeros = pack_block_cpu(weight, scales, zeros, g_idx, bits, 32, 8192, 1)
        return qweight + 1, qzeros

    monkeypatch.setattr(bf.pack_kernel, "load", lambda: off_by_one)
    stats, tensors = _run(plugin, tiny, tmp_path, "rows_differ", parts=ROWS)
    s = stats.block_finalize
    assert s.groups > 0 and s.mismatched == s.groups and s.batched == 0 and s.row_packed == s.groups
    assert s.left["qweight differs"] == len(_experts(tensors)) - s.groups
    assert _same(tensors, stock)


@pytest.mark.slow
def test_a_row_kernel_not_built_here_leaves_the_words_to_the_extension(plugin, tiny, tmp_path, stock,  # noqa: F811
                                                                       monkeypatch):
    monkeypatch.setattr(bf.pack_kernel, "load", lambda: None)
    stats, tensors = _run(plugin, tiny, tmp_path, "rows_missing", parts=ROWS)
    s = stats.block_finalize
    assert s.groups > 0 and s.mismatched == 0 and s.checked == s.groups and s.row_packed == 0
    assert s.row_pack_refused == "pack_kernel could not be built here"
    assert s.as_dict()["row_pack_refused"] == "pack_kernel could not be built here"
    assert _same(tensors, stock)
