"""Structured output through xgrammar on a tiny random-weight model: whatever the random model prefers, every
output follows its JSON schema, regex, choice or grammar (sampled with different seeds, so the outputs vary)."""
from __future__ import annotations

import json
import re

import pytest

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.structured_params import StructuredOutputsParams

xgr = pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "animal": {"type": "string", "enum": ["fox", "dog", "cat"]},
        "lazy": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["animal", "lazy", "count"],
    "additionalProperties": False,
}
PROMPTS = ["The quick brown fox", "Numbers: 0 1 2", "def add(a, b):", '{"role": "user"'] * 25


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model("qwen2")), block_size=8, max_model_len=128, max_num_seqs=64,
               num_gpu_blocks_override=1024)


def _validate(obj) -> None:
    try:
        import jsonschema
    except ImportError:       # the schema's rules, checked by hand
        assert set(obj) == {"animal", "lazy", "count"}
        assert obj["animal"] in ("fox", "dog", "cat") and isinstance(obj["lazy"], bool)
        assert isinstance(obj["count"], int) and 0 <= obj["count"] <= 99
        return
    jsonschema.validate(obj, SCHEMA)


def _run(llm, so: StructuredOutputsParams, n: int = 100, max_tokens: int = 48):
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, structured_outputs=so) for i in range(n)]
    return [o.outputs[0] for o in llm.generate(PROMPTS[:n], params, use_tqdm=False)]


def test_json_schema_100_requests(llm):
    outs = _run(llm, StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
    texts = set()
    for c in outs:
        assert c.finish_reason == "stop", c
        _validate(json.loads(c.text))
        texts.add(c.text)
    assert len(texts) > 10        # seeded sampling: the mask constrains, the model still chooses


def test_json_schema_as_text_with_whitespace(llm):
    outs = _run(llm, StructuredOutputsParams(json=json.dumps(SCHEMA)), n=8, max_tokens=96)
    for c in outs:
        if c.finish_reason == "stop":    # optional whitespace may run long on a random model
            _validate(json.loads(c.text))
    assert sum(c.finish_reason == "stop" for c in outs) >= 4


def test_regex(llm):
    pattern = r"(fox|dog)-[0-9]{2,4}\.(a|bc)"
    outs = _run(llm, StructuredOutputsParams(regex=pattern), n=40)
    assert all(c.finish_reason == "stop" and re.fullmatch(pattern, c.text) for c in outs), [c.text for c in outs]
    assert len({c.text for c in outs}) > 5


def test_choice(llm):
    choices = ["quick brown fox", "lazy dog", "Café", "42"]
    outs = _run(llm, StructuredOutputsParams(choice=choices), n=40)
    assert all(c.text in choices for c in outs)
    assert len({c.text for c in outs}) > 1


def test_grammar(llm):
    grammar = 'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'
    outs = _run(llm, StructuredOutputsParams(grammar=grammar), n=20, max_tokens=64)
    done = [c for c in outs if c.finish_reason == "stop"]
    assert len(done) >= 15
    assert all(re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", c.text) for c in done)


def test_mixed_with_unconstrained_and_greedy(llm):
    """Constrained and free requests in one batch: the free ones equal their own unconstrained run."""
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    free = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)
    alone = llm.generate(PROMPTS[0], free, use_tqdm=False)[0].outputs[0].token_ids
    params = [free, SamplingParams(temperature=0, max_tokens=48, structured_outputs=so), free]
    outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone
    _validate(json.loads(outs[1].outputs[0].text))


def test_compiled_once_per_schema(llm):
    so = StructuredOutputsParams(regex=r"[a-c]{3}")
    _run(llm, so, n=4)
    manager = llm.llm_engine.model_runner.logits_pipeline.structured   # made by the first constrained request
    size = len(manager.cache)
    _run(llm, StructuredOutputsParams(regex=r"[a-c]{3}"), n=4)
    assert len(manager.cache) == size


@pytest.mark.parametrize("kwargs,match", [
    (dict(json={"type": "object", "properties": {"a": {"type": "no-such-type"}}}), "json"),
    (dict(regex="(unclosed"), "regex"),
    (dict(grammar="root ::= missing_rule"), "grammar"),
])
def test_rejected_constraint_is_value_error_at_add_request(llm, kwargs, match):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=match):
        engine.add_request("bad", PROMPTS[0], SamplingParams(structured_outputs=StructuredOutputsParams(**kwargs)))
    assert not engine.has_unfinished_requests()


def test_params_validation():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="json"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(TypeError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})


def test_threaded_fill_gives_the_same_outputs(llm, tiny_model, monkeypatch):
    """The bitmask filled by worker threads (contiguous chunks of rows, xgrammar's batch calls) equals the one
    filled inline: the same seeded requests give the same tokens."""
    from pagoda.engine import structured

    monkeypatch.setattr(structured, "default_fill_threads", lambda: 4)
    monkeypatch.setattr(structured.StructuredOutputManager, "MIN_ROWS_PER_THREAD", 2)
    threaded = LLM(str(tiny_model("qwen2")), block_size=8, max_model_len=128, max_num_seqs=64,
                   num_gpu_blocks_override=1024)
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    inline_outs = _run(llm, so, n=24)
    threaded_outs = _run(threaded, so, n=24)
    assert threaded.llm_engine.model_runner.logits_pipeline.structured.fill_threads == 4
    assert [c.token_ids for c in threaded_outs] == [c.token_ids for c in inline_outs]
    for c in threaded_outs:
        _validate(json.loads(c.text))


def test_fill_begun_while_tokens_are_processed_gives_the_same_outputs(llm, monkeypatch):
    """The engine starts a step's grammar fill as soon as it has read the previous step's tokens (the pending
    ones taken from what it read, not from the device) and processes those tokens meanwhile: the same seeded
    requests give the same tokens as with the fill run at sampling time."""
    from pagoda.engine import structured
    from pagoda.engine.logits import LogitsPipeline

    begun = []
    start_fill = structured.StructuredOutputManager.start_fill

    def counting(self, num_rows, rows, last_token=None, background=True):
        begun.append(background)
        return start_fill(self, num_rows, rows, last_token, background)

    monkeypatch.setattr(structured.StructuredOutputManager, "start_fill", counting)
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    early = _run(llm, so, n=24)
    assert begun.count(True) > 10 and begun.count(False) <= 2      # the first step has no tokens to read before
    begun.clear()
    monkeypatch.setattr(LogitsPipeline, "begin_sampling", lambda self, seqs, token_of: None)
    late = _run(llm, so, n=24)
    assert begun and not any(begun)
    assert [c.token_ids for c in early] == [c.token_ids for c in late]
    for c in early:
        _validate(json.loads(c.text))
