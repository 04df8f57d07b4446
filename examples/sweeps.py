"""Accuracy against strength, layer and number of heads, as data and as plots.

    python examples/sweeps.py [--task antonym] [--out sweeps]

Needs the ``viz`` extra for the PNGs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import fv_plugin
from fv_plugin import viz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="antonym")
    parser.add_argument("--out", default="sweeps")
    parser.add_argument("--n", type=int, default=16, help="test prompts per point")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = fv_plugin.load_model("smollm2-135m-instruct")
    task = fv_plugin.load_task(args.task)

    per_layer = fv_plugin.layer_vectors(model, tok, task, n_mean=40)  # the difference method at every layer, one pass
    layers = fv_plugin.sweep_layers(model, tok, task, per_layer.__getitem__, range(0, len(per_layer), 3), n=args.n)
    best = int(layers.best)
    strength = fv_plugin.sweep_strength(model, tok, task, per_layer[best], [0, 0.5, 1, 2, 3], n=args.n)

    stats = fv_plugin.head_statistics(model, tok, task, fv_plugin.ExtractionConfig(n_mean=40, n_aie=10))
    ks = fv_plugin.sweep_k(model, tok, task, stats, [1, 5, 10, 20, 40], layer=best, n=args.n)

    for sweep in (layers, strength, ks):
        cells = ", ".join(f"{v:g}: {a:.2f}" for v, a in zip(sweep.values, sweep.accuracy, strict=True))
        print(f"{sweep.parameter:8} (unsteered {sweep.baseline_accuracy:.2f}) {cells}")
        viz.plot_sweep(sweep).savefig(out / f"{sweep.parameter}.png")
    print(f"plots in {out}/")


if __name__ == "__main__":
    main()
