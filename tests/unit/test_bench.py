"""The benchmark harness: pure measurement maths with exact values, the result files, the matrices and
the routes to models, without loading one. On the embedded model: e2e/test_bench.py (CPU) and
gpu/test_bench.py."""
from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from conftest import ROOT
from lowvram_ft.bench import baselines, dataset, matrix, metrics, models, processes, report, supervisor, worker
from lowvram_ft.bench.matrix import CASES_DIR, Case
from lowvram_ft.io import GIB
from lowvram_ft.memory import FIELDS


def record(setting="embedded s256 b1", stack="lowvram_ft", **figures) -> dict:
    case = Case(stack=stack, model="embedded", seq_len=256)
    out = metrics.empty_figures()
    out.update(case=dataclasses.asdict(case), setting=setting, stack=stack, **{"status": "ok", **figures})
    return out


# --------------------------------------------------------------------------- timing and throughput


def test_tokens_per_second_is_tokens_per_step_over_the_median_step_after_warmup():
    times = [5.0, 1.0, 2.0, 1.0, 10.0]  # 5.0: warm-up (compilation); 10.0: a stray pause
    assert metrics.median_step_s(times, warmup_steps=1) == 1.5
    assert metrics.tokens_per_second(times, tokens_per_step=300, warmup_steps=1) == 200.0
    assert metrics.tokens_per_second(times, tokens_per_step=300, warmup_steps=0) == 150.0  # median 2.0
    assert metrics.tokens_per_second(times, 300, warmup_steps=5) is None  # nothing left to time


def test_training_flops_count_six_n_plus_the_attention_term():
    layers = [(2, 4, None), (2, 4, 4)]  # one full-attention layer, one sliding window of 4
    # 6 * 1000 + 12 * 2 * 4 * 8 (full: T = 8) + 12 * 2 * 4 * 4 (sliding: T = window)
    assert metrics.training_flops_per_token(1000, seq_len=8, layers=layers) == 6000 + 768 + 384
    assert metrics.training_flops_per_token(1000, seq_len=2, layers=layers) == 6000 + 192 + 192


def test_flops_of_the_gpt_oss_20b_shape_from_its_config():
    config = json.loads((ROOT / "lowvram_ft/assets/model_configs/gpt-oss-20b.json").read_text())
    layers = metrics.attention_layers(config)
    assert len(layers) == 24 and layers[0] == (64, 64, 128) and layers[1] == (64, 64, None)
    assert metrics.active_parameters(config) == 3_608_307_264  # OpenAI's "3.6B active"
    # 6 x 3,608,307,264 + 12 x 64 x 64 x (12 x 1024 + 12 x 128)
    assert metrics.training_flops_per_token(3_608_307_264, 1024, layers) == 21_649_843_584 + 679_477_248


def test_mfu_against_the_peak_of_the_named_gpu():
    assert metrics.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert metrics.peak_bf16_flops("NVIDIA H100 PCIe") == 756.0e12
    assert metrics.peak_bf16_flops("NVIDIA H200") == 989.4e12
    assert metrics.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312.0e12
    assert metrics.peak_bf16_flops("NVIDIA L40S") == 362.05e12
    assert metrics.peak_bf16_flops("NVIDIA L4") == 121.0e12
    assert metrics.peak_bf16_flops("Tesla T4") is None and metrics.peak_bf16_flops("cpu") is None
    mfu = metrics.model_flops_utilization(10_000, 22_329_320_832, 989.4e12)
    assert mfu == pytest.approx(0.225685, abs=1e-6)
    assert metrics.model_flops_utilization(None, 1, 1.0) is None
    assert metrics.model_flops_utilization(10.0, 1, None) is None


