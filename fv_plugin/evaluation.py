"""Evaluation: how well a model does a task with and without function vectors, and sweeps over settings.

:func:`evaluate` scores one task in one prompt mode (:class:`~fv_plugin.EvalConfig`):

- ``"zero_shot"``: the bare query in the template (``Q: {x}\\nA:``);
- ``"icl"``: N demonstrations, then the query;
- ``"shuffled"``: N demonstrations whose labels are permuted among themselves, then the query;
- ``"natural"``: the query inside natural text (``The word "{x}" means``), judged by whether an accepted answer
  appears in the greedy continuation.

Every mode reports first-token top-1 accuracy (the argmax of the next-token distribution is the first token of
an accepted answer: the main answer or an alternative), exact match of the greedy continuation (it starts with a
whole accepted answer, followed by its end or a non-word character: every token of a multi-token answer was
generated), the probability of the main answer's first token and, when vectors are given, the same probability
without them and the KL divergence from the unsteered to the steered next-token distribution. Vectors are added
at the final prompt token for the next-token figures and, as in the paper, at the final prompt token and every
generated token for the continuation. What counts as correct is defined once, in :mod:`fv_plugin.scoring`.

The sweeps (:func:`sweep_strength`, :func:`sweep_layers`, :func:`sweep_k`) score the next token only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fv_plugin.config import EvalConfig, ExtractionConfig, with_overrides
from fv_plugin.devices import input_device
from fv_plugin.heads import head_vector
from fv_plugin.mediation import HeadStatistics
from fv_plugin.positions import vector_positions
from fv_plugin.prompt_sets import eval_prompts
from fv_plugin.prompts import EncodedPrompts, Prompt, encode_prompts, prompt_tokenizer
from fv_plugin.records import Sweep
from fv_plugin.scoring import (
    VectorArg,
    answer_probs,
    contains_answer,
    first_token_correct,
    first_token_hits,
    kl_divergence,
    next_token_probs,
    starts_with_answer,
    sweep,
    wilson_interval,
)
from fv_plugin.steering import steer
from fv_plugin.tasks import Task
from fv_plugin.vector import FunctionVector

__all__ = [
    "EvalResult",
    "EvalRow",
    "contains_answer",
    "evaluate",
    "icl_correct_inputs",
    "mode_prompts",
    "starts_with_answer",
    "sweep_k",
    "sweep_layers",
    "sweep_strength",
]


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
    accepted answer), with its 95% Wilson interval ``accuracy_ci`` (``exact_match_ci`` likewise). ``prob_shift``
    is the mean steered minus unsteered answer probability. ``protocol`` says which queries were scored
    (``"icl_correct"``: those the model answers correctly with clean ICL; NaN scores when there are none).
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
    accuracy_ci: tuple[float, float] = (0.0, 1.0)
    exact_match_ci: tuple[float, float] | None = None
    protocol: str = "all"

    @property
    def n(self) -> int:
        return len(self.rows)

    def restricted(self, inputs: Collection[str], protocol: str = "icl_correct") -> EvalResult:
        """The same result on the rows whose query is in ``inputs`` (e.g. the queries ICL gets right)."""
        rows = [r for r in self.rows if r.input in inputs]
        config = EvalConfig(mode=self.mode, strength=self.strength, generate=self.exact_match is not None)  # type: ignore[arg-type]
        return dataclasses.replace(_summarize(self.task, config, (), rows), vectors=self.vectors, protocol=protocol)

    def to_dict(self, *, rows: bool = True) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["n"] = self.n
        if not rows:
            del out["rows"]
        return out


def _name(entry: VectorArg) -> str:
    fv, weight = entry if isinstance(entry, tuple) else (entry, 1.0)
    label = f"{fv.task or 'vector'}@L{fv.layer}"
    return label if weight == 1.0 else f"{weight:g}*{label}"


def eval_tokenizer(tokenizer: Any, prepend_bos: bool | None, vectors: Sequence[VectorArg] = ()) -> Any:
    """The tokenizer an evaluation encodes its prompts with: BOS first as ``prepend_bos`` says, or (``None``) as
    the ``vectors`` were extracted, or :class:`~fv_plugin.ExtractionConfig`'s default without vectors."""
    if prepend_bos is None:
        kept = {(v[0] if isinstance(v, tuple) else v).prepend_bos for v in vectors}
        if len(kept) > 1:
            raise ValueError(
                "the vectors were extracted with and without a BOS token first (fv.prepend_bos); "
                "set prepend_bos=True or False in the evaluation to choose one"
            )
        prepend_bos = kept.pop() if kept else ExtractionConfig().prepend_bos
    return prompt_tokenizer(tokenizer, prepend_bos=prepend_bos)


mode_prompts = eval_prompts  # the former name of :func:`~fv_plugin.prompt_sets.eval_prompts`


