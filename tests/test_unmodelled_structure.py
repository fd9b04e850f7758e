"""Structure the standard layout does not model is refused, never defused and lost.

An experts class that adds a child module, a parameter, a buffer or a decorator flag the
standard layout lacks would be defused into blocks that drop it (wrong output). Synthetic
subclasses of a real decorated class (qwen3_moe) stand for such classes; Transformers 5.24's
``MuseSparkExperts`` (``has_post_expert_norm=True`` and a ``post_expert_norm`` child) is the real
one when the installed Transformers has it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

import defuser_quant as dq
from defuser_quant.core.layout import (
    decorator_defaults,
    forward_overrides_of_class,
    unmodelled_class_structure,
    unmodelled_flags_of_class,
)
from defuser_quant.tools import families_table
from tiny import build, logits, state


class ExpertsWithNorm(Qwen3MoeExperts):
    def __init__(self, config):
        super().__init__(config)
        self.post_norm = nn.LayerNorm(config.hidden_size)


class ExpertsWithScale(Qwen3MoeExperts):
    def __init__(self, config):
        super().__init__(config)
        self.expert_scale = nn.Parameter(torch.ones(self.num_experts))


class ExpertsWithBuffer(Qwen3MoeExperts):
    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("expert_bias", torch.zeros(self.num_experts))


class ExpertsWithLearnedActivation(Qwen3MoeExperts):
    def __init__(self, config):
        super().__init__(config)
        self.act_fn = nn.PReLU()


class ExpertsWithOwnForward(Qwen3MoeExperts):
    """Nothing but a forward of its own around the decorated one (like Transformers 5.25's ErgoExperts,
    which applies a per-expert norm there): a defused block would compute the decorated forward only."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return 2 * super().forward(hidden_states, top_k_index, top_k_weights)


class ExpertsWithOtherActivation(Qwen3MoeExperts):
    def __init__(self, config):
        super().__init__(config)
        self.act_fn = nn.GELU()


def _with_flag(cls: type, **extra) -> type:
    """``cls`` re-decorated like ``use_experts_implementation`` with one flag more (closure cells)."""
    (name, value), = extra.items()
    namespace: dict = {}
    exec(  # a wrapper closing over the layout flags and the extra flag, as the decorator's does
        f"def make(original_init, has_gate, has_bias, is_transposed, is_concatenated, {name}):\n"
        f"    def __init__(self, config):\n"
        f"        original_init(self, config)\n"
        f"        self.config = config\n"
        f"        self.has_gate, self.has_bias = has_gate, has_bias\n"
        f"        self.is_transposed, self.is_concatenated = is_transposed, is_concatenated\n"
        f"        self.{name} = {name}\n"
        f"    return __init__\n",
        {},
        namespace,
    )
    init = namespace["make"](Qwen3MoeExperts.__init__.__wrapped__, True, False, False, True, value)
    return type(f"{cls.__name__}Flagged", (cls,), {"__init__": init})


def _swap_experts(model, cls: type, layer: int = 1) -> None:
    """Layer ``layer``'s experts become a ``cls`` instance holding the same fused tensors."""
    mlp = model.model.layers[layer].mlp
    old = mlp.experts
    new = cls(model.config)
    with torch.no_grad():
        new.gate_up_proj.copy_(old.gate_up_proj)
        new.down_proj.copy_(old.down_proj)
    mlp.experts = new


@pytest.mark.parametrize(
    ("cls", "named"),
    [
        (ExpertsWithNorm, "child module 'post_norm'"),
        (ExpertsWithScale, "parameter 'expert_scale'"),
        (ExpertsWithBuffer, "buffer 'expert_bias'"),
        (ExpertsWithLearnedActivation, "child module 'act_fn' (PReLU)"),
        (ExpertsWithOwnForward, "its own forward (ExpertsWithOwnForward.forward, around the decorated Qwen3MoeExperts's)"),
        (_with_flag(Qwen3MoeExperts, has_router_scale=True), "decorator flag has_router_scale=True"),
    ],
)
def test_unmodelled_structure_is_refused_and_the_model_is_left_as_it_was(cls, named):
    model, ids = build("qwen3_moe")
    _swap_experts(model, cls)
    before, ref = state(model), logits(model, ids)
    with pytest.raises(dq.LayoutError) as err:
        dq.convert_model(model)
    message = str(err.value)
    assert named in message and "model.layers.1.mlp.experts" in message and "'-:' filter rule" in message
    # Nothing changed: layer 0 (standard) was not defused either.
    assert not any(isinstance(m, dq.DefusedExperts) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(model, ids), ref)
    # The remedy the message names works: exclude the block, the rest converts exactly.
    report = dq.convert_model(model, filter=[r"-:layers\.1\.mlp\.experts$"])
    assert [r.path for r in report.converted] == ["model.layers.0.mlp.experts"]
    assert torch.equal(logits(model, ids), ref)


def test_a_stateless_activation_is_modelled():
    model, ids = build("qwen3_moe")
    _swap_experts(model, ExpertsWithOtherActivation)
    ref = logits(model, ids)
    assert len(dq.convert_model(model).converted) == 2
    assert torch.equal(logits(model, ids), ref)


