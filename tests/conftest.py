import logging
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(__file__))
logging.getLogger("transformers").setLevel(logging.ERROR)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_patches():
    """Pre-load patches are global: never let one test leak them into another."""
    yield
    from defuser_quant import restore_fused_blocks

    restore_fused_blocks()


def _one_thread() -> None:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning
    OpenMP workers make their forwards (and the quantizers' tiny GEMMs) 10x slower. Set once at
    import so module- and session-scoped fixtures run single-threaded too."""
    import torch

    torch.set_num_threads(1)


_one_thread()
