"""Exceptions raised by defuser-quant."""


class DefuserQuantError(Exception):
    """Base class of every error defuser-quant raises on purpose."""


class LayoutError(DefuserQuantError):
    """A fused block's tensors do not match the layout its class declares."""


class FilterRuleError(DefuserQuantError, ValueError):
    """A conversion filter rule is malformed (bad prefix or invalid regex)."""


class SharedStorageError(DefuserQuantError):
    """A fused expert tensor is shared with another module, so defusing in place would corrupt it."""


class UnsupportedModelError(DefuserQuantError, ValueError):
    """The model type is unknown to Transformers or has no fused blocks to patch."""


class FuseError(DefuserQuantError):
    """A defused block cannot be re-fused (quantized, incomplete or inconsistent experts)."""


class ConversionError(DefuserQuantError):
    """A conversion failed half way; the model was restored to its state before the call."""


class UnmodelledStructureError(UnsupportedModelError, LayoutError):
    """A block holds structure the adapters do not model (a decorator flag, a child module, a
    parameter): converting it would drop that, so it is refused."""
