"""Lean per-module bookkeeping inside GPTQModel (integrations.gptqmodel.overhead), with real
GPTQModel 7.6 on the tiny qwen3_moe of test_gptqmodel_plugin (CPU): the same checkpoint as
GPTQModel's own bookkeeping, patches only while ``quantize_with_defuser`` runs, stock behaviour
with a warning when GPTQModel's internals differ."""

from __future__ import annotations

import json
import shutil
import logging
from pathlib import Path

import pytest
import torch

from test_gptqmodel_plugin import _tensors, plugin, tiny  # noqa: E402, F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _patch_points() -> dict[str, object]:
    """Every function lean_bookkeeping replaces, as GPTQModel/LogBar hold them now."""
    from gptqmodel.looper import module_looper
    from gptqmodel.looper.module_looper import ModuleLooper
    from gptqmodel.models.base import BaseQModel
    from gptqmodel.utils import offload, structure
    from logbar import logbar as logbar_module
    from logbar import progress as logbar_progress
    from logbar import terminal

    return {
        "shell_module_materialize": BaseQModel.__dict__["shell_module_materialize"],
        "post_quantize": BaseQModel.__dict__["post_quantize"],
        "pre_quantize": BaseQModel.__dict__["pre_quantize"],
        "_subset_event_dispatch": ModuleLooper.__dict__["_subset_event_dispatch"],
        "io_write_performance": module_looper.io_write_performance,
        "_get_qualified_name": structure._get_qualified_name,
        "materialize_submodule": structure.LazyTurtle.__dict__["materialize_submodule"],
        "get_module_fullname": offload.get_module_fullname,
        "notebook": logbar_module._running_in_notebook_environment,
        "notebook(progress)": logbar_progress._running_in_notebook_environment,
        "headless": terminal._is_headless_environment,
        "_render_progress_stack_locked": logbar_module._render_progress_stack_locked,
        "_emit_log_line_locked": logbar_module.LogBar.__dict__["_emit_log_line_locked"],
        "_resolve_checkpoint_module_path": structure.LazyTurtle.__dict__["_resolve_checkpoint_module_path"],
        "_load_checkpoint_tensors_for_module_path": structure.LazyTurtle.__dict__["_load_checkpoint_tensors_for_module_path"],
        "_copy_checkpoint_tensors_into_submodule": structure.LazyTurtle.__dict__["_copy_checkpoint_tensors_into_submodule"],
    }


def _load(src: Path, offload: bool, offload_path: Path | None = None):
    from gptqmodel import GPTQModel, QuantizeConfig

    where = {"offload_to_disk_path": str(offload_path)} if offload and offload_path is not None else {}
    return GPTQModel.load(str(src), QuantizeConfig(bits=4, group_size=128, offload_to_disk=offload, **where))


def _run(plugin, tiny, out: Path, *, source: str, offload: bool, lean: bool):  # noqa: F811
    # one offload folder for both runs (GPTQModel writes its path into the saved configs), emptied
    # before each: GPTQModel leaves it behind, and the bundled offload never overwrites a folder
    shutil.rmtree(out.parent / "offload", ignore_errors=True)
    model = _load(tiny[source], offload, out.parent / "offload")
    before = _patch_points()
    result = plugin.quantize_with_defuser(
        model, tiny["calibration"][:16], batch_size=4, grouped=True, batched_solve=True, lean_bookkeeping=lean
    )
    assert _patch_points() == before  # restored after the run
    model.save(str(out))
    configs = {name: json.loads((out / name).read_text()) for name in ("config.json", "quantize_config.json")}
    return result, _tensors(out), configs


