"""Export of a trained run: what each format writes and how it reloads outside lowvram_ft, the model card
of the run, and the error lines that come before any work (format on CPU, llama.cpp, Hub push, an existing
export). The pure pieces (cards, formats, llama.cpp, token checks, needs): unit/test_export.py.

The tests train the embedded default for a few steps, export it as lora and merged-16bit (each in its own
process, through Unsloth's savers) and reload both in a process that never imports Unsloth, comparing
logits with the model as lowvram_ft loads it (base + adapter, another process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, precision_atol
from lowvram_ft import export

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
PROBE = ("<|start|>user<|message|>Quelle est la capitale de la France ? Explique.<|end|>"
         "<|start|>assistant<|channel|>analysis<|message|>")
# The exactness tests run twice: with the weights pinned to float32 (where exactness is the point) and in
# bfloat16 (what the CPU path picks on a CPU with native bf16, and what GPUs train in).
# float32: the adapter is the same fp32 tensors in both processes and PEFT applies it the same way:
# measured difference 0.0 (bitwise); 1e-6 leaves room only for thread-order rounding in fp32 matmuls.
# bfloat16: Unsloth's CPU forward and plain transformers' round in different places; allowed: a few bf16
# roundings of the largest logit (precision_atol), which a missing adapter still exceeds.
PEFT_ATOL = {"float32": 1e-6}
DTYPES = ("float32", "bfloat16")
# merged-16bit rounds every merged weight to 16 bits (relative error <= eps/2: fp16 eps 2^-10, bf16 eps
# 2^-7) and the reload computes in that dtype. Measured with fp16 on an fp32 run: 1.1e-3 on logits up to
# ~1.5 in magnitude. Allowed: 4 eps x the largest |logit| (fp16: ~5.7e-3), which still fails on a missing
# adapter: the base model's logits are ~1.5 away from the tuned ones.
MERGED_EPS_FACTOR = 4
_TRAINED: dict[str, tuple[Path, dict]] = {}


def cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lowvram_ft", *args], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def trained_and_exported(tmp_path_factory, dtype: str) -> tuple[Path, dict]:
    """A 4-step run of the embedded default with its weights in `dtype`, exported as lora and
    merged-16bit (once per test module and dtype)."""
    if dtype not in _TRAINED:
        run_dir = tmp_path_factory.mktemp(f"export-{dtype}") / "run"
        proc = cli("train", "--config", "configs/embedded.yaml", "--output", str(run_dir), "train.max_steps=4",
                   "train.warmup_steps=0", "train.batch_size=2", "eval.enabled=false", f"model.dtype={dtype}")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        written = {}
        for fmt in ("lora", "merged-16bit"):
            proc = cli("export", "--run", str(run_dir), "--format", fmt)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            written[fmt] = run_dir / "export" / fmt
            assert f"export: {fmt} written to" in proc.stderr
        _TRAINED[dtype] = (run_dir, written)
    return _TRAINED[dtype]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_and_exported(tmp_path_factory, "float32")[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return trained_and_exported(tmp_path_factory, "float32")[1]


@pytest.fixture(scope="module", params=DTYPES)
def logits(request, tmp_path_factory):
    """Logits of PROBE: lowvram_ft's own load (Unsloth + our adapter attach) in one process; the
    exported lora with plain PEFT, the merged model with plain transformers and the bare base in
    another that never imports Unsloth — all in the run's dtype."""
    import torch

    dtype = request.param
    run, exported = trained_and_exported(tmp_path_factory, dtype)
    out = tmp_path_factory.mktemp(f"logits-{dtype}")
    ours = f"""
        import sys, torch
        from pathlib import Path
        from lowvram_ft.device import detect_device
        from lowvram_ft.model import import_unsloth, load_model
        from lowvram_ft.evaluate import run_config
        from lowvram_ft.evaluate.generation import attach_adapter
        import_unsloth()
        cfg = run_config(Path({str(run)!r}), [])
        model, tok = load_model(cfg, detect_device())
        assert str(model.dtype) == "torch.{dtype}", model.dtype
        model = attach_adapter(model, {str(run / 'adapter')!r}).eval()
        ids = tok({PROBE!r}, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            torch.save({{"ids": ids, "logits": model(input_ids=ids).logits.float()}}, {str(out / 'ours.pt')!r})
    """
    plain = f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        ids = torch.load({str(out / 'ours.pt')!r})["ids"]
        lora, merged = {str(exported['lora'])!r}, {str(exported['merged-16bit'])!r}
        base = json.load(open(lora + "/adapter_config.json"))["base_model_name_or_path"]
        result = {{}}
        with torch.no_grad():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.{dtype}).eval()
            result["base"] = model(input_ids=ids).logits.float()
            result["peft"] = PeftModel.from_pretrained(model, lora).eval()(input_ids=ids).logits.float()
            model = AutoModelForCausalLM.from_pretrained(merged).eval()
            result["merged"] = model(input_ids=ids).logits.float()
            result["merged_dtype"] = str(model.dtype)
        assert "unsloth" not in sys.modules and "unsloth_zoo" not in sys.modules, "Unsloth was imported"
        torch.save(result, {str(out / 'plain.pt')!r})
    """
    for script in (ours, plain):
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dtype": dtype, **torch.load(out / "ours.pt"), **torch.load(out / "plain.pt")}


# --------------------------------------------------------------------------- reloading outside lowvram_ft


def test_lora_export_reloads_with_plain_peft_and_reproduces_our_logits(logits):
    import torch

    ours, peft = logits["logits"], logits["peft"]
    assert ours.shape == peft.shape
    atol = PEFT_ATOL.get(logits["dtype"]) or precision_atol(logits["dtype"], ours.abs().max().item())
    assert torch.allclose(peft, ours, rtol=0, atol=atol), f"max diff {(peft - ours).abs().max():.3g} > {atol:.3g}"
    # The comparison can fail: without the adapter the logits are far away.
    assert (logits["base"] - ours).abs().max() > max(0.1, 2 * atol)


def test_merged_16bit_export_reloads_with_plain_transformers_within_16_bit_rounding(logits):
    import torch

    ours, merged = logits["logits"], logits["merged"]
    assert logits["merged_dtype"] in ("torch.float16", "torch.bfloat16")
    eps = torch.finfo(getattr(torch, logits["merged_dtype"].removeprefix("torch."))).eps
    atol = MERGED_EPS_FACTOR * eps * ours.abs().max().item()
    diff = (merged - ours).abs().max().item()
    assert diff <= atol, f"max diff {diff:.3g} > {atol:.3g}"
    assert (logits["base"] - ours).abs().max().item() > 10 * atol


def test_exports_hold_what_each_format_promises(exported):
    lora, merged = exported["lora"], exported["merged-16bit"]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md",
            "lowvram_ft_config.yaml"} <= {p.name for p in lora.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in merged.iterdir()}
    assert not list(lora.parent.glob(".*partial*")), "staging folder left behind"


# --------------------------------------------------------------------------- the model card


def test_model_card_of_a_run_names_base_data_licence_summary_config_and_reproduction(run, exported):
    card = (exported["lora"] / "README.md").read_text(encoding="utf-8")
    summary = json.loads((run / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "embedded tiny gpt-oss-shaped model" in card
    assert "| the lowvram_ft sample set (written for this project) | Apache-2.0 |" in card
    assert f"| steps | {summary['steps']} |" in card
    assert f"| trained tokens (non-padding) | {summary['trained_tokens']:,} |" in card
    assert f"| peak RSS | {summary['peak_memory_gib']} GiB |" in card
    assert "| device | no CUDA GPU found" in card
    assert "```yaml\n" + (run / "config.yaml").read_text().rstrip() + "\n```" in card
    assert "python -m lowvram_ft train --config lowvram_ft_config.yaml --output runs/reproduced" in card
    assert "python -m lowvram_ft export --run runs/reproduced --format lora" in card
    assert "Reasoning language" not in card  # this run had no evaluation
    assert (exported["lora"] / "lowvram_ft_config.yaml").read_text() == (run / "config.yaml").read_text()


# --------------------------------------------------------------------------- errors before any work


def test_unsupported_format_on_cpu_is_one_line_exit_2_and_nothing_written(run):
    proc = cli("export", "--run", str(run), "--format", "mxfp4", "--out", str(run / "mx"))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {export.format_problem('mxfp4', 'cpu')}"]
    assert not (run / "mx").exists()


def test_gguf_without_llama_cpp_says_how_to_get_it_before_any_work(run, tmp_path):
    env = {**ENV, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    env.pop("LLAMA_CPP_DIR", None)
    env.pop("UNSLOTH_LLAMA_CPP_PATH", None)
    proc = cli("export", "--run", str(run), "--format", "gguf", "--out", str(tmp_path / "g"), env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {export.LLAMA_CPP_MISSING}"]
    assert "git clone https://github.com/ggml-org/llama.cpp" in proc.stderr and "LLAMA_CPP_DIR" in proc.stderr
    assert "Unsloth" not in proc.stdout + proc.stderr  # refused before Unsloth was even imported
    assert not (tmp_path / "g").exists()


def test_push_without_token_is_one_line_exit_2_and_nothing_written(run, tmp_path):
    env = {k: v for k, v in ENV.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    proc = cli("export", "--run", str(run), "--format", "lora", "--push", "me/model", "--out", str(tmp_path / "p"),
               env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --push me/model: no Hugging Face token — set HF_TOKEN (a write token from "
        "https://huggingface.co/settings/tokens); nothing was exported or uploaded"]
    assert not (tmp_path / "p").exists()
    proc = cli("export", "--run", str(run), "--format", "lora", "--push", "me/model", "--out", str(tmp_path / "p"),
               env={**env, "HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "HF_HUB_OFFLINE is set" in proc.stderr
    assert not (tmp_path / "p").exists()


def test_an_existing_export_is_not_replaced_without_overwrite(run, exported):
    proc = cli("export", "--run", str(run), "--format", "lora")
    assert proc.returncode == 2
    assert f"{exported['lora']}: already holds an export — pass --overwrite" in proc.stderr
