"""Absolute token positions of a forward pass, and which of them a steering mode touches.

Positions are indices into the padded sequence (``attention_mask`` columns), so they stay right across
KV-cached generation steps and for left- or right-padded batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fv_plugin.config import VECTOR_POSITIONS

__all__ = [
    "POSITION_MODES",
    "VECTOR_POSITIONS",
    "ForwardInfo",
    "Positions",
    "PromptInfo",
    "answer_ended",
    "forward_info",
    "position_mask",
    "position_modes",
    "position_sets",
    "steers_generated",
    "vector_positions",
]

Positions = Literal["last_prompt", "generated", "all", "answer"]
POSITION_MODES: tuple[str, ...] = ("last_prompt", "generated", "all", "answer")


def steers_generated(positions: str) -> bool:
    """Whether ``positions`` that leave the prompt before its last token unsteered steer every generated token
    (``"generated"``) or the last prompt token only (``"last_prompt"``); anything else (``"all"`` steers the
    prompt too) is refused."""
    if positions not in ("generated", "last_prompt"):
        raise ValueError(
            f"expected 'generated' or 'last_prompt' (an unsteered prompt before its last token), got {positions!r}"
        )
    return positions == "generated"


def position_sets(positions: str | Sequence[str]) -> tuple[list[str], list[int], list[bool]]:
    """``positions`` as a list of distinct position sets; the indices of those that leave the prompt before its
    last token unsteered (``"generated"``, ``"last_prompt"``: they can share one unsteered prefix); and their
    :func:`position_modes`. ``"all"`` steers the prompt too, so it needs prefixes of its own."""
    names = [positions] if isinstance(positions, str) else list(positions)
    if not names or len(set(names)) < len(names):
        raise ValueError(f"positions must name one or more distinct position sets, got {positions!r}")
    shared = [m for m, name in enumerate(names) if name != "all"]
    return names, shared, position_modes([names[m] for m in shared]) if shared else []


def position_modes(positions: str | Sequence[str]) -> list[bool]:
    """One :func:`steers_generated` flag per position set of ``positions`` (one set, or several)."""
    modes = [steers_generated(p) for p in ([positions] if isinstance(positions, str) else positions)]
    if not modes:
        raise ValueError("at least one position set is needed")
    return modes


def vector_positions(fv: Any) -> str:
    """A vector's own positions: ``fv.positions`` (which ``method="auto"`` chooses), or ``"generated"`` (the
    paper's setting) for a vector without one."""
    return getattr(fv, "positions", None) or "generated"


@dataclass(frozen=True)
class ForwardInfo:
    """One forward pass: ``length`` new tokens after ``past`` cached ones, for ``batch`` rows.

    ``mask`` is the 2-D attention mask over all ``past + length`` positions, or ``None``; ``ids`` the new tokens
    ``[batch, length]`` when the forward was given token ids (not embeddings).
    """

    batch: int
    length: int
    past: int
    mask: torch.Tensor | None
    ids: torch.Tensor | None = None

    def positions(self, device: torch.device) -> torch.Tensor:
        """Absolute positions of the new tokens, shape ``[length]``."""
        return torch.arange(self.past, self.past + self.length, device=device)

    def real(self, device: torch.device) -> torch.Tensor:
        """Which new tokens are real (not padding), shape ``[batch, length]``."""
        if self.mask is None:
            return torch.ones(self.batch, self.length, dtype=torch.bool, device=device)
        return self.mask[:, self.past : self.past + self.length].to(device=device).bool()


@dataclass(frozen=True)
class PromptInfo:
    """The prompt of the current call: its padded ``length`` and each row's final real token ``last`` [batch]."""

    length: int
    last: torch.Tensor

    @classmethod
    def from_forward(cls, info: ForwardInfo) -> PromptInfo:
        total = info.past + info.length
        if info.mask is None:
            last = torch.full((info.batch,), total - 1, dtype=torch.long)
        else:
            idx = torch.arange(total, device=info.mask.device)
            last = torch.where(info.mask.bool(), idx, torch.full_like(idx, -1)).amax(dim=1).cpu()
        return cls(length=total, last=last)


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    get_len = getattr(cache, "get_seq_length", None)
    if callable(get_len):
        return int(get_len())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        return int(cache[0][0].shape[-2])  # legacy tuple-of-tuples cache: [batch, heads, seq, head_dim]
    return 0


