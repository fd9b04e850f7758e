"""The ``base_in_memory`` lean part (integrations.gptqmodel.base_in_memory): with ``offload_to_disk`` on, GPTQModel's
offload of the base modules after the input capture writes nothing and the modules stay in host memory. In a real
GPTQModel 7.6 run on the tiny qwen3_moe the offload folder then holds no base module and the checkpoint is the one
GPTQModel writes with its own offload; other offloads are GPTQModel's; Ctrl-C restores the patch; another source is
refused."""

from __future__ import annotations

import pytest
from torch import nn

pytest.importorskip("gptqmodel")

from gptqmodel.looper import module_looper  # noqa: E402

from defuser_quant.integrations.gptqmodel import base_in_memory  # noqa: E402
from test_gptqmodel_layer_ahead import _run, _same  # noqa: E402
from test_gptqmodel_plugin import plugin, tiny  # noqa: E402, F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BASE = ["model.embed_tokens", "model.norm", "model.rotary_emb"]


def _written(offload_dir) -> set[str]:
    return {p.name for p in offload_dir.iterdir() if p.is_dir()} if offload_dir.exists() else set()


@pytest.mark.slow
def test_the_base_modules_stay_in_memory_and_the_checkpoint_is_the_same(plugin, tiny, tmp_path):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS

    assert "base_in_memory" in DEFAULT_PARTS
    stats, kept = _run(plugin, tiny, tmp_path, "kept", parts=DEFAULT_PARTS)
    kept_save = plugin.last_save()
    assert stats.disabled == {} and stats.base_in_memory.as_dict() == {"kept": BASE, "stock": 0}
    assert not _written(tmp_path / "offload-kept") & set(BASE)
    stats_off, written = _run(plugin, tiny, tmp_path, "written", parts=DEFAULT_PARTS - {"base_in_memory"})
    written_save = plugin.last_save()
    assert stats_off.base_in_memory is None
    assert "model.embed_tokens" in _written(tmp_path / "offload-written")  # GPTQModel's own offload writes it
    assert _same(kept, written) and any(k == "model.embed_tokens.weight" for k in kept)
    # the save: the embedding is no longer mapped at the save (it is not on meta), but its bytes are copied from the
    # source file all the same (the capture loaded it as a view of the file): the same bytes written each way
    assert kept_save["mapped"]["mapped"] == written_save["mapped"]["mapped"] - 1
    assert kept_save["writes"] == written_save["writes"] and kept_save["writes"]["read"] == 0


def test_only_a_list_offload_of_the_model_is_skipped(tmp_path):
    calls = []

    def original(module, model, disk_path=".", force=False):
        calls.append((module if isinstance(module, list) else type(module).__name__, model is owner, force))

    owner, other = nn.Module(), nn.Module()
    stats = base_in_memory.BaseModuleStats()
    offload = base_in_memory._skipping(original, owner, stats)
    assert offload(model=owner, module=["model.embed_tokens", "model.norm"], disk_path=str(tmp_path)) is None
    offload(model=owner, module=nn.Linear(2, 2), disk_path=str(tmp_path))  # one module: GPTQModel's
    offload(model=other, module=["x"], disk_path=str(tmp_path))  # another model: GPTQModel's
    offload(model=owner, module=["y"], disk_path=str(tmp_path), force=True)  # forced: GPTQModel's
    assert stats.as_dict() == {"kept": ["model.embed_tokens", "model.norm"], "stock": 3}
    assert calls == [("Linear", True, False), (["x"], False, False), (["y"], True, True)]


def test_ctrl_c_restores_the_patch():
    original = module_looper.offload_to_disk
    with pytest.raises(KeyboardInterrupt):
        with base_in_memory.keep_base_modules(nn.Module()):
            assert module_looper.offload_to_disk is not original
            raise KeyboardInterrupt
    assert module_looper.offload_to_disk is original


def test_other_internals_are_refused(monkeypatch):
    from defuser_quant.integrations.gptqmodel import overhead

    assert base_in_memory.internals_refusal() is None
    monkeypatch.setattr(base_in_memory, "LOOP_DIGEST", "0" * 16)
    assert base_in_memory.internals_refusal() == "ModuleLooper._loop_impl differs from GPTQModel 7.6.0's source"
    assert "_loop_impl differs" in overhead.internals_mismatch()["base_in_memory"]
    monkeypatch.undo()
    monkeypatch.setattr(module_looper, "offload_to_disk", lambda **kw: None)
    assert "is not utils.offload.offload_to_disk" in base_in_memory.internals_refusal()


def test_a_checkpointed_run_keeps_gptqmodels_offload():
    from types import SimpleNamespace

    from defuser_quant.integrations.gptqmodel.overhead import lean_bookkeeping

    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

    from defuser_quant.core import convert_model

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=16, num_experts=4, num_experts_per_tok=2))
    convert_model(model)
    original = module_looper.offload_to_disk
    gptq_model = SimpleNamespace(model=model, quantize_config=SimpleNamespace(offload_to_disk=True))
    with lean_bookkeeping(gptq_model, parts=frozenset({"base_in_memory"}), checkpointed=True) as stats:
        assert module_looper.offload_to_disk is original
    assert stats.base_in_memory is None
    assert stats.disabled == {"base_in_memory": "GPTQModel's checkpoint= resumes from its own offload folders"}


def test_a_wrapper_around_gptqmodels_offload_is_accepted_and_kept_for_other_offloads(monkeypatch):
    """A timer or profiler wrapping ``offload_to_disk`` (functools.wraps) does not turn the part off; other offloads
    still go through it."""
    import functools

    original = module_looper.offload_to_disk
    seen = []

    @functools.wraps(original)
    def timed(*args, **kwargs):
        seen.append(kwargs.get("module"))

    monkeypatch.setattr(module_looper, "offload_to_disk", timed)
    assert base_in_memory.internals_refusal() is None
    owner = nn.Module()
    with base_in_memory.keep_base_modules(owner) as stats:
        module_looper.offload_to_disk(model=owner, module=["model.embed_tokens"], disk_path=".")
        module_looper.offload_to_disk(model=owner, module=nn.Linear(1, 1), disk_path=".")
    assert module_looper.offload_to_disk is timed
    assert stats.as_dict() == {"kept": ["model.embed_tokens"], "stock": 1} and len(seen) == 1
