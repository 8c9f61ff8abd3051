"""Property-based bad input: whatever the config file, the overrides or the data set holds, lowvram_ft
either accepts it or stops with problems that each name where they are (ConfigError / DataError) —
never another exception, never an output folder left behind. Model-free: the data checks run before a
model is loaded, so every rejected input is pushed through `pipeline.train` too."""
from __future__ import annotations

import contextlib
import io
import json
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowvram_ft import cli
from lowvram_ft.train import pipeline
from lowvram_ft.config import GROUPS, ConfigError, describe_fields, load_config
from lowvram_ft.data import SHAPES, DataError, check_data, load_data

FIELDS = {group: [key.split(".", 1)[1] for key, _, _ in describe_fields() if key.startswith(group + ".")]
          for group in GROUPS}
DOTTED = [key for key, _, _ in describe_fields()]
COLUMNS = sorted({c for needed, optional in SHAPES.values() for c in needed + optional} | {"role", "content", "from", "value"})
# Modest and derandomized: the same examples every run (no flaky CI), the whole file in well under a minute.
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Names as people type them: any characters but control characters (a key holding a newline would be
# echoed over two lines; not worth an escape in every message).
names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=8)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["auto", "4bit", "true", "1e-4", "sample", "[a, b]", ""]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(names, inner, max_size=4)),
                      max_leaves=12)
# Config trees: mostly real groups and keys (so every field's validation is reached), some typos.
group_names = st.one_of(st.sampled_from(GROUPS), names, st.integers(0, 3))
config_trees = st.dictionaries(
    group_names,
    st.one_of(st.dictionaries(st.one_of(st.sampled_from(sorted({k for ks in FIELDS.values() for k in ks})),
                                        names), values, max_size=6), values),
    max_size=5)


def assert_located(problems: list[str]) -> None:
    """Every problem is one non-empty line that starts with where it is: `location: what`."""
    assert problems
    for line in problems:
        assert line and "\n" not in line, line
        location, sep, what = line.partition(": ")
        if not location.strip():  # an empty key (e.g. a YAML group named ''): the file is named next
            location, sep, what = what.partition(": ")
        assert sep and location.strip() and what.strip(), line


def no_folder_left(out: Path) -> None:
    assert not out.exists(), sorted(p.name for p in out.iterdir())


# --------------------------------------------------------------------------- config loader


@SETTINGS
@given(tree=config_trees)
def test_any_yaml_tree_is_accepted_or_a_located_config_error(tmp_path, tree):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as error:
        assert_located(error.problems)


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8")),
                     st.sampled_from([b"\xff\xfe\x00", b"model: [", b"- a\n- b\n", b"!!python/object:os.system x",
                                      b"&a [*a]", b"model:\n  name: &x [*x]\n", b"? [a, b]\n: 1\n", b"3"])))
def test_any_bytes_as_a_config_file_are_accepted_or_a_located_config_error(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except ConfigError as error:
        assert_located(error.problems)


overrides = st.lists(st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(DOTTED), st.text(string.printable, max_size=20)),
    st.builds(lambda k, v: f"{k}={json.dumps(v)}", st.sampled_from(DOTTED), values),
), max_size=5)


@SETTINGS
@given(items=overrides)
def test_any_override_strings_through_the_command_line_exit_0_or_2_and_write_nothing(tmp_path, items):
    """`train --dry-run` resolves and validates everything and writes nothing; a problem is exit 2 with
    one `error: location: what` line per problem."""
    out = tmp_path / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = cli.main(["train", "--dry-run", "--output", str(out), "--", *items])
    assert code in (0, 2)
    if code == 2:
        lines = stderr.getvalue().splitlines()
        assert all(line.startswith("error: ") for line in lines), lines
        assert_located([line.removeprefix("error: ") for line in lines])
    no_folder_left(out)


# --------------------------------------------------------------------------- data sets


messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "user", "assistant", "gpt", "human", "tool",
                                                              "developer", "bot", ""]), values),
                           "content": st.one_of(st.text(max_size=20), values)},
                          optional={"thinking": st.one_of(st.text(max_size=10), values)}),
    values), max_size=4)
