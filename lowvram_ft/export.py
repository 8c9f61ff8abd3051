"""Export a trained run: `export(run_dir, fmt)` through Unsloth's savers, with a model card.

check everything that can fail early (format on this device, llama.cpp, Hub token and network, memory
and disk) → load base + adapter through Unsloth → save into a staging folder → write the model card →
rename into place → optionally upload. The checks and the model card are pure functions of plain
values, tested without a model.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .device import detect_device
from .io import GIB
from . import embedded, folders, model as models
from .config import EMBEDDED_MODELS, to_yaml
from .terminal import log
from .evaluate import run_config
from .model import load_bits, load_model, looks_like_path
from .plan import count_parameters, model_config_for, PlanError

FORMATS = ("lora", "merged-16bit", "merged-4bit", "mxfp4", "gguf")
# Our format name -> Unsloth's save_method. "merged_4bit" alone is refused by Unsloth as a guard against
# merging into 4-bit by mistake; choosing --format merged-4bit is that explicit choice.
SAVE_METHODS = {"lora": "lora", "merged-16bit": "merged_16bit", "merged-4bit": "merged_4bit_forced", "mxfp4": "mxfp4"}
# What Unsloth's CPU backend (unsloth_zoo.cpu) can write: adapters, a 16-bit merge, and GGUF from that merge.
CPU_FORMATS = ("lora", "merged-16bit", "gguf")
GGUF_DEFAULT_QUANT = "q8_0"
# Data sets whose licence we know; anything else is reported as unknown rather than guessed.
DATASET_LICENSES = {
    "sample": ("the lowvram_ft sample set (written for this project)", "Apache-2.0"),
    "HuggingFaceH4/Multilingual-Thinking": ("HuggingFaceH4/Multilingual-Thinking", "Apache-2.0"),
}
HUB_HOST_DEFAULT = "https://huggingface.co"


class ExportError(UserError, RuntimeError):
    """An export that cannot be done as asked; one line that says why and what to do."""


@dataclass(frozen=True)
class Needs:
    """Estimated free resources an export needs, in bytes (0 = not checked)."""

    disk: float
    ram: float
    vram: float


# --------------------------------------------------------------------------- the story


def export(run_dir: Path, fmt: str, out: Path | None = None, push: str | None = None, public: bool = False,
           overwrite: bool = False, gguf_quant: str = GGUF_DEFAULT_QUANT, console=None) -> Path:
    """Write RUN's adapter in `fmt` to `out` (default RUN/export/FMT), with README.md; returns the folder."""
    from rich.console import Console

    console = console or Console(highlight=False, soft_wrap=True, stderr=True)
    run_dir = Path(run_dir)
    cfg = run_config(run_dir, [])
    adapter = adapter_dir(run_dir)
    out = Path(out) if out else run_dir / "export" / fmt
    # The run read and the folder written are in use until the export ends (no train --overwrite meanwhile).
    with folders.hold(run_dir, "exporting"), folders.hold(out, "exporting"):
        token = check_request(fmt, out, overwrite, push)  # nothing heavy imported yet

        models.import_unsloth()
        device = detect_device()
        log(console, "device", device.reason)
        problem = format_problem(fmt, device.kind)
        if problem:
            raise ExportError(problem)
        check_resources(fmt, cfg, device, adapter, out, console)

        model, tokenizer = load_run_model(cfg, device, adapter)
        log(console, "model", f"{cfg.model.name} + adapter {adapter}")
        write_export(model, tokenizer, fmt, run_dir, cfg, out, gguf_quant)
        log(console, "export", f"{fmt} written to {out} ({folder_gib(out):.3f} GiB)")
        if push:
            url = upload(out, push, token, private=not public)
            log(console, "push", f"uploaded to {url} ({'public' if public else 'private'})")
    return out