def _continuations(
    model: nn.Module, tokenizer: Any, enc: EncodedPrompts, vectors: Sequence[VectorArg], config: EvalConfig, budget: int
) -> list[str]:
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    positions, gate = config.positions, config.gate
    with steer(model, *vectors, strength=config.strength, positions=positions, gate=gate, tokenizer=tokenizer):
        out = model.generate(  # type: ignore[operator]
            input_ids=enc.input_ids.to(device),
            attention_mask=enc.attention_mask.to(device),
            max_new_tokens=budget,
            do_sample=False,
            pad_token_id=pad,
        )
    return [tokenizer.decode(row[enc.input_ids.shape[1] :], skip_special_tokens=True) for row in out.cpu()]


def _prompt_steering(vectors: Sequence[VectorArg], positions: str | None) -> list[VectorArg]:
    """The vectors as the next-token figures steer them: at every prompt token those steered at every token
    (``positions="all"``, or their own), the others at the final prompt token."""

    def at_prompt(fv: Any) -> Any:
        every = (positions or vector_positions(fv)) == "all"
        return dataclasses.replace(fv, positions="all" if every else "last_prompt")

    return [(at_prompt(v[0]), v[1]) if isinstance(v, tuple) else at_prompt(v) for v in vectors]


def _rows(
    model: nn.Module, tokenizer: Any, batch: Sequence[Prompt], vectors: Sequence[VectorArg], config: EvalConfig
) -> list[EvalRow]:
    """Score one batch of prompts: next-token figures, and the greedy continuation when asked for."""
    natural = config.mode == "natural"
    enc = encode_prompts(tokenizer, batch)
    at_prompt = _prompt_steering(vectors, config.positions)
    probs = next_token_probs(model, enc, at_prompt, strength=config.strength, gate=config.gate, positions=None)
    base = next_token_probs(model, enc) if vectors else None
    kl = kl_divergence(probs, base) if base is not None else None
    top, hits = probs.argmax(-1), first_token_hits(probs, enc)
    steered_prob = answer_probs(probs, enc)
    base_prob = answer_probs(base, enc) if base is not None else None
    continuations = [""] * len(batch)
    if config.generate or natural:
        longest = max(len(t) for answers in enc.answer_tokens for t in answers)
        budget = config.max_new_tokens or (12 if natural else longest + 1)
        continuations = _continuations(model, tokenizer, enc, vectors, config, budget)
    rows = []
    for i, prompt in enumerate(batch):
        text = continuations[i]
        matched = contains_answer(text, prompt.answers) if natural else starts_with_answer(text, prompt.answers)
        rows.append(
            EvalRow(
                input=prompt.query.input,
                answers=tuple(a.strip() for a in prompt.answers),
                prompt=prompt.text,
                top_token=tokenizer.decode([int(top[i])]),
                continuation=text,
                first_token_correct=None if natural else hits[i],
                exact_match=matched,
                answer_prob=float(steered_prob[i]),
                base_answer_prob=float(base_prob[i]) if base_prob is not None else None,
                kl=float(kl[i]) if kl is not None else None,
            )
        )
    return rows


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    config: EvalConfig | None = None,
    *,
    vectors: Sequence[VectorArg] = (),
    progress: bool = False,
    **overrides: Any,
) -> EvalResult:
    """Score ``task`` on ``model`` in one prompt mode, steered by ``vectors`` (if any).

    Args:
        model, tokenizer: a causal LM and its tokenizer (with a pad token).
        task: the task; queries come from ``config.split`` and demonstrations from its train split.
        config: the settings (:class:`~fv_plugin.EvalConfig`); any of its fields may also be given as a keyword
            (``mode="natural", n=12``) and overrides it.
        vectors: :class:`FunctionVector` objects or ``(vector, weight)`` pairs (as for :func:`~fv_plugin.steer`).

    Returns:
        An :class:`EvalResult` with the mean scores and one row per prompt.

    Example:
        >>> res = evaluate(model, tok, load_task("antonym"), vectors=[fv])  # doctest: +SKIP
        >>> res.accuracy, res.prob_shift, res.kl  # doctest: +SKIP
    """
    settings = with_overrides(config or EvalConfig(), overrides, what="evaluate()")
    if getattr(tokenizer, "pad_token", None) is None:
        raise ValueError("the tokenizer has no pad token; set `tokenizer.pad_token = tokenizer.eos_token` first")
    prompts = eval_prompts(task, settings)
    tokenizer = eval_tokenizer(tokenizer, settings.prepend_bos, vectors)
    if settings.protocol == "icl_correct":
        kept = icl_correct_inputs(model, tokenizer, task, settings)
        prompts = [p for p in prompts if p.query.input in kept]
    rows: list[EvalRow] = []
    size = settings.batch_size
    for start in tqdm(range(0, len(prompts), size), desc=f"evaluate {task.name}", disable=not progress):
        rows += _rows(model, tokenizer, prompts[start : start + size], vectors, settings)
    return _summarize(task.name, settings, vectors, rows)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _summarize(task: str, config: EvalConfig, vectors: Sequence[VectorArg], rows: list[EvalRow]) -> EvalResult:
    natural = config.mode == "natural"
    hits = [bool(r.exact_match if natural else r.first_token_correct) for r in rows]
    matches = [bool(r.exact_match) for r in rows]
    base = [r.base_answer_prob for r in rows if r.base_answer_prob is not None]
    kls = [r.kl for r in rows if r.kl is not None]
    answer_prob = _mean([r.answer_prob for r in rows])
    generated = config.generate or natural
    return EvalResult(
        task=task,
        mode=config.mode,
        strength=float(config.strength),
        vectors=tuple(_name(v) for v in vectors),
        accuracy=_mean([float(h) for h in hits]),
        exact_match=_mean([float(m) for m in matches]) if generated else None,
        answer_prob=answer_prob,
        base_answer_prob=_mean(base) if base else None,
        prob_shift=answer_prob - _mean(base) if base else None,
        kl=_mean(kls) if kls else None,
        rows=tuple(rows),
        accuracy_ci=wilson_interval(sum(hits), len(hits)),
        exact_match_ci=wilson_interval(sum(matches), len(matches)) if generated else None,
        protocol=config.protocol,
    )


