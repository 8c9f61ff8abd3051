"""Harmony rendering: exact text, agreement with openai-harmony token for token, label masks, the
generation prompt, and the Jinja chat template producing the same text."""
from __future__ import annotations

import pytest

from lowvram_ft.conversation import Conversation, Message
from lowvram_ft.harmony import (
    IGNORE_INDEX,
    HarmonyOptions,
    chat_template,
    encode,
    render_prompt,
    render_training,
)

START, END = 200006, 200007  # <|start|>, <|end|>

SYSTEM_TEXT = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
)


def conv(*messages: Message, language: str | None = None, effort: str | None = None) -> Conversation:
    return Conversation(messages=messages, reasoning_language=language, reasoning_effort=effort)


def user(text: str) -> Message:
    return Message("user", text)


def assistant(content: str, thinking: str | None = None) -> Message:
    return Message("assistant", content, thinking)


LONG_THINKING = " ".join(f"Étape {i}: on vérifie la somme partielle {i * (i + 1) // 2}." for i in range(150))
LONG_ANSWER = "\n".join(f"- Item {i}: {'🙂' if i % 7 == 0 else 'ok'} value={i ** 2}" for i in range(300))

CONVERSATIONS = {
    "single_turn_french": conv(
        Message("system", "You are a helpful assistant."),
        user("What is 2 + 2?"),
        assistant("2 + 2 = 4.", "L'utilisateur demande 2 + 2. C'est 4."),
        language="French",
    ),
    "dataset_row_shape": conv(  # Multilingual-Thinking puts the language line in its system message
        Message("system", "reasoning language: German\n\nYou are a precise assistant."),
        user("Name a prime."),
        assistant("7 is prime.", "Der Nutzer möchte eine Primzahl. 7 ist eine."),
    ),
    "multi_turn": conv(
        Message("developer", "Answer briefly."),
        user("Hi!"),
        assistant("Hello! How can I help?", "Greeting; reply politely."),
        user("Tell me a joke."),
        assistant("Why did the chicken cross the road?", "A classic joke will do."),
        user("Another, please."),
        assistant("I would tell you a UDP joke, but you might not get it.", "Pick a networking joke."),
        language="Spanish",
    ),
    "japanese": conv(
        Message("system", "あなたは親切なアシスタントです。"),
        user("富士山の高さは？"),
        assistant("富士山の高さは3,776メートルです。", "ユーザーは富士山の高さを尋ねています。答えは3776メートル。"),
        language="Japanese",
    ),
    "korean_no_instructions": conv(
        user("서울의 인구는?"),
        assistant("약 940만 명입니다.", "사용자가 서울 인구를 묻고 있다."),
        language="Korean",
    ),
    "arabic": conv(
        Message("developer", "أجب باختصار."),
        user("ما عاصمة مصر؟"),
        assistant("القاهرة.", "السؤال عن عاصمة مصر. الجواب القاهرة."),
        language="Arabic",
    ),
    "empty_developer_no_language": conv(
        Message("developer", ""),
        user("Say yes."),
        assistant("Yes.", "Trivial."),
    ),
    "no_thinking": conv(user("Ping?"), assistant("Pong.")),
    "empty_thinking": conv(user("Ping?"), assistant("Pong.", "")),
    "system_and_developer": conv(
        Message("system", "Be concise."),
        Message("developer", "Use metric units."),
        user("How far is a marathon?"),
        assistant("42.195 km.", "Marathon distance in km."),
        language="Italian",
    ),
    "long_turns": conv(
        Message("system", "Count carefully. " * 200),
        user("Liste " * 800),
        assistant(LONG_ANSWER, LONG_THINKING),
        language="French",
    ),
    "ends_on_user": conv(
        user("First question?"),
        assistant("First answer.", "Dropped: not the closing turn."),
        user("Second question?"),
    ),
    "whitespace_edges": conv(
        user("  spaced  \n\n"),
        assistant("\n  final with\ttabs  ", "  thinking\n\n  "),
    ),
    "blank_lines_in_every_role": conv(  # message text is kept verbatim, trailing blank lines included
        Message("system", "reasoning language: Italian\n\n"),
        Message("developer", "\n\nUse metric units.  \n\n\n"),
        user("Quanto è lunga una maratona?\n\n"),
        assistant("42,195 km.\n\n", "Distanza della maratona.\n\n"),
        user("  E una mezza maratona? \n"),
        assistant("\n21,0975 km.\n\n", "La metà: 21,0975 km.  \n\n"),
        language="Italian",
    ),
    "language_line_then_blank_lines": conv(  # what a row's "reasoning language: Italian\n\n" becomes
        Message("system", "\n\n"),
        user("Ciao"),
        assistant("Ciao!", "Saluto."),
        language="Italian",
    ),
}
for _effort in ("low", "medium", "high"):
    CONVERSATIONS[f"effort_{_effort}"] = conv(
        user("Is 91 prime?"), assistant("No: 91 = 7 × 13.", "Check small factors: 7 × 13 = 91."),
        language="English", effort=_effort,
    )

