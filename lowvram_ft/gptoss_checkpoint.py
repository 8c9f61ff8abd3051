"""Random-weight gpt-oss checkpoints in the layout users actually load, and a report of what loaded.

`FastLanguageModel.from_pretrained("unsloth/gpt-oss-20b", load_in_4bit=True)` loads
`unsloth/gpt-oss-20b-unsloth-bnb-4bit`: every expert is its own bitsandbytes Linear4bit
(`mlp.experts.gate_up_projs.<i>`, `mlp.experts.down_projs.<i>`; NF4, double quantization, blocksize 64,
uint8 storage), the router is a 16-bit `mlp.router.linear`, and embeddings, lm_head, sinks and norms are
bf16. Unsloth recognises that "split" layout from the config's bitsandbytes `quantization_config` plus
the per-expert tensor names (unsloth `models/loader_utils.py`, `gpt_oss_checkpoint_has_fused_experts`)
and loads it through unsloth_zoo's `patch_gpt_oss_bnb4bit` classes. A fused bf16 checkpoint without a
`quantization_config` takes another route (quantize-while-loading, which can leave the experts bf16),
so a benchmark built on one measures something users never run.

    config = split_layout_config(gpt_oss_config)            # pure: config.json of the split layout
    build_split_checkpoint(gpt_oss_config, out_dir)         # random weights, streamed tensor by tensor
    report = describe_loaded(model)                         # after loading: is it really 4-bit?

Heavy imports (torch, bitsandbytes, safetensors) live inside the functions that use them.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from . import folders
from .gptoss_tokenizer import load_gptoss_tokenizer
from .io import GIB

if TYPE_CHECKING:
    import torch

# unsloth_zoo 2026.10.9 `peft_utils.SKIP_QUANTIZATION_MODULES`, the list Unsloth quantizes with (and so
# the one its bnb-4bit uploads carry). A snapshot, not an import: unsloth_zoo cannot be imported without
# importing (and patching with) unsloth first, and a checkpoint built today must not change when a later
# zoo adds a name. tests/e2e/test_gptoss_checkpoint.py checks it against the installed zoo.
UNSLOTH_SKIP_QUANTIZATION_MODULES = (
    "lm_head", "multi_modal_projector", "merger", "modality_projection", "mm_projector", "router",
    "mlp.gate", "block_sparse_moe.gate", "moe.gate", "mamba", "audio_tower", "vision_tower", "visual",
    "vision_embedder", "embed_vision", "embed_audio", "score", "classifier", "qa_outputs",
)
# What the gpt-oss split layout keeps 16-bit beyond that list (router and lm_head are in it already).
# Attention is skipped by its projections' names: transformers 5.17 matches a skip entry as a prefix of
# the module name or as its ending, so "self_attn" would not match "model.layers.0.self_attn.q_proj"
# and attention would be quantized with no 4-bit state in the file (it fails at the first forward).
GPT_OSS_16BIT_MODULES = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj")
NF4_BLOCKSIZE = 64
MAX_SHARD_BYTES = 2 * GIB  # host memory held while a shard is written (the 20b shape: 7 shards, 12.5 GiB)
INDEX_FILE = "model.safetensors.index.json"
EXPERT_PROJECTION = re.compile(r"\.experts\.(gate_up_projs|down_projs)\.\d+\.")


def split_layout_config(base_config: dict) -> dict:
    """config.json of a split bnb-4bit gpt-oss checkpoint of `base_config`'s shape.

    The `quantization_config` is the one transformers writes for Unsloth's bnb-4bit uploads (a
    `BitsAndBytesConfig.to_dict()`: NF4, double quantization, bf16 compute, uint8 storage); any other
    quantization_config in `base_config` (OpenAI's mxfp4) is replaced. `llm_int8_skip_modules` is
    Unsloth's SKIP_QUANTIZATION_MODULES plus embed_tokens and q_proj, k_proj, v_proj, o_proj.

    Attention stays bf16. Offline it is unknown whether the real upload quantizes q/k/v/o; keeping them
    16-bit is the upper bound on memory, so a run measured to fit here fits with the real weights too.
    For gpt-oss-20b, q/k/v/o are 0.64B parameters: 1.19 GiB in bf16 against 0.31 GiB in NF4, so the
    weights take about 12.5 GiB (13.5 GB) here and would take about 11.6 GiB (12.5 GB) with 4-bit
    attention. Attention LoRA then runs over bf16 weights (no dequantization), slightly faster.
    """
    if base_config.get("model_type") != "gpt_oss":
        raise ValueError(f"split_layout_config: model_type is {base_config.get('model_type')!r}; "
                         "the split bnb-4bit layout exists only for gpt_oss")
    skip = list(UNSLOTH_SKIP_QUANTIZATION_MODULES)
    skip += [name for name in GPT_OSS_16BIT_MODULES if name not in skip]
    config = {key: value for key, value in base_config.items() if key != "quantization_config"}
    config["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": skip,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }
    config["torch_dtype"] = "bfloat16"
    return config


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the split layout: its name, its (out, in) shape and how its random values are made."""

    name: str
    shape: tuple[int, ...]
    init: str  # "normal" (std = initializer_range), "zeros", "ones" or "nf4" (normal, then 4-bit)


def split_layout_tensors(config: dict) -> Iterator[TensorSpec]:
    """Every tensor of the split layout in model order, before 4-bit serialization adds its state keys."""
    hidden = config["hidden_size"]
    inter = config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    bias = config.get("attention_bias", True)
    yield TensorSpec("model.embed_tokens.weight", (config["vocab_size"], hidden), "normal")
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        yield TensorSpec(f"{p}.input_layernorm.weight", (hidden,), "ones")
        for proj, out_dim, in_dim in (("q_proj", heads * head_dim, hidden), ("k_proj", kv_heads * head_dim, hidden),
                                      ("v_proj", kv_heads * head_dim, hidden), ("o_proj", hidden, heads * head_dim)):
            yield TensorSpec(f"{p}.self_attn.{proj}.weight", (out_dim, in_dim), "normal")
            if bias:
                yield TensorSpec(f"{p}.self_attn.{proj}.bias", (out_dim,), "zeros")
        yield TensorSpec(f"{p}.self_attn.sinks", (heads,), "normal")
        yield TensorSpec(f"{p}.post_attention_layernorm.weight", (hidden,), "ones")
        yield TensorSpec(f"{p}.mlp.router.linear.weight", (config["num_local_experts"], hidden), "normal")
        yield TensorSpec(f"{p}.mlp.router.linear.bias", (config["num_local_experts"],), "zeros")
        for expert in range(config["num_local_experts"]):
            # gate_up rows interleave gate and up (the swiglu reads [..., ::2] and [..., 1::2]).
            yield TensorSpec(f"{p}.mlp.experts.gate_up_projs.{expert}.weight", (2 * inter, hidden), "nf4")
            yield TensorSpec(f"{p}.mlp.experts.gate_up_projs.{expert}.bias", (2 * inter,), "zeros")
            yield TensorSpec(f"{p}.mlp.experts.down_projs.{expert}.weight", (hidden, inter), "nf4")
            yield TensorSpec(f"{p}.mlp.experts.down_projs.{expert}.bias", (hidden,), "zeros")
    yield TensorSpec("model.norm.weight", (hidden,), "ones")
    if not config.get("tie_word_embeddings", False):
        yield TensorSpec("lm_head.weight", (config["vocab_size"], hidden), "normal")


def build_split_checkpoint(config: dict, out_dir: Path, device: str | None = None, seed: int = 0,
                           with_tokenizer: bool = True) -> Path:
    """Write a random-weight checkpoint of `config`'s gpt-oss shape in the split bnb-4bit layout.

    `config` is a gpt-oss config.json dict; the folder gets `split_layout_config(config)`. Each tensor is
    generated in bf16 on `device` (default: cuda when available), experts are quantized there with
    bitsandbytes (NF4, double quantization, blocksize 64, uint8 storage) and serialized as
    bitsandbytes' Linear4bit state dict does, and tensors go to safetensors shards of at most 2 GiB
    with a `model.safetensors.index.json`, so host memory holds one shard, not the model. The same seed
    and device give the same weights. With `with_tokenizer`, the offline o200k_harmony tokenizer is
    saved beside them. Atomic: built in a sibling staging folder, renamed to `out_dir` at the end
    (replacing an earlier `out_dir`), and removed if anything fails.
    """
    import torch

    folders.refuse_foreign(out_dir, "checkpoint", "--out")  # never replace a folder this tool did not write
    layout = split_layout_config(config)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        write_shards(random_tensors(layout, device, seed), staging)
        write_json(staging / "config.json", layout)
        write_json(staging / "generation_config.json", generation_config(layout))
        if with_tokenizer:
            load_gptoss_tokenizer().save_pretrained(str(staging))
        staging.chmod(0o755)  # mkdtemp makes it owner-only
        folders.mark(staging, "checkpoint")
        folders.swap_into(staging, out_dir)  # an earlier checkpoint of ours is replaced only now
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def random_tensors(config: dict, device: str, seed: int) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(name, CPU tensor) pairs of the serialized checkpoint, one layout tensor generated at a time."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    std = config.get("initializer_range", 0.02)
    for spec in split_layout_tensors(config):
        if spec.init == "zeros":
            value = torch.zeros(spec.shape, dtype=torch.bfloat16, device=device)
        elif spec.init == "ones":
            value = torch.ones(spec.shape, dtype=torch.bfloat16, device=device)
        else:
            value = torch.randn(spec.shape, generator=generator, dtype=torch.bfloat16, device=device) * std
        pieces = nf4_state_dict(value) if spec.init == "nf4" else {"": value}
        for suffix, tensor in pieces.items():
            # copy=True: bitsandbytes shares its code tables between weights, and safetensors refuses
            # tensors that share memory.
            yield spec.name + suffix, tensor.detach().to("cpu", copy=True).contiguous()


def nf4_state_dict(weight: "torch.Tensor") -> dict[str, "torch.Tensor"]:
    """`weight` (out, in) as bitsandbytes' Linear4bit saves it: the packed uint8 `(n, 1)` tensor under ""
    and the quant state under ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map" and
    ".quant_state.bitsandbytes__nf4" (what transformers' Bnb4bitDeserialize reads back)."""
    from bitsandbytes.functional import quantize_4bit
    import torch

    packed, state = quantize_4bit(weight, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4",
                                  quant_storage=torch.uint8)
    pieces = {"": packed}
    pieces.update({f".{key}": value for key, value in state.as_dict(packed=True).items()})
    return pieces


def write_shards(tensors: Iterator[tuple[str, "torch.Tensor"]], folder: Path,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, str]:
    """Stream `tensors` into `model-0000k-of-0000n.safetensors` shards plus their index; returns the
    weight map. A shard is written as soon as the next tensor would push it past `max_shard_bytes`."""
    shards: list[list[str]] = []
    pending: dict = {}
    pending_bytes = total_bytes = 0
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            shards.append(save_shard(pending, folder, len(shards) + 1))
            pending, pending_bytes = {}, 0
        pending[name] = tensor
        pending_bytes += size
        total_bytes += size
    if pending:
        shards.append(save_shard(pending, folder, len(shards) + 1))
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"shard-{number:05d}.safetensors").rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    write_json(folder / INDEX_FILE, {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))})
    return weight_map


