"""GPTQModel's multi-GPU calibration with the plugin (issue 18, GPTQModel side).

GPTQModel 7.6 runs each layer's calibration forward data-parallel over the visible GPUs: it
replicates the layer per GPU (``torch.nn.parallel.replicate``, or ``copy.deepcopy`` when that
fails) and splits the batches over the replicas, whose GPTQ hooks add to one Hessian per module.

On the CPU, GPTQModel's own ``ForwardExecutor.run_parallel`` runs here over two replicas (two
CPU "devices", a worker thread each), made by GPTQModel's ``clone_module_for_devices`` (the
deepcopy path) or the way ``torch.nn.parallel.replicate`` makes them (shallow module copies,
weights re-set as plain attributes; ``replicate`` itself needs CUDA): same counts and the same
checkpoint as one device. With two CUDA GPUs, the real thing: 1 vs 2 visible GPUs.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_gptqmodel_plugin import _tensors, plugin, tiny  # noqa: F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
HERE = Path(__file__).resolve().parent
DEVICES = [torch.device("cpu"), torch.device("cpu", 0)]  # two distinct keys for one CPU


def replicate_like_torch(module, devices, **kwargs):
    """``torch.nn.parallel.replicate``'s module copies, on the CPU (the first shares the tensors)."""
    modules = list(module.modules())
    index = {id(m): i for i, m in enumerate(modules)}
    copies = [[m._replicate_for_data_parallel() for m in modules] for _ in devices]
    for i, m in enumerate(modules):
        for j in range(len(devices)):
            replica = copies[j][i]
            for key, child in m._modules.items():
                if child is None:
                    replica._modules[key] = None
                else:
                    setattr(replica, key, copies[j][index[id(child)]])
            for key, param in m._parameters.items():
                if param is None:
                    replica._parameters[key] = None
                else:  # replicate sets non-leaf copies as plain attributes
                    setattr(replica, key, param.detach() if j == 0 else param.detach().clone())
            for key, buf in m._buffers.items():
                replica._buffers[key] = buf if buf is None or j == 0 else buf.clone()
    out = {}
    for j, device in enumerate(devices):
        copies[j][0]._gptqmodule_device_hint = device
        out[device] = copies[j][0]
    return out


class _Pool:
    """One worker thread per device, as GPTQModel's serial per-GPU submission.

    A CPU reduction's rounding depends on how many intra-op threads split it, and a new thread
    does not inherit ``torch.set_num_threads``: the workers take the caller's count.
    """

    def __init__(self):
        self.workers: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self.threads = torch.get_num_threads()

    def submit(self, device, fn, *args, **kwargs):
        worker = self.workers.get(str(device))
        if worker is None:
            worker = self.workers[str(device)] = concurrent.futures.ThreadPoolExecutor(
                1, initializer=torch.set_num_threads, initargs=(self.threads,)
            )
        return worker.submit(fn, *args, **kwargs)

    submit_serial = submit


@pytest.fixture
def data_parallel(monkeypatch):
    """``set(kind)``: GPTQModel's forwards go through its run_parallel over two CPU replicas."""
    from gptqmodel.looper import forward_executor
    from gptqmodel.utils.looper_helpers import clone_module_for_devices

    original = forward_executor.ForwardExecutor.run
    pool = _Pool()

    def activate(kind: str) -> None:
        clone = clone_module_for_devices if kind == "deepcopy" else replicate_like_torch

        def run(self, **kw):
            if kw.get("force_serial") or not self.looper.gptq_model.quantize_config.auto_forward_data_parallel:
                return original(self, **kw)  # what run() itself keeps serial
            for key in ("force_serial", "preserve_module_devices", "select_forward_devices_fn"):
                kw.pop(key, None)
            return self.run_parallel(devices=DEVICES, clone_module_for_devices_fn=clone, device_thread_pool=pool, **kw)

        monkeypatch.setattr(forward_executor.ForwardExecutor, "run", run)

    yield activate
    for worker in pool.workers.values():
        worker.shutdown()


def _quantize(plugin, tiny, routing: str, **kw):  # noqa: F811
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(str(tiny["src"]), QuantizeConfig(bits=4, group_size=128))
    result = plugin.quantize_with_defuser(model, tiny["calibration"], routing=routing, batch_size=4, **kw)
    return model, result


def _records(result):
    return sorted((p.module, p.routed, p.forced, p.quantizer_samples, p.method) for p in result.projections)