def forward_info(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> ForwardInfo:
    """Read batch, new length, past length and 2-D mask from the arguments of a base-model forward."""
    tokens = kwargs.get("input_ids")
    if tokens is None and args and isinstance(args[0], torch.Tensor):
        tokens = args[0]
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        raise ValueError("fv_plugin could not find `input_ids` or `inputs_embeds` of shape [batch, seq] in the call")
    batch, length = int(tokens.shape[0]), int(tokens.shape[1])
    ids = tokens if tokens.dim() == 2 and not tokens.is_floating_point() else None
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= length:
        return ForwardInfo(batch=batch, length=length, past=int(mask.shape[1]) - length, mask=mask, ids=ids)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return ForwardInfo(batch=batch, length=length, past=_cache_length(cache), mask=None, ids=ids)


def answer_ended(
    info: ForwardInfo, prompt: PromptInfo, ends: torch.Tensor, before: torch.Tensor | None
) -> torch.Tensor:
    """Whether each new token is at or after its row's first generated end token (a token in ``ends``: a newline
    or an end of sequence), ``[batch, length]`` bool; ``before``: the same for the tokens before this forward.

    Raises:
        ValueError: when the forward was given embeddings instead of token ids.
    """
    if info.ids is None:
        raise ValueError("positions='answer' needs the token ids of every forward (input_ids, not inputs_embeds)")
    ids = info.ids
    generated = (info.positions(ids.device) >= prompt.length)[None, :]
    ending = torch.isin(ids, ends.to(ids.device)) & generated & info.real(ids.device)
    ended = ending.cumsum(dim=1) > 0
    return ended if before is None else ended | before.to(ids.device)[:, None]


def position_mask(
    mode: str, info: ForwardInfo, prompt: PromptInfo, device: torch.device, ended: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Boolean ``[batch, length]`` mask of the new tokens that ``mode`` steers; ``None`` when, by construction,
    it steers none of them (``"last_prompt"`` during decoding), so the hooks can skip the forward.

    - ``"last_prompt"``: each row's final real prompt token.
    - ``"generated"``: that token and every token after the (padded) prompt.
    - ``"all"``: every real token.
    - ``"answer"``: like ``"generated"``, but a row's generated tokens only until its answer ends: the first
      generated newline or end-of-sequence token and everything after it are not steered (``ended``, from
      :func:`answer_ended`, says which new tokens are past that point).
    """
    if mode not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {mode!r}")
    decoding = info.past >= prompt.length  # every new token comes after the prompt
    if mode == "last_prompt" and decoding:
        return None
    real = info.real(device)
    if mode == "answer":
        if ended is None:
            raise RuntimeError("fv_plugin: positions='answer' without the answer's end state")
        real = real & ~ended.to(device)
    if mode == "all" or decoding:
        return real
    pos = info.positions(device)[None, :]
    last = prompt.last.to(device)[:, None]
    if last.shape[0] != info.batch:
        raise RuntimeError(f"prompt has {last.shape[0]} rows but this forward has {info.batch}")
    at_last = pos == last
    if mode == "last_prompt":
        return at_last & real
    return (at_last | (pos >= prompt.length)) & real


def generation_steps(info: ForwardInfo, prompt: PromptInfo, clock: int | None, device: torch.device) -> torch.Tensor:
    """Generation step of each new token, shape ``[length]``: 0 for prompt tokens, ``s`` for the token fed in
    the forward that produces generated token ``s`` (so the first generated token is fed at step 1).

    ``clock`` is the number of steps a logits processor has counted in this call; it anchors the last new token
    (equal to the position-based count in ordinary generation, with or without the KV cache).
    """
    pos = info.positions(device)
    by_position = (pos - (prompt.length - 1)).clamp(min=0)
    if clock is None or info.length == 0:
        return by_position
    anchored = clock - (pos[-1] - pos)
    return torch.where(pos >= prompt.length, anchored.clamp(min=0), torch.zeros_like(pos))
