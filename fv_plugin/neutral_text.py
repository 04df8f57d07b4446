"""What else a candidate vector changes, cheaply: the KL divergence of a few neutral paragraphs' next-token
distributions from the plain model's, with the candidate added where it would steer (``method="auto"``'s side
effect, :mod:`fv_plugin.auto`)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fv_plugin.architectures import ArchSpec
from fv_plugin.devices import input_device
from fv_plugin.positions import position_sets
from fv_plugin.progress import stage
from fv_plugin.replay import cache_kwarg
from fv_plugin.request import steering_context
from fv_plugin.scoring import VectorArg, kl_divergence, last_logits_only
from fv_plugin.tasks import neutral_texts

__all__ = ["neutral_kl"]


def _neutral_ids(tokenizer: Any, texts: Sequence[str], width: int) -> torch.Tensor:
    rows = [tokenizer(t)["input_ids"][:width] for t in texts]
    short = [t[:40] for t, row in zip(texts, rows, strict=True) if len(row) < width]
    if short:
        raise ValueError(f"neutral texts need at least {width} tokens each; too short: {short}")
    return torch.tensor(rows, dtype=torch.long)


def _continued(
    model: nn.Module, tokens: torch.Tensor, cache: Any, rows: list[Any], modes: Sequence[bool], arch: Any
) -> list[torch.Tensor]:
    """Next-token logits of ``tokens`` on ``cache`` per mode: the first token steered by ``rows``, the rest steered
    too (``True``) or plain (``False``); the first token runs once for every mode."""
    key = cache_kwarg(model)
    with steering_context(model, rows=rows, positions="generated", arch=arch):
        first = model(input_ids=tokens[:, :1], use_cache=True, **{key: cache}).logits
    if tokens.shape[1] == 1:
        return [first for _ in modes]
    found = []
    for m, every_token in enumerate(modes):
        mine = cache if m == len(modes) - 1 else copy.deepcopy(cache)
        steered = steering_context(model, rows=rows, positions="generated", arch=arch) if every_token else None
        with steered or contextlib.nullcontext():
            rest = model(input_ids=tokens[:, 1:], use_cache=True, **{key: mine}).logits
        found.append(torch.cat([first, rest], 1))
    return found


def _steered_prefix(model: nn.Module, prefix_ids: torch.Tensor, rows: list[Any], repeat: int, arch: Any) -> Any:
    """The paragraphs' prefixes, each repeated ``repeat`` times (row ``t * repeat + c``), with row ``r``'s
    candidate ``rows[r]`` added at every token (``positions="all"``)."""
    with steering_context(model, rows=rows, positions="all", arch=arch):
        out = model(input_ids=prefix_ids.repeat_interleave(repeat, dim=0), use_cache=True, **last_logits_only(model))
    return getattr(out, "cache", None) or out.past_key_values


@torch.no_grad()
def neutral_kl(
    model: nn.Module,
    tokenizer: Any,
    candidates: Sequence[Sequence[VectorArg]],
    *,
    texts: Sequence[str] | None = None,
    prompt_tokens: int = 12,
    steered_tokens: int = 4,
    rows_per_batch: int = 16,
    arch: ArchSpec | None = None,
    progress: bool | None = None,
    positions: str | Sequence[str] = "generated",
) -> list[float]:
    """Per candidate: the mean KL divergence (nats) from the plain model's next-token distribution to the steered
    one, over neutral paragraphs, steered at ``positions`` (as in :func:`~fv_plugin.selection.score_answers`; for
    several, one value per (positions, candidate), positions-major).

    Each paragraph's first ``prompt_tokens`` tokens are a prompt and its next ``steered_tokens`` tokens stand in
    for generated ones: the candidate is added at the prompt's last token and (``"generated"``) at each of them, or
    (``"all"``) at every token, the prompt's included, and the KL is averaged over those ``steered_tokens + 1``
    positions and the paragraphs. The paragraphs' common prefix runs once, unsteered (for ``"all"``: once per
    candidate, steered); each batch of candidates then runs only the steered tokens, one batch row per paragraph
    and candidate, the prompt's last token once for ``"generated"`` and ``"last_prompt"``. An empty candidate
    scores 0.

    Args:
        texts: paragraphs of at least ``prompt_tokens + steered_tokens`` tokens (default: the first four shipped
            neutral paragraphs, :func:`~fv_plugin.tasks.neutral_texts`).
    """
    if not candidates or prompt_tokens < 2 or steered_tokens < 0:
        raise ValueError("neutral_kl needs candidates, prompt_tokens >= 2 and steered_tokens >= 0")
    names, shared, modes = position_sets(positions)
    paragraphs = list(texts) if texts is not None else neutral_texts()[:4]
    ids = _neutral_ids(tokenizer, paragraphs, prompt_tokens + steered_tokens).to(input_device(model))
    found = torch.zeros(len(names), len(candidates), dtype=torch.float64)
    sets = f", {len(names)} position sets" if len(names) > 1 else ""
    label = f"side effects ({len(candidates)} x {len(paragraphs)} texts{sets})"
    with stage(label, len(candidates), progress=progress) as bar:
        prefix_out = model(input_ids=ids[:, : prompt_tokens - 1], use_cache=True, **last_logits_only(model))
        prefix = getattr(prefix_out, "cache", None) or prefix_out.past_key_values
        chunk, n, key = ids[:, prompt_tokens - 1 :], ids.shape[0], cache_kwarg(model)
        plain = model(input_ids=chunk, use_cache=True, **{key: copy.deepcopy(prefix)}).logits.float().softmax(-1)
        for start in range(0, len(candidates), rows_per_batch):
            group = candidates[start : start + rows_per_batch]
            rows = [group[c] for _ in range(n) for c in range(len(group))]  # row t * len(group) + c
            tokens = chunk.repeat_interleave(len(group), dim=0)
            runs = []
            if modes:  # paragraph t, candidate c: the shared prefix, repeated
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(group))
                runs = list(zip(shared, _continued(model, tokens, cache, rows, modes, arch), strict=True))
            if "all" in names:
                steered_prefix = _steered_prefix(model, ids[:, : prompt_tokens - 1], rows, len(group), arch)
                runs += [(names.index("all"), _continued(model, tokens, steered_prefix, rows, [True], arch)[0])]
            for m, logits in runs:
                steered = logits.float().softmax(-1).view(n, len(group), *plain.shape[1:])
                kl = kl_divergence(steered, plain[:, None]).mean(dim=(0, 2)).clamp_min(0.0)
                found[m, start : start + len(group)] = kl.double().cpu()
            bar.update(len(group))
    return found.flatten().tolist()