def test_budgets_are_emulated_like_the_trainers_card_and_take_the_cuda_context_off():
    from lowvram_ft import device

    assert worker.emulated_card_fraction is device.emulated_card_fraction  # one computation, not two
    total = 80 * GIB
    assert worker.emulated_card_fraction(16, total) == 0.2
    assert worker.emulated_card_fraction(16, total, context_bytes=GIB // 2) == 15.5 / 80
    assert worker.emulated_card_fraction(100, total) == 1.0  # a card larger than the GPU: no cap
    # A bad budget never reaches it: the matrix is refused first (test_bad_case_values_are_named).
    assert matrix.case_problems(Case(stack="hf", budget_gib=0)) == ["budget_gib: got 0; expected a positive number of GiB"]


def test_loss_agreement_is_the_largest_difference_over_common_steps():
    assert metrics.loss_max_abs_diff([6.0, 5.5, 5.0], [6.0, 5.25]) == 0.25
    assert metrics.loss_max_abs_diff([6.0, 5.5, 5.0], [6.5, 5.0, 0.0], steps=1) == 0.5
    assert metrics.loss_max_abs_diff([], [1.0]) is None


def test_fixed_length_rows_cut_the_stream_cyclically_into_the_vocabulary():
    assert dataset.fixed_length_rows([1, 2, 3], seq_len=2, rows=3, vocab_size=10) == [[1, 2], [3, 1], [2, 3]]
    assert dataset.fixed_length_rows([11, 4], seq_len=3, rows=1, vocab_size=10) == [[1, 4, 1]]
    with pytest.raises(matrix.BenchError):
        dataset.fixed_length_rows([], 2, 1, 10)


def test_longest_seq_climbs_the_ladder_then_bisects():
    tried = []

    def fits_up_to(limit):
        def trains(seq):
            tried.append(seq)
            return seq <= limit
        return trains

    ladder = [512, 1024, 2048, 4096, 8192]
    assert metrics.longest_seq(fits_up_to(5000), ladder, bisect_steps=2, multiple=256) == 4096
    assert tried == [512, 1024, 2048, 4096, 8192, 6144, 5120]
    tried.clear()
    assert metrics.longest_seq(fits_up_to(5000), ladder, bisect_steps=3, multiple=256) == 4608
    assert tried[-1] == 4608
    assert metrics.longest_seq(fits_up_to(100), ladder, 2, 256) is None  # not even the first rung
    assert metrics.longest_seq(fits_up_to(10**6), ladder, 2, 256) == 8192  # the whole ladder


def test_budget_search_skips_cards_smaller_than_one_that_could_not_train():
    search = matrix.BudgetSearch(gib=(48.0, 24.0, 16.0), models=("m",), stacks=("hf",), seq_ladder=(512, 1024, 2048),
                                bisect_steps=0, grid_batch=(1, 2), grid_seq=(1024,))
    capacity = {48.0: 2048 * 2, 24.0: 1024, 16.0: 0}  # tokens per step each card can train
    runs = []

    def run(case):
        runs.append((case.budget_gib, case.batch_size, case.seq_len, case.search))
        fits = case.batch_size * case.seq_len <= capacity[case.budget_gib]
        return {"status": "ok" if fits else "OOM", "tokens_per_s": float(case.batch_size * case.seq_len),
                "case": dataclasses.asdict(case)}

    from rich.console import Console

    records = supervisor.search_budgets(search, run, Console(file=io.StringIO()))
    assert runs == [
        (48.0, 1, 512, "longest_seq"), (48.0, 1, 1024, "longest_seq"), (48.0, 1, 2048, "longest_seq"),
        (48.0, 2, 1024, "fastest"),  # batch 1 x 1024 was measured on the ladder: not run again
        (24.0, 1, 512, "longest_seq"), (24.0, 1, 1024, "longest_seq"), (24.0, 1, 2048, "longest_seq"),
        (24.0, 2, 1024, "fastest"),
        (16.0, 1, 512, "longest_seq"),  # fails: the search of 16 GiB ends there
    ]
    assert len(records) == len(runs)
    assert metrics.fastest(r for r in records if r["case"]["budget_gib"] == 48.0)["tokens_per_s"] == 2048.0


# --------------------------------------------------------------------------- records and reports


def test_an_oom_case_is_a_record_with_the_memory_at_failure():
    case = Case(stack="hf", model="gpt-oss-20b-random", seq_len=4096, budget_gib=16)
    oom = metrics.failure_record(case, "OOM", "CUDA out of memory", {"phase": "train", "reserved": 15.2})
    assert set(oom) == set(metrics.empty_figures()) | {"case", "setting", "stack"}
    assert (oom["status"], oom["error"], oom["setting"], oom["stack"]) == (
        "OOM", "CUDA out of memory", "gpt-oss-20b-random s4096 b1 @16GiB", "hf")
    assert oom["memory_at_failure_gib"] == {"phase": "train", "reserved": 15.2}
    assert oom["tokens_per_s"] is None and oom["case"]["budget_gib"] == 16
    with pytest.raises(ValueError):
        metrics.failure_record(case, "ok", "")


def test_a_dead_case_process_is_oom_a_hung_one_a_timeout(tmp_path):
    log = tmp_path / "case.log"
    log.write_text("loading\nValueError: bad rope\n")
    assert processes.classify_exit(None, log, 900)[0] == "timeout"
    assert processes.classify_exit(-9, log, 900)[0] == "OOM"  # SIGKILL: the kernel's OOM killer
    assert processes.classify_exit(1, log, 900) == ("error", "exit code 1: loading | ValueError: bad rope")
    log.write_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert processes.classify_exit(1, log, 900)[0] == "OOM"


def test_result_files_are_named_by_date_device_and_matrix():
    day = date(2026, 11, 23)
    assert report.result_stem(day, "NVIDIA H100 80GB HBM3", "gpu") == "2026-11-23-nvidia-h100-80gb-hbm3"
    assert report.result_stem(day, "cpu", "cpu") == "2026-11-23-cpu"
    assert report.result_stem(day, "NVIDIA H200", "budgets") == "2026-11-23-nvidia-h200-budgets"


def test_markdown_tables_for_cpu_figures():
    counts = {"trainable": 110592}
    ours = record(stack="lowvram_ft", tokens_per_s=4388.0, median_step_s=0.0563, peak_rss_gib=0.92, load_gib=0.01,
                  trainable_parameters=counts, losses=[6.1091, 6.0902, 6.0713, 6.05], data_digest="d")
    hf = record(stack="hf", tokens_per_s=4941.0, median_step_s=0.0512, peak_rss_gib=0.91, load_gib=0.01,
                trainable_parameters=counts, losses=[6.1091, 6.0902, 6.0714], data_digest="d")
    assert report.case_table([ours, hf], gpu=False) == [
        "| setting | stack | status | tokens/s | median step s | peak RSS | load | trainable | first losses |",
        "|---|---|---|---|---|---|---|---|---|",
        "| embedded s256 b1 | lowvram_ft | ok | 4,388 | 0.056 | 0.92 | 0.01 | 110,592 | 6.1091, 6.0902, 6.0713 |",
        "| embedded s256 b1 | hf | ok | 4,941 | 0.051 | 0.91 | 0.01 | 110,592 | 6.1091, 6.0902, 6.0714 |",
    ]
    assert report.comparison_table([ours, hf], gpu=False)[2] == (
        "| embedded s256 b1 | 0.89x | 1.01x | yes | yes | 1.00e-04 |")
    markdown = report.markdown_report([ours, hf], {"date": "2026-11-23", "device": {"kind": "cpu", "name": "cpu"},
                                                "command": "python -m lowvram_ft bench"})
    assert markdown.startswith("# Benchmark — 2026-11-23, cpu\n\nCPU figures (no GPU on this machine; GPU figures need a GPU)")
    assert "Command: `python -m lowvram_ft bench`" in markdown and "Emulated budgets" not in markdown


def test_html_page_holds_the_markdown_tables_and_the_charts(tmp_path):
    counts = {"trainable": 110592}
    ours = record(stack="lowvram_ft", tokens_per_s=4388.0, median_step_s=0.0563, peak_rss_gib=0.92, load_gib=0.01,
                  trainable_parameters=counts, losses=[6.1091], data_digest="d")
    hf = record(stack="hf", status="OOM", error="<b>killed</b>", tokens_per_s=None, trainable_parameters=counts)
    env = {"date": "2026-11-23", "device": {"kind": "cpu", "name": "cpu"}, "command": "python -m lowvram_ft bench"}
    report.write_results([ours, hf], env, tmp_path, "2026-11-23-cpu")
    html = (tmp_path / "2026-11-23-cpu.html").read_text(encoding="utf-8")
    assert "<title>Benchmark — 2026-11-23, cpu</title>" in html
    assert "<td>embedded s256 b1</td><td>lowvram_ft</td><td>ok</td><td>4,388</td>" in html
    assert "<td><strong>OOM</strong></td>" in html and "&lt;b&gt;killed&lt;/b&gt;" in html and "<b>" not in html
    assert html.count("<svg") == 2 and "tokens/s (trained tokens)" in html
    assert "<code>python -m lowvram_ft bench</code>" in html and html.count("<script") == 1


def test_markdown_marks_oom_and_budgets_as_emulated():
    ok = record(setting="gpt-oss-20b-random s1024 b1 @16GiB", stack="lowvram_ft", tokens_per_s=5000.0,
                peak_reserved_gib=11.5, mfu=0.2)
    ok["case"].update(model="gpt-oss-20b-random", budget_gib=16.0, seq_len=1024, search="longest_seq")
    oom = metrics.failure_record(Case(stack="hf", model="gpt-oss-20b-random", seq_len=512, budget_gib=16.0,
                                    search="longest_seq"), "OOM", "CUDA out of memory")
    env = {"date": "2026-11-23", "device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "total_gib": 79.2},
           "command": "python -m lowvram_ft bench --config lowvram_ft/bench/cases/budgets.yaml", "peak_tflops": 989.4}
    markdown = report.markdown_report([ok, oom], env)
    assert "Budgets are emulated on one NVIDIA H100 80GB HBM3 (79.2 GiB)" in markdown
    assert ("Unsloth sizes its loss chunks (and offload buffers) from torch.cuda.mem_get_info, which a "
            "per-process memory cap does not change") in markdown
    assert "| 16 GiB | gpt-oss-20b-random | lowvram_ft | 1,024 | batch 1 x seq 1024 | 5,000 |" in markdown
    assert "| 16 GiB | gpt-oss-20b-random | hf | does not train | nothing fits | — |" in markdown


def test_memory_figures_are_read_from_the_train_phase_and_from_older_lines():
    row = record(memory={"load": dict.fromkeys(FIELDS, 1.0), "train": {**dict.fromkeys(FIELDS), "peak_reserved_gib": 11.5}})
    assert metrics.train_memory(row, "peak_reserved_gib") == 11.5 and metrics.train_memory(row, "peak_rss_gib") is None
    old = {"peak_reserved_gib": 30.5, "peak_nvml_gib": 31.25, "peak_rss_gib": 2.0}  # lines written before the blocks
    assert [metrics.train_memory(old, f) for f in FIELDS] == [None, 30.5, 31.25, 2.0]


def test_an_invalid_case_is_left_out_of_every_figure_with_its_reason():
    counts = {"trainable": 110592}
    ours = record(setting="s", stack="lowvram_ft", status="invalid", error="asked for 4-bit weights, but 48 of 48 "
                  "expert weights loaded unquantized", load_gib=39.0, trainable_parameters=counts)
    hf = record(setting="s", stack="hf", tokens_per_s=900.0, trainable_parameters=counts,
                memory={"load": dict.fromkeys(FIELDS), "train": {**dict.fromkeys(FIELDS), "peak_reserved_gib": 50.0}})
    assert report.case_table([ours], gpu=True)[2] == "| s | lowvram_ft | **invalid** | — | — | — | — | — | — | — | — | — |"
    assert report.comparison_table([ours, hf], gpu=True)[2:] == []  # no ratio against an invalid case
    assert report.chart_value(ours, "tokens_per_s") == 0.0 and report.chart_value(hf, "peak_reserved_gib") == 50.0
    env = {"date": "2026-11-23", "device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3"}, "command": "c"}
    markdown = report.markdown_report([ours, hf], env)
    assert ("| s | lowvram_ft | invalid | asked for 4-bit weights, but 48 of 48 expert weights loaded unquantized |"
            in markdown.split("## Not measured")[1])


