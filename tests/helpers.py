"""Helpers shared by two tiers' test files (unit/ and e2e/), one section per pair of files. Paths, the child
processes' environment and fixtures are in conftest.py."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import DATA, ENV, ROOT
from lowvram_ft import data
from lowvram_ft.config import load_config
from lowvram_ft.conversation import Conversation
from lowvram_ft.harmony import HarmonyOptions, render_prompt

# ------------------------------------------------------- the command line (test_bad_inputs_cli, test_errors)


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowvram_ft", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300, **kwargs)


def cli_here(*args: str) -> subprocess.CompletedProcess:
    """The command line run in this process, for cases that stop before any model is loaded: the same exit
    code and output as `cli`, without a Python start-up and our imports per case (about 0.25 s of CPU).
    A case that imports Unsloth (it would load a model) fails here: run it with `cli`."""
    from lowvram_ft.cli import main

    had_unsloth = "unsloth" in sys.modules
    out, err, cwd = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(ROOT)  # relative paths in the cases (configs/...) are the repository's, as with cli's cwd
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as stop:  # argparse's usage errors
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        os.chdir(cwd)
    assert had_unsloth or "unsloth" not in sys.modules, f"{args} loads a model: run it as a child process (cli)"
    return subprocess.CompletedProcess(["lowvram_ft", *args], code, out.getvalue(), err.getvalue())


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The `error:` lines; also checks the failure is clean: exit 2, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines, proc.stderr[-2000:]
    return lines


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a clean failure: exit 2, no traceback."""
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


# --------------------------------------------------------------------------- train on bad input (test_errors)

QUICK = ["--config", "configs/embedded.yaml", "train.max_steps=2", "eval.enabled=false"]


def train_here(tmp_path: Path, *args: str, output: Path | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    """`train` on bad input in this process (cli_here): for cases that stop before the model is loaded."""
    out = output or tmp_path / "out"
    return cli_here("train", "--output", str(out), *args), out


def train(tmp_path: Path, *args: str, output: Path | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    out = output or tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lowvram_ft", "train", "--output", str(out), *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return proc, out


# --------------------------------------------------------------------- result files (test_gpucheck, test_pipeline)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------- gpt-oss checkpoints (test_gptoss_checkpoint)

REAL_20B = json.loads((ROOT / "lowvram_ft" / "assets" / "model_configs" / "gpt-oss-20b.json").read_text())
TINY_SHAPE = dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], num_local_experts=4,
                  num_experts_per_tok=2, experts_per_token=2, hidden_size=64, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)  # the 20b ids are past this vocabulary
TINY = {**REAL_20B, **TINY_SHAPE}  # conftest's tiny_checkpoint is built from it


# --------------------------------------------------------------------------- datasets and tokenizers (test_data)

DATASETS = DATA / "datasets"
MT = DATASETS / "multilingual_thinking.jsonl"


