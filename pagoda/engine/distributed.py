"""Process groups of tensor parallelism: one process per rank, PyTorch's own collectives.

The model's collectives (the row-parallel all-reduces, the vocabulary-parallel embedding's all-reduce and
LM head's all-gather, the sampled tokens that rank 0 broadcasts) run on the default group: NCCL between
GPUs, gloo on the CPU. The step inputs that rank 0 broadcasts are Python objects: they go through a gloo
group (the default group itself on the CPU; a second, gloo group next to NCCL), so that they never pass
through the GPU nor wait for its queue.

Processes start in one of two ways (vLLM's ``distributed_executor_backend`` names):

- ``"mp"``: the user's process is rank 0; it spawns ranks 1..N-1 (`pagoda.engine.worker`) and meets them
  on a TCP store of its own (127.0.0.1, a free port).
- ``"external_launcher"``: ``torchrun`` (one host or several, its rendezvous) started every rank; each
  calls ``LLM(...)``; rank 0 drives, the others serve its steps (`torchrun_env` reads the environment).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXECUTOR_BACKENDS = ("mp", "external_launcher")
# Gloo collectives of the control channel: a worker waits on the next step message for as long as rank 0 stays
# idle between requests. A dead peer is found by its closed sockets (and rank 0's process sentinels), not
# by this timeout.
CONTROL_TIMEOUT = timedelta(days=3650)
# NCCL collectives: how long one rank may wait for the others to join a collective (a first step compiles its
# kernels on every rank at about the same time).
DEVICE_TIMEOUT = timedelta(minutes=30)
# How long the processes of "mp" wait for each other at start-up.
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the environment of a ``torchrun`` (or any launcher that
    sets ``RANK`` and ``WORLD_SIZE``), None outside one or with a world of one process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world < 2:
        return None
    rank = int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def device_of_rank(device: torch.device, local_rank: int) -> torch.device:
    """The device of a rank: ``cuda:(base + local_rank)`` (``base`` the index ``device`` names, else 0),
    or the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", (device.index or 0) + local_rank)


def check_parallel_config(config) -> None:
    """Validate (and complete) the tensor-parallel settings of an `EngineConfig` whose ``hf_config`` is read:
    the backend, the start method, the devices, and that the model splits evenly over the ranks
    (ValueError/TypeError naming the setting)."""
    tp = config.tensor_parallel_size
    backend, method = config.distributed_executor_backend, config.worker_multiproc_method
    if backend is not None and backend not in EXECUTOR_BACKENDS:
        raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS} or None, got {backend!r}")
    if method not in ("spawn", "fork"):
        raise ValueError(f"worker_multiproc_method must be 'spawn' or 'fork', got {method!r}")
    if tp == 1:
        if backend == "external_launcher":
            raise ValueError("distributed_executor_backend='external_launcher' needs tensor_parallel_size > 1")
        return
    env = torchrun_env()
    if backend is None:
        backend = "external_launcher" if env is not None and env[1] == tp else "mp"
    config.distributed_executor_backend = backend
    if backend == "external_launcher" and (env is None or env[1] != tp):
        raise ValueError(f"distributed_executor_backend='external_launcher' needs torchrun's environment (RANK, "
                         f"WORLD_SIZE={tp}); WORLD_SIZE is {os.environ.get('WORLD_SIZE')!r}")
    if config.device.type == "cuda":
        if method == "fork":
            raise ValueError("worker_multiproc_method='fork' works on the CPU only (CUDA cannot be forked)")
        if backend == "mp" and (config.device.index or 0) + tp > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs from {config.device}, "
                             f"{torch.cuda.device_count()} are visible")
    elif config.device.type != "cpu":
        raise ValueError(f"tensor parallelism runs on CUDA (NCCL) or the CPU (gloo), not on {config.device}")
    hf = config.hf_config
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    for name, value in (("num_attention_heads", heads), ("vocab_size", hf.vocab_size),
                        ("intermediate_size", hf.intermediate_size)):
        if value % tp:
            raise ValueError(f"the model's {name} ({value}) must be divisible by tensor_parallel_size ({tp})")
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"the model's num_key_value_heads ({kv_heads}) must divide or be divisible by "
                         f"tensor_parallel_size ({tp})")


@dataclass
class ParallelState:
    """This process's place in the tensor-parallel group.

    ``control_group``: the gloo group of the step messages (None: the default group, gloo itself).
    ``launcher``: "mp" or "external_launcher"."""
    rank: int
    world_size: int
    device: torch.device
    control_group: object | None
    launcher: str

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def init_process_group(rank: int, world_size: int, device: torch.device, launcher: str,
                       store: dist.Store | None = None) -> ParallelState:
    """Join the default group (NCCL on CUDA, gloo on the CPU) and make the control group. ``store``: the
    rendezvous store ("mp"), or None to read torchrun's ``env://``."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process: one tensor-parallel engine "
                           "per process (shut the other one down first)")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
        if rank == 0:
            # Rank 0 is the user's process: on a NCCL error or timeout, abort the communicators and raise
            # (rather than PyTorch's default of tearing the process down); the other ranks keep the default.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    kwargs = dict(backend="nccl" if cuda else "gloo", rank=rank, world_size=world_size,
                  timeout=DEVICE_TIMEOUT if cuda else CONTROL_TIMEOUT)
    if store is not None:
        kwargs["store"] = dist.PrefixStore("pagoda-tp", store)
    else:
        kwargs["init_method"] = "env://"
    if cuda:
        kwargs["device_id"] = device     # eager NCCL communicator (and no guessing of the device)
    dist.init_process_group(**kwargs)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if cuda else None
    logger.debug("tensor-parallel rank %d of %d on %s (%s)", rank, world_size, device, kwargs["backend"])
    return ParallelState(rank, world_size, device, control, launcher)


def broadcast_object(state: ParallelState, obj=None):
    """Rank 0's ``obj`` on every rank (pickled, over the control group)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=state.control_group)
    return box[0]


def gather_objects(state: ParallelState, obj) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (None on the others)."""
    out = [None] * state.world_size if state.is_driver else None
    dist.gather_object(obj, out, dst=0, group=state.control_group)
    return out


def min_across_ranks(value: int) -> int:
    """The smallest ``value`` over the ranks (``value`` itself without an initialised group): e.g. the
    number of KV pages, which every rank must agree on."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def abort_device_group() -> None:
    """Abort the default group's NCCL communicators (called from another thread when a rank died): the
    collectives that wait for the dead rank fail instead of hanging. Nothing to do on gloo, whose
    collectives fail as soon as the dead rank's sockets close."""
    try:
        if dist.is_initialized() and dist.get_backend() == "nccl":
            dist.distributed_c10d._get_default_group()._get_backend(torch.device("cuda")).abort()
    except Exception as e:     # best effort: the engine is going down anyway
        logger.debug("aborting the NCCL communicators failed: %s", e)


def destroy_process_group() -> None:
    """Leave (and free) every group of this process, if any."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:
            logger.debug("destroy_process_group failed: %s", e)
