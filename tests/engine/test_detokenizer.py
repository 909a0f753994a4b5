"""Incremental detokenization (multi-byte characters come out whole) and stop-string matching."""
from __future__ import annotations

import pytest

from pagoda.engine.detokenizer import IncrementalDetokenizer, find_stop_string

TEXT = "Café naïve 日本語のテキスト, 한국어 🙂🚀 über façade"


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model("qwen3"))


def _feed(detok, ids):
    return [detok.add(t) for t in ids]


def test_multibyte_characters_come_out_whole(tokenizer):
    ids = tokenizer.encode(TEXT)
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    deltas = _feed(detok, ids)
    assert "".join(deltas) == detok.output_text == tokenizer.decode(ids) == TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas   # some character was split over tokens (else this test proves nothing)


def test_after_a_prompt(tokenizer):
    prompt = tokenizer.encode("The quick brown fox")
    out = tokenizer.encode(" jumps 🙂 über")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    _feed(detok, out)
    assert detok.output_text == tokenizer.decode(prompt + out)[len(tokenizer.decode(prompt)):] == " jumps 🙂 über"


def test_special_tokens(tokenizer):
    ids = tokenizer.encode("dog") + [tokenizer.eos_token_id] + tokenizer.encode(" cat")
    skip = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    keep = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    _feed(skip, ids)
    _feed(keep, ids)
    assert skip.output_text == "dog cat"
    assert keep.output_text == "dog</s> cat"


def test_flush_gives_incomplete_bytes(tokenizer):
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer, [])
    assert _feed(detok, ids[:-1]) == [""] * (len(ids) - 1)
    assert detok.flush() == tokenizer.decode(ids[:-1]) and "\ufffd" in detok.output_text


@pytest.mark.parametrize("text, new, stop, include, expected", [
    ("hello world", 5, ["wor"], False, ("wor", 6)),
    ("hello world", 5, ["wor"], True, ("wor", 9)),
    ("hello world", 2, ["lo w"], False, None),        # ended before the new characters: found when it was new
    ("hello world", 4, ["o w"], False, None),
    ("hello world", 5, ["o w"], False, ("o w", 4)),   # straddles old and new text
    ("hello world", 11, ["d", "e"], False, ("e", 1)),  # the match that starts first wins
    ("hello", 0, ["h"], False, None),
    ("hello", 3, [], False, None),
])
def test_find_stop_string(text, new, stop, include, expected):
    assert find_stop_string(text, new, stop, include) == expected