def test_a_later_run_replaces_only_the_cases_it_measured_again():
    a, b = record(setting="x", stack="hf", tokens_per_s=1.0), record(setting="y", stack="hf", tokens_per_s=2.0)
    a2, c = record(setting="x", stack="hf", tokens_per_s=3.0), record(setting="z", stack="hf", tokens_per_s=4.0)
    merged = report.merge_records([a, b], [c, a2])
    assert [(r["setting"], r["tokens_per_s"]) for r in merged] == [("x", 3.0), ("y", 2.0), ("z", 4.0)]


def test_cpu_timings_on_a_busy_machine_are_flagged():
    env = {"device": {"kind": "cpu", "name": "cpu"}, "cpu_count": 2}
    assert report.busy_warning([record(load_average=2.3)], env) is None  # the case's own two threads
    warning = report.busy_warning([record(load_average=2.3), record(load_average=3.9)], env)
    assert warning.startswith("**Warning: other processes were using the CPU (1-minute load average up to 3.9 on 2")
    assert report.busy_warning([record(load_average=9.0)], {**env, "device": {"kind": "cuda"}}) is None


# --------------------------------------------------------------------------- what loaded, what ran


def test_the_attention_that_ran_is_unsloths_flex_forward_or_the_configs():
    unsloth = {"implementation": "eager", "forward": "unsloth_zoo.temporary_patches.gpt_oss.forward",
               "unsloth_flex_attention": True}
    assert metrics.attention_summary(unsloth) == "flex_attention_with_sink (Unsloth)"
    assert metrics.attention_summary({**unsloth, "forward": "transformers.models.gpt_oss.modeling_gpt_oss."
                                    "GptOssAttention.forward"}) == "eager"


