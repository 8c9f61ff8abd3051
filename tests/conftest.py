"""Shared test setup: no Hub access; every test but the `gpu` ones runs on the CPU, also on a machine
with a GPU; GPU tests skip themselves without CUDA. The tiers are folders: unit/ (no model is loaded),
e2e/ (`slow`: end-to-end on the embedded model), gpu/ (`gpu`); helpers.py holds what two tiers share."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATA = ROOT / "tests" / "data"  # the tests' fixture files

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The environment with the GPU visible, for the `gpu` tests' processes (gpu_env) ...
GPU_ENV = dict(os.environ)
# ... and without it for everything else: CPU tests compare exact numbers and expect the CPU path
# (load_in=auto is 4-bit on a GPU), so their processes must not find a GPU even where there is one.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# The environment for a CPU test's child process: the GPU hidden (above), the Hub offline, one CPU thread
# (on a shared 2-core machine two-thread torch spins against other jobs: a 2 s training takes 40 s).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def gpu_env(**extra: str) -> dict[str, str]:
    """The environment for a process of a `gpu` test: the GPU visible, the Hub offline."""
    return {**GPU_ENV, "HF_HUB_OFFLINE": "1", **extra}


def cuda_available() -> bool:
    """Whether a GPU is there, asked in a process that can see it (this one hides it)."""
    import subprocess
    import sys

    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", code], env=GPU_ENV, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# Fixtures that train or load a model in a child process: a test using one is end to end (`slow`).
# `make test-fast` runs the rest (`-m "not slow and not gpu"`), `make test` runs everything.
SLOW_FIXTURES = {"demo", "run", "exported", "logits", "reference", "runs", "fsdp2", "qwen3_run", "unsloth_report"}


def pytest_collection_modifyitems(config, items):
    """Mark the end-to-end tests slow (before -m selects), then skip GPU tests without a GPU."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(trylast=True)  # after -m deselected what will not run: no GPU probe for `make test-fast`
def pytest_collection_finish(session):
    items = session.items
    if any("gpu" in item.keywords for item in items) and not cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


# Machine epsilon per dtype name (torch.finfo(...).eps), without importing torch at collection time.
EPS = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def precision_atol(dtype: str, magnitude: float, factor: float = 4.0, floor: float = 0.0) -> float:
    """Absolute tolerance for values of about `magnitude` computed in `dtype` by two different code paths
    (Unsloth's and plain transformers'): `factor` roundings of that dtype at that magnitude, at least
    `floor`. The CPU path trains in bf16 where the CPU has native bf16 and in fp32 elsewhere, so a fixed
    fp32 tolerance fails on one machine and a bf16 one proves nothing on the other."""
    return max(floor, factor * EPS[dtype] * magnitude)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The split bnb-4bit gpt-oss checkpoint of the tiny shape (helpers.TINY), built on the CPU."""
    from helpers import TINY
    from lowvram_ft.gptoss_checkpoint import build_split_checkpoint

    return build_split_checkpoint(TINY, tmp_path_factory.mktemp("ckpt") / "tiny-split", device="cpu",
                                  with_tokenizer=False)


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    """The tokenizer of the embedded Qwen3-shaped model (helpers.QWEN3_CONFIG), with Qwen3's chat template."""
    from transformers import PreTrainedTokenizerFast  # the class the files name; AutoTokenizer's import costs ~2.5 s of CPU

    from lowvram_ft.embedded import embedded_model_dir

    return PreTrainedTokenizerFast.from_pretrained(embedded_model_dir("embedded-qwen3"))


@pytest.fixture(scope="session")
def gptoss_tokenizer():
    """The real o200k_harmony tokenizer, built offline once per session (a few seconds)."""
    from lowvram_ft.gptoss_tokenizer import load_gptoss_tokenizer

    return load_gptoss_tokenizer()


@pytest.fixture(scope="session")
def harmony_reference():
    """openai-harmony's HARMONY_GPT_OSS encoding, the reference our Harmony renderer is checked against."""
    from lowvram_ft.gptoss_tokenizer import harmony_encoding

    return harmony_encoding()
