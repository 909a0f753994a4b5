"""Tiny random-weight Hugging Face models saved as real folders (config, safetensors, tokenizer), the
CPU test bed of pagoda's models and engine.

`make_tiny_model(tmp_dir, arch, **overrides)` writes one folder; the session fixture `tiny_model`
(``tiny_model("qwen3")``) caches them per test session. Other test packages import the fixture into
their own ``conftest.py``: ``from tests.models.tiny import tiny_model  # noqa: F401``.

Every folder holds a byte-level BPE tokenizer trained in-process on a fixed text (so any text, multi-byte
characters included, encodes), with ``<s>``/``</s>`` and a chat template, loadable with
``AutoTokenizer.from_pretrained``. The weights are drawn from a fixed seed per architecture with a
spread that makes the logits peaked (greedy decoding has clear winners, so float32 rounding differences
between implementations do not flip tokens); biases and norm weights are random too, so a layer that
ignores them fails the comparison.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ARCHS = ("llama3.1", "qwen2", "qwen3", "mistral")
SLIDING_WINDOW = 8  # Mistral's window: shorter than the test prompts
# <|endoftext|> is the pad token; AutoTokenizer loads Qwen2's folders with Qwen2Tokenizer, which would add
# it (past the model's vocabulary) if the vocabulary lacked it.
BOS, EOS, PAD = "<s>", "</s>", "<|endoftext|>"
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

_TEXT = """\
The quick brown fox jumps over the lazy dog. A paged key-value cache stores the keys and values of every
token in fixed-size pages, so that requests of any length share one pool of memory without copying.
Continuous batching adds new requests to the running batch at every step; the scheduler picks decodes
first, then chunks of prefill under a token budget. Rotary position embeddings rotate pairs of features
by an angle proportional to the position. Grouped-query attention shares each key and value head among
several query heads. Sampling draws the next token from the softmax of the logits, after temperature,
top-k, top-p and min-p. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159.
Café, naïve, résumé, über, façade; Ελληνικά, русский язык, 中文字符, 日本語のテキスト, 한국어; emoji 🙂🚀🌍.
def add(a, b):
    return a + b
{"role": "user", "content": "Hello, world!"} <tag attr='x'>text</tag>
"""


def _train_tokenizer(vocab_size: int, add_bos: bool):
    """A byte-level BPE tokenizer (tokenizers library) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD] + [f"<|{r}|>" for r in ROLES]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT.splitlines(keepends=True) * 4, trainer)
    if add_bos:  # Llama's tokenizers put <s> in front of every encoded text
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def _config(arch: str, vocab_size: int, bos: int, eos: int, pad: int, overrides: dict):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)
    if arch == "llama3.1":
        # A short original context so the llama3 frequency bands change angles within the test prompts.
        common.update(tie_word_embeddings=True, rope_theta=10000.0,
                      rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=32))
        cls = transformers.LlamaConfig
    elif arch == "qwen2":
        cls = transformers.Qwen2Config
    elif arch == "qwen3":
        cls = transformers.Qwen3Config
    elif arch == "mistral":
        common.update(sliding_window=SLIDING_WINDOW)
        cls = transformers.MistralConfig
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    common.update(overrides)
    return cls(**common)


@torch.no_grad()
def _randomize(model, seed: int) -> None:
    """Weights N(0, 1/fan_in) (embeddings N(0, 1)), biases N(0, 0.1²), norm weights 1 + N(0, 0.1²)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if "norm" in name:
            p.copy_(1.0 + 0.1 * noise)
        elif p.dim() == 1:
            p.copy_(0.1 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:
            p.copy_(noise * p.shape[1] ** -0.5 * 2.0)


def make_tiny_model(tmp_dir, arch: str, **overrides) -> Path:
    """Write a tiny random-weight ``arch`` model folder under ``tmp_dir`` and return its path.

    arch: "llama3.1" (RoPE scaling llama3, tied embeddings, BOS added), "qwen2" (QKV bias), "qwen3" (q/k
    norm) or "mistral" (sliding window 8). ``overrides``: config fields (e.g. ``num_hidden_layers=3``).
    Hidden 64, 2 layers, 4 query heads, 2 KV heads, head_dim 16, float32; vocabulary = the tokenizer's.
    """
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    tok = _train_tokenizer(384, add_bos=arch == "llama3.1")
    ids = tok.convert_tokens_to_ids([BOS, EOS, PAD])
    config = _config(arch, len(tok), *ids, overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed=1000 + ARCHS.index(arch))
    path = Path(tmp_dir) / (arch + "".join(f"-{k}={v}" for k, v in sorted(overrides.items())))
    path = path.with_name(path.name.replace(" ", "").replace("/", "_")[:120])
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(arch, **overrides) -> Path``: `make_tiny_model` folders, made once per session."""
    cache: dict[str, Path] = {}

    def get(arch: str, **overrides) -> Path:
        key = repr((arch, sorted(overrides.items())))
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp("tiny-models"), arch, **overrides)
        return cache[key]

    return get
