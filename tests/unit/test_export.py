"""Export without a run: the model card, the formats the CPU backend refuses, where llama.cpp is found,
the Hub push refused before any work, and what each format needs in memory and disk. What each format
writes and how it reloads outside lowvram_ft, on a trained embedded run: e2e/test_export.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENV
from lowvram_ft import export
from lowvram_ft.config import load_config, to_yaml


# --------------------------------------------------------------------------- the model card


def test_model_card_includes_the_evaluation_and_known_licences():
    cfg = load_config(None, ["model.name=unsloth/gpt-oss-20b",
                             "data.dataset=[HuggingFaceH4/Multilingual-Thinking, someone/else, my_rows.jsonl]"])
    summary = {"steps": 60, "trained_tokens": 123456, "final_loss": 1.23456, "wall_time_s": 600.5,
               "peak_memory_gib": 13.2, "peak_memory_kind": "peak_reserved_vram",
               "device": {"reason": "cuda:0 NVIDIA L4; GPU supports bf16"}}
    eval_md = "# Reasoning-language evaluation\n\nsettings\n\n## Before vs after\n\n| group | think before |\n"
    card = export.model_card(cfg, summary, eval_md, "merged-16bit", Path("runs/x"))
    assert card.startswith("---\nbase_model: unsloth/gpt-oss-20b\ndatasets:\n- HuggingFaceH4/Multilingual-Thinking\n"
                           "- someone/else\nlibrary_name: transformers\ntags:\n")
    assert "| HuggingFaceH4/Multilingual-Thinking | Apache-2.0 |" in card
    assert "| someone/else | unknown — check the data set's Hub page |" in card
    assert "| my_rows.jsonl (local file) | unknown |" in card
    assert "| trained tokens (non-padding) | 123,456 |" in card
    assert "| peak reserved VRAM | 13.2 GiB |" in card
    assert "| device | cuda:0 NVIDIA L4; GPU supports bf16 |" in card
    assert "## Reasoning language, before vs after\n\nsettings\n\n### Before vs after\n\n| group | think before |" in card
    assert "# Reasoning-language evaluation" not in card
    assert "```yaml\n" + to_yaml(cfg).rstrip() + "\n```" in card


# --------------------------------------------------------------------------- errors before any work


def test_formats_the_cpu_backend_cannot_write_are_refused_on_cpu():
    assert export.format_problem("lora", "cpu") is None
    assert export.format_problem("merged-16bit", "cpu") is None
    assert export.format_problem("merged-4bit", "cuda") is None
    for fmt in ("merged-4bit", "mxfp4"):
        line = export.format_problem(fmt, "cpu")
        assert line.startswith(f"--format {fmt} needs a CUDA GPU: Unsloth's CPU backend writes only lora and merged-16bit")


def test_llama_cpp_is_found_where_users_put_it(tmp_path):
    folder = tmp_path / "llama.cpp"
    folder.mkdir()
    (folder / "convert_hf_to_gguf.py").write_text("")
    quantizer = folder / "llama-quantize"
    quantizer.write_text("#!/bin/sh\n")
    nowhere = {"home": tmp_path / "home", "cwd": tmp_path / "cwd", "which": lambda name: None}
    assert export.find_llama_cpp({}, **nowhere) is None
    assert export.find_llama_cpp({"LLAMA_CPP_DIR": str(folder)}, **nowhere) is None  # llama-quantize not executable
    quantizer.chmod(0o755)
    assert export.find_llama_cpp({"LLAMA_CPP_DIR": str(folder)}, **nowhere) == folder
    assert export.find_llama_cpp({}, home=tmp_path / "home", cwd=tmp_path, which=lambda name: None) == folder
    assert export.find_llama_cpp({}, **{**nowhere, "which": lambda name: str(quantizer)}) == folder


def hub_answer(status: int):
    """A whoami that fails as the Hub does with `status`."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    def whoami(token, endpoint):
        response = httpx.Response(status, request=httpx.Request("GET", f"{endpoint}/api/whoami-v2"))
        raise HfHubHTTPError("Invalid user token.", response=response)
    return whoami


def unreachable(token, endpoint):
    import httpx

    raise httpx.ConnectError("[Errno -2] Name or service not known")


