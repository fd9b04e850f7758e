"""One llm-compressor ``oneshot`` (DefuseModifier + GPTQ W4A16) of the shipped tiny model, run by
``tests/test_distributed_llmcompressor.py`` in one process or under ``torchrun`` (gloo).

Usage: python distributed_oneshot.py OUT ROUTING NUM_SAMPLES SEQ_LEN [--same-data] [--min-tokens=N]
Writes OUT/report-rank{r}.json (the modifier's coverage as each rank sees it); the modifier's
own report goes to OUT/coverage-rank{r}.json, which only the rank that writes files creates.
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
    defuse = dq_llmc.DefuseModifier(routing=routing, min_tokens=min_tokens, coverage_report=report)
    recipe = [defuse, GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"])]
    oneshot(
        model=model, processor=tokenizer, dataset=data, recipe=recipe, output_dir=out,
        num_calibration_samples=len(data), max_seq_length=seq_len, shuffle_calibration_samples=False,
    )
    with open(os.path.join(out, f"report-rank{rank}.json"), "w") as f:
        f.write(defuse.coverage.model_dump_json())
    if distributed.is_distributed():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
