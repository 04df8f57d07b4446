"""Where a function vector lives and what it says: AIE heatmap, layer curve, top tokens, similarity of tasks.

    python examples/visualize.py [--out plots]

Needs the ``viz`` extra.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import fv_plugin
from fv_plugin import viz

TASKS = ("antonym", "capitalize", "country-capital", "present-past")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="plots")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = fv_plugin.load_model("smollm2-135m-instruct")

    # The paper's head-based vector keeps its AIE matrix and validation layer sweep in its metadata.
    task = fv_plugin.load_task("antonym")
    heads = fv_plugin.extract_function_vector(model, tok, task, method="heads", n_mean=40, n_aie=10)
    viz.plot_aie(heads).savefig(out / "antonym_aie.png")
    viz.plot_layer_curve(heads).savefig(out / "antonym_layers.png")
    located = fv_plugin.head_locations(heads)
    print("top heads (layer, head, AIE):", [(h.layer, h.head, round(h.aie, 4)) for h in located])
    tokens = fv_plugin.top_tokens(model, tok, heads, k=10)
    viz.plot_top_tokens(tokens).savefig(out / "antonym_tokens.png")
    print("its top tokens:", [t.token for t in tokens])

    # One vector per task, of one method at one layer so that they are comparable, and their similarity.
    same_form = fv_plugin.ExtractionConfig(method="difference", layer=18, n_mean=30)
    vectors = [fv_plugin.extract_function_vector(model, tok, fv_plugin.load_task(name), same_form) for name in TASKS]
    matrix = fv_plugin.similarity_matrix(vectors)
    viz.plot_similarity(matrix, list(TASKS)).savefig(out / "similarity.png")
    for name, row in zip(TASKS, matrix.tolist(), strict=True):
        print(f"{name:16}", " ".join(f"{v:5.2f}" for v in row))
    print(f"plots in {out}/")


if __name__ == "__main__":
    main()
