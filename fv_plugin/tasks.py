"""Tasks: a name plus (input, output) pairs, read from the paper's JSON format, JSONL or CSV; and the package's
neutral text.

Built-in tasks ship as package data (``fv_plugin/data/tasks/*.json``), each with a fixed train/test split; so do
neutral English paragraphs (``fv_plugin/data/neutral.txt``) with no task in them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_PAIRS",
    "MAX_TASK_BYTES",
    "SPLITS",
    "Pair",
    "Task",
    "builtin_tasks",
    "load_task",
    "neutral_texts",
]

MAX_TASK_BYTES = 20 * 1024 * 1024
MAX_PAIRS = 100_000
MAX_FIELD_CHARS = 1_000
TASK_SUFFIXES = (".json", ".jsonl", ".csv")


@dataclass(frozen=True)
class Pair:
    """One example: ``input`` maps to ``output``; ``alternatives`` are other accepted answers."""

    input: str
    output: str
    alternatives: tuple[str, ...] = ()

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.output, *self.alternatives)


SPLITS: tuple[str, ...] = ("train", "valid", "test")
# What a "split" field or a split file may be called: the usual names for the three parts.
SPLIT_NAMES = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid", "test": "test"}


@dataclass(frozen=True)
class Task:
    """A named list of pairs in three parts: ``train`` (demonstrations and extraction), ``valid`` (choices such
    as the layer) and ``test`` (reported accuracy).

    The parts are the task's own when ``splits`` is given (one of ``"train"``, ``"valid"``, ``"test"`` per pair,
    used exactly; see :meth:`from_splits`); otherwise a shuffle seeded by the name and ``split_seed`` puts
    ``test_fraction`` of the pairs (at least one) in ``test``, ``valid_fraction`` in ``valid`` and the rest in
    ``train``, the same on every machine.
    """

    name: str
    pairs: tuple[Pair, ...]
    test_fraction: float = 0.3
    valid_fraction: float = 0.2
    split_seed: int = 0
    source: str | None = field(default=None, compare=False)
    splits: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.pairs) < 2:
            raise ValueError(f"task {self.name!r} needs at least 2 pairs, got {len(self.pairs)}")
        if not 0 < self.test_fraction < 1 or not 0 <= self.valid_fraction < 1 - self.test_fraction:
            raise ValueError("test_fraction and valid_fraction must leave room for a training split")
        if self.splits is not None:
            _check_splits(self.name, self.splits, len(self.pairs))

    @classmethod
    def from_splits(
        cls,
        name: str,
        train: Sequence[Pair],
        valid: Sequence[Pair] = (),
        test: Sequence[Pair] = (),
        *,
        source: str | None = None,
    ) -> Task:
        """A task with its own parts, used as given (an empty part stays empty)."""
        parts = {"train": tuple(train), "valid": tuple(valid), "test": tuple(test)}
        pairs = tuple(pair for part in parts.values() for pair in part)
        labels = tuple(split for split, part in parts.items() for _ in part)
        return cls(name=name, pairs=pairs, source=source, splits=labels)

    def _order(self) -> list[int]:
        order = list(range(len(self.pairs)))
        random.Random(f"{self.name}:{self.split_seed}").shuffle(order)
        return order

    def _part(self, split: str) -> tuple[Pair, ...]:
        if self.splits is not None:
            return tuple(pair for pair, label in zip(self.pairs, self.splits, strict=True) if label == split)
        n = len(self.pairs)
        n_test = max(1, round(n * self.test_fraction))
        n_valid = round(n * self.valid_fraction)
        bounds = {"test": (0, n_test), "valid": (n_test, n_test + n_valid), "train": (n_test + n_valid, n)}
        start, stop = bounds[split]
        return tuple(self.pairs[i] for i in self._order()[start:stop])

    @property
    def test(self) -> tuple[Pair, ...]:
        return self._part("test")

    @property
    def valid(self) -> tuple[Pair, ...]:
        return self._part("valid")

    @property
    def train(self) -> tuple[Pair, ...]:
        return self._part("train")

    def __len__(self) -> int:
        return len(self.pairs)


def _check_splits(name: str, splits: object, n: int) -> None:
    if not isinstance(splits, tuple) or len(splits) != n:
        raise ValueError(f"task {name!r}: splits must be a tuple with one split name per pair ({n})")
    unknown = sorted({str(s) for s in splits} - set(SPLITS))
    if unknown:
        raise ValueError(f"task {name!r}: unknown split names {unknown}; use {', '.join(SPLITS)}")
    if "train" not in splits:
        raise ValueError(f"task {name!r} has no train pairs; the demonstrations and the vector come from them")


def _builtin_dir() -> Any:
    return resources.files("fv_plugin").joinpath("data", "tasks")


def builtin_tasks() -> list[str]:
    """Names of the tasks shipped with fv_plugin."""
    folder = _builtin_dir()
    if not folder.is_dir():
        return []
    return sorted(entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json"))


INNER_WHITESPACE = ("\n", "\t")  # control characters a field may hold inside it (after stripping its ends)


def _field(value: object, where: str, name: str) -> str:
    """A field's text: stripped of leading and trailing whitespace (``"Hallo\\n"`` is ``"Hallo"``); newlines
    (``\\r\\n`` and ``\\r`` read as ``\\n``) and tabs may remain inside it, no other control character may."""
    if not isinstance(value, str) or not value.strip():
        scalar = isinstance(value, (str, int, float, bool)) or value is None
        shown = repr(value) if scalar and len(repr(value)) <= 60 else f"a {type(value).__name__}"
        hint = ' (write numbers in quotes, e.g. "7")' if isinstance(value, (int, float)) else ""
        raise ValueError(f"{where}: {name!r} must be a non-empty string, got {shown}{hint}")
    if len(value) > MAX_FIELD_CHARS:
        raise ValueError(f"{where}: {name!r} is longer than {MAX_FIELD_CHARS} characters")
    text = value.replace("\r\n", "\n").replace("\r", "\n").strip()
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cs") and char not in INNER_WHITESPACE:  # control, lone surrogate
            raise ValueError(
                f"{where}: {name!r} contains the control character U+{ord(char):04X}; task fields are plain text "
                "(newlines and tabs allowed)"
            )
    return text


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


def _split_of(row: object, where: str) -> str | None:
    """The row's own split (its ``"split"`` field), if it has one."""
    value = row.get("split") if isinstance(row, dict) else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    label = SPLIT_NAMES.get(value.strip().lower()) if isinstance(value, str) else None
    if label is None:
        raise ValueError(f"{where}: 'split' must be one of {', '.join(SPLIT_NAMES)}, got {value!r}")
    return label


