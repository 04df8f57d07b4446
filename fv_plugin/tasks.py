"""Tasks: a name plus (input, output) pairs, read from the paper's JSON format, JSONL or CSV; and the package's
neutral text.

Built-in tasks ship as package data (``fv_plugin/data/tasks/*.json``), each with a fixed train/test split; so do
neutral English paragraphs (``fv_plugin/data/neutral.txt``) with no task in them.
"""

from __future__ import annotations

import csv
import io
import json
import random
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["MAX_PAIRS", "MAX_TASK_BYTES", "Pair", "Task", "builtin_tasks", "load_task", "neutral_texts"]

MAX_TASK_BYTES = 20 * 1024 * 1024
MAX_PAIRS = 100_000
MAX_FIELD_CHARS = 1_000


@dataclass(frozen=True)
class Pair:
    """One example: ``input`` maps to ``output``; ``alternatives`` are other accepted answers."""

    input: str
    output: str
    alternatives: tuple[str, ...] = ()

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.output, *self.alternatives)


@dataclass(frozen=True)
class Task:
    """A named list of pairs with a fixed split: ``train`` (demonstrations and extraction), ``valid``
    (choices such as the layer) and ``test`` (reported accuracy)."""

    name: str
    pairs: tuple[Pair, ...]
    test_fraction: float = 0.3
    valid_fraction: float = 0.2
    split_seed: int = 0
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.pairs) < 2:
            raise ValueError(f"task {self.name!r} needs at least 2 pairs, got {len(self.pairs)}")
        if not 0 < self.test_fraction < 1 or not 0 <= self.valid_fraction < 1 - self.test_fraction:
            raise ValueError("test_fraction and valid_fraction must leave room for a training split")

    def _order(self) -> list[int]:
        order = list(range(len(self.pairs)))
        random.Random(f"{self.name}:{self.split_seed}").shuffle(order)
        return order

    def _cut(self) -> tuple[int, int]:
        n = len(self.pairs)
        n_test = max(1, round(n * self.test_fraction))
        n_valid = round(n * self.valid_fraction)
        return n_test, n_valid

    @property
    def test(self) -> tuple[Pair, ...]:
        n_test, _ = self._cut()
        return tuple(self.pairs[i] for i in self._order()[:n_test])

    @property
    def valid(self) -> tuple[Pair, ...]:
        n_test, n_valid = self._cut()
        return tuple(self.pairs[i] for i in self._order()[n_test : n_test + n_valid])

    @property
    def train(self) -> tuple[Pair, ...]:
        n_test, n_valid = self._cut()
        return tuple(self.pairs[i] for i in self._order()[n_test + n_valid :])

    def __len__(self) -> int:
        return len(self.pairs)


def _builtin_dir() -> Any:
    return resources.files("fv_plugin").joinpath("data", "tasks")


