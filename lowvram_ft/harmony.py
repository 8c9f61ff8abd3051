"""Harmony, the chat format gpt-oss was trained on: one renderer for training rows and for prompts.

`render_training` gives a conversation's full Harmony text as (text, trained) segments, `render_prompt`
the generation prompt for the same conversation (exactly the untrained prefix of `render_training`),
`encode` turns segments into input ids and labels, and `chat_template` is the same renderer as a Jinja
chat template for tokenizers that render through `apply_chat_template`.

What is rendered, and why it differs from openai-harmony's defaults or the model's bundled template:
- the system message carries a fixed date (the bundled template writes today's, so nothing reproduces);
- instructions from system/developer turns go into the developer message under `# Instructions`,
  `reasoning language: X` first; no developer message at all when there is nothing to say;
- only the closing assistant turn keeps its analysis and ends with <|return|>; earlier assistant turns
  keep their final answer only, as gpt-oss sees them at inference;
- the trained tokens are everything each assistant turn generates after its `<|start|>assistant` header,
  both channels included (masking up to `...<|channel|>final<|message|>` would not train the analysis,
  which is the text that carries the reasoning language).

Pure string logic: no torch, no transformers.
"""
from __future__ import annotations

from dataclasses import dataclass

from lowvram_ft.conversation import REASONING_EFFORTS, Conversation, Message

ASSISTANT_HEADER = "<|start|>assistant"
# openai-harmony's wording for its default channel config (analysis, commentary, final).
CHANNELS_LINE = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips
# Text that would tokenize as Harmony structure if it appeared inside a message.
CONTROL_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>",
                  "<|call|>", "<|startoftext|>", "<|endoftext|>")

Segment = tuple[str, bool]


@dataclass(frozen=True)
class HarmonyOptions:
    """What the system message says. Defaults are openai-harmony's SystemContent defaults, except the
    date, which is fixed so that the same row always renders (and tokenizes) the same."""

    reasoning_effort: str = "medium"  # low | medium | high; a conversation's own effort wins
    date: str | None = "2025-08-05"  # "Current date: ..."; None leaves the line out, as openai-harmony does
    knowledge_cutoff: str = "2024-06"
    model_identity: str = "You are ChatGPT, a large language model trained by OpenAI."


def render_training(conv: Conversation, opts: HarmonyOptions = HarmonyOptions()) -> list[Segment]:
    """The conversation's complete Harmony text as (text, trained) segments, in order.

    Trained text is what the model generates in each assistant turn (after its `<|start|>assistant`);
    everything else is context. Segments split only where a special token begins or ends, so tokenizing
    them one by one gives exactly the ids of tokenizing their concatenation.
    """
    _check(conv, opts)
    turns = conv.turns()
    closes = _ends_on_assistant(turns)
    segments = [(_render_header(conv, opts), False)]
    for index, message in enumerate(turns):
        segments += _render_turn(message, closing=closes and index == len(turns) - 1)
    return _merge(segments)


def render_prompt(conv: Conversation, opts: HarmonyOptions = HarmonyOptions()) -> str:
    """The generation prompt: everything before the closing assistant turn (all of the conversation if it
    ends on another role), then `<|start|>assistant`. Equals the untrained prefix of render_training."""
    _check(conv, opts)
    turns = conv.turns()
    if _ends_on_assistant(turns):
        turns = turns[:-1]
    history = "".join(text for message in turns for text, _ in _render_turn(message, closing=False))
    return _render_header(conv, opts) + history + ASSISTANT_HEADER


