"""Rendering and masking one row: token ids and labels (IGNORE_INDEX where not trained) under the
Harmony renderer or the tokenizer's chat template, data.train_on and data.overlength. Pure: a tokenizer
and plain values in, ids and labels out."""
from __future__ import annotations

from ..config import CHAT_TEMPLATE_NAMES
from ..conversation import Conversation
from ..harmony import IGNORE_INDEX, HarmonyOptions, encode, render_training
from .rows import PlainText

HARMONY_MARKERS = ("<|start|>", "<|channel|>", "<|message|>")  # a tokenizer with these renders Harmony
# Reasoning for chat templates that have no place for it (ChatML as SmolLM2 ships it, many Llama / Mistral
# templates): the closing assistant turn's content is THINK_OPEN + reasoning + THINK_CLOSE + answer, the
# form Qwen3 and DeepSeek-R1 generate, which evaluation, chat and `generate --json` parse back
# (evaluate.generation.parse_output). Earlier assistant turns keep only their answer, as under Harmony.
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
REASONING_PROBE = "lowvram-ft-reasoning-probe"


def choose_renderer(tokenizer) -> str | None:
    """'harmony' for tokenizers with Harmony's special tokens, 'chat_template' for any other with a
    template, None when the tokenizer cannot render conversations."""
    unknown = {None, getattr(tokenizer, "unk_token_id", None)}
    if all(tokenizer.convert_tokens_to_ids(t) not in unknown for t in HARMONY_MARKERS):
        return "harmony"
    return "chat_template" if getattr(tokenizer, "chat_template", None) else None