def save_shard(tensors: dict, folder: Path, number: int) -> list[str]:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / f"shard-{number:05d}.safetensors"), metadata={"format": "pt"})
    return list(tensors)


def generation_config(config: dict) -> dict:
    ids = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}
    return {"_from_model_config": True, **ids}


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def describe_loaded(model) -> dict:
    """What a loaded model holds: parameters per storage type (4-bit weights counted by their logical
    size under their quant type, "nf4"), the number of Params4bit parameters and Linear4bit modules,
    how many expert weights there are and how many are 4-bit, `experts_4bit` (True only when there are
    expert weights and every one is a quantized Params4bit — split per-expert Linear4bit or a fused 4-bit
    stack; a benchmark case without it did not measure a 4-bit model), and `cuda_allocated_gib`
    (torch's allocated CUDA memory now, None when the model is not on CUDA)."""
    import torch
    from bitsandbytes.nn import Linear4bit, Params4bit

    by_type: Counter = Counter()
    expert_weights = expert_weights_4bit = params4bit = 0
    on_cuda = False
    for name, param in model.named_parameters():
        quantized = isinstance(param, Params4bit) and getattr(param, "quant_state", None) is not None
        if quantized:
            params4bit += 1
            by_type[param.quant_state.quant_type] += logical_numel(param)
        else:
            by_type[str(param.dtype).removeprefix("torch.")] += param.numel()
        if is_expert_weight(name):
            expert_weights += 1
            expert_weights_4bit += quantized
        on_cuda = on_cuda or param.device.type == "cuda"
    allocated = None
    if on_cuda:
        torch.cuda.synchronize()
        allocated = round(torch.cuda.memory_allocated() / GIB, 3)
    return {
        "parameters_by_dtype": dict(sorted(by_type.items())),
        "params4bit": params4bit,
        "linear4bit": sum(isinstance(module, Linear4bit) for module in model.modules()),
        "expert_weights": expert_weights,
        "expert_weights_4bit": expert_weights_4bit,
        "experts_4bit": expert_weights > 0 and expert_weights_4bit == expert_weights,
        "cuda_allocated_gib": allocated,
    }


