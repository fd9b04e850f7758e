"""``DefuseModifier(frozen_save=True)``: the save ``oneshot`` makes after the modifier's finalize runs with the heap
frozen (objects alive at its start left out of full collections) and hands everything back at its end, also when
the save fails; the checkpoint is the one without it. A real ``oneshot`` of the tiny qwen3_moe (GPTQ W4A16)."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

pytest.importorskip("llmcompressor")

import defuser_quant.integrations.llmcompressor as dq_llmc  # noqa: E402
from defuser_quant.integrations.llmcompressor import modifier as modifier_module  # noqa: E402
from test_llmcompressor_modifier import (  # noqa: E402, F401  (fixtures)
    IGNORE, _keys, _oneshot, _one_thread, calib_dataset, tiny_dir)

CONCURRENT_SHARDS = modifier_module.concurrent_shards


class _Model(nn.Module):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail, self.frozen_during = fail, []

    def save_pretrained(self, *args, **kwargs):
        self.frozen_during.append(gc.get_freeze_count())
        if self.fail:
            raise KeyboardInterrupt
        return "saved"


@pytest.mark.parametrize("fail", [False, True])
def test_the_armed_save_runs_frozen_and_hands_everything_back(fail):
    assert gc.get_freeze_count() == 0
    model = _Model(fail)
    modifier = dq_llmc.DefuseModifier(frozen_save=True)
    modifier._arm_frozen_save(model)
    if fail:
        with pytest.raises(KeyboardInterrupt):
            model.save_pretrained("out")
    else:
        assert model.save_pretrained("out") == "saved"
    assert model.frozen_during[0] > 0 and gc.get_freeze_count() == 0
    assert modifier.frozen_save_stats["froze"] is True


def _run(tiny_dir, calib_dataset, out, monkeypatch, **fields):
    """A GPTQ W4A16 ``oneshot`` with ``fields`` on the DefuseModifier; the freeze count seen inside the save."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    seen: list[int] = []

    def recording(save, threads):
        inner = CONCURRENT_SHARDS(save, threads)

        def save_and_record(*args, **kwargs):
            seen.append(gc.get_freeze_count())
            return inner(*args, **kwargs)
        return save_and_record

    monkeypatch.setattr(modifier_module, "concurrent_shards", recording)
    defuse = dq_llmc.DefuseModifier(routing="all", **fields)
    _oneshot(tiny_dir, calib_dataset, [defuse, GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)], out,
             shuffle_calibration_samples=False)  # the same rows in the same order in both runs
    return defuse, seen


@pytest.mark.slow
def test_oneshot_saves_frozen_with_the_same_checkpoint(tiny_dir, calib_dataset, tmp_path, monkeypatch):  # noqa: F811
    from safetensors.torch import load_file

    plain, seen_plain = _run(tiny_dir, calib_dataset, tmp_path / "plain", monkeypatch)
    frozen, seen_frozen = _run(tiny_dir, calib_dataset, tmp_path / "frozen", monkeypatch, frozen_save=True)
    assert plain.frozen_save_stats is None and seen_plain == [0]
    assert seen_frozen and seen_frozen[0] > 0 and gc.get_freeze_count() == 0
    stats = frozen.frozen_save_stats
    assert stats["froze"] is True and stats["stock"] is None
    assert _keys(tmp_path / "plain") == _keys(tmp_path / "frozen")
    for shard in sorted((tmp_path / "plain").glob("*.safetensors")):
        a, b = load_file(shard), load_file(tmp_path / "frozen" / shard.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
