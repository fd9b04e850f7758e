"""Adapters that plug defuser-quant into quantizers (imported lazily)."""
