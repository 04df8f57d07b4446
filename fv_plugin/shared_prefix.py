"""Attention of many re-run last tokens over their prompts' shared prefixes, without a copy of a prefix per row.

A replay (:class:`~fv_plugin.mediation.LastTokenReplay`) re-runs the final token of a few prompts for many batch
rows (one per patched head or candidate vector). With a plain KV cache every row needs its own copy of its prompt's
prefix keys and values, in every layer it runs: for 256 rows of 100-token prompts that copying costs more than the
attention itself, and its memory grows with rows x prompt length. Here the rows' cache layers hand attention only
the new token's key and value; the attention function below scores each prompt's rows against that prompt's prefix
(one matrix product per prompt, the prefix read in place) and against their own new key, with one softmax over
both. It is used only while :func:`shared_prefix_attention` is active, for the layers it is given; any other layer
runs the model's own attention.

The result is the same attention (the replay checks it against the model's own logits before using it). A
sliding-window layer (Gemma 2 and 3, Mistral-style local attention) is the same attention while the prefix and the
new token fit in its window, which holds for few-shot prompts shorter than the window (Gemma 3: 512 tokens); a
longer prefix is refused. Gemma 2's attention logit soft-capping is applied to the scores as its own attention
does; attention sinks and dropout are refused, and the replay then copies prefixes instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["NAME", "RowGroups", "SharedPrefix", "row_groups", "shared_prefix_attention", "split_cache"]

NAME = "fv_plugin_shared_prefix"  # the attention implementation registered with transformers


class Unsupported(RuntimeError):
    """This layer's attention does more than this function computes."""


@dataclass(frozen=True)
class RowGroups:
    """Which batch rows belong to each prompt: ``(prompt, rows)`` pairs, ``rows`` a slice where possible.

    ``layout`` names a regular order that attention handles in one batched product over the prompts:
    ``"tiled"`` (row ``c * prompts + p`` is prompt ``p``) or ``"blocked"`` (row ``p * per + j`` is prompt ``p``,
    every prompt ``per`` rows); ``None``: one product per prompt."""

    groups: tuple[tuple[int, slice | torch.Tensor], ...]
    layout: str | None = None
    per: int = 0


