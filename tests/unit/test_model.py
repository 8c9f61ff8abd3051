"""Model loading logic without loading a big model: paths, ids, load bits, trainable split, experts."""
from __future__ import annotations

import pytest

from lowvram_ft.config import load_config
from lowvram_ft.model import (
    Device,
    ModelError,
    check_trainable,
    explain_load_error,
    expert_target_parameters,
    load_bits,
    looks_like_path,
    parameter_group,
    resolve_model_path,
    ties_trained_embeddings,
)

CPU = Device("cpu", "cpu", None, False, "test")
GPU = Device("cuda", "NVIDIA H100", 79.2, True, "test")


@pytest.mark.parametrize("name, is_path", [
    ("unsloth/gpt-oss-20b", False), ("gpt2", False), ("./models/x", True), ("/abs/x", True),
    ("~/m", True), ("a/b/c", True), ("runs/x/", True), ("C:\\models", True),
])
def test_hub_ids_and_paths_are_told_apart(name, is_path):
    assert looks_like_path(name) is is_path


def test_resolve_model_path(tmp_path):
    assert resolve_model_path("unsloth/gpt-oss-20b") == "unsloth/gpt-oss-20b"
    with pytest.raises(ModelError, match="no such folder"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="folder has no config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    file = tmp_path / "config.json"
    with pytest.raises(ModelError, match="is a file"):
        resolve_model_path(str(file))


def test_load_bits_auto_is_4bit_on_gpu_and_16bit_on_cpu():
    cfg = load_config()
    assert load_bits(cfg, GPU) == "4bit"
    assert load_bits(cfg, CPU) == "16bit"
    assert load_bits(load_config(None, ["model.load_in=8bit"]), GPU) == "8bit"
    assert load_bits(load_config(None, ["model.full_finetuning=true"]), GPU) == "16bit"


def chained(outer: BaseException, cause: BaseException) -> BaseException:
    """`outer` raised from `cause`, as transformers re-raises the Hub's errors as OSError."""
    try:
        try:
            raise cause
        except BaseException as inner:
            raise outer from inner
    except BaseException as error:
        return error


def hub_error(kind, status: int):
    import httpx

    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))
    return kind("the Hub said no", response=response)


def test_load_errors_are_classified_by_the_hubs_typed_exceptions_anywhere_in_the_chain():
    from huggingface_hub import errors as hub

    offline = chained(OSError("We couldn't connect to 'https://huggingface.co' to load the files"),
                      hub.LocalEntryNotFoundError("not in cache"))
    unsloth_style = chained(RuntimeError("Unsloth: Failed to load model. Both AutoConfig and PeftConfig failed."),
                            chained(OSError("org/missing-model is not a local folder"),
                                    hub_error(hub.RepositoryNotFoundError, 404)))
    cases = {
        offline: "org/missing-model: cannot load this model from the Hugging Face Hub (offline or unreachable, and "
                 "not in the local cache) — download it where there is network (`hf download org/missing-model "
                 "--local-dir DIR`) and pass --model DIR",
        unsloth_style: "org/missing-model: no such model on the Hugging Face Hub (or a private one: set HF_TOKEN)",
        chained(OSError("gated"), hub_error(hub.GatedRepoError, 403)):
            "org/missing-model: a gated model — accept its terms on https://huggingface.co/org/missing-model",
        chained(OSError("revision"), hub_error(hub.RevisionNotFoundError, 404)):
            "org/missing-model: the requested revision does not exist on the Hub",
        chained(RuntimeError("load failed"), MemoryError()): "org/missing-model: out of memory while loading",
        ValueError("weights do not match the config"): "org/missing-model: could not be loaded (ValueError: weights",
    }
    for error, start in cases.items():
        text = str(explain_load_error("org/missing-model", error))
        assert "\n" not in text
        assert text.startswith(start), text
    # The text alone no longer decides: a message that merely mentions a 404 is not a missing repository.
    assert "could not be loaded" in str(explain_load_error("org/m", OSError("HTTP 404 while reading a local file")))


def test_parameter_groups():
    assert parameter_group("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == "attention"
    assert parameter_group("base_model.model.model.layers.0.mlp.experts.lora_B.default.weight") == "experts"
    assert parameter_group("base_model.model.lm_head.modules_to_save.default.weight") == "other"


def test_missing_experts_are_refused_for_moe():
    cfg = load_config()
    with pytest.raises(ModelError, match="no expert weight is trainable"):
        check_trainable({"attention": 10, "experts": 0, "other": 0, "trainable": 10, "all": 100}, cfg, is_moe=True)
    check_trainable({"attention": 10, "experts": 0, "other": 0, "trainable": 10, "all": 100}, cfg, is_moe=False)
    attention_only = load_config(None, ["lora.target_modules=[q_proj, v_proj]"])
    check_trainable({"attention": 10, "experts": 0, "other": 0, "trainable": 10, "all": 100}, attention_only, is_moe=True)
    with pytest.raises(ModelError, match="no trainable parameters"):
        check_trainable({"attention": 0, "experts": 0, "other": 0, "trainable": 0, "all": 100}, cfg, is_moe=False)


def test_expert_parameters_follow_the_requested_projections():
    """Fused gpt-oss experts are selected by the usual names, so the trainable set never depends on the device."""
    import torch

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 4, 8))
            self.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 4))

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()

    model = torch.nn.Module()
    model.mlp = Mlp()
    assert expert_target_parameters(model, ["q_proj", "gate_proj", "up_proj", "down_proj"]) == [
        "mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert expert_target_parameters(model, ["up_proj"]) == ["mlp.experts.gate_up_proj"]
    assert expert_target_parameters(model, ["q_proj", "v_proj"]) == []
    dense = torch.nn.Linear(4, 4)
    assert expert_target_parameters(dense, ["gate_proj", "down_proj"]) == []


def test_a_tied_pair_is_kept_tied_only_when_the_input_embedding_trains():
    from types import SimpleNamespace

    tied, untied = (SimpleNamespace(config=SimpleNamespace(tie_word_embeddings=t)) for t in (True, False))
    assert ties_trained_embeddings(tied, ["embed_tokens", "lm_head"])
    assert ties_trained_embeddings(tied, ["embed_tokens"])
    assert not ties_trained_embeddings(tied, ["lm_head"])  # as Unsloth's GPU path: nothing to tie it to
    assert not ties_trained_embeddings(tied, [])
    assert not ties_trained_embeddings(untied, ["embed_tokens", "lm_head"])  # Qwen3-8B, gpt-oss
