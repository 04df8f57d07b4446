"""``fv bench scaling``: how the work and time of ``auto`` and ``heads`` grow with layers x heads, measured next to
what ``fv bench extract --estimate`` projects for the same model and settings.

Random Llama models of growing size (SmolLM2's tokenizer and vocabulary, a small hidden size so the grid runs in
minutes), then the embedded models. For each model and method, per stage: the token passes and logit rows counted
by hooks while the stage ran, the CPU seconds, and the projection of :mod:`fv_plugin.benchmarks.cost` from the
model's config alone. Projected seconds are the model's own plain forwards (measured) scaled by the projected
FLOPs of the method over those of the plain forwards. ``--plot`` draws CPU seconds against layers x heads,
measured and projected; ``--out`` keeps every row as JSON (written after each model, so a partial run is kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fv_plugin.benchmarks.cost import ICL_TOKENS, StageWork, estimate, model_shape
from fv_plugin.benchmarks.extraction import measure_extraction
from fv_plugin.config import ExtractionConfig, Method
from fv_plugin.progress import StageRecord
from fv_plugin.prompt_sets import validation_prompts
from fv_plugin.tasks import load_task

__all__ = ["METHODS", "SHORT", "SIZES", "ScalingRow", "add_arguments", "measure_model", "run", "scaling_table"]

# (layers, heads, hidden) of the random models: layers x heads from 16 to 384
SIZES: tuple[tuple[int, int, int], ...] = (
    (4, 4, 64),
    (8, 4, 64),
    (8, 8, 128),
    (12, 8, 128),
    (16, 8, 128),
    (16, 16, 256),
    (24, 12, 192),
    (24, 16, 256),
)
# Shorter than the defaults so that both embedded models fit in a run on a CPU; the projection uses the same.
SHORT = ExtractionConfig(n_mean=20, n_aie=5, max_validation=24)
METHODS: tuple[Method, ...] = ("auto", "heads")


@dataclass(frozen=True)
class ScalingRow:
    """One model: its shape, the measured stages of the plain forwards and of each method, and the projection."""

    model: str
    layers: int
    heads: int
    hidden: int
    plain: StageRecord
    measured: dict[str, tuple[StageRecord, ...]]
    projected: dict[str, tuple[StageWork, ...]]
    flops: dict[str, float]  # projected FLOPs of each method and of the plain forwards ("plain")
    chosen: dict[str, str]

    def cpu(self, method: str) -> float:
        return sum(s.cpu_seconds for s in self.measured[method])

    def tokens(self, method: str) -> float:
        return sum(s.tokens for s in self.measured[method])

    def projected_tokens(self, method: str) -> float:
        return sum(s.tokens for s in self.projected[method])

    def projected_cpu(self, method: str) -> float:
        """The plain forwards' measured CPU seconds times the method's projected FLOPs over theirs."""
        return self.plain.cpu_seconds * self.flops[method] / self.flops["plain"]


def random_model(layers: int, heads: int, hidden: int, vocab: int, pad_id: int) -> torch.nn.Module:
    """A random Llama model of that shape (seeded: every run builds the same one)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, pad_token_id=pad_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def measure_model(
    name: str, model: torch.nn.Module, tokenizer: Any, *, task: str = "antonym", config: ExtractionConfig = SHORT
) -> ScalingRow:
    """Measure ``auto`` and ``heads`` on one model, next to the projection for its config with ``config``."""
    timing = measure_extraction(model, tokenizer, task, methods=METHODS, config=config, aie_check=False)
    shape = model_shape(model.config)
    queries = len(validation_prompts(load_task(task), config))
    projected: dict[str, tuple[StageWork, ...]] = {
        m: tuple(estimate(shape, dataclasses.replace(config, method=m), queries=queries)) for m in METHODS
    }
    plain_tokens = (config.n_mean + config.n_aie) * ICL_TOKENS
    plain = StageWork("plain forwards", plain_tokens, int(plain_tokens))
    flops = {m: sum(s.flops(shape) for s in stages) for m, stages in projected.items()} | {"plain": plain.flops(shape)}
    return ScalingRow(
        name, shape.layers, shape.heads, shape.hidden, timing.plain,
        {c.method: c.stages for c in timing.methods}, projected, flops, {c.method: c.chosen for c in timing.methods},
    )  # fmt: skip


