"""Rank 0's handle on a tensor-parallel engine: start the ranks, watch them, stop them.

``TensorParallelExecutor(config)`` joins (or, with ``"mp"``, first spawns) the other ranks, builds rank
0's `DriverModelRunner` beside their shards, and from then on:

- watches the spawned processes from a thread (their sentinels): a rank that dies marks the engine
  failed, aborts the NCCL communicators (so that no collective waits for it), stops the other ranks,
  and the engine's next (or current) step raises a `WorkerError` naming the rank and its traceback;
- ``shutdown()`` (also at interpreter exit, and on any exception that escapes a step) sends the stop
  message, leaves the process group, and joins every process (terminating any that lingers).

Under ``torchrun`` the ranks other than 0 never return from ``TensorParallelExecutor(config)``: they serve
rank 0's steps and then exit (``SystemExit(0)``) once rank 0 shuts the engine down; torchrun watches the
processes (a rank that fails brings the others down).
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import weakref
from dataclasses import dataclass

import torch.distributed as dist

from pagoda.engine.config import EngineConfig
from pagoda.engine.distributed import (
    RENDEZVOUS_TIMEOUT,
    abort_device_group,
    broadcast_object,
    destroy_process_group,
    device_of_rank,
    gather_objects,
    init_process_group,
    torchrun_env,
)
from pagoda.engine.tp_runner import DriverModelRunner
from pagoda.engine.worker import RpcError, Worker, call, serve_torchrun_rank, worker_main

logger = logging.getLogger(__name__)

# Seconds a stopping rank gets to leave on its own, then after SIGTERM, before SIGKILL.
JOIN_TIMEOUT_S = 5.0
# Seconds rank 0 waits for the watcher to name the rank behind a failed collective.
FAILURE_WAIT_S = 2.0


class WorkerError(RuntimeError):
    """A tensor-parallel rank died or raised: the engine is shut down."""


@dataclass
class RankFailure:
    rank: int
    pid: int | None
    exitcode: int | None
    traceback: str | None

    def message(self) -> str:
        if self.exitcode is not None and self.exitcode < 0:
            try:
                how = f"was killed by {signal.Signals(-self.exitcode).name}"
            except ValueError:
                how = f"was killed by signal {-self.exitcode}"
        else:
            how = f"exited with code {self.exitcode}"
        text = f"tensor-parallel rank {self.rank} (pid {self.pid}) {how}; the engine is shut down"
        if self.traceback:
            text += f"\n--- rank {self.rank} traceback ---\n{self.traceback.rstrip()}"
        return text


class TensorParallelExecutor:
    """See the module docstring. ``runner``: rank 0's model runner; ``worker_info``: each rank's
    `Worker.info` (rank order)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.world_size = config.tensor_parallel_size
        self.launcher = config.distributed_executor_backend
        self._procs: list = []
        self._failure: RankFailure | None = None
        self._failed = threading.Event()
        self._broken = False
        self._closed = False
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._wake = None
        self.state = None
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised in this process: one tensor-parallel "
                               "engine per process (shut the other one down first)")
        serving_rank = False
        try:
            if self.launcher == "mp":
                self._start_processes()
            else:
                serving_rank = self._join_torchrun()
            if serving_rank:
                serve_torchrun_rank(config, self.state)
            else:
                self.runner = DriverModelRunner(config, self.state)
                self.local_worker = Worker(self.state, self.runner)
                self.worker_info = self.collective_rpc("info")
        except BaseException as e:
            if serving_rank:   # a rank other than 0 under torchrun: nothing of rank 0's to stop
                raise
            raise self.fail(e) from None
        if serving_rank:
            raise SystemExit(0)
        ref = weakref.ref(self)
        atexit.register(lambda: (lambda ex: ex is not None and ex.shutdown())(ref()))
        logger.info("tensor parallelism: %d ranks (%s), weights per rank %s MiB", self.world_size, self.launcher,
                    [round(i["weight_bytes"] / 2**20, 1) for i in self.worker_info])

    # -- start -----------------------------------------------------------------------------------------------
    def _start_processes(self) -> None:
        cfg = self.config
        ctx = multiprocessing.get_context(cfg.worker_multiproc_method)
        store = dist.TCPStore("127.0.0.1", 0, self.world_size, True, timeout=RENDEZVOUS_TIMEOUT,
                              wait_for_workers=False)
        self._errors = ctx.SimpleQueue()
        for rank in range(1, self.world_size):
            p = ctx.Process(target=worker_main, args=(rank, cfg, store.port, os.getpid(), self._errors), daemon=True,
                            name=f"pagoda-tp-rank{rank}")
            p.start()
            self._procs.append(p)
        self._wake = ctx.Pipe(duplex=False)
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="pagoda-tp-watch")
        self._watcher.start()
        # Wait until every rank reached the store: a rank that dies before (an import error, a bad device)
        # is reported here instead of leaving rank 0 in the rendezvous.
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT.total_seconds()
        keys = [f"pagoda-ready/{r}" for r in range(1, self.world_size)]
        while not store.check(keys):
            if self._failed.is_set():
                raise WorkerError(self._failure.message())
            if time.monotonic() > deadline:
                raise WorkerError(f"the tensor-parallel ranks did not start within {RENDEZVOUS_TIMEOUT}")
            time.sleep(0.01)
        cfg.device = device_of_rank(cfg.device, 0)
        self.state = init_process_group(0, self.world_size, cfg.device, "mp", store)
        self._store = store

    def _join_torchrun(self) -> bool:
        """Join torchrun's group; True on the ranks other than 0 (which serve rank 0's steps)."""
        env = torchrun_env()
        if env is None or env[1] != self.world_size:
            raise ValueError(f"distributed_executor_backend='external_launcher' needs a torchrun environment with "
                             f"WORLD_SIZE={self.world_size} (tensor_parallel_size), got {env}")
        rank, world, local_rank = env
        self.config.device = device_of_rank(self.config.device, local_rank)
        self.state = init_process_group(rank, world, self.config.device, "external_launcher")
        return rank != 0

    # -- failures ------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Wait on the spawned ranks' sentinels; the first that ends while the engine runs is a failure."""
        alive = {p.sentinel: (rank, p) for rank, p in enumerate(self._procs, start=1)}
        wake = self._wake[0]
        while alive:
            ready = multiprocessing.connection.wait([wake, *alive])
            if wake in ready or self._closed:
                return
            for s in ready:
                rank, p = alive.pop(s)
                p.join(1.0)     # the sentinel closes a moment before the exit status is there
                if self._closed:
                    return
                self._record_failure(RankFailure(rank, p.pid, p.exitcode, self._traceback_of(rank)))
                return

    def _traceback_of(self, rank: int) -> str | None:
        found = None
        try:
            while not self._errors.empty():
                r, text = self._errors.get()
                if r == rank or found is None:
                    found = text
        except (OSError, EOFError):
            pass
        return found

    def _record_failure(self, failure: RankFailure) -> None:
        with self._lock:
            if self._failure is not None:
                return
            self._failure, self._broken = failure, True
        logger.error("%s", failure.message())
        abort_device_group()            # NCCL collectives waiting for the dead rank fail now
        for p in self._procs:           # the other ranks may wait on it too: they are of no use any more
            if p.is_alive():
                p.kill()
        self._failed.set()

    def check(self) -> None:
        """Raise `WorkerError` if a rank has failed (or the engine was shut down)."""
        if self._failure is not None:
            raise WorkerError(self._failure.message())
        if self._closed:
            raise RuntimeError("the tensor-parallel engine is shut down")

    def fail(self, exc: BaseException) -> BaseException:
        """The engine cannot go on after ``exc`` escaped a step (the ranks may be mid-collective): shut
        everything down and return the exception to raise: a `WorkerError` naming the rank that died when
        one did, else ``exc`` itself."""
        self._broken = True
        if self._failure is None and self._procs and isinstance(exc, RuntimeError):
            self._failed.wait(FAILURE_WAIT_S)      # a failed collective: give the watcher time to name the rank
        self.shutdown()
        if self._failure is not None and not isinstance(exc, WorkerError):
            err = WorkerError(self._failure.message())
            err.__cause__ = exc
            return err
        return exc

    # -- calls on every rank -------------------------------------------------------------------------------
    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None
                       ) -> list:
        """``method`` on every rank's `Worker` (a method name, or a function taking the worker first, which
        must pickle by reference); the results in rank order."""
        if timeout is not None:
            raise NotImplementedError("collective_rpc(timeout=...) is not supported (a dead rank is detected "
                                      "by its process, not by a timeout)")
        if not isinstance(method, str) and not callable(method):
            raise TypeError(f"method must be a str or a callable, got {type(method).__name__}")
        self.check()
        kwargs = dict(kwargs or {})
        msg = ("rpc", method, tuple(args), kwargs)
        try:
            pickle.dumps(msg)
        except Exception as e:
            raise TypeError(f"collective_rpc: the method and its arguments must pickle (a module-level function "
                            f"or a method name): {e}") from e
        try:
            broadcast_object(self.state, msg)
            mine = call(self.local_worker, method, tuple(args), kwargs)
            results = gather_objects(self.state, mine)
        except BaseException as e:
            raise self.fail(e) from None
        for r in results:
            if isinstance(r, RpcError):
                raise RuntimeError(f"collective_rpc({method!r}) raised on rank {r.rank}:\n{r.text}")
        return results

    # -- stop ----------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop every rank and leave the process group (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.state is not None and not self._broken:
            try:
                broadcast_object(self.state, ("stop",))
            except Exception as e:
                logger.debug("stop message failed: %s", e)
                self._broken = True
        if self._broken:
            abort_device_group()
            for p in self._procs:
                if p.is_alive():
                    p.terminate()
        if self._wake is not None:
            self._wake[1].send(None)
        for p in self._procs:
            p.join(JOIN_TIMEOUT_S)
            if p.is_alive():
                p.terminate()
                p.join(JOIN_TIMEOUT_S)
            if p.is_alive():
                p.kill()
                p.join()
        if self.state is not None:
            destroy_process_group()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(1.0)
