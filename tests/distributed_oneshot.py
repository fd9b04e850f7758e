"""One llm-compressor ``oneshot`` (DefuseModifier + GPTQ W4A16) of the shipped tiny model, run by
``tests/test_distributed_llmcompressor.py`` in one process or under ``torchrun`` (gloo).

Usage: python distributed_oneshot.py OUT ROUTING NUM_SAMPLES SEQ_LEN [--same-data] [--min-tokens=N]
                                     [--count-collectives] [--loop] [--small-shards]
Writes OUT/report-rank{r}.json (the modifier's coverage as each rank sees it); the modifier's
own report goes to OUT/coverage-rank{r}.json, which only the rank that writes files creates.
``--count-collectives`` also writes OUT/collectives-rank{r}.json: the torch.distributed
collectives defuser-quant's own code called, by phase of llm-compressor's sequential pipeline
(``forward`` for the calibration/propagation passes, ``epoch_end`` once per layer, ``finalize``).
``--loop`` runs the experts through the per-expert loop instead of grouped GEMMs.
``--small-shards`` has DefuseModifier's writer pool (3 threads) split the tiny checkpoint into
shards of at least 64 KiB, as it splits a large model.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

import torch

torch.set_num_threads(1)
faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: every thread's stack, if a run ever hangs

from defuser_quant.calibration import distributed  # noqa: E402

distributed.init_from_env("gloo")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import defuser_quant.integrations.llmcompressor as dq_llmc  # noqa: E402
from defuser_quant.assets import TINY_MOE_PATH  # noqa: E402
from defuser_quant.calibration.data import CalibrationDataConfig, build_calibration_samples, to_hf_dataset  # noqa: E402


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
                "reduce", "gather", "gather_object", "scatter", "reduce_scatter", "all_to_all")


def count_collectives() -> list:
    """Record every torch.distributed collective called directly from defuser-quant's code, with
    the llm-compressor pipeline phase it happened in; returns the (live) list of (phase, name)."""
    import torch.distributed as dist
    from llmcompressor.core import session_functions
    from llmcompressor.pipelines.sequential import pipeline as sequential

    calls: list = []
    phase = ["setup"]

    def counted(name, inner):
        def call(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("defuser_quant"):
                calls.append((phase[0], name))
            return inner(*args, **kwargs)

        return call

    for name in _COLLECTIVES:
        setattr(dist, name, counted(name, getattr(dist, name)))

    batches = sequential._get_batches

    def phased_batches(*args, **kwargs):
        phase[0] = "forward"
        yield from batches(*args, **kwargs)
        phase[0] = "between"

    sequential._get_batches = phased_batches
    epoch_end = session_functions.LifecycleCallbacks.sequential_epoch_end.__func__

    epochs = [0]

    def phased_epoch_end(cls, *args, **kwargs):
        phase[0] = f"epoch_end.{epochs[0]}"
        epochs[0] += 1
        try:
            return epoch_end(cls, *args, **kwargs)
        finally:
            phase[0] = "between"

    session_functions.LifecycleCallbacks.sequential_epoch_end = classmethod(phased_epoch_end)
    finalize = dq_llmc.DefuseModifier.on_finalize

    def phased_finalize(self, *args, **kwargs):
        phase[0] = "finalize"
        return finalize(self, *args, **kwargs)

    dq_llmc.DefuseModifier.on_finalize = phased_finalize
    return calls


def main() -> None:
    out, routing, num_samples, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    tokenizer = AutoTokenizer.from_pretrained(TINY_MOE_PATH)
    data = to_hf_dataset(build_calibration_samples(CalibrationDataConfig(num_samples=num_samples, seq_len=seq_len), tokenizer))
    if "--same-data" not in sys.argv:
        data = distributed.rank_share(data)
    model = AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH, dtype=torch.bfloat16)
    rank = distributed.rank()
    min_tokens = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--min-tokens=")), 128)
    report = os.path.join(out, f"coverage-rank{rank}.json")
    if "--small-shards" in sys.argv:
        from defuser_quant.checkpoint import concurrent_save

        concurrent_save.MIN_SHARD_BYTES = 64 * 1024
    defuse = dq_llmc.DefuseModifier(routing=routing, min_tokens=min_tokens, coverage_report=report, grouped="--loop" not in sys.argv,
                                    save_threads=3 if "--small-shards" in sys.argv else None)
    calls = count_collectives() if "--count-collectives" in sys.argv else None
    recipe = [defuse, GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"])]
    oneshot(
        model=model, processor=tokenizer, dataset=data, recipe=recipe, output_dir=out,
        num_calibration_samples=len(data), max_seq_length=seq_len, shuffle_calibration_samples=False,
    )
    with open(os.path.join(out, f"report-rank{rank}.json"), "w") as f:
        f.write(defuse.coverage.model_dump_json())
    if calls is not None:
        import json

        with open(os.path.join(out, f"collectives-rank{rank}.json"), "w") as f:
            json.dump({"calls": calls, "grouped": defuse.grouped_use.grouped, "loop": defuse.grouped_use.loop}, f)
    if distributed.is_distributed():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
