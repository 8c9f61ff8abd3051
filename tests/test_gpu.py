"""GPU checks (skipped without CUDA): the embedded model on the GPU, a gpt-oss-20b-shaped model with
random weights in 4-bit for a few steps (peak VRAM recorded under benchmarks/results/), and the smoke
test of that model on an emulated 16 GiB card."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def train(args: list[str], env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowvram_ft", "train", *args], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def gpt_oss_20b_random():
    from lowvram_ft.bench import build_random_model, random_model_config, random_models_dir

    target = random_models_dir() / "random-gpt-oss-20b-random"
    if not (target / "config.json").is_file():
        build_random_model(random_model_config("gpt-oss-20b-random"), target)
    return target


def test_embedded_trains_on_the_gpu(tmp_path):
    proc = train(["--config", "configs/embedded.yaml", "--output", str(tmp_path / "run"), "train.max_steps=20",
                  "eval.enabled=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["device"]["kind"] == "cuda" and summary["peak_memory_kind"] == "peak_reserved_vram"
    assert summary["final_loss"] < summary["first_loss"]


def test_gpt_oss_20b_shape_qlora_steps_and_peak_vram(tmp_path, gpt_oss_20b_random):
    run = tmp_path / "run"
    proc = train(["--model", str(gpt_oss_20b_random), "--output", str(run), "model.load_in=4bit",
                  "model.max_seq_length=1024", "train.max_steps=5", "train.warmup_steps=0", "data.max_rows=40",
                  "lora.r=8", "lora.alpha=16", "eval.enabled=false", "--force"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_parameters"]["experts"] > 0
    import torch

    record = {"what": "gpt-oss-20b shape, random weights, 4-bit QLoRA r=8 attention+experts, seq 1024, batch 1, 5 steps",
              "gpu": torch.cuda.get_device_name(0), "peak_reserved_gib": summary["peak_memory_gib"],
              "versions": summary["versions"], "command": " ".join(proc.args)}
    out = ROOT / "benchmarks" / "results" / f"{date.today()}-gpu-test-gpt-oss-20b.json"
    out.write_text(json.dumps(record, indent=2) + "\n")


def test_smoke_on_20b_shape_fits_an_emulated_16_gib_card(gpt_oss_20b_random, tmp_path):
    env = {**ENV, "LOWVRAM_FT_VRAM_GIB": "16"}
    proc = subprocess.run([sys.executable, "-m", "lowvram_ft", "smoke", "--model", str(gpt_oss_20b_random),
                           "--output", str(tmp_path / "smoke"), "model.load_in=4bit", "eval.max_new_tokens=64"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "out of memory" not in (proc.stdout + proc.stderr).lower()