@pytest.mark.slow
@pytest.mark.parametrize(("source", "offload"), [("src", True), ("fused", True), ("src", False)])
def test_lean_bookkeeping_gives_gptqmodels_checkpoint(plugin, tiny, tmp_path, source, offload):  # noqa: F811
    stock, stock_tensors, stock_configs = _run(plugin, tiny, tmp_path / "stock", source=source, offload=offload, lean=False)
    lean, lean_tensors, lean_configs = _run(plugin, tiny, tmp_path / "lean", source=source, offload=offload, lean=True)
    assert stock.bookkeeping is None
    # Same keys, every tensor bit-equal (qweight, qzeros, scales, g_idx and the float rest), same config.
    assert lean_tensors.keys() == stock_tensors.keys()
    assert any(k.endswith("experts.0.gate_proj.qweight") for k in lean_tensors)
    assert not [k for k in lean_tensors if not torch.equal(lean_tensors[k], stock_tensors[k])]
    assert lean_configs == stock_configs
    stats = lean.bookkeeping
    experts = len(lean.projections)
    cuda = torch.cuda.is_available()
    assert experts == 48 and stats.disabled == {}
    assert stats.headless_memo_hits > stats.headless_memo_misses >= 1  # LogBar asked once per environment
    redraws = stats.line_redraw  # GPTQModel's per-module log lines at the end: the stack drawn again only now and then
    assert redraws is not None and redraws.skipped > redraws.rendered >= 1
    moved = stats.layer_offload  # every layer holds experts; staged on CUDA, GPTQModel's own move on the CPU
    assert moved.layers + moved.stock >= 2 and (moved.layers == 0) == (not torch.cuda.is_available())
    if offload:  # LazyTurtle source and disk offload: every expert projection took the lean path
        # one offload bundle per experts block (layer), read back by GPTQModel's save above; the
        # last block (layer 1) is kept in memory, where the save took it from
        bundle = stats.offload_bundle
        assert (bundle.bundles, bundle.modules, bundle.kept_in_memory, bundle.at_end) == (1, experts // 2, experts // 2, 0)
        assert dict(bundle.stock) == {"not an expert projection of our blocks": 8}  # q/k/v/o of two layers
        folders = {p.name for p in (tmp_path / "offload").iterdir()}
        assert "model.layers.0.mlp.experts" in folders and "model.layers.1.mlp.experts" not in folders
        assert not [f for f in folders if ".experts." in f or f.endswith(".tmp")]  # no per-expert folder, no leftovers
        assert stats.materialize_fast == experts and stats.offload_fast == 0  # no per-module offload left
        assert stats.tie_weights_skipped == experts  # tie_word_embeddings=False: nothing to tie
        assert not stats.stock
        # kept shard handles: opened once per handle, never more than two per shard, all closed again
        assert stats.shard_opens <= 2 and stats.shard_closed == stats.shard_opens
        # recopy: the layer load filled every expert projection; no forward preparation copied again
        assert stats.recopy_recorded >= experts and stats.recopy_skipped == experts
        assert stats.recopy_changed == stats.recopy_copied == 0
        # layer 0 is loaded on the CPU for the input capture; on CUDA pre_quantize moves it (followed)
        assert stats.recopy_moved == (experts // 2 if torch.cuda.is_available() else 0)
        # ... through the staged upload (layer_onload), which recopy followed like GPTQModel's move
        onload = stats.layer_onload
        assert (onload.layers, onload.failed) == ((1, 0) if cuda else (0, 0)) and (onload.tensors > 0) == cuda
        # layer_reads: layer 0 is loaded on the CPU (stock), layer 1 to the GPU from a read ahead
        reads = stats.layer_reads
        assert (reads.layers, reads.read_ahead, reads.failed, reads.unused) == ((1, 1, 0, 0) if cuda else (0, 0, 0, 0))
        assert reads.stock == (1 if cuda else 2)  # layer 0's load to the CPU; without CUDA both loads
        assert (reads.tensors_served > 0) == cuda
        # a fused source's tensor is read once per expert: served once, then through GPTQModel's own handle
        assert (reads.tensors_stock > 0) == (cuda and source == "fused")
        if source == "src":  # each expert's weight read once (the forward check), through a kept handle
            assert stats.shard_reads_kept == experts and stats.shard_reads_fresh == 0 and stats.shard_opens >= 1
        else:  # the fused source's forward check goes through GPTQModel's alias search, and nothing is copied
            assert stats.shard_reads_kept == stats.shard_reads_fresh == 0
        # every forward preparation's checkpoint lookup came from the index (the fused source's
        # per-expert paths have no tensors of their own: GPTQModel's alias search answers those)
        if source == "src":
            assert stats.checkpoint_loads_indexed >= experts and stats.checkpoint_path_indexed >= experts
        else:
            assert stats.checkpoint_loads_indexed >= experts
    else:  # no lazy source, no offload: GPTQModel's own path for everything, and said why
        assert stats.materialize_fast == stats.offload_fast == 0
        assert stats.stock == {"materialize: no lazy checkpoint source": experts}
        assert stats.shard_opens == stats.shard_reads_kept == stats.shard_reads_fresh == 0
        assert stats.recopy_recorded == stats.recopy_skipped == 0  # nothing loaded from a lazy source


@pytest.mark.slow
def test_patches_are_restored_when_quantize_raises(plugin, tiny, monkeypatch):  # noqa: F811
    model = _load(tiny["src"], True)
    before = _patch_points()
    seen = {}

    def interrupted(*args, **kwargs):
        seen.update(_patch_points())
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plugin.quantize_with_defuser(model, tiny["calibration"][:4], batch_size=4)
    changed = [k for k in before if seen[k] is not before[k]]
    assert {"shell_module_materialize", "post_quantize", "_get_qualified_name", "materialize_submodule", "get_module_fullname", "headless",
            "_render_progress_stack_locked", "_emit_log_line_locked",
            "_resolve_checkpoint_module_path", "_load_checkpoint_tensors_for_module_path",
            "_copy_checkpoint_tensors_into_submodule", "pre_quantize"} <= set(changed)
    assert _patch_points() == before


@pytest.mark.slow
def test_mismatched_internals_warn_and_stay_stock(plugin, tiny, monkeypatch, caplog):  # noqa: F811
    from gptqmodel.utils import offload, structure

    from defuser_quant.integrations.gptqmodel.overhead import lean_bookkeeping

    model = _load(tiny["src"], True)
    # A GPTQModel whose name lookup takes other arguments, and whose offload has no get_module_fullname.
    monkeypatch.setattr(structure, "_get_qualified_name", lambda root, obj, strict=True: "x")
    monkeypatch.delattr(offload, "get_module_fullname")
    from gptqmodel.models.base import BaseQModel

    shell = BaseQModel.__dict__["shell_module_materialize"]
    turtle = structure.LazyTurtle.__dict__["materialize_submodule"]
    with caplog.at_level(logging.WARNING), lean_bookkeeping(model) as stats:
        assert BaseQModel.__dict__["shell_module_materialize"] is shell
        assert structure.LazyTurtle.__dict__["materialize_submodule"] is turtle
        assert not hasattr(offload, "get_module_fullname")
    # kept shards and the recopy part act inside the lean materialize: stock with it
    assert set(stats.disabled) == {"materialize", "offload", "shard_handles", "recopy"}
    assert "_get_qualified_name(root, obj)" in stats.disabled["materialize"]
    assert structure.safe_open is __import__("safetensors").safe_open
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "lean" in r.getMessage()]
    assert len(warned) == 4 and all("GPTQModel's own per-module" in w for w in warned)


@pytest.mark.slow
def test_a_path_that_names_another_module_takes_gptqmodels_path(plugin, tiny):  # noqa: F811
    from gptqmodel.looper.named_module import NamedModule

    from defuser_quant.integrations.gptqmodel.overhead import lean_bookkeeping

    model = _load(tiny["src"], True)
    root = "model.layers.0.mlp.experts"
    target = model.model.get_submodule(f"{root}.1.up_proj")
    assert target.weight.device.type == "meta"
    with lean_bookkeeping(model) as stats:
        wrong = NamedModule(target, name="mlp.experts.0.up_proj", full_name=f"{root}.0.up_proj", layer_index=0)
        model.shell_module_materialize(target_submodule=target, device=torch.device("cpu"), role="forward", named_module=wrong)
    assert stats.materialize_fast == 0
    assert stats.stock == {"materialize: NamedModule.full_name does not name the module": 1}
    # GPTQModel found the module's real path by its own scan: expert 1's weights, not expert 0's.
    assert torch.equal(target.weight, _checkpoint_weight(tiny, f"{root}.1.up_proj"))


def test_tied_models_keep_tie_weights():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from defuser_quant.integrations.gptqmodel.overhead import _ties_nothing

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=2, num_experts_per_tok=1)
    tied = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw, tie_word_embeddings=True))
    untied = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw, tie_word_embeddings=False))
    assert tied.get_expanded_tied_weights_keys(all_submodels=True)  # the real mapping is not empty
    assert _ties_nothing(tied) is False
    assert _ties_nothing(untied) is True


