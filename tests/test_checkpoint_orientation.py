"""The checkpoint planner reads a fused tensor as native or with its last two dims swapped,
nothing else: a 3-D tensor of the right element count but another shape is refused, not split
as garbage."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import build

from defuser_quant.checkpoint import CheckpointError, convert_checkpoint

DOWN = "model.layers.1.mlp.experts.down_proj"


def _fused_checkpoint(tmp_path, reshape_down):
    model, _ = build("qwen3_moe")
    folder = tmp_path / "fused"
    model.save_pretrained(folder, save_original_format=False)
    file = folder / "model.safetensors"
    with safe_open(str(file), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    assert tuple(tensors[DOWN].shape) == (8, 64, 32)
    tensors[DOWN] = reshape_down(tensors[DOWN]).contiguous()
    file.unlink()
    save_file(tensors, str(file), metadata={"format": "pt"})
    return folder, model


def test_same_element_count_other_shape_is_refused(tmp_path):
    folder, _ = _fused_checkpoint(tmp_path, lambda t: t.reshape(8, 16, 128))
    with pytest.raises(CheckpointError, match=rf"{DOWN} has shape \[8, 16, 128\], expected \[8, 64, 32\]"):
        convert_checkpoint(folder, tmp_path / "out", to="per-expert")
    assert not (tmp_path / "out").exists()


def test_swapped_last_dims_are_read_as_the_transpose(tmp_path):
    folder, model = _fused_checkpoint(tmp_path, lambda t: t.transpose(1, 2))
    convert_checkpoint(folder, tmp_path / "out", to="per-expert")
    found = {}
    for file in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            found.update({k: handle.get_tensor(k) for k in handle.keys()})
    assert torch.equal(found["model.layers.1.mlp.experts.5.down_proj.weight"], model.model.layers[1].mlp.experts.down_proj[5])
