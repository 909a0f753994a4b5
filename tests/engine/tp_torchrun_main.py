"""Run by ``torchrun --nproc-per-node 2`` in `test_tp.py`: every rank calls ``LLM(...)``; rank 0 generates and
writes the tokens (and each rank's process id) as JSON; the other rank serves inside ``LLM(...)`` and exits
when rank 0 shuts the engine down.

Usage: ``torchrun --standalone --nproc-per-node 2 tests/engine/tp_torchrun_main.py MODEL_DIR OUT_JSON``
"""
import json
import os
import sys

from pagoda.engine import LLM, SamplingParams

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Rotary position embeddings rotate pairs",
           {"prompt_token_ids": [5, 17, 42, 99, 3, 250, 7]}]
ENGINE = dict(block_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16)


def main(model_dir: str, out_file: str) -> None:
    llm = LLM(model_dir, tensor_parallel_size=2, **ENGINE)     # only rank 0 returns
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8), use_tqdm=False)
    info = llm.llm_engine.executor.worker_info
    with open(out_file, "w") as f:
        json.dump(dict(tokens=[o.outputs[0].token_ids for o in outputs], rank=int(os.environ["RANK"]),
                       backend=llm.llm_engine.config.distributed_executor_backend,
                       pids=[i["pid"] for i in info], weight_bytes=[i["weight_bytes"] for i in info]), f)
    llm.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
