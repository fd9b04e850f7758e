#!/usr/bin/env python
"""Build the small English corpus shipped in ``defuser_quant/assets/corpus/``.

Source: CPython's ``pydoc_data.topics.topics`` (the text ``help("topic")`` prints; it ships
with every CPython, so nothing is downloaded). Output:

- ``train.txt`` / ``heldout.txt``: one document per pydoc topic, documents separated by a
  blank line pair (``"\\n\\n\\n"``); inside a document runs of blank lines are collapsed to one,
  so ``text.split("\\n\\n\\n")`` recovers the documents.
- ``split.json``: which topic keys went where, sizes and sha256 of both files.

Split (deterministic, ~90/10 by characters, by topic key): several pydoc topics are sections of
one another ("customization" is part of "specialnames", "if" of "compound", ...). Topics that
share any paragraph of >= 80 characters are grouped into one component first, and whole
components go to one side, so no held-out paragraph appears in the training text. Components
are visited in sha256(key) order and put into held-out while that keeps it under 11% of the
characters, until it reaches 9%.

The text depends on the Python version that provides ``pydoc_data``; the shipped files were made
with the version recorded in ``split.json``.

Usage: python scripts/build_corpus.py [--out defuser_quant/assets/corpus]
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import platform
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "defuser_quant" / "assets" / "corpus"
DOC_SEP = "\n\n\n"
MIN_SHARED_PARAGRAPH = 80
HELDOUT_LOW, HELDOUT_HIGH = 0.09, 0.11


def _clean(doc: str) -> str:
    lines = [line.rstrip() for line in doc.strip("\n").split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _paragraphs(doc: str) -> set[str]:
    out = set()
    for p in re.split(r"\n\s*\n", doc):
        norm = re.sub(r"\s+", " ", p).strip()
        if len(norm) >= MIN_SHARED_PARAGRAPH:
            out.add(norm)
    return out


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def components(topics: dict[str, str]) -> list[list[str]]:
    """Group topic keys that share a long paragraph (union-find)."""
    parent = {k: k for k in topics}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owners: dict[str, list[str]] = collections.defaultdict(list)
    for key in sorted(topics):
        for p in _paragraphs(topics[key]):
            owners[p].append(key)
    for keys in owners.values():
        for k in keys[1:]:
            ra, rb = find(keys[0]), find(k)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for k in sorted(topics):
        groups[find(k)].append(k)
    return [sorted(g) for g in groups.values()]


def split(topics: dict[str, str]) -> tuple[list[str], list[str]]:
    total = sum(len(v) for v in topics.values())
    comps = sorted(components(topics), key=lambda g: _sha("|".join(g)))
    heldout: list[str] = []
    size = 0
    for g in comps:
        if size >= HELDOUT_LOW * total:
            break
        gsize = sum(len(topics[k]) for k in g)
        if size + gsize <= HELDOUT_HIGH * total:
            heldout.extend(g)
            size += gsize
    held = set(heldout)
    train = [k for k in sorted(topics) if k not in held]
    return train, sorted(heldout)


def build(out: Path) -> dict:
    from pydoc_data.topics import topics as raw

    topics = {k: _clean(v) for k, v in raw.items()}
    train_keys, held_keys = split(topics)
    train_text = DOC_SEP.join(topics[k] for k in train_keys) + "\n"
    held_text = DOC_SEP.join(topics[k] for k in held_keys) + "\n"

    # Guard: no long held-out paragraph may occur in the training text.
    train_pars = set().union(*(_paragraphs(topics[k]) for k in train_keys))
    leaked = [p for k in held_keys for p in _paragraphs(topics[k]) if p in train_pars]
    if leaked:
        raise RuntimeError(f"{len(leaked)} held-out paragraphs also occur in train")

    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(train_text, encoding="utf-8", newline="\n")
    (out / "heldout.txt").write_text(held_text, encoding="utf-8", newline="\n")
    info = {
        "source": "CPython pydoc_data/topics.py (pydoc_data.topics.topics)",
        "python_version": platform.python_version(),
        "doc_separator": DOC_SEP,
        "train": {
            "topics": train_keys,
            "chars": len(train_text),
            "sha256": _sha(train_text),
        },
        "heldout": {
            "topics": held_keys,
            "chars": len(held_text),
            "sha256": _sha(held_text),
        },
    }
    (out / "split.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    info = build(args.out)
    tr, he = info["train"], info["heldout"]
    frac = he["chars"] / (tr["chars"] + he["chars"])
    print(f"train: {len(tr['topics'])} topics, {tr['chars']} chars")
    print(f"heldout: {len(he['topics'])} topics, {he['chars']} chars ({frac:.1%}): {he['topics']}")
    print(f"python {info['python_version']}; wrote {args.out}")


if __name__ == "__main__":
    main()