ENDS_ON_ASSISTANT = [name for name, c in CONVERSATIONS.items() if c.messages[-1].role == "assistant"]


@pytest.fixture(scope="module")
def tokenizer(gptoss_tokenizer):
    return gptoss_tokenizer


@pytest.fixture(scope="module")
def harmony(harmony_reference):
    return harmony_reference


def to_openai_harmony(c: Conversation, opts: HarmonyOptions, *, drop_closing_turn: bool = False):
    """The same conversation built with openai-harmony's own types, as its authors intend them used."""
    from openai_harmony import (Conversation as HConversation, DeveloperContent, Message as HMessage,
                                ReasoningEffort, Role, SystemContent)

    effort = ReasoningEffort((c.reasoning_effort or opts.reasoning_effort).title())
    system = (SystemContent.new().with_model_identity(opts.model_identity)
              .with_knowledge_cutoff(opts.knowledge_cutoff).with_reasoning_effort(effort))
    if opts.date:
        system = system.with_conversation_start_date(opts.date)
    messages = [HMessage.from_role_and_content(Role.SYSTEM, system)]
    language = f"reasoning language: {c.reasoning_language}" if c.reasoning_language else ""
    text = "\n\n".join(m.content for m in c.messages if m.role in ("system", "developer") and m.content)
    instructions = language + ("\n\n" if language and text.strip() else "") + text  # blank text follows as is
    if instructions:
        developer = DeveloperContent.new().with_instructions(instructions)
        messages.append(HMessage.from_role_and_content(Role.DEVELOPER, developer))
    turns = [m for m in c.messages if m.role in ("user", "assistant")]
    if drop_closing_turn and turns[-1].role == "assistant":
        turns = turns[:-1]
    for index, m in enumerate(turns):
        if m.role == "user":
            messages.append(HMessage.from_role_and_content(Role.USER, m.content))
            continue
        if index == len(turns) - 1 and m.thinking:  # only the closing turn keeps its analysis
            messages.append(HMessage.from_role_and_content(Role.ASSISTANT, m.thinking).with_channel("analysis"))
        messages.append(HMessage.from_role_and_content(Role.ASSISTANT, m.content).with_channel("final"))
    return HConversation.from_messages(messages)


