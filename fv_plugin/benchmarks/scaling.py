"""``fv bench scaling``: how the cost of ``auto`` and ``heads``, over the plain forwards of their prompts, grows
with layers x heads: random Llama models of growing size (SmolLM2's tokenizer), then the embedded models.

CPU-time ratios, each model's extractions and plain forwards measured side by side in one run; ``--plot`` writes a
PNG of the ratios against layers x heads.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from fv_plugin.benchmarks.cost import model_shape
from fv_plugin.benchmarks.extraction import measure_extraction

__all__ = ["SIZES", "add_arguments", "measure_scaling", "run"]


SIZES: tuple[tuple[int, int, int], ...] = ((4, 4, 128), (8, 8, 256), (16, 8, 384), (24, 12, 576))


def measure_scaling(
    sizes: Sequence[tuple[int, int, int]] = SIZES, *, task: str = "antonym", plot: str | None = None
) -> list[dict[str, float]]:
    """CPU-time ratios of ``auto`` and ``heads`` to the plain forwards on random Llama models of (layers, heads,
    hidden) ``sizes`` with SmolLM2's tokenizer, then on the embedded models; a table row per model, and a PNG
    of the ratios against layers x heads when ``plot`` names a file."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fv_plugin.models import EMBEDDED_MODELS, load_model

    _, tokenizer = load_model("smollm2-135m-instruct")
    models: list[tuple[str, Any, Any]] = []
    for layers, heads, hidden in sizes:
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        torch.manual_seed(0)
        models.append(
            (f"random {layers}x{heads}, hidden {hidden}", AutoModelForCausalLM.from_config(config), tokenizer)
        )
    models += [(name, *load_model(name)) for name in EMBEDDED_MODELS]
    rows = []
    for name, model, tok in models:
        timing = measure_extraction(model.eval(), tok, task, aie_check=False)
        shape = model_shape(model.config)
        row: dict[str, float] = {"layers": shape.layers, "heads": shape.heads, "hidden": shape.hidden}
        row |= {"plain_cpu_s": timing.plain.cpu_seconds, "auto": timing.ratio("auto", cpu=True)}
        row["heads_ratio"] = timing.ratio("heads", cpu=True)
        cells = (
            f"{shape.layers * shape.heads} | {row['plain_cpu_s']:.1f} | {row['auto']:.2f} | {row['heads_ratio']:.2f}"
        )
        print(f"| {name} | {cells} |", flush=True)
        rows.append(row)
    if plot:
        _plot(rows, plot)
    return rows


def _plot(rows: Sequence[dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r["layers"] * r["heads"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, method in (("auto", "auto"), ("heads_ratio", "heads")):
        ax.plot(grid, [r[key] for r in rows], "o", label=method)
    ax.axhline(2.0, color="C0", ls=":", lw=1)
    ax.axhline(1.5, color="C1", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("layers x heads")
    ax.set_ylabel("CPU time / plain forwards")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="antonym", help="built-in task or task file")
    parser.add_argument("--plot", default=None, help="write a PNG of the ratios here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then steady)")


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    torch.set_num_threads(args.threads)
    print("| model | layers x heads | plain CPU s | auto / plain | heads / plain |\n|---|---|---|---|---|")
    return measure_scaling(task=args.task, plot=args.plot)
