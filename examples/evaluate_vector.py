"""Score a function vector in the four prompt modes, with the change in answer probability and the KL divergence.

    python examples/evaluate_vector.py [--task antonym] [--n 12]

Extracts the task's vector on the default embedded model (the method ``method="auto"`` picks), then scores the
test split unsteered and steered: zero-shot, 10-shot ICL, shuffled-label ICL and natural text.
"""

from __future__ import annotations

import argparse

import fv_plugin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="antonym")
    parser.add_argument("--n", type=int, default=12, help="test prompts per mode")
    args = parser.parse_args()
    model, tok = fv_plugin.load_model("smollm2-135m-instruct")
    task = fv_plugin.load_task(args.task)
    fv = fv_plugin.extract_function_vector(model, tok, task, n_mean=40)
    print(f"{task.name}: {fv.method} vector at layer {fv.layer}")
    print("mode       | unsteered acc | steered acc | exact match | Δp(answer) | KL")
    for mode in ("zero_shot", "icl", "shuffled", "natural"):
        n = args.n // 3 if mode == "natural" else args.n  # natural mode: one prompt per query and template
        base = fv_plugin.evaluate(model, tok, task, mode=mode, n=n)
        steered = fv_plugin.evaluate(model, tok, task, mode=mode, n=n, vectors=[fv])
        print(
            f"{mode:10} | {base.accuracy:13.2f} | {steered.accuracy:11.2f} | "
            f"{base.exact_match:.2f} -> {steered.exact_match:.2f} | {steered.prob_shift:+10.3f} | {steered.kl:.2f}"
        )
    row = steered.rows[0]
    print(f"e.g. {row.prompt!r} -> {row.continuation.strip()!r} (accepted: {', '.join(row.answers)})")


if __name__ == "__main__":
    main()
