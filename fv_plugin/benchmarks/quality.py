"""``fv bench quality``: how much of in-context learning each method's vector recovers, per task, both protocols.

For each task (test split, zero-shot prompts steered at the last prompt token, first-token accuracy with 95%
Wilson intervals): the model zero-shot and with 10 demonstrations (ICL), then each vector: the layer-mean
baseline and ``difference`` (layer chosen on validation, strength 1), the paper's ``heads`` (k=10, layer chosen
on validation, strength 1), ``head_difference`` (k and strength chosen on validation: the best mediation-based
method measured) and ``auto`` (the library's default). Every score is reported on every test query and, as in the
paper, on the queries the model answers correctly with 10-shot ICL. Head statistics are computed once per task.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fv_plugin.config import EvalConfig, ExtractionConfig
from fv_plugin.evaluation import EvalResult, evaluate, icl_correct_inputs
from fv_plugin.extraction import extract_function_vector
from fv_plugin.mediation import head_statistics
from fv_plugin.models import DEFAULT_MODEL, load_model
from fv_plugin.scoring import wilson_interval
from fv_plugin.tasks import builtin_tasks, load_task

__all__ = [
    "COLUMNS",
    "FORMS",
    "QualityRow",
    "Score",
    "add_arguments",
    "load_rows",
    "measure_quality",
    "quality_table",
    "run",
]

FORMS: dict[str, dict[str, Any]] = {
    "layer_mean": {"method": "layer_mean"},
    "difference": {"method": "difference"},
    "heads (paper)": {"method": "heads", "k": 10},
    "head_difference": {"method": "auto", "methods": ("head_difference",)},
    "auto": {"method": "auto"},
}
COLUMNS = ("zero-shot", "ICL", *FORMS)


@dataclass(frozen=True)
class Score:
    """An accuracy, its 95% interval and the number of queries, on every query and on the ICL-correct ones."""

    accuracy: float
    interval: tuple[float, float]
    n: int
    icl_correct: float
    icl_correct_n: int

    @property
    def icl_correct_interval(self) -> tuple[float, float]:
        """The 95% Wilson interval of ``icl_correct``."""
        if self.icl_correct_n == 0:
            return (0.0, 1.0)
        return wilson_interval(round(self.icl_correct * self.icl_correct_n), self.icl_correct_n)


@dataclass(frozen=True)
class QualityRow:
    """One task: a :class:`Score` per column, and each vector's method, layer and strength."""

    task: str
    scores: dict[str, Score]
    chosen: dict[str, str]
    seconds: float


def _score(result: EvalResult, kept: set[str]) -> Score:
    paper = result.restricted(kept)
    return Score(result.accuracy, result.accuracy_ci, result.n, paper.accuracy, paper.n)


def _describe(fv: Any) -> str:
    best = fv.selection.best if fv.selection is not None else None
    strength = f", s={best.strength:g}" if best is not None else ""
    k = f" k={fv.k}" if fv.k is not None and fv.method != "difference" else ""
    return f"{fv.method}{k} L{fv.layer}{strength}"


def measure_quality(
    model: torch.nn.Module, tokenizer: Any, task_name: str, *, base: ExtractionConfig = ExtractionConfig()
) -> QualityRow:
    """Every column of :data:`COLUMNS` for one task (see the module); ``base``: the extraction settings."""
    start = time.perf_counter()
    task = load_task(task_name)
    stats = head_statistics(model, tokenizer, task, base)
    config = EvalConfig(seed=base.seed, n_shots=base.n_shots, template=base.template, generate=False)
    kept = icl_correct_inputs(model, tokenizer, task, config)
    scores = {
        "zero-shot": _score(evaluate(model, tokenizer, task, config), kept),
        "ICL": _score(evaluate(model, tokenizer, task, config, mode="icl"), kept),
    }
    chosen = {}
    for name, options in FORMS.items():
        fv = extract_function_vector(model, tokenizer, task, dataclasses.replace(base, **options), statistics=stats)
        scores[name] = _score(evaluate(model, tokenizer, task, config, vectors=[fv]), kept)
        chosen[name] = _describe(fv)
    return QualityRow(task.name, scores, chosen, time.perf_counter() - start)


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if v == v]  # NaN where no query is ICL-correct
    return sum(kept) / len(kept) if kept else float("nan")


