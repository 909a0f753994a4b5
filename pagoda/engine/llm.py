"""`LLM`: offline generation with vLLM's interface (``from pagoda import LLM, SamplingParams``)."""
from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Sequence as SequenceABC

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.sampling_params import RequestOutputKind, SamplingParams

# generation_config.json fields that become the default SamplingParams, as vLLM reads them.
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "max_new_tokens": "max_tokens"}


class LLM:
    """A model on pagoda's engine, for offline batches.

    Args:
        model: a local Hugging Face model folder (config.json, safetensors, tokenizer files).
        tokenizer: another folder for the tokenizer (default: ``model``).
        dtype: "auto" (the checkpoint's; float32 checkpoints run in bfloat16 on a GPU), "float32",
            "float16" or "bfloat16".
        seed: seed of the random stream of requests without their own seed (and of dummy weights).
        max_model_len: context length (default: the model's max_position_embeddings).
        max_num_seqs: sequences running at once.
        max_num_batched_tokens: tokens per step (default 8192 with chunked prefill, else max_model_len).
        block_size: tokens per KV page.
        gpu_memory_utilization: fraction of the GPU's memory the engine may use (weights, activations
            and the KV cache, which takes what is left after a profiling pass).
        enforce_eager: run every step eagerly (default: decode-only steps replay CUDA graphs captured at
            start-up for batch sizes 1, 2, 4, 8, 16, 24, ... up to max_num_seqs).
        enable_prefix_caching: reuse the KV pages of shared prompt prefixes.
        enable_chunked_prefill: split long prompts over steps shared with decodes.
        num_gpu_blocks_override: the number of KV pages (skips the memory profile).
        load_format: "auto" (safetensors) or "dummy" (random weights, for benchmarks).
        tensor_parallel_size: ranks the model is split over (Megatron-style: attention heads, MLP columns
            and the vocabulary; one GPU each with NCCL, or CPU processes with gloo). This process is rank 0
            and starts the others, unless ``torchrun`` started every rank: then each calls ``LLM(...)``,
            rank 0 returns and drives, and the others serve its steps inside ``LLM(...)`` and exit when rank
            0 calls `shutdown` (or exits). See `pagoda.engine.executor`.
        **kwargs: other `EngineConfig` fields (``device``, ``max_logprobs``, ``async_scheduling``,
            ``distributed_executor_backend``, ``worker_multiproc_method``).
    """

    def __init__(self, model: str, tokenizer: str | None = None, dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 block_size: int = 16, gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 num_gpu_blocks_override: int | None = None, load_format: str = "auto", tensor_parallel_size: int = 1,
                 **kwargs):
        config = EngineConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, seed=seed, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=enable_chunked_prefill,
            num_gpu_blocks_override=num_gpu_blocks_override, load_format=load_format,
            tensor_parallel_size=tensor_parallel_size, **kwargs)
        self.llm_engine = LLMEngine(config)
        self.request_counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None) -> list:
        """vLLM's: ``method`` on every tensor-parallel rank's worker, results in rank order (see
        `LLMEngine.collective_rpc`); e.g. ``llm.collective_rpc("weight_bytes")``."""
        return self.llm_engine.collective_rpc(method, timeout, args, kwargs)

    def shutdown(self) -> None:
        """Stop the engine's other processes (tensor parallelism) now; also done at garbage collection and
        at interpreter exit. The LLM cannot generate afterwards."""
        engine = getattr(self, "llm_engine", None)
        if engine is not None:
            engine.shutdown()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:   # interpreter teardown: modules may be gone
            pass

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (temperature, top_p, top_k,
        min_p, max_new_tokens), as vLLM applies them."""
        path = os.path.join(self.llm_engine.config.model, "generation_config.json")
        kwargs = {}
        if os.path.isfile(path):
            with open(path) as f:
                gen = json.load(f)
            kwargs = {ours: gen[theirs] for theirs, ours in _GENERATION_DEFAULTS.items() if gen.get(theirs) is not None}
        return SamplingParams(**kwargs)

    def generate(self, prompts, sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; return one RequestOutput per prompt, in order.

        prompts: a str, ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}``, or a list of them.
        sampling_params: one for all, or one per prompt (default: `get_default_sampling_params`).
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
                p = p.clone()
                p.output_kind = RequestOutputKind.FINAL_ONLY
                rid = str(next(self.request_counter))
                engine.add_request(rid, prompt, p)
                ids.append(rid)
            return self._run(ids, use_tqdm)
        except BaseException:
            engine.abort_request(ids)
            raise

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        wanted = set(request_ids)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True,
                       postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        start = time.perf_counter()
        tokens_in = tokens_out = 0
        while engine.has_unfinished_requests() and len(done) < len(wanted):
            for out in engine.step():
                if not out.finished or out.request_id not in wanted:
                    continue
                done[out.request_id] = out
                if bar is not None:
                    tokens_in += len(out.prompt_token_ids)
                    tokens_out += sum(len(c.token_ids) for c in out.outputs)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.postfix = (f"est. speed input: {tokens_in / elapsed:.2f} toks/s, "
                                   f"output: {tokens_out / elapsed:.2f} toks/s")
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [done[rid] for rid in request_ids]

    def chat(self, messages, sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None, *,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate replies to conversations, formatted with the tokenizer's chat template (or
        ``chat_template``). messages: one conversation (a list of ``{"role", "content"}`` dicts) or a list
        of conversations."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message,
                                           chat_template=chat_template, **(chat_template_kwargs or {}))
            # The template writes the special tokens (BOS) itself.
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
