"""Check fv_plugin on a CUDA GPU: fp16 / bf16 / 4-bit steering, a GPU+CPU split, extraction, overhead.

Each check prints one line and the script ends with a summary; the exit status is 1 when a check failed, and 0
(with a message saying nothing was run) on a machine without CUDA.

Checks, all on the embedded default model unless ``--model`` says otherwise:
  fp16, bf16   steered next-layer input == unsteered + vector (a forward pre-hook of this script's own), and
               greedy generation with the KV cache == without it
  4bit         the same on a bitsandbytes nf4 model on the GPU (needs ``pip install "fv_plugin[quant]"``)
  split        ``device_map="auto"`` with ``max_memory`` that leaves only part of the model on the GPU: the
               rest runs from CPU memory; steered logits equal the model fully on the GPU, cached == uncached
  extract      ``auto`` and the paper's ``heads`` extraction in bf16 (fp16 where bf16 is missing), each timed
               against the plain forwards of the prompts it cannot avoid, and the share of 10-shot ICL test
               accuracy the auto vector recovers zero-shot. Give the largest model that fits on the GPU, e.g.
               ``--model Qwen/Qwen2.5-7B-Instruct``. Expected on a GPU: auto <= 2x and heads <= 1.5x the plain
               forwards, recovery >= 80% (not yet run on a GPU; on CPU, smollm2: see docs/extraction_cost.md)
  overhead     ``fv bench overhead`` on the GPU: tokens/s plain, attached-idle, steered (order rotated, ratios
               paired per repeat), and fv_plugin's own work timed inside the steered runs (steered/plain bound)
  vllm         vLLM with its GPU defaults (compiled, full CUDA graphs for decode batches): one batch mixing plain
               and per-request steered requests (two signed vectors at two layers, every positions mode, relative
               normalization, a head_difference and a head_patch vector, alone and with a residual-stream vector;
               ``positions="answer"``, whose end the worker reads from each step's token ids, which under vLLM's
               async scheduling the previous step's sampler writes on the GPU) gives the same greedy tokens as
               ``fv_plugin.steer`` on Hugging Face, float32. A Python hook does not
               run when a CUDA graph is replayed, so this checks that each step's per-request coefficients reach the
               graph's buffers before it runs (needs ``pip install "fv_plugin[vllm]"``; skipped with a message when
               vLLM is missing). The plugin prefers vLLM's v1 model runner where vLLM still has it (0.32, 0.33)
  vllm-v2      the same batch on vLLM's Model Runner V2 (``VLLM_USE_V2_MODEL_RUNNER=1``; vLLM 0.34 has only V2)

Expected output on a GPU (the first line names the GPU; times vary), e.g.:
  [ok] vllm (...): 13 requests == fv_plugin.steer (10/10 steered rows differ from plain); runner v1; cudagraph ...
  [ok] vllm-v2 (...): 13 requests == fv_plugin.steer (10/10 steered rows differ from plain); runner V2; cudagraph ...
  8/8 checks passed

Run:  python examples/gpu_check.py [--model NAME] [--task antonym] [--skip overhead,extract]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import fv_plugin

CHECKS = ("fp16", "bf16", "4bit", "split", "extract", "overhead", "vllm", "vllm-v2")
PROMPTS = ["Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: fast\nA:", "Q: up\nA:"]


@dataclass(frozen=True)
class Outcome:
    name: str
    ok: bool
    detail: str
    seconds: float


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded short name, local path or Hub id")
    parser.add_argument("--task", default="antonym", help="built-in task for the extract check")
    parser.add_argument("--skip", default="", help=f"comma-separated checks to skip, from {CHECKS}")
    parser.add_argument("--layer", type=int, default=None, help="layer to steer (default: a third of the depth)")
    parser.add_argument("--gpu-fraction", type=float, default=0.5, help="split: share of the model kept on GPU 0")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(CHECKS)
    if unknown:
        parser.error(f"unknown check(s) {sorted(unknown)} in --skip; choose from {CHECKS}")
    if not 0.0 < args.gpu_fraction < 1.0:
        parser.error(f"--gpu-fraction must be strictly between 0 and 1, got {args.gpu_fraction}")
    args.skip = skip
    return args


def no_cuda_message() -> str | None:
    """Why the checks cannot run here, or ``None`` when a CUDA device is usable."""
    if not torch.cuda.is_available():
        build = (
            "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        )
        return (
            f"CUDA is not available ({build}, no usable GPU): nothing was checked. Run this script on a machine "
            "with an NVIDIA GPU and a CUDA build of torch; the CPU paths are covered by the test suite."
        )
    return None


# ------------------------------------------------------------------------------------------------ checks
@contextlib.contextmanager
def next_layer_input(model: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """This script's own oracle: the hidden states entering decoder layer ``layer + 1``."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.detach().cpu())

    handle = model.get_decoder().layers[layer + 1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def encoded(tokenizer: Any, device: torch.device) -> dict[str, torch.Tensor]:
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    return {key: value.to(device) for key, value in enc.items()}


def random_vector(model: nn.Module, layer: int) -> fv_plugin.FunctionVector:
    hidden = fv_plugin.resolve_architecture(model).hidden_size
    gen = torch.Generator().manual_seed(0)
    return fv_plugin.FunctionVector(vector=8.0 * torch.randn(hidden, generator=gen), layer=layer)


def steering_check(model: nn.Module, tokenizer: Any, layer: int, device: torch.device) -> str:
    """Oracle and cache checks on one model; raises AssertionError with the figures when one fails."""
    fv = random_vector(model, layer)
    enc = encoded(tokenizer, device)
    with torch.inference_mode(), next_layer_input(model, layer) as seen:
        model(**enc)
        with fv_plugin.steer(model, fv, positions="all"):
            model(**enc)
    plain, steered = seen
    dtype = plain.dtype
    plain, steered = plain.float(), steered.float()
    real = enc["attention_mask"].bool().cpu()[..., None]
    expected = torch.where(real, plain + fv.vector, plain)
    error = float((steered - expected).abs().max())
    # rounding the vector and the sum to the activation dtype: at most one unit in the last place of each
    tolerance = 2 * torch.finfo(dtype).eps * max(float(expected.abs().max()), 1.0) if dtype != torch.float32 else 1e-4
    assert error <= tolerance, f"steered input differs from input + vector by {error:.3g} (> {tolerance:.3g})"
    outs = []
    for use_cache in (True, False):
        with torch.inference_mode(), fv_plugin.steer(model, fv):
            options = dict(max_new_tokens=6, do_sample=False, use_cache=use_cache)
            outs.append(model.generate(**enc, pad_token_id=tokenizer.pad_token_id, **options))
    same = bool(torch.equal(outs[0], outs[1]))
    assert same, "greedy generation with the KV cache differs from without it"
    return f"oracle max error {error:.2e} (tolerance {tolerance:.1e}); cached == uncached"


def split_memory(model_bytes: int, fraction: float) -> dict[Any, str]:
    """``max_memory`` that lets GPU 0 hold about ``fraction`` of the model and the CPU the rest."""
    gpu = max(int(model_bytes * fraction), 1 << 20)
    return {0: f"{gpu // (1 << 20)}MiB", "cpu": f"{4 * model_bytes // (1 << 20) + 1024}MiB"}


def check_dtype(args: argparse.Namespace, dtype: torch.dtype) -> str:
    model, tokenizer = fv_plugin.load_model(args.model, dtype=dtype, device_map="cuda:0")
    return steering_check(model, tokenizer, layer_of(model, args), torch.device("cuda:0"))


def check_4bit(args: argparse.Namespace) -> str:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError('bitsandbytes is not installed: pip install "fv_plugin[quant]"')
    model, tokenizer = fv_plugin.load_model(args.model, quantization="4bit", device_map="cuda:0")
    detail = steering_check(model, tokenizer, layer_of(model, args), torch.device("cuda:0"))
    return f"{model.get_memory_footprint() / 2**20:.0f} MiB of weights; {detail}"


def check_split(args: argparse.Namespace) -> str:
    full, tokenizer = fv_plugin.load_model(args.model, dtype=torch.float32, device_map="cuda:0")
    memory = split_memory(full.get_memory_footprint(), args.gpu_fraction)
    model, _ = fv_plugin.load_model(args.model, dtype=torch.float32, device_map="auto", max_memory=memory)
    places = {str(v) for v in model.hf_device_map.values()}
    assert places >= {"0", "cpu"}, f"max_memory={memory} did not split the model: {model.hf_device_map}"
    layer = layer_of(model, args)
    fv = random_vector(model, layer)
    enc = encoded(tokenizer, torch.device("cuda:0"))
    logits = []
    for m in (model, full):
        with torch.inference_mode(), fv_plugin.steer(m, fv, positions="all"):
            logits.append(m(**enc).logits.float().cpu())
    difference = float((logits[0] - logits[1]).abs().max())
    assert difference < 1e-3, f"split model's steered logits differ from the single-GPU ones by {difference:.3g}"
    detail = steering_check(model, tokenizer, layer, torch.device("cuda:0"))
    on_cpu = sum(1 for v in model.hf_device_map.values() if str(v) == "cpu")
    return f"{on_cpu} modules on the CPU, rest on GPU 0 ({memory}); logits vs single GPU {difference:.1e}; {detail}"


def extraction_check(model: nn.Module, tokenizer: Any, task: Any, config: Any = None) -> tuple[str, float]:
    """``auto`` and ``heads`` timed against the forwards they cannot avoid (``fv bench extract``), and the share
    of 10-shot ICL test accuracy the ``auto`` vector recovers zero-shot: (the line to print, that share)."""
    from fv_plugin.benchmarks.extraction import measure_extraction

    timing = measure_extraction(model, tokenizer, task, config=config or fv_plugin.ExtractionConfig(), aie_check=False)
    auto = next(m for m in timing.methods if m.method == "auto")
    icl = fv_plugin.zero_shot_scores(model, tokenizer, fv_plugin.make_prompts(task, n_shots=10, split="test"))[0]
    test = fv_plugin.make_prompts(task, n_shots=0, split="test")
    steered = fv_plugin.zero_shot_scores(model, tokenizer, test, [auto.vector])[0]
    recovery = steered / icl if icl > 0 else float("nan")
    line = (
        f"{task.name}: plain forwards {timing.plain.seconds:.1f} s; auto {timing.ratio('auto'):.2f}x "
        f"({auto.chosen}), heads {timing.ratio('heads'):.2f}x; zero-shot with the auto vector {steered:.2f}, "
        f"ICL {icl:.2f}: {recovery:.0%} of ICL"
    )
    return line, recovery


def check_extract(args: argparse.Namespace) -> str:
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    model, tokenizer = fv_plugin.load_model(args.model, dtype=dtype, device_map="cuda:0")
    line, recovery = extraction_check(model, tokenizer, fv_plugin.load_task(args.task))
    assert recovery > 0.5, f"the auto vector recovers only {recovery:.0%} of ICL: {line}"
    return f"{str(dtype).removeprefix('torch.')}, {line}"


def check_overhead(args: argparse.Namespace) -> str:
    from fv_plugin.benchmarks.overhead import measure_overhead

    model, tokenizer = fv_plugin.load_model(args.model, dtype=torch.float16, device_map="cuda:0")
    result = measure_overhead(model, tokenizer, tokens=32, repeats=6)
    return " ".join(result.report().split("\n")[1:]).replace("  ", " ")


# ---------------------------------------------------------------------------------------------- vLLM
def no_vllm_message() -> str | None:
    """Why the vLLM check cannot run here, or ``None`` when vLLM is installed."""
    if importlib.util.find_spec("vllm") is None:
        return 'vLLM is not installed (pip install "fv_plugin[vllm]"): the vllm check was skipped'
    return None


def head_vector(model: nn.Module, layer: int, mode: str, seed: int) -> fv_plugin.FunctionVector:
    """A random head-level vector on every third head of ``layer`` and ``layer + 1`` (heads on every rank)."""
    arch = fv_plugin.resolve_architecture(model)
    heads_count = int(arch.num_heads or 1)
    head_dim = int(getattr(model.config, "head_dim", None) or arch.hidden_size // heads_count)
    heads = tuple((at, head) for at in (layer, layer + 1) for head in range(0, heads_count, 3))
    gen = torch.Generator().manual_seed(seed)
    values = 10.0 * torch.nn.functional.normalize(torch.randn(len(heads), head_dim, generator=gen), dim=-1)
    method = "head_difference" if mode == "add" else "head_patch"
    return fv_plugin.FunctionVector(
        vector=torch.zeros(arch.hidden_size),
        layer=layer,
        heads=heads,
        head_values=values,
        head_mode=mode,
        method=method,
    )


def vllm_cases(model: nn.Module, tokenizer: Any) -> list[tuple[list[int], tuple[Any, ...], dict[str, Any]]]:
    """(prompt ids, vectors, steer options) of each request: each prompt plain, and steered in several ways."""
    layers = int(model.config.num_hidden_layers)
    a, b = (random_vector(model, layers // 3), 0.5), (random_vector(model, 2 * layers // 3), -0.25)
    diff, patch = head_vector(model, layers // 4, "add", 1), head_vector(model, layers // 2, "replace", 2)
    ids = [tokenizer(prompt)["input_ids"] for prompt in (*PROMPTS, "The capital of France is")]
    return [
        *((row, (), {}) for row in ids),
        (ids[0], (a,), {"strength": 1.0}),
        (ids[1], (a, b), {"strength": 1.5, "positions": "all"}),
        (ids[2], (b,), {"strength": 2.0, "positions": "last_prompt"}),
        (ids[1], (a,), {"strength": 0.3, "normalize": "relative"}),
        (ids[0], (diff,), {"strength": 1.0}),
        (ids[2], (patch, a), {"strength": 1.0, "positions": "all"}),
        (ids[1], ((diff, 0.5), patch), {"strength": 1.5}),
        (ids[2], ((diff, -1.0),), {"strength": 1.0, "positions": "last_prompt"}),
        (ids[1], (a,), {"strength": 1.0, "positions": "answer"}),
        (ids[0], ((diff, 0.5), b), {"strength": 1.0, "positions": "answer"}),
    ]


def hf_reference(
    model: nn.Module, tokenizer: Any, cases: list[tuple[list[int], tuple[Any, ...], dict[str, Any]]]
) -> list[list[int]]:
    device = next(model.parameters()).device
    rows = []
    for ids, vectors, options in cases:
        x = torch.tensor([ids], device=device)
        if options.get("positions") == "answer":
            options = {**options, "tokenizer": tokenizer}
        with torch.inference_mode(), fv_plugin.steer(model, *vectors, **options):
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)
        rows.append(out[0, len(ids) :].tolist())
    return rows


def check_vllm(args: argparse.Namespace, runner: str = "default") -> str:
    """``runner="v2"``: ask vLLM for its Model Runner V2 (``VLLM_USE_V2_MODEL_RUNNER=1``)."""
    import os
    import tempfile

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from fv_plugin.vllm import steering

    model, tokenizer = fv_plugin.load_model(args.model, dtype=torch.float32, device_map="cuda:0")
    cases = vllm_cases(model, tokenizer)
    expected = hf_reference(model, tokenizer, cases)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
        if runner == "v2":
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        llm = LLM(model=folder, dtype="float32", gpu_memory_utilization=0.3, max_model_len=512, seed=0)
        config = llm.llm_engine.vllm_config
        mode = config.compilation_config.cudagraph_mode
        used = "V2" if getattr(config, "use_v2_model_runner", True) else "v1"
        params = [
            SamplingParams(temperature=0, max_tokens=12, extra_args=steering(*v, **o) if v else None)
            for _, v, o in cases
        ]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _, _ in cases], params, use_tqdm=False)
    got = [list(out.outputs[0].token_ids) for out in outputs]
    wrong = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not wrong, f"vLLM rows {wrong} differ from fv_plugin.steer: {[(got[i], expected[i]) for i in wrong]}"
    plain = {tuple(ids): expected[i] for i, (ids, vectors, _) in enumerate(cases) if not vectors}
    changed = sum(expected[i] != plain[tuple(ids)] for i, (ids, vectors, _) in enumerate(cases) if vectors)
    assert changed, "no vector changed its row's tokens: the comparison would not show missing steering"
    steered = sum(bool(vectors) for _, vectors, _ in cases)
    return (
        f"{len(cases)} requests == fv_plugin.steer ({changed}/{steered} steered rows differ from plain); "
        f"runner {used}; cudagraph mode {mode}"
    )


def layer_of(model: nn.Module, args: argparse.Namespace) -> int:
    return args.layer if args.layer is not None else fv_plugin.resolve_architecture(model).num_layers // 3


def run_checks(args: argparse.Namespace, checks: dict[str, Callable[[argparse.Namespace], str]]) -> list[Outcome]:
    outcomes = []
    for name, check in checks.items():
        if name in args.skip:
            continue
        start = time.perf_counter()
        try:
            outcome = Outcome(name, True, check(args), time.perf_counter() - start)
        except Exception as exc:  # a failed check is reported, and the others still run
            outcome = Outcome(name, False, f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
        print(f"[{'ok' if outcome.ok else 'FAILED'}] {name} ({outcome.seconds:.1f} s): {outcome.detail}", flush=True)
        outcomes.append(outcome)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return outcomes


def summary(outcomes: Sequence[Outcome]) -> str:
    failed = [o.name for o in outcomes if not o.ok]
    head = f"{len(outcomes) - len(failed)}/{len(outcomes)} checks passed"
    return head + (f"; failed: {', '.join(failed)}" if failed else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = no_cuda_message()
    if reason is not None:
        print(reason)
        return 0
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, fv_plugin {fv_plugin.__version__}")
    checks: dict[str, Callable[[argparse.Namespace], str]] = {
        "fp16": lambda a: check_dtype(a, torch.float16),
        "bf16": lambda a: check_dtype(a, torch.bfloat16),
        "4bit": check_4bit,
        "split": check_split,
        "extract": check_extract,
        "overhead": check_overhead,
        "vllm": check_vllm,
        "vllm-v2": lambda a: check_vllm(a, runner="v2"),  # last: it sets VLLM_USE_V2_MODEL_RUNNER=1
    }
    skipped = no_vllm_message()
    if skipped is not None and not {"vllm", "vllm-v2"} <= args.skip:
        print(f"[skipped] {skipped}")
        args.skip = args.skip | {"vllm", "vllm-v2"}
    outcomes = run_checks(args, checks)
    print(summary(outcomes))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