def encode(segments: list[Segment], tokenizer, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the segments and their labels: the id where the segment is trained, -100 elsewhere.

    Every token is returned unless `max_length` is given, which keeps the first `max_length`; whether a
    row that long is cut or dropped is the caller's decision.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    if max_length is not None:
        return input_ids[:max_length], labels[:max_length]
    return input_ids, labels


def chat_template(opts: HarmonyOptions = HarmonyOptions()) -> str:
    """This module's renderer as a Jinja chat template for `tokenizer.apply_chat_template`.

    Messages are dicts with role, content and, for the assistant, thinking. Keyword arguments:
    reasoning_effort, reasoning_language, date, knowledge_cutoff, model_identity (defaults from `opts`)
    and add_generation_prompt. Without a generation prompt it renders the text of render_training joined;
    with one, the text of render_prompt (a closing assistant turn is then left out, as there).
    """
    defaults = {"effort": opts.reasoning_effort, "date": opts.date, "cutoff": opts.knowledge_cutoff,
                "identity": opts.model_identity}
    template = _CHAT_TEMPLATE
    for name, value in defaults.items():
        template = template.replace(f"@{name}@", _jinja_literal(value))
    return template


def _jinja_literal(value: str | None) -> str:
    """A Python string or None as a Jinja expression (Jinja string literals take Python escapes)."""
    return "none" if value is None else repr(value)


# @name@ placeholders are filled by chat_template(). Whitespace control (-) everywhere: only the
# {{ }} output reaches the text.
_CHAT_TEMPLATE = """\
{#- lowvram_ft Harmony template for gpt-oss (lowvram_ft/harmony.py renders the same text). -#}
{%- set effort = reasoning_effort if reasoning_effort is defined and reasoning_effort else @effort@ -%}
{%- set current_date = date if date is defined else @date@ -%}
{%- set cutoff = knowledge_cutoff if knowledge_cutoff is defined else @cutoff@ -%}
{%- set identity = model_identity if model_identity is defined else @identity@ -%}
{%- if effort not in ["low", "medium", "high"] -%}
    {{- raise_exception("reasoning_effort must be low, medium or high") -}}
{%- endif -%}
{{- "<|start|>system<|message|>" + identity + "\\nKnowledge cutoff: " + cutoff -}}
{%- if current_date -%}
    {{- "\\nCurrent date: " + current_date -}}
{%- endif -%}
{{- "\\n\\nReasoning: " + effort + "\\n\\n@channels@<|end|>" -}}
{#- Conversation.developer_text: the language line, a blank line unless the rest is blank, the rest. -#}
{%- set language = "reasoning language: " + reasoning_language if reasoning_language is defined and reasoning_language else "" -%}
{%- set instructions = messages | selectattr("role", "in", ["system", "developer"]) | map(attribute="content")
    | select | join("\\n\\n") -%}
{%- set separator = "\\n\\n" if language and instructions | trim else "" -%}
{%- if language or instructions -%}
    {{- "<|start|>developer<|message|># Instructions\\n\\n" + language + separator + instructions + "<|end|>" -}}
{%- endif -%}
{%- set turns = messages | rejectattr("role", "in", ["system", "developer"]) | list -%}
{%- set closes = turns | length > 0 and turns[-1].role == "assistant" -%}
{%- if closes and add_generation_prompt -%}
    {%- set turns = turns[:-1] -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if message.role == "user" -%}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" -}}
    {%- elif message.role == "assistant" and loop.last and closes and not add_generation_prompt -%}
        {%- if message.thinking -%}
            {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" -}}
        {%- endif -%}
        {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" -}}
    {%- elif message.role == "assistant" -%}
        {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" -}}
    {%- else -%}
        {{- raise_exception("role " + message.role + " cannot be rendered as Harmony: expected user or assistant") -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|start|>assistant" -}}
{%- endif -%}
""".replace("@channels@", CHANNELS_LINE)


def _ends_on_assistant(turns: tuple[Message, ...]) -> bool:
    return bool(turns) and turns[-1].role == "assistant"


def _check(conv: Conversation, opts: HarmonyOptions) -> None:
    """Refuse what cannot be rendered faithfully, naming the field, before any text is built."""
    effort = conv.reasoning_effort or opts.reasoning_effort
    if effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort {effort!r}: expected one of {', '.join(REASONING_EFFORTS)}")
    for message in conv.messages:
        if message.role not in ("system", "developer", "user", "assistant"):
            # A Harmony tool message needs the tool's name and the call it answers; Message carries neither.
            raise ValueError(f"role {message.role!r} cannot be rendered as Harmony: "
                             "expected system, developer, user or assistant")
        _check_text(message.content, message.role)
        _check_text(message.thinking or "", f"{message.role} thinking")


def _check_text(text: str, where: str) -> None:
    """Message text holding Harmony control tokens would tokenize as structure, not as text."""
    found = [token for token in CONTROL_TOKENS if token in text]
    if found:
        raise ValueError(f"{where} text contains Harmony control token {found[0]}; remove it from the data")


def _render_header(conv: Conversation, opts: HarmonyOptions) -> str:
    """The system message, then the developer message when there are instructions."""
    effort = conv.reasoning_effort or opts.reasoning_effort
    header = f"<|start|>system<|message|>{_system_text(effort, opts)}<|end|>"
    instructions = conv.developer_text()
    if instructions:
        header += f"<|start|>developer<|message|># Instructions\n\n{instructions}<|end|>"
    return header


def _system_text(effort: str, opts: HarmonyOptions) -> str:
    """openai-harmony's SystemContent text: identity, cutoff and date lines, reasoning, channels."""
    facts = [opts.model_identity, f"Knowledge cutoff: {opts.knowledge_cutoff}"]
    if opts.date:
        facts.append(f"Current date: {opts.date}")
    return "\n".join(facts) + f"\n\nReasoning: {effort}\n\n{CHANNELS_LINE}"


def _render_turn(message: Message, closing: bool) -> list[Segment]:
    """One user or assistant turn. The closing assistant turn keeps its analysis and ends in <|return|>."""
    if message.role == "user":
        return [(f"<|start|>user<|message|>{message.content}<|end|>", False)]
    generated = ""
    if closing and message.thinking:
        generated = f"<|channel|>analysis<|message|>{message.thinking}<|end|>{ASSISTANT_HEADER}"
    generated += f"<|channel|>final<|message|>{message.content}" + ("<|return|>" if closing else "<|end|>")
    return [(ASSISTANT_HEADER, False), (generated, True)]


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring segments with the same trained flag (they already meet at special tokens)."""
    merged: list[Segment] = []
    for text, trained in segments:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged
