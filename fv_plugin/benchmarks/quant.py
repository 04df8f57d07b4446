"""``fv bench quant``: the default function vector of quantized models against the float32 one.

For each configuration (float32, 8-bit, 4-bit nf4, 4-bit fp4) a fresh subprocess loads the model, extracts the
default-method vector for a task, and scores zero-shot accuracy on the task's test split with it; its peak memory
is the growth of that process's resident set over what it held before loading the model (torch allocations are
invisible to ``tracemalloc``). float32 runs first and chooses the layer; the quantized runs reuse that layer, so
the cosine compares vectors at the same place.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fv_plugin.activations import task_state_vectors
from fv_plugin.architectures import resolve_architecture
from fv_plugin.benchmarks.memory import peak_rss_mib, rss_mib
from fv_plugin.config import EvalConfig, ExtractionConfig

__all__ = ["QuantRow", "main", "measure_config", "quant_table"]

CONFIGS: tuple[str, ...] = ("fp32", "8bit", "nf4", "fp4")


@dataclass(frozen=True)
class QuantRow:
    """One configuration's vector and scores (``cosine`` is with the float32 vector at the same layer)."""

    config: str
    task: str
    layer: int
    zero_shot: float  # unsteered test accuracy
    steered: float  # test accuracy with the vector
    cosine: float
    weights_mib: float  # the model's parameters and buffers (transformers' get_memory_footprint)
    model_mib: float  # resident-set growth from loading the model
    peak_mib: float  # peak resident-set growth over the whole run (load, extraction, scoring)
    seconds: float


def measure_config(
    model_name: str,
    config: str,
    task_name: str,
    *,
    layer: int | None,
    vector_out: str,
    seed: int = 0,
    n_mean: int = 100,
    n_shots: int = 10,
) -> dict[str, float | int | str]:
    """Run one configuration in this process (meant to be a fresh one) and save its vector to ``vector_out``."""
    from fv_plugin.extraction import extract_function_vector
    from fv_plugin.models import load_model
    from fv_plugin.prompt_sets import eval_prompts
    from fv_plugin.scoring import zero_shot_scores
    from fv_plugin.tasks import load_task

    task = load_task(task_name)
    test = eval_prompts(task, EvalConfig(mode="zero_shot", seed=seed))
    before = rss_mib()
    start = time.perf_counter()
    model, tokenizer = load_model(model_name, quantization=None if config == "fp32" else config)  # type: ignore[arg-type]
    loaded = rss_mib()
    fv = extract_function_vector(model, tokenizer, task, layer=layer, seed=seed, n_mean=n_mean, n_shots=n_shots)
    fv.save(vector_out)
    zero = zero_shot_scores(model, tokenizer, test)[0]
    steered = zero_shot_scores(model, tokenizer, test, [fv])[0]
    peak = peak_rss_mib()
    return {
        "config": config,
        "task": task.name,
        "layer": fv.layer,
        "zero_shot": zero,
        "steered": steered,
        "weights_mib": model.get_memory_footprint() / 2**20,
        "model_mib": loaded - before,
        "peak_mib": peak - before,
        "seconds": time.perf_counter() - start,
    }


