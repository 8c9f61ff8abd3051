"""Chat and generate without a model: session state and slash commands, the rendered prompts, the streamed
channel view, sampling flags. A scripted terminal session and `generate --json` on a briefly trained
embedded run: e2e/test_chat.py."""
from __future__ import annotations

import io
import sys

import pytest

from helpers import DATE, harmony
from lowvram_ft.chat import EXIT, Printer, Session, StreamView, handle_command, make_streamer, render
from lowvram_ft.conversation import Message


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast  # the class the files name; AutoTokenizer's import costs ~2.5 s of CPU

    from lowvram_ft.embedded import embedded_model_dir

    return PreTrainedTokenizerFast.from_pretrained(embedded_model_dir())


# --------------------------------------------------------------------------- session and commands


def test_commands_change_the_session_and_exit_is_exit():
    session = Session(reasoning_effort="medium")
    session.remember("hi", "thinking", "hello")
    assert handle_command("/effort high", session) == "reasoning effort: high"
    assert session.reasoning_effort == "high"
    assert handle_command("/effort extreme", session).startswith("reasoning effort is high; /effort takes one of")
    assert handle_command("/language French", session) == "reasoning language: French"
    assert session.reasoning_language == "French"
    assert handle_command("/language off", session) == "reasoning language: not set"
    assert handle_command("/reset", session) == "conversation cleared" and session.history == []
    assert handle_command("/exit", session) is EXIT and handle_command("/quit", session) is EXIT
    assert handle_command("/bogus", session).startswith("unknown command /bogus — commands: /effort")


def test_earlier_turns_keep_only_their_final_answer_in_the_next_prompt(tokenizer):
    session = Session(reasoning_effort="low", reasoning_language="German")
    session.remember("What is 2+2?", "Ich rechne: 2+2=4.", "4")
    prompt = render(session.conversation("And 3+3?"), tokenizer, DATE)
    assert prompt == harmony([Message("user", "What is 2+2?"), Message("assistant", "4"),
                              Message("user", "And 3+3?")], effort="low", language="German")
    assert "Reasoning: low" in prompt and "reasoning language: German" in prompt
    assert "<|start|>assistant<|channel|>final<|message|>4<|end|><|start|>user<|message|>And 3+3?<|end|>" in prompt
    assert "Ich rechne" not in prompt


def test_flags_default_to_gpt_oss_sampling_and_the_runs_effort(tmp_path):
    from lowvram_ft.chat import RECOMMENDED
    from lowvram_ft.cli import build_parser, chat_setup
    from lowvram_ft.config import ConfigError

    args = build_parser().parse_args(["chat", "--model", "embedded", "--adapter", str(tmp_path)])
    cfg, adapter, session, sampling = chat_setup(args)
    assert (cfg.model.name, adapter) == ("embedded", str(tmp_path))
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == tuple(RECOMMENDED.values()) == (1.0, 1.0, 0)
    assert session == Session(reasoning_effort="medium")
    args = build_parser().parse_args(["generate", "--prompt", "x", "--reasoning-effort", "high",
                                      "--reasoning-language", "French", "--top-k", "20"])
    _, adapter, session, sampling = chat_setup(args)
    assert adapter is None and session == Session("high", "French") and sampling.top_k == 20
    with pytest.raises(ConfigError, match="--run and --model: choose one"):
        chat_setup(build_parser().parse_args(["chat", "--run", str(tmp_path), "--model", "embedded"]))


# --------------------------------------------------------------------------- the streamed view


def test_stream_view_hands_out_each_channel_once_in_order():
    view = StreamView(harmony=True)
    text = ("<|channel|>analysis<|message|>We think. Then more.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Paris is the capital.<|return|>")
    pieces = []
    for end in range(1, len(text) + 1):
        pieces += view.update(text[:end])
    assert "".join(t for c, t in pieces if c == "analysis") == "We think. Then more."
    assert "".join(t for c, t in pieces if c == "final") == "Paris is the capital."
    channels = [c for c, _ in pieces]
    assert channels == sorted(channels)  # every analysis piece before the first final piece


