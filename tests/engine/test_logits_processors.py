"""User logits processors: the batch-level interface (vLLM v1's `LogitsProcessor`, registered with
``LLM(logits_processors=[cls])``) and per-request callables (``SamplingParams.logits_processors``)."""
from __future__ import annotations

import time

import pytest
import torch

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.logits_processors import BatchUpdate, LogitsProcessor

PROMPTS = ["The quick brown fox jumps", "Sampling draws the next token", "def add(a, b):", "Numbers: 0 1 2"]
N = 8


class TargetToken(LogitsProcessor):
    """vLLM's example processor: requests with ``extra_args={"target_token": t}`` can only produce t. Its
    state is a device tensor per persistent index; ``apply`` is tensor ops only."""

    log: list = []

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.targets: dict[int, int] = {}
        self.outputs: dict[int, object] = {}
        self.updates: list[BatchUpdate | None] = []
        self.seen_outputs: list[list[int]] = []
        TargetToken.log.append(self)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self.updates.append(batch_update)
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.targets.pop(index, None)
            self.outputs.pop(index, None)
        for index, params, _prompt, output_ids in batch_update.added:
            target = (params.extra_args or {}).get("target_token")
            if target is not None:
                self.targets[index] = target
                self.outputs[index] = output_ids
            else:
                self.targets.pop(index, None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.targets:
            return logits
        self.seen_outputs += [list(v) for v in self.outputs.values()]
        rows = torch.tensor(list(self.targets), device=self.device)
        cols = torch.tensor(list(self.targets.values()), device=self.device)
        keep = logits[rows, cols]
        logits[rows] = float("-inf")
        logits[rows, cols] = keep
        return logits


class TargetTokenOnDevice(TargetToken):
    """TargetToken declaring that it reads no output tokens: the engine may sample behind the forward pass.
    Records, each time it runs, how many tokens of each targeted request were still on the device."""

    reads_output_token_ids = False

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self.pending: list[int] = []

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        self.pending += [v._seq().num_pending_tokens for v in self.outputs.values()]
        return super().apply(logits)


class CountingInvariant(LogitsProcessor):
    """Argmax-invariant (adds a constant per row): skipped when every row is greedy."""
    applied = 0

    def __init__(self, vllm_config, device, is_pin_memory):
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits):
        CountingInvariant.applied += 1
        return logits + 1.0


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("qwen3")


@pytest.fixture(scope="module")
def plain(model_dir):
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=4, num_gpu_blocks_override=64)
    params = SamplingParams(temperature=0, max_tokens=N, min_tokens=N)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _generate_targets(llm, plain) -> None:
    """Requests 1 and 3 target tokens 17 and 42 (TargetToken); 0 and 2 must equal the plain engine's."""
    targets = [None, 17, None, 42]
    params = [SamplingParams(temperature=0, max_tokens=N, min_tokens=N,
                             extra_args=None if t is None else {"target_token": t}) for t in targets]
    outs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    for t, got, ref in zip(targets, outs, plain, strict=True):
        assert got == (ref if t is None else [t] * N)


def test_batch_level_processor(model_dir, plain):
    TargetToken.log.clear()
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=2, num_gpu_blocks_override=64,
              logits_processors=[TargetToken, CountingInvariant])
    proc = TargetToken.log[-1]
    _generate_targets(llm, plain)
    # max_num_seqs=2: four requests pass through two persistent indices; every join and leave was reported.
    updates = [u for u in proc.updates if u is not None]
    added = [a[0] for u in updates for a in u.added]
    removed = [r for u in updates for r in u.removed]
    assert sorted(added) == [0, 0, 1, 1] and sorted(removed) == [0, 1]
    assert all(u.batch_size <= 2 and not u.moved for u in updates)
    # The output views are live: each step saw the tokens read back so far (one step behind at most).
    lengths = sorted({len(v) for v in proc.seen_outputs})
    assert lengths[0] == 0 and lengths[-1] >= N - 2 and all(set(v) <= {17, 42} for v in proc.seen_outputs)
    assert CountingInvariant.applied == 0        # all greedy: the argmax-invariant processor is skipped
    llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_tokens=2, seed=0), use_tqdm=False)
    assert CountingInvariant.applied == 2


