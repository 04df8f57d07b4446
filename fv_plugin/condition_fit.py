"""Learning a vector's :class:`~fv_plugin.condition.Condition` from labelled prompts, at a small cost.

Positives are the task's queries: zero-shot (``Q: x\nA:`` with the extraction's template), in one of the
task-agnostic natural templates of :data:`fv_plugin.config.NATURAL_TEMPLATES` each (``The word "x" means``),
and a few zero-shot queries as a chat user message (through the tokenizer's chat template, when it has one).
Negatives are the shipped corpus ``data/condition_negatives.txt`` (requests, questions and prose fragments,
written for this library) raw and a few as chat messages, the user's own negatives, and the other built-in
tasks' prompts that carry two demonstrations of that other task (one per task). Other tasks' prompts whose input
is also an input of this task are left out. Other tasks' bare zero-shot queries (``Q: x\nA:`` with no
demonstration) are not negatives: such a query does not say which task is meant, and fitting them made the
condition learn the train words themselves (on the embedded model: the task's own test queries passed 43–90%
against 93–100% of the validation ones, while 15–42% of the other tasks' bare queries still passed;
docs/conditional_steering.md). A user who must keep some of them unsteered adds them as their own negatives.

Every kind is split in two: the fit uses the task's ``train`` queries (and half of each negative kind), the
choice of layer and threshold uses its ``valid`` queries (and the other half). The test split is never read.
The direction is a class-balanced, L2-regularised logistic regression on unit-normalised hidden states at the
prompt's last token, one per candidate layer (below the first layer the vector touches, in the first two thirds
of the model: :func:`condition_layers`); the layer and threshold with the lowest balanced validation error win
(:data:`MISS_WEIGHT`; ties: the earlier layer). The rates stored
in the condition are those validation rates, with 95% Wilson intervals.

Cost: an extraction already runs its train queries zero-shot and keeps their states (``recorded``), so those
positives cost nothing; every other prompt runs shortest first (batches pad little) and only up to the highest
candidate layer (the layers above it and the unembedding never run).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from torch import nn

from fv_plugin.activations import RecordedStates, last_token_hidden_states
from fv_plugin.architectures import ArchSpec, resolve_architecture
from fv_plugin.condition import Condition, RateEstimate
from fv_plugin.config import NATURAL_TEMPLATES, ExtractionConfig
from fv_plugin.prompts import DEFAULT_TEMPLATE, PromptTemplate, make_prompts
from fv_plugin.scoring import wilson_interval
from fv_plugin.tasks import Task, builtin_tasks, load_task
from fv_plugin.vector import FunctionVector

__all__ = [
    "MISS_WEIGHT",
    "LabelledPrompts",
    "best_threshold",
    "condition_layers",
    "condition_negatives",
    "condition_prompts",
    "fit_condition",
    "learn_condition",
    "with_condition",
]

logger = logging.getLogger(__name__)

# How many prompts of each kind, per split (fit / validation): measured to keep the error rates of the larger
# earlier sets (docs/conditional_steering.md) at about a quarter of their cost; chat and ICL prompts are long and
# rarely pass.
_QUERIES = 64  # zero-shot positives (the fit's are those the extraction ran, when it recorded them)
_NATURAL = 12  # queries in a natural template (one template each, in turn)
_CHAT = 6  # chat-wrapped prompts per kind (the chat template's system text makes them long)
_CORPUS = 42  # shipped negatives (all of each half of the shipped corpus) and the user's, raw
_DEPTH = 2 / 3  # candidate layers: below the vector and in the first two thirds of the model
_OTHER_ICL = 1  # per other task, with _ICL_SHOTS demonstrations
_ICL_SHOTS = 2


def condition_negatives() -> list[str]:
    """The shipped negative prompts: everyday requests, questions and prose fragments (no task queries)."""
    text = resources.files("fv_plugin").joinpath("data", "condition_negatives.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass
class LabelledPrompts:
    """Prompt texts with a label (``True``: a query of the task) and a kind (``"zero_shot"``, ``"chat"``...)."""

    texts: list[str] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    def add(self, texts: Sequence[str], label: bool, kind: str) -> None:
        self.texts += list(texts)
        self.labels += [label] * len(texts)
        self.kinds += [kind] * len(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def without(self, texts: set[str]) -> LabelledPrompts:
        """The prompts whose text is not in ``texts``."""
        keep = [i for i, t in enumerate(self.texts) if t not in texts]
        return LabelledPrompts(
            [self.texts[i] for i in keep], [self.labels[i] for i in keep], [self.kinds[i] for i in keep]
        )


def _chat(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    if getattr(tokenizer, "chat_template", None) is None:
        return []
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]


def _halves(items: Sequence[str], rng: random.Random) -> tuple[list[str], list[str]]:
    shuffled = list(items)
    rng.shuffle(shuffled)
    cut = (len(shuffled) + 1) // 2
    return shuffled[:cut], shuffled[cut:]


@functools.lru_cache(maxsize=256)
def _other_prompts(name: str, split: str, shots: int, template: str, seed: int) -> tuple[tuple[str, str], ...]:
    """A built-in task's prompts as ``(input, text)`` pairs (cached: every extraction reads the same ones)."""
    other = load_task(name)
    if len(other.train) <= shots or not getattr(other, split):
        return ()
    prompts = make_prompts(other, n_shots=shots, split=split, template=template, seed=seed)
    return tuple((p.query.input.strip().lower(), p.text) for p in prompts)


