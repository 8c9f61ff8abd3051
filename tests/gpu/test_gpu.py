"""GPU checks (marker `gpu`, skipped without CUDA): the embedded model on the GPU; a gpt-oss-20b-shaped
model with random weights in the split bnb-4bit layout users load, trained a few steps with QLoRA and
loaded as Unsloth loads the real checkpoint (experts 4-bit); and the smoke test of that model on an
emulated 16 GiB card.

Every model is built and trained in a child process (conftest.gpu_env: the GPU visible), which frees
the GPU when it exits; the 20b checkpoint goes into the test's temporary folder (or is reused from
$LOWVRAM_FT_GPU_MODEL, which `make gpu-check` sets), never into benchmarks/results or the user's cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, gpu_env

pytestmark = pytest.mark.gpu


def run(*args: str, env: dict | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or gpu_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def gpt_oss_20b_split(tmp_path_factory) -> Path:
    given = os.environ.get("LOWVRAM_FT_GPU_MODEL")
    if given and (Path(given) / "config.json").is_file():
        return Path(given)
    target = tmp_path_factory.mktemp("models") / "random-gpt-oss-20b-split-bnb4"
    proc = run("-m", "lowvram_ft.gptoss_checkpoint", "--config", "gpt-oss-20b", "--out", str(target))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def test_embedded_trains_on_the_gpu(tmp_path):
    proc = run("-m", "lowvram_ft", "train", "--config", "configs/embedded.yaml", "--output", str(tmp_path / "run"),
               "train.max_steps=20", "eval.enabled=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["device"]["kind"] == "cuda" and summary["peak_memory_kind"] == "peak_reserved_vram"
    assert summary["memory"]["train"]["peak_reserved_gib"] > 0 and summary["memory"]["train"]["peak_allocated_gib"] > 0
    assert summary["final_loss"] < summary["first_loss"]


def test_the_split_checkpoint_loads_as_users_get_it_experts_in_4bit(gpt_oss_20b_split):
    code = f"""
import json
from lowvram_ft.model import import_unsloth
unsloth = import_unsloth()
from lowvram_ft.gptoss_checkpoint import describe_loaded
model, _ = unsloth.FastLanguageModel.from_pretrained({str(gpt_oss_20b_split)!r}, load_in_4bit=True, max_seq_length=1024)
print(json.dumps(describe_loaded(model)))
"""
    proc = run("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["experts_4bit"] and loaded["linear4bit"] >= 24 * 32 * 2, loaded
    assert loaded["cuda_allocated_gib"] < 16, loaded


def test_gpt_oss_20b_headline_qlora_steps_within_an_emulated_16_gib_card(tmp_path, gpt_oss_20b_split):
    run_dir = tmp_path / "run"
    proc = run("-m", "lowvram_ft", "train", "--model", str(gpt_oss_20b_split), "--dataset", "sample", "--output", str(run_dir),
               "model.load_in=4bit", "train.max_steps=5", "train.warmup_steps=0", "data.max_rows=40",
               "eval.enabled=false", env=gpu_env(LOWVRAM_FT_VRAM_GIB="16"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the 16 GB recipe" in proc.stderr  # no --config: the gpt-oss recipe (seq 1024, r=8)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainable_parameters"]["experts"] > 0
    assert summary["memory"]["train"]["peak_reserved_gib"] <= 16
    assert summary["packing"]["used"] is False


def test_smoke_on_the_20b_shape_fits_an_emulated_16_gib_card(gpt_oss_20b_split, tmp_path):
    proc = run("-m", "lowvram_ft", "smoke", "--model", str(gpt_oss_20b_split), "--dataset", "sample", "--output", str(tmp_path / "smoke"),
               "model.load_in=4bit", "eval.max_new_tokens=64", env=gpu_env(LOWVRAM_FT_VRAM_GIB="16"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "out of memory" not in (proc.stdout + proc.stderr).lower()
