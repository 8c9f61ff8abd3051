"""Generation shared by the evaluation and chat: the prompt by the renderer the model was trained with,
sampling under fixed seeds, cut at the stop token, and the completion split into reasoning and answer
(Harmony channels, or `<think>` tags for other models). Light at import: torch and PEFT load inside."""
from __future__ import annotations

from pathlib import Path

from ..config import EvalConfig
from ..conversation import Conversation
from ..data import chat_messages, no_chat_template, reasoning_inline, render_chat
from ..errors import UserError
from ..harmony import HarmonyOptions, render_prompt
from ..model import import_unsloth, input_device
from .scoring import parse_completion, parse_think



class PromptError(UserError, RuntimeError):
    """A model that cannot be prompted as trained (no chat template), or an adapter that is not one."""


def uses_harmony(tokenizer) -> bool:
    """gpt-oss-style tokenizers carry the Harmony control tokens; others use their own chat template."""
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in ("<|start|>", "<|channel|>", "<|message|>"))


def prompt_text(conv: Conversation, tokenizer, options: HarmonyOptions) -> str:
    """The generation prompt of a conversation, by the renderer that formats training data: Harmony for
    gpt-oss tokenizers (with `options`), else the tokenizer's own chat template."""
    if uses_harmony(tokenizer):
        return render_prompt(conv, options)
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(no_chat_template(tokenizer))
    return render_chat(tokenizer, chat_messages(conv, reasoning_inline(tokenizer)), True)


def stop_token_ids(tokenizer) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in ("<|return|>", "<|call|>") if t in vocab]
    return ids or [tokenizer.eos_token_id]


def generate(model, tokenizer, prompts: list[str], ev: EvalConfig, seed: int, streamer=None) -> list[dict]:
    """Completions (raw text with control tokens, whether a stop token ended them, new-token count).
    Batch b is sampled under seed + b, so two calls with the same prompts and seed draw alike.
    `streamer` (transformers' BaseStreamer interface, one prompt) receives the tokens as they come."""
    import torch

    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    tokenizer.padding_side = "left"
    device = input_device(model)
    results = []
    for b in range(0, len(prompts), ev.batch_size):  # eval.batch_size: bounded, eager-attention KV caches grow fast
        batch = tokenizer(prompts[b:b + ev.batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
        torch.manual_seed(seed + b)
        with torch.inference_mode():
            out = model.generate(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=ev.max_new_tokens, **sampling_kwargs(ev),
                eos_token_id=stops, pad_token_id=pad, streamer=streamer,
            )
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            results.append(cut_at_stop(row, stops, pad, tokenizer))
    return results


def sampling_kwargs(ev: EvalConfig) -> dict:
    """The sampling settings as generate() keyword arguments. Temperature 0 is greedy decoding (the
    limit of sampling as the temperature falls), which transformers wants as do_sample=False."""
    if ev.greedy or ev.temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": ev.temperature, "top_p": ev.top_p, "top_k": ev.top_k}


def cut_at_stop(ids: list[int], stops: list[int], pad: int, tokenizer) -> dict:
    """Decode new tokens up to and including the first stop token (padding after it removed)."""
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    kept = ids[: end + 1] if end is not None else [t for t in ids if t != pad] if pad not in stops else ids
    return {"completion": tokenizer.decode(kept, skip_special_tokens=False), "stopped": end is not None,
            "new_tokens": len(kept)}


def parse_output(text: str, stopped: bool, harmony: bool):
    """Split a completion into analysis and final: Harmony channels, or <think> tags for other models
    (Qwen3, DeepSeek-R1: `<think>reasoning</think>answer`; the opening tag may sit in the prompt).
    A completion still inside <think> is truncated when the token limit cut it, unparsed when the
    model ended its turn there without an answer; one without tags is an answer without reasoning."""
    if harmony:
        return parse_completion(text, stopped=not stopped)
    return parse_think(text, stopped)


def attach_adapter(model, adapter: str):
    """The saved LoRA adapter on top of the loaded base model (disable_adapter() gives the base back)."""
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise PromptError(f"{adapter}: no adapter_config.json — pass the run's adapter folder (RUN/adapter) or --run RUN")
    return PeftModel.from_pretrained(model, str(path), is_trainable=False)


def ready_for_generation(model):
    """Unsloth's inference mode, and no router logits: TRL turns them on to train with the MoE auxiliary
    loss, and generation must not compute them."""
    import_unsloth().FastLanguageModel.for_inference(model)
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False
    return model