def trained_runs(input_ids, labels, tokenizer) -> list[str]:
    """The decoded text of each contiguous run of trained tokens."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_exact_text_of_a_small_conversation():
    c = conv(Message("system", "Be kind."), user("Hi"), assistant("Hello!", "Greet back."), language="French")
    assert render_training(c, HarmonyOptions()) == [
        (SYSTEM_TEXT
         + "<|start|>developer<|message|># Instructions\n\nreasoning language: French\n\nBe kind.<|end|>"
         + "<|start|>user<|message|>Hi<|end|><|start|>assistant", False),
        ("<|channel|>analysis<|message|>Greet back.<|end|>"
         + "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>", True),
    ]


def test_exact_text_of_a_multi_turn_conversation():
    c = conv(user("A?"), assistant("a", "think a"), user("B?"), assistant("b", "think b"), effort="high")
    system = SYSTEM_TEXT.replace("Reasoning: medium", "Reasoning: high")
    assert render_training(c) == [
        (system + "<|start|>user<|message|>A?<|end|><|start|>assistant", False),
        ("<|channel|>final<|message|>a<|end|>", True),
        ("<|start|>user<|message|>B?<|end|><|start|>assistant", False),
        ("<|channel|>analysis<|message|>think b<|end|><|start|>assistant<|channel|>final<|message|>b<|return|>",
         True),
    ]
    assert render_prompt(c) == system + (
        "<|start|>user<|message|>A?<|end|><|start|>assistant<|channel|>final<|message|>a<|end|>"
        "<|start|>user<|message|>B?<|end|><|start|>assistant")


def test_message_text_is_kept_verbatim():
    c = conv(Message("system", "reasoning language: Italian\n\n"), user("Ciao \n\n"),
             assistant("Ciao!\n\n", "Saluto.\n\n"))
    assert "".join(text for text, _ in render_training(c)) == (
        SYSTEM_TEXT
        + "<|start|>developer<|message|># Instructions\n\nreasoning language: Italian\n\n<|end|>"
        + "<|start|>user<|message|>Ciao \n\n<|end|>"
        + "<|start|>assistant<|channel|>analysis<|message|>Saluto.\n\n<|end|>"
        + "<|start|>assistant<|channel|>final<|message|>Ciao!\n\n<|return|>")


def test_options_change_the_system_message():
    opts = HarmonyOptions(reasoning_effort="low", date=None, knowledge_cutoff="2025-01", model_identity="You are Bob.")
    text = render_prompt(conv(user("x")), opts)
    assert text.startswith("<|start|>system<|message|>You are Bob.\nKnowledge cutoff: 2025-01\n\nReasoning: low\n\n")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_training_tokens_match_openai_harmony(tokenizer, harmony, name):
    from openai_harmony import RenderConversationConfig

    c = CONVERSATIONS[name]
    expected = harmony.render_conversation_for_training(
        to_openai_harmony(c, HarmonyOptions()), RenderConversationConfig(auto_drop_analysis=False))
    input_ids, labels = encode(render_training(c), tokenizer)
    assert input_ids == expected
    assert len(labels) == len(input_ids)


@pytest.mark.parametrize("opts", [HarmonyOptions(date=None), HarmonyOptions(reasoning_effort="high"),
                                  HarmonyOptions(model_identity="You are a careful tutor.", knowledge_cutoff="2025-01")])
def test_options_match_openai_harmony(tokenizer, harmony, opts):
    from openai_harmony import RenderConversationConfig

    c = CONVERSATIONS["single_turn_french"]
    expected = harmony.render_conversation_for_training(
        to_openai_harmony(c, opts), RenderConversationConfig(auto_drop_analysis=False))
    assert encode(render_training(c, opts), tokenizer)[0] == expected


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_prompt_tokens_match_openai_harmony_completion(tokenizer, harmony, name):
    from openai_harmony import Role

    c = CONVERSATIONS[name]
    expected = harmony.render_conversation_for_completion(
        to_openai_harmony(c, HarmonyOptions(), drop_closing_turn=True), Role.ASSISTANT)
    assert tokenizer(render_prompt(c), add_special_tokens=False)["input_ids"] == expected


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_segments_tokenize_like_the_whole_text(tokenizer, name):
    segments = render_training(CONVERSATIONS[name])
    whole = tokenizer("".join(text for text, _ in segments), add_special_tokens=False)["input_ids"]
    assert encode(segments, tokenizer)[0] == whole


@pytest.mark.parametrize("name", ENDS_ON_ASSISTANT)
def test_prompt_is_the_untrained_prefix_of_training(name):
    c = CONVERSATIONS[name]
    segments = render_training(c)
    closing_text, trained = segments[-1]
    assert trained
    assert "".join(text for text, _ in segments) == render_prompt(c) + closing_text
    assert segments[-2][0].endswith(render_prompt(c)[-len("<|start|>assistant"):])


def test_prompt_of_a_conversation_ending_on_user_is_all_of_it():
    c = CONVERSATIONS["ends_on_user"]
    segments = render_training(c)
    assert not segments[-1][1]
    assert render_prompt(c) == "".join(text for text, _ in segments) + "<|start|>assistant"


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_trained_text_is_exactly_what_each_assistant_turn_generates(tokenizer, name):
    c = CONVERSATIONS[name]
    input_ids, labels = encode(render_training(c), tokenizer)
    turns = c.turns()
    expected = []
    for index, m in enumerate(turns):
        if m.role != "assistant":
            continue
        if index == len(turns) - 1:
            analysis = f"<|channel|>analysis<|message|>{m.thinking}<|end|><|start|>assistant" if m.thinking else ""
            expected.append(f"{analysis}<|channel|>final<|message|>{m.content}<|return|>")
        else:
            expected.append(f"<|channel|>final<|message|>{m.content}<|end|>")
    assert trained_runs(input_ids, labels, tokenizer) == expected


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_no_system_developer_or_user_token_is_trained(tokenizer, name):
    input_ids, labels = encode(render_training(CONVERSATIONS[name]), tokenizer)
    starts = [i for i, token in enumerate(input_ids) if token == START] + [len(input_ids)]
    previous_role = None
    for begin, end in zip(starts, starts[1:]):
        role = tokenizer.decode(input_ids[begin + 1:begin + 2])
        if role == "assistant" and previous_role != "assistant":
            # A turn's first header is context; everything it generates after that is trained.
            assert labels[begin:begin + 2] == [IGNORE_INDEX] * 2
            assert all(label != IGNORE_INDEX for label in labels[begin + 2:end])
        elif role == "assistant":  # the header between analysis and final is generated
            assert all(label != IGNORE_INDEX for label in labels[begin:end])
        else:
            assert role in ("system", "developer", "user")
            assert set(labels[begin:end]) == {IGNORE_INDEX}
        previous_role = role


def test_reasoning_rows_train_the_analysis(tokenizer):
    c = CONVERSATIONS["single_turn_french"]
    input_ids, labels = encode(render_training(c), tokenizer)
    trained = tokenizer.decode([token for token, label in zip(input_ids, labels) if label != IGNORE_INDEX])
    assert trained.startswith("<|channel|>analysis<|message|>L'utilisateur demande 2 + 2.")
    assert trained.endswith("<|return|>")


def test_encode_cuts_to_max_length(tokenizer):
    segments = render_training(CONVERSATIONS["multi_turn"])
    full_ids, full_labels = encode(segments, tokenizer)
    assert encode(segments, tokenizer, max_length=50) == (full_ids[:50], full_labels[:50])


def as_chat_messages(c: Conversation) -> list[dict]:
    return [{"role": m.role, "content": m.content, "thinking": m.thinking} for m in c.messages]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_renders_the_same_text(tokenizer, name):
    c = CONVERSATIONS[name]
    kwargs = {"reasoning_effort": c.reasoning_effort, "reasoning_language": c.reasoning_language}
    full = tokenizer.apply_chat_template(as_chat_messages(c), tokenize=False, **kwargs)
    prompt = tokenizer.apply_chat_template(as_chat_messages(c), tokenize=False, add_generation_prompt=True, **kwargs)
    assert full == "".join(text for text, _ in render_training(c))
    assert prompt == render_prompt(c)


def test_chat_template_takes_options_and_overrides():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    c = CONVERSATIONS["single_turn_french"]
    opts = HarmonyOptions(reasoning_effort="high", date=None, model_identity="You are \"Q\".\nBe exact.")
    template = ImmutableSandboxedEnvironment().from_string(chat_template(opts))
    rendered = template.render(messages=as_chat_messages(c), reasoning_language="French")
    assert rendered == "".join(text for text, _ in render_training(c, opts))
    overridden = template.render(messages=as_chat_messages(c), reasoning_language="French", date="2030-01-01",
                                 reasoning_effort="low")
    assert overridden == "".join(
        text for text, _ in render_training(conv(*c.messages, language="French", effort="low"),
                                            HarmonyOptions(date="2030-01-01", model_identity=opts.model_identity)))


@pytest.mark.parametrize("bad, match", [
    (conv(user("x"), effort="extreme"), "reasoning_effort"),
    (conv(user("x"), Message("tool", "42")), "role 'tool'"),
    (conv(Message("system", "<|start|>system"), user("x")), "system text"),
    (conv(user("see <|end|> here"), assistant("ok")), "control token <\\|end\\|>"),
    (conv(user("x"), assistant("ok", "<|channel|>final")), "assistant thinking"),
])
@pytest.mark.parametrize("render", [render_training, render_prompt])
def test_unrenderable_conversations_are_refused(render, bad, match):
    with pytest.raises(ValueError, match=match):
        render(bad)


@pytest.mark.parametrize("system, developer", [
    ("reasoning language: Italian\n\n", "reasoning language: Italian\n\n"),  # nothing after: kept as written
    ("reasoning language: Italian  \n", "reasoning language: Italian\n"),
    ("reasoning language: Italian", "reasoning language: Italian"),
    ("reasoning language: Italian\nBe brief.\n", "reasoning language: Italian\n\nBe brief.\n"),
    ("reasoning language: Italian\n\n\nBe brief.", "reasoning language: Italian\n\nBe brief."),
    ("Be brief.\n\n", "Be brief.\n\n"),  # no language line: verbatim
])
def test_the_one_normalisation_of_a_data_row_is_the_language_line_separator(tokenizer, harmony, system, developer):
    """A row's 'reasoning language: X' line is lifted out and written back followed by one blank line
    (data.extract_language_line), or by its own line breaks when nothing follows; everything else stays
    verbatim. The row renders token for token as
    openai-harmony renders the normalised developer text."""
    from openai_harmony import RenderConversationConfig

    from lowvram_ft.data.rows import Issues, parse_messages

    row = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "Ciao"},
                        {"role": "assistant", "content": "Ciao!", "thinking": "Saluto."}]}
    issues = Issues()
    parsed = parse_messages(row, issues)
    assert not issues
    ours = "".join(text for text, _ in render_training(parsed))
    assert f"<|start|>developer<|message|># Instructions\n\n{developer}<|end|>" in ours
    reference = to_openai_harmony(conv(Message("developer", developer), user("Ciao"), assistant("Ciao!", "Saluto.")),
                                  HarmonyOptions())
    want = harmony.render_conversation_for_training(reference, RenderConversationConfig(auto_drop_analysis=False))
    assert tokenizer(ours, add_special_tokens=False)["input_ids"] == list(want)
