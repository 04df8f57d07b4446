"""Re-running the final token of a few prompts for many batch rows, from any decoder layer on, on top of the
prompts' cached prefixes: the engine under the exact AIE (:mod:`fv_plugin.mediation`) and the candidates' scoring
(:mod:`fv_plugin.selection`).

Each row is one of the prompts (``index[r]``) with its own intervention (a patched head, a candidate vector); the
prompts are left-padded together. Rows attend to their prompt's prefix in place where that reproduces the model
(:mod:`fv_plugin.shared_prefix`), or to a copy of it; both are checked against the model's own logits first.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any

import torch
from torch import nn

from fv_plugin.architectures import ResolvedArch
from fv_plugin.hooks import record_layer_calls
from fv_plugin.scoring import last_logits_only
from fv_plugin.shared_prefix import SharedPrefix, Unsupported, row_groups, shared_prefix_attention, split_cache

__all__ = ["LastTokenReplay", "cache_kwarg", "cache_rows", "mask_inputs", "position_ids"]


def cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _rows_of(value: Any, index: torch.Tensor, prompts: int) -> Any:
    """A recorded layer argument for the replay's rows: batch-major tensors (two or more dimensions, one row per
    prompt) take row ``index[r]``; everything else (``cache_position``, flags) is shared."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == prompts:
        if prompts == 1:
            return value.expand(len(index), *value.shape[1:])
        return value.index_select(0, index.to(value.device))
    if isinstance(value, tuple):
        return tuple(_rows_of(v, index, prompts) for v in value)
    return value


def _select_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if tensor.shape[0] == 1:
        return tensor.expand(len(index), *tensor.shape[1:])  # a view: the layer's update copies it once
    return tensor.index_select(0, index.to(tensor.device))