def row_groups(index: torch.Tensor, prompts: int) -> RowGroups:
    """The rows of each prompt, for rows whose prompt is ``index[r]`` (slices for the usual orders: every prompt in
    turn, or runs of one prompt)."""
    rows = len(index)
    if rows % prompts == 0 and bool((index.view(-1, prompts) == torch.arange(prompts, device=index.device)).all()):
        return RowGroups(tuple((p, slice(p, rows, prompts)) for p in range(prompts)), "tiled", rows // prompts)
    values, counts = torch.unique_consecutive(index, return_counts=True)
    if len(values) <= 4 * prompts:
        found, at = [], 0
        for prompt, count in zip(values.tolist(), counts.tolist(), strict=True):
            found.append((prompt, slice(at, at + count)))
            at += count
        regular = values.tolist() == list(range(prompts)) and len(set(counts.tolist())) == 1
        return RowGroups(tuple(found), "blocked" if regular else None, rows // prompts if regular else 0)
    return RowGroups(tuple((p, (index == p).nonzero().flatten()) for p in torch.unique(index).tolist()))


def _by_prompt(x: torch.Tensor, rows: RowGroups, prompts: int) -> torch.Tensor:
    """``[rows, kv, group, dim]`` -> ``[prompts, kv, per * group, dim]`` for a regular layout."""
    _, kv, group, dim = x.shape
    if rows.layout == "tiled":
        x = x.reshape(rows.per, prompts, kv, group, dim).permute(1, 2, 0, 3, 4)
    else:
        x = x.reshape(prompts, rows.per, kv, group, dim).permute(0, 2, 1, 3, 4)
    return x.reshape(prompts, kv, rows.per * group, dim)


def _by_row(x: torch.Tensor, rows: RowGroups, group: int) -> torch.Tensor:
    """The inverse of :func:`_by_prompt`."""
    prompts, kv, _, dim = x.shape
    x = x.reshape(prompts, kv, rows.per, group, dim)
    x = x.permute(2, 0, 1, 3, 4) if rows.layout == "tiled" else x.permute(0, 2, 1, 3, 4)
    return x.reshape(prompts * rows.per, kv, group, dim)


@dataclass(frozen=True)
class SharedPrefix:
    """The prefixes' keys and values per layer index (``[prompts, kv_heads, length, head_dim]``), which of their
    positions are real tokens (``[prompts, length]``, bool), and each prompt's rows."""

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    real: torch.Tensor
    rows: RowGroups


_ACTIVE: contextvars.ContextVar[SharedPrefix | None] = contextvars.ContextVar("fv_shared_prefix", default=None)


def _new_token_only(layer: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kw: Any) -> Any:
    return key_states, value_states


def _whole_prefix(entry: Any) -> bool:
    """Whether a cache layer holds its whole prefix and a new token sees all of it: a plain layer, or a
    sliding-window layer whose window still holds the prefix and the new token."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if type(entry) is DynamicLayer:
        return True
    if type(entry) is not DynamicSlidingWindowLayer:  # other subclasses keep their own rules
        return False
    held = getattr(entry, "keys", None)
    length = int(getattr(entry, "cumulative_length", -1))
    return held is not None and held.shape[-2] == length and length + 1 <= int(entry.sliding_window)


def split_cache(cache: Any, start: int) -> tuple[Any, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """A copy of ``cache`` whose layers from ``start`` on keep nothing and hand attention only the new token's key
    and value, with those layers' prefix keys and values (read in place, not copied). Raises :class:`Unsupported`
    for a cache layer it does not know, or a sliding window the prefix and the new token do not fit in."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise Unsupported(f"{type(cache).__name__} has no cache layers")
    found = copy.copy(cache)
    found.layers = [copy.copy(layer) for layer in layers]
    keys: dict[int, torch.Tensor] = {}
    values: dict[int, torch.Tensor] = {}
    for at in range(start, len(layers)):
        entry: Any = found.layers[at]
        held = getattr(entry, "keys", None)
        if not _whole_prefix(entry) or held is None or not held.numel():
            raise Unsupported(f"cache layer {at} is a {type(entry).__name__}")
        keys[at], values[at] = held, entry.values
        entry.update = functools.partial(_new_token_only, entry)  # this copy only: the prefix cache is unchanged
    return found, keys, values


def _soft_cap(cap: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Gemma 2's attention logit soft-capping (``cap * tanh(scores / cap)``, before the mask), or none."""
    if not cap:
        return lambda scores: scores
    return lambda scores: torch.tanh(scores / cap) * cap


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One new token per row: softmax over [its prompt's prefix, itself]; ``[rows, 1, heads, head_dim]``."""
    shared = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if shared is None or layer not in shared.keys:
        raise Unsupported(f"attention of layer {layer} ran outside the replay it was switched for")
    if dropout or kwargs.get("s_aux") is not None:
        raise Unsupported("attention with dropout or sinks")
    if query.shape[2] != 1:
        raise Unsupported("more than one new token per row")
    prefix_keys, prefix_values = shared.keys[layer], shared.values[layer]
    window = kwargs.get("sliding_window")
    if window and prefix_keys.shape[-2] + 1 > int(window):  # the new token would not see the whole prefix
        raise Unsupported(f"a prefix of {prefix_keys.shape[-2]} tokens in a sliding window of {window}")
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    cap = _soft_cap(kwargs.get("softcap"))
    q = query.reshape(rows, kv_heads, group, dim).float()
    own = cap((q * key.reshape(rows, kv_heads, 1, dim).float()).sum(-1, keepdim=True) * scale)  # [rows, kv, group, 1]
    v = value.reshape(rows, kv_heads, 1, dim).float()
    if shared.rows.layout is not None:  # one batched product over the prompts
        prompts = prefix_keys.shape[0]
        qp, own_p = _by_prompt(q, shared.rows, prompts), _by_prompt(own, shared.rows, prompts)
        scores = cap(qp @ prefix_keys.float().transpose(-1, -2) * scale)  # [prompts, kv, per * group, length]
        scores = scores.masked_fill(~shared.real[:, None, None, :], float("-inf"))
        weights = torch.cat([scores, own_p], dim=-1).softmax(-1)
        mixed = _by_row(weights[..., :-1] @ prefix_values.float(), shared.rows, group)
        out = mixed + _by_row(weights[..., -1:], shared.rows, group) * v
        return out.reshape(rows, heads, 1, dim).transpose(1, 2).to(query.dtype), None
    out = torch.empty(rows, kv_heads, group, dim, dtype=torch.float32, device=query.device)
    for prompt, which in shared.rows.groups:
        qp = q[which]  # [m, kv, group, dim]
        m = qp.shape[0]
        flat = qp.permute(1, 0, 2, 3).reshape(kv_heads, m * group, dim)
        scores = cap(flat @ prefix_keys[prompt].float().transpose(-1, -2) * scale)  # [kv, m * group, length]
        scores = scores.masked_fill(~shared.real[prompt], float("-inf"))
        scores = scores.reshape(kv_heads, m, group, -1).permute(1, 0, 2, 3)  # [m, kv, group, length]
        weights = torch.cat([scores, own[which]], dim=-1).softmax(-1)
        mixed = weights[..., :-1].permute(1, 0, 2, 3).reshape(kv_heads, m * group, -1) @ prefix_values[prompt].float()
        mixed = mixed.reshape(kv_heads, m, group, dim).permute(1, 0, 2, 3)
        out[which] = mixed + weights[..., -1:] * v[which]
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).to(query.dtype), None


@functools.lru_cache(maxsize=1)
def _register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _attention)
    return NAME


@contextlib.contextmanager
def shared_prefix_attention(attention_modules: Sequence[nn.Module], shared: SharedPrefix) -> Iterator[None]:
    """While active, the given attention modules' layers attend through ``shared`` (their configs are switched to
    this module's attention and back on exit, even on error)."""
    name = _register()
    configs: dict[int, Any] = {id(m.config): m.config for m in attention_modules if hasattr(m, "config")}
    before = {key: getattr(config, "_attn_implementation_internal", None) for key, config in configs.items()}
    token = _ACTIVE.set(shared)
    try:
        for config in configs.values():
            config._attn_implementation_internal = name
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation_internal = before[key]
        _ACTIVE.reset(token)
