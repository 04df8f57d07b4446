"""Choosing among many candidate vectors on validation prompts, cheaply.

:func:`score_candidates` scores every candidate (a list of vectors, as :func:`~fv_plugin.steer` takes them)
on zero-shot prompts steered at their final token, by the first token. The prefixes of many prompts run once,
together; their last token is re-run (:class:`~fv_plugin.replay.LastTokenReplay`) from the layer the candidates
of a batch start at, one batch row per (prompt, candidate), with the library's own steering hooks doing the
steering. The result equals :func:`~fv_plugin.score_prompts` per candidate (the tests check it), at a fraction of
the cost.

:func:`score_answers` scores candidates on the answer a user reads: the exact match of the greedy answer
(:func:`~fv_plugin.scoring.starts_with_answer`, alternatives accepted), with the vectors added where
:func:`~fv_plugin.steer` adds them by default (``positions="generated"``: the final prompt token and every generated
token). The prefixes before the final tokens run once, together, unsteered (no candidate touches them); their KV
cache is copied into one batch row per (prompt, candidate), and only the answers' tokens run: at most the longest
accepted answer's token count plus one (the budget :func:`~fv_plugin.evaluate` gives), and a row stops as soon as
its verdict is settled (:func:`~fv_plugin.scoring.answer_settled`: the answer is followed by a newline or another
non-word character, or the text can no longer become an accepted answer) or it ends the sequence. The result equals
``steer`` + ``generate`` per prompt and candidate (the tests check it).

What else a candidate changes is scored by :func:`fv_plugin.neutral_text.neutral_kl` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fv_plugin.answer_span import end_of_sequence_ids
from fv_plugin.architectures import ArchSpec, resolve_architecture
from fv_plugin.devices import input_device
from fv_plugin.neutral_text import neutral_kl
from fv_plugin.positions import position_sets
from fv_plugin.progress import stage
from fv_plugin.prompts import EncodedPrompts, Prompt, by_length, encode_prompts
from fv_plugin.replay import LastTokenReplay, cache_kwarg, cache_rows, mask_inputs
from fv_plugin.request import steering_context
from fv_plugin.scoring import (
    PromptScores,
    VectorArg,
    answer_settled,
    correct_first_token,
    last_logits_only,
    starts_with_answer,
)

__all__ = ["AnswerScores", "neutral_kl", "score_answers", "score_candidates"]


def _lowest_layer(vectors: Sequence[VectorArg]) -> int:
    layers = []
    for item in vectors:
        fv = item[0] if isinstance(item, tuple) else item
        layers += [h[0] for h in fv.heads or ()] if fv.is_head_patch else list(fv.layers)
    return min(layers) if layers else 0


def _start_groups(candidates: Sequence[Sequence[VectorArg]], per_group: int) -> list[tuple[int, list[int]]]:
    """The candidates by the lowest layer they touch: ``(start layer, candidate indices)``, at most ``per_group``
    candidates each."""
    by_start: dict[int, list[int]] = {}
    for i, candidate in enumerate(candidates):
        by_start.setdefault(_lowest_layer(candidate), []).append(i)
    return [
        (start, chunk[j : j + per_group])
        for start, chunk in sorted(by_start.items())
        for j in range(0, len(chunk), per_group)
    ]


def _steered_probs(
    model: nn.Module,
    enc: EncodedPrompts,
    replay: LastTokenReplay | None,
    start: int,
    rows: Sequence[Sequence[VectorArg]],
    index: torch.Tensor,
    arch: ArchSpec | None,
) -> torch.Tensor:
    """``[rows, vocab]`` next-token probabilities of prompt ``index[r]`` steered by ``rows[r]`` at its final token."""
    length = int(enc.input_ids.shape[1])
    at = (len(rows), length - 1) if replay is not None else None
    context = steering_context(model, rows=rows, positions="last_prompt", arch=arch, replay=at)
    with torch.no_grad(), context:
        if replay is None:  # one-token prompts: nothing to cache
            device = input_device(model)
            ids, mask = enc.input_ids.index_select(0, index), enc.attention_mask.index_select(0, index)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1]
        elif replay.usable:
            logits = replay.logits(start, index)
        else:  # replaying layers does not reproduce this model: the whole last token runs again
            logits = replay.full_logits(index)
    return logits.float().softmax(-1).cpu()


def _check_sizes(rows_per_batch: int, prompts_per_batch: int) -> None:
    if rows_per_batch < 1 or prompts_per_batch < 1:
        raise ValueError(
            f"rows_per_batch and prompts_per_batch must be >= 1, got {rows_per_batch} and {prompts_per_batch}"
        )


def score_candidates(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    candidates: Sequence[Sequence[VectorArg]],
    *,
    rows_per_batch: int = 256,
    prompts_per_batch: int = 64,
    arch: ArchSpec | None = None,
    name: str = "candidates",
    progress: bool | None = None,
) -> list[PromptScores]:
    """First-token accuracy and mean answer probability of every candidate on ``prompts`` (steered at the final
    prompt token, as :func:`~fv_plugin.score_prompts`).

    The prefixes of ``prompts_per_batch`` prompts run once, together; then the candidates that start at the same
    layer re-run the final token from that layer on, one batch row per (prompt, candidate), at most
    ``rows_per_batch`` rows per forward (at least one candidate's).

    Args:
        candidates: each one a list of :class:`~fv_plugin.FunctionVector` or ``(vector, weight)`` pairs; the
            weight carries the candidate's strength.
        name, progress: the progress bar's name, and whether to show it (see :func:`fv_plugin.progress.stage`).
    """
    if not prompts or not candidates:
        raise ValueError("score_candidates needs prompts and candidates")
    _check_sizes(rows_per_batch, prompts_per_batch)
    resolved, device = resolve_architecture(model, arch), input_device(model)
    correct, prob = torch.zeros(len(candidates)), torch.zeros(len(candidates))
    label = f"{name} ({len(candidates)} x {len(prompts)} queries)"
    with stage(label, len(prompts), unit="query", progress=progress) as bar:
        order = by_length(tokenizer, prompts)  # batches of similar lengths pad little; the scores are sums
        for first in range(0, len(prompts), prompts_per_batch):
            group = [prompts[i] for i in order[first : first + prompts_per_batch]]
            enc = encode_prompts(tokenizer, group)
            replay = None
            if enc.input_ids.shape[1] > 1:
                with torch.no_grad():
                    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
                    replay = LastTokenReplay(model, resolved, ids, cache_kwarg(model), mask)
            n = len(group)
            for start, chunk in _start_groups(candidates, max(1, rows_per_batch // n)):
                index = torch.arange(n).repeat(len(chunk))  # row c * n + p: candidate chunk[c], prompt p
                rows = [candidates[i] for i in chunk for _ in range(n)]
                probs = _steered_probs(model, enc, replay, start, rows, index, arch)
                top = probs.argmax(-1).tolist()
                answer = probs[torch.arange(len(index)), enc.answer_ids[index]].tolist()
                for row, p in enumerate(index.tolist()):
                    c = chunk[row // n]
                    correct[c] += float(correct_first_token(top[row], enc.answer_tokens[p]))
                    prob[c] += answer[row]
            bar.update(n)
    total = len(prompts)
    return [PromptScores(float(c) / total, float(p) / total) for c, p in zip(correct, prob, strict=True)]


@dataclass(frozen=True)
class AnswerScores:
    """One candidate on a set of prompts: first-token ``accuracy``, mean ``answer_prob`` of the main answer's first
    token, and ``exact_match`` of the greedy answer."""

    accuracy: float
    answer_prob: float
    exact_match: float


@dataclass
class _Group:
    """Prompts decoded together: their left-padded tokens, their prefixes' KV cache, answers and token budgets."""

    prompts: Sequence[Prompt]
    enc: EncodedPrompts
    cache: Any  # the prefixes (all but each prompt's final token); None for one-token prompts
    budgets: list[int]  # per prompt: the longest accepted answer's tokens plus one


def _prepare(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt]) -> _Group:
    enc = encode_prompts(tokenizer, prompts)
    device = input_device(model)
    cache = None
    if enc.input_ids.shape[1] > 1:
        mask = enc.attention_mask[:, :-1].to(device)
        out = model(
            input_ids=enc.input_ids[:, :-1].to(device),
            use_cache=True,
            **mask_inputs(model, mask),
            **last_logits_only(model),
        )
        cache = getattr(out, "cache", None) or out.past_key_values
    return _Group(prompts, enc, cache, [max(len(a) for a in accepted) + 1 for accepted in enc.answer_tokens])


