"""``pagoda generate MODEL_DIR --prompt ...``: complete prompts from the command line (the `LLM` class)."""
from __future__ import annotations

import argparse


def add_generate_parser(sub) -> None:
    """Register the ``generate`` subcommand on ``pagoda``'s subparsers."""
    p = sub.add_parser("generate", help="generate text with pagoda's engine from a local model folder")
    p.add_argument("model", help="local Hugging Face model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt (repeat for a batch); with --chat, a user message")
    p.add_argument("--chat", action="store_true", help="format each prompt as a user turn with the chat template")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per completion (default 16)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 decodes greedily (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1, help="-1 or 0: all tokens")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="per-request seed (default: unseeded)")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from pagoda.engine import LLM, SamplingParams

    try:
        params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                min_p=args.min_p, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
                                max_tokens=args.max_tokens)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"pagoda generate: {e}") from None
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len, load_format=args.load_format,
              device=args.device)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params)
    for prompt, out in zip(args.prompt, outputs, strict=True):
        print(f"=== prompt: {prompt!r}")
        for c in out.outputs:
            label = f"[{c.index}] " if len(out.outputs) > 1 else ""
            print(f"{label}{c.text}")
            print(f"    ({len(c.token_ids)} tokens, finish_reason={c.finish_reason})")
    return 0