def test_both_stacks_get_the_same_allocator_setting_before_torch_is_imported():
    assert metrics.allocator_setting({}, (2, 14)) == {"variable": "PYTORCH_ALLOC_CONF", "value": "expandable_segments:True",
                                                    "source": "bench"}
    assert metrics.allocator_setting({}, (2, 9))["variable"] == "PYTORCH_CUDA_ALLOC_CONF"  # torch < 2.10 reads that one
    environ = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    setting = metrics.allocator_setting(environ, (2, 14))
    assert setting == {"variable": "PYTORCH_ALLOC_CONF", "value": "max_split_size_mb:128", "source": "user"}
    metrics.apply_allocator_setting(setting, environ)
    assert environ == {"PYTORCH_ALLOC_CONF": "max_split_size_mb:128"}  # the deprecated name is gone in both stacks


def test_bad_case_values_are_named():
    case = Case(stack="hf", seq_len=0, steps=2, warmup_steps=2, dtype="fp8", budget_gib=-1)
    assert matrix.case_problems(case) == [
        "seq_len: got 0; expected a positive integer",
        "warmup_steps: got 2; expected 0 to steps - 1 (some steps must be timed)",
        "dtype: got 'fp8'; expected bfloat16, float16 or float32",
        "budget_gib: got -1; expected a positive number of GiB",
    ]
    assert matrix.case_problems(Case(stack="hf")) == []


