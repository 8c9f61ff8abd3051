"""The planner against GPU peaks others published (lowvram_ft/assets/published_peaks.jsonl): every case
is a test with its measured figure and a tolerance, and none of these runs is called "does not fit" on
the card it ran on. The figures are real runs; the predictions are pure arithmetic on config.json."""
import json
import os
import re
import statistics
import subprocess
import sys

import pytest
from conftest import ROOT

from lowvram_ft import plan
from lowvram_ft.plan import calibration, estimate, weights

CASES = {case.id: case for case in plan.CALIBRATION}
SHARED_FILE = ROOT.parent / "shared" / "data" / "published_peaks.jsonl"


def test_every_published_case_is_loaded_with_its_provenance():
    rows = [json.loads(line) for line in calibration.CASES_FILE.read_text().splitlines() if line.strip()]
    assert [row["id"] for row in rows] == list(CASES) and len(CASES) == 11
    for case in CASES.values():
        assert case.source and case.stack_version and case.calibrates and case.measured_gib > 0
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", case.date), case.id
        assert case.basis in ("exact", "upper_bound", "approx")
        assert case.basis != "approx" or case.approx, f"{case.id}: an approx case says what it cannot express"
        assert case.tolerance <= calibration.TARGET_ERROR or case.why, f"{case.id}: a wider tolerance says why"


@pytest.mark.skipif(not SHARED_FILE.is_file(), reason="the shared data folder is not beside this checkout")
def test_the_packaged_cases_are_the_shared_file():
    assert calibration.CASES_FILE.read_bytes() == SHARED_FILE.read_bytes()


@pytest.mark.parametrize("case_id", list(CASES))
def test_the_planner_predicts_the_published_peak(case_id):
    case = CASES[case_id]
    predicted = plan.predict_case(case)
    error = predicted / case.measured_gib - 1
    assert abs(error) <= case.tolerance, f"{case_id}: predicted {predicted:.2f}, measured {case.measured_gib} GiB"
    if case.basis == "upper_bound":  # at the cap, never far below what shorter rows measured
        assert error >= -calibration.TARGET_ERROR, case_id


@pytest.mark.parametrize("case_id", [c.id for c in plan.CALIBRATION if c.card_gib is not None])
def test_no_published_run_is_called_does_not_fit_on_its_own_card(case_id):
    case = CASES[case_id]
    card_peak = plan.predict(case.plan_input, case.card_gib).total_gib
    assert plan.verdict(card_peak, case.card_gib) != "does not fit"
    _, error, _ = plan.stated_error()
    assert card_peak <= case.card_gib * (1 + error), "the fit policy would refuse it"


def test_the_printed_trainable_parameters_match():
    for case in CASES.values():
        row = json.loads(next(line for line in calibration.CASES_FILE.read_text().splitlines() if case.id in line))
        printed = re.search(r"(\d{1,3}(?:,\d{3})+)", row.get("trainable_params_printed", ""))
        if printed:
            assert plan.predict(case.plan_input).trainable_params == int(printed.group(1).replace(",", "")), case.id


def test_the_reserved_after_load_term_is_the_median_of_the_clean_loads():
    # start reserved (before trainer.train()) less the exact bytes of weights and adapters, over the
    # Unsloth notebook loads of plain NF4 checkpoints with nothing run before training
    clean = ("nb_llama31_8b_alpaca_t4", "nb_llama32_3b_conversational_t4", "nb_mistral_nemo12b_alpaca_t4",
             "nb_qwen25_7b_alpaca_t4")
    rows = {json.loads(line)["id"]: json.loads(line) for line in calibration.CASES_FILE.read_text().splitlines()}
    slack = []
    for case_id in clean:
        b = plan.predict(CASES[case_id].plan_input)
        held = sum(b.gib(name) for name in ("quantized_weights", "unquantized_weights", "trainable_weights"))
        slack.append(rows[case_id]["start_reserved_gib"] - held)
    assert estimate.LOAD_RESERVED_GIB == pytest.approx(statistics.median(slack), abs=0.01)


