"""The safetensors loader (single file, sharded, errors naming what is wrong), the registry and dummy weights."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda.models import build_model, get_model_class, init_dummy_weights, load_weights
from pagoda.models.loader import checkpoint_files
from tests.models.driver import PagedDriver

transformers = pytest.importorskip("transformers")

IDS = [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12]


def _config(path):
    return transformers.AutoConfig.from_pretrained(path)


def _logits(model):
    return PagedDriver(model).step({"a": IDS}, all_logits=True)


def _copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_like_single_file(tiny_model, tmp_path):
    path = tiny_model("qwen3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    files = checkpoint_files(sharded)
    assert len(files) > 2 and (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    one = build_model(_config(path), torch.float32, "cpu")
    load_weights(one, path)
    many = build_model(_config(path), torch.float32, "cpu")
    load_weights(many, sharded)
    for (name, p), (_, q) in zip(one.named_parameters(), many.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(_logits(one), _logits(many))


def test_missing_files(tiny_model, tmp_path):
    config = _config(tiny_model("qwen2"))
    model = build_model(config, torch.float32, "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(model, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_weights(model, empty)
    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(tiny_model("qwen2")).save_pretrained(sharded,
                                                                                          max_shard_size="40KB")
    shard = sorted(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    (sharded / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        load_weights(model, sharded)


def _rewrite(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors(tiny_model, tmp_path):
    src = tiny_model("qwen2")
    model = build_model(_config(src), torch.float32, "cpu")

    missing = _copy_folder(src, tmp_path / "missing")
    _rewrite(missing, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_weights(model, missing)

    extra = _copy_folder(src, tmp_path / "extra")
    _rewrite(extra, lambda t: t.update({"model.layers.0.self_attn.sinks": torch.zeros(4)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.0\.self_attn\.sinks"):
        load_weights(model, extra)

    bad = _copy_folder(src, tmp_path / "bad")
    _rewrite(bad, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(100, 64)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(128, 64\)"):
        load_weights(model, bad)


def test_tied_head_in_checkpoint_is_ignored(tiny_model, tmp_path):
    """Some tied checkpoints also store lm_head.weight; the loader accepts it and keeps the shared table."""
    src = tiny_model("llama3.1")
    folder = _copy_folder(src, tmp_path / "tied")
    _rewrite(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = build_model(_config(src), torch.float32, "cpu")
    load_weights(model, folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_unsupported_architecture(tiny_model):
    config = _config(tiny_model("mistral"))
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match=r"'GPT2LMHeadModel' is not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        get_model_class(config)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        build_model(config, torch.float32, "cpu")
    config.architectures = None
    with pytest.raises(ValueError, match="architectures is empty"):
        get_model_class(config)


def test_build_model_checks_dtype(tiny_model):
    with pytest.raises(TypeError, match="dtype"):
        build_model(_config(tiny_model("qwen3")), "float32", "cpu")
    with pytest.raises(TypeError, match="dtype"):
        build_model(_config(tiny_model("qwen3")), torch.int32, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dummy_weights(tiny_model, dtype):
    config = _config(tiny_model("qwen3"))
    model = build_model(config, dtype, "cpu")
    assert all(p.dtype == dtype for p in model.parameters())
    init_dummy_weights(model, seed=3)
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=dtype))
    emb = model.model.embed_tokens.weight.float()
    assert 0.015 < emb.std().item() < 0.025
    logits = _logits(model)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert logits.std(dim=-1).min() > 1e-3  # not flat
    assert logits.argmax(-1).unique().numel() > 1  # not one token everywhere
    again = build_model(config, dtype, "cpu")
    init_dummy_weights(again, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))
    init_dummy_weights(again, seed=4)
    assert not torch.equal(model.model.embed_tokens.weight, again.model.embed_tokens.weight)
