"""``fv bench extract``: extractions timed stage by stage against the forwards they cannot avoid, the fast AIE
against the naive one (with attribution patching's agreement with the exact AIE), and ``--estimate``: the same
stages' work projected for another model from its config alone (:mod:`fv_plugin.benchmarks.cost`).

The forwards an extraction cannot avoid are the plain passes of its ``n_mean`` clean and ``n_aie`` shuffled
ICL prompts (100 + 25 by default), run as a Hugging Face model runs them (every position's logits). Work is
counted by hooks while each stage runs: ``tokens`` are token passes through the decoder stack (a token run
through ``m`` of ``L`` layers counts ``m / L``), ``logit rows`` the rows the unembedding computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fv_plugin.architectures import resolve_architecture
from fv_plugin.attribution import attribution_patching, rank_agreement
from fv_plugin.benchmarks.memory import peak_rss_mib, rss_mib
from fv_plugin.config import ExtractionConfig
from fv_plugin.extraction import extract_function_vector
from fv_plugin.hooks import count_forward_work
from fv_plugin.mediation import (
    average_indirect_effect,
    average_indirect_effect_naive,
    mean_head_activations,
)
from fv_plugin.models import DEFAULT_MODEL, load_model
from fv_plugin.progress import StageRecord, recording, stage
from fv_plugin.prompt_sets import statistics_prompts
from fv_plugin.prompts import encode_prompts
from fv_plugin.tasks import Task, load_task

__all__ = ["AieCheck", "ExtractionTiming", "MethodCost", "add_arguments", "measure_extraction", "run"]


@dataclass(frozen=True)
class MethodCost:
    """One extraction with ``method``: its wall-clock seconds, its stages and the vector it chose."""

    method: str
    seconds: float
    stages: tuple[StageRecord, ...]
    chosen: str
    vector: Any = None
    cpu_seconds: float = 0.0


@dataclass(frozen=True)
class AieCheck:
    """The fast AIE against the naive one, and attribution patching against the exact AIE."""

    fast_per_prompt: float
    naive_per_prompt: float
    max_abs_diff: float
    attribution_seconds: float
    exact_seconds: float
    spearman: float
    top10_overlap: float

    def report(self) -> str:
        return (
            f"AIE per prompt: fast {self.fast_per_prompt:.2f} s, naive {self.naive_per_prompt:.1f} s, "
            f"speed-up {self.naive_per_prompt / self.fast_per_prompt:.0f}x, "
            f"max |fast - naive| = {self.max_abs_diff:.2e}\n"
            f"attribution patching (approximate) {self.attribution_seconds:.1f} s vs exact "
            f"{self.exact_seconds:.1f} s: Spearman {self.spearman:.2f} with the exact AIE, top-10 overlap "
            f"{self.top10_overlap:.0%}"
        )


@dataclass(frozen=True)
class ExtractionTiming:
    """Extractions against the plain forwards of their prompts (``plain``), with memory and the AIE check."""

    plain: StageRecord
    methods: tuple[MethodCost, ...]
    model_mib: float
    rss_before_mib: float
    rss_peak_mib: float
    aie: AieCheck | None = None

    def ratio(self, method: str, *, cpu: bool = False) -> float:
        """Seconds (``cpu``: CPU seconds) of the extraction with ``method`` over those of the unavoidable forwards."""
        found = next(m for m in self.methods if m.method == method)
        if cpu:
            return found.cpu_seconds / max(self.plain.cpu_seconds, 1e-9)
        return found.seconds / self.plain.seconds

    def report(self) -> str:
        plain = self.plain
        lines = [
            f"unavoidable: plain forwards of the ICL prompts   {plain.seconds:7.1f} s   "
            f"{plain.tokens:9.0f} tokens  {plain.logit_rows:7d} logit rows",
        ]
        for m in self.methods:
            lines.append(
                f"\nmethod={m.method}: {m.seconds:.1f} s = {m.seconds / plain.seconds:.2f}x  (chose {m.chosen})"
            )
            lines.append(f"  {'stage':44s} {'seconds':>8s} {'x plain':>8s} {'tokens':>10s} {'logit rows':>10s}")
            for s in m.stages:
                ratio = s.seconds / plain.seconds
                lines.append(f"  {s.name:44s} {s.seconds:8.1f} {ratio:8.2f} {s.tokens:10.0f} {s.logit_rows:10d}")
        lines.append(
            f"\nmemory: model {self.model_mib:.0f} MiB, RSS before {self.rss_before_mib:.0f} MiB, peak "
            f"{self.rss_peak_mib:.0f} MiB (peak - model = {self.rss_peak_mib - self.model_mib:.0f} MiB)"
        )
        if self.aie is not None:
            lines.append(self.aie.report())
        return "\n".join(lines)


def _plain_forwards(model: torch.nn.Module, tokenizer: Any, prompts: list[Any], batch_size: int) -> None:
    with torch.no_grad(), stage("plain forwards", len(prompts), unit="prompt") as bar:
        for i in range(0, len(prompts), batch_size):
            enc = encode_prompts(tokenizer, prompts[i : i + batch_size])
            model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
            bar.update(len(prompts[i : i + batch_size]))


def _timed(run: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = run()
    return value, time.perf_counter() - start


def _cpu_timed(run: Any) -> tuple[Any, float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    value = run()
    return value, time.perf_counter() - start, time.process_time() - cpu


def _describe(fv: Any) -> str:
    k = f" k={fv.k}" if fv.k is not None and fv.method != "difference" else ""
    best = fv.selection.best if fv.selection is not None else None
    strength = f" s={best.strength:g}" if best is not None else ""
    return f"{fv.method}{k} L{fv.layer}{strength}"


def _aie_check(model: torch.nn.Module, tokenizer: Any, config: ExtractionConfig, task: Any, naive: int) -> AieCheck:
    clean, shuffled = statistics_prompts(task, config)
    means = mean_head_activations(model, tokenizer, clean[:16], progress=False)
    some = shuffled[:naive]
    fast, fast_s = _timed(lambda: average_indirect_effect(model, tokenizer, some, means, progress=False))
    slow, naive_s = _timed(lambda: average_indirect_effect_naive(model, tokenizer, some, means))
    full_means = mean_head_activations(model, tokenizer, clean, progress=False)
    exact, exact_s = _timed(lambda: average_indirect_effect(model, tokenizer, shuffled, full_means, progress=False))
    approx, approx_s = _timed(lambda: attribution_patching(model, tokenizer, shuffled, full_means))
    spearman, overlap = rank_agreement(approx.aie, exact.aie, k=min(10, exact.aie.numel()))
    return AieCheck(
        fast_s / naive, naive_s / naive, float((fast.effects - slow.effects).abs().max()), approx_s, exact_s,
        spearman, overlap,
    )  # fmt: skip


def measure_extraction(
    model: torch.nn.Module,
    tokenizer: Any,
    task_name: str | Task = "antonym",
    *,
    methods: Sequence[str] = ("auto", "heads"),
    config: ExtractionConfig = ExtractionConfig(),
    aie_check: bool = True,
    naive_prompts: int = 1,
) -> ExtractionTiming:
    """Time the plain forwards of the extraction's ICL prompts, then one extraction per method, stage by stage,
    counting the forward work of each stage; with ``aie_check``, the fast AIE against the naive one."""
    task = task_name if isinstance(task_name, Task) else load_task(task_name)
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rss_before = rss_mib()
    clean, shuffled = statistics_prompts(task, config)
    with count_forward_work(model, resolve_architecture(model)) as counter, recording(counter) as log:
        _plain_forwards(model, tokenizer, clean + shuffled, config.batch_size)
        costs = []
        for method in methods:
            start = len(log.stages)
            settings = dataclasses.replace(config, method=method)  # type: ignore[arg-type]
            fv, seconds, cpu = _cpu_timed(lambda: extract_function_vector(model, tokenizer, task, settings))  # noqa: B023
            costs.append(MethodCost(method, seconds, tuple(log.stages[start:]), _describe(fv), fv, cpu))
    peak = peak_rss_mib()
    check = _aie_check(model, tokenizer, config, task, naive_prompts) if aie_check else None
    return ExtractionTiming(log.stages[0], tuple(costs), model_mib, rss_before, peak, check)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument("--task", default="antonym", help="built-in task or task file")
    parser.add_argument("--methods", default="auto,heads", help="comma-separated methods to time (default auto,heads)")
    parser.add_argument("--n-mean", type=int, default=100, help="clean ICL prompts (a smaller run: fewer)")
    parser.add_argument("--n-aie", type=int, default=25, help="shuffled ICL prompts for the AIE")
    parser.add_argument("--no-aie-check", action="store_true", help="skip the fast-vs-naive AIE and attribution")
    parser.add_argument("--naive-prompts", type=int, default=1, help="prompts for the (slow) naive AIE")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--estimate", default=None, help="only print the projected work for this model's config")
    parser.add_argument("--flops", type=float, default=None, help="with --estimate: the FLOP/s to project times at")


def run(args: argparse.Namespace) -> ExtractionTiming | None:
    if args.estimate is not None:
        from fv_plugin.benchmarks.cost import print_estimate

        print_estimate(args.estimate, args, flops=args.flops)
        return None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    config = ExtractionConfig(n_mean=args.n_mean, n_aie=args.n_aie)
    timing = measure_extraction(
        model,
        tokenizer,
        args.task,
        methods=[m for m in args.methods.split(",") if m],
        config=config,
        aie_check=not args.no_aie_check,
        naive_prompts=args.naive_prompts,
    )
    print(f"model: {args.model}, task: {args.task}, torch threads: {torch.get_num_threads()}")
    print(timing.report())
    return timing
