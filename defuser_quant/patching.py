"""Pre-load patching (placeholder, filled below)."""
def replace_fused_blocks(model_type): raise NotImplementedError
def restore_fused_blocks(model_type=None): raise NotImplementedError