def test_a_flag_at_the_decorators_default_is_modelled():
    defaults = decorator_defaults()
    if not defaults:
        pytest.skip("this Transformers' use_experts_implementation has no flag beyond the layout's")
    name, default = next(iter(defaults.items()))
    flagged = _with_flag(Qwen3MoeExperts, **{name: default})
    assert unmodelled_flags_of_class(flagged) == {}
    model, ids = build("qwen3_moe")
    _swap_experts(model, flagged)
    ref = logits(model, ids)
    assert len(dq.convert_model(model).converted) == 2
    assert torch.equal(logits(model, ids), ref)


def test_an_instance_flag_off_the_default_is_refused():
    defaults = decorator_defaults()
    if not defaults:
        pytest.skip("this Transformers' use_experts_implementation has no flag beyond the layout's")
    name, default = next(iter(defaults.items()))
    model, _ = build("qwen3_moe")
    setattr(model.model.layers[0].mlp.experts, name, not default)
    with pytest.raises(dq.LayoutError, match=f"decorator flag {name}="):
        dq.convert_model(model)


def _muse_spark():
    try:
        from transformers.models.muse_spark import modeling_muse_spark
    except ImportError:
        pytest.skip("this Transformers has no muse_spark (5.24+)")
    return modeling_muse_spark


def test_muse_spark_post_expert_norm_is_refused_everywhere():
    modeling = _muse_spark()
    assert unmodelled_flags_of_class(modeling.MuseSparkExperts) == {"has_post_expert_norm": True}
    with pytest.raises(dq.UnsupportedModelError, match="has_post_expert_norm"):
        dq.replace_fused_blocks("muse_spark")
    from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig

    config = MuseSparkTextConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_hidden_size=32,
        moe_intermediate_size=16, num_local_experts=4,
    )
    experts = modeling.MuseSparkExperts(config)
    holder = nn.ModuleDict({"experts": experts})
    with pytest.raises(dq.LayoutError, match="post_expert_norm"):
        dq.convert_model(holder)
    assert holder["experts"] is experts
    row = next(r for r in families_table.supported_families() if r.module == "muse_spark")
    assert "has_post_expert_norm" in row.refused and not row.postload and not row.preload
    assert "muse_spark" not in families_table.supported_model_types()


def test_a_forward_of_its_own_is_found_on_the_class_and_refused_before_patching(monkeypatch):
    """Before any instance exists: the class-level check the patch path and the families table use."""
    assert forward_overrides_of_class(Qwen3MoeExperts) == [] and unmodelled_class_structure(Qwen3MoeExperts) == []
    assert forward_overrides_of_class(ExpertsWithNorm) == []  # its child is found on the instance
    assert forward_overrides_of_class(ExpertsWithOwnForward) == ["ExpertsWithOwnForward"]
    deeper = type("Deeper", (ExpertsWithOwnForward,), {})
    assert forward_overrides_of_class(deeper) == ["ExpertsWithOwnForward"]
    assert forward_overrides_of_class(nn.Linear) == []  # not an experts class at all
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    monkeypatch.setattr(modeling_qwen3_moe, "ExpertsWithOwnForward", ExpertsWithOwnForward, raising=False)
    monkeypatch.setattr(ExpertsWithOwnForward, "__module__", modeling_qwen3_moe.__name__)
    with pytest.raises(dq.UnsupportedModelError, match=r"ExpertsWithOwnForward has its own forward .*nothing was patched"):
        dq.replace_fused_blocks("qwen3_moe")
    from defuser_quant.core.patching import is_patched

    assert not is_patched("qwen3_moe")
    families_table.supported_families.cache_clear()
    try:
        row = next(r for r in families_table.supported_families() if r.module == "qwen3_moe")
        assert "ExpertsWithOwnForward: its own forward" in row.refused and not row.preload and not row.postload
    finally:
        families_table.supported_families.cache_clear()


def _ergo():
    try:
        from transformers.models.ergo import modeling_ergo
    except ImportError:
        pytest.skip("this Transformers has no ergo (5.25+)")
    return modeling_ergo


def test_ergo_post_expert_norm_is_refused_everywhere():
    """Transformers 5.25's ErgoExperts: the decorated ErgoExpertProjections inside a forward of its own that
    gives every route its own row and applies a per-expert RMSNorm before the weighted sum."""
    modeling = _ergo()
    assert forward_overrides_of_class(modeling.ErgoExperts) == ["ErgoExperts"]
    assert unmodelled_class_structure(modeling.ErgoExpertProjections) == []
    with pytest.raises(dq.UnsupportedModelError, match="ErgoExperts has its own forward"):
        dq.replace_fused_blocks("ergo")
    from transformers.models.ergo.configuration_ergo import ErgoConfig

    config = ErgoConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4)
    experts = modeling.ErgoExperts(config)
    holder = nn.ModuleDict({"experts": experts})
    with pytest.raises(dq.LayoutError, match=r"its own forward .*child module 'post_expert_norm'"):
        dq.convert_model(holder)
    assert holder["experts"] is experts
    row = next(r for r in families_table.supported_families() if r.module == "ergo")
    assert "ErgoExperts: its own forward" in row.refused and not row.postload and not row.preload
    assert "ergo" not in families_table.supported_model_types()