def _add_other_tasks(sets: tuple[LabelledPrompts, LabelledPrompts], task: Task, template: str, seed: int) -> None:
    own = {p.input.strip().lower() for p in (*task.train, *task.valid, *task.test)}
    for name in builtin_tasks():
        if name == task.name:
            continue
        for target, split in zip(sets, ("train", "valid"), strict=True):
            found = _other_prompts(name, split, _ICL_SHOTS, template, seed)
            target.add([text for query, text in found if query not in own][:_OTHER_ICL], False, "other_icl")


def condition_prompts(
    task: Task,
    tokenizer: Any,
    *,
    negatives: Sequence[str] = (),
    template: str = DEFAULT_TEMPLATE,
    seed: int = 0,
    zero_shot: Sequence[str] | None = None,
) -> tuple[LabelledPrompts, LabelledPrompts]:
    """The fitting and validation prompts (see the module docstring); ``negatives``: the user's own;
    ``zero_shot``: the fit's zero-shot positives (default: the train queries with ``template``), e.g. the texts of
    the zero-shot prompts an extraction ran."""
    tmpl = PromptTemplate(template)
    rng = random.Random(seed)
    sets = (LabelledPrompts(), LabelledPrompts())
    for target, split in zip(sets, ("train", "valid"), strict=True):
        queries = list(getattr(task, split))
        own = [tmpl.query(p) for p in queries[:_QUERIES]]
        if split == "train" and zero_shot is not None:
            own = list(dict.fromkeys(zero_shot))[:_QUERIES]
        target.add(own, True, "zero_shot")
        natural = [NATURAL_TEMPLATES[i % len(NATURAL_TEMPLATES)] for i in range(len(queries))]
        target.add(
            [t.replace("{x}", p.input) for t, p in zip(natural, queries, strict=True)][:_NATURAL], True, "natural"
        )
        target.add(_chat(tokenizer, own[:_CHAT]), True, "chat_query")
    for kind, texts in (("corpus", condition_negatives()), ("user", [str(t) for t in negatives])):
        for target, half in zip(sets, _halves(texts, rng), strict=True):
            target.add(half[:_CORPUS], False, kind)
            target.add(_chat(tokenizer, half[:_CHAT]), False, f"{kind}_chat")
    _add_other_tasks(sets, task, template, seed)
    return sets[0], sets[1].without(set(sets[0].texts))  # a text seen in the fit does not validate it


