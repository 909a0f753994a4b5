"""Run by `test_tp.py` in a session of its own: a two-rank engine generating until a SIGINT (Ctrl-C) arrives,
sent to the whole process group as a terminal does.

Usage: ``python tests/engine/tp_sigint_main.py MODEL_DIR``
"""
import sys

from pagoda.engine import LLM, SamplingParams


def main(model_dir: str) -> None:
    llm = LLM(model_dir, tensor_parallel_size=2, max_model_len=64, worker_multiproc_method="fork")
    print("ready", *[i["pid"] for i in llm.llm_engine.executor.worker_info], flush=True)
    while True:
        llm.generate(["The quick brown fox"] * 4, SamplingParams(max_tokens=40, ignore_eos=True), use_tqdm=False)


if __name__ == "__main__":
    main(sys.argv[1])