def scaling_table(rows: Sequence[ScalingRow]) -> str:
    """Markdown: per model, CPU seconds and token passes of each method, measured and projected."""
    head = "| model | layers x heads | plain CPU s | " + " | ".join(
        f"{m} CPU s (projected) | {m} tokens (projected)" for m in METHODS
    )
    lines = [head + " |", "|" + "---|" * (3 + 2 * len(METHODS))]
    for r in rows:
        cells = [
            f"{r.cpu(m):.1f} ({r.projected_cpu(m):.1f}) | {r.tokens(m):.0f} ({r.projected_tokens(m):.0f})"
            for m in METHODS
        ]
        lines.append(f"| {r.model} | {r.layers * r.heads} | {r.plain.cpu_seconds:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_table(row: ScalingRow, method: str) -> str:
    """Markdown: one model's stages of ``method``, counted work against the projection."""
    projected = {s.name: s for s in row.projected[method]}
    lines = [
        f"| {row.model}, {method}: stage | CPU s | tokens | projected tokens | logit rows | projected logit rows |",
        "|---|---|---|---|---|---|",
    ]
    for s in row.measured[method]:
        p = projected.get(s.name.split(" (")[0])  # "candidates (255 x 12 queries)" -> "candidates"
        guess = f"{p.tokens:.0f} | {s.logit_rows} | {p.logit_rows}" if p else f"– | {s.logit_rows} | –"
        lines.append(f"| {s.name} | {s.cpu_seconds:.1f} | {s.tokens:.0f} | {guess} |")
    return "\n".join(lines)


def _plot(rows: Sequence[ScalingRow], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ordered = sorted(rows, key=lambda r: r.layers * r.heads)
    grid = [r.layers * r.heads for r in ordered]
    for color, method in zip(("C0", "C1"), METHODS, strict=True):
        left.plot(grid, [r.cpu(method) for r in ordered], "o", color=color, label=f"{method}: measured")
        left.plot(grid, [r.projected_cpu(method) for r in ordered], "o", color=color, mfc="none", ms=11,
                  label=f"{method}: projected")  # fmt: skip
        right.plot(grid, [r.tokens(method) for r in ordered], "o", color=color, label=f"{method}: counted")
        right.plot(grid, [r.projected_tokens(method) for r in ordered], "o", color=color, mfc="none", ms=11,
                   label=f"{method}: projected")  # fmt: skip
    left.plot(grid, [r.plain.cpu_seconds for r in ordered], "x", color="grey", label="plain forwards")
    for r in ordered:
        if not r.model.startswith("random"):
            for ax, y in ((left, r.cpu("auto")), (right, r.tokens("auto"))):
                ax.annotate(r.model, (r.layers * r.heads, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    left.set_ylabel("CPU seconds (1 thread)")
    right.set_ylabel("token passes through the decoder")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("layers x heads")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _models(args: argparse.Namespace) -> Any:
    """``(name, model, tokenizer)`` for each random size, then each embedded model, loaded one at a time."""
    from fv_plugin.models import load_model

    _, tokenizer = load_model("smollm2-135m-instruct")
    for layers, heads, hidden in SIZES if args.random else ():
        model = random_model(layers, heads, hidden, len(tokenizer), tokenizer.pad_token_id)
        yield f"random {layers}x{heads}, hidden {hidden}", model, tokenizer
    for name in args.embedded.split(",") if args.embedded else ():
        yield (name, *load_model(name))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="antonym", help="built-in task or task file")
    parser.add_argument("--plot", default=None, help="write a PNG of CPU seconds against layers x heads here")
    parser.add_argument("--out", default=None, help="also write every row as JSON here")
    parser.add_argument("--render", default=None, help="only print the tables (and --plot) of an earlier --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then steady)")
    parser.add_argument("--no-random", dest="random", action="store_false", help="skip the random models")
    parser.add_argument(
        "--embedded", default="smollm2-135m-instruct,gemma-3-270m", help="embedded models to add (comma-separated)"
    )


def load_rows(path: str | Path) -> list[ScalingRow]:
    """The rows a run wrote with ``--out``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [
        ScalingRow(
            **{
                **r,
                "plain": StageRecord(**r["plain"]),
                "measured": {m: tuple(StageRecord(**s) for s in v) for m, v in r["measured"].items()},
                "projected": {m: tuple(StageWork(**s) for s in v) for m, v in r["projected"].items()},
            }
        )
        for r in data
    ]


def run(args: argparse.Namespace) -> list[ScalingRow]:
    torch.set_num_threads(args.threads)
    rows = load_rows(args.render) if args.render else []
    if not args.render:
        config = SHORT
        print(f"task {args.task}, torch threads {torch.get_num_threads()}, {config}", flush=True)
        for name, model, tokenizer in _models(args):
            rows.append(measure_model(name, model, tokenizer, task=args.task, config=config))
            print(scaling_table(rows[-1:]).splitlines()[-1], flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1), "utf-8")
    print(scaling_table(rows))
    for row in rows:
        for method in METHODS:
            print("\n" + stage_table(row, method))
    if args.plot:
        _plot(rows, args.plot)
    return rows