def logical_numel(param) -> int:
    """Weights a Params4bit stands for (it stores two per uint8 element, packed to (n, 1))."""
    shape = getattr(param, "_original_shape", None) or param.quant_state.shape
    return math.prod(shape)


def is_expert_weight(name: str) -> bool:
    """An expert projection weight: split (`experts.gate_up_projs.3.weight`, PEFT's `.base_layer.weight`)
    or fused (`experts.gate_up_proj`); not a bias and not a LoRA matrix."""
    if ".experts." not in name or "lora_" in name:
        return False
    leaf = name.rsplit(".", 1)[-1]
    if EXPERT_PROJECTION.search(name):
        return leaf == "weight"
    return leaf in ("gate_up_proj", "down_proj")


def main(argv: list[str] | None = None) -> int:
    """`python -m lowvram_ft.gptoss_checkpoint --config gpt-oss-20b --out DIR`: build a random split
    checkpoint of a bundled gpt-oss shape (lowvram_ft/assets/model_configs/NAME.json) or a config.json."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lowvram_ft.gptoss_checkpoint", description=main.__doc__)
    parser.add_argument("--config", required=True, help="bundled shape (gpt-oss-20b, gpt-oss-120b) or a config.json path")
    parser.add_argument("--out", required=True, help="the checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    bundled = Path(__file__).parent / "assets" / "model_configs" / f"{args.config}.json"
    path = bundled if bundled.is_file() else Path(args.config)
    if not path.is_file():
        print(f"error: {args.config}: neither a bundled shape nor a config.json file", file=sys.stderr)
        return 2
    started = time.perf_counter()
    out = build_split_checkpoint(json.loads(path.read_text()), Path(args.out), seed=args.seed)
    print(f"built {out} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