def test_shipped_matrices_load_and_expand():
    # package data: the defaults sit next to the code, so an installed `bench` finds them too
    assert CASES_DIR == Path(matrix.__file__).resolve().parent / "cases"
    assert all(path.is_file() and path.parent == CASES_DIR for path in matrix.DEFAULT_MATRIX.values())
    for path in sorted(CASES_DIR.glob("*.yaml")):
        matrix.read_matrix(path)  # every shipped matrix validates
    cpu = matrix.read_matrix(CASES_DIR / "cpu.yaml")
    assert cpu.device == "cpu" and [c.name for c in cpu.cases] == [
        "embedded s256 b1 lowvram_ft", "embedded s256 b1 hf", "embedded s256 b4 lowvram_ft", "embedded s256 b4 hf"]
    assert {c.dtype for c in cpu.cases} == {"float32"} and {c.optimizer for c in cpu.cases} == {"adamw_torch"}
    budgets = matrix.read_matrix(CASES_DIR / "budgets.yaml").budgets
    assert budgets.gib == (65.0, 48.0, 40.0, 24.0, 16.0, 14.0)  # largest first


def test_gpu_check_matrix_compares_both_stacks_then_searches_16_gib_for_ours():
    gpu_check = matrix.read_matrix(CASES_DIR / "gpu-check.yaml")
    assert gpu_check.device == "cuda" and [c.name for c in gpu_check.cases] == [
        "gpt-oss-20b-random s1024 b1 lowvram_ft", "gpt-oss-20b-random s1024 b1 hf",
        "gpt-oss-20b-random s2048 b1 lowvram_ft", "gpt-oss-20b-random s2048 b1 hf"]
    for case in gpu_check.cases:
        assert (case.lora_r, case.lora_alpha, case.steps, case.warmup_steps) == (8, 16, 6, 2)
        assert {"q_proj", "o_proj", "gate_proj", "down_proj"} <= set(case.lora_targets)  # attention + experts
    search = gpu_check.budgets
    assert (search.gib, search.models, search.stacks) == ((16.0,), ("gpt-oss-20b-random",), ("lowvram_ft",))
    assert search.seq_ladder == (4096, 8192, 16384, 32768) and search.bisect_steps == 0
    assert search.grid_batch == () and search.grid_seq == ()  # the longest sequence only: few probes


