"""The ``fv`` command: ``fv extract``, ``fv eval``, ``fv compare``, ``fv export`` and ``fv bench ...``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _extract_parser() -> argparse.ArgumentParser:
    from fv_plugin.config import DEFAULT_MODEL, METHODS, ExtractionConfig

    parser = argparse.ArgumentParser(prog="fv extract", description="Extract a function vector for a task.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument(
        "--task", required=True, help="built-in task name, task file (.json/.jsonl/.csv) or folder of split files"
    )
    parser.add_argument("--valid", default=None, help="the task's own validation file (--task is then its train file)")
    parser.add_argument("--test", default=None, help="the task's own test file (--task is then its train file)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument(
        "--method", choices=METHODS, default="auto", help="how the vector is made (auto: chosen on validation)"
    )
    parser.add_argument("--k", type=int, default=10, help="number of heads (method heads)")
    parser.add_argument("--layer", type=int, default=None, help="layer to add it at (default: validation sweep)")
    parser.add_argument("--n-shots", type=int, default=10, help="demonstrations per ICL prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of every prompt sample")
    portable = "auto chooses among residual-stream methods only (exportable to llama.cpp with fv export)"
    parser.add_argument("--portable", action="store_true", help=portable)
    parser.add_argument(
        "--no-condition", action="store_true", help="do not learn the condition gate=True uses (learned by default)"
    )
    parser.add_argument(
        "--keep-weak",
        action="store_true",
        help="save the vector even if it does not beat the model without a vector on validation (else: exit 1)",
    )
    parser.add_argument(
        "--side-effect-budget",
        type=float,
        default=None,
        help="auto: the most KL (nats) on neutral text a vector may cause (default: the library's; <0: no budget)",
    )
    parser.add_argument(
        "--accuracy-tolerance",
        type=_tolerance,
        default=None,
        help="auto: the validation exact match it may give up for a smaller side effect: 'se' (one standard error "
        "of the best, the default) or a number (0: always the most accurate)",
    )
    parser.add_argument("--condition", action="store_true", help=argparse.SUPPRESS)  # the default; kept for scripts
    screen = "every head on every shuffled prompt (the paper's AIE; default: the best heads of a screen, cheaper)"
    parser.add_argument("--full-aie", action="store_true", help=screen)
    where = parser.add_mutually_exclusive_group()
    paper = "auto: score the finalists at the paper's positions only (default: also at the last prompt token only)"
    where.add_argument("--paper-positions", action="store_true", help=paper)
    every = "auto: score the finalists steered at every token, as llama.cpp adds a control vector (with --portable)"
    where.add_argument("--every-token", action="store_true", help=every)
    parser.add_argument(
        "--prepend-bos",
        action=argparse.BooleanOptionalAction,
        default=ExtractionConfig.prepend_bos,
        help="start every prompt with the tokenizer's BOS token (kept in the vector; evaluation and the demo follow)",
    )
    return parser


def _tolerance(text: str) -> float | str:
    if text == "se":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'se' or a number between 0 and 1, got {text!r}") from None


def _extract_config(args: argparse.Namespace) -> Any:
    from fv_plugin.config import ExtractionConfig

    budget: dict[str, Any] = {} if args.side_effect_budget is None else {"side_effect_budget": args.side_effect_budget}
    if args.side_effect_budget is not None and args.side_effect_budget < 0:
        budget = {"side_effect_budget": None}
    if args.accuracy_tolerance is not None:
        budget["accuracy_tolerance"] = args.accuracy_tolerance
    positions = ExtractionConfig.auto_positions
    return ExtractionConfig(
        method=args.method,
        k=args.k,
        layer=args.layer,
        n_shots=args.n_shots,
        seed=args.seed,
        condition=not args.no_condition,
        portable=args.portable,
        prepend_bos=args.prepend_bos,
        aie_screen=None if args.full_aie else ExtractionConfig.aie_screen,
        auto_positions=("all",) if args.every_token else ("generated",) if args.paper_positions else positions,
        **budget,
    )


def _weak_message(selection: Any) -> str:
    c = selection.best
    exact = (
        f"exact match {c.exact_match:.2f} vs {selection.baseline_exact_match:.2f}, "
        if c.exact_match is not None
        else ""
    )
    return (
        f"fv extract: the best vector ({c.label()}) does not beat the model without a vector on "
        f"{selection.n_queries} validation queries ({exact}first token {c.accuracy:.2f} vs "
        f"{selection.baseline_accuracy:.2f}); nothing saved. Use --keep-weak to save it anyway"
    )


def _test_scores(model: Any, tokenizer: Any, task: Any, args: argparse.Namespace, fv: Any) -> str:
    """Both accuracies on the test split: without a vector, with it, and with demonstrations."""
    from fv_plugin.config import EvalConfig
    from fv_plugin.evaluation import evaluate

    config = EvalConfig(mode="zero_shot", seed=args.seed, n_shots=args.n_shots)
    before = evaluate(model, tokenizer, task, config)
    after = evaluate(model, tokenizer, task, config, vectors=[fv])
    icl = evaluate(model, tokenizer, task, config, mode="icl")
    return (
        f"test first-token accuracy: zero-shot {before.accuracy:.2f} -> with vector {after.accuracy:.2f} "
        f"({args.n_shots}-shot ICL {icl.accuracy:.2f}); exact match of the greedy answer: "
        f"{before.exact_match:.2f} -> {after.exact_match:.2f} (ICL {icl.exact_match:.2f}); {after.n} queries"
    )


def _extract(argv: Sequence[str]) -> int:
    from fv_plugin.tasks import load_task

    args = _extract_parser().parse_args(argv)
    config = _extract_config(args)
    task = load_task(args.task, valid=args.valid, test=args.test)  # a bad task file fails here, before the model

    from fv_plugin.auto import WeakVectorWarning
    from fv_plugin.extraction import extract_function_vector
    from fv_plugin.models import load_model

    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    with warnings.catch_warnings():  # said below in one line, with the figures and the flag
        warnings.simplefilter("ignore", WeakVectorWarning)
        fv = extract_function_vector(model, tokenizer, task, config)  # a bar per stage unless FV_PROGRESS=0
    elapsed = time.perf_counter() - start
    print(f"task {task.name!r} on {args.model}: method {fv.method}, layer {fv.layer}, {elapsed:.1f} s")
    if fv.selection is not None:
        from fv_plugin.report import selection_table

        print(selection_table(fv.selection))
        if not fv.selection.beats_zero_shot and not args.keep_weak:
            print(_weak_message(fv.selection), file=sys.stderr)
            return 1
    fv.save(args.out)
    if fv.heads:
        pairs = zip(fv.heads, fv.head_scores or (), strict=False)
        print(
            "heads (layer, head: AIE): " + ", ".join(f"{layer}.{head}: {score:.4f}" for (layer, head), score in pairs)
        )
    print(_test_scores(model, tokenizer, task, args, fv))
    if fv.condition is not None:
        print(fv.condition.describe())
    print(f"saved {args.out}")
    return 0


def _load_vectors(paths: Sequence[str]) -> dict[str, Any]:
    """Vectors from ``.safetensors`` files or folders of them, keyed by their task."""
    from fv_plugin.vector import FunctionVector

    found: dict[str, Any] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"no such vector file or folder: {raw}")
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        for file in files:
            fv = FunctionVector.load(file)
            found[fv.task or file.stem] = fv
    return found


def _tasks(names: Sequence[str]) -> list[Any]:
    from fv_plugin.tasks import builtin_tasks, load_task

    return [load_task(n) for n in (builtin_tasks() if list(names) == ["all"] else names)]


def _eval_parser() -> argparse.ArgumentParser:
    from fv_plugin.config import DEFAULT_KS, DEFAULT_MODEL, DEFAULT_STRENGTHS, MODES, PROTOCOLS

    parser = argparse.ArgumentParser(prog="fv eval", description="Evaluate function vectors and write a report.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument("--tasks", nargs="+", default=["all"], help="task names, files or folders, or 'all'")
    parser.add_argument("--vectors", nargs="*", default=(), help="vector files or folders (else extracted)")
    parser.add_argument("--method", default="auto", help="method to extract with when a task has no vector")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--strengths", nargs="*", type=float, default=list(DEFAULT_STRENGTHS))
    parser.add_argument("--ks", nargs="*", type=int, default=list(DEFAULT_KS), help="numbers of heads to sweep")
    parser.add_argument("--no-heads", action="store_true", help="skip the AIE analysis (and the k sweep)")
    parser.add_argument("--no-layer-sweep", action="store_true", help="skip the test-split layer sweep")
    parser.add_argument("--layer-step", type=int, default=1, help="sweep every n-th layer")
    parser.add_argument("--n", type=int, default=None, help="test prompts per mode (default: all)")
    parser.add_argument("--n-natural", type=int, default=12, help="test queries in natural-text mode")
    parser.add_argument("--n-mean", type=int, default=100, help="ICL prompts for means")
    parser.add_argument("--n-aie", type=int, default=25, help="shuffled prompts for the AIE")
    parser.add_argument("--n-shots", type=int, default=10, help="demonstrations per ICL prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS), help="all queries / ICL-correct only"
    )
    parser.add_argument("--no-side-effects", action="store_true", help="skip the neutral-text measures")
    parser.add_argument("--no-specificity", action="store_true", help="skip every vector on every task")
    return parser


def _eval(argv: Sequence[str]) -> int:
    args = _eval_parser().parse_args(argv)
    tasks = _tasks(args.tasks)  # bad task or vector files fail here, before the model loads
    vectors = _load_vectors(args.vectors)

    from fv_plugin.config import ExtractionConfig
    from fv_plugin.experiments import EvalReport, ExperimentConfig, evaluate_tasks
    from fv_plugin.models import load_model
    from fv_plugin.report import write_eval_report

    extraction = ExtractionConfig(
        method=args.method, n_mean=args.n_mean, n_aie=args.n_aie, n_shots=args.n_shots, seed=args.seed
    )
    config = ExperimentConfig(
        extraction=extraction,
        modes=tuple(args.modes),
        n=args.n,
        n_natural=args.n_natural,
        strengths=tuple(args.strengths),
        ks=tuple(args.ks),
        heads=not args.no_heads,
        layer_sweep_test=not args.no_layer_sweep,
        layer_step=args.layer_step,
        protocols=tuple(args.protocols),
        side_effects=not args.no_side_effects,
        specificity=not args.no_specificity,
    )
    model, tokenizer = load_model(args.model)
    out = Path(args.out)

    def save(report: EvalReport) -> None:  # after each task, so a long run leaves usable results
        for t in report.tasks:
            t.vector.save(out / "vectors" / f"{t.task}.safetensors")
            if t.heads_vector is not None:
                t.heads_vector.save(out / "vectors" / "heads" / f"{t.task}.safetensors")
        write_eval_report(report, out)

    report = evaluate_tasks(
        model,
        tokenizer,
        tasks,
        config,
        model_name=args.model,
        vectors=vectors,
        progress=True,
        on_task=save,
    )
    print(f"wrote {out / 'summary.md'} ({len(report.tasks)} tasks)")
    return 0


def _compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fv compare", description="Compare two models' function vectors.")
    parser.add_argument("--model-a", default="smollm2-135m-instruct")
    parser.add_argument("--model-b", default="gemma-3-270m")
    parser.add_argument("--tasks", nargs="+", default=["all"], help="task names, files or folders, or 'all'")
    parser.add_argument("--vectors-a", nargs="*", default=(), help="model A's vector files or folders")
    parser.add_argument("--vectors-b", nargs="*", default=(), help="model B's vector files or folders")
    parser.add_argument("--heads-a", nargs="*", default=(), help="model A's head-based vectors (method heads)")
    parser.add_argument("--heads-b", nargs="*", default=(), help="model B's head-based vectors (method heads)")
    parser.add_argument("--no-heads", action="store_true", help="do not extract head-based vectors")
    parser.add_argument(
        "--method",
        choices=("difference", "layer_mean", "heads"),
        default="difference",
        help="single-layer method to extract with where no vector is given (a map carries one layer's vector)",
    )
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--n", type=int, default=None, help="test prompts per task (default: all)")
    parser.add_argument("--ridge", type=float, default=1e-3, help="ridge penalty of the linear map")
    parser.add_argument("--n-shots", type=int, default=10, help="demonstrations per ICL prompt")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _compare(argv: Sequence[str]) -> int:
    args = _compare_parser().parse_args(argv)
    tasks = _tasks(args.tasks)  # bad task or vector files fail here, before the models load
    given = (_load_vectors(args.vectors_a), _load_vectors(args.vectors_b))
    heads = None if args.no_heads else (_load_vectors(args.heads_a), _load_vectors(args.heads_b))

    from fv_plugin.config import ExtractionConfig
    from fv_plugin.experiments import compare_tasks
    from fv_plugin.models import load_model
    from fv_plugin.report import write_comparison_report

    sides = [(*load_model(name), name) for name in (args.model_a, args.model_b)]
    comparison, vectors_a, vectors_b = compare_tasks(
        sides[0],
        sides[1],
        tasks,
        vectors=given,
        head_vectors=heads,
        extraction=ExtractionConfig(method=args.method, n_shots=args.n_shots, seed=args.seed),
        ridge=args.ridge,
        n=args.n,
    )
    out = Path(args.out)
    for name, vectors in ((args.model_a, vectors_a), (args.model_b, vectors_b)):
        for task, fv in vectors.items():
            fv.save(out / "vectors" / Path(name).name / f"{task}.safetensors")
    print(f"wrote {write_comparison_report(comparison, out)}")
    return 0


def _export(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="fv export", description="Export function vectors for other runtimes.")
    parser.add_argument("--format", choices=["gguf"], default="gguf", help="gguf: a llama.cpp control vector")
    parser.add_argument("--vector", nargs="+", required=True, help="vector files (.safetensors), summed per layer")
    parser.add_argument("--weights", nargs="*", type=float, default=None, help="one weight per vector (default 1)")
    parser.add_argument("--model-hint", default=None, help="controlvector.model_hint (default: the model type)")
    parser.add_argument("--out", required=True, help="output .gguf file")
    args = parser.parse_args(argv)
    weights = args.weights or [1.0] * len(args.vector)
    if len(weights) != len(args.vector):
        parser.error(f"--weights has {len(weights)} values for {len(args.vector)} vectors")
    from fv_plugin.export import to_gguf
    from fv_plugin.vector import FunctionVector

    pairs = [(FunctionVector.load(path), weight) for path, weight in zip(args.vector, weights, strict=True)]
    try:
        path = to_gguf(pairs, args.out, model_hint=args.model_hint)
    except ValueError as exc:  # e.g. a head-level vector: the message names the portable choice
        raise SystemExit(f"fv export: {exc}") from exc
    print(f"wrote {path} (llama.cpp adds it at every position: --control-vector {path})")
    return 0


COMMANDS = ("extract", "eval", "compare", "export", "bench")
# Raised by the library for what the user gave (a bad value, a missing file, a missing extra): one line on stderr.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError)


def _split_verbose(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``-v``/``--verbose`` (accepted before or after the command; ``--`` ends options)."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    kept = [a for a in args[:end] if a not in ("-v", "--verbose")]
    return kept + args[end:], len(kept) < end


def _run(command: str, rest: Sequence[str]) -> int:
    commands = {"extract": _extract, "eval": _eval, "compare": _compare, "export": _export}
    if command in commands:
        return commands[command](rest)
    from fv_plugin.benchmarks import main as bench_main

    return bench_main(rest)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fv``. Errors in what the user gave print ``fv: error: <message>`` (the traceback with ``-v``)."""
    args_in, verbose = _split_verbose(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="fv", description="Function-vector steering for Hugging Face models")
    parser.add_argument("command", choices=COMMANDS, help="what to run (fv COMMAND --help for its options)")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the command")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress; full tracebacks on errors")
    args = parser.parse_args(args_in)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    try:
        return _run(args.command, args.rest)
    except USER_ERRORS as exc:
        if verbose:
            traceback.print_exc()
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"fv: error: {message or type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