def test_per_request_callables(model_dir, plain):
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=4, num_gpu_blocks_override=64)
    seen: list[list[int]] = []
    banned = plain[0][2]

    def ban(output_ids, logits):
        seen.append(list(output_ids))
        logits[banned] = float("-inf")
        return logits

    def three(prompt_ids, output_ids, logits):     # vLLM's other form: the prompt too
        assert prompt_ids == llm.get_tokenizer().encode(PROMPTS[1])
        out = logits.clone()
        out[plain[1][0]] -= 1e9
        return out

    params = [SamplingParams(temperature=0, max_tokens=N, min_tokens=N, logits_processors=[ban]),
              SamplingParams(temperature=0, max_tokens=N, min_tokens=N, logits_processors=[three])]
    outs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params, use_tqdm=False)]
    ref = llm.generate(PROMPTS[:2], [SamplingParams(temperature=0, max_tokens=N, min_tokens=N, bad_words=[w])
                                     for w in (llm.get_tokenizer().decode([banned]),
                                               llm.get_tokenizer().decode([plain[1][0]]))], use_tqdm=False)
    assert banned not in outs[0] and outs[1][0] != plain[1][0]
    # One call per step with the outputs so far (what the engine had read when it ran).
    assert [len(s) for s in seen] == list(range(N)) and seen[-1] == outs[0][:N - 1]
    single = [len(llm.get_tokenizer().encode(llm.get_tokenizer().decode([t]), add_special_tokens=False)) == 1
              for t in (banned, plain[1][0])]
    for got, r, one in zip(outs, ref, single, strict=True):
        if one:   # the same ban through bad_words (when the token's text encodes back to it alone)
            assert got == r.outputs[0].token_ids


def test_per_request_cost():
    """The host cost of per-request callables (CPU, one thread): 64 rows of a 32k vocabulary, a no-op
    callable and one that bans one token, per call (printed; `pagoda.engine.logits_processors` quotes it)."""
    from types import SimpleNamespace

    from pagoda.engine.logits_processors import apply_per_request

    calls = 0

    def noop(output_ids, logits):
        nonlocal calls
        calls += 1
        return logits

    def ban(output_ids, logits):
        logits[5] = float("-inf")
        return logits

    logits = torch.randn(64, 32000)
    for fn in (noop, ban):
        seq = SimpleNamespace(params=SamplingParams(logits_processors=[fn]), token_ids=list(range(100)),
                              num_prompt_tokens=50)
        rows = [(i, seq, list(range(50))) for i in range(64)]
        apply_per_request(logits, rows)
        t0 = time.perf_counter()
        for _ in range(10):
            apply_per_request(logits, rows)
        print(f"\nper-request callable {fn.__name__}: {(time.perf_counter() - t0) / 640 * 1e6:.1f} us per row per step")
    assert calls == 11 * 64
    assert torch.isinf(logits[:, 5]).all() and not torch.isinf(logits[:, 4]).any()


def test_bad_processor_refused(model_dir):
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=4, num_gpu_blocks_override=64)
    with pytest.raises(TypeError, match="logits_processors"):
        llm.llm_engine.add_request("x", PROMPTS[0], SamplingParams(logits_processors=[lambda a: a]))
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("cls", [TargetToken, TargetTokenOnDevice])
def test_processor_reading_no_outputs_keeps_the_overlap(model_dir, plain, cls):
    """Same tokens either way; a processor that reads output tokens runs after the previous step's tokens
    are read (none pending), one with ``reads_output_token_ids = False`` runs while they are still on the
    device (the engine's steps keep overlapping)."""
    TargetToken.log.clear()
    llm = LLM(str(model_dir), block_size=4, max_model_len=64, max_num_seqs=4, num_gpu_blocks_override=64,
              logits_processors=[cls])
    proc = TargetToken.log[-1]
    _generate_targets(llm, plain)
    if cls is TargetTokenOnDevice:
        assert proc.pending and max(proc.pending) == 1 and proc.pending.count(1) >= N
    else:
        assert all(len(v) == N - 1 for v in proc.seen_outputs[-2:])   # the last step saw every earlier token
