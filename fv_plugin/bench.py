"""Benchmarks, run as commands: ``python -m fv_plugin.bench overhead|extract`` (or ``fv bench ...``).

``overhead`` times greedy generation on one model three ways, interleaved so drift hits all equally: plain
(no fv_plugin hooks), attached but idle, and steered by one vector at every generated token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fv_plugin.devices import input_device
from fv_plugin.hooks import attach, detach
from fv_plugin.models import DEFAULT_MODEL, load_model
from fv_plugin.steering import steer
from fv_plugin.vector import FunctionVector

__all__ = [
    "ExtractionTiming",
    "OverheadResult",
    "QualityRow",
    "main",
    "measure_extraction",
    "measure_overhead",
    "measure_quality",
    "quality_table",
]

PROMPT = "Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: fast\nA:"


@dataclass(frozen=True)
class OverheadResult:
    """Median tokens per second of each variant, and their ratios to plain."""

    tokens: int
    repeats: int
    plain: float
    idle: float
    steered: float

    @property
    def idle_ratio(self) -> float:
        return self.idle / self.plain

    @property
    def steered_ratio(self) -> float:
        return self.steered / self.plain

    def report(self) -> str:
        return (
            f"greedy generation, {self.tokens} new tokens, median of {self.repeats} interleaved repeats\n"
            f"  plain    {self.plain:8.2f} tok/s\n"
            f"  idle     {self.idle:8.2f} tok/s   idle/plain    = {self.idle_ratio:.4f}  (target >= 0.995)\n"
            f"  steered  {self.steered:8.2f} tok/s   steered/plain = {self.steered_ratio:.4f}  (target >= 0.98)"
        )


def measure_overhead(
    model: torch.nn.Module, tokenizer: object, *, tokens: int = 32, repeats: int = 7, layer: int | None = None
) -> OverheadResult:
    """Time plain, attached-idle and steered greedy generation of ``tokens`` tokens, interleaved."""
    if tokens < 1 or repeats < 1:
        raise ValueError(f"tokens and repeats must be >= 1, got {tokens} and {repeats}")
    config: Any = getattr(model, "config")  # noqa: B009
    n_layers = int(config.get_text_config().num_hidden_layers)
    hidden = int(config.get_text_config().hidden_size)
    chosen = n_layers // 3 if layer is None else layer
    gen = torch.Generator().manual_seed(0)
    fv = FunctionVector(vector=torch.randn(hidden, generator=gen), layer=chosen)
    enc = tokenizer(PROMPT, return_tensors="pt").to(input_device(model))  # type: ignore[operator]
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # type: ignore[attr-defined]

    def timed(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        return tokens / (time.perf_counter() - start)

    def plain() -> object:
        return model.generate(**enc, **kwargs)  # type: ignore[operator]

    def steered() -> object:
        with steer(model, fv, strength=1.0):
            return model.generate(**enc, **kwargs)  # type: ignore[operator]

    speeds: dict[str, list[float]] = {"plain": [], "idle": [], "steered": []}
    with torch.inference_mode():
        detach(model)
        timed(plain)  # warm-up
        for _ in range(repeats):
            detach(model)
            speeds["plain"].append(timed(plain))
            attach(model)
            speeds["idle"].append(timed(plain))
            speeds["steered"].append(timed(steered))
    detach(model)
    med = {name: statistics.median(values) for name, values in speeds.items()}
    return OverheadResult(tokens=tokens, repeats=repeats, plain=med["plain"], idle=med["idle"], steered=med["steered"])


@dataclass(frozen=True)
class ExtractionTiming:
    """Seconds and memory of one extraction, against the work it cannot avoid and the naive AIE."""

    plain_forwards: float  # 125 plain forwards of the same 10-shot prompts (100 clean + 25 shuffled)
    extraction: float  # method="heads": mean activations + AIE + vector + layer sweep
    fast_aie_per_prompt: float
    naive_aie_per_prompt: float
    aie_max_abs_diff: float
    model_mib: float
    rss_before_mib: float
    rss_peak_mib: float
    attribution_seconds: float  # attribution patching over the 25 shuffled prompts
    exact_seconds: float  # exact fast AIE over the same prompts
    spearman: float  # rank correlation of attribution-patching AIE with the exact AIE
    top10_overlap: float

    def report(self) -> str:
        return (
            f"125 plain forwards       {self.plain_forwards:7.1f} s\n"
            f"full extraction          {self.extraction:7.1f} s   ratio {self.extraction / self.plain_forwards:.2f}"
            " (target <= 3, and < 60 s)\n"
            f"AIE per prompt: fast {self.fast_aie_per_prompt:.2f} s, naive {self.naive_aie_per_prompt:.1f} s, "
            f"speed-up {self.naive_aie_per_prompt / self.fast_aie_per_prompt:.0f}x (target >= 50), "
            f"max |fast - naive| = {self.aie_max_abs_diff:.2e}\n"
            f"memory: model {self.model_mib:.0f} MiB, RSS before {self.rss_before_mib:.0f} MiB, peak "
            f"{self.rss_peak_mib:.0f} MiB (peak - model = {self.rss_peak_mib - self.model_mib:.0f} MiB)\n"
            f"attribution patching (approximate, 25 prompts) {self.attribution_seconds:.1f} s vs exact "
            f"{self.exact_seconds:.1f} s: Spearman {self.spearman:.2f} with the exact AIE, top-10 overlap "
            f"{self.top10_overlap:.0%}"
        )


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_extraction(
    model: torch.nn.Module, tokenizer: Any, task_name: str = "antonym", *, naive_prompts: int = 1
) -> ExtractionTiming:
    """Time one default extraction, 125 plain forwards of the same prompts, and the fast vs naive AIE."""
    from fv_plugin.extraction import extract_function_vector
    from fv_plugin.mediation import (
        attribution_patching,
        average_indirect_effect,
        average_indirect_effect_naive,
        mean_head_activations,
        rank_agreement,
    )
    from fv_plugin.prompts import encode_prompts, make_prompts
    from fv_plugin.tasks import load_task

    task = load_task(task_name)
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rss_before = _rss_mib()
    clean = make_prompts(task, n=100, n_shots=10, split="train", seed=0)
    shuffled = make_prompts(task, n=25, n_shots=10, split="train", shuffle_labels=True, seed=1)
    start = time.perf_counter()
    with torch.no_grad():
        everything = clean + shuffled
        for i in range(0, len(everything), 16):
            enc = encode_prompts(tokenizer, everything[i : i + 16])
            model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    plain = time.perf_counter() - start
    start = time.perf_counter()
    extract_function_vector(model, tokenizer, task, method="heads")  # the paper's pipeline, AIE included
    extraction = time.perf_counter() - start
    peak = _peak_rss_mib()
    means = mean_head_activations(model, tokenizer, clean[:16])
    start = time.perf_counter()
    fast = average_indirect_effect(model, tokenizer, shuffled[:naive_prompts], means)
    fast_s = (time.perf_counter() - start) / naive_prompts
    start = time.perf_counter()
    naive = average_indirect_effect_naive(model, tokenizer, shuffled[:naive_prompts], means)
    naive_s = (time.perf_counter() - start) / naive_prompts
    full_means = mean_head_activations(model, tokenizer, clean)
    start = time.perf_counter()
    exact = average_indirect_effect(model, tokenizer, shuffled, full_means)
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    approx = attribution_patching(model, tokenizer, shuffled, full_means)
    approx_s = time.perf_counter() - start
    spearman, overlap = rank_agreement(approx.aie, exact.aie, k=min(10, exact.aie.numel()))
    return ExtractionTiming(
        plain_forwards=plain,
        extraction=extraction,
        fast_aie_per_prompt=fast_s,
        naive_aie_per_prompt=naive_s,
        aie_max_abs_diff=float((fast.effects - naive.effects).abs().max()),
        model_mib=model_mib,
        rss_before_mib=rss_before,
        rss_peak_mib=peak,
        attribution_seconds=approx_s,
        exact_seconds=exact_s,
        spearman=spearman,
        top10_overlap=overlap,
    )


QUALITY_COLUMNS = (
    "zero-shot",
    "ICL",
    "shuffled ICL",
    "shuffled + FV",
    "heads",
    "head_patch",
    "head_patch k=40",
    "difference",
    "layer_mean",
)


@dataclass(frozen=True)
class QualityRow:
    """Test first-token accuracies of one task; ``layers`` gives each form's layer."""

    task: str
    n_test: int
    scores: dict[str, float]
    layers: dict[str, int]
    seconds: float