def builtin_tasks() -> list[str]:
    """Names of the tasks shipped with fv_plugin."""
    folder = _builtin_dir()
    if not folder.is_dir():
        return []
    return sorted(entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json"))


def _field(value: object, where: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        scalar = isinstance(value, (str, int, float, bool)) or value is None
        shown = repr(value) if scalar and len(repr(value)) <= 60 else f"a {type(value).__name__}"
        hint = ' (write numbers in quotes, e.g. "7")' if isinstance(value, (int, float)) else ""
        raise ValueError(f"{where}: {name!r} must be a non-empty string, got {shown}{hint}")
    if len(value) > MAX_FIELD_CHARS:
        raise ValueError(f"{where}: {name!r} is longer than {MAX_FIELD_CHARS} characters")
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cs"):  # control characters, lone surrogates
            raise ValueError(
                f"{where}: {name!r} contains the control character U+{ord(char):04X}; task fields must be plain "
                "text on one line"
            )
    return value.strip()


def _pair(row: object, where: str) -> Pair:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'input' and 'output', got a {type(row).__name__}")
    missing = [key for key in ("input", "output") if key not in row]
    if missing:
        keys = sorted(str(key) for key in row)[:10]
        raise ValueError(f"{where}: missing {', '.join(repr(m) for m in missing)} (keys: {keys})")
    alternatives = row.get("alternatives") or ()
    if isinstance(alternatives, str):
        alternatives = [a for a in alternatives.split("|") if a.strip()]
    if not isinstance(alternatives, (list, tuple)):
        raise ValueError(f"{where}: 'alternatives' must be a list of strings")
    return Pair(
        input=_field(row["input"], where, "input"),
        output=_field(row["output"], where, "output"),
        alternatives=tuple(_field(a, where, "alternatives") for a in alternatives),
    )


def _json(text: str, where: str) -> object:
    """Parse JSON; every way it can fail (syntax, nesting too deep, numbers too large) names ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except RecursionError as exc:
        raise ValueError(f"{where}: the JSON is nested too deeply; a task is a flat list of pairs") from exc
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"{where}: not valid JSON for a task ({exc})") from exc


def _rows(text: str, path: Path) -> list[tuple[str, object]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        numbered = enumerate(text.splitlines(), start=1)
        return [(f"{path}, line {n}", _json(line, f"{path}, line {n}")) for n, line in numbered if line.strip()]
    if suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames is None or not {"input", "output"} <= set(reader.fieldnames):
                raise ValueError(f"{path}: a CSV task needs a header row with 'input' and 'output' columns")
            return [(f"{path}, row {number}", dict(row)) for number, row in enumerate(reader, start=2)]
        except csv.Error as exc:  # NUL bytes, a field over the csv module's limit...
            raise ValueError(f"{path}: not a readable CSV file ({exc})") from exc
    data = _json(text, str(path))
    if isinstance(data, dict) and isinstance(data.get("pairs"), list):
        data = data["pairs"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'input': ..., 'output': ...}} objects")
    return [(f"{path}, item {index}", row) for index, row in enumerate(data)]


def _from_file(path: Path, name: str | None) -> Task:
    size = path.stat().st_size
    if size > MAX_TASK_BYTES:
        raise ValueError(f"{path}: {size} bytes is more than the {MAX_TASK_BYTES} a task file may have")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is fine
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
    rows = _rows(text, path)
    if not rows:
        raise ValueError(f"{path}: the file has no pairs")
    if len(rows) > MAX_PAIRS:
        raise ValueError(f"{path}: {len(rows)} pairs is more than the {MAX_PAIRS} a task may have")
    pairs = tuple(_pair(row, where) for where, row in rows)
    if len(pairs) < 2:
        raise ValueError(f"{path}: a task needs at least 2 pairs, the file has {len(pairs)}")
    if len({p.output for p in pairs}) < 2:
        raise ValueError(
            f"{path}: every pair has the answer {pairs[0].output!r}; a task needs at least two different answers"
        )
    return Task(name=name or path.stem, pairs=pairs, source=str(path))


def load_task(name_or_path: str | Path, *, name: str | None = None) -> Task:
    """Load a built-in task by name (see :func:`builtin_tasks`) or a task file (.json, .jsonl or .csv).

    Raises:
        ValueError: for an unknown name or a malformed, empty, too-large or single-answer file; the message
            names the file and the row.

    Example:
        >>> task = load_task("antonym")  # doctest: +SKIP
        >>> len(task.train), task.test[0].input  # doctest: +SKIP
    """
    if isinstance(name_or_path, str) and name_or_path in builtin_tasks():
        entry = _builtin_dir().joinpath(f"{name_or_path}.json")
        with resources.as_file(entry) as path:
            task = _from_file(Path(path), name or name_or_path)
        return Task(name=task.name, pairs=task.pairs, source=f"builtin:{name_or_path}")
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"{name_or_path!r} is neither a built-in task ({', '.join(builtin_tasks()) or 'none installed'}) "
            "nor a task file (.json list of {'input', 'output'} objects, .jsonl or .csv)"
        )
    return _from_file(path, name)


def neutral_texts() -> list[str]:
    """The built-in neutral English paragraphs (everyday prose, no task in them): the text cross-model maps are
    fitted on, and the general text side effects are measured on."""
    text = resources.files("fv_plugin").joinpath("data", "neutral.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
