"""``fv bench extract``: one extraction timed against the forwards it cannot avoid, and the fast AIE against the
naive one (with attribution patching's agreement with the exact AIE)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import torch

from fv_plugin.attribution import attribution_patching, rank_agreement
from fv_plugin.benchmarks.memory import peak_rss_mib, rss_mib
from fv_plugin.config import ExtractionConfig
from fv_plugin.extraction import extract_function_vector
from fv_plugin.mediation import (
    average_indirect_effect,
    average_indirect_effect_naive,
    mean_head_activations,
)
from fv_plugin.models import DEFAULT_MODEL, load_model
from fv_plugin.prompt_sets import statistics_prompts
from fv_plugin.prompts import encode_prompts
from fv_plugin.tasks import load_task

__all__ = ["ExtractionTiming", "add_arguments", "measure_extraction", "run"]


@dataclass(frozen=True)
class ExtractionTiming:
    """Seconds and memory of one extraction, against the work it cannot avoid and the naive AIE."""

    plain_forwards: float  # plain forwards of the same 10-shot prompts (clean + shuffled)
    extraction: float  # method="heads": mean activations + AIE + vector + layer sweep
    fast_aie_per_prompt: float
    naive_aie_per_prompt: float
    aie_max_abs_diff: float
    model_mib: float
    rss_before_mib: float
    rss_peak_mib: float
    attribution_seconds: float  # attribution patching over the shuffled prompts
    exact_seconds: float  # exact fast AIE over the same prompts
    spearman: float  # rank correlation of attribution-patching AIE with the exact AIE
    top10_overlap: float

    def report(self) -> str:
        return (
            f"plain forwards           {self.plain_forwards:7.1f} s\n"
            f"full extraction          {self.extraction:7.1f} s   ratio {self.extraction / self.plain_forwards:.2f}\n"
            f"AIE per prompt: fast {self.fast_aie_per_prompt:.2f} s, naive {self.naive_aie_per_prompt:.1f} s, "
            f"speed-up {self.naive_aie_per_prompt / self.fast_aie_per_prompt:.0f}x, "
            f"max |fast - naive| = {self.aie_max_abs_diff:.2e}\n"
            f"memory: model {self.model_mib:.0f} MiB, RSS before {self.rss_before_mib:.0f} MiB, peak "
            f"{self.rss_peak_mib:.0f} MiB (peak - model = {self.rss_peak_mib - self.model_mib:.0f} MiB)\n"
            f"attribution patching (approximate) {self.attribution_seconds:.1f} s vs exact "
            f"{self.exact_seconds:.1f} s: Spearman {self.spearman:.2f} with the exact AIE, top-10 overlap "
            f"{self.top10_overlap:.0%}"
        )


def _plain_forwards(model: torch.nn.Module, tokenizer: Any, prompts: list[Any]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), 16):
            enc = encode_prompts(tokenizer, prompts[i : i + 16])
            model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    return time.perf_counter() - start


def _timed(run: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = run()
    return value, time.perf_counter() - start


def measure_extraction(
    model: torch.nn.Module, tokenizer: Any, task_name: str = "antonym", *, naive_prompts: int = 1
) -> ExtractionTiming:
    """Time one extraction with the library's defaults, plain forwards of the same prompts, fast vs naive AIE."""
    task = load_task(task_name)
    config = ExtractionConfig(method="heads")
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rss_before = rss_mib()
    clean, shuffled = statistics_prompts(task, config)
    plain = _plain_forwards(model, tokenizer, clean + shuffled)
    _, extraction = _timed(lambda: extract_function_vector(model, tokenizer, task, config))
    peak = peak_rss_mib()
    means = mean_head_activations(model, tokenizer, clean[:16])
    some = shuffled[:naive_prompts]
    fast, fast_s = _timed(lambda: average_indirect_effect(model, tokenizer, some, means))
    naive, naive_s = _timed(lambda: average_indirect_effect_naive(model, tokenizer, some, means))
    full_means = mean_head_activations(model, tokenizer, clean)
    exact, exact_s = _timed(lambda: average_indirect_effect(model, tokenizer, shuffled, full_means))
    approx, approx_s = _timed(lambda: attribution_patching(model, tokenizer, shuffled, full_means))
    spearman, overlap = rank_agreement(approx.aie, exact.aie, k=min(10, exact.aie.numel()))
    return ExtractionTiming(
        plain_forwards=plain,
        extraction=extraction,
        fast_aie_per_prompt=fast_s / naive_prompts,
        naive_aie_per_prompt=naive_s / naive_prompts,
        aie_max_abs_diff=float((fast.effects - naive.effects).abs().max()),
        model_mib=model_mib,
        rss_before_mib=rss_before,
        rss_peak_mib=peak,
        attribution_seconds=approx_s,
        exact_seconds=exact_s,
        spearman=spearman,
        top10_overlap=overlap,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument("--task", default="antonym", help="built-in task")
    parser.add_argument("--naive-prompts", type=int, default=1, help="prompts for the (slow) naive AIE")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def run(args: argparse.Namespace) -> ExtractionTiming:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    timing = measure_extraction(model, tokenizer, args.task, naive_prompts=args.naive_prompts)
    print(f"model: {args.model}, task: {args.task}, torch threads: {torch.get_num_threads()}")
    print(timing.report())
    return timing