rows = st.one_of(
    st.dictionaries(st.sampled_from(COLUMNS), st.one_of(st.text(max_size=20), values, messages), max_size=5),
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"user": st.text(max_size=20), "final": st.text(max_size=20)},
                          optional={"analysis": values, "reasoning_language": values}),
    values,  # not an object at all
)
lines = st.one_of(rows.map(lambda r: json.dumps(r).encode()), st.binary(max_size=30),
                  st.sampled_from([b"\xff\xfe", b"{", b"", b"   ", b"\xc3\x28", b"[1, 2]", b"null"]))


def data_config(path: Path, out: Path, fmt: str, on_invalid: str):
    return load_config(None, {"data": {"dataset": [str(path)], "format": fmt, "on_invalid": on_invalid},
                              "output": {"dir": str(out)}, "eval": {"enabled": False}})


def assert_rejected_cleanly(cfg, error: DataError, out: Path) -> None:
    """Located problems, and the whole run stops the same way before loading a model, leaving no folder."""
    assert_located(error.problems)
    with pytest.raises(DataError) as again, contextlib.redirect_stdout(io.StringIO()):
        pipeline.train(cfg)
    assert again.value.problems == error.problems
    no_folder_left(out)


@SETTINGS
@given(content=st.lists(lines, max_size=8), fmt=st.sampled_from(["auto", *SHAPES]),
       on_invalid=st.sampled_from(["error", "skip"]))
def test_any_json_lines_file_is_accepted_or_a_located_data_error(tmp_path, content, fmt, on_invalid):
    path, out = tmp_path / "rows.jsonl", tmp_path / "out"
    path.write_bytes(b"\n".join(content))
    cfg = data_config(path, out, fmt, on_invalid)
    assert all(": " in line for line in check_data(cfg))
    try:
        load_data(cfg)
    except DataError as error:
        assert_rejected_cleanly(cfg, error, out)


@SETTINGS
@given(value=st.one_of(st.lists(rows, max_size=6), values, st.dictionaries(st.text(max_size=5), st.lists(rows, max_size=3))),
       suffix=st.sampled_from([".json", ".csv"]), fmt=st.sampled_from(["auto", *SHAPES]))
def test_any_json_or_csv_file_is_accepted_or_a_located_data_error(tmp_path, value, suffix, fmt):
    path, out = tmp_path / f"rows{suffix}", tmp_path / "out"
    if suffix == ".json":
        path.write_text(json.dumps(value), encoding="utf-8")
    else:  # CSV: a header of column names, then cells of any text
        header = [c for c in (value if isinstance(value, dict) else {"user": 1, "final": 1})]
        path.write_text(",".join(map(str, header)) + "\n" + json.dumps(value)[:200] + "\n", encoding="utf-8")
    cfg = data_config(path, out, fmt, "skip")
    try:
        load_data(cfg)
    except DataError as error:
        assert_rejected_cleanly(cfg, error, out)


@SETTINGS
@given(entry=st.one_of(names, st.sampled_from(["a\x00b.jsonl", "../", "~", "x/y/z", "org/name:x"])))
def test_any_dataset_name_is_accepted_or_a_located_problem(tmp_path, monkeypatch, entry):
    """What `data.dataset` may hold before a file is even opened: paths, ids, garbage. Hub ids are not
    looked up here (offline), only names that are neither a file nor an id."""
    monkeypatch.chdir(tmp_path)
    try:
        cfg = load_config(None, {"data": {"dataset": [entry]}, "output": {"dir": str(tmp_path / "out")}})
    except ConfigError as error:
        return assert_located(error.problems)
    from lowvram_ft.data import looks_like_hub_id

    if looks_like_hub_id(entry) and not Path(entry).exists():
        return  # would ask the Hub (offline: a located "cannot load" problem, covered in test_errors)
    try:
        load_data(cfg)
    except DataError as error:
        assert_located(error.problems)
