"""``fv bench overhead``: what steering costs during generation.

Greedy generation on one model three ways: plain (no fv_plugin hooks), attached but idle, and steered by one
vector at the last prompt token and every generated token. At batch 1 and at batch 8 (left-padded prompts of
different lengths). Each repeat runs the three back to back, in an order that cycles through all six, and the
ratios to plain are taken within each repeat (paired), so a machine whose speed drifts, or a variant that
always runs after another, moves the ratios far less than it moves the speeds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fv_plugin import hooks
from fv_plugin.architectures import resolve_architecture
from fv_plugin.condition import Condition
from fv_plugin.devices import input_device
from fv_plugin.hooks import attach, detach
from fv_plugin.models import DEFAULT_MODEL, load_model
from fv_plugin.steering import steer
from fv_plugin.vector import FunctionVector

__all__ = [
    "PROMPTS",
    "VARIANTS",
    "OverheadResult",
    "OwnWork",
    "add_arguments",
    "hook_dispatch_seconds",
    "measure_overhead",
    "median_interval",
    "orders",
    "run",
]

VARIANTS = ("plain", "idle", "steered")

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


def orders(repeats: int) -> list[tuple[str, ...]]:
    """The order of the three variants in each repeat: all six orders in turn, so over every six repeats each
    variant runs first, second and third twice, and after each of the others equally often."""
    cycle = list(itertools.permutations(VARIANTS))
    return [cycle[r % len(cycle)] for r in range(repeats)]


def median_interval(values: Sequence[float], *, z: float = 1.96) -> tuple[float, float]:
    """A distribution-free ~95% interval for the median: the order statistics at ``n/2 -+ z sqrt(n)/2`` (the
    normal approximation of the binomial count of values below the median). With few values it spans them all."""
    if not values:
        raise ValueError("median_interval needs at least one value")
    ordered = sorted(values)
    n = len(ordered)
    half = z * math.sqrt(n) / 2
    low = max(math.floor(n / 2 - half), 0)
    high = min(math.ceil(n / 2 + half), n - 1)
    return ordered[low], ordered[high]


# What fv_plugin's forward hooks call (hooks.py looks them up by name at each call, so wrapping them here times
# every hook of an attachment made while the wrapping is on).
HOOK_BODIES = ("on_layer_output", "on_out_proj_input", "on_base_forward")


@dataclass
class OwnWork:
    """fv_plugin's own work in the steered generations, timed inside the same runs (so the machine's drift moves
    it and the runs' total together): the hook bodies, torch's extra dispatch of a module that has a hook (measured
    apart, per call), and ``steer()``'s entry and exit. ``share`` is its fraction of those runs' time, so
    ``1 - share`` bounds steered/plain from below for what fv_plugin runs."""

    total: float = 0.0
    hooks: float = 0.0
    calls: int = 0
    context: float = 0.0
    dispatch_per_call: float = 0.0

    @property
    def seconds(self) -> float:
        return self.hooks + self.context + self.calls * self.dispatch_per_call

    @property
    def share(self) -> float:
        return self.seconds / self.total if self.total > 0 else 0.0

    def report(self) -> str:
        return (
            f"  own work {100 * self.share:7.3f}% of the steered runs' {self.total:.2f} s: hook bodies "
            f"{self.hooks:.3f} s in {self.calls} calls, torch's hook dispatch {1e6 * self.dispatch_per_call:.2f} us "
            f"a call, steer() entry and exit {self.context:.4f} s -> steered/plain >= {1 - self.share:.4f}"
        )


@contextlib.contextmanager
def _timed_hook_bodies(own: OwnWork) -> Iterator[None]:
    originals = {name: getattr(hooks, name) for name in HOOK_BODIES}

    def timing(body: Callable[..., object]) -> Callable[..., object]:
        def timed_body(*args: object) -> object:
            start = time.perf_counter()
            try:
                return body(*args)
            finally:
                own.hooks += time.perf_counter() - start
                own.calls += 1

        return timed_body

    try:
        for name, body in originals.items():
            setattr(hooks, name, timing(body))
        yield
    finally:
        for name, body in originals.items():
            setattr(hooks, name, body)


def hook_dispatch_seconds(calls: int = 20000, repeats: int = 5) -> float:
    """What torch adds to a module call when the module has a forward hook (a no-op one), per call: the least over
    ``repeats`` interleaved timings of ``calls`` calls with and without it."""
    module = torch.nn.Identity()
    x = torch.zeros(1)

    def per_call() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            module(x)
        return (time.perf_counter() - start) / calls

    bare, hooked = [], []
    for _ in range(repeats):
        bare.append(per_call())
        handle = module.register_forward_hook(lambda *args: None)
        try:
            hooked.append(per_call())
        finally:
            handle.remove()
    return max(min(hooked) - min(bare), 0.0)


@dataclass(frozen=True)
class OverheadResult:
    """Tokens per second of each variant in every repeat; medians, and the paired ratios to plain."""

    batch: int
    tokens: int
    speeds: dict[str, tuple[float, ...]]
    own: OwnWork = field(default_factory=OwnWork)

    @property
    def repeats(self) -> int:
        return len(self.speeds["plain"])

    @property
    def plain(self) -> float:
        return statistics.median(self.speeds["plain"])

    @property
    def idle(self) -> float:
        return statistics.median(self.speeds["idle"])

    @property
    def steered(self) -> float:
        return statistics.median(self.speeds["steered"])

    def ratios(self, variant: str) -> list[float]:
        """``variant``'s speed over plain's, within each repeat."""
        return [v / p for v, p in zip(self.speeds[variant], self.speeds["plain"], strict=True)]

    def median_ratio(self, variant: str) -> float:
        return statistics.median(self.ratios(variant))

    @property
    def idle_ratio(self) -> float:
        return self.median_ratio("idle")

    @property
    def steered_ratio(self) -> float:
        return self.median_ratio("steered")

    def as_json(self) -> dict[str, Any]:
        """Every repeat's speeds, the medians and paired ratios, and the own work, for ``--out``."""
        return {
            "batch": self.batch,
            "tokens": self.tokens,
            "speeds": {name: list(values) for name, values in self.speeds.items()},
            "median_tok_s": {"plain": self.plain, "idle": self.idle, "steered": self.steered},
            "paired_ratio": {"idle": self.idle_ratio, "steered": self.steered_ratio},
            "own_work": {**dataclasses.asdict(self.own), "share": self.own.share},
        }

    def report(self) -> str:
        def line(variant: str) -> str:
            low, high = median_interval(self.ratios(variant))
            label = f"{variant}/plain"
            return f"   {label:13} = {self.median_ratio(variant):.4f} (95% interval of the median {low:.4f}-{high:.4f})"

        return (
            f"batch {self.batch}: greedy generation, {self.tokens} new tokens per row, {self.repeats} repeats "
            f"(order rotated), medians; ratios paired within each repeat\n"
            f"  plain    {self.plain:8.2f} tok/s\n"
            f"  idle     {self.idle:8.2f} tok/s{line('idle')}\n"
            f"  steered  {self.steered:8.2f} tok/s{line('steered')}\n"
            f"{self.own.report()}"
        )


