"""The ``fv`` command: ``fv extract`` and ``fv bench overhead|extract``."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence


def _extract(argv: Sequence[str]) -> int:
    from fv_plugin.extraction import METHODS, extract_function_vector, zero_shot_scores
    from fv_plugin.models import DEFAULT_MODEL, load_model
    from fv_plugin.prompts import make_prompts
    from fv_plugin.tasks import load_task

    parser = argparse.ArgumentParser(prog="fv extract", description="Extract a function vector for a task.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument("--task", required=True, help="built-in task name or a task file (.json/.jsonl/.csv)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument(
        "--method", choices=("auto", *METHODS), default="auto", help="form of the vector (auto: best for the family)"
    )
    parser.add_argument("--k", type=int, default=10, help="number of heads (method heads)")
    parser.add_argument("--layer", type=int, default=None, help="layer to add it at (default: validation sweep)")
    parser.add_argument("--n-shots", type=int, default=10, help="demonstrations per ICL prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of every prompt sample")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    task = load_task(args.task)
    start = time.perf_counter()
    fv = extract_function_vector(
        model,
        tokenizer,
        task,
        method=args.method,
        k=args.k,
        layer=args.layer,
        n_shots=args.n_shots,
        seed=args.seed,
        progress=True,
    )
    elapsed = time.perf_counter() - start
    fv.save(args.out)
    test = make_prompts(task, n_shots=0, split="test", seed=args.seed)
    icl = make_prompts(task, n_shots=args.n_shots, split="test", seed=args.seed)
    before = zero_shot_scores(model, tokenizer, test)[0]
    after = zero_shot_scores(model, tokenizer, test, [fv])[0]
    with_demos = zero_shot_scores(model, tokenizer, icl)[0]
    print(f"task {task.name!r} on {args.model}: method {fv.method}, layer {fv.layer}, {elapsed:.1f} s")
    if fv.heads:
        scores = fv.head_scores or ()
        print(
            "heads (layer, head: AIE): "
            + ", ".join(f"{layer}.{head}: {score:.4f}" for (layer, head), score in zip(fv.heads, scores, strict=False))
        )
    print(
        f"test first-token accuracy: zero-shot {before:.2f} -> with vector {after:.2f} "
        f"({args.n_shots}-shot ICL {with_demos:.2f}, {len(test)} queries)"
    )
    print(f"saved {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fv", description="Function-vector steering for Hugging Face models")
    parser.add_argument("command", choices=["extract", "bench"], help="what to run")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the command")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.command == "extract":
        return _extract(args.rest)
    from fv_plugin.bench import main as bench_main

    return bench_main(args.rest)


if __name__ == "__main__":
    raise SystemExit(main())