def write_export(model, tokenizer, fmt: str, run_dir: Path, cfg, out: Path, gguf_quant: str) -> None:
    """Save, add the model card and the config, then rename into `out`: no half-written export is left,
    an earlier export in `out` is replaced only now, and folders made for `out` go again on failure."""
    made = folders.make_dirs(out.parent)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        written = save(model, tokenizer, fmt, staging, gguf_quant)
        eval_md = run_dir / "eval.md"
        card = model_card(cfg, read_json(run_dir / "summary.json"),
                          eval_md.read_text(encoding="utf-8") if eval_md.is_file() else None, fmt, run_dir)
        (written / "README.md").write_text(card, encoding="utf-8")
        shutil.copyfile(run_dir / "config.yaml", written / "lowvram_ft_config.yaml")
        folders.mark(written, "export")
        folders.swap_into(written, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(sibling(staging, fmt), ignore_errors=True)
        folders.remove_made(made)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(sibling(staging, fmt), ignore_errors=True)


# --------------------------------------------------------------------------- checks before any work


def check_request(fmt: str, out: Path, overwrite: bool, push: str | None) -> str | None:
    """What can be refused from the arguments alone: the destination, the push (returns its token) and,
    for GGUF, llama.cpp (pointed out to Unsloth when found)."""
    check_destination(out, overwrite)
    token = check_push(push, os.environ) if push else None
    if fmt == "gguf":
        llama_cpp = find_llama_cpp(os.environ)
        if llama_cpp is None:
            raise ExportError(LLAMA_CPP_MISSING)
        use_llama_cpp(llama_cpp)
    return token


def adapter_dir(run_dir: Path) -> Path:
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"{run_dir}: no adapter/adapter_config.json — pass the --output folder of a finished train run")
    return adapter


def check_destination(out: Path, overwrite: bool) -> None:
    """Only an empty folder or an earlier export of ours (with --overwrite) may be written."""
    try:
        folders.refuse_foreign(out, "export", "--out")
    except folders.FolderError as error:
        raise ExportError(str(error)) from None
    if folders.kind_of(out) == "run":
        raise ExportError(f"{out}: holds a train run, not an export — choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: already holds an export — pass --overwrite to replace it, or another --out")


def format_problem(fmt: str, device_kind: str) -> str | None:
    """Why `fmt` cannot be written on this device, or None."""
    if fmt not in FORMATS:
        return f"--format {fmt}: unknown — accepted: {', '.join(FORMATS)}"
    if device_kind != "cuda" and fmt not in CPU_FORMATS:
        return (f"--format {fmt} needs a CUDA GPU: Unsloth's CPU backend writes only lora and merged-16bit "
                f"(and gguf from that merge) — run this export on a GPU machine, or choose one of {', '.join(CPU_FORMATS)}")
    return None


LLAMA_CPP_MISSING = (
    "--format gguf needs llama.cpp (llama-quantize and convert_hf_to_gguf.py in one folder), found in neither "
    "LLAMA_CPP_DIR, UNSLOTH_LLAMA_CPP_PATH, ~/.unsloth/llama.cpp, ./llama.cpp nor PATH — get it with "
    "`git clone https://github.com/ggml-org/llama.cpp && cmake -S llama.cpp -B llama.cpp/build && "
    "cmake --build llama.cpp/build --target llama-quantize -j && cp llama.cpp/build/bin/llama-quantize llama.cpp/` "
    "and set LLAMA_CPP_DIR=$PWD/llama.cpp")


def find_llama_cpp(env, which=shutil.which, home: Path | None = None, cwd: Path | None = None) -> Path | None:
    """The llama.cpp folder holding both llama-quantize and convert_hf_to_gguf.py (what Unsloth's GGUF
    export runs), from LLAMA_CPP_DIR, UNSLOTH_LLAMA_CPP_PATH, ~/.unsloth/llama.cpp, ./llama.cpp or PATH."""
    home = home or Path.home()
    cwd = cwd or Path.cwd()
    folders = [env.get("LLAMA_CPP_DIR"), env.get("UNSLOTH_LLAMA_CPP_PATH"), home / ".unsloth" / "llama.cpp",
               cwd / "llama.cpp"]
    quantizer = which("llama-quantize")
    if quantizer:
        folders.append(Path(quantizer).resolve().parent)
    for folder in folders:
        if folder and is_llama_cpp(Path(folder)):
            return Path(folder)
    return None


def is_llama_cpp(folder: Path) -> bool:
    quantizer = folder / "llama-quantize"
    return (folder / "convert_hf_to_gguf.py").is_file() and quantizer.is_file() and os.access(quantizer, os.X_OK)