def _inputs(model: torch.nn.Module, tokenizer: Any, batch: int) -> dict[str, torch.Tensor]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return {key: value.to(input_device(model)) for key, value in enc.items()}


def _random_vector(model: torch.nn.Module, layer: int | None, gate: bool) -> FunctionVector:
    """A seeded random vector after ``layer`` (default: depth // 3); with ``gate``, a condition one layer below it
    that every prompt passes."""
    resolved = resolve_architecture(model)
    chosen = resolved.num_layers // 3 if layer is None else layer
    gen = torch.Generator().manual_seed(0)
    fv = FunctionVector(vector=torch.randn(resolved.hidden_size, generator=gen), layer=chosen)
    if not gate:
        return fv
    direction = torch.randn(resolved.hidden_size, generator=gen)
    always = Condition(layer=max(chosen - 1, 0), direction=direction / direction.norm(), threshold=-2.0)
    return dataclasses.replace(fv, condition=always)


def measure_overhead(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    tokens: int = 32,
    repeats: int = 12,
    layer: int | None = None,
    batch: int = 1,
    gate: bool = False,
) -> OverheadResult:
    """Time plain, attached-idle and steered greedy generation of ``tokens`` tokens per row, ``repeats`` times
    each, the three back to back in every repeat in the order :func:`orders` gives.

    ``gate``: steer with ``gate=True`` through a condition one layer below the vector that every prompt passes
    (the decision is computed and applied; the tokens are those of ungated steering)."""
    if tokens < 1 or repeats < 1 or batch < 1:
        raise ValueError(f"tokens, repeats and batch must be >= 1, got {tokens}, {repeats} and {batch}")
    fv = _random_vector(model, layer, gate)
    enc = _inputs(model, tokenizer, batch)
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def timed(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        return batch * tokens / (time.perf_counter() - start)

    def plain() -> object:
        return model.generate(**enc, **kwargs)  # type: ignore[operator]

    own = OwnWork(dispatch_per_call=hook_dispatch_seconds())

    def steered() -> object:
        start = time.perf_counter()
        with _timed_hook_bodies(own), steer(model, fv, strength=1.0, gate=gate):
            entered = time.perf_counter()
            out = model.generate(**enc, **kwargs)  # type: ignore[operator]
            generated = time.perf_counter()
        own.context += (entered - start) + (time.perf_counter() - generated)
        own.total += time.perf_counter() - start
        return out

    def run_variant(variant: str) -> float:
        # plain runs with no fv_plugin hooks; idle and steered on an attached model (steer attaches on its own)
        if variant == "plain":
            detach(model)
        else:
            attach(model)
        return timed(steered if variant == "steered" else plain)

    speeds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        with torch.inference_mode():
            detach(model)
            timed(plain)  # warm-up
            for order in orders(repeats):
                for variant in order:
                    speeds[variant].append(run_variant(variant))
    finally:
        detach(model)
    return OverheadResult(batch, tokens, {name: tuple(values) for name, values in speeds.items()}, own)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=12, help="repeats, order rotated (6 or a multiple balances it)")
    parser.add_argument("--layer", type=int, default=None, help="layer to steer (default: depth // 3)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 and 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--gate", action="store_true", help="steer with gate=True (a condition every prompt passes)")
    parser.add_argument("--out", default=None, help="also write every repeat's figures as JSON here")


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
    if getattr(args, "out", None):
        gate = bool(getattr(args, "gate", False))
        data = {"model": args.model, "gate": gate, "results": [r.as_json() for r in results]}
        Path(args.out).write_text(json.dumps(data, indent=1), encoding="utf-8")
    return results