def test_the_error_over_the_cases_is_the_stated_error():
    errors = [abs(plan.case_error(case)) for case in plan.CALIBRATION]
    assert statistics.median(errors) <= 0.10
    assert sum(e <= 0.20 for e in errors) >= 0.9 * len(errors)
    calibrated, error, count = plan.stated_error()
    assert (calibrated, error, count) == (True, max(errors), len(errors))
    assert plan.basis_text() == f"calibrated estimate, ±{error:.0%} measured on {count} published cases"


def test_what_each_figure_measures_is_predicted():
    # torch's reserved peak never holds the CUDA context; the card must
    b = plan.predict(CASES["nb_gptoss20b_500k_a100_80"].plan_input, 79.318)
    assert b.total_gib - b.reserved_gib == pytest.approx(estimate.CUDA_CONTEXT_GIB)
    # a generation before training is part of the whole-process peak when it is the larger
    peft = CASES["peft_lora_llama32_3b_qv_l40s"]
    with_eval = plan.predict(peft.plan_input, peft.card_gib)
    assert with_eval.training_gib is not None and with_eval.total_gib >= with_eval.training_gib


def test_dynamic_4bit_and_16bit_linears_cost_more_than_plain_nf4():
    inp = CASES["nb_qwen3_14b_alpaca_t4"].plan_input
    dynamic = plan.predict(inp)
    plain = plan.predict(inp.__class__(**{**inp.__dict__, "kept_16bit": "none"}))
    extra = dynamic.gib("dynamic_16bit_linears")
    assert extra == pytest.approx(weights.DYNAMIC_4BIT_MAX_OVERHEAD * plain.gib("quantized_weights"))
    named = plan.predict(inp.__class__(**{**inp.__dict__, "kept_16bit": ("q_proj", "o_proj")}))
    q = 40 * 5120 * 5120 * 2  # q_proj and o_proj of Qwen3-14B: 40 layers x 5120 x 5120, twice
    assert named.gib("unquantized_weights") - plain.gib("unquantized_weights") == pytest.approx(q * 2 / 2**30)


def _plan(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lowvram_ft", "plan", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_plan_json_holds_every_term_the_total_the_verdict_and_the_basis():
    proc = _plan("--config", "configs/gpt-oss-20b.yaml", "--vram", "14.75", "--compute-capability", "7.5", "--json",
                 "--max-context")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    at_peak = [v for k, v in report["components_gib"].items() if k not in report["not_at_peak"]]
    assert sum(at_peak) == pytest.approx(report["card_peak_gib"], abs=0.01)
    assert report["card_peak_gib"] - report["reserved_peak_gib"] == pytest.approx(estimate.CUDA_CONTEXT_GIB, abs=1e-3)
    assert report["verdict"] == "fits" and report["basis"]["calibrated"] and report["basis"]["cases"] == 11
    assert report["settings"]["stack"] == "unsloth" and report["settings"]["attention"] == "flex"
    assert report["precision"]["weights"] == "float16"
    assert set(report["max_context"]) == set(plan.CARDS)


def test_plan_only_settings_are_validated_and_reach_the_estimate():
    bad = _plan("--config", "configs/qwen3-8b.yaml", "--kept-16bit", "qkv")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "module names are q_proj" in bad.stderr
    bad = _plan("--config", "configs/qwen3-8b.yaml", "--loss", "liger")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr and "chunked" in bad.stderr
    plain = json.loads(_plan("--config", "configs/qwen3-8b.yaml", "--stack", "transformers", "--json").stdout)
    chunked = json.loads(_plan("--config", "configs/qwen3-8b.yaml", "--stack", "transformers", "--loss", "chunked",
                               "--json").stdout)
    assert plain["settings"]["loss"] == "full" and chunked["settings"]["loss"] == "chunked"
    assert chunked["components_gib"]["logits_and_loss"] < plain["components_gib"]["logits_and_loss"] / 10


def test_plan_max_context_prints_every_card_and_the_anchors():
    proc = _plan("--config", "configs/gpt-oss-20b.yaml", "--max-context")
    assert proc.returncode == 0, proc.stderr
    for card in plan.CARDS:
        assert re.search(rf"{card}:\s+[\d,]+ tokens", proc.stdout), card
    assert "published: Unsloth: gpt-oss-20b QLoRA" in proc.stdout
