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