def use_llama_cpp(folder: Path) -> None:
    """Point Unsloth's GGUF export at this llama.cpp (read when unsloth_zoo is imported), so it neither
    clones nor builds nor downloads one."""
    os.environ["UNSLOTH_LLAMA_CPP_PATH"] = str(folder)
    os.environ.setdefault("UNSLOTH_LLAMA_CPP_SCRIPTS_DIR", str(folder))


def check_push(repo: str, env, whoami=None) -> str:
    """The Hub token to push `repo` with; ExportError (one line) when the push cannot happen. Runs before
    any export work, so nothing is written or uploaded when it fails. The token is checked with the Hub
    itself (`whoami`, by default HfApi.whoami): unreachable, rejected or read-only all stop here."""
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise ExportError(f"--push {repo}: expected a Hub repository id like user/name")
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        raise ExportError(f"--push {repo}: no Hugging Face token — set HF_TOKEN (a write token from "
                          "https://huggingface.co/settings/tokens); nothing was exported or uploaded")
    if env.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off"):
        raise ExportError(f"--push {repo}: HF_HUB_OFFLINE is set — unset it on a machine with network to upload; "
                          "nothing was exported or uploaded")
    endpoint = env.get("HF_ENDPOINT") or HUB_HOST_DEFAULT
    problem = token_problem(token, endpoint, whoami or hub_whoami)
    if problem:
        raise ExportError(f"--push {repo}: {problem}; nothing was exported or uploaded")
    return token


def hub_whoami(token: str, endpoint: str) -> dict:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token).whoami()


def token_problem(token: str, endpoint: str, whoami) -> str | None:
    """Why `token` cannot push to `endpoint` (None when it can), from the Hub's own answer."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    try:
        identity = whoami(token, endpoint)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            return (f"{endpoint} rejected the token in HF_TOKEN (401) — create a write token at "
                    "https://huggingface.co/settings/tokens")
        return f"{endpoint} answered {status or type(error).__name__} to the token check — retry later"
    except (httpx.HTTPError, OSError) as error:
        return f"cannot reach {endpoint} ({type(error).__name__}) — check the network (or HF_ENDPOINT)"
    role = ((identity.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        return (f"the token in HF_TOKEN (user {identity.get('name', '?')}) is read-only — create a write token at "
                "https://huggingface.co/settings/tokens")
    return None


def export_needs(fmt: str, parameters: int, device_kind: str, weight_bytes: float, adapter_bytes: int) -> Needs:
    """Free disk / RAM / VRAM an export needs, estimated from the parameter count × bytes per parameter.

    lora writes the adapter only. On CPU, Unsloth merges in a deep copy of the loaded model and casts it to
    16 bits (loaded + copy + 16-bit: RAM = params × (2 × weight bytes + 2)); on a GPU it merges layer by
    layer from the 16-bit base checkpoint (VRAM = the loaded model; RAM = two 5 GB shards). GGUF stages
    the merge (fp32 on CPU, 16-bit on GPU) before converting it to q8_0 (~1.07 bytes/param).
    """
    if fmt == "lora":
        return Needs(disk=2 * adapter_bytes, ram=0, vram=0)
    staged = 4 if (fmt == "gguf" and device_kind != "cuda") else 2
    disk = {"merged-16bit": 2, "merged-4bit": 0.6, "mxfp4": 2 + 0.55, "gguf": staged + 1.07}[fmt] * parameters
    if device_kind != "cuda":
        return Needs(disk=disk, ram=parameters * (2 * weight_bytes + 2), vram=0)
    return Needs(disk=disk, ram=min(parameters * 2, 2 * 5e9), vram=parameters * weight_bytes)


def resource_problems(fmt: str, needs: Needs, free: Needs, where: Path) -> list[str]:
    """One line per resource that is short: what is needed, what is free, what to do."""
    problems = []
    for kind, need, have, fix in (
        ("disk", needs.disk, free.disk, f"free space in {where} or pass --out on a larger disk"),
        ("RAM", needs.ram, free.ram, "close other programs or export on a machine with more memory"),
        ("VRAM", needs.vram, free.vram, "free the GPU (other processes hold it) or use a larger GPU"),
    ):
        if need and have is not None and need > have:
            problems.append(f"--format {fmt} needs about {need / GIB:.2f} GiB free {kind}, "
                            f"{have / GIB:.2f} GiB free — {fix}")
    return problems


def check_resources(fmt: str, cfg, device, adapter: Path, out: Path, console) -> None:
    """Estimate what the export needs and compare it with what is free, before loading anything."""
    import psutil

    parameters = base_parameters(cfg.model.name, adapter)
    if parameters is None:
        log(console, "check", "model size unknown (no config.json to count parameters): memory and disk not checked")
        return

    bits = load_bits(cfg, device)
    weight_bytes = {"4bit": 0.55, "8bit": 1.05}.get(bits, 2 if device.kind == "cuda" or device.bf16 else 4)
    needs = export_needs(fmt, parameters, device.kind, weight_bytes, folder_bytes(adapter))
    where = existing_parent(out)
    free = Needs(disk=shutil.disk_usage(where).free, ram=psutil.virtual_memory().available,
                 vram=free_vram() if device.kind == "cuda" else None)
    log(console, "check", f"{parameters:,} parameters: needs about {needs.disk / GIB:.2f} GiB disk "
        f"({free.disk / GIB:.1f} free), {needs.ram / GIB:.2f} GiB RAM ({free.ram / GIB:.1f} free)"
        + (f", {needs.vram / GIB:.2f} GiB VRAM ({free.vram / GIB:.1f} free)" if free.vram is not None else ""))
    problems = resource_problems(fmt, needs, free, where)
    if problems:
        raise ExportError("; ".join(problems))


def base_parameters(name: str, adapter: Path) -> int | None:
    """Parameter count of the base model from its config.json (the planner's exact count), or None."""
    base = name
    config = read_json(adapter / "adapter_config.json")
    if name != "embedded" and config.get("base_model_name_or_path"):
        base = config["base_model_name_or_path"]
    try:
        return count_parameters(model_config_for(base)).total
    except (PlanError, ValueError, KeyError):
        return None


def free_vram() -> float:
    import torch

    return float(torch.cuda.mem_get_info()[0])


# --------------------------------------------------------------------------- loading and saving


def load_run_model(cfg, device, adapter: Path):
    """Base model + the run's adapter, through Unsloth (which attaches its savers to the model)."""
    import dataclasses

    return load_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(adapter))), device)


