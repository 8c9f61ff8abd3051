"""Where a model's config.json comes from: a local folder or file, the configs bundled under
lowvram_ft/assets/model_configs, the Hub (unless HF_HUB_OFFLINE), or the embedded tiny model's recipe.
Each is checked on reading, so a bad value is reported with the file that holds it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import EMBEDDED_MODELS
from ..embedded import VOCAB_SIZE, recipe_for
from .inputs import PlanError
from .shapes import json_kind, model_shape
# Shipped with the package (pyproject package-data): config.json of the models the planner knows offline.
MODEL_CONFIG_DIR = Path(__file__).parent.parent / "assets" / "model_configs"

def resolve_model_config(model: str) -> dict:
    """config.json of `model`: a local folder (or config.json path), a bundled Hub id, or, when
    HF_HUB_OFFLINE is not set, config.json fetched from the Hub. Raises PlanError otherwise."""
    path = Path(os.path.expanduser(model))  # ~unknown-user stays as typed (Path.expanduser raises)
    if path.is_dir() and (path / "config.json").is_file():
        return _read_model_config(path / "config.json")
    if path.is_file() and path.name.endswith(".json"):
        return _read_model_config(path)
    if path.is_dir():
        raise PlanError(f"{model}: folder has no config.json; pass the model's folder or a bundled id")
    bundled = bundled_model_ids()
    match = next((name for name in bundled if name.lower() == model.lower()), None)
    if match:
        return _read_model_config(MODEL_CONFIG_DIR / bundled[match])
    downloaded = _download_config(model)
    if downloaded is not None:
        return downloaded
    raise PlanError(
        f"could not find config.json for {model!r}: not a local folder and not bundled "
        f"({', '.join(sorted(bundled))}); pass a local folder that holds config.json"
    )


def bundled_model_ids() -> dict[str, str]:
    """Hub id -> bundled config file name."""
    index = _read_json(MODEL_CONFIG_DIR / "index.json")
    return {name: file for name, file in index.items() if not name.startswith("_")}


def _read_json(path: Path) -> dict:
    """The JSON object in `path`; PlanError naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a JSON object, got {json_kind(data)} — pass the model's own config.json")
    return data


def _read_model_config(path: Path) -> dict:
    """config.json, checked now so that a bad value is reported with the file that holds it."""
    config = _read_json(path)
    model_shape(config, source=str(path))
    return config


def _download_config(model: str) -> dict | None:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no"):
        return None
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, "config.json"))
    except Exception:  # no network, no such repo, gated repo: the caller reports one line
        return None
    return _read_model_config(path)


def model_config_for(name: str) -> dict:
    """config.json of the configured model; the embedded tiny model is sized from its recipe."""
    if name in EMBEDDED_MODELS:
        recipe = recipe_for(name)
        return {"model_type": recipe.model_type, "vocab_size": VOCAB_SIZE, **recipe.shape}
    return resolve_model_config(name)