def _read(path: Path) -> tuple[tuple[Pair, ...], tuple[str | None, ...]]:
    """A task file's pairs and each row's ``"split"`` field (``None`` where it has none)."""
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
    labels = tuple(_split_of(row, where) for where, row in rows)
    missing = [where for (where, _), label in zip(rows, labels, strict=True) if label is None]
    if missing and len(missing) < len(rows):
        raise ValueError(f"{missing[0]}: no 'split' field while other rows have one; give it to every row or none")
    return tuple(_pair(row, where) for where, row in rows), labels


def _checked(task: Task, where: str) -> Task:
    if len(task.pairs) > MAX_PAIRS:
        raise ValueError(f"{where}: {len(task.pairs)} pairs is more than the {MAX_PAIRS} a task may have")
    if len({p.output for p in task.pairs}) < 2:
        raise ValueError(
            f"{where}: every pair has the answer {task.pairs[0].output!r}; a task needs at least two different answers"
        )
    return task


def _from_file(path: Path, name: str | None) -> Task:
    pairs, labels = _read(path)
    if len(pairs) < 2:
        raise ValueError(f"{path}: a task needs at least 2 pairs, the file has {len(pairs)}")
    splits = tuple(str(label) for label in labels) if labels[0] is not None else None
    return _checked(Task(name=name or path.stem, pairs=pairs, source=str(path), splits=splits), str(path))


def _from_split_files(files: dict[str, Path], name: str, source: str) -> Task:
    parts: dict[str, tuple[Pair, ...]] = {}
    for split, path in files.items():
        pairs, labels = _read(path)
        if any(label is not None and label != split for label in labels):
            raise ValueError(f"{path}: rows of the {split} file name another split in their 'split' field")
        parts[split] = pairs
    if "train" not in parts:
        raise ValueError(f"{source}: no train file (train.json, train.jsonl or train.csv)")
    return _checked(Task.from_splits(name, **parts, source=source), source)


def _split_files(folder: Path) -> dict[str, Path]:
    """``{split: file}`` of a folder holding one task file per split (``train.json``, ``valid.jsonl``, ...)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        split = SPLIT_NAMES.get(path.stem.lower())
        if split is None or path.suffix.lower() not in TASK_SUFFIXES or not path.is_file():
            continue
        if split in found:
            raise ValueError(f"{folder}: two files for the {split} split ({found[split].name}, {path.name})")
        found[split] = path
    return found


def load_task(
    name_or_path: str | Path,
    *,
    name: str | None = None,
    valid: str | Path | None = None,
    test: str | Path | None = None,
) -> Task:
    """Load a built-in task by name (see :func:`builtin_tasks`), a task file (.json, .jsonl or .csv), or a task
    with its own splits.

    A task's own splits are used exactly as given. They come from a ``"split"`` field on every row
    (``train``/``valid``/``test``; also ``validation``, ``dev``), from a folder holding ``train``, ``valid`` and
    ``test`` files, or from ``valid=`` and ``test=`` files next to a train file. Without them the task is split by
    a seeded shuffle (:class:`Task`).

    Raises:
        ValueError: for an unknown name or a malformed, empty, too-large or single-answer file; the message
            names the file and the row.

    Example:
        >>> task = load_task("antonym")  # doctest: +SKIP
        >>> own = load_task("train.json", valid="valid.json", test="test.json")  # doctest: +SKIP
        >>> len(task.train), task.test[0].input  # doctest: +SKIP
    """
    extra = {split: Path(file) for split, file in (("valid", valid), ("test", test)) if file is not None}
    if isinstance(name_or_path, str) and name_or_path in builtin_tasks() and not extra:
        entry = _builtin_dir().joinpath(f"{name_or_path}.json")
        with resources.as_file(entry) as path:
            task = _from_file(Path(path), name or name_or_path)
        return dataclasses.replace(task, source=f"builtin:{name_or_path}")
    path = Path(name_or_path)
    if path.is_dir() and not extra:
        return _from_split_files(_split_files(path), name or path.name, str(path))
    for file in (path, *extra.values()):
        if not file.is_file():
            raise ValueError(
                f"{file} is neither a built-in task ({', '.join(builtin_tasks()) or 'none installed'}), a task file "
                "(.json list of {'input', 'output'} objects, .jsonl or .csv) nor a folder of train/valid/test files"
            )
    if extra:  # named after the folder when the train file is just "train.json"
        default = path.resolve().parent.name if path.stem.lower() in SPLIT_NAMES else path.stem
        return _from_split_files({"train": path, **extra}, name or default, str(path))
    return _from_file(path, name)


def neutral_texts() -> list[str]:
    """The built-in neutral English paragraphs (everyday prose, no task in them): the text cross-model maps are
    fitted on, and the general text side effects are measured on."""
    text = resources.files("fv_plugin").joinpath("data", "neutral.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
