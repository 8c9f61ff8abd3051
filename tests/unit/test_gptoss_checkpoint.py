"""The split bnb-4bit gpt-oss checkpoint (what users of unsloth/gpt-oss-20b load) built with random weights.

A tiny gpt-oss shape (2 layers, 4 experts, hidden 64; helpers.TINY) is built once on the CPU without the
tokenizer (conftest's tiny_checkpoint). The checks that need Unsloth (its split/fused classifier, loading
through unsloth_zoo's split classes) import unsloth, about 20 s of CPU: e2e/test_gptoss_checkpoint.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import REAL_20B, TINY
from lowvram_ft import folders
from lowvram_ft import gptoss_checkpoint as ckpt
from lowvram_ft.gptoss_checkpoint import build_split_checkpoint, split_layout_config, split_layout_tensors

SUFFIXES_4BIT = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")
# The key pattern of unsloth/gpt-oss-20b-unsloth-bnb-4bit, written out by hand (numbers become <n>).
SPLIT_PATTERNS = {
    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
    "model.layers.<n>.input_layernorm.weight", "model.layers.<n>.post_attention_layernorm.weight",
    *(f"model.layers.<n>.self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for w in ("weight", "bias")),
    "model.layers.<n>.self_attn.sinks",
    "model.layers.<n>.mlp.router.linear.weight", "model.layers.<n>.mlp.router.linear.bias",
    *(f"model.layers.<n>.mlp.experts.{p}.<n>.weight{s}" for p in ("gate_up_projs", "down_projs") for s in SUFFIXES_4BIT),
    *(f"model.layers.<n>.mlp.experts.{p}.<n>.bias" for p in ("gate_up_projs", "down_projs")),
}


def pattern(name: str) -> str:
    return re.sub(r"\.\d+(?=\.)", ".<n>", name)


def checkpoint_tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of every tensor, read through the index as loaders do."""
    from safetensors import safe_open

    index = json.loads((folder / ckpt.INDEX_FILE).read_text())
    found = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), framework="pt") as f:
            for name in f.keys():
                found[name] = (str(f.get_slice(name).get_dtype()), tuple(f.get_slice(name).get_shape()))
    assert set(found) == set(index["weight_map"])
    return found


# --------------------------------------------------------------------------- (a) config


def test_config_quantization_and_skip_list_are_those_of_the_20b_layout(tiny_checkpoint):
    written = json.loads((tiny_checkpoint / "config.json").read_text())
    real = split_layout_config(REAL_20B)
    assert written["quantization_config"] == real["quantization_config"]
    qc = real["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True
    assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"], qc["bnb_4bit_compute_dtype"],
            qc["bnb_4bit_quant_storage"]) == ("nf4", True, "bfloat16", "uint8")
    skip = qc["llm_int8_skip_modules"]
    assert skip[:len(ckpt.UNSLOTH_SKIP_QUANTIZATION_MODULES)] == list(ckpt.UNSLOTH_SKIP_QUANTIZATION_MODULES)
    assert {"router", "lm_head", "embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj"} <= set(skip)
    assert "self_attn" not in skip  # transformers 5.17 would not match it (see split_layout_config)
    assert len(skip) == len(set(skip))
    # Everything else is the base config, minus OpenAI's mxfp4 quantization_config.
    assert {k: v for k, v in real.items() if k not in ("quantization_config", "torch_dtype")} == \
        {k: v for k, v in REAL_20B.items() if k != "quantization_config"}
    assert split_layout_config(real) == real


def test_split_layout_config_refuses_other_models():
    with pytest.raises(ValueError, match="gpt_oss"):
        split_layout_config({"model_type": "qwen3"})


# --------------------------------------------------------------------------- (b) tensor names and 4-bit keys


