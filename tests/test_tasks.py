"""Tasks: built-in data, file formats, fixed splits, and errors that name the file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fv_plugin.tasks import MAX_TASK_BYTES, builtin_tasks, load_task

REQUIRED = [
    "antonym",
    "country-capital",
    "english-french",
    "english-spanish",
    "present-past",
    "singular-plural",
    "capitalize",
    "first-letter",
    "next-item",
]


def test_builtin_tasks_are_there_and_large_enough() -> None:
    names = builtin_tasks()
    assert len(names) >= 12 and set(REQUIRED) <= set(names)
    for name in names:
        task = load_task(name)
        assert len(task) >= 50, name
        inputs = [p.input for p in task.pairs]
        assert len(set(inputs)) == len(inputs), f"{name}: duplicate inputs"
        assert set(task.train).isdisjoint(task.test) and set(task.valid).isdisjoint(task.test)
        assert len(task.train) + len(task.valid) + len(task.test) == len(task)


def test_builtin_tasks_are_what_they_say() -> None:
    for pair in load_task("capitalize").pairs:
        assert pair.output == pair.input.upper()
    for pair in load_task("first-letter").pairs:
        assert pair.output == pair.input[0].lower()


def test_splits_are_fixed() -> None:
    assert load_task("antonym").test == load_task("antonym").test
    assert [p.input for p in load_task("antonym").train][:5] == [p.input for p in load_task("antonym").train][:5]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_json_jsonl_and_csv_files(tmp_path: Path) -> None:
    rows = [{"input": "a", "output": "b"}, {"input": "c", "output": "d", "alternatives": ["e"]}]
    as_json = load_task(_write(tmp_path / "t.json", json.dumps(rows)))
    as_jsonl = load_task(_write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n"))
    as_csv = load_task(_write(tmp_path / "t.csv", "input,output,alternatives\na,b,\nc,d,e\n"))
    for task in (as_json, as_jsonl, as_csv):
        assert task.name == "t" and [p.answers for p in task.pairs] == [("b",), ("d", "e")]


@pytest.mark.parametrize(
    ("filename", "text", "match"),
    [
        ("bad.json", '[{"input": "a", "output": "b"},', "not valid JSON"),
        ("empty.json", "[]", "no pairs"),
        ("one.json", '[{"input": "a", "output": "b"}]', "at least 2 pairs"),
        ("same.json", '[{"input": "a", "output": "x"}, {"input": "b", "output": "x"}]', "two different answers"),
        ("missing.json", '[{"input": "a", "output": "b"}, {"input": "c"}]', r"item 1: missing 'output'"),
        (
            "blank.jsonl",
            '{"input": "a", "output": "b"}\n{"input": "", "output": "d"}\n',
            "line 2: 'input' must be a non-empty",
        ),
        ("cols.csv", "x,y\na,b\n", "header row"),
        ("row.csv", "input,output\na,b\nc,\n", "row 3"),
        ("obj.json", '{"input": "a"}', "JSON list"),
    ],
)
def test_bad_files_get_errors_naming_file_and_row(tmp_path: Path, filename: str, text: str, match: str) -> None:
    path = _write(tmp_path / filename, text)
    with pytest.raises(ValueError, match=match) as info:
        load_task(path)
    assert filename in str(info.value)


def test_too_large_and_unknown(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with big.open("wb") as handle:
        handle.truncate(MAX_TASK_BYTES + 1)
    with pytest.raises(ValueError, match="more than"):
        load_task(big)
    with pytest.raises(ValueError, match="neither a built-in task"):
        load_task("no-such-task")


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("filename", "content", "match"),
    [
        ("deep.json", _deep(100_000), "nested too deeply"),
        ("deep-pairs.json", '{"pairs": ' + _deep(50_000) + "}", "nested too deeply"),
        (
            "deep.jsonl",
            '{"input": "a", "output": "b"}\n' + _deep(100_000) + "\n",
            "line 2: the JSON is nested too deeply",
        ),
        ("deep-field.json", '[{"input": ' + _deep(500) + ', "output": "b"}, {"input": "c", "output": "d"}]', "item 0"),
        ("huge-int.json", '[{"input": ' + "9" * 5000 + ', "output": "b"}]', "not valid JSON for a task"),
        ("huge-float.json", '[{"input": 1e999, "output": "b"}, {"input": "c", "output": "d"}]', "got inf"),
        ("number.json", '[{"input": 7, "output": "seven"}, {"input": "c", "output": "d"}]', "in quotes"),
        ("nan.json", '[{"input": NaN, "output": "b"}, {"input": "c", "output": "d"}]', "got nan"),
        ("escaped-nul.json", '[{"input": "a\\u0000b", "output": "b"}, {"input": "c", "output": "d"}]', r"U\+0000"),
        (
            "escape.jsonl",
            '{"input": "a", "output": "b"}\n{"input": "c\\u001b[31m", "output": "d"}\n',
            r"line 2.*U\+001B",
        ),
        ("bell.json", '[{"input": "a\\u0007b", "output": "b"}, {"input": "c", "output": "d"}]', r"U\+0007"),
        ("raw-control.json", '[{"input": "a\x07", "output": "b"}]', "not valid JSON"),
        ("surrogate.json", '[{"input": "a\\ud800", "output": "b"}, {"input": "c", "output": "d"}]', r"U\+D800"),
        ("nul.csv", "input,output\na,b\nc\x00,d\n", r"row 3: 'input' contains the control character U\+0000"),
        ("wide.csv", "input,output\n" + "a" * 200_000 + ",b\n", "not a readable CSV"),
        ("extra-cols.csv", "input,output\na,b,c,d\ne,,\n", "row 3: 'output' must be"),
        ("scalar.json", "42", "JSON list"),
        ("rows.json", '["a", "b"]', "item 0: expected an object"),
        ("alt.json", '[{"input": "a", "output": "b", "alternatives": {"x": 1}}]', "alternatives"),
    ],
)
def test_malformed_files_of_any_structure_get_errors_naming_the_file(
    tmp_path: Path, filename: str, content: str, match: str
) -> None:
    path = tmp_path / filename
    path.write_bytes(content.encode("utf-8", "surrogatepass"))
    with pytest.raises(ValueError, match=match) as info:
        load_task(path)
    assert filename in str(info.value)


def test_binary_and_byte_order_marked_files(tmp_path: Path) -> None:
    binary = tmp_path / "blob.json"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not UTF-8") as info:
        load_task(binary)
    assert "blob.json" in str(info.value)
    marked = tmp_path / "bom.json"
    marked.write_bytes(
        b"\xef\xbb\xbf" + json.dumps([{"input": "a", "output": "b"}, {"input": "c", "output": "d"}]).encode()
    )
    assert [p.output for p in load_task(marked).pairs] == ["b", "d"]
