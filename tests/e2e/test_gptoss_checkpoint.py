"""The split bnb-4bit gpt-oss checkpoint (conftest's tiny_checkpoint) through Unsloth: its split/fused
classifier and loading through unsloth_zoo's split classes, run together in one child process, because
importing unsloth patches transformers for the whole process (about 20 s of CPU). The checkpoint's layout
without Unsloth: unit/test_gptoss_checkpoint.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers import REAL_20B
from lowvram_ft import gptoss_checkpoint as ckpt
from lowvram_ft.gptoss_checkpoint import split_layout_config

pytestmark = pytest.mark.slow


UNSLOTH_CHECKS = r"""
import json, sys
import unsloth  # first: it patches transformers
import torch, transformers
from unsloth.models.loader_utils import (
    _checkpoint_tensor_dtypes, _gpt_oss_bnb_checkpoint_expert_layout, gpt_oss_checkpoint_has_fused_experts)
from unsloth_zoo.peft_utils import SKIP_QUANTIZATION_MODULES
from unsloth_zoo.temporary_patches.gpt_oss import patch_gpt_oss_bnb4bit
from lowvram_ft.gptoss_checkpoint import describe_loaded

path = sys.argv[1]
report = {"zoo_skip_modules": list(SKIP_QUANTIZATION_MODULES)}
config = transformers.AutoConfig.from_pretrained(path)
report["layout"] = _gpt_oss_bnb_checkpoint_expert_layout(_checkpoint_tensor_dtypes(path, local_files_only=True))
report["has_fused_experts"] = gpt_oss_checkpoint_has_fused_experts(config, path, local_files_only=True)

def load():
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                                    output_loading_info=True)
    return model, {k: sorted(map(str, v)) for k, v in info.items()}

stock, report["stock_info"] = load()  # stock transformers classes: experts and router do not fit
report["stock"] = describe_loaded(stock)
del stock
patch_gpt_oss_bnb4bit()
model, report["info"] = load()
report["loaded"] = describe_loaded(model)
report["quantization_config"] = model.config.quantization_config.to_dict()
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    logits = model(torch.tensor([[3, 4, 5, 6, 7]])).logits
report["logits_shape"] = list(logits.shape)
report["logits_finite"] = bool(torch.isfinite(logits).all())
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def unsloth_report(tiny_checkpoint) -> dict:
    """One child process that imports unsloth (about 20 s of CPU) and runs every Unsloth-side check."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}
    out = subprocess.run([sys.executable, "-c", UNSLOTH_CHECKS, str(tiny_checkpoint)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def test_unsloth_classifies_the_checkpoint_as_split(unsloth_report):
    assert unsloth_report["layout"] == "split"
    assert unsloth_report["has_fused_experts"] is False


def test_skip_list_snapshot_matches_the_installed_unsloth_zoo(unsloth_report):
    assert list(ckpt.UNSLOTH_SKIP_QUANTIZATION_MODULES) == unsloth_report["zoo_skip_modules"]


def test_loads_through_unsloth_split_classes_with_a_clean_report_and_4bit_experts(unsloth_report):
    info, loaded = unsloth_report["info"], unsloth_report["loaded"]
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert loaded["experts_4bit"] is True
    assert loaded["expert_weights"] == loaded["expert_weights_4bit"] == 2 * 4 * 2
    # Only the experts are 4-bit: attention, router, embeddings and lm_head stayed 16-bit.
    assert loaded["linear4bit"] == loaded["params4bit"] == 2 * 4 * 2
    assert loaded["parameters_by_dtype"]["nf4"] == 2 * 4 * (2 * 64 * 64 + 64 * 64)
    assert loaded["cuda_allocated_gib"] is None
    assert unsloth_report["logits_shape"] == [1, 5, 256] and unsloth_report["logits_finite"]
    # transformers reads the quantization_config back to the same dict it would write.
    assert unsloth_report["quantization_config"] == split_layout_config(REAL_20B)["quantization_config"]


def test_stock_classes_do_not_fit_the_layout_so_the_clean_report_means_something(unsloth_report):
    assert unsloth_report["stock_info"]["unexpected_keys"] and unsloth_report["stock_info"]["missing_keys"]
    assert unsloth_report["stock"]["experts_4bit"] is False
