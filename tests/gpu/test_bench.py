"""The benchmark harness on a GPU with the embedded model: device memory in the records, and a case whose
emulated budget is too small runs out of memory (an OOM record, not a crash)."""
from __future__ import annotations

import json

import pytest

from conftest import GPU_ENV
from lowvram_ft.bench import supervisor
from lowvram_ft.memory import FIELDS

pytestmark = pytest.mark.gpu


def test_gpu_case_reports_device_memory_and_an_emulated_budget_ooms(tmp_path, monkeypatch):
    for name in ("CUDA_VISIBLE_DEVICES",):  # conftest hides the GPU from everything but `gpu` tests
        if name in GPU_ENV:
            monkeypatch.setenv(name, GPU_ENV[name])
        else:
            monkeypatch.delenv(name, raising=False)
    cases = tmp_path / "gpu.yaml"
    cases.write_text("device: cuda\ndefaults: {model: embedded, dtype: bfloat16, optimizer: adamw_8bit, "
                      "steps: 4, warmup_steps: 1, timeout_s: 300}\ncases:\n  - {seq_len: 256}\n"
                      "  - {seq_len: 256, budget_gib: 0.01, stacks: [hf]}\n")
    path = supervisor.run_bench(cases, out_dir=tmp_path / "results", log_root=tmp_path / "logs")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    fits = [r for r in lines if r["case"]["budget_gib"] is None]
    assert {r["stack"] for r in fits} == {"lowvram_ft", "hf"}
    for r in fits:
        # The embedded model is a fused bf16 gpt-oss: Unsloth's quantize-while-loading path may leave
        # its experts 16-bit, and then our 4-bit case must say so rather than report figures.
        if r["stack"] == "lowvram_ft" and r["status"] == "invalid":
            assert r["error"].startswith("asked for 4-bit weights") and r["loaded"]["experts_4bit"] is False
            continue
        assert r["status"] == "ok", r["error"]
        for phase in ("load", "train"):
            memory = r["memory"][phase]
            assert 0 < memory["peak_allocated_gib"] <= memory["peak_reserved_gib"] and memory["device_peak_gib"] > 0
        assert r["tokens_per_s"] > 0 and (r["mfu"] is None or r["mfu"] > 0)
        assert r["attention"]["ran"] and r["moe"]["path"]
    assert fits[0]["allocator"] == fits[1]["allocator"]
    tiny = next(r for r in lines if r["case"]["budget_gib"] is not None)
    assert tiny["status"] == "OOM" and set(tiny["memory_at_failure_gib"]) == {"phase", *FIELDS}