def _step(
    model: nn.Module,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    cache: Any,
    rows: Sequence[Sequence[VectorArg]] | None,
    arch: Any,
) -> Any:
    """One forward of ``tokens`` ``[rows, 1]`` on ``cache``, each row steered by its candidate at every new token
    (``rows=None``: unsteered)."""
    kwargs = {cache_kwarg(model): cache} if cache is not None else {}
    if rows is None:
        return model(input_ids=tokens, use_cache=True, **mask_inputs(model, mask, 1), **kwargs)
    with steering_context(model, rows=rows, positions="generated", arch=arch):
        return model(input_ids=tokens, use_cache=True, **mask_inputs(model, mask, 1), **kwargs)


def _decode(
    model: nn.Module,
    tokenizer: Any,
    group: _Group,
    rows: Sequence[Sequence[VectorArg]],
    index: torch.Tensor,
    arch: Any,
    ends: set[int],
    modes: Sequence[bool] = (True,),
    prefix: Any = None,
) -> tuple[list[bool], list[float], list[bool]]:
    """Greedy answers of row ``r``'s candidate ``rows[r]`` to prompt ``index[r]`` of the group (on the rows' own
    ``prefix`` cache if given), once per mode: steered at the last prompt token and, if the mode is ``True``, at
    every generated token. Returns per row the first token's verdict and the answer's probability (the first step
    is shared), and per (mode, row), mode-major, the exact match; later modes fork after the first step."""
    device, enc, n = input_device(model), group.enc, len(rows)
    steps = max(group.budgets[p] for p in set(index.tolist()))
    cache = prefix if prefix is not None or group.cache is None else cache_rows(group.cache, index.to(device))
    tokens, mask = enc.input_ids[index, -1:].to(device), enc.attention_mask[index].to(device)
    alive, prompt_of = list(range(n)), index.tolist()  # tracks: mode * n + row
    generated: list[list[int]] = [[] for _ in range(n * len(modes))]
    first, probs = [], []
    for step in range(steps):
        steered = [rows[t % n] if step == 0 or modes[t // n] else [] for t in alive]
        out = _step(model, tokens, mask, cache, steered if any(steered) else None, arch)
        logits = out.logits[:, -1].float()
        chosen = logits.argmax(-1).tolist()
        if step == 0:
            first = [correct_first_token(t, enc.answer_tokens[p]) for t, p in zip(chosen, prompt_of, strict=True)]
            answer = enc.answer_ids[index].to(logits.device)
            probs = logits.softmax(-1)[torch.arange(n, device=logits.device), answer].tolist()
        keep: list[int] = []  # rows of this forward that go on, as the tracks in `going`
        going: list[int] = []
        for j, track in enumerate(alive):
            generated[track].append(chosen[j])
            p = prompt_of[track % n]
            text = tokenizer.decode(generated[track], skip_special_tokens=True)
            settled = chosen[j] in ends or answer_settled(text, group.prompts[p].answers)
            if not settled and len(generated[track]) < group.budgets[p]:
                keep.append(j)
                going.append(track)
        if step == 0:  # the other modes fork here: the same first token, then their own steering
            base = list(zip(keep, going, strict=True))
            for m in range(1, len(modes)):
                for track in range(n):
                    generated[m * n + track] = list(generated[track])
                keep += [j for j, _ in base]
                going += [m * n + track for _, track in base]
        if not going:
            break
        cache = getattr(out, "cache", None) or out.past_key_values
        kept = torch.tensor(keep, device=device)
        if keep != list(range(len(alive))):
            cache.batch_select_indices(kept)
        mask = torch.cat([mask.index_select(0, kept), torch.ones(len(keep), 1, dtype=mask.dtype, device=device)], 1)
        alive = going
        tokens = torch.tensor([[chosen[j]] for j in keep], device=device)
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    exact = [starts_with_answer(t, group.prompts[prompt_of[i % n]].answers) for i, t in enumerate(texts)]
    return first, probs, exact


def _sums(found: tuple[list[bool], list[float], list[bool]], modes: int, candidates: int, n: int) -> torch.Tensor:
    """``[modes, 3, candidates]`` sums over a chunk's ``n`` prompts of :func:`_decode`'s first-token verdicts,
    answer probabilities (shared by the modes) and exact matches."""
    first, probs, exact = found
    shared = torch.tensor([first, probs], dtype=torch.float64).view(2, candidates, n).sum(-1)
    matched = torch.tensor(exact, dtype=torch.float64).view(modes, candidates, n).sum(-1)
    return torch.cat([shared.expand(modes, 2, candidates), matched[:, None]], dim=1)


def _steered_prefix(
    model: nn.Module, group: _Group, rows: Sequence[Sequence[VectorArg]], index: torch.Tensor, arch: Any
) -> Any:
    """The prefix of prompt ``index[r]`` with ``rows[r]`` added at every token (``positions="all"``): a cache row
    per (prompt, candidate), which steering every token needs (``None`` for one-token prompts)."""
    if group.cache is None:
        return None
    device = input_device(model)
    ids, mask = group.enc.input_ids[index, :-1].to(device), group.enc.attention_mask[index, :-1].to(device)
    with steering_context(model, rows=rows, positions="all", arch=arch):
        out = model(input_ids=ids, use_cache=True, **mask_inputs(model, mask), **last_logits_only(model))
    return getattr(out, "cache", None) or out.past_key_values


@torch.no_grad()
def score_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    candidates: Sequence[Sequence[VectorArg]],
    *,
    rows_per_batch: int = 256,
    prompts_per_batch: int = 64,
    arch: ArchSpec | None = None,
    name: str = "answers",
    progress: bool | None = None,
    positions: str | Sequence[str] = "generated",
) -> list[AnswerScores]:
    """First-token accuracy, answer probability and exact match of the greedy answer of every candidate on
    ``prompts`` (see the module), steered at ``positions``: ``"generated"`` (the last prompt token and every
    generated one), ``"last_prompt"`` (that token only) or ``"all"`` (every token, prompt included, as a
    llama.cpp control vector is added), or several of them: then one score per (positions, candidate),
    positions-major, and every answer's first step runs once for ``"generated"`` and ``"last_prompt"`` (it is the
    same). ``"all"`` steers each candidate's prefix too, so its prefixes run once per candidate. An empty
    candidate (``[]``) is the model without a vector.

    The prefixes of ``prompts_per_batch`` prompts run once, together; their answers are then decoded for many
    candidates at once, one batch row per (prompt, candidate), at most ``rows_per_batch`` rows (at least one
    candidate's) per first step.

    Args:
        candidates: each one a list of :class:`~fv_plugin.FunctionVector` or ``(vector, weight)`` pairs.
        name, progress: the progress bar's name, and whether to show it (see :func:`fv_plugin.progress.stage`).
    """
    if not prompts or not candidates:
        raise ValueError("score_answers needs prompts and candidates")
    _check_sizes(rows_per_batch, prompts_per_batch)
    names, shared, modes = position_sets(positions)
    every = "all" in names
    ends = set(end_of_sequence_ids(tokenizer, model))
    totals = torch.zeros(len(names), 3, len(candidates), dtype=torch.float64)
    order = by_length(tokenizer, prompts)  # batches of similar lengths pad little; the scores are sums
    sets = f", {len(names)} position sets" if len(names) > 1 else ""
    label = f"{name} ({len(candidates)} x {len(prompts)} queries{sets})"
    with stage(label, len(prompts), progress=progress) as bar:
        for start in range(0, len(prompts), prompts_per_batch):
            group = _prepare(model, tokenizer, [prompts[i] for i in order[start : start + prompts_per_batch]])
            n = len(group.prompts)
            per_chunk = max(1, rows_per_batch // n)
            for c0 in range(0, len(candidates), per_chunk):
                chunk = range(c0, min(c0 + per_chunk, len(candidates)))
                index = torch.arange(n).repeat(len(chunk))  # row c * n + p: candidate chunk[c], prompt p
                rows = [candidates[c] for c in chunk for _ in range(n)]
                if modes:
                    found = _decode(model, tokenizer, group, rows, index, arch, ends, modes)
                    totals[shared, :, chunk.start : chunk.stop] += _sums(found, len(modes), len(chunk), n)
                if every:
                    prefix = _steered_prefix(model, group, rows, index, arch)
                    found = _decode(model, tokenizer, group, rows, index, arch, ends, (True,), prefix)
                    totals[names.index("all"), :, chunk.start : chunk.stop] += _sums(found, 1, len(chunk), n)[0]
            bar.update(n)
    mean = (totals / len(prompts)).tolist()  # [positions][first token, probability, exact match][candidate]
    return [AnswerScores(a, p, e) for per_mode in mean for a, p, e in zip(*per_mode, strict=True)]