def build_tokenizer(specials: list[str], template: str | None, eos: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The user asks what 2 + 3 is. The answer is five.", "Reasoning: medium analysis final"]
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=specials[0],
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = template
    return tokenizer


def config(tmp_path, *datasets, **data_keys):
    data_keys.setdefault("cache_dir", str(tmp_path / "cache"))
    max_len = data_keys.pop("max_seq_length", 2048)
    return load_config(overrides={"data": {"dataset": [str(d) for d in datasets], **data_keys},
                                  "model": {"max_seq_length": max_len}})


def by_row(loaded) -> dict[int, object]:
    return {int(e.where.rsplit(":", 1)[1]): e.item for e in loaded.train + loaded.heldout}


def trained_text(tokenizer, ids, labels) -> list[str]:
    return [tokenizer.decode(run) for trained, run in data.runs(ids, labels) if trained]


# ShareGPT rows in the spellings Unsloth's standardize_sharegpt accepts: role aliases in any case, with
# spaces around them, and `conversations` holding role/content instead of from/value.
SHAREGPT_ROWS = [
    [{"conversations": [{"from": "system", "value": "You are kind."}, {"from": "human", "value": "Hello"},
                        {"from": "gpt", "value": "Hi there!"}]},
     {"conversations": [{"from": "Human", "value": "Thanks"}, {"from": "GPT", "value": "You're welcome."}]},
     {"conversations": [{"from": " user ", "value": "  spaced  "}, {"from": "Assistant", "value": "ok\n"},
                        {"from": "input", "value": "more"}, {"from": "output", "value": "done"}]},
     {"conversations": [{"from": "SYSTEM", "value": "Be brief."}, {"from": "human", "value": "Q1"},
                        {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
                        {"from": "gpt", "value": "A2"}]}],
    [{"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}],
]
SHAREGPT_STANDARD = [
    [[("system", "You are kind."), ("user", "Hello"), ("assistant", "Hi there!")],
     [("user", "Thanks"), ("assistant", "You're welcome.")],
     [("user", "  spaced  "), ("assistant", "ok\n"), ("user", "more"), ("assistant", "done")],
     [("system", "Be brief."), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]],
    [[("user", "Hi"), ("assistant", "Hello")]],
]


def our_sharegpt(rows: list[dict]) -> list[list[tuple[str, str]]]:
    """Role/content of each row as our sharegpt shape normalises it."""
    from lowvram_ft.data.rows import parse_row

    out = []
    for row in rows:
        conversation, issues = parse_row(row, "sharegpt")
        assert not issues, issues
        out.append([(m.role, m.content) for m in conversation.messages])
    return out


def tokenize(tmp_path, tokenizer, *datasets, **keys):
    cfg = config(tmp_path, *datasets, **keys)
    loaded = data.load_data(cfg)
    return loaded, data.tokenize_data(loaded.train, tokenizer, cfg)


def rows_by_where(loaded, tokenized) -> dict[str, dict]:
    return {loaded.train[i].where: tokenized.dataset[n] for n, i in enumerate(tokenized.kept)}


# ------------------------------------------------------------------------------- chat prompts (test_chat)

DATE = "2025-08-05"


def harmony(messages, effort="medium", language=None) -> str:
    """The harmony prompt of `messages` as chat renders it, dated DATE."""
    return render_prompt(Conversation(tuple(messages), reasoning_language=language, reasoning_effort=effort),
                         HarmonyOptions(date=DATE))


# ------------------------------------------------------------------------------ checkpoints (test_resume)


def steps_of(run_dir: Path) -> list[int]:
    """The steps of the run's complete checkpoints, oldest first."""
    from lowvram_ft.train import checkpoints

    return [c.step for c in checkpoints.list_checkpoints(run_dir)[0]]


# --------------------------------------------------------------- the embedded Qwen3 (test_qwen3_embedded)

QWEN3_CONFIG = "configs/embedded-qwen3.yaml"  # conftest's qwen3_tokenizer is the tokenizer of its model


# ------------------------------------------------------- exports reloaded (e2e/test_real_model, e2e/test_qwen3_embedded)

RELOAD_EXPORTS = """
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
lora, merged, run = sys.argv[1:4]
summary = json.load(open(run + "/summary.json"))
base = json.load(open(lora + "/adapter_config.json"))["base_model_name_or_path"]
probe = summary["reload_probe"]
ids = AutoTokenizer.from_pretrained(lora)(probe["text"], add_special_tokens=False, return_tensors="pt")["input_ids"]
models = {"lora": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, summary["dtype"])), lora),
          "merged": AutoModelForCausalLM.from_pretrained(merged)}
result = {"ids": probe["top_ids"], "want": probe["top_logits"], "merged_dtype": str(models["merged"].dtype).removeprefix("torch."),
          "merged_keys": sorted(load_file(merged + "/model.safetensors")),
          "merged_config_ties": models["merged"].config.tie_word_embeddings}
for name, model in models.items():
    with torch.inference_mode():
        logits = model.eval()(input_ids=ids).logits[0, -1].float()
    result[name] = {"got": logits[probe["top_ids"]].tolist(), "top": int(logits.argmax()),
                    "tied": model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()}
assert "unsloth" not in sys.modules and "unsloth_zoo" not in sys.modules
print(json.dumps(result))
"""


def reload_exports(run: dict, timeout: int) -> dict:
    """`export --format lora` with plain PEFT and `--format merged-16bit` with plain transformers, in a
    process that never imports Unsloth: the logits each gives at summary.json's probe (beside the trained
    model's), whether lm_head is the input embedding, the merged checkpoint's dtype and keys."""
    proc = subprocess.run([sys.executable, "-c", RELOAD_EXPORTS, str(run["lora"]), str(run["merged"]), str(run["dir"])],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scripted_chat(run_dir: Path, turns: list[str], max_new_tokens: int, timeout: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`chat --run RUN --show-prompt` fed `turns` then /exit (French reasoning, greedy): the process and the
    prompts it showed, one per turn."""
    proc = subprocess.run([sys.executable, "-m", "lowvram_ft", "chat", "--run", str(run_dir), "--reasoning-language",
                           "French", "--temperature", "0", "--max-new-tokens", str(max_new_tokens), "--show-prompt"],
                          input="".join(f"{turn}\n" for turn in turns) + "/exit\n", cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prompts = [json.loads(line.split("prompt: ", 1)[1]) for line in proc.stdout.splitlines() if "prompt: " in line]
    return proc, prompts

