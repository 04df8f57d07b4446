"""What a vector changes besides its task: other tasks (specificity), general text, and generation quality.

- :func:`specificity`: every task's vector applied to every task's zero-shot and 10-shot prompts; the diagonal is
  the vector's own task, the rest is what it breaks (or does) elsewhere.
- :func:`continuations`, :func:`continuation_perplexity`: greedy continuations and the perplexity of text read
  as a continuation, steered at the positions and with the gate a deployment uses (``fv bench side-effects``);
  :func:`chat_requests` and :func:`as_chat`: the shipped chat requests those are measured on.
- :func:`text_effects`: on the shipped neutral paragraphs (:func:`~fv_plugin.tasks.neutral_texts`), with the
  vector added at every token at each strength: the KL divergence from the plain model's next-token
  distributions, the perplexity of the text, the strength at which perplexity rises by 10%, and the fraction of
  steered continuations of the paragraphs' openings that degenerate into repetition.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch import nn

from fv_plugin.config import EvalConfig
from fv_plugin.devices import input_device
from fv_plugin.mediation import cache_kwarg
from fv_plugin.positions import Positions
from fv_plugin.prompt_sets import eval_prompts
from fv_plugin.prompts import Prompt
from fv_plugin.scoring import VectorArg, score_prompts
from fv_plugin.steering import steer
from fv_plugin.tasks import Task, neutral_texts

__all__ = [
    "Specificity",
    "TextEffects",
    "as_chat",
    "chat_requests",
    "continuation_perplexity",
    "continuations",
    "degenerate",
    "degeneration_rate",
    "rise_strength",
    "specificity",
    "text_effects",
]


def degenerate(token_ids: Sequence[int], *, max_n: int = 4, repeats: int = 3) -> bool:
    """Whether a continuation ends in a repetition loop: its last ``n`` tokens repeated back to back ``repeats``
    times for some ``n <= max_n`` (one token: ``repeats + 1`` times)."""
    ids = list(token_ids)
    for n in range(1, max_n + 1):
        times = repeats + 1 if n == 1 else repeats
        if len(ids) < n * times:
            continue
        unit = ids[-n:]
        if all(ids[len(ids) - (i + 1) * n : len(ids) - i * n] == unit for i in range(times)):
            return True
    return False


@dataclass(frozen=True)
class Specificity:
    """Accuracy of each task's vector (rows) on each task's prompts (columns), per prompt mode.

    ``steered[mode][i][j]``: first-token accuracy on task ``j``'s ``mode`` prompts with task ``i``'s vector;
    ``unsteered[mode][j]``: the same without a vector.
    """

    tasks: tuple[str, ...]
    unsteered: Mapping[str, tuple[float, ...]]
    steered: Mapping[str, tuple[tuple[float, ...], ...]]

    def change(self, mode: str) -> torch.Tensor:
        """``[vectors, tasks]``: steered minus unsteered accuracy."""
        return torch.tensor(self.steered[mode]) - torch.tensor(self.unsteered[mode])[None, :]

    def off_diagonal_change(self, mode: str) -> float:
        """Mean accuracy change on the other tasks' prompts (0 for a perfectly specific set of vectors)."""
        change, n = self.change(mode), len(self.tasks)
        if n < 2:
            return 0.0
        return float((change.sum() - change.diagonal().sum()) / (n * n - n))

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "unsteered": dict(self.unsteered), "steered": dict(self.steered)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Specificity:
        return cls(
            tasks=tuple(data["tasks"]),
            unsteered={mode: tuple(map(float, row)) for mode, row in data["unsteered"].items()},
            steered={mode: tuple(tuple(map(float, r)) for r in rows) for mode, rows in data["steered"].items()},
        )


def specificity(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[Task],
    vectors: Mapping[str, VectorArg],
    *,
    modes: Sequence[str] = ("zero_shot", "icl"),
    config: EvalConfig = EvalConfig(),
) -> Specificity:
    """Every task's vector on every task's prompts (test split, next token; ``config`` sets ``n``, ``n_shots``...).

    Example:
        >>> vectors = {"antonym": fv_a, "country-capital": fv_c}  # doctest: +SKIP
        >>> spec = specificity(model, tok, [antonym, capital], vectors)  # doctest: +SKIP
        >>> spec.change("icl")  # does the antonym vector break country -> capital ICL?  # doctest: +SKIP
    """
    missing = [t.name for t in tasks if t.name not in vectors]
    if missing:
        raise ValueError(f"no vector for the tasks {missing}; give one per task")
    unsteered: dict[str, tuple[float, ...]] = {}
    steered: dict[str, tuple[tuple[float, ...], ...]] = {}
    for mode in modes:
        settings = dataclasses.replace(config, mode=mode)  # type: ignore[arg-type]
        prompts = [eval_prompts(t, settings) for t in tasks]
        unsteered[mode] = tuple(_accuracy(model, tokenizer, p, None, config) for p in prompts)
        steered[mode] = tuple(
            tuple(_accuracy(model, tokenizer, p, vectors[v.name], config) for p in prompts) for v in tasks
        )
    return Specificity(tuple(t.name for t in tasks), unsteered, steered)