def _run_child(
    model_name: str, config: str, task: str, layer: int | None, vector_out: str, extra: list[str]
) -> dict[str, Any]:
    command = [sys.executable, "-m", "fv_plugin.benchmarks.quant", "--child", config, "--model", model_name]
    command += ["--task", task, "--vector-out", vector_out, *extra]
    if layer is not None:
        command += ["--layer", str(layer)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"configuration {config} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_task(
    model_name: str, task: str, configs: Sequence[str], *, seed: int = 0, n_mean: int = 100, n_shots: int = 10
) -> list[QuantRow]:
    """float32 first (it picks the layer), then every other configuration at that layer, each in a subprocess."""
    from fv_plugin.vector import FunctionVector

    rows: list[QuantRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        reference: FunctionVector | None = None
        layer: int | None = None
        for config in ("fp32", *[c for c in configs if c != "fp32"]):
            out = str(Path(tmp) / f"{config}.safetensors")
            extra = ["--seed", str(seed), "--n-mean", str(n_mean), "--n-shots", str(n_shots)]
            result = _run_child(model_name, config, task, layer, out, extra)
            fv = FunctionVector.load(out)
            if reference is None:
                reference, layer = fv, fv.layer
            cosine = float(torch.nn.functional.cosine_similarity(fv.vector.float(), reference.vector.float(), dim=0))
            rows.append(
                QuantRow(
                    config=config,
                    task=str(result["task"]),
                    layer=int(result["layer"]),
                    zero_shot=float(result["zero_shot"]),
                    steered=float(result["steered"]),
                    cosine=cosine,
                    weights_mib=float(result["weights_mib"]),
                    model_mib=float(result["model_mib"]),
                    peak_mib=float(result["peak_mib"]),
                    seconds=float(result["seconds"]),
                )
            )
            print(quant_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def diagnose(
    model_name: str, config: str, task_name: str, *, layer: int, n_mean: int = 100, n_shots: int = 10, seed: int = 0
) -> str:
    """Why a quantized vector differs: per-layer cosine with float32, ICL accuracy of both, and cross-steering.

    Loads float32, then ``config``; reports for every layer the cosine between their difference vectors (same
    prompts), each model's 10-shot test accuracy (does the quantized model still do the task in context?), and
    the quantized model's zero-shot accuracy at ``layer`` steered by its own vector and by the float32 one.
    """
    import gc

    from fv_plugin.models import load_model
    from fv_plugin.prompt_sets import eval_prompts
    from fv_plugin.scoring import zero_shot_scores
    from fv_plugin.tasks import load_task
    from fv_plugin.vector import FunctionVector

    task = load_task(task_name)
    settings = ExtractionConfig(n_mean=n_mean, n_shots=n_shots, seed=seed)
    icl_test = eval_prompts(task, EvalConfig(mode="icl", n_shots=n_shots, seed=seed))
    zero_test = eval_prompts(task, EvalConfig(mode="zero_shot", seed=seed))
    vectors: dict[str, dict[int, torch.Tensor]] = {}
    lines = []
    for name in ("fp32", config):
        model, tok = load_model(model_name, quantization=None if name == "fp32" else name)  # type: ignore[arg-type]
        layers = list(range(resolve_architecture(model).num_layers))
        vectors[name] = task_state_vectors(model, tok, task, layers, config=settings)
        lines.append(f"{name}: {n_shots}-shot ICL test accuracy {zero_shot_scores(model, tok, icl_test)[0]:.2f}")
        if name == config:
            for source in ("fp32", config):
                fv = FunctionVector(vector=vectors[source][layer], layer=layer)
                score = zero_shot_scores(model, tok, zero_test, [fv])[0]
                lines.append(f"{config} model steered at layer {layer} by the {source} vector: {score:.2f}")
        del model
        gc.collect()
    cosines = [
        float(torch.nn.functional.cosine_similarity(vectors["fp32"][at], vectors[config][at], dim=0))
        for at in sorted(vectors["fp32"])
    ]
    lines.append("per-layer cosine with fp32: " + " ".join(f"{at}:{c:.3f}" for at, c in enumerate(cosines)))
    return "\n".join(lines)


def quant_table(rows: Sequence[QuantRow]) -> str:
    """A Markdown table of :class:`QuantRow` values."""
    lines = [
        "| task | quantization | layer | cosine with fp32 | zero-shot | steered | Δ vs fp32 | weights | RSS after load "
        "| peak RSS | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r.task: r.steered for r in rows if r.config == "fp32"}
    for r in rows:
        delta = f"{100 * (r.steered - base[r.task]):+.0f} pts" if r.task in base else "-"
        lines.append(
            f"| {r.task} | {r.config} | {r.layer} | {r.cosine:.4f} | {r.zero_shot:.2f} | {r.steered:.2f} | {delta} "
            f"| {r.weights_mib:.0f} MiB | {r.model_mib:.0f} MiB | {r.peak_mib:.0f} MiB | {r.seconds:.0f} s |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from fv_plugin.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="fv bench quant", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument("--tasks", default="antonym", help="comma-separated built-in tasks")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {CONFIGS}")
    parser.add_argument("--seed", type=int, default=0, help="seed of every prompt sample")
    parser.add_argument("--n-mean", type=int, default=100, help="ICL (and zero-shot) prompts per mean")
    parser.add_argument("--n-shots", type=int, default=10, help="demonstrations per ICL prompt")
    parser.add_argument("--diagnose", choices=CONFIGS[1:], help="per-layer cosine and ICL accuracy for one setting")
    parser.add_argument("--layer", type=int, default=None, help="with --diagnose: the layer to steer")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--task", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vector-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        result = measure_config(
            args.model,
            args.child,
            args.task,
            layer=args.layer,
            vector_out=args.vector_out,
            seed=args.seed,
            n_mean=args.n_mean,
            n_shots=args.n_shots,
        )
        print(json.dumps(result))
        return 0
    if args.diagnose is not None:
        if args.layer is None:
            parser.error("--diagnose needs --layer (the float32 vector's layer from a plain run)")
        for task in args.tasks.split(","):
            print(f"{task}:")
            print(
                diagnose(args.model, args.diagnose, task.strip(), layer=args.layer, n_mean=args.n_mean, seed=args.seed)
            )
        return 0
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {CONFIGS}")
    rows: list[QuantRow] = []
    print(f"model: {args.model}; default-method vector; first-token accuracy on the test split", flush=True)
    for task in args.tasks.split(","):
        rows += run_task(args.model, task.strip(), configs, seed=args.seed, n_mean=args.n_mean, n_shots=args.n_shots)
    print(quant_table(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
