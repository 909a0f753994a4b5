"""A scripted stand-in for ``LLMEngine`` with the same step-level interface, for tests of the HTTP layer
that must control timing (slow steps for disconnects and shutdown) or count engine calls.

Each request's completion ``i`` emits token ``(sum(prompt) + 7 * i + step) % vocab`` per step, text
``chr(ord('a') + token % 26)``, until ``max_tokens``; outputs are DELTA-style, as the server asks.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from pagoda.engine.outputs import CompletionOutput, Logprob, RequestOutput


class FakeTokenizer:
    chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 100 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + t % 26) for t in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kw) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant:" if add_generation_prompt
                                                                               else "")


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    params: object
    produced: list[int] = field(default_factory=list)   # tokens per completion so far (count)
    finished: list[bool] = field(default_factory=list)


class _BlockManager:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.used = 0
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def usage(self) -> float:
        return self.used / self.num_blocks


class _Scheduler:
    def __init__(self):
        self.running: list = []
        self.waiting: list = []
        self.block_manager = _BlockManager(1000)


class FakeEngine:
    """step() sleeps ``step_s`` (to hold requests open); every call runs on one thread, checked."""

    def __init__(self, vocab_size: int = 100, max_model_len: int = 256, step_s: float = 0.0):
        self.vocab_size = vocab_size
        self.config = SimpleNamespace(max_model_len=max_model_len)
        self.step_s = step_s
        self.tokenizer = FakeTokenizer()
        self.scheduler = _Scheduler()
        self.block_manager = self.scheduler.block_manager
        self.reqs: dict[str, _Req] = {}
        self.aborted: list[str] = []
        self.added: list[str] = []
        self.fail_next_step = False
        self._thread: int | None = None

    def _same_thread(self) -> None:
        me = threading.get_ident()
        assert self._thread in (None, me), "LLMEngine touched from two threads"
        self._thread = me

    def add_request(self, request_id: str, prompt: dict, params) -> None:
        self._same_thread()
        ids = prompt["prompt_token_ids"]
        if sum(ids) == 4242:          # a request the engine refuses (as one that can never fit the cache)
            raise ValueError("prompt can never fit in the KV cache")
        self.reqs[request_id] = _Req(request_id, ids, params, [0] * params.n, [False] * params.n)
        self.added.append(request_id)
        self.scheduler.running.append(request_id)
        self.scheduler.block_manager.used += 1

    def abort_request(self, request_ids) -> None:
        self._same_thread()
        for rid in request_ids:
            if self.reqs.pop(rid, None) is not None:
                self.aborted.append(rid)
                self.scheduler.running.remove(rid)
                self.scheduler.block_manager.used -= 1

    def has_unfinished_requests(self) -> bool:
        return bool(self.reqs)

    def step(self) -> list[RequestOutput]:
        self._same_thread()
        if self.step_s:
            time.sleep(self.step_s)
        if self.fail_next_step:
            raise RuntimeError("device lost")
        outs = []
        for rid, r in list(self.reqs.items()):
            comps = []
            for i in range(r.params.n):
                if r.finished[i]:
                    continue
                tok = (sum(r.prompt) + 7 * i + r.produced[i]) % self.vocab_size
                r.produced[i] += 1
                done = r.produced[i] >= r.params.max_tokens
                r.finished[i] = done
                lps = None
                if r.params.logprobs is not None:
                    lps = [{tok: Logprob(-0.25, 1, self.tokenizer.decode([tok]))}
                           | {(tok + j) % self.vocab_size: Logprob(-0.25 - j, j + 1) for j in
                              range(1, r.params.logprobs)}]
                comps.append(CompletionOutput(i, self.tokenizer.decode([tok]), [tok], None, lps,
                                              "length" if done else None))
            finished = all(r.finished)
            outs.append(RequestOutput(rid, None, r.prompt, None, comps, finished))
            if finished:
                del self.reqs[rid]
                self.scheduler.running.remove(rid)
                self.scheduler.block_manager.used -= 1
        return outs