def measure_quality(
    model: torch.nn.Module, tokenizer: Any, task_name: str, *, n_shots: int = 10, seed: int = 0, k: int = 10
) -> QualityRow:
    """Zero-shot, ICL, shuffled-label ICL, and zero-shot with each form of vector, on the task's test split."""
    from fv_plugin.extraction import extract_function_vector, zero_shot_scores
    from fv_plugin.mediation import average_indirect_effect, mean_head_activations
    from fv_plugin.prompts import make_prompts
    from fv_plugin.tasks import load_task

    start = time.perf_counter()
    task = load_task(task_name)
    zero = make_prompts(task, n_shots=0, split="test", seed=seed)
    icl = make_prompts(task, n_shots=n_shots, split="test", seed=seed)
    shuffled_test = make_prompts(task, n_shots=n_shots, split="test", shuffle_labels=True, seed=seed)
    clean = make_prompts(task, n=100, n_shots=n_shots, split="train", seed=seed)
    means = mean_head_activations(model, tokenizer, clean)
    aie_prompts = make_prompts(task, n=25, n_shots=n_shots, split="train", shuffle_labels=True, seed=seed + 1)
    effects = average_indirect_effect(model, tokenizer, aie_prompts, means)
    forms = {
        "heads": dict(method="heads", k=k),
        "head_patch": dict(method="head_patch", k=k),
        "head_patch k=40": dict(method="head_patch", k=min(40, effects.aie.numel())),
        "difference": dict(method="difference"),
        "layer_mean": dict(method="layer_mean"),
    }
    scores = {
        "zero-shot": zero_shot_scores(model, tokenizer, zero)[0],
        "ICL": zero_shot_scores(model, tokenizer, icl)[0],
        "shuffled ICL": zero_shot_scores(model, tokenizer, shuffled_test)[0],
    }
    layers: dict[str, int] = {}
    for name, options in forms.items():
        fv = extract_function_vector(
            model,
            tokenizer,
            task,
            n_shots=n_shots,
            seed=seed,
            means=means,
            effects=effects,
            **options,  # type: ignore[arg-type]
        )
        scores[name] = zero_shot_scores(model, tokenizer, zero, [fv])[0]
        layers[name] = fv.layer
        if name == "heads":
            scores["shuffled + FV"] = zero_shot_scores(model, tokenizer, shuffled_test, [fv])[0]
    return QualityRow(task.name, len(zero), scores, layers, time.perf_counter() - start)


