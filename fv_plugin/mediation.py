"""Mean head activations and the average indirect effect (AIE) of each attention head.

A head's activation is its slice of the attention output projection's input at the last token. The AIE of a
head is the mean, over shuffled-label ICL prompts, of the gain in probability of the correct answer's first
token when that head's last-token activation is replaced by its mean over clean prompts.

The fast path is exact: patching the last token cannot change earlier positions, so each prompt's prefix is run
once (KV cache) and only the last token is re-run, for many patched heads at once (one batch row per head).
:func:`average_indirect_effect_naive` does one full forward per (head, prompt), as the paper's code does; the
tests check that both agree.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fv_plugin.activations import RecordedStates, prompt_means
from fv_plugin.architectures import ArchSpec, ResolvedArch, resolve_architecture
from fv_plugin.config import ExtractionConfig
from fv_plugin.devices import input_device
from fv_plugin.hooks import patch_head_inputs, record_layer_calls
from fv_plugin.progress import stage
from fv_plugin.prompt_sets import clean_prompts, statistics_prompts
from fv_plugin.prompts import Prompt, encode_prompts
from fv_plugin.scoring import last_logits_only
from fv_plugin.tasks import Task

__all__ = [
    "HeadStatistics",
    "IndirectEffects",
    "LastTokenReplay",
    "average_indirect_effect",
    "average_indirect_effect_naive",
    "cache_kwarg",
    "head_statistics",
    "mean_head_activations",
    "statistics_prompts",
]


def num_heads(resolved: ResolvedArch) -> int:
    if resolved.num_heads is None:
        raise ValueError(
            f"model_type {resolved.model_type!r}: the number of attention heads is unknown; set "
            "ArchSpec(num_heads_attr=...) to the config attribute that holds it"
        )
    return resolved.num_heads


def mean_head_activations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    batch_size: int = 16,
    arch: ArchSpec | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Mean last-token activation of every head over ``prompts``: float32 ``[layers, heads, head_dim]``."""
    num_heads(resolve_architecture(model, arch))
    options: dict[str, Any] = {"batch_size": batch_size, "arch": arch, "progress": progress}
    found = prompt_means(model, tokenizer, prompts, heads=True, name="mean activations", **options).heads
    assert found is not None
    return found


