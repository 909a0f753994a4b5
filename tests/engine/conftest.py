"""Fixtures of the engine tests: the tiny model folders (`tests.models.tiny`), HF reference generations,
and the check that every test leaves every KV page of every engine free."""
from __future__ import annotations

import weakref

import pytest
import torch

from pagoda.engine.llm_engine import LLMEngine
from tests.models.tiny import tiny_model  # noqa: F401

_ENGINES: weakref.WeakSet = weakref.WeakSet()
_init = LLMEngine.__init__


def _tracking_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    _ENGINES.add(self)


@pytest.fixture(autouse=True, scope="session")
def _track_engines():
    LLMEngine.__init__ = _tracking_init
    yield
    LLMEngine.__init__ = _init


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: with several threads the CPU mostly waits on itself (and on other test workers).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _all_pages_free():
    yield
    for engine in list(_ENGINES):
        bm = engine.block_manager
        assert not engine.has_unfinished_requests(), f"requests left: {list(engine.requests)}"
        assert not engine.scheduler.running and not engine.scheduler.waiting
        assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} KV pages still held"
        assert all(b.ref_count == 0 for b in bm.blocks)


@pytest.fixture(scope="session")
def hf_greedy():
    """``hf_greedy(model_dir, prompt_ids, n) -> list[int]``: HF transformers' greedy ``generate`` (float32,
    exactly n new tokens), cached per session."""
    from transformers import AutoModelForCausalLM

    models: dict = {}
    cache: dict = {}

    def run(model_dir, prompt_ids: list[int], n: int) -> list[int]:
        key = (str(model_dir), tuple(prompt_ids), n)
        if key not in cache:
            if str(model_dir) not in models:
                models[str(model_dir)] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            model = models[str(model_dir)]
            ids = torch.tensor([prompt_ids])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False)
            cache[key] = out[0, len(prompt_ids):].tolist()
        return cache[key]

    return run