def icl_correct_inputs(model: nn.Module, tokenizer: Any, task: Task, config: EvalConfig = EvalConfig()) -> set[str]:
    """The queries of ``config.split`` the plain model answers correctly (first token) with clean
    ``config.n_shots``-shot ICL prompts: the queries the paper's protocol scores."""
    icl = eval_prompts(task, dataclasses.replace(config, mode="icl", n=None))
    tokenizer = eval_tokenizer(tokenizer, config.prepend_bos)
    correct = first_token_correct(model, tokenizer, icl, batch_size=config.batch_size)
    return {prompt.query.input for prompt, ok in zip(icl, correct, strict=True) if ok}


def _sweep(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    parameter: str,
    values: Sequence[float],
    make: Callable[[float], tuple[Sequence[VectorArg], float]],
    progress: bool,
    overrides: dict[str, Any],
    vectors: Sequence[VectorArg] = (),
) -> Sweep:
    config = with_overrides(EvalConfig(), overrides, what=f"sweep_{parameter}()")
    tokenizer = eval_tokenizer(tokenizer, config.prepend_bos, vectors)
    if config.mode == "natural":
        raise ValueError("sweeps score the next token: use mode 'zero_shot', 'icl' or 'shuffled'")
    prompts = eval_prompts(task, config)
    options = {"task": task.name, "split": config.split, "batch_size": config.batch_size, "progress": progress}
    return sweep(model, tokenizer, prompts, parameter, values, make, **options)  # type: ignore[arg-type]


def sweep_strength(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    fv: FunctionVector,
    strengths: Sequence[float],
    *,
    progress: bool = False,
    **overrides: Any,
) -> Sweep:
    """Next-token scores with ``fv`` at each strength (``overrides``: :class:`~fv_plugin.EvalConfig` fields)."""
    return _sweep(model, tokenizer, task, "strength", strengths, lambda s: ([fv], s), progress, overrides, [fv])


def sweep_layers(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    fv: FunctionVector | Callable[[int], FunctionVector],
    layers: Sequence[int],
    *,
    strength: float = 1.0,
    progress: bool = False,
    **overrides: Any,
) -> Sweep:
    """Next-token scores with the vector added after each of ``layers``.

    ``fv`` is either one vector, moved to each layer as it is, or a function ``layer -> FunctionVector`` for
    methods whose vector differs per layer (e.g. a difference of hidden states taken at that layer).
    """
    if isinstance(fv, FunctionVector) and (fv.is_head_patch or fv.layer_vectors is not None):
        raise ValueError("this vector sits at its heads' own layers; sweep a single-layer method's vector instead")

    def make(layer: float) -> tuple[list[VectorArg], float]:
        at = int(layer)
        vec = dataclasses.replace(fv, layer=at) if isinstance(fv, FunctionVector) else fv(at)
        return [vec], strength

    known = [fv] if isinstance(fv, FunctionVector) else []
    return _sweep(model, tokenizer, task, "layer", [float(x) for x in layers], make, progress, overrides, known)


def sweep_k(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    statistics: HeadStatistics,
    ks: Sequence[int],
    *,
    layer: int,
    strength: float = 1.0,
    progress: bool = False,
    **overrides: Any,
) -> Sweep:
    """Next-token scores of the paper's vector (top-k heads by AIE, summed, added after ``layer``) for each ``k``.

    ``statistics`` come from :func:`~fv_plugin.head_statistics`.
    """
    total = statistics.aie.numel()
    for k in ks:
        if not 1 <= k <= total:
            raise ValueError(f"k must be between 1 and the number of heads ({total}), got {k}")

    def make(k: float) -> tuple[list[VectorArg], float]:
        vec = head_vector(model, statistics.means, statistics.top_heads(int(k)))
        return [FunctionVector(vector=vec, layer=layer, task=task.name)], strength

    overrides = {"prepend_bos": statistics.config.prepend_bos, **overrides}
    return _sweep(model, tokenizer, task, "k", [float(k) for k in ks], make, progress, overrides)
