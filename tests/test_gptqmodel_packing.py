"""The batched solve's packing (integrations/gptqmodel/packing.py): GPTQModel's ``pack_block``
words computed with torch for a stack of modules, and served to ``pack_block`` only when its
inputs are the ones packed."""

from __future__ import annotations

import copy
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_gptqmodel_batched import CONFIGS, _quantize, _tasks, per_module  # noqa: E402,F401
from test_gptqmodel_plugin import plugin, tiny  # noqa: E402,F401

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def extension():
    from gptqmodel.utils.cpp import load_pack_block_extension

    if load_pack_block_extension() is None:
        pytest.skip("GPTQModel's pack_block_cpu extension could not be built here (no C++ compiler)")


def _extension_words(weight, scales, zeros, g_idx, bits):
    """GPTQModel's extension on one module, with ``pack_block``'s argument layouts."""
    from gptqmodel.nn_modules.qlinear.pack_block_ext import pack_block_cpu

    return pack_block_cpu(weight, scales.T.contiguous(), zeros.T.contiguous(), g_idx.to(torch.int32), bits, 32, 8192, 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_module_g_idx_gives_the_extensions_words(extension, bits):
    """``desc_act``: every module has its own column order, so its own ``g_idx``."""
    from defuser_quant.integrations.gptqmodel.packing import pack_words

    g = torch.Generator().manual_seed(bits)
    B, out, inp, gs = 3, 64, 256, 64
    maxq = (1 << bits) - 1
    scales = torch.rand(B, out, inp // gs, generator=g) * 0.02 + 1e-4
    zeros = torch.randint(0, maxq + 1, (B, out, inp // gs), generator=g).to(torch.float32)
    g_idx = torch.stack([(torch.arange(inp) // gs)[torch.randperm(inp, generator=g)] for _ in range(B)]).to(torch.int32)
    codes = torch.randint(0, maxq + 1, (B, out, inp), generator=g).to(torch.float32)
    weight = torch.stack([scales[b][:, g_idx[b].long()] * (codes[b] - zeros[b][:, g_idx[b].long()]) for b in range(B)])
    weight = weight.to(torch.bfloat16)
    got_w, got_z = pack_words(weight, scales.transpose(1, 2), zeros.transpose(1, 2), g_idx, bits)
    shared_w, _ = pack_words(weight, scales.transpose(1, 2), zeros.transpose(1, 2), g_idx[0], bits)
    for b in range(B):
        want_w, want_z = _extension_words(weight[b], scales[b], zeros[b], g_idx[b], bits)
        assert torch.equal(got_w[b], want_w) and torch.equal(got_z[b], want_z)
    assert not torch.equal(shared_w[1], got_w[1])  # the per-module order matters: a shared g_idx is not the same


def test_fingerprint_sees_one_changed_element_and_is_the_same_on_any_layout():
    from defuser_quant.integrations.gptqmodel.packing import weight_fingerprint

    w = torch.randn(64, 96).to(torch.bfloat16)
    changed = w.clone()
    changed.view(torch.int16)[5, 7] += 1  # the next bf16 value
    assert torch.equal(weight_fingerprint(w), weight_fingerprint(w.T.contiguous().T))
    assert not torch.equal(weight_fingerprint(w), weight_fingerprint(changed))
    assert weight_fingerprint(torch.randn(3, 64, 96)).shape == (3, 64 + 96)


@pytest.mark.parametrize("columns", [2048, 65536, 65537])
def test_fingerprint_is_the_int64_sums_even_where_int32_would_overflow(columns):
    from defuser_quant.integrations.gptqmodel.packing import weight_fingerprint

    extremes = torch.tensor([-32768, 32767], dtype=torch.int16).repeat(2, 1)
    for row in extremes.unbind(1):  # every element at one end of int16: the largest row sums there are
        bits = row[:, None].expand(2, columns).contiguous()
        reference = bits.to(torch.int64)
        want = torch.cat([reference.sum(-1), reference.sum(-2)])
        got = weight_fingerprint(bits.view(torch.bfloat16))
        assert got.dtype == torch.int64 and torch.equal(got, want)
    w = torch.randn(3, 64, 96)  # 32-bit elements: always int64 sums
    assert torch.equal(weight_fingerprint(w), torch.cat([w.view(torch.int32).to(torch.int64).sum(-1),
                                                         w.view(torch.int32).to(torch.int64).sum(-2)], dim=-1))


def test_the_cpu_fingerprint_makes_no_widened_copy_of_the_weight(monkeypatch):
    """On the CPU the sums are numpy's, cast in small buffers (torch's widen the whole weight first: in block_finalize's
    pool, many members at once, that was several times slower, benchmarks/fingerprint_threads.py)."""
    from defuser_quant.integrations.gptqmodel import packing

    def widened(bits, accumulate):
        raise AssertionError("the CPU fingerprint went through torch's widened sums")

    w = torch.randn(64, 96).to(torch.bfloat16)
    want = packing.weight_fingerprint(w)
    monkeypatch.setattr(packing, "_bit_sums_torch", widened)
    assert torch.equal(packing.weight_fingerprint(w), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_cpu_fingerprint_is_the_one_a_gpu_makes(dtype):
    """The CPU sums (numpy's) are the device path's (torch's, as on a GPU) for any layout, batch and extreme: words
    fingerprinted on the GPU are recognised on the CPU."""
    from defuser_quant.integrations.gptqmodel import packing

    torch.manual_seed(0)
    weights = [torch.randn(64, 96).to(dtype), torch.randn(3, 32, 64).to(dtype), torch.randn(96, 64).to(dtype).T]
    size_int = packing._SAME_SIZE_INT[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(size_int)
    weights.append(torch.tensor([info.min, info.max], dtype=size_int).repeat(40, 50).view(dtype))
    weights.append(torch.nn.Parameter(torch.randn(32, 64).to(dtype)))  # a module's weight, as pack_ahead reads it
    for weight in weights:
        got = packing.weight_fingerprint(weight)
        bits = weight.detach().contiguous().view(size_int)
        for accumulate in (torch.int32, torch.int64) if bits.element_size() <= 2 else (torch.int64,):
            assert torch.equal(packing._bit_sums_numpy(bits, accumulate), packing._bit_sums_torch(bits, accumulate))
        reference = bits.to(torch.int64)
        assert got.dtype == torch.int64 and torch.equal(got, torch.cat([reference.sum(-1), reference.sum(-2)], -1))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("name", ["default (act_group_aware)", "natural order", "desc_act", "asym", "per channel"])
def test_each_solved_module_carries_the_extensions_words_for_its_result(extension, name, bits):
    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve
    from gptqmodel import QuantizeConfig

    kw = dict(CONFIGS[name])
    qcfg = QuantizeConfig(bits=bits, group_size=kw.pop("group_size", 128), **kw)
    results = batched_gptq_solve(_tasks(qcfg, n=3), host_results=True, pack=True)
    for r in results:
        q, scale, zero, g_idx = r.values[:4]
        want_w, want_z = _extension_words(q, scale, zero, g_idx, bits)
        words = r.packed
        assert words is not None and words.bits == bits
        assert torch.equal(words.qweight, want_w) and torch.equal(words.qzeros, want_z)
        assert words.scales is scale and words.zeros is zero and words.g_idx is g_idx
        assert words.matches(q, scale.T.contiguous(), zero.T.contiguous(), g_idx.to(torch.int32), bits, 32)


@pytest.mark.parametrize("pack_dtypes", [False, True], ids=["solve's words", "extension's words"])
def test_matching_the_finalize_inputs_answers_as_matching_the_extensions_arguments(pack_dtypes):
    """block_finalize asks PackedWords.matches_inputs with the tensors pack_block starts from (no transposed copies);
    it must answer as matches with the extension's arguments for them, for the inputs and for each one changed."""
    from defuser_quant.integrations.gptqmodel.block_finalize import ext_inputs
    from defuser_quant.integrations.gptqmodel.packing import PackedWords, weight_fingerprint

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=g).to(torch.bfloat16)
    scales, zeros = torch.rand(64, 2, generator=g) + 0.1, torch.randint(0, 16, (64, 2), generator=g).float()
    g_idx = (torch.arange(256) // 128).to(torch.int32)
    words = PackedWords(4, torch.zeros(32, 64, dtype=torch.int32), torch.zeros(2, 8, dtype=torch.int32), scales,
                        zeros, g_idx, weight_fingerprint(weight),
                        (weight.dtype, scales.dtype, zeros.dtype, torch.int32) if pack_dtypes else None)
    bumped = weight.clone()
    bumped.view(torch.int16)[3, 5] += 1
    cases = {
        "the inputs": (weight, scales, zeros, g_idx, 4),
        "g_idx as int64": (weight, scales, zeros, g_idx.long(), 4),
        "scales as a transposed view": (weight, scales.T.contiguous().T, zeros, g_idx, 4),
        "another weight": (bumped, scales, zeros, g_idx, 4),
        "other scales": (weight, scales * 2, zeros, g_idx, 4),
        "other zeros": (weight, scales, zeros + 1, g_idx, 4),
        "other g_idx": (weight, scales, zeros, g_idx.flip(0), 4),
        "other bits": (weight, scales, zeros, g_idx, 8),
        "float64 scales": (weight, scales.double(), zeros, g_idx, 4),
        "another weight shape": (weight[:32], scales[:32], zeros[:32], g_idx, 4),
    }
    answers = {}
    for name, inputs in cases.items():
        answers[name] = words.matches_inputs(*inputs)
        assert answers[name] == words.matches(*ext_inputs(*inputs)[:6]), name
    assert answers["the inputs"] and answers["g_idx as int64"] and answers["scales as a transposed view"]
    assert not any(answers[name] for name in ("another weight", "other scales", "other zeros", "other g_idx",
                                              "other bits", "another weight shape"))
    assert answers["float64 scales"] == (not pack_dtypes)  # extension-packed words also check their inputs' dtypes


def test_what_is_not_packed():
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve, batched_gptq_solve
    from gptqmodel import QuantizeConfig

    qcfg = QuantizeConfig(bits=4, group_size=128)
    assert all(r.packed is None for r in batched_gptq_solve(_tasks(qcfg, n=2), host_results=True))  # not asked
    assert all(r.packed is None for r in batched_gptq_solve(_tasks(qcfg, n=2), pack=True))  # results on the device
    three = QuantizeConfig(bits=3, group_size=128, act_group_aware=False)
    assert all(r.packed is None for r in batched_gptq_solve(_tasks(three, n=2), host_results=True, pack=True))
    odd = batched_gptq_solve(_tasks(qcfg, n=2, rows=48), host_results=True, pack=True)  # 48 rows: not 32-aligned
    assert all(r.packed is None for r in odd)
    with pytest.raises(TypeError, match="BatchedSolve.pack"):
        BatchedSolve(pack="yes")


def _quant_linear(linear: nn.Linear, bits: int):
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    return TorchLinear(bits=bits, group_size=128, sym=True, desc_act=False, in_features=linear.in_features,
                       out_features=linear.out_features, bias=False, register_buffers=False)


@pytest.mark.parametrize("change", ["none", "weight", "scales", "g_idx", "bits"])
def test_pack_block_takes_offered_words_only_for_the_inputs_they_were_packed_from(extension, change):
    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve
    from defuser_quant.integrations.gptqmodel.packing import offer_pack_words, served_pack_words
    from gptqmodel import QuantizeConfig
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear
    from gptqmodel.nn_modules.qlinear import pack_block_ext

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    tasks = _tasks(qcfg, n=2)
    results = batched_gptq_solve(tasks, host_results=True, pack=True)
    linear = tasks[0].module
    q, scale, zero, g_idx = results[0].values[:4]
    linear.weight.data = q.clone()
    scale, g_idx = scale.clone(), g_idx.clone()
    words = results[0].packed
    if change == "weight":
        linear.weight.data[3, 9] += 1
    elif change == "scales":
        scale[2, 1] *= 2
    elif change == "g_idx":
        g_idx[[0, 200]] = g_idx[[200, 0]]
    elif change == "bits":
        words = copy.copy(words)
        words.bits = 8
    stock = _quant_linear(linear, 4)
    stock.pack_block(linear, scale, zero, g_idx)
    original = pack_block_ext.pack_block_cpu
    with served_pack_words() as stats:
        assert pack_block_ext.pack_block_cpu is not original
        offer_pack_words(linear, words)
        served = _quant_linear(linear, 4)
        served.pack_block(linear, scale, zero, g_idx)
        again = _quant_linear(linear, 4)  # words are served once: a second pack runs the extension
        again.pack_block(linear, scale, zero, g_idx)
    assert pack_block_ext.pack_block_cpu is original and PackableQuantLinear.pack_block.__name__ == "pack_block"
    for module in (served, again):
        for buffer in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(module, buffer), getattr(stock, buffer)), buffer
    assert served.qweight.untyped_storage().data_ptr() != words.qweight.untyped_storage().data_ptr()  # its own copy
    want = Counter(offered=1, served=1) if change == "none" else Counter(offered=1, refused=1)
    assert Counter({k: v for k, v in stats.as_dict().items() if v}) == want


def test_words_are_not_offered_outside_the_block_and_the_block_is_not_nested():
    from defuser_quant.integrations.gptqmodel import packing

    linear = nn.Linear(32, 32)
    packing.offer_pack_words(linear, None)  # nothing keeps it: no run is serving words
    with packing.served_pack_words():
        with pytest.raises(RuntimeError, match="already active"):
            with packing.served_pack_words():
                pass
    assert packing._active is None


@pytest.mark.slow
@pytest.mark.parametrize("option", ["pack", "pack_ahead"])
def test_gptqmodel_run_with_packed_words_gives_the_per_module_checkpoint(plugin, tiny, tmp_path, per_module, option):  # noqa: F811
    """Words packed on the solve's device (``pack``) or ahead by GPTQModel's own extension
    (``pack_ahead``): the per-module checkpoint, every batched module's words used."""
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    _, _, tensors_ref = per_module
    result, _, tensors = _quantize(plugin, tiny, tmp_path, option, batched_solve=BatchedSolve(**{option: True}))
    assert tensors.keys() == tensors_ref.keys()
    assert not [k for k in tensors if not torch.equal(tensors[k], tensors_ref[k])]
    solve, pack = result.solve, result.solve.pack.as_dict()
    assert solve.as_dict()["pack"] == pack and pack["refused"] == pack["failed"] == 0
    if option == "pack":  # every batched module's words came from the solve
        assert pack["offered"] == pack["served"] == solve.batched_modules >= 48 and not pack["taken_back"]
    else:  # queued ahead, then taken by the finalize or, not started yet when it asked, packed by it
        assert pack["offered"] == pack["served"] + pack["taken_back"] == solve.batched_modules >= 48
        assert pack["served"] > 0


@pytest.mark.parametrize("change", ["none", "weight", "scales", "fails"])
def test_pack_block_takes_words_packed_ahead_only_for_the_inputs_they_were_packed_from(extension, change):
    """Words started ahead with GPTQModel's own extension (``BatchedSolve(pack_ahead=True)``): served,
    waited for, to the module whose ``pack_block`` inputs are theirs; otherwise (or when the pack
    ahead raised) the extension packs it, as stock."""
    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve
    from defuser_quant.integrations.gptqmodel.packing import pack_ahead, served_pack_words

    from gptqmodel import QuantizeConfig

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    tasks = _tasks(qcfg, n=2)
    results = batched_gptq_solve(tasks, host_results=True)
    linear = tasks[0].module
    q, scale, zero, g_idx = results[0].values[:4]
    linear.weight.data = q.clone()
    ahead_weight = linear.weight.data if change != "fails" else linear.weight.data[:, :-32]  # the extension refuses it
    scale, g_idx = scale.clone(), g_idx.clone()
    from concurrent.futures import wait

    from defuser_quant.integrations.gptqmodel import packing

    with served_pack_words() as stats:
        assert pack_ahead(linear, ahead_weight, scale, zero, g_idx, bits=4)
        wait([packing._active.pending[linear]])  # packed (or failed) before pack_block asks: not taken back
        if change == "weight":
            linear.weight.data = linear.weight.data.clone()
            linear.weight.data[3, 9] += 1
        elif change == "scales":
            scale = scale.clone()
            scale[2, 1] *= 2
        served = _quant_linear(linear, 4)
        served.pack_block(linear, scale, zero, g_idx)
    stock = _quant_linear(linear, 4)
    stock.pack_block(linear, scale, zero, g_idx)
    for buffer in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(served, buffer), getattr(stock, buffer)), buffer
    counts = {k: v for k, v in stats.as_dict().items() if v and k != "waited_seconds"}
    want = {"none": {"offered": 1, "served": 1}, "weight": {"offered": 1, "refused": 1},
            "scales": {"offered": 1, "refused": 1}, "fails": {"offered": 1, "failed": 1}}[change]
    assert counts == want


@pytest.mark.parametrize("source", ["offered", "ahead"])
@pytest.mark.parametrize("change", ["none", "weight", "scales"])
def test_taking_packed_words_for_the_inputs_serves_and_counts_as_taking_them_for_the_extensions_arguments(
        extension, source, change):
    """block_finalize takes words with take_packed (the tensors pack_block starts from, words as they are) where
    pack_block takes them with take_words (the extension's arguments, copies): the same words served or refused, the
    same counts, for words the solve offered and words packed ahead."""
    from concurrent.futures import wait

    from defuser_quant.integrations.gptqmodel import packing
    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve
    from defuser_quant.integrations.gptqmodel.block_finalize import ext_inputs

    from gptqmodel import QuantizeConfig

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    tasks = _tasks(qcfg, n=1)
    result = batched_gptq_solve(tasks, host_results=True, pack=True)[0]
    q, scale, zero, g_idx = result.values[:4]
    linear = tasks[0].module
    inputs = {"none": (q, scale, zero, g_idx), "weight": (q.clone(), scale, zero, g_idx),
              "scales": (q, scale * 2, zero, g_idx)}[change]
    if change == "weight":
        inputs[0].view(torch.int16)[3, 9] += 1
    taken = {}
    for taker in ("take_words", "take_packed"):
        with packing.served_pack_words() as stats:
            if source == "offered":
                packing.offer_pack_words(linear, result.packed)
            else:
                assert packing.pack_ahead(linear, q, scale, zero, g_idx, bits=4)
                wait([packing._active.pending[linear]])
            if taker == "take_words":
                words = packing.take_words(linear, *ext_inputs(*inputs, 4)[:6])
            else:
                packed = packing.take_packed(linear, *inputs, 4)
                words = None if packed is None else (packed.qweight, packed.qzeros)
            assert packing.take_packed(linear, *inputs, 4) is None  # taken once
        taken[taker] = (words, {k: v for k, v in stats.as_dict().items() if k != "waited_seconds"})
    (mine, my_counts), (theirs, their_counts) = taken["take_packed"], taken["take_words"]
    assert my_counts == their_counts and my_counts["served"] == (change == "none")
    assert (mine is None) == (theirs is None) == (change != "none")
    if mine is not None:
        want = _extension_words(q, scale, zero, g_idx, 4)
        assert all(torch.equal(a, b) and torch.equal(a, w) for a, b, w in zip(mine, theirs, want, strict=True))


def test_a_pack_not_started_when_pack_block_asks_is_taken_back_and_packed_there(extension, monkeypatch):
    """The pack-ahead threads busy: ``pack_block`` does not wait behind the queue; it takes the
    module's pack back and runs the extension itself, as stock."""
    import threading

    from defuser_quant.integrations.gptqmodel import packing
    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve

    from gptqmodel import QuantizeConfig

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    tasks = _tasks(qcfg, n=1)
    q, scale, zero, g_idx = batched_gptq_solve(tasks, host_results=True)[0].values[:4]
    linear = tasks[0].module
    linear.weight.data = q.clone()
    stock = _quant_linear(linear, 4)
    stock.pack_block(linear, scale, zero, g_idx)
    monkeypatch.setattr(packing, "PACK_AHEAD_THREADS", 1)
    monkeypatch.setattr(packing, "_pack_pool", None)
    release = threading.Event()
    with packing.served_pack_words() as stats:
        packing._pack_threads().submit(release.wait)  # the only pack thread, busy
        assert packing.pack_ahead(linear, linear.weight.data, scale, zero, g_idx, bits=4)
        served = _quant_linear(linear, 4)
        served.pack_block(linear, scale, zero, g_idx)
        release.set()
    packing._pack_threads().shutdown(wait=True)
    for buffer in ("qweight", "qzeros"):
        assert torch.equal(getattr(served, buffer), getattr(stock, buffer))
    assert {k: v for k, v in stats.as_dict().items() if v} == {"offered": 1, "taken_back": 1}


def test_words_packed_ahead_are_checked_for_their_dtypes_and_dropped_with_the_block(extension):
    from defuser_quant.integrations.gptqmodel import packing

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=g).to(torch.bfloat16)
    scales, zeros = torch.rand(64, 2, generator=g) + 0.1, torch.randint(0, 16, (64, 2)).float()
    g_idx = (torch.arange(256) // 128).to(torch.int32)
    linear = nn.Linear(256, 64)
    assert not packing.pack_ahead(linear, weight, scales, zeros, g_idx, bits=4)  # outside the block: nothing
    with packing.served_pack_words() as stats:
        assert not packing.pack_ahead(linear, weight, scales, zeros, g_idx, bits=3)  # no whole codes per word
        assert packing.pack_ahead(linear, weight, scales, zeros, g_idx, bits=4)
        words = packing._active.pending[linear].result()
        args = (weight, scales.T.contiguous(), zeros.T.contiguous(), g_idx, 4, 32)
        assert words.matches(*args)
        assert not words.matches(weight, scales.T.contiguous().double(), *args[2:])  # equal values, other dtype
        assert stats.offered == 1
    assert packing._active is None and stats.served == 0


def test_pack_ahead_settings_are_checked():
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    assert BatchedSolve().pack_ahead is False  # opt-in until measured on a GPU
    with pytest.raises(TypeError, match="pack_ahead must be True or False"):
        BatchedSolve(pack_ahead=1)
    for bad in ({"pack": True}, {"host_results": False}):
        with pytest.raises(ValueError, match="pack_ahead needs host_results=True and pack=False"):
            BatchedSolve(pack_ahead=True, **bad)


def test_the_pack_ahead_threads_leave_cores_to_the_layer(monkeypatch):
    from defuser_quant.integrations.gptqmodel import packing, tail_workers

    for cores, threads in ((2, 1), (5, 1), (8, 4), (16, 12), (64, 12)):
        monkeypatch.setattr(tail_workers, "cores", lambda n=cores: n)
        assert packing.pack_ahead_threads() == threads, cores


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA weight")
def test_a_cuda_weight_is_packed_ahead_as_the_callers_stream_left_it(extension):
    """The job copies the weight on a stream of its own once the stream that handed it over has reached that point:
    a write still queued there (behind a long kernel) is in the words."""
    from defuser_quant.integrations.gptqmodel import packing

    g = torch.Generator().manual_seed(0)
    target = torch.randn(256, 512, generator=g).to(torch.bfloat16)
    scales, zeros = torch.rand(256, 4, generator=g) + 0.1, torch.randint(0, 16, (256, 4)).float()
    g_idx = (torch.arange(512) // 128).to(torch.int32)
    linear = nn.Linear(512, 256, bias=False)
    weight = torch.zeros_like(target, device="cuda")
    caller = torch.cuda.Stream()
    with packing.served_pack_words() as stats, torch.cuda.stream(caller):
        torch.cuda._sleep(200_000_000)  # ~0.1 s or more: the job starts before the write below has run
        weight.copy_(target.cuda(), non_blocking=True)
        assert packing.pack_ahead(linear, weight, scales, zeros, g_idx, bits=4)
        args = (target, scales.T.contiguous(), zeros.T.contiguous(), g_idx, 4, 32)
        words = packing.take_words(linear, *args)
    assert words is not None and stats.served == 1
    want = _extension_words(target, scales, zeros, g_idx, 4)
    assert torch.equal(words[0], want[0]) and torch.equal(words[1], want[1])
