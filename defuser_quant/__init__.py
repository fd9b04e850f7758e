"""defuser-quant: defuse fused MoE experts into per-expert nn.Linear modules and re-fuse them."""

__version__ = "0.1.0.dev0"