def test_tensor_names_follow_the_20b_split_pattern(tiny_checkpoint):
    tensors = checkpoint_tensors(tiny_checkpoint)
    assert {pattern(name) for name in tensors} == SPLIT_PATTERNS
    real_names = {spec.name + (s if spec.init == "nf4" else "") for spec in split_layout_tensors(REAL_20B)
                  for s in (SUFFIXES_4BIT if spec.init == "nf4" else ("",))}
    assert {pattern(name) for name in real_names} == SPLIT_PATTERNS
    assert sum(".gate_up_projs." in n and n.endswith(".weight") for n in real_names) == 24 * 32
    # 2 layers x 4 experts x 2 projections, each with bias and the 6 serialized 4-bit entries.
    assert sum(".experts." in name for name in tensors) == 2 * 4 * 2 * (1 + len(SUFFIXES_4BIT))
    assert tensors["model.layers.1.mlp.experts.gate_up_projs.3.weight"] == ("U8", (2 * 64 * 64 // 2, 1))
    assert tensors["model.layers.0.mlp.experts.down_projs.0.weight.absmax"] == ("U8", (64 * 64 // 64,))
    assert tensors["model.layers.0.mlp.router.linear.weight"] == ("BF16", (4, 64))
    assert tensors["model.layers.0.self_attn.q_proj.weight"] == ("BF16", (64, 64))
    assert tensors["model.layers.0.self_attn.sinks"] == ("BF16", (4,))
    assert tensors["lm_head.weight"] == ("BF16", (256, 64))


def test_4bit_entries_are_exactly_what_linear4bit_saves():
    """Same keys, dtypes, shapes and bytes as bitsandbytes' own Linear4bit state dict for the same weight."""
    import bitsandbytes as bnb
    import torch

    weight = torch.randn(128, 64, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4", quant_storage=torch.uint8)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", quant_storage=torch.uint8, blocksize=64)
    expected = {k.removeprefix("weight"): v for k, v in layer.to("cpu").state_dict().items()}
    ours = ckpt.nf4_state_dict(weight)
    assert set(ours) == set(expected) == set(SUFFIXES_4BIT)
    for key, value in expected.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


def test_shards_are_split_by_size_and_indexed(tmp_path):
    import torch

    tensors = ((f"t{i}", torch.zeros(256, dtype=torch.uint8)) for i in range(5))
    weight_map = ckpt.write_shards(tensors, tmp_path, max_shard_bytes=600)  # two tensors per shard
    index = json.loads((tmp_path / ckpt.INDEX_FILE).read_text())
    assert index == {"metadata": {"total_size": 5 * 256}, "weight_map": weight_map}
    assert sorted(set(weight_map.values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.INDEX_FILE, *set(weight_map.values())])


def test_expert_weights_are_recognised_split_fused_and_under_peft():
    assert ckpt.is_expert_weight("model.layers.0.mlp.experts.gate_up_projs.3.weight")
    assert ckpt.is_expert_weight("base_model.model.model.layers.0.mlp.experts.down_projs.0.base_layer.weight")
    assert ckpt.is_expert_weight("model.layers.0.mlp.experts.gate_up_proj")
    assert ckpt.is_expert_weight("model.layers.0.mlp.experts.base_layer.down_proj")
    for name in ("model.layers.0.mlp.experts.gate_up_projs.3.bias", "model.layers.0.mlp.experts.gate_up_proj_bias",
                 "model.layers.0.mlp.experts.down_projs.0.lora_A.default.weight", "model.layers.0.mlp.router.linear.weight",
                 "model.layers.0.self_attn.q_proj.weight"):
        assert not ckpt.is_expert_weight(name), name


# --------------------------------------------------------------------------- (e) atomicity


def test_a_failed_build_leaves_no_folder(tmp_path, monkeypatch):
    def fail(config):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "generation_config", fail)  # after the shards are written
    with pytest.raises(RuntimeError, match="disk full"):
        build_split_checkpoint(TINY, tmp_path / "model", device="cpu", with_tokenizer=False)
    assert list(tmp_path.iterdir()) == []

    earlier = tmp_path / "model"
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")
    folders.mark(earlier, "checkpoint")  # an earlier checkpoint of ours: replaced only by a finished build
    with pytest.raises(RuntimeError, match="disk full"):
        build_split_checkpoint(TINY, earlier, device="cpu", with_tokenizer=False)
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (earlier / "config.json").read_text() == "{}"


def test_a_folder_this_tool_did_not_write_is_never_replaced(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(folders.FolderError, match="did not write"):
        build_split_checkpoint(TINY, mine, device="cpu", with_tokenizer=False)
    assert (mine / "notes.txt").read_text() == "keep" and [p.name for p in mine.iterdir()] == ["notes.txt"]