def quality_table(rows: Sequence[QualityRow]) -> str:
    """A Markdown table of :func:`measure_quality` rows with a mean row."""
    head = "| task | n | " + " | ".join(QUALITY_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(QUALITY_COLUMNS) + 2)]
    for row in rows:
        cells = []
        for col in QUALITY_COLUMNS:
            at = f" (L{row.layers[col]})" if col in row.layers and not col.startswith("head_patch") else ""
            cells.append(f"{row.scores[col]:.2f}{at}")
        lines.append(f"| {row.task} | {row.n_test} | " + " | ".join(cells) + " |")
    if rows:
        means = [sum(r.scores[c] for r in rows) / len(rows) for c in QUALITY_COLUMNS]
        lines.append("| **mean** | | " + " | ".join(f"**{m:.2f}**" for m in means) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    rest = list(sys.argv[1:] if argv is None else argv)
    if rest[:1] == ["quant"]:  # quantized vs float32 vectors: its own module (runs a subprocess per setting)
        from fv_plugin.bench_quant import main as quant_main

        return quant_main(rest[1:])
    parser = argparse.ArgumentParser(prog="fv bench", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="bench", required=True)
    over = sub.add_parser("overhead", help="tokens/s of plain vs attached-idle vs steered generation")
    over.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    over.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    over.add_argument("--repeats", type=int, default=7, help="interleaved repeats (median is reported)")
    over.add_argument("--layer", type=int, default=None, help="layer to steer (default: depth // 3)")
    over.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ext = sub.add_parser("extract", help="time one extraction vs 125 plain forwards, and fast vs naive AIE")
    ext.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    ext.add_argument("--task", default="antonym", help="built-in task")
    ext.add_argument("--naive-prompts", type=int, default=1, help="prompts for the (slow) naive AIE")
    ext.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    sub.add_parser("quant", help="quantized vs float32 vectors: cosine, accuracy, memory (see fv bench quant -h)")
    qual = sub.add_parser("quality", help="test accuracy of every form of vector and the baselines, per task")
    qual.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    qual.add_argument("--tasks", default="all", help="comma-separated built-in tasks (default: all)")
    qual.add_argument("--k", type=int, default=10, help="heads of the heads / head_patch forms")
    args = parser.parse_args(rest)
    if args.bench == "quality":
        from fv_plugin.tasks import builtin_tasks

        model, tokenizer = load_model(args.model)
        names = builtin_tasks() if args.tasks == "all" else args.tasks.split(",")
        rows = []
        print(f"model: {args.model}; first-token accuracy on each task's test split; (Lx) = layer", flush=True)
        for name in names:
            rows.append(measure_quality(model, tokenizer, name, k=args.k))
            print(quality_table(rows[-1:]).splitlines()[-2] + f"  <- {rows[-1].seconds:.0f} s", flush=True)
        print(quality_table(rows))
        return 0
    if args.bench == "extract":
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model, tokenizer = load_model(args.model)
        timing = measure_extraction(model, tokenizer, args.task, naive_prompts=args.naive_prompts)
        print(f"model: {args.model}, task: {args.task}, torch threads: {torch.get_num_threads()}")
        print(timing.report())
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    result = measure_overhead(model, tokenizer, tokens=args.tokens, repeats=args.repeats, layer=args.layer)
    print(f"model: {args.model} ({type(model).__name__}), torch threads: {torch.get_num_threads()}")
    print(result.report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
