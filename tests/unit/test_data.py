"""lowvram_ft.data: shapes, normalisation, validation with locations, mixing, masks, length, cache, export.

Tokenizers are tiny byte-level BPEs built in fixtures (one with the Harmony special tokens, one ChatML
with a Jinja template; helpers.build_tokenizer). The real o200k_harmony tokenizer and the comparisons with
Unsloth itself: e2e/test_data.py.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (DATASETS, MT, SHAREGPT_ROWS, SHAREGPT_STANDARD, build_tokenizer, by_row, config,
                     our_sharegpt, rows_by_where, tokenize, trained_text)
from lowvram_ft import data
from lowvram_ft.config import CHAT_TEMPLATE_NAMES, load_config
from lowvram_ft.conversation import Conversation, Message
from lowvram_ft.harmony import HarmonyOptions, render_prompt

MESSAGES = DATASETS / "messages.jsonl"
SHAREGPT = DATASETS / "sharegpt.json"
ALPACA = DATASETS / "alpaca.csv"
TEXT = DATASETS / "text.jsonl"
INVALID = DATASETS / "invalid.jsonl"
MISSING = DATASETS / "missing_columns.jsonl"

HARMONY_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                    "<|end|>", "<|message|>", "<|call|>"]
CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m.role + '\\n' -}}"
    "{%- if m.role == 'assistant' and m.reasoning_content -%}"
    "{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- m.content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
CHATML_NO_REASONING = CHATML.replace("m.reasoning_content", "m.no_such_field")
# Like Qwen3: only the closing assistant turn keeps its reasoning, so the history renders differently
# depending on which turn is last.
CHATML_LAST_REASONING = CHATML.replace("m.role == 'assistant' and m.reasoning_content",
                                       "m.role == 'assistant' and m.reasoning_content and loop.last")


@pytest.fixture(scope="module")
def harmony_tok():
    return build_tokenizer(HARMONY_SPECIALS, None, "<|return|>")


@pytest.fixture(scope="module")
def chatml_tok():
    return build_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML, "<|im_end|>")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def masked_text(tokenizer, ids, labels) -> list[str]:
    return [tokenizer.decode(run) for trained, run in data.runs(ids, labels) if not trained]


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("columns, shape", [
    (["id", "reasoning_language", "developer", "user", "analysis", "final", "messages"], "multilingual_thinking"),
    (["messages"], "messages"),
    (["conversations", "source"], "sharegpt"),
    (["instruction", "input", "output"], "alpaca"),
    (["text", "meta"], "text"),
])
def test_detect_shape_from_columns(columns, shape):
    assert data.detect_shape(columns, "auto", "f.jsonl") == (shape, None)


def test_detect_shape_explains_missing_columns():
    _, problem = data.detect_shape(["instruction", "response"], "auto", "f.jsonl")
    assert str(problem) == ("f.jsonl: looks like the alpaca shape but has no column output; columns found: "
                            "instruction, response — rename columns with data.columns={old: new} or set data.format")
    _, problem = data.detect_shape(["question", "answer"], "auto", "f.jsonl")
    assert str(problem).startswith("f.jsonl: cannot tell the row shape from the columns (question, answer); expected ")
    _, problem = data.detect_shape(["messages"], "alpaca", "f.jsonl")
    assert str(problem) == ("f.jsonl: missing column instruction, output for the alpaca shape (data.format=alpaca); "
                            "columns found: messages — rename columns with data.columns={old: new} or choose another "
                            "data.format")


def test_multilingual_thinking_columns_preferred_and_language_line_extracted(tmp_path):
    from_columns = by_row(data.load_data(config(tmp_path, MT)))
    from_messages = by_row(data.load_data(config(tmp_path, MT, format="messages")))
    assert from_columns[1] == Conversation(
        (Message("system", "You are a helpful assistant."), Message("user", "What is 2 + 3?"),
         Message("assistant", "2 + 3 = 5.", "L'utilisateur demande 2 + 3. La réponse est 5.")),
        reasoning_language="French")
    assert from_columns[3].reasoning_effort == "high"
    # The messages' "reasoning language: X" system line becomes the field, not a duplicate instruction.
    assert from_messages == from_columns


def test_messages_reasoning_keys_and_inline_think(tmp_path):
    rows = by_row(data.load_data(config(tmp_path, MESSAGES)))
    assert rows[1] == Conversation((Message("system", "You are terse."), Message("user", "Hi"),
                                    Message("assistant", "Hello!", "Salutation simple.")), reasoning_language="French")
    assert rows[2].messages[-1] == Message("assistant", "4", "Two plus two is four.")  # reasoning_content
    assert rows[3].messages[-1] == Message("assistant", "Paris.", "The user wants the capital of France: Paris.")
    assert rows[4].messages[1] == Message("assistant", "Apple.", "Any fruit works.")  # reasoning
    assert rows[4].reasoning_effort == "low"


def test_sharegpt_roles_normalised(tmp_path):
    rows = by_row(data.load_data(config(tmp_path, SHAREGPT)))
    assert rows[1].messages == (Message("system", "You are kind."), Message("user", "Hello"),
                                Message("assistant", "Hi there!"))
    assert [m.role for m in rows[2].messages] == ["user", "assistant"]  # "Human" / "GPT"


def test_sharegpt_spellings_normalise_to_role_and_content():
    """The values Unsloth's standardize_sharegpt gives for the same rows (compared live in
    e2e/test_data.py): roles mapped, contents verbatim."""
    assert [our_sharegpt(rows) for rows in SHAREGPT_ROWS] == SHAREGPT_STANDARD


def test_alpaca_csv_and_text_rows(tmp_path):
    rows = by_row(data.load_data(config(tmp_path, ALPACA)))
    assert rows[2].messages == (Message("user", "Add the numbers.\n\n3 and 4"), Message("assistant", "7"))
    assert rows[3].messages[0] == Message("user", "Say hello.")  # empty input adds nothing
    text = by_row(data.load_data(config(tmp_path, TEXT)))
    assert text[1] == data.PlainText("The quick brown fox jumps over the lazy dog.")


def test_parquet_and_column_remapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "qa.parquet"
    pq.write_table(pa.table({"question": ["Why?", "How?"], "answer": ["Because.", "Like so."]}), path)
    loaded = data.load_data(config(tmp_path, path, columns={"question": "user", "answer": "final"}))
    assert loaded.stats["shapes"] == {"multilingual_thinking": 2}
    assert by_row(loaded)[1].messages == (Message("user", "Why?"), Message("assistant", "Because."))
    with pytest.raises(data.DataError, match=r"data.columns: no data set has a column 'questoin'"):
        data.load_data(config(tmp_path, path, columns={"questoin": "user", "answer": "final"}))


def test_sample_is_the_shipped_file(tmp_path):
    label, path, problem = data.resolve_source("sample", "train")
    assert problem is None and path == data.SAMPLE_FILE and label == str(data.SAMPLE_FILE)
    loaded = data.load_data(config(tmp_path, "sample"))
    assert list(loaded.stats["shapes"]) == ["multilingual_thinking"] and loaded.stats["skipped_rows"] == 0
    assert "none" not in loaded.stats["reasoning_languages"]
    # The shipped data reasons in Japanese too: a run on it labels Japanese trained, Chinese / Korean zero-shot.
    from lowvram_ft.evaluate.languages import language_groups, training_languages

    groups = language_groups(["English", "Japanese", "Chinese", "Korean"], training_languages(loaded.stats["reasoning_languages"]))
    assert groups == {"en": "trained", "ja": "trained", "zh": "zero-shot", "ko": "zero-shot"}


def test_rows_without_reasoning_train_no_reasoning_language(tmp_path):
    """summary.json's reasoning_languages counts a row under its language only when its closing assistant
    turn has reasoning; the evaluation labels exactly those languages trained."""
    rows = [
        {"reasoning_language": "French", "user": "2+2?", "analysis": "Deux plus deux font quatre.", "final": "4"},
        {"reasoning_language": "Japanese", "user": "3+3?", "analysis": "", "final": "6"},
        {"reasoning_language": "Korean", "user": "5+5?", "final": "10"},
    ]
    # Reasoning in an earlier turn only: the closing assistant turn, the one trained as the answer, has none.
    chat = [{"messages": [{"role": "system", "content": "reasoning language: German"},
                          {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hallo", "thinking": "Gruß."},
                          {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hallo!"}]}]
    loaded = data.load_data(config(tmp_path, write_jsonl(tmp_path / "mt.jsonl", rows),
                                   write_jsonl(tmp_path / "chat.jsonl", chat), eval_fraction=0.0))
    assert loaded.stats["reasoning_languages"] == {"French": 1, "none": 3}


# --------------------------------------------------------------------------- validation


def test_every_row_problem_has_its_location(tmp_path):
    f = INVALID
    assert data.check_data(config(tmp_path, f)) == [
        f"{f}:2:messages[0].role: unknown role 'bot' — use one of system, developer, user, assistant, tool "
        "(ShareGPT: human, gpt)",
        f"{f}:3:messages[0].role: conversation starts with an assistant turn — start with a user turn "
        "(after any system message)",
        f"{f}:4:messages[1].content: empty assistant turn — give the answer text or remove the turn",
        f"{f}:5:messages[0].content: expected text, got a list — make the content a string (lists of parts and "
        "tool calls are not supported)",
        f"{f}:6:messages: no assistant turn, so nothing to train on — add the assistant's answer or remove the row",
        f"{f}:7: invalid JSON (Expecting ',' delimiter at column 31) — fix or remove this line",
        f"{f}:8:messages[2].role: system message after the conversation started — put system/developer messages "
        "first",
        f"{f}:9:messages[2].role: two assistant turns in a row — merge them into one turn",
    ]


def test_column_problems_are_located(tmp_path):
    path = write_jsonl(tmp_path / "mt.jsonl", [
        {"user": "q", "final": "a"},
        {"user": "q"},
        {"user": "q", "final": 42, "reasoning_effort": "max"},
        {"user": "q", "final": "a", "messages": "not used: the columns win"},
    ])
    assert data.check_data(config(tmp_path, path)) == [
        f"{path}:2:final: missing (the multilingual_thinking shape needs it) — add a final value or remove the row",
        f"{path}:3:final: expected text, got a number — make it a string",
    ]
    path = write_jsonl(tmp_path / "effort.jsonl", [{"user": "q", "final": "a", "reasoning_effort": "max"}])
    assert data.check_data(config(tmp_path, path)) == [
        f"{path}:1:reasoning_effort: unknown reasoning effort 'max' — use one of low, medium, high",
        f"data.dataset: no usable rows ({path}: 1 read; 1 invalid) — fix the invalid rows "
        "(python -m lowvram_ft data --check lists them) or check data.weights"]


def test_file_level_problems(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xff"}\n')
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert data.check_data(config(tmp_path, bad, tmp_path, notes, MISSING, empty, tmp_path / "gone.jsonl")) == [
        f"{bad}:2: not UTF-8 (byte 0xff at column 14) — re-save the file as UTF-8",
        f"{tmp_path}: is a directory, not a file — pass one .jsonl/.json/.csv/.parquet file inside it",
        f"{notes}: unsupported file type '.txt' — convert it to one of .jsonl, .json, .csv, .parquet",
        f"{MISSING}: looks like the alpaca shape but has no column output; columns found: instruction, response — "
        "rename columns with data.columns={old: new} or set data.format",
        f"{empty}: no rows — add rows to the file or remove it from data.dataset",
        f"{tmp_path / 'gone.jsonl'}: file not found — check the path (Hub ids look like owner/name)",
    ]


def test_hub_id_offline_is_one_line(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/some-data' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataError) as error:
        data.load_data(config(tmp_path, "someone/some-data"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("someone/some-data[train]: cannot load this data set from the Hugging Face Hub (")
    assert "hf download someone/some-data --repo-type dataset" in message and "pass a local file" in message


def test_error_mode_lists_twenty_then_counts(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}]} for _ in range(25)]
    with pytest.raises(data.DataError) as error:
        data.load_data(config(tmp_path, write_jsonl(tmp_path / "r.jsonl", rows)))
    lines = str(error.value).splitlines()
    assert len(error.value.problems) == 25 and len(lines) == 22
    assert lines[0].startswith(f"{tmp_path / 'r.jsonl'}:1:messages: no assistant turn")
    assert lines[20] == "... and 5 more"
    assert "data.on_invalid=skip" in lines[21]


def test_skip_mode_counts_every_reason(tmp_path):
    loaded = data.load_data(config(tmp_path, INVALID, on_invalid="skip"))
    assert loaded.stats["train_rows"] == 2
    assert loaded.stats["skipped_rows"] == 8
    assert loaded.stats["skipped"] == {"unknown role": 1, "role order": 3, "empty assistant turn": 1,
                                       "non-string content": 1, "no assistant turn": 1, "bad JSON line": 1}
    assert loaded.stats["sources"][str(INVALID)] == {"file": str(INVALID), "shape": "messages", "rows": 10,
                                                     "valid": 2, "used": 2}


def test_empty_dataset_after_skipping(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(data.DataError, match=r"^data.dataset: no usable rows \(.*r.jsonl: 1 read; 1 invalid\)"):
        data.load_data(config(tmp_path, path, on_invalid="skip"))


# --------------------------------------------------------------------------- mixing and splitting


def test_mixture_counts_largest_total_without_oversampling():
    assert data.mixture_counts([100, 10], [0.75, 0.25], None) == [30, 10]
    assert data.mixture_counts([100, 100], [0.75, 0.25], None) == [100, 33]
    assert data.mixture_counts([100, 10], [0.75, 0.25], 20) == [15, 5]
    assert data.mixture_counts([7, 7, 7], [1, 1, 1], 10) == [4, 3, 3]  # largest remainder
    assert data.mixture_counts([5, 9], [1, 0], None) == [5, 0]


def test_mixing_is_seeded(tmp_path):
    pools = [[("a", i) for i in range(100)], [("b", i) for i in range(10)]]
    mixed, used = data.mix_sources(pools, [0.75, 0.25], 1, None)
    assert used == [30, 10] and sum(row[0] == "b" for row in mixed) == 10
    assert data.mix_sources(pools, [0.75, 0.25], 1, None)[0] == mixed
    assert data.mix_sources(pools, [0.75, 0.25], 2, None)[0] != mixed
    loaded = data.load_data(config(tmp_path, MT, MESSAGES, weights=[0.5, 0.5], max_rows=4))
    assert {s: v["used"] for s, v in loaded.stats["sources"].items()} == {str(MT): 2, str(MESSAGES): 2}


def test_heldout_split_is_disjoint_and_deterministic(tmp_path):
    rows = list(range(40))
    train, held = data.split_heldout(rows, 0.1, 7)
    assert len(held) == 4 and sorted(train + held) == rows and not set(train) & set(held)
    assert data.split_heldout(rows, 0.1, 7) == (train, held)
    assert data.split_heldout(rows, 0.1, 8)[1] != held
    assert data.split_heldout(rows, 0.01, 7)[1] and data.split_heldout(rows, 0.0, 7) == (rows, [])
    loaded = data.load_data(config(tmp_path, MT, MESSAGES, eval_fraction=0.25))
    assert (loaded.stats["train_rows"], loaded.stats["heldout_rows"]) == (6, 2)
    assert not {e.where for e in loaded.train} & {e.where for e in loaded.heldout}


# --------------------------------------------------------------------------- masks


def test_harmony_masks_train_assistant_turns_with_analysis(tmp_path, harmony_tok):
    loaded, tokenized = tokenize(tmp_path, harmony_tok, MT)
    assert tokenized.stats["renderer"] == "harmony"
    row = rows_by_where(loaded, tokenized)[f"{MT}:1"]
    assert trained_text(harmony_tok, row["input_ids"], row["labels"]) == [
        "<|channel|>analysis<|message|>L'utilisateur demande 2 + 3. La réponse est 5.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>2 + 3 = 5.<|return|>"]
    conv = by_row(loaded)[1]
    assert masked_text(harmony_tok, row["input_ids"], row["labels"]) == [render_prompt(conv, HarmonyOptions())]


def test_harmony_train_on_last_assistant_and_all(tmp_path, harmony_tok):
    where = f"{MESSAGES}:4"  # two assistant turns
    _, every = tokenize(tmp_path, harmony_tok, MESSAGES)
    loaded, last = tokenize(tmp_path, harmony_tok, MESSAGES, train_on="last_assistant")
    _, everything = tokenize(tmp_path, harmony_tok, MESSAGES, train_on="all")
    row = rows_by_where(loaded, every)[where]
    assert trained_text(harmony_tok, row["input_ids"], row["labels"]) == [
        "<|channel|>final<|message|>Apple.<|end|>", "<|channel|>final<|message|>Banana.<|return|>"]
    row = rows_by_where(loaded, last)[where]
    assert trained_text(harmony_tok, row["input_ids"], row["labels"]) == [
        "<|channel|>final<|message|>Banana.<|return|>"]
    row = rows_by_where(loaded, everything)[where]
    assert row["labels"] == row["input_ids"]


def test_per_row_reasoning_effort_reaches_the_system_message(tmp_path, harmony_tok):
    loaded, tokenized = tokenize(tmp_path, harmony_tok, MT)
    rows = rows_by_where(loaded, tokenized)
    assert "Reasoning: high" in harmony_tok.decode(rows[f"{MT}:3"]["input_ids"])
    assert "Reasoning: medium" in harmony_tok.decode(rows[f"{MT}:1"]["input_ids"])


def test_chat_template_masks_only_assistant_spans(tmp_path, chatml_tok):
    loaded, tokenized = tokenize(tmp_path, chatml_tok, MESSAGES, MT)
    assert tokenized.stats["renderer"] == "chat_template"
    rows = rows_by_where(loaded, tokenized)
    row = rows[f"{MT}:1"]
    assert trained_text(chatml_tok, row["input_ids"], row["labels"]) == [
        "<think>\nL'utilisateur demande 2 + 3. La réponse est 5.\n</think>\n\n2 + 3 = 5.<|im_end|>"]
    assert masked_text(chatml_tok, row["input_ids"], row["labels"]) == [
        "<|im_start|>system\nreasoning language: French\n\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n", "\n"]  # generation stops at <|im_end|>
    row = rows[f"{MESSAGES}:4"]
    assert trained_text(chatml_tok, row["input_ids"], row["labels"]) == [
        "<think>\nAny fruit works.\n</think>\n\nApple.<|im_end|>", "Banana.<|im_end|>"]
    loaded, last = tokenize(tmp_path, chatml_tok, MESSAGES, train_on="last_assistant")
    row = rows_by_where(loaded, last)[f"{MESSAGES}:4"]
    assert trained_text(chatml_tok, row["input_ids"], row["labels"]) == ["Banana.<|im_end|>"]


def test_template_that_rewrites_history_still_masks_every_turn(tmp_path):
    tok = build_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_LAST_REASONING, "<|im_end|>")
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": [
        {"role": "user", "content": "Fruit?"}, {"role": "assistant", "content": "Apple.", "thinking": "Any."},
        {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Pear.", "thinking": "Not apple."}]}])
    _, tokenized = tokenize(tmp_path, tok, path)
    row = tokenized.dataset[0]
    assert trained_text(tok, row["input_ids"], row["labels"]) == [
        "Apple.<|im_end|>", "<think>\nNot apple.\n</think>\n\nPear.<|im_end|>"]
    assert tokenized.stats["untrained_turns"] == 0 and tokenized.stats["reasoning_dropped_rows"] == 0


def test_template_without_reasoning_gets_it_inline_not_dropped(tmp_path):
    """A template with no place for reasoning (plain ChatML) trains it inline before the answer
    (masking.THINK_OPEN ... THINK_CLOSE), so no row loses its reasoning."""
    tok = build_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_NO_REASONING, "<|im_end|>")
    _, tokenized = tokenize(tmp_path, tok, MT)
    assert tokenized.stats["reasoning_dropped_rows"] == 0
    row = tokenized.dataset[0]
    trained = tok.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert trained.startswith("<think>\n") and "\n</think>\n\n" in trained and trained.endswith("<|im_end|>")


def test_text_rows_train_every_token(tmp_path, chatml_tok):
    _, tokenized = tokenize(tmp_path, chatml_tok, TEXT)
    row = tokenized.dataset[0]
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == chatml_tok.eos_token_id
    assert tokenized.stats["trained_share"] == 1.0


def test_tokenizer_without_template_is_one_line(tmp_path):
    tok = build_tokenizer(["<|endoftext|>"], None, "<|endoftext|>")
    with pytest.raises(data.DataError) as error:
        tokenize(tmp_path, tok, MESSAGES)
    assert "\n" not in str(error.value)
    assert "no chat template" in str(error.value) and "data.format=text" in str(error.value)
    assert "--tokenizer gpt-oss" in str(error.value)
    assert f"set data.chat_template to one of Unsloth's ({', '.join(CHAT_TEMPLATE_NAMES)})" in str(error.value)


def test_render_refusals_are_located(tmp_path, harmony_tok):
    # A tool turn is valid data (a chat template may render it) but Harmony cannot: only the renderer knows.
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                      {"role": "tool", "content": "42"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(data.DataError, match=rf"^{tmp_path / 'r.jsonl'}:1: cannot be rendered by the harmony renderer"):
        tokenize(tmp_path, harmony_tok, path)
    _, tokenized = tokenize(tmp_path, harmony_tok, path, on_invalid="skip")
    assert tokenized.stats["rows"] == 1 and tokenized.stats["dropped"] == {"cannot be rendered": 1}


# --------------------------------------------------------------------------- length


def test_overlength_truncate_drop_error(tmp_path, harmony_tok):
    long_answer = "The answer is five. " * 30
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"user": "What is 2 + 3?", "final": "five"},  # fits
        {"user": "What is 2 + 3?", "final": long_answer},  # truncated inside the answer
        {"user": "What is 2 + 3? " * 40, "final": "five"},  # the prompt alone fills the limit
    ])
    loaded, whole = tokenize(tmp_path, harmony_tok, path)
    lengths = {loaded.train[i].where: len(row["input_ids"]) for i, row in zip(whole.kept, whole.dataset)}
    limit = min(lengths.values()) + 10  # longer than the short row, shorter than the others
    loaded, truncated = tokenize(tmp_path, harmony_tok, path, max_seq_length=limit)
    assert truncated.stats["truncated"] == 1 and truncated.stats["rows"] == 2
    assert truncated.stats["dropped"] == {"no trained token left after truncation": 1}
    assert truncated.stats["max_tokens"] == limit
    _, dropped = tokenize(tmp_path, harmony_tok, path, max_seq_length=limit, overlength="drop")
    assert dropped.stats["rows"] == 1 and dropped.stats["dropped"] == {"longer than model.max_seq_length": 2}
    with pytest.raises(data.DataError) as error:
        tokenize(tmp_path, harmony_tok, path, max_seq_length=limit, overlength="error")
    assert str(error.value).splitlines()[0] == (
        f"{path}:2: {lengths[f'{path}:2']} tokens, more than model.max_seq_length={limit} — raise "
        "model.max_seq_length, or set data.overlength=truncate or drop")
    assert len(error.value.problems) == 2


# --------------------------------------------------------------------------- cache


def test_second_call_is_a_cache_hit(tmp_path, harmony_tok, monkeypatch):
    monkeypatch.setenv("LOWVRAM_FT_CACHE", str(tmp_path / "root"))
    cfg = load_config(overrides={"data": {"dataset": [str(MT)]}})
    loaded = data.load_data(cfg)
    first = data.tokenize_data(loaded.train, harmony_tok, cfg)
    second = data.tokenize_data(loaded.train, harmony_tok, cfg)
    assert (first.stats["cache"], second.stats["cache"]) == ("miss", "hit")
    assert second.stats["cache_path"].startswith(str(tmp_path / "root" / "data"))
    assert second.dataset.column_names == ["input_ids", "labels"]
    assert second.dataset.to_dict() == first.dataset.to_dict() and second.kept == first.kept
    other = load_config(overrides={"data": {"dataset": [str(MT)], "train_on": "all"}})
    assert data.tokenize_data(loaded.train, harmony_tok, other).stats["cache"] == "miss"
    assert not [p for p in (tmp_path / "root" / "data").iterdir() if p.name.startswith(".")]  # no leftovers


# --------------------------------------------------------------------------- the data command


def test_export_and_inspect(tmp_path, harmony_tok, monkeypatch):
    from rich.console import Console

    import lowvram_ft.model

    monkeypatch.setattr(lowvram_ft.model, "load_tokenizer", lambda name: harmony_tok)
    out = io.StringIO()
    export = tmp_path / "out" / "rendered.jsonl"
    cfg = config(tmp_path, MT, MESSAGES)
    assert data.inspect(cfg, show=2, export=str(export), console=Console(file=out, width=300)) == 0
    printed = out.getvalue()
    assert "shapes   messages 4, multilingual_thinking 4" in printed
    assert "reasoning languages (train rows with reasoning; none = without)  none 3, French 2, German 1, Italian 1, Spanish 1" in printed
    assert printed.count("── example ") == 2 and "trained share" in printed and "cache    miss" in printed
    rows = [json.loads(line) for line in export.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8 and set(rows[0]) == {"source", "text", "input_ids", "labels"}
    # In data.dataset order (training order is shuffled), each traceable to its row.
    assert [row["source"] for row in rows] == [f"{MT}:{n}" for n in range(1, 5)] + [f"{MESSAGES}:{n}" for n in range(1, 5)]
    assert "Name a primary colour." in rows[1]["text"] and "Capital of France?" in rows[6]["text"]
    for row in rows:
        assert row["text"] == harmony_tok.decode(row["input_ids"])
        assert all(label in (-100, token) for token, label in zip(row["input_ids"], row["labels"]))
        assert -100 in row["labels"] and any(label != -100 for label in row["labels"])
    assert [p.name for p in export.parent.iterdir()] == ["rendered.jsonl"]


def test_highlight_markup():
    class Decoder:
        def decode(self, ids, **kwargs):
            return "".join(chr(i) for i in ids)

    from rich.text import Text

    ids = [ord(c) for c in "a[b]cd\\"]  # markup-like text and a trailing backslash stay literal
    text = Text.from_markup(data.highlight_markup(ids, [-100] * 4 + ids[4:], Decoder()))
    assert text.plain == "a[b]cd\\"
    assert [(span.start, span.end, str(span.style)) for span in text.spans] == [(0, 4, "dim"), (4, 7, "bold green")]


def test_check_prints_every_problem_and_exits_2(tmp_path):
    from rich.console import Console

    out = io.StringIO()
    assert data.inspect(config(tmp_path, INVALID), check=True, console=Console(file=out, width=300)) == 2
    lines = out.getvalue().splitlines()
    assert lines[0] == (f"{INVALID}:2:messages[0].role: unknown role 'bot' — use one of system, developer, user, "
                        "assistant, tool (ShareGPT: human, gpt)")
    assert lines[-1] == "8 problems found"
    out = io.StringIO()
    assert data.inspect(config(tmp_path, MT), check=True, console=Console(file=out, width=300)) == 0


# --------------------------------------------------------------------------- light import, parallel tokenizing


def test_import_is_light():
    code = ("import sys, lowvram_ft.data; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'trl', 'unsloth') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_parallel_tokenizing_matches_one_process(tmp_path, chatml_tok):
    assert data.processes_for(100, 10_000, None) == 1  # too little text to pay for starting workers
    assert data.processes_for(100, 10_000, 4) == 4 and data.processes_for(3, 10_000, 8) == 3
    _, one = tokenize(tmp_path, chatml_tok, MT, MESSAGES, num_proc=1, cache_dir=str(tmp_path / "a"))
    _, two = tokenize(tmp_path, chatml_tok, MT, MESSAGES, num_proc=2, cache_dir=str(tmp_path / "b"))
    assert two.stats["num_proc"] == 2 and two.dataset.to_dict() == one.dataset.to_dict()