def _accuracy(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], vector: VectorArg | None, config: EvalConfig
) -> float:
    given = [vector] if vector is not None else []
    size = config.batch_size
    return score_prompts(model, tokenizer, prompts, given, strength=config.strength, batch_size=size).accuracy


@dataclass(frozen=True)
class TextEffects:
    """A vector's effect on neutral text at each strength (added at every token).

    ``kl``: mean KL divergence (nats) from the plain to the steered next-token distribution over every position;
    ``perplexity``: the paragraphs' perplexity steered (``base_perplexity``: plain); ``degenerate``: fraction of
    steered continuations that end in a repetition loop (``base_degenerate``: plain).
    """

    strengths: tuple[float, ...]
    kl: tuple[float, ...]
    perplexity: tuple[float, ...]
    base_perplexity: float
    degenerate: tuple[float, ...]
    base_degenerate: float
    n_texts: int

    @property
    def perplexity_ratio(self) -> tuple[float, ...]:
        return tuple(p / self.base_perplexity for p in self.perplexity)

    @property
    def rise_10(self) -> float | None:
        """The strength at which perplexity rises by 10% (interpolated; ``None`` if not within the strengths)."""
        return rise_strength(self.strengths, self.perplexity_ratio, 1.1)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "perplexity_ratio": list(self.perplexity_ratio), "rise_10": self.rise_10}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextEffects:
        def floats(name: str) -> tuple[float, ...]:
            return tuple(float(v) for v in data[name])

        return cls(
            strengths=floats("strengths"),
            kl=floats("kl"),
            perplexity=floats("perplexity"),
            base_perplexity=float(data["base_perplexity"]),
            degenerate=floats("degenerate"),
            base_degenerate=float(data["base_degenerate"]),
            n_texts=int(data["n_texts"]),
        )


def rise_strength(strengths: Sequence[float], ratios: Sequence[float], level: float) -> float | None:
    """The smallest strength at which ``ratios`` reaches ``level``, linearly interpolated from strength 0 (ratio
    1); ``None`` when it stays below."""
    points = sorted(zip(strengths, ratios, strict=True))
    last_s, last_r = 0.0, 1.0
    for s, r in points:
        if s <= 0:
            continue
        if r >= level:
            return last_s + (s - last_s) * (level - last_r) / (r - last_r) if r != last_r else s
        last_s, last_r = s, r
    return None


@torch.no_grad()
def _text_scores(model: nn.Module, ids: torch.Tensor, vectors: Sequence[VectorArg], strength: float) -> torch.Tensor:
    """Log-probabilities ``[positions, vocab]`` of one text's next tokens, steered at every token."""
    with steer(model, *vectors, strength=strength, positions="all"):
        logits = model(input_ids=ids.to(input_device(model))).logits[0, :-1]
    return logits.float().log_softmax(-1).cpu()


