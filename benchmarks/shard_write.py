"""GPTQModel's save, the shard write alone: GPTQModel 7.6's ``_write_shard_file`` against the
plugin's ``shard_writer.write_shard_file`` (the same bytes from the tensors' own memory and
offloaded ranges copied by the kernel), on the bytes of two Qwen3-30B-A3B-shape layers' save (the
defaults: 1.9 GB in one shard):

* the embeddings and the output head (2 x 622 MB bf16), mapped copy-on-write from a source
  safetensors file as ``save_sources`` maps them (written from the mapping: page faults and copies);
* one layer's quantized experts in host memory (384 modules' qweight, qzeros, scales, g_idx);
* another layer's in an offload bundle on disk (copied file to file by the kernel).

``ours-mapped-as-ranges`` writes the same shard with the embeddings and head given as byte ranges of
the source file (copied file to file by the kernel, as the offload bundle is) instead of their mapping.
``ours-threadsN`` (``--threads``, default 2, 4 and 8) writes it through a shared mapping of the shard,
N threads copying at once (``write_shard_file(threads=N)``; each row says whether the mapping was used).

The sources are written first (in the page cache, as in a run); each writer then writes the shard
``--repeats`` times into a fresh file in the same folder, in turns. Every shard is compared with
GPTQModel's, byte for byte. Medians and ratios go to ``--output`` (JSON, whole or not at all)::

    python benchmarks/shard_write.py --output benchmarks/results/shard_write_cpu.json
    python benchmarks/shard_write.py --scale 0.1 --repeats 2 --output /tmp/x.json   # 10% of the bytes
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _args import whole  # noqa: E402
from _report import write_json  # noqa: E402
from _source import use_source_checkout  # noqa: E402

use_source_checkout()

VOCAB, HIDDEN, INTERMEDIATE, EXPERTS, GROUP = 151936, 2048, 768, 128, 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--repeats", type=whole(1), default=3)
    p.add_argument("--scale", type=float, default=1.0, help="share of the default bytes (0 < scale <= 1)")
    p.add_argument("--workdir", type=Path, default=None, help="folder for the sources and shards (default: a temporary one)")
    p.add_argument("--threads", default="2,4,8", help="comma-separated thread counts of the mapped writes ('' for none)")
    args = p.parse_args(argv)
    if not 0 < args.scale <= 1:
        p.error(f"--scale must be in (0, 1], got {args.scale}")
    try:
        args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        p.error(f"--threads must be comma-separated whole numbers >= 2, got {args.threads!r}")
    if any(t < 2 for t in args.threads):
        p.error(f"--threads must be comma-separated whole numbers >= 2, got {','.join(map(str, args.threads))}")
    return args


def _expert_tensors(layer: int, modules: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """GPTQ W4 tensors of ``modules`` expert projections of ``layer`` (gate/up: hidden -> intermediate; down: back)."""
    out: dict[str, torch.Tensor] = {}
    for m in range(modules):
        rows, cols = (HIDDEN, INTERMEDIATE) if m % 3 < 2 else (INTERMEDIATE, HIDDEN)  # in, out features
        name = f"model.layers.{layer}.mlp.experts.{m // 3}.{('gate_proj', 'up_proj', 'down_proj')[m % 3]}"
        out[f"{name}.qweight"] = torch.randint(-2**31, 2**31 - 1, (rows // 8, cols), generator=g, dtype=torch.int32)
        out[f"{name}.qzeros"] = torch.randint(-2**31, 2**31 - 1, (rows // GROUP, cols // 8), generator=g, dtype=torch.int32)
        out[f"{name}.scales"] = torch.rand(rows // GROUP, cols, generator=g).to(torch.float16)
        out[f"{name}.g_idx"] = torch.arange(rows, dtype=torch.int32) // GROUP
    return out


def build_entries(folder: Path, scale: float) -> tuple[list[Any], list[Any], dict[str, int]]:
    """GPTQModel ``TensorSource`` entries of the three kinds, their sources written into ``folder``; and the
    same entries with the mapped ones given as byte ranges of the source file (copied file to file)."""
    from gptqmodel.utils.model import OffloadTensorRef, TensorSource
    from safetensors.torch import save_file

    from defuser_quant.checkpoint.source import read_headers
    from defuser_quant.integrations.gptqmodel.save_sources import _Shards

    g = torch.Generator().manual_seed(0)
    vocab = max(8, int(VOCAB * scale))
    modules = max(3, int(3 * EXPERTS * scale))
    save_file({"model.embed_tokens.weight": torch.randn(vocab, HIDDEN, generator=g).to(torch.bfloat16),
               "lm_head.weight": torch.randn(vocab, HIDDEN, generator=g).to(torch.bfloat16)},
              str(folder / "source.safetensors"))
    shards = _Shards(folder)
    entries: list[Any] = []
    ranges: list[Any] = []  # the mapped entries as byte ranges of the source file
    kinds = {"mapped": 0, "in_memory": 0, "offloaded": 0}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        info = shards.info("source.safetensors", name)
        tensor = shards.tensor(info, torch.bfloat16)
        entries.append(TensorSource(name=name, torch_dtype=torch.bfloat16, shape=tuple(tensor.shape), source=tensor))
        ref = OffloadTensorRef(path=str(folder / "source.safetensors"), torch_dtype=torch.bfloat16, shape=tuple(tensor.shape),
                               format="safetensors", weight_name=name, data_offsets=(info.offset, info.offset + info.nbytes))
        ranges.append(TensorSource(name=name, torch_dtype=torch.bfloat16, shape=tuple(tensor.shape), source=ref))
        kinds["mapped"] += info.nbytes
    for name, tensor in _expert_tensors(1, modules, g).items():
        entries.append(TensorSource(name=name, torch_dtype=tensor.dtype, shape=tuple(tensor.shape), source=tensor))
        kinds["in_memory"] += tensor.numel() * tensor.element_size()
    bundle = _expert_tensors(0, modules, g)
    save_file(bundle, str(folder / "bundle.safetensors"))
    infos = read_headers(folder, ["bundle.safetensors"])
    for name, tensor in bundle.items():
        info = infos[name]
        ref = OffloadTensorRef(path=str(folder / "bundle.safetensors"), torch_dtype=tensor.dtype, shape=tuple(tensor.shape),
                               format="safetensors", weight_name=name, data_offsets=(info.offset, info.offset + info.nbytes))
        entries.append(TensorSource(name=name, torch_dtype=tensor.dtype, shape=tuple(tensor.shape), source=ref))
        kinds["offloaded"] += info.nbytes
    return entries, ranges + entries[len(ranges):], kinds


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from gptqmodel.utils.model import _write_shard_file

    from defuser_quant.integrations.gptqmodel import shard_writer

    entries, ranges, kinds = build_entries(folder, args.scale)
    meta = {"format": "pt"}
    settings = {"gptqmodel": lambda path: _write_shard_file(str(path), entries, meta),
                "ours": lambda path: shard_writer.write_shard_file(str(path), entries, meta),
                # the mapped embeddings and head copied from the source file by the kernel, not written from the mapping
                "ours-mapped-as-ranges": lambda path: shard_writer.write_shard_file(str(path), ranges, meta)}
    mapped: dict[str, list[bool]] = {}
    for threads in args.threads:
        def threaded(path: Path, threads: int = threads) -> None:
            stats = shard_writer.ShardWrites()
            shard_writer.write_shard_file(str(path), entries, meta, stats, threads=threads)
            mapped[f"ours-threads{threads}"].append(bool(stats.mapped))

        settings[f"ours-threads{threads}"] = threaded
        mapped[f"ours-threads{threads}"] = []
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    same: dict[str, bool] = {}
    reference = folder / "gptqmodel-0.safetensors"
    for r in range(args.repeats):
        for name, write in settings.items():
            path = folder / f"{name}-{r}.safetensors"
            t0 = time.perf_counter()
            write(path)
            seconds[name].append(round(time.perf_counter() - t0, 4))
            if name != "gptqmodel":
                same[name] = same.get(name, True) and filecmp.cmp(path, reference, shallow=False)
            if r or name != "gptqmodel":
                path.unlink()
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    return {
        "bytes": kinds, "total_bytes": sum(kinds.values()), "tensors": len(entries), "repeats": args.repeats,
        "seconds": seconds, "median_s": medians,
        # a write under the clock's rounding (0.1 ms) has no ratio
        "speedup_vs_gptqmodel": {name: round(medians["gptqmodel"] / m, 2) if m > 0 else None
                                 for name, m in medians.items() if name != "gptqmodel"},
        "same_bytes_as_gptqmodel": same,
        "written_through_mapping": mapped,  # per write: False where the file system could not reserve or map the shard
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = {"command": "python benchmarks/shard_write.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count()}
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        result = run(args, Path(tmp))
    write_json(args.output, {"meta": meta, **result})
    print(f"median seconds {result['median_s']}; speed-up over GPTQModel's writer {result['speedup_vs_gptqmodel']}; "
          f"same bytes {result['same_bytes_as_gptqmodel']}")
    differ = [name for name, same in result["same_bytes_as_gptqmodel"].items() if not same]
    if differ:
        print(f"shard_write.py: {', '.join(differ)} wrote other bytes than GPTQModel's writer; its time is no "
              f"figure for the same work (see {args.output})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
