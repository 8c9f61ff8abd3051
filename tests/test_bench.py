"""The benchmark harness: pure measurement maths with exact values, the result files, and one CPU run of
both stacks on the embedded model (each case in its own process)."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from lowvram_ft import bench
from lowvram_ft.bench import Case

ROOT = Path(__file__).resolve().parents[1]
# Both stacks train the same fp32 weights on the same rows with the same LoRA init (seed 3407 set right
# before get_peft_model in both). What differs is the attention kernel (Unsloth's CPU path vs eager) and
# the loss kernel (Unsloth's chunked cross-entropy vs TRL's log-probs in plain torch): fp32 rounding,
# ~1e-7 relative on a loss of ~6, measured 0 to 1e-6. Four Adam steps of lr 2e-4 can amplify a rounding
# difference in a near-zero gradient to at most ~lr per weight; 1e-3 leaves room for that and still
# fails on any real difference (another batch, another init, a missing aux loss: >= 1e-2 here).
CPU_LOSS_TOLERANCE = 1e-3


def cuda_available() -> bool:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")


def record(setting="embedded s256 b1", stack="lowvram_ft", **figures) -> dict:
    case = Case(stack=stack, model="embedded", seq_len=256)
    out = bench.empty_figures()
    out.update(case=dataclasses.asdict(case), setting=setting, stack=stack, status="ok", **figures)
    return out


# --------------------------------------------------------------------------- timing and throughput


def test_tokens_per_second_is_tokens_per_step_over_the_median_step_after_warmup():
    times = [5.0, 1.0, 2.0, 1.0, 10.0]  # 5.0: warm-up (compilation); 10.0: a stray pause
    assert bench.median_step_s(times, warmup_steps=1) == 1.5
    assert bench.tokens_per_second(times, tokens_per_step=300, warmup_steps=1) == 200.0
    assert bench.tokens_per_second(times, tokens_per_step=300, warmup_steps=0) == 150.0  # median 2.0
    assert bench.tokens_per_second(times, 300, warmup_steps=5) is None  # nothing left to time


def test_training_flops_count_six_n_plus_the_attention_term():
    layers = [(2, 4, None), (2, 4, 4)]  # one full-attention layer, one sliding window of 4
    # 6 * 1000 + 12 * 2 * 4 * 8 (full: T = 8) + 12 * 2 * 4 * 4 (sliding: T = window)
    assert bench.training_flops_per_token(1000, seq_len=8, layers=layers) == 6000 + 768 + 384
    assert bench.training_flops_per_token(1000, seq_len=2, layers=layers) == 6000 + 192 + 192


def test_flops_of_the_gpt_oss_20b_shape_from_its_config():
    config = json.loads((ROOT / "lowvram_ft/assets/model_configs/gpt-oss-20b.json").read_text())
    layers = bench.attention_layers(config)
    assert len(layers) == 24 and layers[0] == (64, 64, 128) and layers[1] == (64, 64, None)
    assert bench.active_parameters(config) == 3_608_307_264  # OpenAI's "3.6B active"
    # 6 x 3,608,307,264 + 12 x 64 x 64 x (12 x 1024 + 12 x 128)
    assert bench.training_flops_per_token(3_608_307_264, 1024, layers) == 21_649_843_584 + 679_477_248


def test_mfu_against_the_peak_of_the_named_gpu():
    assert bench.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bench.peak_bf16_flops("NVIDIA H100 PCIe") == 756.0e12
    assert bench.peak_bf16_flops("NVIDIA H200") == 989.4e12
    assert bench.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312.0e12
    assert bench.peak_bf16_flops("NVIDIA L40S") == 362.05e12
    assert bench.peak_bf16_flops("NVIDIA L4") == 121.0e12
    assert bench.peak_bf16_flops("Tesla T4") is None and bench.peak_bf16_flops("cpu") is None
    mfu = bench.model_flops_utilization(10_000, 22_329_320_832, 989.4e12)
    assert mfu == pytest.approx(0.225685, abs=1e-6)
    assert bench.model_flops_utilization(None, 1, 1.0) is None
    assert bench.model_flops_utilization(10.0, 1, None) is None


def test_budget_fraction_takes_the_cuda_context_off_the_emulated_card():
    total = 80 * bench.GIB
    assert bench.budget_fraction(16, total) == 0.2
    assert bench.budget_fraction(16, total, context_bytes=bench.GIB // 2) == 15.5 / 80
    assert bench.budget_fraction(100, total) == 1.0  # a card larger than the GPU: no cap
    with pytest.raises(bench.BenchError):
        bench.budget_fraction(0, total)


def test_loss_agreement_is_the_largest_difference_over_common_steps():
    assert bench.loss_max_abs_diff([6.0, 5.5, 5.0], [6.0, 5.25]) == 0.25
    assert bench.loss_max_abs_diff([6.0, 5.5, 5.0], [6.5, 5.0, 0.0], steps=1) == 0.5
    assert bench.loss_max_abs_diff([], [1.0]) is None


def test_fixed_length_rows_cut_the_stream_cyclically_into_the_vocabulary():
    assert bench.fixed_length_rows([1, 2, 3], seq_len=2, rows=3, vocab_size=10) == [[1, 2], [3, 1], [2, 3]]
    assert bench.fixed_length_rows([11, 4], seq_len=3, rows=1, vocab_size=10) == [[1, 4, 1]]
    with pytest.raises(bench.BenchError):
        bench.fixed_length_rows([], 2, 1, 10)


def test_longest_seq_climbs_the_ladder_then_bisects():
    tried = []

    def fits_up_to(limit):
        def trains(seq):
            tried.append(seq)
            return seq <= limit
        return trains

    ladder = [512, 1024, 2048, 4096, 8192]
    assert bench.longest_seq(fits_up_to(5000), ladder, bisect_steps=2, multiple=256) == 4096
    assert tried == [512, 1024, 2048, 4096, 8192, 6144, 5120]
    tried.clear()
    assert bench.longest_seq(fits_up_to(5000), ladder, bisect_steps=3, multiple=256) == 4608
    assert tried[-1] == 4608
    assert bench.longest_seq(fits_up_to(100), ladder, 2, 256) is None  # not even the first rung
    assert bench.longest_seq(fits_up_to(10**6), ladder, 2, 256) == 8192  # the whole ladder


def test_budget_search_skips_cards_smaller_than_one_that_could_not_train():
    search = bench.BudgetSearch(gib=(48.0, 24.0, 16.0), models=("m",), stacks=("hf",), seq_ladder=(512, 1024, 2048),
                                bisect_steps=0, grid_batch=(1, 2), grid_seq=(1024,))
    capacity = {48.0: 2048 * 2, 24.0: 1024, 16.0: 0}  # tokens per step each card can train
    runs = []

    def run(case):
        runs.append((case.budget_gib, case.batch_size, case.seq_len, case.search))
        fits = case.batch_size * case.seq_len <= capacity[case.budget_gib]
        return {"status": "ok" if fits else "OOM", "tokens_per_s": float(case.batch_size * case.seq_len),
                "case": dataclasses.asdict(case)}

    from rich.console import Console

    records = bench.search_budgets(search, run, Console(file=io.StringIO()))
    assert runs == [
        (48.0, 1, 512, "longest_seq"), (48.0, 1, 1024, "longest_seq"), (48.0, 1, 2048, "longest_seq"),
        (48.0, 2, 1024, "fastest"),  # batch 1 x 1024 was measured on the ladder: not run again
        (24.0, 1, 512, "longest_seq"), (24.0, 1, 1024, "longest_seq"), (24.0, 1, 2048, "longest_seq"),
        (24.0, 2, 1024, "fastest"),
        (16.0, 1, 512, "longest_seq"),  # fails: the search of 16 GiB ends there
    ]
    assert len(records) == len(runs)
    assert bench.fastest(r for r in records if r["case"]["budget_gib"] == 48.0)["tokens_per_s"] == 2048.0


# --------------------------------------------------------------------------- records and reports


def test_an_oom_case_is_a_record_with_the_memory_at_failure():
    case = Case(stack="hf", model="gpt-oss-20b-random", seq_len=4096, budget_gib=16)
    oom = bench.failure_record(case, "OOM", "CUDA out of memory", {"phase": "train", "reserved": 15.2})
    assert set(oom) == set(bench.empty_figures()) | {"case", "setting", "stack"}
    assert (oom["status"], oom["error"], oom["setting"], oom["stack"]) == (
        "OOM", "CUDA out of memory", "gpt-oss-20b-random s4096 b1 @16GiB", "hf")
    assert oom["memory_at_failure_gib"] == {"phase": "train", "reserved": 15.2}
    assert oom["tokens_per_s"] is None and oom["case"]["budget_gib"] == 16
    with pytest.raises(ValueError):
        bench.failure_record(case, "ok", "")


def test_a_dead_case_process_is_oom_a_hung_one_a_timeout(tmp_path):
    log = tmp_path / "case.log"
    log.write_text("loading\nValueError: bad rope\n")
    assert bench.classify_exit(None, log, 900)[0] == "timeout"
    assert bench.classify_exit(-9, log, 900)[0] == "OOM"  # SIGKILL: the kernel's OOM killer
    assert bench.classify_exit(1, log, 900) == ("error", "exit code 1: loading | ValueError: bad rope")
    log.write_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert bench.classify_exit(1, log, 900)[0] == "OOM"


def test_result_files_are_named_by_date_device_and_matrix():
    day = date(2026, 11, 23)
    assert bench.result_stem(day, "NVIDIA H100 80GB HBM3", "gpu") == "2026-11-23-nvidia-h100-80gb-hbm3"
    assert bench.result_stem(day, "cpu", "cpu") == "2026-11-23-cpu"
    assert bench.result_stem(day, "NVIDIA H200", "budgets") == "2026-11-23-nvidia-h200-budgets"


def test_markdown_tables_for_cpu_figures():
    counts = {"trainable": 110592}
    ours = record(stack="lowvram_ft", tokens_per_s=4388.0, median_step_s=0.0563, peak_rss_gib=0.92, load_gib=0.01,
                  trainable_parameters=counts, losses=[6.1091, 6.0902, 6.0713, 6.05], data_digest="d")
    hf = record(stack="hf", tokens_per_s=4941.0, median_step_s=0.0512, peak_rss_gib=0.91, load_gib=0.01,
                trainable_parameters=counts, losses=[6.1091, 6.0902, 6.0714], data_digest="d")
    assert bench.case_table([ours, hf], gpu=False) == [
        "| setting | stack | status | tokens/s | median step s | peak RSS | load | trainable | first losses |",
        "|---|---|---|---|---|---|---|---|---|",
        "| embedded s256 b1 | lowvram_ft | ok | 4,388 | 0.056 | 0.92 | 0.01 | 110,592 | 6.1091, 6.0902, 6.0713 |",
        "| embedded s256 b1 | hf | ok | 4,941 | 0.051 | 0.91 | 0.01 | 110,592 | 6.1091, 6.0902, 6.0714 |",
    ]
    assert bench.comparison_table([ours, hf], gpu=False)[2] == (
        "| embedded s256 b1 | 0.89x | 1.01x | yes | yes | 1.00e-04 |")
    report = bench.markdown_report([ours, hf], {"date": "2026-11-23", "device": {"kind": "cpu", "name": "cpu"},
                                                "command": "python -m lowvram_ft bench"})
    assert report.startswith("# Benchmark — 2026-11-23, cpu\n\nCPU figures (no GPU on this machine; GPU figures need a GPU)")
    assert "Command: `python -m lowvram_ft bench`" in report and "Emulated budgets" not in report


def test_markdown_marks_oom_and_budgets_as_emulated():
    ok = record(setting="gpt-oss-20b-random s1024 b1 @16GiB", stack="lowvram_ft", tokens_per_s=5000.0,
                peak_reserved_gib=11.5, mfu=0.2)
    ok["case"].update(model="gpt-oss-20b-random", budget_gib=16.0, seq_len=1024, search="longest_seq")
    oom = bench.failure_record(Case(stack="hf", model="gpt-oss-20b-random", seq_len=512, budget_gib=16.0,
                                    search="longest_seq"), "OOM", "CUDA out of memory")
    env = {"date": "2026-11-23", "device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "total_gib": 79.2},
           "command": "python -m lowvram_ft bench --config benchmarks/cases/budgets.yaml", "peak_tflops": 989.4}
    report = bench.markdown_report([ok, oom], env)
    assert "Budgets are emulated on one NVIDIA H100 80GB HBM3 (79.2 GiB)" in report
    assert "| 16 GiB | gpt-oss-20b-random | lowvram_ft | 1,024 | batch 1 x seq 1024 | 5,000 |" in report
    assert "| 16 GiB | gpt-oss-20b-random | hf | does not train | nothing fits | — |" in report


def test_a_later_run_replaces_only_the_cases_it_measured_again():
    a, b = record(setting="x", stack="hf", tokens_per_s=1.0), record(setting="y", stack="hf", tokens_per_s=2.0)
    a2, c = record(setting="x", stack="hf", tokens_per_s=3.0), record(setting="z", stack="hf", tokens_per_s=4.0)
    merged = bench.merge_records([a, b], [c, a2])
    assert [(r["setting"], r["tokens_per_s"]) for r in merged] == [("x", 3.0), ("y", 2.0), ("z", 4.0)]


def test_cpu_timings_on_a_busy_machine_are_flagged():
    env = {"device": {"kind": "cpu", "name": "cpu"}, "cpu_count": 2}
    assert bench.busy_warning([record(load_average=2.3)], env) is None  # the case's own two threads
    warning = bench.busy_warning([record(load_average=2.3), record(load_average=3.9)], env)
    assert warning.startswith("**Warning: other processes were using the CPU (1-minute load average up to 3.9 on 2")
    assert bench.busy_warning([record(load_average=9.0)], {**env, "device": {"kind": "cuda"}}) is None


def test_bad_case_values_are_named():
    case = Case(stack="hf", seq_len=0, steps=2, warmup_steps=2, dtype="fp8", budget_gib=-1)
    assert bench.case_problems(case) == [
        "seq_len: got 0; expected a positive integer",
        "warmup_steps: got 2; expected 0 to steps - 1 (some steps must be timed)",
        "dtype: got 'fp8'; expected bfloat16, float16 or float32",
        "budget_gib: got -1; expected a positive number of GiB",
    ]
    assert bench.case_problems(Case(stack="hf")) == []


def test_shipped_matrices_load_and_expand():
    for path in sorted((ROOT / "benchmarks" / "cases").glob("*.yaml")):
        bench.read_matrix(path)  # every shipped matrix validates
    cpu = bench.read_matrix(ROOT / "benchmarks/cases/cpu.yaml")
    assert cpu.device == "cpu" and [c.name for c in cpu.cases] == [
        "embedded s256 b1 lowvram_ft", "embedded s256 b1 hf", "embedded s256 b4 lowvram_ft", "embedded s256 b4 hf"]
    assert {c.dtype for c in cpu.cases} == {"float32"} and {c.optimizer for c in cpu.cases} == {"adamw_torch"}
    budgets = bench.read_matrix(ROOT / "benchmarks/cases/budgets.yaml").budgets
    assert budgets.gib == (65.0, 48.0, 40.0, 24.0, 16.0, 14.0)  # largest first


def test_matrix_problems_are_reported_together(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("device: tpu\ncases:\n  - {seq_lenn: 128, stacks: [hf, deepspeed]}\n")
    with pytest.raises(bench.BenchError) as error:
        bench.read_matrix(path)
    text = str(error.value)
    assert "device: got 'tpu'" in text and "unknown key 'seq_lenn'" in text and "unknown stack(s) ['deepspeed']" in text


def test_the_cpu_stand_in_for_trls_fused_head_computes_its_log_probs():
    import torch

    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8)
    targets = torch.tensor([0, 3, 10, 2, 2])
    log_probs, entropy, log_sum_sq, mean_logits, top1 = bench.torch_log_probs(
        hidden, weight, None, targets, 1.0, 4096, outputs=("log_probs", "entropy", "is_top1"))
    logits = hidden @ weight.T
    expected = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(log_probs, expected, atol=1e-6)
    assert torch.equal(top1, logits.argmax(-1) == targets) and log_sum_sq is None and mean_logits is None
    probs = logits.softmax(-1)
    assert torch.allclose(entropy, -(probs * probs.log()).sum(-1), atol=1e-5)
    log_probs.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_importing_bench_loads_no_heavy_library():
    code = "import sys, lowvram_ft.bench; print(sorted(m for m in ('torch', 'transformers', 'trl', 'unsloth') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- end to end


def test_both_stacks_train_the_embedded_model_on_cpu(tmp_path):
    """Two cases, each in its own process: both finish with throughput, the same trainable parameters and
    data, the hf process never imported unsloth, and the losses agree."""
    matrix = tmp_path / "pair.yaml"
    matrix.write_text("device: cpu\ndefaults: {model: embedded, dtype: float32, optimizer: adamw_torch, "
                      "steps: 4, warmup_steps: 1, timeout_s: 120}\ncases:\n  - {seq_len: 128, batch_size: 1}\n")
    path = bench.run_bench(matrix, out_dir=tmp_path / "results", log_root=tmp_path / "logs")
    assert path.name == f"{date.today().isoformat()}-cpu-pair.jsonl"
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").stat().st_size > 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_stack = {r["stack"]: r for r in lines}
    assert set(by_stack) == {"lowvram_ft", "hf"}
    for r in lines:
        assert r["status"] == "ok", r["error"]
        assert r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0 and len(r["losses"]) == 4
        assert r["environment"]["versions"]["torch"] and r["environment"]["device"]["kind"] == "cpu"
    ours, hf = by_stack["lowvram_ft"], by_stack["hf"]
    assert ours["unsloth_imported"] is True and hf["unsloth_imported"] is False
    assert ours["trainable_parameters"]["trainable"] == hf["trainable_parameters"]["trainable"] > 0
    assert ours["trainable_parameters"]["experts"] > 0  # the experts train in both stacks
    assert ours["data_digest"] == hf["data_digest"]
    assert bench.loss_max_abs_diff(ours["losses"], hf["losses"]) <= CPU_LOSS_TOLERANCE


@pytest.mark.gpu
@gpu
def test_gpu_case_reports_device_memory_and_an_emulated_budget_ooms(tmp_path):
    matrix = tmp_path / "gpu.yaml"
    matrix.write_text("device: cuda\ndefaults: {model: embedded, dtype: bfloat16, optimizer: adamw_8bit, "
                      "steps: 4, warmup_steps: 1, timeout_s: 300}\ncases:\n  - {seq_len: 256}\n"
                      "  - {seq_len: 256, budget_gib: 0.01, stacks: [hf]}\n")
    path = bench.run_bench(matrix, out_dir=tmp_path / "results", log_root=tmp_path / "logs")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    fits = [r for r in lines if r["case"]["budget_gib"] is None]
    assert {r["stack"] for r in fits} == {"lowvram_ft", "hf"}
    for r in fits:
        assert r["status"] == "ok", r["error"]
        assert 0 < r["peak_allocated_gib"] <= r["peak_reserved_gib"] and r["peak_nvml_gib"] > 0
        assert r["tokens_per_s"] > 0 and (r["mfu"] is None or r["mfu"] > 0)
    tiny = next(r for r in lines if r["case"]["budget_gib"] is not None)
    assert tiny["status"] == "OOM" and tiny["memory_at_failure_gib"]


@pytest.mark.parametrize("text, shown", [("- device: cpu\n", "a list"), ("cpu\n", "'cpu'"), ("[]\n", "a list"),
                                         ("3.5\n", "3.5")])
def test_a_matrix_whose_top_level_is_not_a_mapping_says_what_it_must_be(tmp_path, text, shown):
    path = tmp_path / "cases.yaml"
    path.write_text(text)
    with pytest.raises(bench.BenchError) as error:
        bench.read_matrix(path)
    assert str(error.value) == (f"{path}: the top level is {shown}; it must be a mapping with the keys device, "
                                "defaults, cases, budgets — see benchmarks/cases/cpu.yaml")


def test_matrix_sections_of_the_wrong_type_are_named(tmp_path):
    path = tmp_path / "cases.yaml"
    path.write_text("defaults: [1]\ncases: [seq_len]\n")
    with pytest.raises(bench.BenchError) as error:
        bench.read_matrix(path)
    assert str(error.value).splitlines() == [f"{path}: defaults: must be a mapping", f"{path}: cases[1]: must be a mapping",
                                             f"{path}: no cases and no budgets — nothing to run"]
    path.write_text("cases: 5\n")
    with pytest.raises(bench.BenchError, match=r"cases: must be a list of mappings"):
        bench.read_matrix(path)
    path.write_text("cases: [\n")
    with pytest.raises(bench.BenchError, match=rf"^{re.escape(str(path))}:\d+: invalid YAML \("):
        bench.read_matrix(path)