def save(model, tokenizer, fmt: str, staging: Path, gguf_quant: str) -> Path:
    """Write `fmt` into `staging` with Unsloth's saver; returns the folder holding the result."""
    if fmt == "gguf":
        model.save_pretrained_gguf(str(staging), tokenizer, quantization_method=gguf_quant)
        # The 16-bit merge only fed llama.cpp's converter; the deliverable is the .gguf file(s).
        shutil.rmtree(staging / "merged_16bit", ignore_errors=True)
        return staging
    model.save_pretrained_merged(str(staging), tokenizer, save_method=SAVE_METHODS[fmt])
    # Unsloth's compressed exports (mxfp4 on a GPU) keep the 16-bit merge in the folder given and write
    # the quantized checkpoint next to it as FOLDER-mxfp4: that one is the deliverable.
    quantized = sibling(staging, fmt)
    if quantized.is_dir():
        shutil.rmtree(staging)
        return quantized
    return staging


def sibling(folder: Path, fmt: str) -> Path:
    return folder.with_name(f"{folder.name}-{fmt}")


def upload(folder: Path, repo: str, token: str, private: bool) -> str:
    """Create the repository (private unless asked otherwise) and upload the export folder."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message="Upload lowvram_ft export")
    except Exception as error:  # noqa: BLE001 — network / permission errors become one line
        raise ExportError(f"--push {repo}: upload failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}) "
                          f"— the export is complete in {folder}; retry the push with `hf upload {repo} {folder}`") from None
    return getattr(info, "repo_url", None) or f"https://huggingface.co/{repo}"


# --------------------------------------------------------------------------- the model card


def model_card(cfg, summary: dict, eval_md: str | None, fmt: str, run_dir: Path) -> str:
    """README.md for an export: base model, data and licences, training summary, the before/after
    reasoning-language table (when the run has one), the resolved config and how to reproduce it."""
    base = describe_base(cfg.model.name)
    datasets = [dataset_license(d) for d in cfg.data.dataset]
    lines = front_matter(cfg.model.name, fmt, [d for d in cfg.data.dataset if looks_like_hub_id(d)])
    lines += [
        f"# {run_dir.name} — {fmt} export",
        "",
        f"Fine-tuned with lowvram_ft (Unsloth + TRL) from **{base}**"
        + (f", LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}" if not cfg.model.full_finetuning else ", full fine-tuning")
        + f". Format: {FORMAT_TEXT[fmt]}",
        "",
        "## Data",
        "",
        "| data set | licence |",
        "|---|---|",
        *[f"| {name} | {licence} |" for name, licence in datasets],
        "",
        "## Training",
        "",
        *training_table(summary),
        "",
    ]
    if eval_md:
        lines += ["## Reasoning language, before vs after", "", demote_headings(eval_md).strip(), ""]
    lines += [
        "## Reproduce",
        "",
        "The resolved training config is `lowvram_ft_config.yaml` in this folder (also below).",
        "",
        "```bash",
        "python -m lowvram_ft train --config lowvram_ft_config.yaml --output runs/reproduced",
        f"python -m lowvram_ft export --run runs/reproduced --format {fmt}",
        "```",
        "",
        "## Resolved config",
        "",
        "```yaml",
        to_yaml(cfg).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


FORMAT_TEXT = {
    "lora": "LoRA adapter (PEFT safetensors) + tokenizer; load it on top of the base model with "
            "`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), this_folder)`.",
    "merged-16bit": "the adapter merged into 16-bit weights; loads with `AutoModelForCausalLM.from_pretrained`.",
    "merged-4bit": "the adapter merged into 4-bit (bitsandbytes) weights, for inference.",
    "mxfp4": "the adapter merged and quantized to MXFP4 (compressed-tensors), for vLLM.",
    "gguf": "GGUF for llama.cpp, Ollama and LM Studio (the adapter merged first).",
}


def front_matter(base: str, fmt: str, hub_datasets: list[str]) -> list[str]:
    """The Hub's YAML metadata block, written by huggingface_hub's ModelCardData."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=base if looks_like_hub_id(base) else None,
                         library_name={"lora": "peft", "gguf": "gguf"}.get(fmt, "transformers"),
                         datasets=hub_datasets or None,
                         tags=["lowvram_ft", "unsloth", "trl", "sft"] + (["lora"] if fmt == "lora" else []))
    return ["---", *data.to_yaml().splitlines(), "---", ""]


