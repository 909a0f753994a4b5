"""Tensor parallelism on the CPU (gloo, float32): two ranks give the same tokens as one, each rank holds
about half of the weights, and the engine comes down cleanly (shutdown, Ctrl-C, a rank that dies)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.executor import WorkerError

# Text prompts (some sharing a beginning: prefix-cache hits) and one given as ids; lengths past Mistral's window.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "The quick brown fox jumps over the lazy dog. A paged key-value cache stores",
    "Rotary position embeddings rotate pairs of features by an angle",
    {"prompt_token_ids": [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12]},
    "Numbers: 0 1 2 3 4 5",
]
# Small pages, a small step budget (chunked prefill) and a small cache (preemption): every path of the step
# messages (new sequences, growing page tables, tables rebuilt after a preemption) runs.
ENGINE = dict(block_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, num_gpu_blocks_override=20)
# fork: the rank inherits the test process's imports (a spawned rank imports torch and transformers anew:
# seconds); the kill test below uses spawn, the start method of GPUs.
FAST = dict(worker_multiproc_method="fork")


def _params() -> list[SamplingParams]:
    greedy = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=8, logprobs=2)
    return [greedy, greedy, greedy, seeded, SamplingParams(temperature=0.0, n=2, max_tokens=6, ignore_eos=True)]


def _tokens(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children() -> list[int]:
    """Live child processes of this test process, but multiprocessing's own resource tracker (one per
    interpreter, started with the first spawned process, shared by everything that uses multiprocessing)."""
    me, kids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == me and fields[0] != "Z" and b"multiprocessing.resource_tracker" not in cmdline:
                kids.append(int(entry))
    return kids


def _wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)], "worker processes left behind"


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("arch", ["llama3.1", "qwen3", "mistral"])
def test_tp2_equals_tp1(arch, kv_heads, tiny_model):
    """KV heads fewer than (1: replicated), equal to (2) and more than (4) the ranks; greedy, seeded sampling
    with logprobs and n=2 give the same tokens; each rank holds about half of the weights and its share of
    the KV heads."""
    path = str(tiny_model(arch, num_key_value_heads=kv_heads))
    one = LLM(path, **ENGINE)
    want = one.generate(PROMPTS, _params(), use_tqdm=False)
    total = one.collective_rpc("weight_bytes")[0]
    assert one.llm_engine.scheduler.num_preemptions > 0     # the small cache did preempt
    llm = LLM(path, tensor_parallel_size=2, **ENGINE, **FAST)
    try:
        got = llm.generate(PROMPTS, _params(), use_tqdm=False)
        assert _tokens(got) == _tokens(want)
        lp_got, lp_want = got[3].outputs[0].logprobs, want[3].outputs[0].logprobs
        for a, b in zip(lp_got, lp_want, strict=True):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
        info = llm.llm_engine.executor.worker_info
        assert [i["rank"] for i in info] == [0, 1] and info[1]["pid"] != os.getpid()
        assert [i["num_kv_heads"] for i in info] == [max(kv_heads // 2, 1)] * 2
        assert [i["num_qo_heads"] for i in info] == [2, 2]
        per_rank = llm.collective_rpc("weight_bytes")
        # Half of everything split, all of the (small) norms: ~0.5; a replicated KV head adds its k/v rows.
        assert all(0.5 * total <= b <= 0.54 * total for b in per_rank), (per_rank, total)
        pids = [i["pid"] for i in info[1:]]
    finally:
        llm.shutdown()
    _wait_gone(pids, timeout=1.0)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(PROMPTS[:1], use_tqdm=False)


def test_tp2_sync_scheduling_and_rpc_errors(tiny_model):
    """Scheduling without the one-step overlap, and cascade attention over the shared prefix pages (planned
    by every rank from the mirrored page tables), give the same tokens; an exception inside a rank's RPC is
    reported with its traceback and leaves the engine serving."""
    path = str(tiny_model("qwen3"))
    want = _tokens(LLM(path, **ENGINE, cascade="on").generate(PROMPTS, _params(), use_tqdm=False))
    llm = LLM(path, tensor_parallel_size=2, async_scheduling=False, cascade="on", **ENGINE, **FAST)
    try:
        assert _tokens(llm.generate(PROMPTS, _params(), use_tqdm=False)) == want
        assert llm.collective_rpc(_cascade_steps)[1] == llm.llm_engine.model_runner.cascade_steps != {}
        with pytest.raises(RuntimeError, match=r"(?s)raised on rank 0.*AttributeError"):
            llm.collective_rpc("no_such_method")
        with pytest.raises(TypeError, match="pickle"):
            llm.collective_rpc(lambda worker: 1)
        assert llm.collective_rpc(_rank_and_heads) == [(0, 2), (1, 2)]
        assert _tokens(llm.generate(PROMPTS, _params(), use_tqdm=False)) == want
    finally:
        llm.shutdown()


def _cascade_steps(worker):
    return worker.model_runner.cascade_steps


def _rank_and_heads(worker):
    return worker.rank, worker.model_runner.num_qo_heads


def test_tp2_ctrl_c_shuts_every_rank_down(tiny_model):
    """A KeyboardInterrupt in rank 0 in the middle of a generation: it propagates, and no rank is left."""
    path = str(tiny_model("llama3.1"))
    llm = LLM(path, tensor_parallel_size=2, **ENGINE, **FAST)
    pids = [i["pid"] for i in llm.llm_engine.executor.worker_info[1:]]
    calls = []

    def interrupt(token_ids, logits):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return logits

    params = SamplingParams(temperature=0.0, max_tokens=20, logits_processors=[interrupt])
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS[:2], params, use_tqdm=False)
    _wait_gone(pids, timeout=5.0)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(PROMPTS[:1], use_tqdm=False)


def _session_processes(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[4]) == sid and fields[0] != "Z":
                found.append(int(entry))
    return found


@pytest.mark.parametrize("how", ["sigint-to-group", "sigkill-rank-0"])
def test_tp2_rank_0_interrupted_or_killed(how, tiny_model):
    """While two ranks generate: Ctrl-C in a terminal (SIGINT to every process of the group) makes rank 0
    raise KeyboardInterrupt and stop the other rank (which ignores SIGINT); rank 0 killed outright makes the
    other rank exit by itself. Either way nothing is left within seconds."""
    path = str(tiny_model("qwen3"))
    script = Path(__file__).with_name("tp_sigint_main.py")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script), path], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready"), proc.stderr.read()[-3000:]
        time.sleep(0.5)                         # in the middle of generating
        t0 = time.monotonic()
        if how == "sigint-to-group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=20)
        if how == "sigint-to-group":
            assert proc.returncode != 0 and "KeyboardInterrupt" in err, err[-3000:]
        _wait_gone([int(p) for p in line.split()[1:]], timeout=5.0)
        assert time.monotonic() - t0 < 8
        assert not _session_processes(proc.pid)
    finally:
        if proc.poll() is None or _session_processes(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_tp2_killed_rank_raises_within_seconds(tiny_model):
    """A rank killed (SIGKILL) in the middle of a generation: the call raises a WorkerError naming it within
    seconds, every process is gone, and the engine refuses further work. Spawned ranks (as on GPUs)."""
    path = str(tiny_model("qwen3", num_key_value_heads=1))
    before = set(_children())
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    pids = [i["pid"] for i in llm.llm_engine.executor.worker_info[1:]]
    assert set(_children()) - before >= set(pids)
    killed_at = []

    def kill_rank_1(token_ids, logits):
        if len(token_ids) == 3 and not killed_at:
            os.kill(pids[0], signal.SIGKILL)
            killed_at.append(time.monotonic())
        return logits

    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logits_processors=[kill_rank_1])
    with pytest.raises(WorkerError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL"):
        llm.generate([PROMPTS[0], PROMPTS[4]], params, use_tqdm=False)
    assert time.monotonic() - killed_at[0] < 5.0
    _wait_gone(pids, timeout=5.0)
    assert not set(_children()) - before, "processes left behind"
    with pytest.raises(WorkerError, match="rank 1"):
        llm.generate(PROMPTS[:1], use_tqdm=False)
    llm.shutdown()


def test_torchrun_ranks(tiny_model, tmp_path):
    """Under torchrun every rank calls LLM(...): rank 0 drives and gets TP1's tokens; rank 1 serves its steps
    and exits cleanly when rank 0 shuts down."""
    path = str(tiny_model("mistral", num_key_value_heads=2))
    out = tmp_path / "out.json"
    script = Path(__file__).with_name("tp_torchrun_main.py")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), path, str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["rank"] == 0 and got["backend"] == "external_launcher"
    from tests.engine.tp_torchrun_main import ENGINE as T_ENGINE
    from tests.engine.tp_torchrun_main import PROMPTS as T_PROMPTS

    want = LLM(path, **T_ENGINE).generate(T_PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8),
                                          use_tqdm=False)
    assert got["tokens"] == [o.outputs[0].token_ids for o in want]
    assert len(set(got["pids"])) == 2 and got["weight_bytes"][0] == got["weight_bytes"][1]
    _wait_gone(got["pids"], timeout=1.0)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_only_its_shards(rank, tiny_model, monkeypatch):
    """Loading rank r of 2 reads from the safetensors files exactly the bytes the rank holds (the tied
    embedding once); its fused q/k/v rows are its query heads and the one KV head it shares (1 KV head)."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from pagoda.models import build_model, load_weights
    from pagoda.models import loader as loader_mod
    from pagoda.models.layers import embedding, linear

    for mod in (linear, embedding):
        monkeypatch.setattr(mod, "tp_rank", lambda: rank)
        monkeypatch.setattr(mod, "tp_size", lambda: 2)
    path = tiny_model("llama3.1", num_key_value_heads=1)
    read = []
    materialize = loader_mod.CheckpointSlice.materialize
    monkeypatch.setattr(loader_mod.CheckpointSlice, "materialize",
                        lambda self: read.append(materialize(self)) or read[-1])
    model = build_model(transformers.AutoConfig.from_pretrained(path), torch.float32, "cpu")
    load_weights(model, path)
    held = {id(p): p for p in model.parameters()}.values()
    assert sum(t.nbytes for t in read) == sum(p.nbytes for p in held)
    full = load_file(str(Path(path) / "model.safetensors"))
    attn = "model.layers.1.self_attn."
    q, k, v = full[attn + "q_proj.weight"], full[attn + "k_proj.weight"], full[attn + "v_proj.weight"]
    want = torch.cat([q[32 * rank:32 * (rank + 1)], k, v])     # 2 of 4 query heads of 16; the only KV head
    assert torch.equal(model.model.layers[1].self_attn.qkv_proj.weight, want)


def test_tp_config_errors(tiny_model, monkeypatch):
    path = str(tiny_model("qwen3", num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by tensor_parallel_size \(3\)"):
        LLM(path, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="worker_multiproc_method"):
        LLM(path, tensor_parallel_size=2, worker_multiproc_method="forkserver")
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of"):
        LLM(path, tensor_parallel_size=2, distributed_executor_backend="ray")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="needs torchrun's environment"):
        LLM(path, tensor_parallel_size=2, distributed_executor_backend="external_launcher")
    with pytest.raises(ValueError, match="needs tensor_parallel_size > 1"):
        LLM(path, distributed_executor_backend="external_launcher")
