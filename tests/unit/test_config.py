"""Config: precedence, validation (every problem, dotted keys), shipped configs, light imports."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from lowvram_ft.config import CHAT_TEMPLATE_NAMES, Config, ConfigError, diff, load_config, to_dict, to_yaml


def test_defaults_are_the_embedded_demo():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name == "embedded"
    assert cfg.data.dataset == ["sample"]
    assert cfg.model.gradient_checkpointing == "unsloth"


def test_precedence_defaults_then_yaml_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 8\n  alpha: 16\ntrain:\n  max_steps: 10\n")
    cfg = load_config(path, ["lora.r=32", "train.learning_rate=1e-4"])
    assert cfg.lora.r == 32  # command line beats YAML
    assert cfg.lora.alpha == 16  # YAML beats default
    assert cfg.train.max_steps == 10
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.batch_size == 1  # default kept


def test_override_values_are_typed():
    cfg = load_config(None, ["lora.target_modules=[q_proj, v_proj]", "eval.enabled=false",
                             "data.columns={question: user}", "data.dataset=file.jsonl", "train.epochs=2"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.eval.enabled is False
    assert cfg.data.columns == {"question": "user"}
    assert cfg.data.dataset == ["file.jsonl"]  # a single value becomes a one-item list
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)


def test_every_problem_is_reported_together_with_its_dotted_key():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["lora.rr=8", "train.max_steps=abc", "modle.name=x", "data.format=bogus",
                           "lora.r=0", "eval.top_p=1.5", "noequals"])
    problems = info.value.problems
    assert len(problems) == 7
    text = "\n".join(problems)
    assert "lora.rr: unknown key — did you mean lora.r?" in text
    assert "train.max_steps: got 'abc'; expected an integer" in text
    assert "modle: command line: unknown group — did you mean model?" in text
    assert "data.format: got 'bogus'; expected one of auto, messages, sharegpt, multilingual_thinking, alpaca, text" in text
    assert "lora.r: got 0; must be at least 1" in text
    assert "eval.top_p: got 1.5; must be at most 1.0" in text
    assert "noequals: overrides look like group.key=value" in text


@pytest.mark.parametrize("override, problem", [
    ("eval.top_p=0", "eval.top_p: got 0; must be above 0.0"),
    ("eval.top_p=-0.5", "eval.top_p: got -0.5; must be above 0.0"),
    ("eval.top_p=1.01", "eval.top_p: got 1.01; must be at most 1.0"),
    ("eval.top_k=-1", "eval.top_k: got -1; must be at least 0"),
])
def test_sampling_settings_outside_their_range_are_config_errors(override, problem):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.problems == [problem]


def test_chat_template_takes_a_name_from_unsloths_registry():
    assert load_config().data.chat_template is None  # the model's own template
    assert load_config(None, ["data.chat_template=llama-3.1"]).data.chat_template == "llama-3.1"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.chat_template=chatmll"])
    [problem] = info.value.problems
    assert problem == (f"data.chat_template: got 'chatmll'; expected one of {', '.join(CHAT_TEMPLATE_NAMES)} "
                       "or null")
    assert {"chatml", "llama-3.1", "qwen-3", "gemma-3", "mistral", "phi-4"} <= set(CHAT_TEMPLATE_NAMES)


def test_booleans_are_not_numbers_and_numbers_are_not_booleans():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["lora.r=true", "eval.enabled=1"])
    assert info.value.problems == ["lora.r: got True; expected an integer", "eval.enabled: got 1; expected true or false"]


def test_cross_key_problems():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.full_finetuning=true", "model.load_in=4bit", "data.weights=[0.5]",
                           "data.dataset=[a.jsonl, b.jsonl]", "output.report_to=[tensorbored]"])
    text = "\n".join(info.value.problems)
    assert "model.full_finetuning: cannot train quantized weights" in text
    assert "data.weights: 1 ratios for 2 data sets" in text
    assert "output.report_to: unknown tracker tensorbored" in text


def test_yaml_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: config file does not exist"):
        load_config(missing)
    with pytest.raises(ConfigError, match="config file is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)
    group = tmp_path / "group.yaml"
    group.write_text("lora: 3\n")
    with pytest.raises(ConfigError, match="lora: must be a mapping of settings"):
        load_config(group)


def test_duplicate_yaml_keys_are_refused_with_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  learning_rate: 0.1\nlora:\n  r: 8\n  r: 4\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:5: lora.r: given twice (first on line 4) — keep one; YAML would silently use only the last",
        f"{path}:6: train: given twice (first on line 1) — keep one; YAML would silently use only the last",
    ]


def test_yaml_merge_keys_and_aliases_are_not_duplicates(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("lora:\n  <<: &base {r: 8, alpha: 16}\n  r: 4\neval:\n  <<: *base\n  enabled: false\n")
    with pytest.raises(ConfigError) as info:  # the alias brings lora keys into eval: unknown there, not repeated
        load_config(path)
    assert [p.split(":")[0] for p in info.value.problems] == ["eval.r", "eval.alpha"]
    path.write_text("lora:\n  <<: {r: 8, alpha: 16}\n  r: 4\n")
    cfg = load_config(path)
    assert (cfg.lora.r, cfg.lora.alpha) == (4, 16)


def test_yaml_syntax_error_is_reported_with_the_override_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: [a.jsonl, b.jsonl]\nlora:\n  r: [1,\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, ["lora.rr=8", "train.max_steps=0", "data.weights=[0.5, 0.5]"])
    problems = info.value.problems
    assert problems[0].startswith(f"{bad}:5: invalid YAML (")
    # The cross-key check of data.weights is left out: it would judge the overrides against defaults.
    assert problems[1:] == ["lora.rr: unknown key — did you mean lora.r?",
                            "train.max_steps: got 0; must be -1 (run the epochs) or at least 1"]


def test_max_steps_is_minus_one_or_positive():
    assert load_config(None, ["train.max_steps=-1"]).train.max_steps == -1
    assert load_config(None, ["train.max_steps=1"]).train.max_steps == 1
    for value in (0, -2):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"train.max_steps={value}"])
        assert info.value.problems == [f"train.max_steps: got {value}; must be -1 (run the epochs) or at least 1"]


def test_mapping_override_without_spaces_says_how_to_write_it():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.columns={question:user}"])
    assert info.value.problems == ["data.columns: got {'question:user': None}; expected a mapping of text to text, "
                                   "e.g. {question: user} (a space after each colon)"]


def test_cli_duplicate_keys_and_broken_yaml_are_lines_not_tracebacks(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  learning_rate: 0.1\ntrain:\n  max_steps: 3\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: [1,\n")
    runs = [["--config", str(dup)], ["--config", str(bad), "lora.rr=8"]]
    outs = [subprocess.run([sys.executable, "-m", "lowvram_ft", "train", "--dry-run", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=60) for args in runs]
    for out in outs:
        assert out.returncode == 2 and "Traceback" not in out.stderr
    assert outs[0].stderr.splitlines() == [
        f"error: {dup}:3: train: given twice (first on line 1) — keep one; YAML would silently use only the last"]
    assert outs[1].stderr.splitlines() == [
        f"error: {bad}:3: invalid YAML (expected the node content, but found '<stream end>')",
        "error: lora.rr: unknown key — did you mean lora.r?"]


def test_yaml_round_trip_and_diff():
    cfg = load_config(None, ["lora.r=8"])
    again = load_config(None, {k: v for k, v in to_dict(cfg).items()})
    assert again == cfg
    assert "lora:" in to_yaml(cfg)
    assert diff(to_dict(cfg), to_dict(Config())) == ["lora.r: 8 -> 16"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_validates_and_documents_itself(path):
    cfg = load_config(path)
    header = path.read_text(encoding="utf-8").split("\n\n")[0]
    assert "python -m lowvram_ft train" in header, "header gives the command"
    assert "GPU:" in header and "peak VRAM:" in header, "header gives target GPU and expected peak VRAM"
    assert isinstance(cfg, Config)


def test_shipped_configs_cover_the_required_models():
    names = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert {"gpt-oss-20b", "gpt-oss-120b", "embedded"} <= names
    assert any(n not in ("gpt-oss-20b", "gpt-oss-120b", "embedded") for n in names), "one non-gpt-oss model"


HEAVY = ("torch", "transformers", "trl", "unsloth", "unsloth_zoo", "peft", "datasets", "bitsandbytes")


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["train", "--help"],
    ["train", "--dry-run", "lora.r=8"],
    ["train", "--dry-run", "--config", "configs/gpt-oss-20b.yaml", "--output", "runs/x"],
])
def test_help_and_dry_run_import_no_heavy_library(argv):
    code = (
        "import sys, json\n"
        "from lowvram_ft.cli import main\n"
        f"try:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
        f"print(json.dumps([rc, sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    rc, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert rc in (0, None)
    assert loaded == []


def test_dry_run_prints_resolved_config_and_plan():
    out = subprocess.run([sys.executable, "-m", "lowvram_ft", "train", "--dry-run", "lora.r=8",
                          "--dataset", "nonexistent.jsonl"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "r: 8" in out.stdout
    assert "would load   model embedded tiny gpt-oss" in out.stdout
    assert "nonexistent.jsonl (NOT FOUND)" in out.stdout


def test_cli_config_errors_are_lines_not_tracebacks():
    out = subprocess.run([sys.executable, "-m", "lowvram_ft", "train", "--dry-run", "lora.rr=8", "train.max_steps=x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines() == [
        "error: lora.rr: unknown key — did you mean lora.r?",
        "error: train.max_steps: got 'x'; expected an integer",
    ]