def describe_base(name: str) -> str:
    return embedded.describe(name) if name in EMBEDDED_MODELS else name


def dataset_license(source: str) -> tuple[str, str]:
    """(name, licence) of a data source; 'unknown' where we do not know it."""
    if source in DATASET_LICENSES:
        return DATASET_LICENSES[source]
    if looks_like_hub_id(source):
        return source, "unknown — check the data set's Hub page"
    return f"{Path(source).name} (local file)", "unknown"


def looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not looks_like_path(name) and not Path(name).exists()


def training_table(summary: dict) -> list[str]:
    """Steps, tokens, wall time, peak memory and device from summary.json."""
    if not summary:
        return ["No summary.json in the run folder (the run did not finish)."]
    device = summary.get("device") or {}
    memory = {"peak_reserved_vram": "peak reserved VRAM", "peak_rss": "peak RSS"}.get(
        summary.get("peak_memory_kind"), "peak memory")
    rows = [
        ("steps", summary.get("steps")),
        ("trained tokens (non-padding)", f"{summary['trained_tokens']:,}" if summary.get("trained_tokens") else None),
        ("final loss", f"{summary['final_loss']:.4f}" if summary.get("final_loss") is not None else None),
        ("wall time", f"{summary['wall_time_s']} s" if summary.get("wall_time_s") is not None else None),
        (memory, f"{summary['peak_memory_gib']} GiB" if summary.get("peak_memory_gib") is not None else None),
        ("device", device.get("reason") or device.get("name")),
    ]
    return ["| | |", "|---|---|", *[f"| {k} | {'—' if v is None else v} |" for k, v in rows]]


def demote_headings(markdown: str) -> str:
    """eval.md inside the card: its '# title' dropped, other headings one level down."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("# "):
            continue
        out.append("#" + line if line.startswith("#") else line)
    return "\n".join(out)


# --------------------------------------------------------------------------- small helpers


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def folder_gib(folder: Path) -> float:
    return folder_bytes(folder) / GIB


def existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path

