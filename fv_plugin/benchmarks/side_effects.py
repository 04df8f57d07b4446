"""``fv bench side-effects``: what each vector does to its own task and to everything else, ungated, gated and
with ``positions="answer"``.

For each vector and each mode (``ungated``: ``steer(model, fv)``; ``gated``: ``gate=True``; ``answer``:
``positions="answer"``; ``gated+answer``: both), on the model the vectors were made for:

- own task, zero-shot (test split): first-token accuracy and exact match of the greedy answer
  (:func:`~fv_plugin.evaluate`, ``mode="zero_shot"``);
- own task in natural templates (``The word "x" means``): an accepted answer in the continuation (``mode="natural"``);
- other tasks' 10-shot ICL prompts: first-token accuracy steered minus plain, the mean over the other tasks
  (steered at the last prompt token, so the same with either positions);
- neutral prose (openings of :func:`~fv_plugin.tasks.neutral_texts`) and chat prompts
  (:func:`~fv_plugin.side_effects.chat_requests` through the chat template): the share of 24-token greedy
  continuations identical to the plain model's, and the share that degenerates into a repetition loop
  (:func:`~fv_plugin.side_effects.degenerate`) against the plain model's;
- the perplexity of the neutral paragraphs read as continuations of their openings, steered over plain
  (:func:`~fv_plugin.side_effects.continuation_perplexity`).

Rates come with 95% Wilson intervals. A vector without a condition gets no gated rows (a note says so). A second
table gives, per gated vector, the share of each kind of prompt that passes its condition (own zero-shot and
natural-template test prompts, neutral openings, chat prompts). The measurements live in
:mod:`fv_plugin.benchmarks.side_effect_measures`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fv_plugin.benchmarks.side_effect_measures import (
    MODES,
    Corpus,
    ModeRow,
    Plain,
    Rate,
    Settings,
    measure_plain,
    measure_vector,
)
from fv_plugin.models import DEFAULT_MODEL, load_model
from fv_plugin.tasks import builtin_tasks, load_task
from fv_plugin.vector import FunctionVector

__all__ = ["add_arguments", "gate_table", "rows_json", "run", "side_effect_table"]


def _cell(value: object, fmt: Callable[[Any], str] = str) -> str:
    return "–" if value is None else fmt(value)


def side_effect_table(rows: Sequence[ModeRow], plain: Plain) -> str:
    """Markdown: one line per vector and mode, and the plain model's degeneration for reference."""
    head = (
        "| vector | mode | own 0-shot, first token | own 0-shot, exact match | natural templates | other tasks' ICL Δ "
        "| neutral identical | chat identical | degenerate (plain "
        + f"{plain.degenerate.value:.2f}"
        + ") | perplexity × |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r.note:
            lines.append(f"| {r.vector} | {r.mode} | {r.note} |" + " |" * 7)
            continue
        cells = [
            _cell(r.zero_shot),
            _cell(r.exact_match),
            _cell(r.natural),
            _cell(r.icl_change, lambda v: f"{v:+.2f}"),
            _cell(r.neutral_identical),
            _cell(r.chat_identical),
            _cell(r.degenerate),
            _cell(r.perplexity_ratio, lambda v: f"{v:.2f}"),
        ]
        lines.append(f"| {r.vector} | {r.mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _vector_paths(args: argparse.Namespace) -> list[Path]:
    if args.vectors:
        return [Path(v) for v in args.vectors]
    folder = Path("demo") / "vectors" / args.model
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise ValueError(
            f"no vectors given and none found in {folder} (the demo's shipped vectors, read from a checkout of the "
            "repository): run from the repository's root or pass --vectors FILE [FILE ...]"
        )
    return found


def _others(task: str, settings: Settings) -> list[str]:
    return [t for t in builtin_tasks() if t != task][: settings.other_tasks]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument(
        "--vectors", nargs="+", default=None, help="vector files (default: the demo's vectors of --model)"
    )
    parser.add_argument("--queries", type=int, default=20, help="test queries per task (default 20)")
    parser.add_argument("--other-tasks", type=int, default=None, help="at most this many other tasks (default all)")
    parser.add_argument("--paragraphs", type=int, default=None, help="neutral paragraphs (default: all 42)")
    parser.add_argument("--chat", type=int, default=None, help="chat prompts (default: all shipped)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, among {','.join(MODES)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of every prompt sample")
    parser.add_argument("--out", default=None, help="also write every row as JSON here")


def run(args: argparse.Namespace) -> list[ModeRow]:
    settings = Settings(
        queries=args.queries,
        other_tasks=args.other_tasks,
        paragraphs=args.paragraphs,
        chat=args.chat,
        seed=args.seed,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
    )
    vectors = [(path, FunctionVector.load(path)) for path in _vector_paths(args)]
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    corpus = Corpus.shipped(tokenizer, settings)
    names = sorted({o for _, fv in vectors for o in _others(str(fv.task), settings)})
    plain = measure_plain(model, tokenizer, [load_task(n) for n in names], corpus, settings)
    print(f"model {args.model}; {settings}; plain measured in {time.perf_counter() - start:.0f} s", flush=True)
    rows: list[ModeRow] = []
    for path, fv in vectors:
        if fv.task is None:
            raise ValueError(f"{path}: the vector names no task (fv.task); the bench needs its task's queries")
        others = [load_task(n) for n in _others(fv.task, settings)]
        rows += measure_vector(model, tokenizer, fv, load_task(fv.task), others, corpus, plain, settings)
        print(side_effect_table(rows, plain).splitlines()[-1], f" <- {time.perf_counter() - start:.0f} s", flush=True)
        if args.out:
            data = {"model": args.model, "settings": dataclasses.asdict(settings), "rows": rows_json(rows)}
            data["plain"] = {
                "icl": dict(plain.icl),
                "perplexity": plain.perplexity,
                "degenerate": str(plain.degenerate),
            }
            Path(args.out).write_text(json.dumps(data, indent=1), encoding="utf-8")
    print("\n" + side_effect_table(rows, plain) + "\n\nShare of prompts that pass each condition:\n" + gate_table(rows))
    return rows


def gate_table(rows: Sequence[ModeRow]) -> str:
    """Markdown: per gated vector, the share of each kind of prompt that passes its condition."""
    seen = {r.vector: r.gate_passes for r in rows if r.gate_passes}
    kinds = next(iter(seen.values())).keys() if seen else ()
    lines = ["| vector | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
    return "\n".join(lines + [f"| {v} | " + " | ".join(str(p[k]) for k in kinds) + " |" for v, p in seen.items()])


def rows_json(rows: Sequence[ModeRow]) -> list[dict[str, Any]]:
    def value(v: object) -> object:
        if isinstance(v, Rate):
            return {"hits": v.hits, "n": v.n, "value": v.value, "interval": list(v.interval)}
        return {key: value(item) for key, item in v.items()} if isinstance(v, Mapping) else v

    return [{f.name: value(getattr(r, f.name)) for f in dataclasses.fields(r)} for r in rows]
