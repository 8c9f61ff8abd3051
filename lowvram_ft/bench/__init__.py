"""`make bench`: measured memory and throughput of our trainer against the plain Hugging Face stack.

The story: `run_bench(matrix)` (supervisor.py) reads a case matrix (matrix.py; the shipped ones are in
lowvram_ft/bench/cases/), probes the device, and runs every case in its own process
(`python -m lowvram_ft.bench --case FILE --result FILE`, worker.py) with a timeout, so an out-of-memory
case, a crash or a hang is one `OOM` / `error` / `timeout` line and never stops the suite. Budget
searches (emulated 14-65 GiB cards) are sequences of such cases. The results go to
benchmarks/results/<date>-<device>.jsonl (one line per case, with the environment), a Markdown table
and a PNG chart (report.py). benchmarks/README.md is the protocol; this docstring is the short version.

Two stacks, same model shape, data (dataset.py), sequence length, batch, LoRA targets, optimizer,
learning rate and steps:
- `lowvram_ft`: lowvram_ft.model / lowvram_ft.train (Unsloth imported first, our defaults: 4-bit on
  GPU, Unsloth's offloaded gradient checkpointing). A random gpt-oss is a checkpoint in the split
  bnb-4bit layout of unsloth/gpt-oss-20b-unsloth-bnb-4bit, the one users of unsloth/gpt-oss-20b load
  (models.py).
- `hf`: transformers + peft + TRL's SFTTrainer with no Unsloth in the process (checked), set up like
  the Hugging Face / OpenAI gpt-oss recipe (baselines.py).
Both case processes run with the same caching-allocator setting (metrics.allocator_setting).

Measured per case, between device syncs with warm-up steps excluded: step times, tokens/s (trained,
non-padding tokens: every row is exactly seq_len tokens), memory.py's FIELDS for a "load" and a "train"
phase, MFU (formula in metrics.py), the losses, the trainable parameter count, what was loaded (a 4-bit
case whose experts are not 4-bit is "invalid"), and what ran: the attention implementation and the MoE
experts' path (inspection.py).

Layers, each importing only those above it: matrix -> metrics -> report, processes, dataset,
inspection -> models -> baselines -> worker, supervisor -> cli. None imports torch at module level.
"""
from ..io import GIB
from ..device import emulated_card_fraction
from .baselines import add_hf_lora, load_hf, next_token_nll
from .cli import add_bench_arguments, main
from .dataset import benchmark_dataset, fixed_length_rows
from .inspection import PerExpertCalls, adapter_dtypes, moe_path
from .matrix import (CASES_DIR, DEFAULT_MATRIX, RANDOM_MODELS, STACKS, BenchError, BudgetSearch, Case, Matrix,
                     case_config, case_problems, model_route, random_model_config, read_matrix)
from .metrics import (STATUSES, active_parameters, allocator_setting, apply_allocator_setting, attention_layers,
                      attention_summary, classify_loaded, empty_figures, failure_record, fastest, longest_seq,
                      loss_max_abs_diff, median_step_s, model_flops_utilization, moe_path_summary, peak_bf16_flops,
                      tokens_per_second, train_memory, training_flops_per_token)
from .models import ModelStore, build_in_memory, random_checkpoint_dir
from .processes import classify_exit
from .report import busy_warning, case_table, chart_value, comparison_table, markdown_report, merge_records, result_stem
from .supervisor import run_bench, search_budgets

__all__ = [
    "GIB", "emulated_card_fraction", "add_hf_lora", "load_hf", "next_token_nll", "add_bench_arguments", "main",
    "benchmark_dataset", "fixed_length_rows", "PerExpertCalls", "adapter_dtypes", "moe_path", "CASES_DIR",
    "DEFAULT_MATRIX", "RANDOM_MODELS", "STACKS", "BenchError", "BudgetSearch", "Case", "Matrix", "case_config",
    "case_problems", "model_route", "random_model_config", "read_matrix", "STATUSES", "active_parameters",
    "allocator_setting", "apply_allocator_setting", "attention_layers", "attention_summary", "classify_loaded",
    "empty_figures", "failure_record", "fastest", "longest_seq", "loss_max_abs_diff", "median_step_s",
    "model_flops_utilization", "moe_path_summary", "peak_bf16_flops", "tokens_per_second", "train_memory",
    "training_flops_per_token", "ModelStore", "build_in_memory", "random_checkpoint_dir", "classify_exit",
    "busy_warning", "case_table", "chart_value", "comparison_table", "markdown_report", "merge_records",
    "result_stem", "run_bench", "search_budgets",
]
