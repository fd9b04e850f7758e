"""The defused experts block: numbered experts with per-projection ``nn.Linear`` children.

``DefusedExperts`` replaces a fused experts module in place and keeps its call signature
``(hidden_states, top_k_index, top_k_weights)``. It computes the same math as the fused class's
eager forward: the gate/up outputs go through the family's own ``_apply_gate`` (so gpt_oss'
clamped, interleaved gate stays exact) or its activation when ungated. The original module,
stripped of its fused tensors, is kept unregistered as ``fused_shell`` so ``fuse_model`` can
rebuild the native class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .layout import ExpertLayout
from .naming import ProjectionNames
from .tensors import FusedTensor, get_tensor, layout_tensors



def _default_apply_gate_fn() -> Callable | None:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover
        return None
    return _default_apply_gate


class GateFunction:
    """Combines gate and up projections exactly as the fused family does.

    ``act`` overrides the activation (default: the shell's ``act_fn``) for families that name it
    otherwise (dbrx ``mlp.activation_fn``, aria's hard-wired SiLU).
    """

    def __init__(self, shell: nn.Module, layout: ExpertLayout, act: Callable | None = None):
        self.shell = shell
        self.layout = layout
        self.act = act
        apply_gate = getattr(type(shell), "_apply_gate", None)
        self.custom = apply_gate is not None and apply_gate is not _default_apply_gate_fn()

    def act_fn(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) if self.act is not None else self.shell.act_fn(x)

    def __call__(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        shell = self.shell
        if gate is None:
            return self.act_fn(up)
        # Rebuild the fused [.., 2I] output and take gate/up as views of it, as the fused loop does:
        # elementwise kernels (SiLU, ...) round differently on strided views than on contiguous
        # tensors (their vector loop and its scalar tail split the rows differently), so
        # act_fn(gate) * up on separate contiguous outputs is off by an ulp for most I.
        if self.layout.is_concatenated:
            gate_up = torch.cat((gate, up), dim=-1)
        else:
            gate_up = torch.stack((gate, up), dim=-1).flatten(-2)
        if self.custom:
            return shell._apply_gate(gate_up)
        if self.layout.is_concatenated:
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        return self.act_fn(gate) * up


def fast_linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` wrapping existing tensors, without allocating or initialising anything."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    # Direct dict writes: this runs once per projection (tens of thousands for a large model).
    linear.__dict__["in_features"] = weight.shape[1]
    linear.__dict__["out_features"] = weight.shape[0]
    linear._parameters["weight"] = nn.Parameter(weight, requires_grad=requires_grad)
    linear._parameters["bias"] = None if bias is None else nn.Parameter(bias, requires_grad=requires_grad)
    return linear


class DefusedExpert(nn.Module):
    """One expert: ``gate_proj``/``up_proj``/``down_proj`` (or the family's names) ``nn.Linear``."""

    def __init__(self, names: ProjectionNames, projections: dict[str, nn.Linear], gate_fn: GateFunction):
        super().__init__()
        self.names = names
        for name in names.as_tuple():
            self.add_module(name, projections[name])
        self.gate_fn = gate_fn

    def projection(self, role: str) -> nn.Module | None:
        """The child for ``role`` in ``{"gate", "up", "down"}`` (None for gate when ungated)."""
        name = getattr(self.names, role)
        return None if name is None else getattr(self, name)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        names = self.names
        gate = getattr(self, names.gate)(hidden_states) if names.gate is not None else None
        up = getattr(self, names.up)(hidden_states)
        return getattr(self, names.down)(self.gate_fn(gate, up))


@dataclass(frozen=True)
class FusedTensorSpec:
    """What ``fuse_model`` needs to rebuild one fused tensor.

    ``shape`` is the ``[E, ...]`` slab view; ``native_shape`` the stored shape when it differs
    (dbrx's flattened ``[E*I, H]``); ``plan`` the tensor's ``FusedTensor`` for irregular families
    (None: derived from the block's standard layout).
    """

    name: str
    shape: tuple[int, ...]
    relayout: bool
    requires_grad: bool
    is_buffer: bool
    native_shape: tuple[int, ...] | None = None
    plan: FusedTensor | None = None


def _is_current(value: torch.Tensor, current: torch.Tensor | None) -> bool:
    """True when a state-dict value is the module's own tensor (loaders such as torch's
    ``set_model_state_dict`` fill keys the checkpoint lacks with the model's current values)."""
    if current is None or value is current:
        return value is current
    if value.device.type == "meta" or current.device.type == "meta":
        return value.device.type == current.device.type == "meta"
    return value.device == current.device and value.data_ptr() == current.data_ptr() and value.shape == current.shape


_BLOCK_HOOKS: list[Callable[[], None]] = []


def on_block_created(hook: Callable[[], None]) -> None:
    """Call ``hook`` (idempotent, cheap) whenever a ``DefusedExperts`` is created or unpickled.

    ``core.accelerate_load`` registers the reader that lets accelerate load fused checkpoints into
    blocks defused before loading; this module imports nothing above it.
    """
    if hook not in _BLOCK_HOOKS:
        _BLOCK_HOOKS.append(hook)


def _block_created() -> None:
    for hook in _BLOCK_HOOKS:
        hook()


ExpertsForward = Callable[["DefusedExperts", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DefusedExperts(nn.Module):
    """Numbered ``DefusedExpert`` children replacing one fused experts module.

    ``forward_override`` (None by default) lets the calibration layer swap the routing
    strategy; ``routed_forward`` is the exact fused-eager math. Every subclass (irregular
    families: ``defuser_quant.core.irregular``) keeps this contract: whatever its own call signature,
    it reduces the call to ``(hidden_states, top_k_index, top_k_weights)`` and runs
    ``forward_override`` or ``routed_forward`` on it. ``num_experts`` counts the experts with
    weights; families with weightless experts (longcat_flash identity experts) route indices
    ``>= num_experts`` to them.
    """

    family: str | None = None  # explicit entry in defuser_quant.core.families, None for decorated classes

    def __init__(
        self,
        shell: nn.Module,
        layout: ExpertLayout,
        names: ProjectionNames,
        experts: list[DefusedExpert],
        specs: dict[str, FusedTensorSpec],
    ):
        super().__init__()
        for index, expert in enumerate(experts):
            self.add_module(str(index), expert)
        self.num_experts = len(experts)
        self.layout = layout
        self.names = names
        self.specs = specs
        self.forward_override: ExpertsForward | None = None
        object.__setattr__(self, "fused_shell", shell)  # unregistered on purpose
        if hasattr(shell, "config"):
            self.config = shell.config
        _block_created()

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        _block_created()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            specs = self.__dict__.get("specs") or {}
            if name not in specs:
                raise
        # ``convert_model(cleanup_original=False)`` left the fused tensor on the shell: that one.
        shell = self.__dict__.get("fused_shell")
        kept = get_tensor(shell, name) if shell is not None else None
        if kept is not None:
            return kept
        # Code written for the fused class may touch ``experts.gate_up_proj`` (a parent's
        # ``_init_weights`` calls ``init.normal_`` on it after loading; protocol checks read it).
        # It gets a ``meta`` tensor of the fused shape: no copy, writes go nowhere, and reading its
        # values fails loudly instead of returning stale data. fuse_model() rebuilds the real one.
        spec = specs[name]
        first = next(self.parameters(), None)
        dtype = first.dtype if first is not None else torch.float32
        return torch.empty(self.fused_shape(spec), dtype=dtype, device="meta")

    @property
    def fused_class(self) -> type[nn.Module]:
        return type(self.fused_shell)

    def tensor_plans(self) -> list[tuple[FusedTensorSpec, FusedTensor]]:
        """Each fused tensor's spec with its ``FusedTensor`` (standard layouts derive theirs)."""
        standard = {t.path: t for t in layout_tensors(self.layout)}
        return [(spec, spec.plan or standard[name]) for name, spec in self.specs.items()]

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, index: int) -> DefusedExpert:
        if not -self.num_experts <= index < self.num_experts:
            raise IndexError(f"expert index {index} out of range for {self.num_experts} experts")
        return self._modules[str(index % self.num_experts)]  # type: ignore[return-value]

    def __iter__(self) -> Iterator[DefusedExpert]:
        return (self._modules[str(i)] for i in range(self.num_experts))  # type: ignore[misc]

    def fused_shape(self, spec: FusedTensorSpec) -> tuple[int, ...]:
        """The stored shape of the fused tensor ``spec`` describes (what a fused checkpoint holds)."""
        return tuple(spec.native_shape or (spec.shape if spec.plan is not None else (self.num_experts, *spec.shape[1:])))

    def carve_fused(self, state_dict: dict[str, torch.Tensor], prefix: str) -> list[str]:
        """Replace every fused tensor of this block in ``state_dict`` (keys ``prefix + name``) by the
        per-expert keys the children load; returns the problems (a fused tensor of another shape, or
        one given next to per-expert keys), each naming the keys. Carved pieces are views of the
        fused tensor where the layout allows it (``contiguous()`` copies only relaid-out slabs)."""
        problems: list[str] = []
        for spec, plan in self.tensor_plans():
            key = prefix + spec.name
            if key not in state_dict:
                continue
            fused = state_dict.pop(key)
            expected = self.fused_shape(spec)
            if tuple(fused.shape) != expected:
                problems.append(
                    f"size mismatch for {key}: the checkpoint's fused tensor is {list(fused.shape)}, but "
                    f"{prefix[:-1]} was defused from {list(expected)}"
                )
                continue
            slabs = plan.slabs(fused)
            for index in range(self.num_experts):
                for (role, kind), piece in zip(plan.leaves, plan.pieces(slabs[index])):
                    target = f"{prefix}{index}.{getattr(self.names, role)}.{kind}"
                    current = getattr(self[index].projection(role), kind)
                    if target in state_dict and not _is_current(state_dict[target], current):
                        problems.append(f"{key} and {target} are both in the state dict: give one layout, not both")
                        continue
                    state_dict[target] = piece.contiguous()
        return problems

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Load a fused checkpoint into a block defused before loading (``load_state_dict``,
        accelerate's ``load_checkpoint_in_model`` without a device map): each fused tensor in
        ``state_dict`` is carved into the per-expert keys the children then load. A fused tensor of
        another shape, or one given next to per-expert keys, is an error naming both. (Accelerate's
        device-map path never calls this: ``core.accelerate_load`` carves for it.)"""
        error_msgs.extend(self.carve_fused(state_dict, prefix))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def rename_projections(self, names: ProjectionNames) -> None:
        """Register every expert's projections under ``names`` (same modules, same order).

        For quantizers whose model definitions expect other names (GPTQModel's ``gate_proj``
        for mixtral's ``w1``); ``fuse_model`` works with any names.
        """
        if (self.names.gate is None) != (names.gate is None):
            raise ValueError(f"cannot rename {self.names} to {names}: gated and ungated names differ")
        roles = ("gate", "up", "down")
        renames = {getattr(self.names, r): getattr(names, r) for r in roles if getattr(self.names, r) is not None}
        for expert in self:
            expert._modules = type(expert._modules)((renames.get(k, k), m) for k, m in expert._modules.items())
            expert.names = names
        self.names = names

    def extra_repr(self) -> str:
        return f"fused_class={self.fused_class.__name__}, layout={self.layout.describe()}, num_experts={self.num_experts}"

    def forward(self, hidden_states: torch.Tensor, *routing, **routing_kw) -> torch.Tensor:
        top_k_index, top_k_weights = (*routing, *routing_kw.values())
        return self.dispatch(hidden_states, top_k_index, top_k_weights)

    def dispatch(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Run the standard contract: ``forward_override`` when set, else ``routed_forward``.

        Blocks of irregular families translate their own call signature into this contract.
        """
        if self.forward_override is not None:
            return self.forward_override(self, hidden_states, top_k_index, top_k_weights)
        return self.routed_forward(hidden_states, top_k_index, top_k_weights)

    def new_output(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The zeros the routed forward accumulates into: shaped like the input by default."""
        return torch.zeros_like(hidden_states)

    def routed_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Top-k routed forward, operation for operation the fused eager loop."""
        final_hidden_states = self.new_output(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit.flatten().tolist():
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current = self[expert_idx](hidden_states[token_idx])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states
