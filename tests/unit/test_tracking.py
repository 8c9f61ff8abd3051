"""Experiment tracking: output.report_to mapped onto SFTConfig, the trackers pointed into the run folder,
a missing optional tracker refused before anything is written, and tokens/s + peak memory added to the
logs every tracker records. TensorBoard and MLflow end to end only where they are installed (they are
optional extras, not in requirements.lock)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from lowvram_ft.config import load_config
from lowvram_ft.device import Device
from lowvram_ft.train.trainer import (TrackingError, check_trackers, missing_trackers, sft_config_kwargs,
                              tracker_environment)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
CPU = Device("cpu", "cpu", None, False, "test")


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def kwargs(*overrides: str) -> dict:
    return sft_config_kwargs(load_config(None, list(overrides)), CPU, "/runs/tuned-1/checkpoints")


# --------------------------------------------------------------------------- the mapping (pure)


def test_report_to_maps_onto_sft_config_and_names_the_run():
    assert kwargs()["report_to"] == "none"
    assert kwargs("output.report_to=[none]")["report_to"] == "none"
    assert kwargs("output.report_to=[tensorboard, mlflow]")["report_to"] == ["tensorboard", "mlflow"]
    assert kwargs("output.report_to=wandb")["report_to"] == ["wandb"]
    assert kwargs()["run_name"] == "tuned-1"


def test_trackers_are_pointed_into_the_run_folder_unless_the_user_chose_otherwise():
    run = Path("/runs/tuned-1")
    assert tracker_environment(["tensorboard", "mlflow", "wandb"], run, {}) == {
        "TENSORBOARD_LOGGING_DIR": "/runs/tuned-1/tensorboard",
        "MLFLOW_TRACKING_URI": "file:///runs/tuned-1/mlruns",
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "WANDB_DIR": "/runs/tuned-1",
        "WANDB_MODE": "offline",  # no API key: log locally rather than prompt for a login
    }
    mine = {"TENSORBOARD_LOGGING_DIR": "/tb", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "WANDB_API_KEY": "k"}
    assert tracker_environment(["tensorboard", "mlflow", "wandb"], run, mine) == {"WANDB_DIR": "/runs/tuned-1"}
    assert tracker_environment([], run, {}) == {}


def test_a_missing_tracker_names_the_install_command():
    nothing = lambda name: None  # noqa: E731
    assert missing_trackers(["tensorboard", "mlflow", "none"], nothing) == ["tensorboard", "mlflow"]
    assert missing_trackers(["tensorboard"], lambda name: object() if name == "tensorboardX" else None) == []
    with pytest.raises(TrackingError) as error:
        check_trackers(["tensorboard"], nothing)
    assert str(error.value) == ("output.report_to: tensorboard is not installed — `pip install tensorboard` "
                                "(optional extra), or remove it from output.report_to")
    with pytest.raises(TrackingError, match=r"`pip install mlflow wandb`"):
        check_trackers(["mlflow", "wandb"], nothing)
    check_trackers([], nothing)


@pytest.mark.skipif(installed("tensorboard") or installed("tensorboardX"), reason="tensorboard is installed here")
def test_training_with_a_missing_tracker_stops_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lowvram_ft", "train", "--config", "configs/embedded.yaml",
                           "--output", str(run), "output.report_to=[tensorboard]"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: output.report_to: tensorboard is not installed — `pip install tensorboard` (optional extra), "
        "or remove it from output.report_to"]
    assert not run.exists()
    assert "Unsloth" not in proc.stdout + proc.stderr  # refused before any model code was loaded


# --------------------------------------------------------------------------- what the trackers receive


def progress_step(tmp_path: Path, main: bool) -> dict:
    """One logging step through the progress callback; returns the logs the next callbacks see."""
    from rich.console import Console
    from transformers import TrainerState

    from lowvram_ft.train.trainer import make_progress_callback

    progress = make_progress_callback(tmp_path, CPU, Console(quiet=True))
    state = TrainerState(global_step=1, max_steps=10, is_world_process_zero=main)
    progress.on_train_begin(None, state, None)
    logs = {"loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.5, "num_tokens": 1000}
    progress.on_log(None, state, None, logs=logs)
    return logs


def test_progress_adds_tokens_per_second_and_peak_memory_to_the_logs(tmp_path):
    logs = progress_step(tmp_path, main=True)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert logs["tokens_per_s"] == record["tokens_per_s"] > 0
    assert logs["peak_memory_gib"] == record["peak_memory_gib"] > 0
    assert record["loss"] == 2.5 and record["tokens"] == 1000


def test_only_the_main_process_writes_metrics(tmp_path):
    logs = progress_step(tmp_path, main=False)
    assert "tokens_per_s" in logs  # the trackers of every process see the same keys (only the main one logs)
    assert not (tmp_path / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- end to end, where installed


def train(run: Path, tracker: str) -> list[dict]:
    env = {k: v for k, v in ENV.items() if not k.startswith(("MLFLOW_", "TENSORBOARD_"))}
    proc = subprocess.run([sys.executable, "-m", "lowvram_ft", "train", "--config", "configs/embedded.yaml",
                           "--output", str(run), "train.max_steps=3", "train.batch_size=2", "train.logging_steps=1",
                           "eval.enabled=false", f"output.report_to=[{tracker}]"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not installed("tensorboard"), reason="tensorboard not installed (pip install tensorboard)")
def test_tensorboard_logs_into_the_run_folder_what_metrics_jsonl_holds(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = train(tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for key in ("loss", "tokens_per_s", "peak_memory_gib"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records]


@pytest.mark.skipif(not installed("mlflow"), reason="mlflow not installed (pip install mlflow)")
def test_mlflow_logs_into_a_file_store_in_the_run_folder(tmp_path):
    records = train(tmp_path / "run", "mlflow")
    (run_folder,) = [p for p in (tmp_path / "run" / "mlruns" / "0").iterdir() if p.is_dir()]
    assert "run_name: run" in (run_folder / "meta.yaml").read_text()
    for key in ("loss", "tokens_per_s", "peak_memory_gib"):
        lines = (run_folder / "metrics" / key).read_text().split("\n")
        logged = [(int(step), float(value)) for _, value, step in (line.split() for line in lines if line)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records]
