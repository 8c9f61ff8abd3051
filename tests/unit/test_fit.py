"""The GPU path, as far as a CPU can test it: the fit policy (an unmeasured estimate never blocks a run),
the precision Unsloth uses on each card, the gpt-oss recipe that fits 16 GB, input placement with an
offloaded embedding, and the emulated card. No model is loaded. The suite's hiding of a GPU from CPU
tests: e2e/test_fit.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from lowvram_ft import plan
from lowvram_ft.config import GPT_OSS_RECIPE, load_config
from lowvram_ft.io import GIB
from lowvram_ft.device import DeviceError, emulated_card_fraction, emulated_card_gib

from lowvram_ft.plan import calibration


def gpt_oss(*overrides: str):
    return load_config(None, ["model.name=unsloth/gpt-oss-20b", *overrides])


# --------------------------------------------------------------------------- precision per card


@pytest.mark.parametrize("model_type, bf16, requested, weights, compute", [
    ("gpt_oss", True, "auto", "bfloat16", "bfloat16"),
    ("gpt_oss", False, "auto", "float16", "float16"),     # T4 / V100: forced float32 loads bf16, casts to fp16
    ("gpt_oss", True, "float16", "float16", "float16"),
    ("qwen3", False, "auto", "float16", "float16"),        # not in FORCE_FLOAT32: plain float16
    ("llama", True, "auto", "bfloat16", "bfloat16"),
    ("llama", False, "bfloat16", "float16", "float16"),   # Unsloth changes an impossible bf16 to float16
    ("gpt_oss", False, "float32", "float32", "float32"),
])
def test_the_planner_plans_the_precision_unsloth_uses_on_the_card(model_type, bf16, requested, weights, compute):
    precision = plan.unsloth_precision(model_type, bf16, requested)
    assert (precision.weights, precision.compute) == (weights, compute)


def test_compute_capability_decides_bf16():
    assert plan.has_bf16(8.0) and plan.has_bf16(9.0) and plan.has_bf16(None)
    assert not plan.has_bf16(7.5) and not plan.has_bf16(7.0)


def test_gpt_oss_on_a_t4_keeps_16_bit_weights():
    # Unsloth's forced-float32 families load in bfloat16 and cast to float16 (loader.py ~3008, vision.py
    # ~3719): the weights outside the 4-bit linears take 2 bytes on a T4 too (the T4 notebook's 12.98 GiB
    # peak rules out 4-byte embeddings: they alone would be 4.3 GiB).
    cfg = load_config(ROOT / "configs/gpt-oss-20b.yaml")
    model_config = plan.model_config_for(cfg.model.name)
    on_a100 = plan.predict(plan.plan_input_from_config(cfg, model_config, bf16=True))
    on_t4 = plan.predict(plan.plan_input_from_config(cfg, model_config, bf16=False))
    assert on_t4.gib("unquantized_weights") == pytest.approx(on_a100.gib("unquantized_weights"))
    assert plan.plan_input_from_config(cfg, model_config, bf16=False).dtype == "float16"


# --------------------------------------------------------------------------- the fit policy


def test_the_headline_command_fits_a_16_gb_card_by_the_planner():
    """`train --model unsloth/gpt-oss-20b` with no --config gets the recipe, estimated to fit 16 GB."""
    cfg = load_config(None, [*GPT_OSS_RECIPE, "model.name=unsloth/gpt-oss-20b"])
    decision = plan.decide_fit(cfg, 16.0, bf16=True)
    assert decision.action == "fits", decision.lines()
    assert decision.peak_gib <= 16.0 * (1 - plan.SAFETY_MARGIN)


def test_the_recipe_is_the_default_for_gpt_oss_without_a_config_and_flags_still_win(tmp_path):
    def dry_run(*args):
        proc = subprocess.run([sys.executable, "-m", "lowvram_ft", "train", "--dry-run", *args], cwd=ROOT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc

    proc = dry_run("--model", "unsloth/gpt-oss-20b", "lora.r=32")
    assert "the 16 GB recipe" in proc.stderr
    assert "\n  r: 32\n" in proc.stdout and "max_seq_length: 1024" in proc.stdout and "offload_embedding: true" in proc.stdout
    proc = dry_run("--config", "configs/embedded.yaml", "--model", "unsloth/gpt-oss-20b")
    assert "recipe" not in proc.stderr and "max_seq_length: 1024" not in proc.stdout


def test_an_uncalibrated_estimate_over_the_card_warns_and_never_refuses(monkeypatch):
    monkeypatch.setattr(calibration, "CALIBRATION", ())
    cfg = gpt_oss("model.max_seq_length=4096", "lora.r=64", "train.fit=warn")
    decision = plan.decide_fit(cfg, 6.0)
    assert decision.action == "warn" and decision.overrides == ()
    assert "uncalibrated estimate, ±20%" in decision.lines()[0] and "training anyway" in decision.lines()[0]


def test_a_calibrated_estimate_refuses_only_beyond_its_measured_error():
    calibrated, error, cases = plan.stated_error()
    assert calibrated and cases == len(plan.CALIBRATION) >= 11
    assert error == max(abs(plan.case_error(case)) for case in plan.CALIBRATION)
    cfg = gpt_oss("model.max_seq_length=4096", "lora.r=64", "train.fit=warn")
    peak = plan.decide_fit(cfg, 80.0).peak_gib
    assert plan.decide_fit(cfg, peak / (1 + error) * 0.98).action == "refuse"
    assert plan.decide_fit(cfg, peak / (1 + error) * 1.02).action == "warn", "over by less than the measured error"
    line = plan.decide_fit(cfg, peak * 0.5).lines()[0]
    assert f"calibrated estimate, ±{error:.0%} measured on {cases} published cases" in line


def test_auto_changes_only_what_keeps_the_trained_model_the_same():
    cfg = gpt_oss("train.batch_size=4", "train.gradient_accumulation_steps=2", "model.gradient_checkpointing=true",
                  "lora.r=16", "model.max_seq_length=2048")
    decision = plan.decide_fit(cfg, 16.0)
    keys = {o.split("=")[0] for o in decision.overrides}
    assert keys and keys <= {"model.offload_embedding", "model.gradient_checkpointing", "train.batch_size",
                             "train.gradient_accumulation_steps"}
    changed = dict(o.split("=") for o in decision.overrides)
    if "train.batch_size" in changed:
        assert int(changed["train.batch_size"]) * int(changed["train.gradient_accumulation_steps"]) == 8
    assert [u.split("=")[0] for u in decision.undo] == [o.split("=")[0] for o in decision.overrides]
    assert "model.gradient_checkpointing=true" in decision.undo
    assert all("undo:" in line for line in decision.lines()[1:])
    assert decision.peak_gib < decision.configured_gib


def test_auto_applied_changes_reach_the_config_and_the_rest_stays():
    from lowvram_ft.train.pipeline import apply_overrides

    cfg = gpt_oss("train.batch_size=4", "train.gradient_accumulation_steps=2", "lora.r=16")
    decision = plan.decide_fit(cfg, 16.0)
    fitted = apply_overrides(cfg, decision.overrides)
    assert (fitted.lora, fitted.model.max_seq_length, fitted.data) == (cfg.lora, cfg.model.max_seq_length, cfg.data)
    assert fitted.train.batch_size * fitted.train.gradient_accumulation_steps == 8
    assert plan.decide_fit(fitted, 16.0).overrides == () or plan.decide_fit(fitted, 16.0).peak_gib <= decision.peak_gib


def test_fit_off_checks_nothing_and_a_fitting_run_changes_nothing():
    assert plan.decide_fit(gpt_oss("train.fit=off"), 8.0) is None
    decision = plan.decide_fit(gpt_oss(*GPT_OSS_RECIPE), 80.0)
    assert decision.action == "fits" and decision.overrides == ()


def test_an_unknown_model_is_not_checked(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert plan.decide_fit(load_config(None, ["model.name=someone/not-bundled-7b"]), 8.0) is None


# --------------------------------------------------------------------------- device placement and the emulated card


def test_inputs_go_to_the_compute_device_not_the_first_parameter():
    """With an offloaded embedding the first parameter is on the CPU while the model computes on the GPU;
    Unsloth points model.device at the GPU. Stand-in: a first parameter on `meta`, compute on the CPU."""
    import torch

    from lowvram_ft.model import input_device
    from lowvram_ft.train.pipeline import probe_logits

    class Offloaded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Parameter(torch.empty(4, 4, device="meta"))
            self.head = torch.nn.Parameter(torch.ones(4, 8))

        @property
        def device(self):
            return torch.device("cpu")

        def forward(self, input_ids):
            assert input_ids.device.type == "cpu", input_ids.device
            hidden = torch.nn.functional.one_hot(input_ids % 4, 4).float()
            return type("Out", (), {"logits": hidden @ self.head})()

    class Tokenizer:
        chat_template = None

        def get_vocab(self):
            return {}

        def __call__(self, text, add_special_tokens, return_tensors):
            return {"input_ids": torch.tensor([[1, 2, 3]])}

    model = Offloaded()
    assert next(model.parameters()).device.type == "meta" and input_device(model).type == "cpu"
    assert len(probe_logits(model, Tokenizer())["top_ids"]) == 8


def test_the_reload_probe_is_rendered_by_the_models_own_renderer(gptoss_tokenizer):
    from lowvram_ft.conversation import Conversation, Message
    from lowvram_ft.harmony import render_prompt
    from lowvram_ft.train.pipeline import PROBE_QUESTION, probe_text

    assert probe_text(gptoss_tokenizer) == render_prompt(Conversation((Message("user", PROBE_QUESTION),)))

    class ChatML:  # a Qwen3-style tokenizer: no Harmony tokens, its own chat template
        chat_template = "{{ chatml }}"

        def get_vocab(self):
            return {"<|im_start|>": 1, "<|im_end|>": 2}

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize
            return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + (
                "<|im_start|>assistant\n" if add_generation_prompt else "")

    assert probe_text(ChatML()) == f"<|im_start|>user\n{PROBE_QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def test_the_emulated_card_takes_the_cuda_context_off_like_a_real_card():
    assert emulated_card_fraction(16, 80 * GIB, 0) == pytest.approx(0.2)
    assert emulated_card_fraction(16, 80 * GIB, GIB // 2) == pytest.approx(15.5 / 80)
    assert emulated_card_fraction(100, 80 * GIB) == 1.0
    with pytest.raises(DeviceError):
        emulated_card_fraction(0, 80 * GIB)
    assert emulated_card_gib("16") == 16.0
    for bad in ("abc", "0", "-5", "nan", "inf"):
        with pytest.raises(DeviceError, match="LOWVRAM_FT_VRAM_GIB"):
            emulated_card_gib(bad)
