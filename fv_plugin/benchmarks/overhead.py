"""``fv bench overhead``: what steering costs during generation.

Greedy generation on one model three ways, interleaved so drift hits all equally: plain (no fv_plugin hooks),
attached but idle, and steered by one vector at the last prompt token and every generated token. At batch 1
and at batch 8 (left-padded prompts of different lengths).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fv_plugin.architectures import resolve_architecture
from fv_plugin.condition import Condition
from fv_plugin.devices import input_device
from fv_plugin.hooks import attach, detach
from fv_plugin.models import DEFAULT_MODEL, load_model
from fv_plugin.steering import steer
from fv_plugin.vector import FunctionVector

__all__ = ["PROMPTS", "OverheadResult", "add_arguments", "measure_overhead", "run"]

PROMPTS = (
    "Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: fast\nA:",
    "Q: up\nA:",
    "Q: France\nA: Paris\n\nQ: Japan\nA:",
    "The word 'happy' means",
    "Q: run\nA: ran\n\nQ: eat\nA: ate\n\nQ: go\nA: went\n\nQ: see\nA:",
    "Q: mouse\nA:",
    "Translate to French: cat ->",
    "Q: apple\nA: APPLE\n\nQ: pear\nA:",
)


@dataclass(frozen=True)
class OverheadResult:
    """Median tokens per second of each variant, and their ratios to plain."""

    batch: int
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
            f"batch {self.batch}: greedy generation, {self.tokens} new tokens per row, median of {self.repeats} "
            f"interleaved repeats\n"
            f"  plain    {self.plain:8.2f} tok/s\n"
            f"  idle     {self.idle:8.2f} tok/s   idle/plain    = {self.idle_ratio:.4f}\n"
            f"  steered  {self.steered:8.2f} tok/s   steered/plain = {self.steered_ratio:.4f}"
        )


def _inputs(model: torch.nn.Module, tokenizer: Any, batch: int) -> dict[str, torch.Tensor]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return {key: value.to(input_device(model)) for key, value in enc.items()}


def measure_overhead(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    tokens: int = 32,
    repeats: int = 7,
    layer: int | None = None,
    batch: int = 1,
    gate: bool = False,
) -> OverheadResult:
    """Time plain, attached-idle and steered greedy generation of ``tokens`` tokens per row, interleaved.

    ``gate``: steer with ``gate=True`` through a condition one layer below the vector that every prompt passes
    (the decision is computed and applied; the tokens are those of ungated steering)."""
    if tokens < 1 or repeats < 1 or batch < 1:
        raise ValueError(f"tokens, repeats and batch must be >= 1, got {tokens}, {repeats} and {batch}")
    resolved = resolve_architecture(model)
    chosen = resolved.num_layers // 3 if layer is None else layer
    gen = torch.Generator().manual_seed(0)
    fv = FunctionVector(vector=torch.randn(resolved.hidden_size, generator=gen), layer=chosen)
    if gate:
        direction = torch.randn(resolved.hidden_size, generator=gen)
        always = Condition(layer=max(chosen - 1, 0), direction=direction / direction.norm(), threshold=-2.0)
        fv = dataclasses.replace(fv, condition=always)
    enc = _inputs(model, tokenizer, batch)
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def timed(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        return batch * tokens / (time.perf_counter() - start)

    def plain() -> object:
        return model.generate(**enc, **kwargs)  # type: ignore[operator]

    def steered() -> object:
        with steer(model, fv, strength=1.0, gate=gate):
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
    return OverheadResult(batch, tokens, repeats, med["plain"], med["idle"], med["steered"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (median is reported)")
    parser.add_argument("--layer", type=int, default=None, help="layer to steer (default: depth // 3)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 and 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--gate", action="store_true", help="steer with gate=True (a condition every prompt passes)")


def run(args: argparse.Namespace) -> Sequence[OverheadResult]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    print(f"model: {args.model} ({type(model).__name__}), torch threads: {torch.get_num_threads()}")
    results = []
    for batch in args.batch:
        result = measure_overhead(
            model,
            tokenizer,
            tokens=args.tokens,
            repeats=args.repeats,
            layer=args.layer,
            batch=batch,
            gate=bool(getattr(args, "gate", False)),
        )
        print(result.report(), flush=True)
        results.append(result)
    return results
