"""Choosing among many candidate vectors on validation prompts, cheaply.

:func:`score_candidates` scores every candidate (a list of vectors, as :func:`~fv_plugin.steer` takes them)
on zero-shot prompts steered at their final token. Each prompt's prefix runs once; its last token is re-run
(:class:`~fv_plugin.mediation.LastTokenReplay`) from the lowest layer any candidate of a batch touches, one batch
row per candidate, with the library's own steering hooks doing the steering. The result equals
:func:`~fv_plugin.score_prompts` per candidate (the tests check it), at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fv_plugin.architectures import ArchSpec, resolve_architecture
from fv_plugin.devices import input_device
from fv_plugin.mediation import LastTokenReplay, cache_kwarg
from fv_plugin.prompts import Prompt, encode_prompts
from fv_plugin.request import steering_context
from fv_plugin.scoring import PromptScores, VectorArg, correct_first_token

__all__ = ["score_candidates"]


def _lowest_layer(vectors: Sequence[VectorArg]) -> int:
    layers = []
    for item in vectors:
        fv = item[0] if isinstance(item, tuple) else item
        layers += [h[0] for h in fv.heads or ()] if fv.is_head_patch else list(fv.layers)
    return min(layers) if layers else 0


class _Rows:
    """Steers ``rows`` of one forward, each with its own candidate's vectors, at the last token."""

    def __init__(self, model: nn.Module, candidates: Sequence[Sequence[VectorArg]], arch: ArchSpec | None) -> None:
        self.model, self.candidates, self.arch = model, candidates, arch

    def probs(self, prompt: Prompt, tokenizer: Any, replay: LastTokenReplay | None) -> torch.Tensor:
        """``[candidates, vocab]`` next-token probabilities of ``prompt`` under each candidate."""
        rows = len(self.candidates)
        at = (rows, replay.length - 1) if replay is not None else None
        context = steering_context(self.model, rows=self.candidates, positions="last_prompt", arch=self.arch, replay=at)
        with torch.no_grad(), context:
            if replay is not None:
                start = min(_lowest_layer(c) for c in self.candidates)
                logits = replay.logits(start, rows)
            else:
                enc = encode_prompts(tokenizer, [prompt] * rows)
                device = input_device(self.model)
                out = self.model(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device))
                logits = out.logits[:, -1]
        return logits.float().softmax(-1).cpu()


def score_candidates(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    candidates: Sequence[Sequence[VectorArg]],
    *,
    rows_per_batch: int = 64,
    arch: ArchSpec | None = None,
) -> list[PromptScores]:
    """First-token accuracy and mean answer probability of every candidate on ``prompts`` (steered at the final
    prompt token, as :func:`~fv_plugin.score_prompts`).

    Args:
        candidates: each one a list of :class:`~fv_plugin.FunctionVector` or ``(vector, weight)`` pairs; the
            weight carries the candidate's strength.
        rows_per_batch: candidates re-run together (one batch row each).
    """
    if not prompts or not candidates:
        raise ValueError("score_candidates needs prompts and candidates")
    resolved = resolve_architecture(model, arch)
    order = sorted(range(len(candidates)), key=lambda i: _lowest_layer(candidates[i]))
    correct, prob = torch.zeros(len(candidates)), torch.zeros(len(candidates))
    for prompt in prompts:
        enc = encode_prompts(tokenizer, [prompt])
        ids = enc.input_ids.to(input_device(model))
        answer, accepted = int(enc.answer_ids[0]), enc.answer_tokens[0]
        with torch.no_grad():
            replay = LastTokenReplay(model, resolved, ids, cache_kwarg(model)) if ids.shape[1] > 1 else None
        usable = replay if replay is not None and replay.usable else None
        for start in range(0, len(order), rows_per_batch):
            chunk = order[start : start + rows_per_batch]
            probs = _Rows(model, [candidates[i] for i in chunk], arch).probs(prompt, tokenizer, usable)
            top = probs.argmax(-1)
            for row, index in enumerate(chunk):
                correct[index] += float(correct_first_token(int(top[row]), accepted))
                prob[index] += float(probs[row, answer])
    n = len(prompts)
    return [PromptScores(float(c) / n, float(p) / n) for c, p in zip(correct, prob, strict=True)]
