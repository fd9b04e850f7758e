"""Data shipped with defuser-quant: a small English corpus and a tiny trained qwen3_moe.

- ``CORPUS_DIR``: ``train.txt`` / ``heldout.txt`` built from CPython's ``pydoc_data`` topics by
  ``scripts/build_corpus.py`` (licence and provenance in ``CORPUS_DIR / "LICENSE.md"``).
- ``TINY_MOE_PATH``: a ``from_pretrained`` folder (bf16 safetensors + tokenizer) made by
  ``scripts/train_tiny_moe.py``; numbers in its ``training_report.json``.
"""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
CORPUS_DIR = ASSETS_DIR / "corpus"
TINY_MOE_PATH = ASSETS_DIR / "tiny-qwen3-moe"

__all__ = ["CORPUS_DIR", "TINY_MOE_PATH"]