def quality_table(rows: Sequence[QualityRow], *, protocol: str = "all") -> str:
    """Markdown: one row per task, a mean row, the share of ICL, and how often a method beats the layer mean."""
    paper = protocol == "icl_correct"
    head = "| task | n | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for row in rows:
        first = row.scores["zero-shot"]
        cells = []
        for col in COLUMNS:
            s = row.scores[col]
            point, (low, high) = (s.icl_correct, s.icl_correct_interval) if paper else (s.accuracy, s.interval)
            cells.append(f"{point:.2f} ({low:.2f}–{high:.2f})" if point == point else "–")
        n = first.icl_correct_n if paper else first.n
        lines.append(f"| {row.task} | {n} | " + " | ".join(cells) + " |")
    if rows:
        value = (lambda s: s.icl_correct) if paper else (lambda s: s.accuracy)
        means = {c: _mean([value(r.scores[c]) for r in rows]) for c in COLUMNS}
        lines.append("| **mean** | | " + " | ".join(f"**{means[c]:.2f}**" for c in COLUMNS) + " |")
        icl = means["ICL"]
        share = [f"{means[c] / icl:.0%}" if icl > 0 and c not in ("zero-shot", "ICL") else "" for c in COLUMNS]
        lines.append("| **% of ICL** | | " + " | ".join(share) + " |")
        wins = [
            f"{sum(value(r.scores[c]) >= value(r.scores['layer_mean']) for r in rows)}/{len(rows)}"
            if c not in ("zero-shot", "ICL", "layer_mean")
            else ""
            for c in COLUMNS
        ]
        lines.append("| **≥ layer_mean** | | " + " | ".join(wins) + " |")
    return "\n".join(lines)


def load_rows(path: str | Path) -> list[QualityRow]:
    """The rows a run wrote with ``--out`` (to print its tables again: ``fv bench quality --render FILE``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return [
            QualityRow(
                r["task"],
                {c: Score(**{**s, "interval": tuple(s["interval"])}) for c, s in r["scores"].items()},
                r["chosen"],
                r["seconds"],
            )
            for r in data["rows"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a file written by fv bench quality --out ({error})") from error


def _print_tables(rows: Sequence[QualityRow]) -> None:
    print("\nEvery test query:\n" + quality_table(rows))
    paper = quality_table(rows, protocol="icl_correct")
    print("\nThe paper's protocol (queries 10-shot ICL answers correctly):\n" + paper)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument("--tasks", default="all", help="comma-separated built-in tasks or task files (default: all)")
    parser.add_argument("--out", default=None, help="also write every row as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="seed of every prompt sample")
    parser.add_argument("--render", default=None, help="only print the tables of a file an earlier --out wrote")


def run(args: argparse.Namespace) -> list[QualityRow]:
    if args.render:
        saved = load_rows(args.render)
        _print_tables(saved)
        return saved
    model, tokenizer = load_model(args.model)
    names = builtin_tasks() if args.tasks == "all" else args.tasks.split(",")
    rows: list[QualityRow] = []
    print(f"model: {args.model}; first-token accuracy on each task's test split (95% interval)", flush=True)
    for name in names:
        rows.append(measure_quality(model, tokenizer, name, base=ExtractionConfig(seed=args.seed)))
        last = rows[-1]
        print(quality_table([last]).splitlines()[2] + f"  <- {last.seconds:.0f} s; {last.chosen}", flush=True)
        if args.out:
            data = [dataclasses.asdict(r) for r in rows]
            Path(args.out).write_text(json.dumps({"model": args.model, "rows": data}, indent=1), encoding="utf-8")
    _print_tables(rows)
    return rows
