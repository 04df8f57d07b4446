"""Benchmarks, run as commands: ``python -m fv_plugin.bench overhead`` (or ``fv bench overhead``).

``overhead`` times greedy generation on one model three ways, interleaved so drift hits all equally: plain
(no fv_plugin hooks), attached but idle, and steered by one vector at every generated token.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fv_plugin.hooks import attach, detach
from fv_plugin.models import DEFAULT_MODEL, load_model
from fv_plugin.steering import steer
from fv_plugin.vector import FunctionVector

__all__ = ["OverheadResult", "main", "measure_overhead"]

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
    enc = tokenizer(PROMPT, return_tensors="pt")  # type: ignore[operator]
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fv bench", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="bench", required=True)
    over = sub.add_parser("overhead", help="tokens/s of plain vs attached-idle vs steered generation")
    over.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    over.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    over.add_argument("--repeats", type=int, default=7, help="interleaved repeats (median is reported)")
    over.add_argument("--layer", type=int, default=None, help="layer to steer (default: depth // 3)")
    over.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    result = measure_overhead(model, tokenizer, tokens=args.tokens, repeats=args.repeats, layer=args.layer)
    print(f"model: {args.model} ({type(model).__name__}), torch threads: {torch.get_num_threads()}")
    print(result.report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