def _codes(qweight: torch.Tensor) -> torch.Tensor:
    """4-bit codes [in, out] of a GPTQ ``qweight`` [in / 8, out] (eight per int32, low bits first)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & 0xF).reshape(-1, qweight.shape[1])


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """How close two GPTQ (4-bit, sym) checkpoints of one model are: identical qweight tensors,
    the share of identical 4-bit codes, and the largest relative difference of a module's
    dequantized weight ``(code - 8) * scale``."""
    assert a.keys() == b.keys()
    prefixes = sorted(k[: -len(".qweight")] for k in a if k.endswith(".qweight"))
    identical, same_codes, codes, worst = 0, 0, 0, 0.0
    for p in prefixes:
        identical += torch.equal(a[f"{p}.qweight"], b[f"{p}.qweight"])
        ca, cb = _codes(a[f"{p}.qweight"]), _codes(b[f"{p}.qweight"])
        same_codes += int((ca == cb).sum())
        codes += ca.numel()
        g = a[f"{p}.g_idx"].long()
        wa, wb = (ca - 8) * a[f"{p}.scales"].float()[g], (cb - 8) * b[f"{p}.scales"].float()[g]
        worst = max(worst, float((wa - wb).norm() / wa.norm()))
    return {"qweights_identical": identical, "qweights": len(prefixes), "code_share": same_codes / codes, "worst_relative": worst}


@pytest.fixture(scope="module")
def single(plugin, tiny, tmp_path_factory):  # noqa: F811
    """One-device runs (grouped forward, batched solve) per routing mode: records and checkpoint."""
    runs = {}

    def get(routing: str, **kw):
        key = (routing, tuple(sorted(kw.items())))
        if key not in runs:
            model, result = _quantize(plugin, tiny, routing, grouped=True, batched_solve=True, **kw)
            path = tmp_path_factory.mktemp(f"single_{routing}")
            model.save(str(path))
            runs[key] = (result, _tensors(path), path)
        return runs[key]

    return get


def _logit_error(path: Path, tiny) -> float:  # noqa: F811
    """Largest logit difference of the saved quantized model to the float model, held-out text."""
    from gptqmodel import GPTQModel

    quantized = GPTQModel.load(str(path), device="cpu").model
    with torch.inference_mode():
        return float((quantized(**tiny["ids"]).logits.float() - tiny["model"](**tiny["ids"]).logits.float()).abs().max())


def _loop_ran(*args, **kwargs):
    raise AssertionError("the per-expert loop ran on a replica although the grouped forward applies")


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "routing"), [("replicate", "all"), ("deepcopy", "all"), ("replicate", "routed")])
def test_data_parallel_replicas_count_and_quantize_like_one_device(plugin, tiny, tmp_path, single, data_parallel, kind, routing):  # noqa: F811
    from gptqmodel import GPTQModel, QuantizeConfig

    from defuser_quant.core.defused import DefusedExperts

    reference, tensors_ref, reference_dir = single(routing)
    data_parallel(kind)
    model = GPTQModel.load(str(tiny["src"]), QuantizeConfig(bits=4, group_size=128))
    for block in model.model.modules():
        if isinstance(block, DefusedExperts):  # replicas copy the instance attribute: they must run grouped
            block.routed_forward = _loop_ran
    result = plugin.quantize_with_defuser(model, tiny["calibration"], routing=routing, batch_size=4, grouped=True,
                                          batched_solve=True)
    # Every experts forward of the capture and replay passes ran on a replica.
    assert result.replica_forwards > 0
    # The rows counted for each expert projection are the rows its GPTQ accumulated (GPTQModel's
    # own count), with replicas counting at the same time; the report has one device's totals.
    assert all(p.routed + p.forced == p.quantizer_samples for p in result.projections)
    # ... the replicas' GPTQ hooks ran batched, each replica's thread holding its tasks' locks
    assert result.hessians.batched > 0 and result.hessians.by_hook == 0
    assert result.coverage.totals == reference.coverage.totals
    assert result.solve.batched_modules == reference.solve.batched_modules
    # Replicas are made from the layer GPTQModel loaded: no expert projection was copied twice.
    assert result.bookkeeping.recopy_skipped == len(result.projections) == 48
    # Layer 0 sees the same inputs: the same rows per projection. Later layers see the previous
    # layer's quantized output, which the CPU rounds a little differently in another thread, so
    # a few tokens may route to other experts there.
    first = [r for r in _records(result) if ".layers.0." in r[0]]
    assert first and first == [r for r in _records(reference) if ".layers.0." in r[0]]
    # The replicas' hooks fed the Hessians: the checkpoint agrees with one device's.
    model.save(str(tmp_path / "dp"))
    tensors = _tensors(tmp_path / "dp")
    layer0 = agreement(*({k: v for k, v in t.items() if ".layers.0." in k} for t in (tensors_ref, tensors)))
    # Layer 0: at most float-order differences (the replicas add into one Hessian in either order).
    assert layer0["code_share"] > 0.999 and layer0["worst_relative"] < 0.05, layer0
    # The whole model quantizes as well as on one device (logit error against the float model).
    error, error_ref = _logit_error(tmp_path / "dp", tiny), _logit_error(reference_dir, tiny)
    print(f"\n{kind}/{routing}: {agreement(tensors_ref, tensors)}, logit error {error:.4f} vs {error_ref:.4f} on one device")
    assert error <= 1.25 * error_ref


@pytest.mark.slow
def test_budgeted_floor_holds_per_replica(plugin, tiny, single, data_parallel):  # noqa: F811
    reference, _, _ = single("budgeted", min_tokens=600)
    data_parallel("replicate")
    _, result = _quantize(plugin, tiny, "budgeted", grouped=True, batched_solve=True, min_tokens=600)
    assert result.replica_forwards > 0
    mine = {p.module: p for p in result.projections}
    for p in reference.projections:
        q = mine[p.module]
        # Each replica tops an expert up on its own share of the data: the floor holds, and in
        # layer 0 (same inputs, same routing) at least as many rows are forced as on one device.
        assert q.routed + q.forced == q.quantizer_samples and q.routed + q.forced >= min(600, p.routed + p.forced)
        if ".layers.0." in p.module:
            assert q.routed == p.routed and q.forced >= p.forced
    assert sum(q.forced for q in result.projections) > sum(p.forced for p in reference.projections)


def test_router_survives_deepcopy_and_shallow_replicas(plugin, tiny):  # noqa: F811
    from defuser_quant import convert_model
    from defuser_quant.core.defused import DefusedExperts
    from defuser_quant.integrations.gptqmodel.calibration import quantizer_aware_routing

    model = copy.deepcopy(tiny["model"])
    convert_model(model)
    path, block = next((n, m) for n, m in model.named_modules() if isinstance(m, DefusedExperts))
    x = torch.randn(5, model.config.hidden_size, dtype=torch.bfloat16)
    index = torch.tensor([[0, 1]] * 5)
    weights = torch.full((5, 2), 0.5, dtype=torch.bfloat16)
    expected = block.routed_forward(x, index, weights)
    stray = copy.deepcopy(block)  # copied before the router was installed: it cannot say whose replica it is
    with quantizer_aware_routing(model, "routed", 1) as router:
        deep = copy.deepcopy(block)
        shallow = replicate_like_torch(block, DEVICES)[DEVICES[1]]
        assert deep.forward_override is router and shallow.forward_override is router
        for replica in (deep, shallow):
            assert router.path_of(replica) == path
            assert torch.equal(replica(x, index, weights), expected)
        assert router.replica_calls == 2
    assert block.forward_override is None and not hasattr(block, "_defuser_quant_router_path")
    with quantizer_aware_routing(model, "routed", 1) as router, pytest.raises(RuntimeError, match="does not know"):
        router.path_of(stray)


# ----- CUDA: 1 vs 2 visible GPUs ---------------------------------------------------------------
def _run(tiny, out: Path, gpus: str, *extra: str) -> dict:  # noqa: F811
    calibration = out.parent / "calibration.json"
    if not calibration.exists():
        calibration.write_text(json.dumps(tiny["calibration"]))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus, "GPTQMODEL_CPU_WORKERS": "2"}
    cmd = [sys.executable, str(HERE / "gptqmodel_run.py"), str(tiny["src"]), str(calibration), str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("routing", ["routed", "all"])
def test_two_gpus_quantize_like_one(tiny, tmp_path, routing):  # noqa: F811
    flags = ["--routing", routing, "--grouped", "--batched"]
    one = _run(tiny, tmp_path / "one", "0", *flags)
    two = _run(tiny, tmp_path / "two", "0,1", *flags)
    assert one["gpus_visible"] == 1 and two["gpus_visible"] == 2
    assert one["replica_forwards"] == 0 < two["replica_forwards"]  # GPTQModel really ran data-parallel
    assert two["peak_gpu_bytes_per_device"][1] > 0
    assert one["fallback"] is None and two["fallback"] is None
    # Same rows into every expert's Hessian, same report.
    assert all(r["routed"] + r["forced"] == r["quantizer_samples"] for r in two["projections"])
    assert one["coverage_totals"] == two["coverage_totals"]
    key = lambda r: (r["module"], r["routed"], r["forced"], r["quantizer_samples"], r["method"])  # noqa: E731
    first = lambda run: sorted(key(r) for r in run["projections"] if ".layers.0." in r["module"])  # noqa: E731
    assert first(one) == first(two)
    # Checkpoints: the Hessians are sums of per-GPU partials (another float order), and the GPU
    # solves are not bit-reproducible; the quantized weights agree within GPTQ's tolerance.
    close = agreement(_tensors(tmp_path / "one" / "checkpoint"), _tensors(tmp_path / "two" / "checkpoint"))
    print(f"\n1 vs 2 GPUs ({routing}): {close}")
    assert close["code_share"] > 0.95 and close["worst_relative"] < 0.05, close