def no_chat_template(tokenizer) -> str:
    """The one line for a tokenizer that cannot render conversations, naming the templates it can be given."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return (f"{name}: the tokenizer has no chat template, so conversations cannot be rendered — set "
            f"data.chat_template to one of Unsloth's ({', '.join(CHAT_TEMPLATE_NAMES)}), use a model that ships "
            "one, or pass --tokenizer gpt-oss to render Harmony for gpt-oss")


def render_ids(item: Conversation | PlainText, tokenizer, settings: dict, notes: dict) -> tuple[list[int], list[int]]:
    """Token ids and labels of one row under the configured renderer and data.train_on."""
    if isinstance(item, PlainText):
        ids = tokenizer(item.text)["input_ids"]
        end = settings["text_end_id"]
        if end is not None and (not ids or ids[-1] != end):
            ids = ids + [end]
        return ids, list(ids)
    if settings["renderer"] == "harmony":
        options = HarmonyOptions(reasoning_effort=settings["reasoning_effort"], date=settings["date"])
        return encode(select_trained(render_training(item, options), settings["train_on"]), tokenizer)
    return chat_template_ids(item, tokenizer, settings["train_on"], notes, settings.get("reasoning") == "inline")


def select_trained(segments: list[tuple[str, bool]], train_on: str) -> list[tuple[str, bool]]:
    """data.train_on over (text, trained) segments whose trained runs are the assistant turns:
    assistant = as rendered, last_assistant = only the last trained run, all = everything."""
    if train_on == "all":
        return [(text, True) for text, _ in segments]
    if train_on == "last_assistant":
        last = max((i for i, (_, trained) in enumerate(segments) if trained), default=-1)
        return [(text, trained and i == last) for i, (text, trained) in enumerate(segments)]
    return segments


def chat_template_ids(conv: Conversation, tokenizer, train_on: str, notes: dict,
                      inline_reasoning: bool = False) -> tuple[list[int], list[int]]:
    """Ids of the whole rendered conversation; assistant spans found by rendering growing prefixes.

    For assistant turn i: its text starts where the render of messages[:i] with the generation prompt
    ends, and ends with its stop token (or where the render of messages[:i+1] ends) — provided both are
    prefixes of the whole render (assistant_span). Templates that rewrite history (dropping earlier
    reasoning) are handled there; a turn that still cannot be located stays untrained and is counted.
    """
    messages = chat_messages(conv, inline_reasoning)
    full = render_chat(tokenizer, messages, False)
    spans = [assistant_span(tokenizer, messages, i, full) for i, m in enumerate(messages) if m["role"] == "assistant"]
    notes["untrained_turns"] = sum(span is None for span in spans)
    located = [span for span in spans if span is not None]
    if not located:
        raise ValueError("the chat template renders no assistant turn where expected (it may rewrite the history)")
    closing = conv.turns()[-1] if conv.turns() else None
    if closing and closing.role == "assistant" and closing.thinking and closing.thinking.strip() not in full:
        notes["reasoning_dropped"] = True
    segments, cursor = [], 0
    for start, end in located:
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    segments = select_trained([s for s in segments if s[0]], train_on)
    return encode_by_offsets(segments, tokenizer)


def chat_messages(conv: Conversation, inline_reasoning: bool = False) -> list[dict]:
    """Messages for apply_chat_template: one system message (with the reasoning-language line),
    reasoning under both keys templates use (reasoning_content: Qwen/DeepSeek; thinking: gpt-oss) —
    or, with `inline_reasoning` (a template with no place for it, `reasoning_inline`), written into
    the content of the closing assistant turn between THINK_OPEN and THINK_CLOSE, and left out of
    every earlier assistant turn."""
    instructions = conv.developer_text()
    messages = [{"role": "system", "content": instructions}] if instructions else []
    turns = conv.turns()
    for i, m in enumerate(turns):
        message = {"role": m.role, "content": m.content}
        if m.thinking and not inline_reasoning:
            message.update(reasoning_content=m.thinking, thinking=m.thinking)
        elif m.thinking and i == len(turns) - 1:
            message["content"] = f"{THINK_OPEN}{m.thinking.strip()}{THINK_CLOSE}{m.content}"
        messages.append(message)
    return messages


def reasoning_inline(tokenizer) -> bool:
    """Whether the tokenizer's chat template has no place for reasoning (it drops `reasoning_content` /
    `thinking`), so that chat_messages must write it inline."""
    probe = [{"role": "user", "content": "x"},
             {"role": "assistant", "content": "y", "reasoning_content": REASONING_PROBE, "thinking": REASONING_PROBE}]
    return REASONING_PROBE not in render_chat(tokenizer, probe, False)


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_span(tokenizer, messages: list[dict], index: int, full: str) -> tuple[int, int] | None:
    """Where assistant turn `index` lies in `full`, the render of the whole conversation; None when the
    template's output does not let it be located.

    It starts where the render of the history with the generation prompt ends (so the training text
    holds exactly the prompt the model is given at inference) and ends just after its first stop token
    (the tokenizer's eos): generation stops there, so glue the template writes after it (ChatML's
    newline) is context, not trained. The turn's text is found as the render of messages[:index+1]
    that is a prefix of `full`, with its reasoning or without it (templates that drop the reasoning of
    earlier turns); else, for templates that render a closing turn unlike a history turn (Qwen3 gives
    a closing turn without reasoning an empty <think></think>), as what precedes the next message,
    up to its stop token.
    """
    prompt = render_chat(tokenizer, messages[:index], True)
    if not full.startswith(prompt):
        return None
    start = len(prompt)
    for message in (messages[index], without_reasoning(messages[index])):
        upto = render_chat(tokenizer, messages[:index] + [message], False)
        if full.startswith(upto) and len(upto) > start:
            return start, through_stop(full, start, len(upto), tokenizer.eos_token) or len(upto)
    if index + 1 < len(messages):
        upto = render_chat(tokenizer, messages[:index + 2], False)
        end = through_stop(full, start, len(upto), tokenizer.eos_token) if full.startswith(upto) else None
        return (start, end) if end else None
    return None


def through_stop(text: str, start: int, end: int, stop: str | None) -> int | None:
    """The position just after the first `stop` in text[start:end], or None."""
    found = text.find(stop, start, end) if stop else -1
    return found + len(stop) if found >= 0 else None


def without_reasoning(message: dict) -> dict:
    return {k: v for k, v in message.items() if k not in ("reasoning_content", "thinking")}


def encode_by_offsets(segments: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    """Tokenize the joined text once (the ids a model sees for it), labelling each token by the segment
    its first character falls in. Tokenizers without offsets tokenize segment by segment instead."""
    if not getattr(tokenizer, "is_fast", False):
        return encode(segments, tokenizer)
    text = "".join(t for t, _ in segments)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained_at = [False] * (len(text) + 1)
    position = 0
    for t, trained in segments:
        if trained:
            trained_at[position:position + len(t)] = [True] * len(t)
        position += len(t)
    ids = encoded["input_ids"]
    labels = [i if trained_at[start] else IGNORE_INDEX for i, (start, _) in zip(ids, encoded["offset_mapping"])]
    return ids, labels


def fit_length(ids: list[int], labels: list[int], max_length: int, overlength: str) -> tuple[list[int], list[int], str]:
    """data.overlength for one row: (ids, labels, status). Truncation cuts from the end; a row left
    without a trained token is dropped, not trained on."""
    if not any(label != IGNORE_INDEX for label in labels):
        return [], [], "dropped:no trained tokens"
    if len(ids) <= max_length:
        return ids, labels, "ok"
    if overlength == "error":
        return [], [], "overlength"
    if overlength == "drop":
        return [], [], "dropped:longer than model.max_seq_length"
    ids, labels = ids[:max_length], labels[:max_length]
    if not any(label != IGNORE_INDEX for label in labels):
        return [], [], "dropped:no trained token left after truncation"
    return ids, labels, "truncated"