def cache_rows(cache: Any, index: torch.Tensor, start: int = 0) -> Any:
    """A new cache whose row ``r`` holds ``cache``'s row ``index[r]``, for the layers from ``start`` on (layers
    below are left as they are: a replay from ``start`` never reads them). ``cache`` itself is not changed; a
    single-row cache is expanded as a view, which the layer's first update copies once."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") for layer in layers):  # another cache layout
        found = copy.deepcopy(cache)
        found.batch_select_indices(index)
        return found
    found = copy.copy(cache)
    found.layers = [copy.copy(layer) for layer in layers]
    for layer in found.layers[start:]:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys, layer.values = _select_rows(layer.keys, index), _select_rows(layer.values, index)
    return found


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: each row's first real token is at position 0."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def mask_inputs(model: nn.Module, mask: torch.Tensor, last: int | None = None) -> dict[str, torch.Tensor]:
    """The forward's ``attention_mask`` and, when the model takes them, the ``position_ids`` of the left-padded rows
    (their last ``last`` columns only: the tokens the forward runs on top of a cache)."""
    found = {"attention_mask": mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        positions = position_ids(mask)
        found["position_ids"] = positions[:, -last:] if last else positions
    return found


class LastTokenReplay:
    """Re-runs the last token of a batch of prompts from any layer on, for many batch rows (each row one of the
    prompts), on top of the prefixes' KV cache.

    ``ids`` ``[prompts, length]`` are left-padded (``attention_mask`` marks the real tokens; ``None``: no
    padding). Built from an unpadded-position, last-token forward that records every decoder layer's call; the
    replay runs those calls again layer by layer, for the rows it is given, with each layer's cache holding only
    the prefixes of those rows (never the layers below the start). Usable only when replaying from layer 0
    reproduces the model's own logits (checked on construction); :meth:`full_logits` runs the whole model on the
    last token otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        resolved: ResolvedArch,
        ids: torch.Tensor,
        cache_kw: str,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        from transformers.cache_utils import Cache

        if ids.shape[1] < 2:
            raise ValueError("LastTokenReplay needs prompts of at least two tokens (a prefix and a last token)")
        self.model, self.resolved, self.cache_type, self.cache_kw = model, resolved, Cache, cache_kw
        self.prompts, self.length = int(ids.shape[0]), int(ids.shape[1])  # the replayed token: position length - 1
        self.position = self.length - 1
        mask = attention_mask.to(ids.device) if attention_mask is not None else torch.ones_like(ids)
        self.ids, self.mask = ids, mask
        prefix = model(
            input_ids=ids[:, :-1], **mask_inputs(model, mask[:, :-1]), use_cache=True, **last_logits_only(model)
        )
        self.prefix_cache = getattr(prefix, "cache", None) or prefix.past_key_values
        everyone = torch.arange(self.prompts)
        with record_layer_calls(resolved) as calls:
            out = self._last_token(everyone, 0)
        self.calls = dict(calls)
        self.reference = out.float()
        self.real = mask[:, :-1].bool()  # the prefixes' real (not padding) positions
        # rows attend to their prefixes in place (fv_plugin.shared_prefix) where that reproduces the model;
        # otherwise each row gets a copy of its prefix; where neither does, callers run the whole last token
        self.usable = resolved.final_norm is not None and len(self.calls) == resolved.num_layers
        self.shared = self.usable
        if self.shared:
            try:
                self.shared = self._reproduces(everyone)
            except (Unsupported, RuntimeError, KeyError, TypeError, ValueError, IndexError):
                self.shared = False  # the model's attention is not one whose prefixes can be shared
        self.usable = self.shared or (self.usable and self._reproduces(everyone))

    def _reproduces(self, everyone: torch.Tensor) -> bool:
        replay = self._logits(0, everyone)  # as configured (shared or copied prefixes), without a fallback
        scale = self.reference.abs().max().clamp_min(1.0)
        return bool(((replay - self.reference).abs().max() / scale) < 1e-4)

    def _last_token(self, index: torch.Tensor, start: int) -> torch.Tensor:
        inputs = mask_inputs(self.model, self.mask.index_select(0, index.to(self.mask.device)), 1)
        out = self.model(
            input_ids=self.ids.index_select(0, index.to(self.ids.device))[:, -1:],
            use_cache=True,
            **inputs,
            **{self.cache_kw: self.row_cache(index, start)},
        )
        return out.logits[:, -1]

    def row_cache(self, index: torch.Tensor, start: int = 0) -> Any:
        """A cache holding prompt ``index[r]``'s prefix in row ``r`` (see :func:`cache_rows`)."""
        return cache_rows(self.prefix_cache, index, start)

    def logits(self, start: int, rows: int | torch.Tensor) -> torch.Tensor:
        """Last-token logits ``[rows, vocab]`` running layers ``start..`` (hooks on the model apply); ``rows``: the
        prompt of each row (an int: that many rows of a single prompt)."""
        index = torch.zeros(rows, dtype=torch.long) if isinstance(rows, int) else rows
        if isinstance(rows, int) and self.prompts != 1:
            raise ValueError(f"this replay holds {self.prompts} prompts: give each row's prompt index")
        if self.shared:
            try:
                return self._logits(start, index)
            except Unsupported:  # a layer's attention refused this batch: copy the prefixes from now on
                self.shared = False
        return self._logits(start, index)

    def _logits(self, start: int, index: torch.Tensor) -> torch.Tensor:
        context: Any = contextlib.nullcontext()
        if self.shared:  # no copy of a prefix per row: attention reads each prompt's prefix in place
            cache, keys, values = split_cache(self.prefix_cache, start)
            shared = SharedPrefix(keys, values, self.real, row_groups(index.to(self.real.device), self.prompts))
            attention = [self.resolved.attention(i) for i in range(start, self.resolved.num_layers)]
            context = shared_prefix_attention(attention, shared)
        else:
            cache = self.row_cache(index, start)
        args, kwargs = self.calls[start]
        hidden = _rows_of(args[0] if args else kwargs["hidden_states"], index, self.prompts)
        with context:
            hidden = self._layers(start, hidden, cache, index)
        assert self.resolved.final_norm is not None
        unembed: Any = getattr(self.model, "get_output_embeddings")()  # noqa: B009
        logits = unembed(self.resolved.final_norm(hidden))[:, -1].float()
        cap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _layers(self, start: int, hidden: torch.Tensor, cache: Any, index: torch.Tensor) -> torch.Tensor:
        for layer in range(start, self.resolved.num_layers):
            args, kwargs = self.calls[layer]
            call_kwargs = {
                key: cache if isinstance(value, self.cache_type) else _rows_of(value, index, self.prompts)
                for key, value in kwargs.items()
                if key != "hidden_states"
            }
            call_args = tuple(
                cache if isinstance(a, self.cache_type) else _rows_of(a, index, self.prompts) for a in args[1:]
            )
            out = self.resolved.layers[layer](hidden, *call_args, **call_kwargs)
            hidden = out if isinstance(out, torch.Tensor) else out[0]
        return hidden

    def full_logits(self, rows: int | torch.Tensor) -> torch.Tensor:
        """The same rows' last-token logits from the whole model on the prefixes' cache (when not ``usable``)."""
        index = torch.zeros(rows, dtype=torch.long) if isinstance(rows, int) else rows
        return self._last_token(index, 0).float()
