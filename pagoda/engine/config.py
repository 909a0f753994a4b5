"""`EngineConfig`: every engine setting in one dataclass, checked (and completed from the model's
``config.json``) in ``__post_init__``. Names and defaults are vLLM's."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# Cascade attention of decode steps over shared prefix pages (`pagoda.engine.cascade`).
CASCADE_MODES = ("auto", "on", "off")
# Default token budget of a step with chunked prefill (vLLM's offline default of its first V1 releases).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
# KV cache size without a GPU (no memory profiling there): this many bytes, or less when that already
# holds max_num_seqs sequences of max_model_len tokens.
CPU_KV_CACHE_BYTES = 1 << 30


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


@dataclass
class EngineConfig:
    """Engine settings (see `pagoda.LLM` for what each means). After construction ``hf_config`` holds
    the model's transformers config, ``torch_dtype`` the resolved dtype, ``max_model_len`` and
    ``max_num_batched_tokens`` their resolved values, and ``device`` a torch.device.

    ``enforce_eager``: no CUDA graphs (every step eager). ``async_scheduling`` (vLLM's name): the host
    prepares step N+1 while the device runs step N and reads sampled tokens one step behind (False: each
    step's tokens are read before the next step is scheduled).

    Tensor parallelism (``tensor_parallel_size`` > 1, `pagoda.engine.distributed`):
    ``distributed_executor_backend`` (vLLM's name) is "mp" (this process is rank 0 and spawns the others)
    or "external_launcher" (every rank was started by ``torchrun``); None picks "external_launcher" when
    the environment is a torchrun's of ``tensor_parallel_size`` processes, else "mp".
    ``worker_multiproc_method``: how "mp" starts the ranks, "spawn" or "fork" (the CPU only)."""
    model: str
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_gpu_blocks_override: int | None = None
    load_format: str = "auto"
    tensor_parallel_size: int = 1
    device: str | torch.device | None = None
    max_logprobs: int = 20
    async_scheduling: bool = True
    logits_processors: list | None = None   # batch-level LogitsProcessor classes (pagoda.engine.logits_processors)
    cascade: str = "auto"                   # one of CASCADE_MODES (pagoda.engine.cascade)
    distributed_executor_backend: str | None = None
    worker_multiproc_method: str = "spawn"
    hf_config: object = field(default=None, repr=False)
    torch_dtype: torch.dtype = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)):
            raise TypeError(f"model must be a path to a local model folder, got {type(self.model).__name__}")
        self.model = os.fspath(self.model)
        if not os.path.isdir(self.model):
            raise ValueError(f"model folder {self.model!r} does not exist (pagoda loads local folders only)")
        if self.tokenizer is not None:
            self.tokenizer = os.fspath(self.tokenizer)
            if not os.path.isdir(self.tokenizer):
                raise ValueError(f"tokenizer folder {self.tokenizer!r} does not exist")
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        _positive_int("max_model_len", self.max_model_len, allow_none=True)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens, allow_none=True)
        _positive_int("block_size", self.block_size)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if (isinstance(self.gpu_memory_utilization, bool) or not isinstance(self.gpu_memory_utilization, (int, float))
                or not 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        for name in ("enforce_eager", "enable_prefix_caching", "enable_chunked_prefill", "async_scheduling"):
            _bool(name, getattr(self, name))
        _positive_int("num_gpu_blocks_override", self.num_gpu_blocks_override, allow_none=True)
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        _positive_int("max_logprobs", self.max_logprobs)
        if not isinstance(self.cascade, str):
            raise TypeError(f"cascade must be a str, got {type(self.cascade).__name__}")
        if self.cascade not in CASCADE_MODES:
            raise ValueError(f"cascade must be one of {CASCADE_MODES}, got {self.cascade!r}")
        self.device = torch.device(self.device if self.device is not None
                                   else ("cuda" if torch.cuda.is_available() else "cpu"))
        self._resolve_from_model()
        from pagoda.engine.distributed import check_parallel_config
        check_parallel_config(self)

    def _resolve_from_model(self) -> None:
        from transformers import AutoConfig

        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"model folder {self.model!r} has no config.json")
        self.hf_config = AutoConfig.from_pretrained(self.model, local_files_only=True)
        self.torch_dtype = self._resolve_dtype()
        limit = getattr(self.hf_config, "max_position_embeddings", None)
        if self.max_model_len is None:
            if limit is None:
                raise ValueError("max_model_len must be given: the model's config has no max_position_embeddings")
            self.max_model_len = int(limit)
        elif limit is not None and self.max_model_len > limit:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings "
                             f"({limit})")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = (max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_num_seqs)
                                           if self.enable_chunked_prefill
                                           else max(self.max_model_len, DEFAULT_MAX_NUM_BATCHED_TOKENS))
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be greater than or "
                             f"equal to max_num_seqs ({self.max_num_seqs})")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than "
                             f"max_model_len ({self.max_model_len}) without chunked prefill: a long prompt could "
                             "never be scheduled (enable chunked prefill or raise max_num_batched_tokens)")

    def _resolve_dtype(self) -> torch.dtype:
        if isinstance(self.dtype, torch.dtype):
            dtype = self.dtype
        elif self.dtype == "auto":
            dtype = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
            if isinstance(dtype, str):
                dtype = _DTYPES.get(dtype)
            if dtype is None:
                dtype = torch.float32
            if dtype == torch.float32 and self.device.type == "cuda":
                dtype = torch.bfloat16     # as vLLM: float32 checkpoints serve in half precision on a GPU
        elif self.dtype in _DTYPES:
            dtype = _DTYPES[self.dtype]
        else:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
