"""``fv bench choice``: what ``method="auto"`` chooses per task, and how its vector does on the test split by both
accuracies (first token, exact match of the greedy answer), with the work each extraction stage counted.

The head statistics of a task are computed once (``--stats`` keeps them in a folder, so a second run, e.g. of
another version of the library, reuses the same ones); the choice then runs on them. The test split is read
only by the report, never by the choice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from fv_plugin.architectures import resolve_architecture
from fv_plugin.config import ExtractionConfig
from fv_plugin.evaluation import evaluate
from fv_plugin.extraction import extract_function_vector
from fv_plugin.hooks import count_forward_work
from fv_plugin.mediation import HeadStatistics, head_statistics
from fv_plugin.models import DEFAULT_MODEL, load_model
from fv_plugin.progress import recording
from fv_plugin.tasks import Task, load_task

__all__ = ["add_arguments", "measure_choice", "run"]


def _statistics(
    model: torch.nn.Module, tokenizer: Any, task: Task, config: ExtractionConfig, folder: str | None
) -> Any:
    path = Path(folder) / f"{task.name}.pt" if folder else None
    if path is not None and path.exists():
        return torch.load(path, weights_only=False)
    layers = range(resolve_architecture(model).num_layers)
    stats = head_statistics(model, tokenizer, task, config, zero_shot=True, layers=layers)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(stats, path)
    return stats


def _scores(model: torch.nn.Module, tokenizer: Any, task: Task, **options: Any) -> dict[str, float]:
    result = evaluate(model, tokenizer, task, generate=True, **options)
    return {"first_token": result.accuracy, "exact_match": float(result.exact_match or 0.0), "n": result.n}


def _candidate(c: Any) -> dict[str, Any]:
    return {key: value for key, value in vars(c).items() if value is not None}


def _rebuilt(model: torch.nn.Module, tokenizer: Any, task: Task, config: ExtractionConfig, stats: Any, c: Any) -> Any:
    """The vector of one recorded candidate, built again from the same statistics, its strength and positions
    built in."""
    settings = dataclasses.replace(config, method=c.method, k=c.k or config.k, layer=c.layer)
    fv = extract_function_vector(model, tokenizer, task, settings, statistics=stats)
    fv = dataclasses.replace(fv, positions=c.positions or "generated")
    return fv if c.method == "head_patch" else c.strength * fv


def _rules(
    model: torch.nn.Module, tokenizer: Any, task: Task, config: ExtractionConfig, stats: Any, sel: Any, rules: Any
) -> dict[str, Any]:
    """The choice under each (side-effect budget, accuracy tolerance) pair, recomputed from the recorded finalists
    (validation data only), and the test scores of each distinct choice."""
    from fv_plugin.auto import choice

    found: dict[str, Any] = {}
    tested: dict[int, dict[str, float]] = {}
    for budget, tolerance in rules:
        index, allowed = choice(
            sel.candidates, config.smooth_layers, budget=budget, baseline=sel.baseline_exact_match, tolerance=tolerance
        )
        if index not in tested:
            fv = _rebuilt(model, tokenizer, task, config, stats, sel.candidates[index])
            tested[index] = _scores(model, tokenizer, task, vectors=[fv])
        key = f"budget={budget} tolerance={tolerance}"
        found[key] = {"chosen": sel.candidates[index].label(), "allowed": allowed, **_candidate(sel.candidates[index])}
        found[key]["test"] = tested[index]
    return found


def measure_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    config: ExtractionConfig,
    stats: str | None,
    rules: tuple[tuple[float | None, float | str], ...] = (),
    test_positions: str | None = None,
) -> dict[str, Any]:
    """One task: the statistics' and the choice's stages (seconds, token passes), the choice, test scores (the
    vector steered at ``test_positions``; ``None``: its own)."""
    with count_forward_work(model, resolve_architecture(model)) as counter, recording(counter) as log:
        statistics: HeadStatistics = _statistics(model, tokenizer, task, config, stats)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fv = extract_function_vector(model, tokenizer, task, config, statistics=statistics)
    sel = fv.selection
    assert sel is not None
    extra = _rules(model, tokenizer, task, config, statistics, sel, rules) if rules else {}
    return {
        "rules": extra,
        "task": task.name,
        "stages": [{"name": s.name, "seconds": round(s.seconds, 1), "tokens": s.tokens} for s in log.stages],
        "chosen": sel.best.label(),
        "chosen_scores": _candidate(sel.best),
        "warnings": [str(w.message) for w in caught],
        "selection": sel.to_dict(),
        "plain": _scores(model, tokenizer, task),
        "vector": _scores(model, tokenizer, task, vectors=[fv], positions=test_positions),
        "test_positions": test_positions or "own",
        "icl": _scores(model, tokenizer, task, mode="icl"),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tasks", default="antonym", help="comma-separated task names or files")
    parser.add_argument("--out", default="choice.json", help="JSON results (one object per task, appended)")
    parser.add_argument("--stats", default=None, help="folder to keep and reuse each task's head statistics")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--budgets",
        default="",
        help="comma-separated side-effect budgets (nats; 'none': no budget): the choice is made with none, then "
        "recomputed from the recorded finalists for each (and each of --tolerances), and each distinct choice is "
        "scored on test",
    )
    parser.add_argument(
        "--tolerances",
        default="",
        help="comma-separated accuracy tolerances (a number, or 'se': one standard error of the best finalist's "
        "exact match), crossed with --budgets (default: the library's)",
    )
    parser.add_argument("--portable", action="store_true", help="auto among residual-stream methods only")
    parser.add_argument("--every-token", action="store_true", help="auto scores its finalists at every token")
    parser.add_argument(
        "--test-positions",
        choices=("own", "all"),
        default="own",
        help="steer the chosen vector on the test split at its own positions, or at every token (as llama.cpp)",
    )


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    out, rows = Path(args.out), []
    budgets = tuple(None if b == "none" else float(b) for b in args.budgets.split(",") if b)
    tolerances = tuple(t if t == "se" else float(t) for t in args.tolerances.split(",") if t)
    default = ExtractionConfig()
    rules = tuple(
        (b, t)
        for b in (budgets or (default.side_effect_budget,))
        for t in (tolerances or (default.accuracy_tolerance,))
    )
    asked = bool(budgets or tolerances)
    config = ExtractionConfig(side_effect_budget=None, accuracy_tolerance=0.0) if asked else default
    where = ("all",) if args.every_token else config.auto_positions
    config = dataclasses.replace(config, portable=args.portable, auto_positions=where)
    test_positions = None if args.test_positions == "own" else args.test_positions
    for name in args.tasks.split(","):
        task = load_task(name)
        row = measure_choice(model, tokenizer, task, config, args.stats, rules if asked else (), test_positions)
        rows.append(row)
        done = json.loads(out.read_text()) if out.exists() else []
        out.write_text(json.dumps([*done, row], indent=1))
        p, v, i = row["plain"], row["vector"], row["icl"]
        print(
            f"{row['task']}: {row['chosen']} | first token {p['first_token']:.2f} -> {v['first_token']:.2f} "
            f"(ICL {i['first_token']:.2f}) | exact match {p['exact_match']:.2f} -> {v['exact_match']:.2f} "
            f"(ICL {i['exact_match']:.2f}) | n {v['n']}",
            flush=True,
        )
    return rows
