"""``fv bench quality``: test accuracy of every form of vector and of the baselines, per task."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fv_plugin.config import ExtractionConfig
from fv_plugin.extraction import extract_function_vector
from fv_plugin.mediation import head_statistics
from fv_plugin.models import DEFAULT_MODEL, load_model
from fv_plugin.prompts import make_prompts
from fv_plugin.scoring import zero_shot_scores
from fv_plugin.tasks import builtin_tasks, load_task

__all__ = ["QUALITY_COLUMNS", "QualityRow", "add_arguments", "measure_quality", "quality_table", "run"]

QUALITY_COLUMNS = (
    "zero-shot",
    "ICL",
    "shuffled ICL",
    "shuffled + FV",
    "heads",
    "head_patch",
    "head_patch k=40",
    "difference",
    "layer_mean",
)


@dataclass(frozen=True)
class QualityRow:
    """Test first-token accuracies of one task; ``layers`` gives each form's layer."""

    task: str
    n_test: int
    scores: dict[str, float]
    layers: dict[str, int]
    seconds: float


def measure_quality(
    model: torch.nn.Module, tokenizer: Any, task_name: str, *, n_shots: int = 10, seed: int = 0, k: int = 10
) -> QualityRow:
    """Zero-shot, ICL, shuffled-label ICL, and zero-shot with each form of vector, on the task's test split."""
    start = time.perf_counter()
    task = load_task(task_name)
    config = ExtractionConfig(n_shots=n_shots, seed=seed, k=k)
    zero = make_prompts(task, n_shots=0, split="test", seed=seed)
    icl = make_prompts(task, n_shots=n_shots, split="test", seed=seed)
    shuffled_test = make_prompts(task, n_shots=n_shots, split="test", shuffle_labels=True, seed=seed)
    stats = head_statistics(model, tokenizer, task, config)
    forms: dict[str, dict[str, Any]] = {
        "heads": {"method": "heads"},
        "head_patch": {"method": "head_patch"},
        "head_patch k=40": {"method": "head_patch", "k": min(40, stats.aie.numel())},
        "difference": {"method": "difference"},
        "layer_mean": {"method": "layer_mean"},
    }
    scores = {
        "zero-shot": zero_shot_scores(model, tokenizer, zero)[0],
        "ICL": zero_shot_scores(model, tokenizer, icl)[0],
        "shuffled ICL": zero_shot_scores(model, tokenizer, shuffled_test)[0],
    }
    layers: dict[str, int] = {}
    for name, options in forms.items():
        fv = extract_function_vector(model, tokenizer, task, dataclasses.replace(config, **options), statistics=stats)
        scores[name] = zero_shot_scores(model, tokenizer, zero, [fv])[0]
        layers[name] = fv.layer
        if name == "heads":
            scores["shuffled + FV"] = zero_shot_scores(model, tokenizer, shuffled_test, [fv])[0]
    return QualityRow(task.name, len(zero), scores, layers, time.perf_counter() - start)


def quality_table(rows: Sequence[QualityRow]) -> str:
    """A Markdown table of :func:`measure_quality` rows with a mean row."""
    head = "| task | n | " + " | ".join(QUALITY_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(QUALITY_COLUMNS) + 2)]
    for row in rows:
        cells = []
        for col in QUALITY_COLUMNS:
            at = f" (L{row.layers[col]})" if col in row.layers and not col.startswith("head_patch") else ""
            cells.append(f"{row.scores[col]:.2f}{at}")
        lines.append(f"| {row.task} | {row.n_test} | " + " | ".join(cells) + " |")
    if rows:
        means = [sum(r.scores[c] for r in rows) / len(rows) for c in QUALITY_COLUMNS]
        lines.append("| **mean** | | " + " | ".join(f"**{m:.2f}**" for m in means) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument("--tasks", default="all", help="comma-separated built-in tasks (default: all)")
    parser.add_argument("--k", type=int, default=10, help="heads of the heads / head_patch forms")


def run(args: argparse.Namespace) -> list[QualityRow]:
    model, tokenizer = load_model(args.model)
    names = builtin_tasks() if args.tasks == "all" else args.tasks.split(",")
    rows = []
    print(f"model: {args.model}; first-token accuracy on each task's test split; (Lx) = layer", flush=True)
    for name in names:
        rows.append(measure_quality(model, tokenizer, name, k=args.k))
        print(quality_table(rows[-1:]).splitlines()[-2] + f"  <- {rows[-1].seconds:.0f} s", flush=True)
    print(quality_table(rows))
    return rows