def test_push_is_refused_before_any_work_without_token_network_or_valid_id():
    online = {"HF_TOKEN": "hf_x"}
    writer = lambda token, endpoint: {"name": "me", "auth": {"accessToken": {"role": "write"}}}  # noqa: E731
    assert export.check_push("me/model", online, whoami=writer) == "hf_x"
    cases = {
        ("model", "hf_x", ""): "--push model: expected a Hub repository id like user/name",
        ("me/model", "", ""): "--push me/model: no Hugging Face token — set HF_TOKEN",
        ("me/model", "hf_x", "1"): "--push me/model: HF_HUB_OFFLINE is set",
    }
    for (repo, token, offline), start in cases.items():
        with pytest.raises(export.ExportError) as error:
            export.check_push(repo, {"HF_TOKEN": token, "HF_HUB_OFFLINE": offline}, whoami=writer)
        assert str(error.value).startswith(start)
    refusals = {
        unreachable: "--push me/model: cannot reach https://huggingface.co (ConnectError) — check the network",
        hub_answer(401): "--push me/model: https://huggingface.co rejected the token in HF_TOKEN (401)",
        hub_answer(503): "--push me/model: https://huggingface.co answered 503 to the token check",
        (lambda token, endpoint: {"name": "me", "auth": {"accessToken": {"role": "read"}}}):
            "--push me/model: the token in HF_TOKEN (user me) is read-only",
    }
    for whoami, start in refusals.items():
        with pytest.raises(export.ExportError) as error:
            export.check_push("me/model", online, whoami=whoami)
        assert str(error.value).startswith(start), str(error.value)
        assert str(error.value).endswith("nothing was exported or uploaded")


def test_the_token_check_asks_the_configured_endpoint():
    """The real HfApi.whoami against a closed local port (in a process whose Hub client is online): the
    endpoint in HF_ENDPOINT is the one asked."""
    code = ("from lowvram_ft import export\n"
            "try:\n"
            "    export.check_push('me/model', {'HF_TOKEN': 'hf_x', 'HF_ENDPOINT': 'http://127.0.0.1:9'})\n"
            "except export.ExportError as error:\n"
            "    print(error)\n")
    env = {**ENV, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("--push me/model: cannot reach http://127.0.0.1:9 (ConnectError)"), proc.stdout + proc.stderr


def test_model_card_front_matter_is_the_hubs_metadata():
    from huggingface_hub import ModelCard

    card = ModelCard("\n".join(export.front_matter("unsloth/gpt-oss-20b", "lora", ["HuggingFaceH4/Multilingual-Thinking"])))
    assert card.data.base_model == "unsloth/gpt-oss-20b"
    assert card.data.library_name == "peft"
    assert card.data.datasets == ["HuggingFaceH4/Multilingual-Thinking"]
    assert card.data.tags == ["lowvram_ft", "unsloth", "trl", "sft", "lora"]
    local = ModelCard("\n".join(export.front_matter("./runs/base", "merged-16bit", [])))
    assert local.data.base_model is None and local.data.library_name == "transformers"
    assert local.data.datasets is None


# --------------------------------------------------------------------------- memory and disk


def test_needs_are_parameters_times_bytes_and_shortfalls_name_the_amounts():
    gib = 2**30
    n = 20 * 10**9
    assert export.export_needs("merged-16bit", n, "cuda", 0.55, 0) == export.Needs(disk=2 * n, ram=1e10, vram=0.55 * n)
    assert export.export_needs("merged-16bit", n, "cpu", 2, 0) == export.Needs(disk=2 * n, ram=6 * n, vram=0)
    assert export.export_needs("gguf", n, "cpu", 4, 0).disk == pytest.approx(5.07 * n)
    assert export.export_needs("lora", n, "cuda", 0.55, 100) == export.Needs(disk=200, ram=0, vram=0)
    needs = export.Needs(disk=40 * gib, ram=8 * gib, vram=12 * gib)
    free = export.Needs(disk=10 * gib, ram=64 * gib, vram=10 * gib)
    assert export.resource_problems("merged-16bit", needs, free, Path("/data")) == [
        "--format merged-16bit needs about 40.00 GiB free disk, 10.00 GiB free — free space in /data or "
        "pass --out on a larger disk",
        "--format merged-16bit needs about 12.00 GiB free VRAM, 10.00 GiB free — free the GPU (other processes "
        "hold it) or use a larger GPU",
    ]
    assert export.resource_problems("lora", export.Needs(1, 0, 0), free, Path("/data")) == []