def test_random_gpt_oss_routes_ours_to_the_split_checkpoint_and_hf_to_memory(tmp_path, monkeypatch):
    """Without building or running anything: lowvram_ft loads the split bnb-4bit folder (its own cache
    name, never an old fused one), hf needs no folder; a CPU machine gets an error, not a 40 GB build."""
    from rich.console import Console

    monkeypatch.setenv("LOWVRAM_FT_CACHE", str(tmp_path))
    ours, hf = matrix.read_matrix(CASES_DIR / "gpu-check.yaml").cases[:2]
    assert (matrix.model_route(ours), matrix.model_route(hf)) == ("split-bnb4", "in-memory")
    assert matrix.model_route(Case(stack="hf", model="dense-8b-random")) == "bf16"  # QLoRA quantizes on load
    assert matrix.model_route(Case(stack="hf", model="embedded")) == "folder"
    folder = models.random_checkpoint_dir(ours.model, "split-bnb4")
    assert folder == tmp_path / "bench-models" / "random-gpt-oss-20b-split-bnb4"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # as if built earlier: reused, nothing is built
    store = models.ModelStore({"kind": "cuda", "name": "GPU"}, tmp_path, Console(file=io.StringIO()))
    assert store.path_for(ours) == str(folder) and store.path_for(hf) == ""
    assert store.built == [] and matrix.case_config(hf)["num_local_experts"] == 32  # hf's figures need no folder
    cpu_store = models.ModelStore({"kind": "cpu", "name": "cpu"}, tmp_path, Console(file=io.StringIO()))
    with pytest.raises(matrix.BenchError, match="built on the GPU"):
        cpu_store.path_for(hf)


def test_matrix_problems_are_reported_together(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("device: tpu\ncases:\n  - {seq_lenn: 128, stacks: [hf, deepspeed]}\n")
    with pytest.raises(matrix.BenchError) as error:
        matrix.read_matrix(path)
    text = str(error.value)
    assert "device: got 'tpu'" in text and "unknown key 'seq_lenn'" in text and "unknown stack(s) ['deepspeed']" in text


def test_the_hf_stacks_cpu_loss_is_trls_sft_loss_in_plain_torch():
    """TRL's fused LM head is a Triton kernel, so on a CPU the hf stack's trainer computes the same loss in
    plain torch: -sum log p(next label) over labelled positions / num_items_in_batch (else their count)."""
    import torch

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 4, -100, 7, 2], [-100, 3, 3, 10, -100]])
    next_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), next_labels.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    assert int((next_labels != -100).sum()) == 6
    loss = baselines.next_token_nll(logits, labels)
    assert torch.allclose(loss, nll.float() / 6, atol=1e-6)
    assert torch.allclose(baselines.next_token_nll(logits, labels, num_items_in_batch=12), nll.float() / 12, atol=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_importing_bench_loads_no_heavy_library():
    code = "import sys, lowvram_ft.bench; print(sorted(m for m in ('torch', 'transformers', 'trl', 'unsloth') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- malformed matrices


@pytest.mark.parametrize("text, shown", [("- device: cpu\n", "a list"), ("cpu\n", "'cpu'"), ("[]\n", "a list"),
                                         ("3.5\n", "3.5")])
def test_a_matrix_whose_top_level_is_not_a_mapping_says_what_it_must_be(tmp_path, text, shown):
    path = tmp_path / "cases.yaml"
    path.write_text(text)
    with pytest.raises(matrix.BenchError) as error:
        matrix.read_matrix(path)
    assert str(error.value) == (f"{path}: the top level is {shown}; it must be a mapping with the keys device, "
                                f"defaults, cases, budgets — see {CASES_DIR / 'cpu.yaml'}")


def test_matrix_sections_of_the_wrong_type_are_named(tmp_path):
    path = tmp_path / "cases.yaml"
    path.write_text("defaults: [1]\ncases: [seq_len]\n")
    with pytest.raises(matrix.BenchError) as error:
        matrix.read_matrix(path)
    assert str(error.value).splitlines() == [f"{path}: defaults: must be a mapping", f"{path}: cases[1]: must be a mapping",
                                             f"{path}: no cases and no budgets — nothing to run"]
    path.write_text("cases: 5\n")
    with pytest.raises(matrix.BenchError, match=r"cases: must be a list of mappings"):
        matrix.read_matrix(path)
    path.write_text("cases: [\n")
    with pytest.raises(matrix.BenchError, match=rf"^{re.escape(str(path))}:\d+: invalid YAML \("):
        matrix.read_matrix(path)