@torch.no_grad()
def continuations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    vectors: Sequence[VectorArg] = (),
    *,
    strength: float = 1.0,
    new_tokens: int = 24,
    positions: Positions | None = None,
    gate: bool = False,
    batch_size: int = 16,
) -> list[list[int]]:
    """The token ids of each prompt's greedy continuation of exactly ``new_tokens`` tokens, steered by ``vectors``
    at ``positions`` (``None``: the vectors' own, ``fv.positions``; with ``gate``, only the prompts that pass each
    vector's condition); no vectors: plain.

    Prompts are tokenized as ``tokenizer(prompts)`` does (left-padded, in batches of ``batch_size``).
    """
    if new_tokens < 1 or batch_size < 1:
        raise ValueError(f"new_tokens and batch_size must be >= 1, got {new_tokens} and {batch_size}")
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    runs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(
            list(prompts[start : start + batch_size]), return_tensors="pt", padding=True, padding_side="left"
        )
        options = {"strength": strength, "positions": positions, "gate": gate, "tokenizer": tokenizer}
        with steer(model, *vectors, **options):
            out = model.generate(  # type: ignore[operator]
                **{k: v.to(device) for k, v in enc.items()},
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        runs += out[:, enc["input_ids"].shape[1] :].tolist()
    return runs


@torch.no_grad()
def continuation_perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    vectors: Sequence[VectorArg] = (),
    *,
    opening_words: int = 8,
    strength: float = 1.0,
    positions: Positions | None = None,
    gate: bool = False,
) -> float:
    """Perplexity of each text after its first ``opening_words`` words, read as a continuation of that opening:
    the opening is the prompt (one forward), the rest (tokenized on its own, after a space) is fed after it through
    the KV cache as if generated, so ``vectors`` act where they act in generation (``positions``, ``None``: the
    vectors' own; with ``gate``, only if the opening passes). No vectors: the plain model's.
    """
    device = input_device(model)
    nll, count = 0.0, 0
    for text in texts:
        words = text.split()
        opening = tokenizer(" ".join(words[:opening_words]), return_tensors="pt")["input_ids"]
        tail = " " + " ".join(words[opening_words:])
        rest = tokenizer(tail, add_special_tokens=False, return_tensors="pt")["input_ids"] if tail.strip() else None
        if rest is None or rest.shape[1] == 0:
            continue
        options = {"strength": strength, "positions": positions, "gate": gate, "tokenizer": tokenizer}
        with steer(model, *vectors, **options):
            first = model(input_ids=opening.to(device), use_cache=True)
            mask = torch.ones(1, opening.shape[1] + rest.shape[1], dtype=torch.long, device=device)
            cache = {cache_kwarg(model): getattr(first, "cache", None) or first.past_key_values}
            second = model(input_ids=rest.to(device), attention_mask=mask, **cache)
        logits = torch.cat([first.logits[0, -1:], second.logits[0, :-1]]).float().log_softmax(-1).cpu()
        nll -= float(logits[torch.arange(rest.shape[1]), rest[0]].sum())
        count += int(rest.shape[1])
    if count == 0:
        raise ValueError("continuation_perplexity needs texts longer than their opening")
    return math.exp(nll / count)


def chat_requests() -> list[str]:
    """Everyday chat requests shipped with the package (``fv_plugin/data/chat_requests.txt``), written for
    measuring side effects: no task's query among them, and not used to learn any condition."""
    text = resources.files("fv_plugin").joinpath("data", "chat_requests.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def as_chat(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """Each text as one user message through the tokenizer's chat template, ready for the assistant's reply.

    Raises:
        ValueError: when the tokenizer has no chat template.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template; give the prompts as plain text instead")
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]


def text_effects(
    model: nn.Module,
    tokenizer: Any,
    vectors: Sequence[VectorArg],
    strengths: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    *,
    texts: Sequence[str] | None = None,
    opening_words: int = 8,
    new_tokens: int = 24,
) -> TextEffects:
    """KL, perplexity and degeneration of neutral text with ``vectors`` at each strength (see the module).

    Args:
        texts: paragraphs (default: the shipped neutral paragraphs).
        opening_words: each paragraph's first words are the prompt of a greedy continuation of ``new_tokens``
            tokens, steered at the last prompt token and every generated token.

    Example:
        >>> effects = text_effects(model, tok, [fv], strengths=[1, 2, 4])  # doctest: +SKIP
        >>> effects.perplexity_ratio, effects.rise_10, effects.degenerate  # doctest: +SKIP
    """
    paragraphs = list(texts) if texts is not None else neutral_texts()
    if not paragraphs or not strengths:
        raise ValueError("text_effects needs at least one text and one strength")
    nll, kl, count = torch.zeros(len(strengths) + 1), torch.zeros(len(strengths)), 0
    for text in paragraphs:  # one paragraph's distributions at a time: a large vocabulary stays affordable
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        target = ids[0, 1:]
        plain = _text_scores(model, ids, (), 0.0)
        nll[0] -= plain[torch.arange(len(target)), target].sum()
        for i, strength in enumerate(strengths, start=1):
            steered = _text_scores(model, ids, vectors, strength)
            nll[i] -= steered[torch.arange(len(target)), target].sum()
            kl[i - 1] += (steered.exp() * (steered - plain)).sum()
        count += len(target)
    openings = [" ".join(t.split()[:opening_words]) for t in paragraphs]
    degenerates = [
        degeneration_rate(
            continuations(model, tokenizer, openings, vectors if s else (), strength=s, new_tokens=new_tokens)
        )
        for s in (0.0, *strengths)
    ]
    ppl = (nll / count).exp().tolist()
    return TextEffects(
        strengths=tuple(float(s) for s in strengths),
        kl=tuple((kl / count).tolist()),
        perplexity=tuple(ppl[1:]),
        base_perplexity=ppl[0],
        degenerate=tuple(degenerates[1:]),
        base_degenerate=degenerates[0],
        n_texts=len(paragraphs),
    )


def degeneration_rate(runs: Sequence[Sequence[int]]) -> float:
    """The fraction of ``runs`` (token ids of continuations) that end in a repetition loop (:func:`degenerate`)."""
    return sum(degenerate(run) for run in runs) / len(runs)
