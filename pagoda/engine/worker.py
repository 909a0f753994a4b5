"""A tensor-parallel rank other than 0: load this rank's shard, then serve rank 0's messages until it says stop.

Messages (broadcast by rank 0 over the control group, `pagoda.engine.distributed.broadcast_object`):

- ``("step", message)``: run rank 0's step (`pagoda.engine.tp_runner.replay_step`);
- ``("rpc", method, args, kwargs)``: call ``method`` on this rank's `Worker` (a name, or a function
  taking the worker first) and send the result (or the error) back to rank 0 (`gather_objects`);
- ``("stop",)``: leave the loop; the process group is destroyed and the process exits.

`worker_main` is the entry point of the processes that rank 0 spawns (``distributed_executor_backend="mp"``);
under ``torchrun`` the other ranks enter `serve` from ``LLM(...)`` itself.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback

import torch

from pagoda.engine.config import EngineConfig
from pagoda.engine.distributed import (
    RENDEZVOUS_TIMEOUT,
    ParallelState,
    broadcast_object,
    destroy_process_group,
    gather_objects,
    init_process_group,
)
from pagoda.engine.tp_runner import ShardedModelRunner, StepMirror, replay_step

logger = logging.getLogger(__name__)

# Seconds between checks that rank 0's process still exists.
PARENT_POLL_S = 0.5
# The end of a failed rank's traceback that goes back to rank 0 (well under a pipe's buffer).
MAX_TRACEBACK_CHARS = 16000


class Worker:
    """One rank's model runner, and what ``collective_rpc`` may call on it."""

    def __init__(self, state: ParallelState, runner: ShardedModelRunner):
        self.rank = state.rank
        self.parallel = state
        self.model_runner = runner

    def weight_bytes(self) -> int:
        """Bytes of this rank's resident weights (a tied parameter counted once)."""
        params = {id(p): p for p in self.model_runner.model.parameters()}
        return sum(p.numel() * p.element_size() for p in params.values())

    def info(self) -> dict:
        """This rank's process, device, weight bytes and KV cache."""
        r = self.model_runner
        return dict(rank=self.rank, pid=os.getpid(), device=str(r.device), weight_bytes=self.weight_bytes(),
                    num_blocks=r.num_blocks, kv_cache_bytes=r.kv_cache.numel() * r.kv_cache.element_size(),
                    num_kv_heads=r.num_kv_heads, num_qo_heads=r.num_qo_heads)


class RpcError:
    """A ``collective_rpc`` call that raised on a rank (sent back to rank 0 in place of the result)."""

    def __init__(self, rank: int, text: str):
        self.rank, self.text = rank, text


def call(worker: Worker, method, args: tuple, kwargs: dict):
    """``worker.method(*args, **kwargs)`` (``method`` a name) or ``method(worker, *args, **kwargs)``;
    an exception comes back as an `RpcError`."""
    try:
        fn = getattr(worker, method) if isinstance(method, str) else (lambda *a, **k: method(worker, *a, **k))
        return fn(*args, **kwargs)
    except Exception:
        return RpcError(worker.rank, traceback.format_exc())


def serve(worker: Worker) -> None:
    """Serve rank 0's messages until ``("stop",)``."""
    state, runner = worker.parallel, worker.model_runner
    mirror, prev = StepMirror(), None
    while True:
        msg = broadcast_object(state)
        kind = msg[0]
        if kind == "step":
            prev = replay_step(runner, mirror, msg[1], prev)
        elif kind == "rpc":
            gather_objects(state, call(worker, *msg[1:]))
        elif kind == "stop":
            return
        else:
            raise RuntimeError(f"unknown message {kind!r} from rank 0")


def _watch_parent(parent_pid: int) -> None:
    """Exit at once when rank 0's process is gone, however it ended (this process is then re-parented)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def worker_main(rank: int, config: EngineConfig, port: int, parent_pid: int, errors) -> None:
    """Entry point of a spawned rank: join rank 0's store and group, build the shard, serve.

    ``parent_pid``: rank 0's process (this rank exits when it is gone). ``errors``: a queue for ``(rank,
    traceback)`` when this rank fails (rank 0 reports it; the text is cut to `MAX_TRACEBACK_CHARS` so that
    the write never waits on a full pipe)."""
    import torch.distributed as dist

    from pagoda.engine.distributed import device_of_rank

    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is rank 0's to handle: it stops the ranks
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="pagoda-parent-watch").start()
    world = config.tensor_parallel_size
    try:
        device = device_of_rank(config.device, rank)
        config.device = device
        if device.type == "cpu":   # the ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        if device.type == "cuda":
            torch.cuda.set_device(device)   # a bad device fails here, before rank 0 enters the rendezvous
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout=RENDEZVOUS_TIMEOUT)
        store.set(f"pagoda-ready/{rank}", "1")
        state = init_process_group(rank, world, device, "mp", store)
        worker = Worker(state, ShardedModelRunner(config, state))
        serve(worker)
    except BaseException:
        errors.put((rank, traceback.format_exc()[-MAX_TRACEBACK_CHARS:]))
        os._exit(1)     # skip destructors that could wait on collectives of a broken group
    destroy_process_group()
    # Stopped by rank 0: leave without the interpreter's teardown (seconds of module finalisers for nothing).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve_torchrun_rank(config: EngineConfig, state: ParallelState) -> None:
    """A rank other than 0 under ``torchrun``: build the shard, serve until rank 0 stops, leave the group."""
    try:
        serve(Worker(state, ShardedModelRunner(config, state)))
    finally:
        destroy_process_group()


__all__ = ["Worker", "RpcError", "call", "serve", "worker_main", "serve_torchrun_rank"]
