"""Evaluation: how well a model does a task with and without function vectors, and sweeps over settings.

:func:`evaluate` scores one task in one prompt mode:

- ``"zero_shot"``: the bare query in the template (``Q: {x}\\nA:``);
- ``"icl"``: N demonstrations, then the query;
- ``"shuffled"``: N demonstrations whose labels are permuted among themselves, then the query;
- ``"natural"``: the query inside natural text (``The word "{x}" means``), judged by whether an accepted answer
  appears in the greedy continuation.

Every mode reports first-token top-1 accuracy (the argmax of the next-token distribution is the first token of
an accepted answer), exact match of the greedy continuation (its first line, stripped, is an accepted answer:
the measure for multi-token answers), the probability of the answer's first token and, when vectors are given,
the same probability without them and the KL divergence from the unsteered to the steered next-token
distribution. Vectors are added at the final prompt token for the next-token figures and, as in the paper, at
the final prompt token and every generated token for the continuation.

The sweeps (:func:`sweep_strength`, :func:`sweep_layers`, :func:`sweep_k`) run the next-token part only.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from fv_plugin.architectures import ArchSpec
from fv_plugin.extraction import head_vector
from fv_plugin.mediation import IndirectEffects, last_logits_only
from fv_plugin.prompts import DEFAULT_TEMPLATE, Prompt, PromptTemplate, encode_prompts, make_prompts
from fv_plugin.steering import steer
from fv_plugin.tasks import Pair, Task
from fv_plugin.vector import FunctionVector

__all__ = [
    "MODES",
    "NATURAL_TEMPLATES",
    "EvalResult",
    "EvalRow",
    "Mode",
    "Sweep",
    "evaluate",
    "sweep_k",
    "sweep_layers",
    "sweep_strength",
]

Mode = Literal["zero_shot", "icl", "shuffled", "natural"]
MODES: tuple[str, ...] = ("zero_shot", "icl", "shuffled", "natural")
NATURAL_TEMPLATES: tuple[str, ...] = (
    'The word "{x}" means',
    'When I think of "{x}", I think of',
    'Here is my answer for "{x}":',
)
VectorArg = FunctionVector | tuple[FunctionVector, float]


@dataclass(frozen=True)
class EvalRow:
    """One prompt's outcome.

    ``first_token_correct`` is ``None`` in natural mode (the answer need not come first there);
    ``base_answer_prob`` and ``kl`` are ``None`` when no vector was given.
    """

    input: str
    answers: tuple[str, ...]
    prompt: str
    top_token: str
    continuation: str
    first_token_correct: bool | None
    exact_match: bool
    answer_prob: float
    base_answer_prob: float | None
    kl: float | None


@dataclass(frozen=True)
class EvalResult:
    """Scores of one task in one mode; ``rows`` has one :class:`EvalRow` per prompt.

    ``accuracy`` is first-token top-1 accuracy (in natural mode: the fraction of continuations that contain an
    accepted answer). ``prob_shift`` is the mean steered minus unsteered answer probability.
    """

    task: str
    mode: str
    strength: float
    vectors: tuple[str, ...]
    accuracy: float
    exact_match: float | None
    answer_prob: float
    base_answer_prob: float | None
    prob_shift: float | None
    kl: float | None
    rows: tuple[EvalRow, ...]

    @property
    def n(self) -> int:
        return len(self.rows)

    def to_dict(self, *, rows: bool = True) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["n"] = self.n
        if not rows:
            del out["rows"]
        return out


@dataclass(frozen=True)
class Sweep:
    """Next-token scores of one task as one setting (``parameter``) takes several ``values``."""

    task: str
    parameter: str
    values: tuple[float, ...]
    accuracy: tuple[float, ...]
    answer_prob: tuple[float, ...]
    kl: tuple[float, ...]
    baseline_accuracy: float

    @property
    def best(self) -> float:
        """The value with the highest accuracy (ties: the higher answer probability)."""
        scored = zip(self.accuracy, self.answer_prob, self.values, strict=True)
        return max(scored, key=lambda t: (t[0], t[1]))[2]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _name(entry: VectorArg) -> str:
    fv, weight = entry if isinstance(entry, tuple) else (entry, 1.0)
    label = f"{fv.task or 'vector'}@L{fv.layer}"
    return label if weight == 1.0 else f"{weight:g}*{label}"


def _natural_prompts(task: Task, pairs: Sequence[Pair], templates: Sequence[str]) -> list[Prompt]:
    for template in templates:
        if template.count("{x}") != 1:
            raise ValueError(f"a natural-text template needs exactly one '{{x}}', got {template!r}")
    return [
        Prompt(text=t.replace("{x}", p.input), answers=tuple(" " + a for a in p.answers), query=p)
        for p in pairs
        for t in templates
    ]


def _mode_prompts(
    task: Task,
    mode: str,
    *,
    n: int | None,
    n_shots: int,
    split: str,
    template: str,
    natural_templates: Sequence[str],
    seed: int,
) -> list[Prompt]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "natural":
        pairs = list(getattr(task, split))[: n if n is not None else None]
        if not pairs:
            raise ValueError(f"task {task.name!r} has no {split} pairs")
        return _natural_prompts(task, pairs, natural_templates)
    shots = 0 if mode == "zero_shot" else n_shots
    return make_prompts(
        task, n=n, n_shots=shots, split=split, shuffle_labels=mode == "shuffled", template=template, seed=seed
    )


def _device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _next_token_probs(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, vectors: Sequence[VectorArg], strength: float
) -> torch.Tensor:
    device = _device(model)
    with steer(model, *vectors, strength=strength, positions="last_prompt"):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **last_logits_only(model)).logits
    return logits[:, -1].float().softmax(-1).cpu()


def _continuations(
    model: nn.Module,
    tokenizer: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    vectors: Sequence[VectorArg],
    strength: float,
    max_new_tokens: int,
) -> list[str]:
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with steer(model, *vectors, strength=strength, positions="generated"):
        out = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return [tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True) for row in out.cpu()]


def _exact(continuation: str, answers: Sequence[str]) -> bool:
    first_line = continuation.strip().split("\n")[0].strip()
    return first_line in {a.strip() for a in answers}


def _contains(continuation: str, answers: Sequence[str]) -> bool:
    text = continuation.lower()
    return any(re.search(r"(?<!\w)" + re.escape(a.strip().lower()) + r"(?!\w)", text) for a in answers)


def _kl(steered: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(steered || unsteered) per row, in nats."""
    eps = torch.finfo(torch.float32).tiny
    return (steered * (steered.clamp_min(eps).log() - base.clamp_min(eps).log())).sum(-1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    *,
    vectors: Sequence[VectorArg] = (),
    mode: Mode = "zero_shot",
    strength: float = 1.0,
    n_shots: int = 10,
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    template: str = DEFAULT_TEMPLATE,
    natural_templates: Sequence[str] = NATURAL_TEMPLATES,
    generate: bool = True,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> EvalResult:
    """Score ``task`` on ``model`` in one prompt ``mode``, steered by ``vectors`` (if any).

    Args:
        model, tokenizer: a causal LM and its tokenizer (with a pad token).
        task: the task; queries come from ``split`` and demonstrations from its train split.
        vectors: :class:`FunctionVector` objects or ``(vector, weight)`` pairs (as for :func:`~fv_plugin.steer`).
        mode: ``"zero_shot"``, ``"icl"``, ``"shuffled"`` or ``"natural"`` (see the module's docstring).
        strength: multiplies every vector.
        n: number of prompts (default: one per query; natural mode: one per query and template).
        natural_templates: templates with ``{x}`` for natural mode.
        generate: also decode greedily for exact match (natural mode always generates).
        max_new_tokens: for the continuation; default: the longest accepted answer's tokens plus one (natural
            mode: 12).
        batch_size: prompts per forward pass.

    Returns:
        An :class:`EvalResult` with the mean scores and one row per prompt.

    Example:
        >>> res = evaluate(model, tok, load_task("antonym"), vectors=[fv])  # doctest: +SKIP
        >>> res.accuracy, res.prob_shift, res.kl  # doctest: +SKIP
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if getattr(tokenizer, "pad_token", None) is None:
        raise ValueError("the tokenizer has no pad token; set `tokenizer.pad_token = tokenizer.eos_token` first")
    PromptTemplate(template)  # validates
    prompts = _mode_prompts(
        task,
        mode,
        n=n,
        n_shots=n_shots,
        split=split,
        template=template,
        natural_templates=natural_templates,
        seed=seed,
    )
    natural = mode == "natural"
    rows: list[EvalRow] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc=f"evaluate {task.name} ({mode})", disable=not progress):
        batch = prompts[start : start + batch_size]
        enc = encode_prompts(tokenizer, batch)
        probs = _next_token_probs(model, enc.input_ids, enc.attention_mask, vectors, strength)
        base = _next_token_probs(model, enc.input_ids, enc.attention_mask, (), 0.0) if vectors else None
        top = probs.argmax(-1)
        continuations = [""] * len(batch)
        if generate or natural:
            longest = max(len(t) for answers in enc.answer_tokens for t in answers)
            budget = max_new_tokens or (12 if natural else longest + 1)
            continuations = _continuations(
                model, tokenizer, enc.input_ids, enc.attention_mask, vectors, strength, budget
            )
        kl = _kl(probs, base) if base is not None else None
        for i, prompt in enumerate(batch):
            firsts = {tokens[0] for tokens in enc.answer_tokens[i]}
            answer = int(enc.answer_ids[i])
            rows.append(
                EvalRow(
                    input=prompt.query.input,
                    answers=tuple(a.strip() for a in prompt.answers),
                    prompt=prompt.text,
                    top_token=tokenizer.decode([int(top[i])]),
                    continuation=continuations[i],
                    first_token_correct=None if natural else int(top[i]) in firsts,
                    exact_match=_contains(continuations[i], prompt.answers)
                    if natural
                    else _exact(continuations[i], prompt.answers),
                    answer_prob=float(probs[i, answer]),
                    base_answer_prob=float(base[i, answer]) if base is not None else None,
                    kl=float(kl[i]) if kl is not None else None,
                )
            )
    return _summarize(task.name, mode, strength, vectors, rows, generated=generate or natural)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _summarize(
    task: str, mode: str, strength: float, vectors: Sequence[VectorArg], rows: list[EvalRow], *, generated: bool
) -> EvalResult:
    natural = mode == "natural"
    accuracy = _mean([float(r.exact_match if natural else bool(r.first_token_correct)) for r in rows])
    base = [r.base_answer_prob for r in rows if r.base_answer_prob is not None]
    kls = [r.kl for r in rows if r.kl is not None]
    answer_prob = _mean([r.answer_prob for r in rows])
    return EvalResult(
        task=task,
        mode=mode,
        strength=float(strength),
        vectors=tuple(_name(v) for v in vectors),
        accuracy=accuracy,
        exact_match=_mean([float(r.exact_match) for r in rows]) if generated else None,
        answer_prob=answer_prob,
        base_answer_prob=_mean(base) if base else None,
        prob_shift=answer_prob - _mean(base) if base else None,
        kl=_mean(kls) if kls else None,
        rows=tuple(rows),
    )


def _sweep(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    parameter: str,
    values: Sequence[float],
    make: Callable[[float], tuple[list[VectorArg], float]],
    progress: bool,
    **options: Any,
) -> Sweep:
    if not values:
        raise ValueError(f"no {parameter} values to sweep")
    baseline = evaluate(model, tokenizer, task, generate=False, **options).accuracy
    acc, prob, kl = [], [], []
    for value in tqdm(values, desc=f"{parameter} sweep", disable=not progress):
        vectors, strength = make(value)
        res = evaluate(model, tokenizer, task, vectors=vectors, strength=strength, generate=False, **options)
        acc.append(res.accuracy)
        prob.append(res.answer_prob)
        kl.append(res.kl if res.kl is not None else 0.0)
    return Sweep(task.name, parameter, tuple(float(v) for v in values), tuple(acc), tuple(prob), tuple(kl), baseline)


def sweep_strength(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    fv: FunctionVector,
    strengths: Sequence[float],
    *,
    progress: bool = False,
    **options: Any,
) -> Sweep:
    """Zero-shot next-token scores with ``fv`` at each strength (``options`` go to :func:`evaluate`)."""
    return _sweep(model, tokenizer, task, "strength", strengths, lambda s: ([fv], s), progress, **options)


def sweep_layers(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    fv: FunctionVector | Callable[[int], FunctionVector],
    layers: Sequence[int],
    *,
    strength: float = 1.0,
    progress: bool = False,
    **options: Any,
) -> Sweep:
    """Zero-shot next-token scores with the vector added after each of ``layers``.

    ``fv`` is either one vector, moved to each layer as it is, or a function ``layer -> FunctionVector`` for
    forms that differ per layer (e.g. a difference of hidden states taken at that layer).
    """
    if isinstance(fv, FunctionVector) and fv.is_head_patch:
        raise ValueError("a head_patch vector's heads sit at their own layers; sweep a residual-stream form instead")

    def make(layer: float) -> tuple[list[VectorArg], float]:
        at = int(layer)
        vec = dataclasses.replace(fv, layer=at) if isinstance(fv, FunctionVector) else fv(at)
        return [vec], strength

    return _sweep(model, tokenizer, task, "layer", [float(x) for x in layers], make, progress, **options)


def sweep_k(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    means: torch.Tensor,
    effects: IndirectEffects,
    ks: Sequence[int],
    *,
    layer: int,
    strength: float = 1.0,
    arch: ArchSpec | None = None,
    progress: bool = False,
    **options: Any,
) -> Sweep:
    """Zero-shot next-token scores of the paper's vector (top-k heads by AIE, summed) for each ``k``.

    ``means`` and ``effects`` come from :func:`~fv_plugin.mean_head_activations` and
    :func:`~fv_plugin.average_indirect_effect`; the vector is added after ``layer``.
    """
    total = effects.aie.numel()
    for k in ks:
        if not 1 <= k <= total:
            raise ValueError(f"k must be between 1 and the number of heads ({total}), got {k}")

    def make(k: float) -> tuple[list[VectorArg], float]:
        heads = effects.top_heads(int(k))
        vec = FunctionVector(vector=head_vector(model, means, heads, arch=arch), layer=layer, task=task.name)
        return [vec], strength

    return _sweep(model, tokenizer, task, "k", [float(k) for k in ks], make, progress, **options)
