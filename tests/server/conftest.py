"""Fixtures of the server tests: a real server over a tiny random-weight Qwen3 engine, shared by a module's tests
(the model folder is made once per session; each test checks that every KV page is free afterwards)."""
from dataclasses import dataclass

import pytest
import torch

from tests.models.tiny import tiny_model  # noqa: F401
from tests.server.helpers import running_server


@dataclass
class LiveServer:
    url: str
    app: object
    engine: object
    model_dir: str
    tokenizer: object

    def assert_idle_and_free(self) -> None:
        """Nothing left in the engine and every KV page back in the free pool (cached pages count as free)."""
        import time
        deadline = time.monotonic() + 10
        while self.engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.01)     # an abort lands at the engine's next step boundary
        assert not self.engine.has_unfinished_requests()
        bm = self.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks


@pytest.fixture(scope="module")
def live_server(tiny_model):  # noqa: F811
    """The server on a loopback port over ``LLMEngine`` (tiny Qwen3, float32, CPU)."""
    from transformers import AutoTokenizer

    from pagoda.engine.llm_engine import LLMEngine

    # One intra-op thread: OpenMP's spinning threads make a busy 2-core machine ~20x slower per step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = str(tiny_model("qwen3"))
    engine = LLMEngine.from_kwargs(path, max_num_seqs=256, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        with running_server(engine, served_model_name="tiny-qwen3", tokenizer=tokenizer) as (url, app):
            yield LiveServer(url, app, engine, path, tokenizer)
    finally:
        torch.set_num_threads(threads)