def test_notebook_check_memo_answers_as_logbar_does(monkeypatch):
    logbar_module = pytest.importorskip("logbar.logbar", reason="logbar comes with gptqmodel")

    from defuser_quant.integrations.gptqmodel.overhead import _memo_notebook_check

    original = logbar_module._running_in_notebook_environment
    memo = _memo_notebook_check(original)
    for env in ({}, {"JPY_PARENT_PID": "1"}, {"LOGBAR_DISABLE_NOTEBOOK_DETECTION": "1", "JPY_PARENT_PID": "1"}, {}):
        for key in ("LOGBAR_DISABLE_NOTEBOOK_DETECTION", "LOGBAR_FORCE_NOTEBOOK_MODE", "JPY_PARENT_PID", "IPYKERNEL_PARENT_PID"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert memo() == original()


def test_name_hint_answers_only_for_the_module_being_materialized():
    from types import SimpleNamespace

    from torch import nn

    from defuser_quant.integrations.gptqmodel.overhead import BookkeepingStats, _Lean

    root = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    lean = _Lean(SimpleNamespace(model=root), frozenset({"0"}), False, BookkeepingStats())
    scans = []

    def scan(r, obj):
        scans.append(obj)
        return next(name for name, m in r.named_modules() if m is obj)

    lookup = lean.qualified_name(scan)
    lean.local.hint = (root, root[0], "0")
    assert lookup(root, root[0]) == "0" and not scans  # the hinted module: no scan
    assert lookup(root, root[1]) == "1" and scans == [root[1]]  # any other module: GPTQModel's scan
    assert lookup(nn.Sequential(root[0]), root[0]) == "0" and len(scans) == 2  # another root: scanned
    lean.local.hint = None
    assert lookup(root, root[0]) == "0" and len(scans) == 3


def test_patched_restores_own_and_inherited_attributes_also_on_error():
    import types

    from defuser_quant.integrations.gptqmodel.compat import patched

    class Base:
        f = "base"

    class Sub(Base):
        g = "own"

    module = types.ModuleType("m")
    module.h = "module"
    with pytest.raises(KeyboardInterrupt):
        with patched(Sub, "f", "patched"), patched(Sub, "g", "patched"), patched(module, "h", "patched"):
            assert (Sub.f, Sub.g, module.h) == ("patched", "patched", "patched")
            raise KeyboardInterrupt
    assert "f" not in vars(Sub) and Sub.f == "base"  # inherited again, not copied down
    assert vars(Sub)["g"] == "own" and module.h == "module"


@pytest.mark.slow
def test_checkpoint_index_loads_what_gptqmodel_loads(plugin, tiny):  # noqa: F811
    """Every module path of the tiny model (and some that are not there): the indexed lookups give
    GPTQModel's own path, the same tensor names in the same order, bit-equal tensors."""
    from gptqmodel.utils.structure import LazyTurtle

    from defuser_quant.integrations.gptqmodel.overhead import lean_bookkeeping

    model = _load(tiny["src"], True)
    turtle = model.turtle_model
    assert isinstance(turtle, LazyTurtle)
    paths = [name for name, _ in model.model.named_modules()] + ["model.layers.0.mlp.experts.99", "nothing.here", "model"]
    paths += [p.removeprefix("model.") for p in paths if p.startswith("model.layers.0.")]  # resolved through aliases
    stock = {p: (turtle._resolve_checkpoint_module_path(p), turtle._load_checkpoint_tensors_for_module_path(module_path=p, recurse=False))
             for p in paths}
    with lean_bookkeeping(model, parts=frozenset({"checkpoint_index"})) as stats:
        lean = {p: (turtle._resolve_checkpoint_module_path(p), turtle._load_checkpoint_tensors_for_module_path(module_path=p, recurse=False))
                for p in paths}
    assert stats.disabled == {} and stats.checkpoint_loads_indexed == len(paths)
    assert stats.checkpoint_path_indexed >= 48  # every expert projection at least
    for p in paths:
        assert lean[p][0] == stock[p][0], p
        assert list(lean[p][1]) == list(stock[p][1]), p  # same names, same order
        assert all(torch.equal(lean[p][1][k], stock[p][1][k]) for k in stock[p][1]), p
    assert "weight" in stock["model.layers.0.mlp.experts.3.down_proj"][1]
    assert stock["layers.0.mlp.experts.3.down_proj"][0] == "model.layers.0.mlp.experts.3.down_proj"


def test_checkpoint_index_matches_a_scan_of_odd_names():
    """Prefixes and direct tensors of names with empty parts, trailing dots and no dots, against the
    definition GPTQModel's scans use (``startswith(path + ".")``; a direct tensor's rest has no dot)."""
    from defuser_quant.integrations.gptqmodel.overhead import _CheckpointIndex

    names = ["a.b.weight", "a.b.bias", "a.b.c.weight", "a..x", "a.", ".y", "z", "a.b.weight2", "q.r.s.t"]
    index = _CheckpointIndex(dict.fromkeys(names, "shard"))
    for path in ["", "a", "a.b", "a.", "a.b.c", "q", "q.r", "q.r.s", "z", "b", "a.b.weight"]:
        prefix = path + "."
        assert (path in index.prefixes) == any(n.startswith(prefix) for n in names), path
        expected = [(n[len(prefix):], n) for n in names if n.startswith(prefix) and n[len(prefix):] and "." not in n[len(prefix):]]
        assert index.direct.get(path, []) == expected, path
    assert index.current(index.source) and not index.current(dict(index.source))


@pytest.mark.slow
def test_changed_checkpoint_source_keeps_gptqmodels_lookups(plugin, tiny, monkeypatch, caplog):  # noqa: F811
    from gptqmodel.utils import structure

    from defuser_quant.integrations.gptqmodel.overhead import lean_bookkeeping

    model = _load(tiny["src"], True)
    original = structure.LazyTurtle._load_checkpoint_tensors_for_module_path

    def changed(self, *, module_path, recurse):  # a GPTQModel whose loader is not the one checked
        return original(self, module_path=module_path, recurse=recurse)

    monkeypatch.setattr(structure.LazyTurtle, "_load_checkpoint_tensors_for_module_path", changed)
    with caplog.at_level(logging.WARNING), lean_bookkeeping(model) as stats:
        assert structure.LazyTurtle.__dict__["_load_checkpoint_tensors_for_module_path"] is changed
    assert set(stats.disabled) == {"checkpoint_index"}
    assert "_load_checkpoint_tensors_for_module_path" in stats.disabled["checkpoint_index"]
    assert any("lean checkpoint_index" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_every_lean_part_is_named_in_the_gptqmodel_docs():
    from defuser_quant.integrations.gptqmodel.overhead import PARTS

    docs = (Path(__file__).resolve().parents[1] / "docs" / "gptqmodel.md").read_text(encoding="utf-8")
    assert not [part for part in sorted(PARTS) if f"`{part}`" not in docs]


def test_lean_bookkeeping_refuses_unknown_parts():
    pytest.importorskip("gptqmodel")
    from defuser_quant.integrations.gptqmodel.overhead import lean_bookkeeping

    with pytest.raises(ValueError, match="unknown lean bookkeeping parts"):
        with lean_bookkeeping(object(), parts=frozenset({"everything"})):
            pass


def test_headless_memo_answers_as_logbar_does(monkeypatch):
    terminal = pytest.importorskip("logbar.terminal", reason="logbar comes with gptqmodel")

    from defuser_quant.integrations.gptqmodel.overhead import _HeadlessMemo, _headless_mismatch

    assert _headless_mismatch() is None
    # LogBar answers "not headless" whenever pytest runs it; look at the rest of its logic here
    monkeypatch.setattr(terminal, "_running_under_pytest", lambda: False)
    for key in [k for k in __import__("os").environ if k.startswith(terminal._HEADLESS_ENV_PREFIXES)]:
        monkeypatch.delenv(key)
    for key in terminal._HEADLESS_ENV_VARS | {"LOGBAR_FORCE_PROGRESS", "LOGBAR_DISABLE_HEADLESS_DETECTION"}:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    original = terminal._is_headless_environment
    memo = _HeadlessMemo(original, terminal)
    answers = []
    steps = [
        lambda: None,
        lambda: monkeypatch.setenv("CLAUDE_SESSION", "1"),  # an agent prefix: headless
        lambda: monkeypatch.setenv("LOGBAR_FORCE_PROGRESS", "1"),  # forced: not headless
        lambda: monkeypatch.delenv("LOGBAR_FORCE_PROGRESS"),
        lambda: monkeypatch.delenv("CLAUDE_SESSION"),
        lambda: monkeypatch.setenv("TERM", "dumb"),  # a value change, same names
        lambda: monkeypatch.setenv("TERM", "xterm"),
    ]
    for step in steps:
        step()
        for notebook in (False, True, False):
            assert memo(notebook=notebook) == original(notebook=notebook)
            answers.append(original(notebook=notebook))
    assert True in answers and False in answers[3:]  # the environment changes did change LogBar's answer
    assert memo.misses == 2 * len(steps) and memo.hits == len(steps)  # asked again after every change only
    monkeypatch.setattr(terminal, "_running_under_pytest", lambda: True)  # a replaced global is seen too
    assert memo(notebook=True) is False and memo.misses == 2 * len(steps) + 1


def _shard(path: Path, **tensors) -> dict:
    """A safetensors file at ``path`` written to a new inode (os.replace), as a replaced checkpoint would be."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    __import__("os").replace(tmp, path)
    return {k: v.clone() for k, v in tensors.items()}


def test_kept_shard_handles_read_what_a_fresh_open_reads(tmp_path):
    """A name read again gets the file's bytes even after the first copy was written to (get_tensor hands
    out views of a handle's copy-on-write mapping), a replaced file is opened again, and a name no kept
    handle may serve is read through the caller's own handle."""
    pytest.importorskip("gptqmodel")
    from safetensors import safe_open

    from defuser_quant.integrations.gptqmodel.overhead import BookkeepingStats, _KeptShard, _ShardHandles

    path = tmp_path / "model.safetensors"
    want = _shard(path, a=torch.arange(8, dtype=torch.float32), b=torch.ones(3, dtype=torch.bfloat16))
    stats = BookkeepingStats()
    kept = _ShardHandles(safe_open, stats)
    reads = []
    for _ in range(4):  # GPTQModel's with-blocks: each reads "a" again
        assert kept.enter(str(path))
        with _KeptShard(kept, str(path)) as f:
            reads.append(f.get_tensor("a"))
            reads[-1].add_(100)  # a write into what was handed out
    assert stats.shard_opens == 2 and stats.shard_reads_kept == 2 and stats.shard_reads_fresh == 2
    with _KeptShard(kept, str(path)) as f:
        assert torch.equal(f.get_tensor("b"), want["b"]) and list(f.keys()) == ["a", "b"]  # keys(): its own handle
    assert all(torch.equal(t, want["a"] + 100) for t in reads)  # each read saw the file's bytes, not a written copy
    want = _shard(path, a=torch.full((8,), 7.0), b=torch.zeros(3, dtype=torch.bfloat16))
    assert kept.enter(str(path)) and stats.shard_closed == 2  # the old handles were closed
    with _KeptShard(kept, str(path)) as f:
        assert torch.equal(f.get_tensor("a"), want["a"]) and torch.equal(f.get_tensor("b"), want["b"])
    kept.close()
    assert stats.shard_closed == stats.shard_opens == 3 and not kept.files
    assert not kept.enter(str(path))  # closed: GPTQModel's own open from here on


def test_kept_shard_handles_are_used_by_one_thread_at_a_time(tmp_path):
    """Threads reading through one pool: no handle is read by two threads at once, none serves a name twice."""
    pytest.importorskip("gptqmodel")
    import threading
    import time

    from defuser_quant.integrations.gptqmodel.overhead import BookkeepingStats, _ShardHandles

    problems = []

    class Handle:
        def __init__(self):
            self.busy = 0
            self.served = []

        def get_tensor(self, name):
            self.busy += 1
            if self.busy > 1:
                problems.append("two threads in one handle")
            time.sleep(0.001)  # lets another thread in, were there no lock
            self.busy -= 1
            self.served.append(name)
            return name

        def __exit__(self, *exc):
            pass

    handles = []

    def opener(path, framework, device):
        handles.append(Handle())
        return handles[-1]

    shard = tmp_path / "f"
    shard.write_bytes(b"x")
    kept = _ShardHandles(opener, BookkeepingStats(), per_file=2)
    assert kept.enter(str(shard)) and len(handles) == 1
    got = []

    def reader(names):
        for name in names:
            got.append((name, kept.kept_tensor(str(shard), name)))

    threads = [threading.Thread(target=reader, args=([f"t{i % 4}.{j}" for j in range(20)],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not problems
    assert all(len(h.served) == len(set(h.served)) for h in handles)  # a name at most once per handle
    assert all(tensor == name for name, (ok, tensor) in got if ok)
    assert sum(ok for _, (ok, _) in got) == 2 * 80 and len(handles) == 2  # each of the 80 names read twice, then left to the caller


@pytest.mark.slow
def test_kept_shards_are_closed_when_the_block_ends_even_on_ctrl_c(plugin, tiny, monkeypatch):  # noqa: F811
    import safetensors
    from gptqmodel.looper.named_module import NamedModule
    from gptqmodel.utils import structure

    from defuser_quant.integrations.gptqmodel.overhead import _KeptShard, lean_bookkeeping

    model = _load(tiny["src"], True)
    real = safetensors.safe_open
    opened = []

    def recorded(*args, **kwargs):
        opened.append(real(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(safetensors, "safe_open", recorded)
    monkeypatch.setattr(structure, "safe_open", recorded)
    shard = str(next(Path(tiny["src"]).glob("*.safetensors")))
    root = "model.layers.0.mlp.experts"
    targets = [(f"{root}.{e}.{name}", model.model.get_submodule(f"{root}.{e}.{name}")) for e in (0, 1) for name in ("up_proj", "down_proj")]
    with pytest.raises(KeyboardInterrupt):
        with lean_bookkeeping(model) as stats:
            with structure.safe_open(shard, framework="pt", device="cpu") as outside:
                assert not isinstance(outside, _KeptShard)  # outside a materialize: GPTQModel's own open
            for path, target in targets:
                named = NamedModule(target, name=path.removeprefix("model.layers.0."), full_name=path, layer_index=0)
                model.shell_module_materialize(target_submodule=target, device=torch.device("cpu"), role="forward", named_module=named)
            kept = len(opened)
            raise KeyboardInterrupt
    assert stats.materialize_fast == len(targets) and stats.shard_reads_kept == 2 * len(targets)
    assert stats.shard_opens == 2 and kept == 3 and stats.shard_reads_fresh == 0  # one shard, two kept handles
    assert stats.shard_closed == stats.shard_opens
    for handle in opened:  # every handle opened inside the block is closed
        with pytest.raises(safetensors.SafetensorError, match="closed"):
            handle.get_tensor(f"{root}.0.up_proj.weight")
    with real(shard, framework="pt", device="cpu") as f:
        assert all(torch.equal(target.weight, f.get_tensor(f"{path}.weight")) for path, target in targets)


def test_progress_bars_render_at_most_once_per_interval_and_always_when_forced(monkeypatch):
    import threading

    from defuser_quant.integrations.gptqmodel import overhead
    from defuser_quant.integrations.gptqmodel.overhead import BookkeepingStats, _rate_limited_draw

    clock = {"now": 100.0}
    monkeypatch.setattr(overhead.time, "monotonic", lambda: clock["now"])

    class Bar:
        def __init__(self):
            self.frames: list[bool] = []

        def draw(self, force: bool = False):
            self.frames.append(force)
            return "drawn"

    stats = BookkeepingStats()
    activity: list[float] = []
    Bar.draw = _rate_limited_draw(Bar.draw, stats, threading.Lock(), 0.1, lambda: activity.append(clock["now"]))
    a, b = Bar(), Bar()
    assert a.draw() == "drawn" and b.draw() == "drawn"  # a bar's first draw renders; each bar has its own clock
    for _ in range(50):
        assert a.draw() is None  # sooner than 0.1 s: dropped
    assert a.draw(force=True) == "drawn"  # forced: always
    clock["now"] += 0.05
    assert a.draw() is None
    clock["now"] += 0.06
    assert a.draw() == "drawn"  # 0.11 s after the forced render
    assert a.frames == [False, True, False] and b.frames == [False]
    assert (stats.draws_rendered, stats.draws_skipped) == (4, 51) and len(activity) == 51  # a dropped draw is activity


def test_the_draw_rate_part_patches_logbar_and_restores_it(plugin, tiny):  # noqa: F811
    from logbar.progress import ProgressBar

    from defuser_quant.integrations.gptqmodel.overhead import internals_mismatch, lean_bookkeeping

    assert "draw_rate" not in internals_mismatch()
    original = ProgressBar.draw
    with lean_bookkeeping(_load(tiny["src"], True), parts=frozenset({"draw_rate"})) as stats:
        assert ProgressBar.draw is not original
        from logbar import LogBar

        bar = LogBar.shared().pb(range(20)).manual()
        for i in range(20):
            bar.current_iter_step = i
            bar.draw()
        bar.close()
    assert ProgressBar.draw is original
    assert stats.draws_rendered >= 1 and stats.draws_rendered + stats.draws_skipped >= 20


def test_quantize_with_defuser_refuses_a_string_of_parts(plugin, tiny):  # noqa: F811
    with pytest.raises(TypeError, match="lean_bookkeeping must be a bool or a collection of part names"):
        plugin.quantize_with_defuser(object(), [], lean_bookkeeping="offload")


@pytest.mark.slow
def test_a_collection_of_parts_turns_on_only_those(plugin, tiny):  # noqa: F811
    model = _load(tiny["src"], True)
    result = plugin.quantize_with_defuser(model, tiny["calibration"][:8], batch_size=4, lean_bookkeeping={"offload"})
    stats = result.bookkeeping
    assert stats.offload_fast == len(result.projections) > 0
    assert stats.materialize_fast == stats.draws_rendered == stats.headless_memo_hits == stats.checkpoint_loads_indexed == 0
    with pytest.raises(ValueError, match="unknown lean bookkeeping parts"):
        plugin.quantize_with_defuser(_load(tiny["src"], True), tiny["calibration"][:8], lean_bookkeeping={"offlaod"})


# ----- the recopy part --------------------------------------------------------------------------
def _checkpoint_weight(tiny, path: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(next(Path(tiny["src"]).glob("*.safetensors"))), "pt") as f:
        return f.get_tensor(f"{path}.weight")


def _prepare_for_forward(model, path: str) -> None:
    from gptqmodel.looper.named_module import NamedModule

    module = model.model.get_submodule(path)
    named = NamedModule(module, name=path.split(".", 3)[-1], full_name=path, layer_index=0)
    model.shell_module_materialize(target_submodule=module, device=torch.device("cpu"), role="forward", named_module=named)


@pytest.mark.slow
def test_recopy_skips_only_an_untouched_expert_filled_by_the_layer_load(plugin, tiny):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.overhead import lean_bookkeeping

    model = _load(tiny["src"], True)
    root = "model.layers.0.mlp.experts"
    layer = model.model.get_submodule("model.layers.0")
    with lean_bookkeeping(model) as stats:
        model.shell_module_materialize(target_submodule=layer, device=torch.device("cpu"))  # GPTQModel's layer load
        assert stats.recopy_recorded == 8 * 3  # every expert projection of the layer
        untouched, replaced, moved_away = (model.model.get_submodule(f"{root}.{e}.up_proj") for e in (0, 1, 2))
        kept = untouched.weight.data_ptr()
        replaced.weight.data = torch.zeros_like(replaced.weight)  # e.g. quantized: the weight's data swapped
        moved_away.weight = torch.nn.Parameter(moved_away.weight.detach().clone())  # another tensor object
        for e in (0, 1, 2):
            _prepare_for_forward(model, f"{root}.{e}.up_proj")
        assert (stats.recopy_skipped, stats.recopy_changed) == (1, 2)
        assert untouched.weight.data_ptr() == kept  # not written again
        _prepare_for_forward(model, f"{root}.0.up_proj")  # a second preparation: the record is used once
        assert stats.recopy_copied == 1
    for e in (0, 1, 2):  # every one holds the checkpoint's weight
        assert torch.equal(model.model.get_submodule(f"{root}.{e}.up_proj").weight, _checkpoint_weight(tiny, f"{root}.{e}.up_proj"))
    assert stats.disabled == {}


def _fake_move(replace: str | None = None):
    """A stand-in for ``move_to`` to another device on a CPU-only machine: every tensor's data copied
    to new storage (the same parameter objects), and optionally one parameter replaced outright."""

    def move_to(module, device, dtype=None):
        for name, sub in module.named_modules():
            for pname, p in list(sub.named_parameters(recurse=False)):
                if replace is not None and f"{name}.{pname}" == replace:
                    setattr(sub, pname, torch.nn.Parameter(p.detach().clone()))
                else:
                    p.data = p.data.clone()
        return module

    return move_to


@pytest.mark.slow
@pytest.mark.parametrize("replaced", [False, True])
def test_recopy_follows_gptqmodels_move_of_layer_0(plugin, tiny, monkeypatch, replaced):  # noqa: F811
    import gptqmodel.models.base as base

    from defuser_quant.integrations.gptqmodel.overhead import lean_bookkeeping

    model = _load(tiny["src"], True)
    root = "model.layers.0.mlp.experts"
    replace = "mlp.experts.3.down_proj.weight" if replaced else None
    monkeypatch.setattr(base, "move_to", _fake_move(replace))
    monkeypatch.setattr(model.quantize_config, "device", torch.device("meta"))  # "not the CPU": pre_quantize moves
    layer = model.model.get_submodule("model.layers.0")
    with lean_bookkeeping(model) as stats:
        layer = model.shell_module_materialize(target_submodule=layer, device=torch.device("cpu"))  # input capture
        before = layer.mlp.experts[0].up_proj.weight.data_ptr()
        assert model.pre_quantize(layer) is layer
        assert layer.mlp.experts[0].up_proj.weight.data_ptr() != before  # the data moved
        for e in range(8):
            for name in ("gate_proj", "up_proj", "down_proj"):
                _prepare_for_forward(model, f"{root}.{e}.{name}")
    assert stats.disabled == {}
    assert stats.recopy_moved == 24 - replaced
    assert (stats.recopy_skipped, stats.recopy_changed) == (24 - replaced, int(replaced))
    for e in range(8):
        for name in ("gate_proj", "up_proj", "down_proj"):
            path = f"{root}.{e}.{name}"
            assert torch.equal(model.model.get_submodule(path).weight, _checkpoint_weight(tiny, path))


@pytest.mark.slow
def test_recopy_does_not_follow_an_unknown_pre_quantize(plugin, tiny, monkeypatch):  # noqa: F811
    import gptqmodel.models.base as base

    from defuser_quant.integrations.gptqmodel.overhead import lean_bookkeeping
    from defuser_quant.integrations.gptqmodel.recopy import pre_quantize_refusal

    assert pre_quantize_refusal() is None

    def pre_quantize(self, module):  # another GPTQModel: may write to the weights while moving them
        for p in module.parameters():
            p.data = torch.zeros_like(p)
        return module

    monkeypatch.setattr(base.BaseQModel, "pre_quantize", pre_quantize)
    assert "pre_quantize differs" in pre_quantize_refusal()
    model = _load(tiny["src"], True)
    path = "model.layers.0.mlp.experts.0.up_proj"
    layer = model.model.get_submodule("model.layers.0")
    with lean_bookkeeping(model) as stats:
        layer = model.shell_module_materialize(target_submodule=layer, device=torch.device("cpu"))
        model.pre_quantize(layer)
        _prepare_for_forward(model, path)
    assert "pre_quantize differs" in stats.disabled["recopy.moves"]
    assert (stats.recopy_moved, stats.recopy_skipped, stats.recopy_changed) == (0, 0, 1)
    assert torch.equal(model.model.get_submodule(path).weight, _checkpoint_weight(tiny, path))


def test_recopy_runs_only_for_plain_gptq_configs():
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel.recopy import config_refusal, internals_refusal

    assert internals_refusal() is None
    assert config_refusal(QuantizeConfig(bits=4, group_size=128)) is None
    assert config_refusal(QuantizeConfig(bits=4, group_size=128, desc_act=True, act_group_aware=False, mse=2.0)) is None
    for field, value in (("rotation", "hadamard"), ("preprocessors", ["x"]), ("adapter", object()), ("gptaq", object())):
        qcfg = QuantizeConfig(bits=4, group_size=128)
        setattr(qcfg, field, value)
        assert field in config_refusal(qcfg)
    assert "only plain GPTQ" in config_refusal(object())


def test_recopy_refuses_a_lazyturtle_whose_copy_or_materialize_differs(monkeypatch):
    from gptqmodel.utils import structure

    from defuser_quant.integrations.gptqmodel.recopy import internals_refusal

    turtle = structure.LazyTurtle
    monkeypatch.setattr(turtle, "_copy_checkpoint_tensors_into_submodule", lambda self, target_model, device: None)
    assert "expected LazyTurtle._copy_checkpoint_tensors_into_submodule(" in internals_refusal()
    monkeypatch.undo()
    monkeypatch.setattr(turtle, "materialize_submodule", lambda self, *args, **kwargs: None)
    assert "to call _copy_checkpoint_tensors_into_submodule" in internals_refusal()


@pytest.mark.slow
def test_a_config_that_may_write_weights_keeps_gptqmodels_copies(plugin, tiny):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.overhead import lean_bookkeeping

    model = _load(tiny["src"], True)
    model.quantize_config.rotation = "hadamard"
    layer = model.model.get_submodule("model.layers.0")
    with lean_bookkeeping(model) as stats:
        model.shell_module_materialize(target_submodule=layer, device=torch.device("cpu"))
        _prepare_for_forward(model, "model.layers.0.mlp.experts.0.up_proj")
    assert "rotation" in stats.disabled["recopy"]
    assert stats.recopy_recorded == stats.recopy_skipped == 0 and stats.materialize_fast == 1

