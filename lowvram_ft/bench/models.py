"""Where cases get their models: the embedded model, a user's folder, or a random-weight model built
from a bundled config.json (speed and memory do not depend on the weight values) — as a checkpoint in
the layout the case's stack loads, built once per run on the GPU in a child process, or directly in GPU
memory inside the case process."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from .. import folders
from ..gptoss_checkpoint import build_split_checkpoint
from ..gptoss_tokenizer import load_gptoss_tokenizer
from ..model import resolve_model_path
from .matrix import RANDOM_MODELS, BenchError, Case, model_route, random_model_config
from .processes import log_tail, run_process
from .report import log


class ModelStore:
    """Local folders of the models cases load: the embedded model, a user's folder, or a random-weight
    checkpoint in the layout the case's stack loads (model_route), built once per run on the GPU in a
    child process and removed afterwards unless it was cached before. A stack that builds its random
    model in memory needs no folder."""

    def __init__(self, device: dict, log_dir: Path, console):
        self.device, self.log_dir, self.console = device, log_dir, console
        self.paths: dict[tuple[str, str], str] = {}
        self.failed: dict[tuple[str, str], str] = {}
        self.built: list[Path] = []

    def path_for(self, case: Case) -> str:
        """The folder the case loads its model from, "" for a model built in memory; BenchError
        (remembered: a failed build is not retried per case)."""
        key = (case.model, model_route(case))
        if key in self.failed:
            raise BenchError(self.failed[key])
        if key not in self.paths:
            try:
                self.paths[key] = self.resolve(*key)
            except Exception as error:  # noqa: BLE001 — every case of this model becomes an error record
                self.failed[key] = f"{case.model}: {error}" if not isinstance(error, BenchError) else str(error)
                raise BenchError(self.failed[key]) from None
        return self.paths[key]

    def resolve(self, model: str, route: str) -> str:
        if route in ("in-memory", "split-bnb4", "bf16") and self.device["kind"] != "cuda":
            raise BenchError(f"{model}: random-weight models are built on the GPU; this machine has none")
        if route == "in-memory":
            return ""
        if route != "folder":
            return str(self.random_checkpoint(model, route))
        path = resolve_model_path(model)
        if not Path(path).is_dir():
            raise BenchError(f"{model}: benchmark models are local folders, 'embedded' or one of "
                             f"{', '.join(RANDOM_MODELS)} — download Hub models first")
        return path

    def random_checkpoint(self, key: str, layout: str) -> Path:
        target = random_checkpoint_dir(key, layout)
        if (target / "config.json").is_file():
            return target
        log(self.console, f"building {key} ({RANDOM_MODELS[key]['about']}, {layout} layout) in {target} ...")
        log_file = self.log_dir / f"build-{key}-{layout}.log"
        code = run_process([sys.executable, "-m", "lowvram_ft.bench", "--build", key, "--layout", layout,
                            "--model-dir", str(target)], log_file, 3600)
        if code != 0 or not (target / "config.json").is_file():
            raise BenchError(f"{key}: building the random-weight model failed — see {log_file}: {log_tail(log_file)}")
        self.built.append(target)
        return target

    def clean_up(self) -> None:
        """Random checkpoints are tens of GB: keep them only when LOWVRAM_FT_BENCH_KEEP_MODELS=1."""
        if os.environ.get("LOWVRAM_FT_BENCH_KEEP_MODELS") == "1":
            return
        for path in self.built:
            shutil.rmtree(path, ignore_errors=True)


def random_models_dir() -> Path:
    return folders.cache_root() / "bench-models"


def random_checkpoint_dir(model: str, layout: str) -> Path:
    """The cache folder of a random model's checkpoint. The layout is in the name, so a folder of another
    layout (the fused bf16 gpt-oss checkpoints of earlier versions) is never reused."""
    return random_models_dir() / f"random-{model.removesuffix('-random')}-{layout}"


def build_random_checkpoint(model: str, layout: str, out_dir: Path) -> Path:
    """The random model's checkpoint in `layout` (the --build mode, run on the GPU in a child process):
    "split-bnb4" through gptoss_checkpoint.build_split_checkpoint, "bf16" through build_random_model."""
    config = random_model_config(model)
    if layout == "split-bnb4":
        return build_split_checkpoint(config, out_dir, seed=0)
    return build_random_model(config, out_dir)


def build_random_model(config: dict, out_dir: Path, device: str | None = None) -> Path:
    """Save a random-weight checkpoint (bf16 safetensors, created directly on the device) with the
    offline o200k_harmony tokenizer, atomically (built in a sibling folder, then renamed)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model = build_in_memory(config, "bfloat16", device, seed=0)
        model.save_pretrained(staging, max_shard_size="4GB")
        del model
        load_gptoss_tokenizer().save_pretrained(staging)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def build_in_memory(config: dict, dtype: str, device: str, seed: int):
    """A random-weight model created directly on `device` from a config.json dict (no file): what the
    hf stack's bf16 recipe would load, without writing and reading 39 GiB. gpt-oss gets eager attention,
    as in the OpenAI cookbook; the cache is off for training."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "eager"} if config.get("model_type") == "gpt_oss" else {}
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(config, use_cache=False), dtype=getattr(torch, dtype), **kwargs)
    return model


def hf_config(config: dict, **changes):
    """transformers' config object of a config.json dict."""
    from transformers import AutoConfig

    settings = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "transformers_version")}
    return AutoConfig.for_model(config["model_type"], **{**settings, **changes})
