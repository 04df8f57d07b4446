"""``fv bench quality``: how much of in-context learning each method's vector recovers, per task, both protocols.

For each task (test split, zero-shot prompts steered at the last prompt token, first-token accuracy with 95%
Wilson intervals): the model zero-shot and with 10 demonstrations (ICL), then each vector: the layer-mean
baseline and ``difference`` (layer chosen on validation, strength 1), the paper's ``heads`` (k=10, layer chosen
on validation, strength 1), ``head_difference`` (k and strength chosen on validation: the best mediation-based
method measured) and ``auto`` (the library's default). Every score is reported on every test query and, as in the
paper, on the queries the model answers correctly with 10-shot ICL. Head statistics are computed once per task.
``--forms`` keeps some of the vectors (e.g. ``auto`` alone), ``--exact-match`` also decodes greedily and reports
exact match (the continuation starts with an accepted answer), ``--n-mean``/``--n-aie`` shorten a run.
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
    exact_match: float | None = None
    icl_correct_exact_match: float | None = None

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
    return Score(
        result.accuracy, result.accuracy_ci, result.n, paper.accuracy, paper.n, result.exact_match, paper.exact_match
    )


def _describe(fv: Any) -> str:
    best = fv.selection.best if fv.selection is not None else None
    strength = f", s={best.strength:g}" if best is not None else ""
    k = f" k={fv.k}" if fv.k is not None and fv.method != "difference" else ""
    return f"{fv.method}{k} L{fv.layer}{strength}"


def measure_quality(
    model: torch.nn.Module,
    tokenizer: Any,
    task_name: str,
    *,
    base: ExtractionConfig = ExtractionConfig(),
    forms: Sequence[str] = tuple(FORMS),
    exact_match: bool = False,
) -> QualityRow:
    """The columns of :data:`COLUMNS` for one task (see the module): zero-shot, ICL and the vectors ``forms``
    (names of :data:`FORMS`); ``base``: the extraction settings; ``exact_match``: also decode greedily."""
    unknown = sorted(set(forms) - set(FORMS))
    if unknown:
        raise ValueError(f"unknown form(s) {unknown}; choose from {list(FORMS)}")
    start = time.perf_counter()
    task = load_task(task_name)
    stats = head_statistics(model, tokenizer, task, base)
    config = EvalConfig(
        seed=base.seed, n_shots=base.n_shots, template=base.template, generate=exact_match, prepend_bos=base.prepend_bos
    )
    kept = icl_correct_inputs(model, tokenizer, task, config)
    scores = {
        "zero-shot": _score(evaluate(model, tokenizer, task, config), kept),
        "ICL": _score(evaluate(model, tokenizer, task, config, mode="icl"), kept),
    }
    chosen = {}
    for name in forms:
        options = FORMS[name]
        fv = extract_function_vector(model, tokenizer, task, dataclasses.replace(base, **options), statistics=stats)
        scores[name] = _score(evaluate(model, tokenizer, task, config, vectors=[fv]), kept)
        chosen[name] = _describe(fv)
    return QualityRow(task.name, scores, chosen, time.perf_counter() - start)


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if v == v]  # NaN where no query is ICL-correct
    return sum(kept) / len(kept) if kept else float("nan")


def _columns(rows: Sequence[QualityRow]) -> list[str]:
    return [c for c in COLUMNS if rows and all(c in r.scores for r in rows)] if rows else list(COLUMNS)


def _value(score: Score, paper: bool, exact: bool) -> float:
    if exact:
        value = score.icl_correct_exact_match if paper else score.exact_match
        return float("nan") if value is None else value
    return score.icl_correct if paper else score.accuracy


def quality_table(rows: Sequence[QualityRow], *, protocol: str = "all", metric: str = "first_token") -> str:
    """Markdown: one row per task, a mean row, the share of ICL, and how often a method beats the layer mean
    (when it was measured); ``metric``: ``"first_token"`` (with 95% intervals) or ``"exact_match"``."""
    paper, exact = protocol == "icl_correct", metric == "exact_match"
    columns = _columns(rows)
    lines = ["| task | n | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for row in rows:
        cells = []
        for col in columns:
            s = row.scores[col]
            point, (low, high) = _value(s, paper, exact), (s.icl_correct_interval if paper else s.interval)
            shown = f"{point:.2f}" if exact else f"{point:.2f} ({low:.2f}–{high:.2f})"
            cells.append(shown if point == point else "–")
        first = row.scores["zero-shot"]
        lines.append(f"| {row.task} | {first.icl_correct_n if paper else first.n} | " + " | ".join(cells) + " |")
    if rows:
        means = {c: _mean([_value(r.scores[c], paper, exact) for r in rows]) for c in columns}
        lines.append("| **mean** | | " + " | ".join(f"**{means[c]:.2f}**" for c in columns) + " |")
        icl = means["ICL"]
        share = [f"{means[c] / icl:.0%}" if icl > 0 and c not in ("zero-shot", "ICL") else "" for c in columns]
        lines.append("| **% of ICL** | | " + " | ".join(share) + " |")
        if "layer_mean" in columns:
            base = [_value(r.scores["layer_mean"], paper, exact) for r in rows]
            wins = [
                f"{sum(_value(r.scores[c], paper, exact) >= b for r, b in zip(rows, base, strict=True))}/{len(rows)}"
                if c not in ("zero-shot", "ICL", "layer_mean")
                else ""
                for c in columns
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
    if rows and all(s.exact_match is not None for r in rows for s in r.scores.values()):
        print("\nExact match, every test query:\n" + quality_table(rows, metric="exact_match"))
        paper = quality_table(rows, protocol="icl_correct", metric="exact_match")
        print("\nExact match, the paper's protocol:\n" + paper)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument("--tasks", default="all", help="comma-separated built-in tasks or task files (default: all)")
    parser.add_argument("--out", default=None, help="also write every row as JSON here")
    parser.add_argument("--seed", type=int, default=0, help="seed of every prompt sample")
    parser.add_argument("--render", default=None, help="only print the tables of a file an earlier --out wrote")
    parser.add_argument("--forms", default="all", help=f"comma-separated vectors to measure of {list(FORMS)}")
    parser.add_argument("--exact-match", action="store_true", help="also decode greedily: exact match")
    parser.add_argument("--n-mean", type=int, default=None, help="clean prompts for the statistics (default 100)")
    parser.add_argument("--n-aie", type=int, default=None, help="shuffled prompts for the AIE (default 25)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--prepend-bos", choices=("yes", "no"), default=None, help="start prompts with BOS (default: the library's)"
    )


def run(args: argparse.Namespace) -> list[QualityRow]:
    if args.render:
        saved = load_rows(args.render)
        _print_tables(saved)
        return saved
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    names = builtin_tasks() if args.tasks == "all" else args.tasks.split(",")
    forms = tuple(FORMS) if args.forms == "all" else tuple(args.forms.split(","))
    sizes: dict[str, Any] = {k: v for k, v in (("n_mean", args.n_mean), ("n_aie", args.n_aie)) if v is not None}
    if args.prepend_bos is not None:
        sizes["prepend_bos"] = args.prepend_bos == "yes"
    base = ExtractionConfig(seed=args.seed, **sizes)
    rows: list[QualityRow] = []
    print(f"model: {args.model}; first-token accuracy on each task's test split (95% interval); {base}", flush=True)
    for name in names:
        rows.append(measure_quality(model, tokenizer, name, base=base, forms=forms, exact_match=args.exact_match))
        last = rows[-1]
        print(quality_table([last]).splitlines()[2] + f"  <- {last.seconds:.0f} s; {last.chosen}", flush=True)
        if args.out:
            data = [dataclasses.asdict(r) for r in rows]
            Path(args.out).write_text(json.dumps({"model": args.model, "rows": data}, indent=1), encoding="utf-8")
    _print_tables(rows)
    return rows
