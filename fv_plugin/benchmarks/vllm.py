"""``fv bench vllm``: throughput of steered against plain requests on one vLLM engine.

Each round sends the same concurrent requests twice, once plain and once each with its own vector (a mix of forms:
residual-stream vectors, ``head_difference`` and ``head_patch`` vectors of 10 heads, in turn; ``--gated`` of them,
half by default, with ``gate=True`` and a random condition one layer below the vector that about half the prompts
pass), alternating which goes first so that drift (other jobs, thermal state) hits both equally. Every request
generates exactly ``--tokens`` tokens (``ignore_eos``), so both batches do the same work. Reported per mode (eager,
compiled): median tokens/s of each and the median of the per-round ratios steered / plain (the goal is >= 0.95).

``--plugin-off`` adds, per mode, an engine started with ``FV_PLUGIN_VLLM=0`` (the model untouched): the plain
requests there measure what the installed plugin costs plain batches (separate engines: noisier than the ratio).

Each engine runs in a child process of its own. Needs the vLLM extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fv_plugin.models import DEFAULT_MODEL, EMBEDDED_MODELS
from fv_plugin.vector import FunctionVector

__all__ = ["ModeResult", "main", "measure", "run_mode"]

MODES = ("eager", "compiled")
FORMS = ("residual", "head_difference", "head_patch")
PROMPT = "Q: {word}\nA:"
WORDS = ("hot", "big", "fast", "old", "up", "wet", "dark", "loud", "rich", "soft", "tall", "early", "open", "full")


@dataclass(frozen=True)
class ModeResult:
    """Throughput of one engine mode (medians over rounds)."""

    mode: str
    requests: int
    tokens: int
    rounds: int
    plain: float  # tokens/s
    steered: float  # tokens/s
    ratio: float  # median of the per-round ratios steered / plain
    ratios: tuple[float, ...] = ()  # every round's ratio
    plain_plugin_off: float | None = None  # tokens/s of the plain requests on an engine with FV_PLUGIN_VLLM=0

    def line(self) -> str:
        text = (
            f"{self.mode:9s} {self.requests} requests x {self.tokens} tokens, {self.rounds} rounds: plain "
            f"{self.plain:7.1f} tok/s, steered {self.steered:7.1f} tok/s, ratio {self.ratio:.3f} "
            f"(rounds {min(self.ratios):.3f}-{max(self.ratios):.3f})"
        )
        if self.plain_plugin_off is not None:
            text += f"; plain with the plugin off {self.plain_plugin_off:7.1f} tok/s"
        return text


def _checkpoint(model: str) -> str:
    if model in EMBEDDED_MODELS:
        from fv_plugin.models import embedded_checkpoint

        return str(embedded_checkpoint(model))
    return model


def _vectors(count: int, hidden: int, layer: int, norm: float) -> list[FunctionVector]:
    generator = torch.Generator().manual_seed(0)
    vectors = []
    for _ in range(count):
        direction = torch.randn(hidden, generator=generator)
        vectors.append(FunctionVector(vector=direction / direction.norm() * norm, layer=layer))
    return vectors


def _head_vectors(count: int, config: Any, layer: int, mode: str, seed: int) -> list[FunctionVector]:
    """``count`` random head-level vectors of 10 heads each, at ``layer`` and the two layers after it."""
    text = config.hf_text_config
    heads, head_dim = int(text.num_attention_heads), int(config.get_head_size())
    last = int(text.num_hidden_layers) - 1
    generator = torch.Generator().manual_seed(seed)
    vectors = []
    for _ in range(count):
        picks = torch.randperm(3 * heads, generator=generator)[:10].tolist()
        chosen = tuple(sorted((min(layer + p // heads, last), p % heads) for p in picks))
        chosen = tuple(dict.fromkeys(chosen))
        values = torch.nn.functional.normalize(torch.randn(len(chosen), head_dim, generator=generator), dim=-1)
        vectors.append(
            FunctionVector(
                vector=torch.zeros(int(config.get_hidden_size())),
                layer=chosen[0][0],
                heads=chosen,
                head_values=4.0 * values,
                head_mode="add" if mode == "head_difference" else "replace",
                method=mode,
            )
        )
    return vectors


def _with_conditions(vectors: list[FunctionVector], share: float, seed: int = 7) -> list[tuple[FunctionVector, bool]]:
    """Each vector, and whether its request is gated: ``share`` of them, spread evenly, get a random condition one
    layer below the vector with threshold 0 (about half the prompts pass it)."""
    from fv_plugin.condition import Condition

    generator = torch.Generator().manual_seed(seed)
    out = []
    for i, fv in enumerate(vectors):
        if int((i + 1) * share) == int(i * share) or fv.first_layer == 0:
            out.append((fv, False))
            continue
        direction = torch.randn(fv.size, generator=generator)
        out.append((dataclasses.replace(fv, condition=Condition(fv.first_layer - 1, direction, 0.0)), True))
    return out


def _timed(llm: Any, prompts: list[str], params: list[Any]) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(out.outputs[0].token_ids) for out in outputs) / seconds


def _batches(args: argparse.Namespace, llm: Any) -> tuple[list[str], dict[str, list[Any]]]:
    """The prompts, and their sampling parameters plain and steered (each request its own vector)."""
    from vllm import SamplingParams

    from fv_plugin.vllm import steering

    config = llm.llm_engine.model_config
    layer = args.layer if args.layer is not None else int(config.hf_text_config.num_hidden_layers) // 3
    prompts = [PROMPT.format(word=WORDS[i % len(WORDS)]) + " " * (i // len(WORDS)) for i in range(args.requests)]
    forms = [form.strip() for form in args.forms.split(",") if form.strip()]
    unknown = sorted(set(forms) - set(FORMS))
    if unknown or not forms:
        raise ValueError(f"--forms {args.forms!r}: choose among {FORMS}")
    counts = [sum(i % len(forms) == f for i in range(args.requests)) for f in range(len(forms))]
    made = {
        form: _vectors(count, int(config.get_hidden_size()), layer, args.norm)
        if form == "residual"
        else _head_vectors(count, config, layer, form, seed=f)
        for f, (form, count) in enumerate(zip(forms, counts, strict=True))
    }
    vectors = _with_conditions([made[forms[i % len(forms)]][i // len(forms)] for i in range(args.requests)], args.gated)
    plain = [SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True) for _ in prompts]
    steered = [
        SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True, extra_args=steering(fv, gate=gate))
        for fv, gate in vectors
    ]
    return prompts, {"plain": plain, "steered": steered}


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """One engine in this process: a warm-up, then ``args.rounds`` rounds, alternating which kind goes first.

    Returns tokens/s per round of each kind (only ``"plain"`` when steering is off in this engine).
    """
    from vllm import LLM

    from fv_plugin.vllm.settings import PluginSettings

    llm = LLM(
        model=_checkpoint(args.model),
        dtype=args.dtype,
        enforce_eager=args.mode == "eager",
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        seed=0,
    )
    prompts, params = _batches(args, llm)
    kinds = ["plain", "steered"] if PluginSettings.from_env().enabled else ["plain"]
    for kind in kinds:
        _timed(llm, prompts, params[kind])
    speeds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_index in range(args.rounds):
        for kind in kinds if round_index % 2 == 0 else kinds[::-1]:
            speeds[kind].append(_timed(llm, prompts, params[kind]))
    return speeds


def _child(args: argparse.Namespace, mode: str, *, plugin_off: bool) -> dict[str, list[float]]:
    """Run one engine in a fresh process and read its speeds."""
    handle, result_path = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    command = [sys.executable, "-m", "fv_plugin.benchmarks.vllm", "--child", result_path, "--mode", mode]
    names = (
        "model",
        "dtype",
        "requests",
        "tokens",
        "rounds",
        "norm",
        "forms",
        "gated",
        "gpu_memory_utilization",
        "max_model_len",
    )
    for name in names:
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.layer is not None:
        command += ["--layer", str(args.layer)]
    env = {**os.environ, "FV_PLUGIN_VLLM": "0"} if plugin_off else dict(os.environ)
    try:
        done = subprocess.run(command, check=False, env=env)
        if done.returncode != 0:
            raise SystemExit(f"fv bench vllm: the {mode} run failed with exit status {done.returncode}")
        with open(result_path, encoding="utf-8") as result:
            speeds: dict[str, list[float]] = json.load(result)
        return speeds
    finally:
        os.unlink(result_path)


def run_mode(args: argparse.Namespace, mode: str) -> ModeResult:
    speeds = _child(args, mode, plugin_off=False)
    off = _child(args, mode, plugin_off=True)["plain"] if args.plugin_off else None
    ratios = [s / p for s, p in zip(speeds["steered"], speeds["plain"], strict=True)]
    return ModeResult(
        mode=mode,
        requests=args.requests,
        tokens=args.tokens,
        rounds=args.rounds,
        plain=statistics.median(speeds["plain"]),
        steered=statistics.median(speeds["steered"]),
        ratio=statistics.median(ratios),
        ratios=tuple(ratios),
        plain_plugin_off=statistics.median(off) if off else None,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fv bench vllm", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name or a checkpoint folder")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests, each with its own vector")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved plain/steered rounds")
    parser.add_argument("--layer", type=int, default=None, help="layer of the vectors (default: a third of the depth)")
    parser.add_argument("--norm", type=float, default=8.0, help="norm of each random residual-stream vector")
    parser.add_argument(
        "--forms", default=",".join(FORMS), help=f"comma-separated forms the requests take in turn, from {FORMS}"
    )
    parser.add_argument("--gated", type=float, default=0.5, help="share of the steered requests sent with gate=True")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.25)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--plugin-off", action="store_true", help="also time plain requests with FV_PLUGIN_VLLM=0")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one engine, write here
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child:
        speeds = measure(args)
        with open(args.child, "w", encoding="utf-8") as handle:
            json.dump(speeds, handle)
        return 0
    results = [run_mode(args, mode) for mode in (MODES if args.mode == "both" else (args.mode,))]
    for result in results:
        print(result.line())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([asdict(result) for result in results], handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
