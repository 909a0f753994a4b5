"""``pagoda serve`` arguments (argparse, no heavy imports: the CLI builds its parser from this module)."""
from __future__ import annotations

import argparse

# Engine options: (flag, type, default, help). Names and defaults are the engine's (vLLM's).
_ENGINE_ARGS = [
    ("--dtype", str, "auto", "auto, float32, float16 or bfloat16"),
    ("--seed", int, 0, "engine seed"),
    ("--max-model-len", int, None, "context length (default: the model's max_position_embeddings)"),
    ("--max-num-seqs", int, 256, "requests in the running batch at most"),
    ("--max-num-batched-tokens", int, None, "tokens per engine step at most"),
    ("--block-size", int, 16, "KV-cache page size in tokens"),
    ("--gpu-memory-utilization", float, 0.9, "fraction of GPU memory for weights, activations and KV cache"),
    ("--num-gpu-blocks-override", int, None, "fix the number of KV-cache pages"),
    ("--load-format", str, "auto", "auto, safetensors or dummy (random weights, for benchmarks)"),
    ("--tokenizer", str, None, "tokenizer folder (default: the model folder)"),
    ("--tensor-parallel-size", int, 1, "GPUs (ranks) the model is split over; this process is rank 0 and starts "
     "the others, or every rank runs `pagoda serve` under torchrun"),
]
_ENGINE_FLAGS = [  # boolean engine options: --name / --no-name
    ("--enforce-eager", False, "never capture CUDA graphs"),
    ("--enable-prefix-caching", True, "reuse the KV pages of shared prompt prefixes"),
    ("--enable-chunked-prefill", True, "split long prompts over steps, mixed with decodes"),
]
ENGINE_ARG_NAMES = [f[0][2:].replace("-", "_") for f in _ENGINE_ARGS + _ENGINE_FLAGS]


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", help="local Hugging Face model folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require `Authorization: Bearer KEY` on /v1 routes")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the model folder as given)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="run the engine in a process of its own, so that its steps never wait for the HTTP "
                             "layer's Python (default; --no-engine-process keeps it in a thread of the server)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="seconds to wait for responses to close after SIGINT/SIGTERM before cancelling them")
    add_engine_arguments(parser.add_argument_group("engine"))
    return parser


def add_engine_arguments(group, skip: tuple[str, ...] = ()) -> None:
    """The engine's options (``EngineConfig`` fields) as ``--flags``, but those in ``skip`` (which the caller
    defines itself, under the same name); ``engine_kwargs`` reads them back."""
    for flag, typ, default, help_ in _ENGINE_ARGS:
        if flag in skip:
            continue
        group.add_argument(flag, type=typ, default=default, help=f"{help_} (default: {default})")
    for flag, default, help_ in _ENGINE_FLAGS:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine options of parsed ``pagoda serve`` arguments, as ``EngineConfig`` keywords."""
    return {name: getattr(args, name) for name in ENGINE_ARG_NAMES}


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``pagoda serve`` on the CLI's subparsers."""
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server over a model folder",
                                   description="Serve MODEL over the OpenAI API: /v1/completions, "
                                               "/v1/chat/completions, /v1/models, /health, /metrics.")
    add_serve_arguments(parser)

    def run(args) -> int:
        from pagoda.server.launcher import serve
        return serve(args)

    parser.set_defaults(func=run)
    return parser