def _fit_direction(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, steps: int = 60) -> torch.Tensor:
    """Logistic regression on ``x`` ``[n, d]`` (standardised here), classes weighted equally; returns the
    direction in ``x``'s own units (an offset is not needed: the threshold is chosen afterwards)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    pos = y.float()
    weights = torch.where(y, 0.5 / pos.sum().clamp_min(1), 0.5 / (1 - pos).sum().clamp_min(1))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (weights * nn.functional.binary_cross_entropy_with_logits(z @ w + b, pos, reduction="none")).sum()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (w.detach() / std).float()


MISS_WEIGHT = 1.0
"""How much a missed task query (false negative) counts against another prompt passed (false positive) when the
threshold is chosen; 1: the balanced error. A larger weight keeps more of the task's own queries at the price of
passing more other prompts (on the embedded model, 3 moved the antonym condition to a layer that passes most chat
prompts: docs/conditional_steering.md)."""


def best_threshold(scores: torch.Tensor, y: torch.Tensor, miss_weight: float = MISS_WEIGHT) -> tuple[float, float]:
    """The threshold with the lowest weighted error ``(miss_weight * FNR + FPR) / (miss_weight + 1)`` on
    ``scores`` (``y``: True for the task's prompts); returns (error, threshold)."""
    values = torch.sort(scores).values
    cuts = torch.cat([values[:1] - 1e-3, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-3])
    passed = scores[None, :] >= cuts[:, None]
    fnr = (~passed & y[None, :]).sum(1) / y.sum().clamp_min(1)
    fpr = (passed & ~y[None, :]).sum(1) / (~y).sum().clamp_min(1)
    error = (miss_weight * fnr + fpr) / (miss_weight + 1)
    best = torch.nonzero(error == error.min()).flatten()
    index = int(best[len(best) // 2])  # the middle of a run of equally good cuts
    return float(error[index]), float(cuts[index])


def _rate(errors: torch.Tensor) -> RateEstimate:
    count, n = int(errors.sum()), int(errors.numel())
    return RateEstimate(errors=count, n=n, interval=wilson_interval(count, n))


def fit_condition(
    train: dict[int, torch.Tensor], valid: dict[int, torch.Tensor], data: tuple[LabelledPrompts, LabelledPrompts]
) -> Condition:
    """Fit a direction per layer on ``train`` hidden states, choose the layer and threshold on ``valid``."""
    y_train, y_valid = (torch.tensor(d.labels, dtype=torch.bool) for d in data)
    if not bool(y_train.any()) or bool(y_train.all()) or not bool(y_valid.any()) or bool(y_valid.all()):
        raise ValueError("learning a condition needs positive and negative prompts in both fitting and validation")
    if not train:
        raise ValueError("no layer to read: a condition needs a layer below the vector's first layer")
    best: tuple[float, int, torch.Tensor, float] = (2.0, -1, torch.zeros(0), 0.0)
    for layer in sorted(train):
        x = train[layer] / train[layer].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        direction = _fit_direction(x, y_train)
        probe = Condition(layer=layer, direction=direction, threshold=0.0)
        error, threshold = best_threshold(probe.score(valid[layer]), y_valid)
        if error < best[0]:
            best = (error, layer, direction, threshold)
    error, layer, direction, threshold = best
    chosen = Condition(layer=layer, direction=direction, threshold=threshold)
    passed = chosen.passes(valid[layer])
    kinds = data[1].kinds
    by_kind = {
        kind: _rate(passed[[i for i, k in enumerate(kinds) if k == kind]])
        for kind in sorted({k for k, label in zip(kinds, data[1].labels, strict=True) if not label})
    }
    return Condition(
        layer=layer,
        direction=direction,
        threshold=threshold,
        false_positive=_rate(passed[~y_valid]),
        false_negative=_rate(~passed[y_valid]),
        false_positive_by_kind=by_kind,
        n_train=(int(y_train.sum()), int((~y_train).sum())),
        rule=(f"logistic regression per layer, layer and threshold by balanced error on validation ({error:.3f})"),
    )


def _states(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: list[int],
    recorded: RecordedStates | None,
    **options: Any,
) -> dict[int, torch.Tensor]:
    """Last-token states of ``texts`` after ``layers``, in their order: those ``recorded`` already holds are read
    from it; the rest run once each, shortest first (batches pad little), up to the highest layer only."""
    found: dict[str, list[torch.Tensor]] = {}
    for text in dict.fromkeys(texts):
        known = recorded.lookup(text, layers) if recorded is not None else None
        if known is not None:
            found[text] = known
    missing = [t for t in dict.fromkeys(texts) if t not in found]
    if missing:
        lengths = {t: len(ids) for t, ids in zip(missing, tokenizer(missing)["input_ids"], strict=True)}
        missing.sort(key=lengths.__getitem__)
        ran = last_token_hidden_states(model, tokenizer, missing, layers, stop=True, **options)
        found.update({t: [ran[at][i] for at in layers] for i, t in enumerate(missing)})
    return {at: torch.stack([found[t][j] for t in texts]) for j, at in enumerate(layers)}


def condition_layers(fv: FunctionVector, layers: int) -> list[int]:
    """The layers a condition for ``fv`` may read, in a model of ``layers`` layers: below the first layer the
    vector touches, and in the first two thirds of the model (where every condition measured so far was chosen;
    the forwards stop there)."""
    return list(range(min(fv.first_layer, math.ceil(_DEPTH * layers))))


def learn_condition(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    fv: FunctionVector,
    *,
    negatives: Sequence[str] = (),
    template: str = DEFAULT_TEMPLATE,
    seed: int = 0,
    batch_size: int = 16,
    arch: ArchSpec | None = None,
    progress: bool = False,
    recorded: RecordedStates | None = None,
) -> Condition:
    """Learn which prompts are queries of ``task`` for ``fv`` (a layer below ``fv.first_layer``).

    Args:
        negatives: more prompts the vector must leave alone (e.g. your application's own traffic).
        recorded: last-token states of the task's zero-shot train prompts that were already run (an
            extraction's); they become the fit's zero-shot positives without running again.

    Raises:
        ValueError: when the vector starts at layer 0 (no layer before it to read) or the task has no
            ``valid`` queries.

    Example:
        >>> fv = dataclasses.replace(fv, condition=learn_condition(model, tok, task, fv))  # doctest: +SKIP
    """
    if fv.first_layer == 0:
        raise ValueError("this vector steers layer 0: a condition needs a layer before it; use a later layer")
    if not task.valid or not task.train:
        raise ValueError(f"task {task.name!r} needs train and valid queries to learn a condition")
    zero_shot = recorded.texts if recorded is not None else None
    data = condition_prompts(task, tokenizer, negatives=negatives, template=template, seed=seed, zero_shot=zero_shot)
    layers = condition_layers(fv, resolve_architecture(model, arch).num_layers)
    run: dict[str, Any] = {"batch_size": batch_size, "arch": arch, "progress": progress}
    states = [_states(model, tokenizer, d.texts, layers, recorded, **run) for d in data]
    condition = fit_condition(states[0], states[1], data)
    logger.info("%s", condition.describe())
    return condition


def with_condition(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    fv: FunctionVector,
    config: ExtractionConfig,
    *,
    arch: ArchSpec | None = None,
    progress: bool = False,
    recorded: RecordedStates | None = None,
) -> FunctionVector:
    """``fv`` with the condition ``config`` asks for (``config.condition``); a vector that cannot have one (it
    steers layer 0, or the task has no validation queries) is returned without, with a warning in the log.
    ``recorded``: see :func:`learn_condition`."""
    if not config.condition:
        return fv
    try:
        condition = learn_condition(
            model,
            tokenizer,
            task,
            fv,
            negatives=config.condition_negatives,
            template=config.template,
            seed=config.seed,
            batch_size=config.batch_size,
            arch=arch,
            progress=progress,
            recorded=recorded,
        )
    except ValueError as exc:
        logger.warning("no condition learned for task %r: %s", task.name, exc)
        return fv
    return dataclasses.replace(fv, condition=condition)