def test_stream_view_for_think_tags_shows_thinking_before_the_answer():
    view = StreamView(harmony=False)
    assert view.update("<think>Let me") == [("analysis", "Let me")]
    assert view.update("<think>Let me see</think>") == [("analysis", " see")]
    assert view.update("<think>Let me see</think>It is 4.") == [("final", "It is 4.")]
    # A turn that ends inside <think> (a small model does): the end-of-turn token is not shown.
    view = StreamView(harmony=False)
    assert view.update("<think>Hmm") == [("analysis", "Hmm")]
    assert view.update("<think>Hmm, so 5.<|im_end|>") == [("analysis", ", so 5.")]


def test_streamer_decodes_tokens_as_they_come_skipping_the_prompt(tokenizer):
    import torch

    completion = ("<|channel|>analysis<|message|>Je réfléchis en français.<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>Paris.<|return|>")
    shown = []
    streamer = make_streamer(tokenizer, StreamView(harmony=True), lambda c, t: shown.append((c, t)))
    streamer.put(torch.tensor([tokenizer("<|start|>user<|message|>Hi<|end|>", add_special_tokens=False)["input_ids"]]))
    for token in tokenizer(completion, add_special_tokens=False)["input_ids"]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(t for c, t in shown if c == "analysis") == "Je réfléchis en français."
    assert "".join(t for c, t in shown if c == "final") == "Paris."
    assert not any("\ufffd" in t for _, t in shown)  # split UTF-8 characters waited for


def test_analysis_is_dimmed_and_apart_from_the_final_answer():
    from rich.console import Console

    out = io.StringIO()
    printer = Printer(Console(file=out, force_terminal=True, color_system="standard", width=200))
    for channel, text in [("analysis", "We "), ("analysis", "think."), ("final", "Paris.")]:
        printer(channel, text)
    printer.finish()
    text = out.getvalue()
    dim = "\x1b[2m"
    assert f"{dim}We " in text and f"{dim}think." in text
    assert "thinking: " in text and "assistant: " in text
    assert text.index("think.") < text.index("\n") < text.index("assistant: ") < text.index("Paris.")
    assert f"{dim}Paris." not in text


# --------------------------------------------------------------------------- bad input


def test_temperature_zero_means_greedy_decoding():
    from lowvram_ft.config import EvalConfig
    from lowvram_ft.evaluate.generation import sampling_kwargs

    greedy = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    assert sampling_kwargs(EvalConfig(greedy=False, temperature=0.0, top_p=0.9, top_k=20)) == greedy
    assert sampling_kwargs(EvalConfig(greedy=True, temperature=0.7)) == greedy
    assert sampling_kwargs(EvalConfig(greedy=False, temperature=0.7, top_p=0.9, top_k=20)) == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20}


@pytest.mark.parametrize("flag", ["--temperature=nan", "--temperature=inf", "--temperature=-1", "--top-p=nan"])
def test_sampling_flags_that_are_not_numbers_in_range_are_rejected(flag):
    from lowvram_ft.cli import build_parser, chat_setup
    from lowvram_ft.config import ConfigError

    with pytest.raises(ConfigError, match="--temperature a finite number >= 0"):
        chat_setup(build_parser().parse_args(["chat", flag]))


def test_chat_with_stdin_closed_ends_before_loading_the_model(monkeypatch, capsys):
    from rich.console import Console

    from lowvram_ft import chat
    from lowvram_ft.chat import Sampling
    from lowvram_ft.config import load_config

    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)
    monkeypatch.setattr(chat, "load_chat_model", lambda cfg, adapter: pytest.fail("loaded a model with no input"))
    assert chat.run_chat(load_config(None, []), None, Session(), Sampling(), console=Console(file=io.StringIO())) == 0
    assert capsys.readouterr().err == "chat: stdin is closed — nothing to read; pipe or type the messages\n"