@dataclass(frozen=True)
class IndirectEffects:
    """Per-prompt and average indirect effects.

    Attributes:
        effects: ``[prompts, layers, heads]``: patched minus unpatched probability of the answer's first token.
        base_probs: ``[prompts]``: unpatched probability on each (shuffled) prompt.
    """

    effects: torch.Tensor
    base_probs: torch.Tensor

    @property
    def aie(self) -> torch.Tensor:
        """``[layers, heads]``: mean over prompts."""
        return self.effects.mean(0)

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        """The ``k`` (layer, head) pairs with the largest AIE, best first."""
        flat = self.aie.flatten()
        if not 0 < k <= flat.numel():
            raise ValueError(f"k must be in 1..{flat.numel()}, got {k}")
        heads = self.aie.shape[1]
        return [(int(i) // heads, int(i) % heads) for i in flat.topk(k).indices]


def _patcher(means: torch.Tensor, rows: torch.Tensor) -> Any:
    """Patch function for batch rows: row r replaces head ``rows[r, 1]`` of layer ``rows[r, 0]`` (-1: none)."""

    def patch(layer: int, x: torch.Tensor) -> torch.Tensor:
        which = (rows[:, 0] == layer).nonzero().flatten()
        if which.numel() == 0:
            return x
        n_heads, dim = means.shape[1], means.shape[2]
        out = x.clone()
        last = out[:, -1].view(out.shape[0], n_heads, dim)
        heads = rows[which, 1]
        last[which.to(x.device), heads.to(x.device)] = means[layer, heads].to(device=x.device, dtype=x.dtype)
        return out

    return patch


def _variants(n_layers: int, n_heads: int) -> torch.Tensor:
    grid = torch.cartesian_prod(torch.arange(n_layers), torch.arange(n_heads))
    return torch.cat([torch.tensor([[-1, -1]]), grid])  # row 0: unpatched


def cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _expand(value: Any, rows: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1:
        return value.expand(rows, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_expand(v, rows) for v in value)
    return value


class LastTokenReplay:
    """Re-runs one prompt's last token from any layer on, for many batch rows, on top of the prefix's KV cache.

    Built from an unpatched last-token forward that records every decoder layer's call; usable only when
    replaying those calls from layer 0 reproduces the model's own logits (checked on construction).
    """

    def __init__(self, model: nn.Module, resolved: ResolvedArch, ids: torch.Tensor, cache_kw: str) -> None:
        from transformers.cache_utils import Cache

        self.model, self.resolved, self.cache_type = model, resolved, Cache
        self.length = int(ids.shape[1])  # the prompt's tokens; the replayed one sits at position length - 1
        prefix = model(input_ids=ids[:, :-1], use_cache=True, **last_logits_only(model))
        self.prefix_cache = getattr(prefix, "cache", None) or prefix.past_key_values
        with record_layer_calls(resolved) as calls:
            out = model(
                input_ids=ids[:, -1:],
                attention_mask=torch.ones(1, ids.shape[1], dtype=torch.long, device=ids.device),
                use_cache=True,
                **{cache_kw: copy.deepcopy(self.prefix_cache)},
            )
        self.calls = dict(calls)
        self.reference = out.logits[:, -1].float()
        self.usable = resolved.final_norm is not None and len(self.calls) == resolved.num_layers
        if self.usable:
            replay = self.logits(0, 1)
            scale = self.reference.abs().max().clamp_min(1.0)
            self.usable = bool(((replay - self.reference).abs().max() / scale) < 1e-4)

    def logits(self, start: int, rows: int) -> torch.Tensor:
        """Last-token logits ``[rows, vocab]`` running layers ``start..`` (hooks on the model apply)."""
        cache = copy.deepcopy(self.prefix_cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        args, kwargs = self.calls[start]
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = hidden.expand(rows, *hidden.shape[1:])
        for index in range(start, self.resolved.num_layers):
            args, kwargs = self.calls[index]
            call_kwargs = {
                key: cache if isinstance(value, self.cache_type) else _expand(value, rows)
                for key, value in kwargs.items()
                if key != "hidden_states"
            }
            call_args = tuple(_expand(a, rows) for a in args[1:])
            out = self.resolved.layers[index](hidden, *call_args, **call_kwargs)
            hidden = out if isinstance(out, torch.Tensor) else out[0]
        assert self.resolved.final_norm is not None
        unembed: Any = getattr(self.model, "get_output_embeddings")()  # noqa: B009
        logits = unembed(self.resolved.final_norm(hidden))[:, -1].float()
        cap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


@torch.no_grad()
def average_indirect_effect(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    means: torch.Tensor,
    *,
    heads_per_batch: int = 64,
    arch: ArchSpec | None = None,
    progress: bool | None = None,
) -> IndirectEffects:
    """Exact AIE of every head on ``prompts`` (shuffled-label ICL prompts).

    Each prompt's prefix runs once (KV cache); the last token is re-run for ``heads_per_batch`` patched heads
    at a time (one batch row each), and only from the lowest patched layer of the batch on.
    """
    resolved = resolve_architecture(model, arch)
    n_layers, n_heads = resolved.num_layers, num_heads(resolved)
    if means.shape[:2] != (n_layers, n_heads):
        raise ValueError(f"means has shape {tuple(means.shape)}, expected [{n_layers}, {n_heads}, head_dim]")
    if heads_per_batch < 1:
        raise ValueError(f"heads_per_batch must be >= 1, got {heads_per_batch}")
    effects, bases = [], []
    with stage("indirect effects", len(prompts), unit="prompt", progress=progress) as bar:
        for prompt in prompts:
            probs, base = _prompt_effects(model, resolved, tokenizer, prompt, means, heads_per_batch)
            bases.append(base)
            effects.append((probs - base).view(n_layers, n_heads))
            bar.update(1)
    return IndirectEffects(effects=torch.stack(effects), base_probs=torch.stack(bases))


def _prompt_effects(
    model: nn.Module, resolved: ResolvedArch, tokenizer: Any, prompt: Prompt, means: torch.Tensor, heads_per_batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One shuffled prompt: the answer's probability with each head patched (``[layers * heads]``), and unpatched."""
    n_layers, device, cache_kw = resolved.num_layers, input_device(model), cache_kwarg(model)
    grid = _variants(n_layers, num_heads(resolved))[1:]
    enc = encode_prompts(tokenizer, [prompt])
    ids = enc.input_ids.to(device)
    answer = int(enc.answer_ids[0])
    if ids.shape[1] < 2:
        raise ValueError("prompts must have at least two tokens")
    runner = LastTokenReplay(model, resolved, ids, cache_kw)
    base = runner.reference.softmax(-1)[0, answer].cpu()
    probs = torch.empty(len(grid))
    for start in range(0, len(grid), heads_per_batch):
        rows = grid[start : start + heads_per_batch]
        with patch_head_inputs(resolved, range(n_layers), _patcher(means, rows)):
            if runner.usable:
                logits = runner.logits(int(rows[:, 0].min()), len(rows))
            else:  # replaying layers does not reproduce this model: re-run the whole last token
                cache = copy.deepcopy(runner.prefix_cache)
                cache.batch_repeat_interleave(len(rows))
                logits = model(
                    input_ids=ids[:, -1:].expand(len(rows), 1),
                    attention_mask=torch.ones(len(rows), ids.shape[1], dtype=torch.long, device=device),
                    use_cache=True,
                    **{cache_kw: cache},
                ).logits[:, -1]
        probs[start : start + len(rows)] = logits.float().softmax(-1)[:, answer].cpu()
    return probs, base


@torch.no_grad()
def average_indirect_effect_naive(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    means: torch.Tensor,
    *,
    arch: ArchSpec | None = None,
) -> IndirectEffects:
    """Reference AIE: one full forward per (head, prompt), as in the paper's code. Slow; for tests."""
    resolved = resolve_architecture(model, arch)
    n_layers, n_heads = resolved.num_layers, num_heads(resolved)
    device = input_device(model)
    effects, bases = [], []
    for prompt in prompts:
        enc = encode_prompts(tokenizer, [prompt])
        ids = enc.input_ids.to(device)
        answer = int(enc.answer_ids[0])
        base = float(model(input_ids=ids).logits[0, -1].float().softmax(-1)[answer])
        grid = torch.zeros(n_layers, n_heads)
        for layer in range(n_layers):
            for head in range(n_heads):
                rows = torch.tensor([[layer, head]])
                with patch_head_inputs(resolved, [layer], _patcher(means, rows)):
                    prob = float(model(input_ids=ids).logits[0, -1].float().softmax(-1)[answer])
                grid[layer, head] = prob - base
        bases.append(torch.tensor(base))
        effects.append(grid)
    return IndirectEffects(effects=torch.stack(effects), base_probs=torch.stack(bases))


@dataclass(frozen=True)
class HeadStatistics:
    """One task's head statistics: mean activations on clean ICL prompts (``means``) and on the same queries
    zero-shot (``zero_means``), and every head's AIE on shuffled-label ICL prompts.

    ``config`` holds the settings they were made with (``n_shots``, ``n_mean``, ``n_aie``, ``seed``,
    ``template``); :meth:`matches` says whether they can stand in for another extraction's. ``states`` and
    ``zero_states`` hold the mean last-token hidden states after the layers asked for (``layers=`` of
    :func:`head_statistics`), recorded in the same passes: the hidden-state forms reuse them.
    """

    task: str
    means: torch.Tensor  # [layers, heads, head_dim]
    effects: IndirectEffects
    config: ExtractionConfig
    zero_means: torch.Tensor | None = None  # [layers, heads, head_dim]
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [hidden], clean ICL prompts
    zero_states: dict[int, torch.Tensor] = field(default_factory=dict)  # the same queries zero-shot
    zero_recorded: RecordedStates | None = None  # each zero-shot prompt's own states (``zero_rows=``)

    @property
    def aie(self) -> torch.Tensor:
        return self.effects.aie

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        return self.effects.top_heads(k)

    def matches(self, config: ExtractionConfig) -> bool:
        fields = ("n_shots", "n_mean", "n_aie", "seed", "template")
        return all(getattr(self.config, name) == getattr(config, name) for name in fields)


def head_statistics(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    config: ExtractionConfig = ExtractionConfig(),
    *,
    arch: ArchSpec | None = None,
    progress: bool | None = None,
    zero_shot: bool = True,
    layers: Sequence[int] = (),
    zero_rows: Sequence[int] = (),
) -> HeadStatistics:
    """Mean head activations (ICL and, with ``zero_shot``, zero-shot) and the exact AIE of every head for ``task``
    (the paper's causal mediation); with ``layers``, also the mean hidden states after them, from the same passes;
    with ``zero_rows``, each zero-shot prompt's own state after those layers (when the zero-shot prompts run).

    Example:
        >>> stats = head_statistics(model, tok, load_task("antonym"))  # doctest: +SKIP
        >>> stats.top_heads(10)  # doctest: +SKIP
    """
    clean, shuffled = statistics_prompts(task, config)
    options: dict[str, Any] = {"batch_size": config.batch_size, "arch": arch, "progress": progress}
    num_heads(resolve_architecture(model, arch))
    icl = prompt_means(model, tokenizer, clean, heads=True, layers=layers, name="ICL prompts", **options)
    zero, recorded = None, None
    if zero_shot or layers:  # the same queries without demonstrations
        zero_prompts = clean_prompts(task, config, n_shots=0)
        zero = prompt_means(
            model,
            tokenizer,
            zero_prompts,
            heads=zero_shot,
            layers=layers,
            rows=zero_rows,
            name="zero-shot prompts",
            **options,
        )
        recorded = RecordedStates(tuple(p.text for p in zero_prompts), zero.rows) if zero_rows else None
    assert icl.heads is not None
    effects = average_indirect_effect(
        model, tokenizer, shuffled, icl.heads, heads_per_batch=config.heads_per_batch, arch=arch, progress=progress
    )
    return HeadStatistics(
        task=task.name,
        means=icl.heads,
        effects=effects,
        config=config,
        zero_means=zero.heads if zero is not None else None,
        states=icl.states,
        zero_states=zero.states if zero is not None else {},
        zero_recorded=recorded,
    )
