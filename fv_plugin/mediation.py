"""Mean head activations and the average indirect effect (AIE) of each attention head.

A head's activation is its slice of the attention output projection's input at the last token. The AIE of a
head is the mean, over shuffled-label ICL prompts, of the gain in probability of the correct answer's first
token when that head's last-token activation is replaced by its mean over clean prompts.

The fast path is exact: patching the last token cannot change earlier positions, so each prompt's prefix is run
once (KV cache) and only the last token is re-run, for many patched heads at once (one batch row per head).
:func:`average_indirect_effect_naive` does one full forward per (head, prompt), as the paper's code does; the
tests check that both agree.

With a screen (``screen=`` and ``finalists=``, set by :attr:`~fv_plugin.ExtractionConfig.aie_screen`), every head
runs on the first ``screen`` prompts and only the ``finalists`` heads with the largest mean effect there run on
the rest: the effects of the other heads on those prompts are ``nan`` (not measured), and the finalists rank
first. docs/extraction_cost.md measures how often this changes the top heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fv_plugin.activations import RecordedStates, prompt_means
from fv_plugin.architectures import ArchSpec, ResolvedArch, resolve_architecture
from fv_plugin.config import ExtractionConfig
from fv_plugin.devices import input_device
from fv_plugin.hooks import patch_head_inputs
from fv_plugin.progress import stage
from fv_plugin.prompt_sets import clean_prompts, statistics_prompts
from fv_plugin.prompts import Prompt, by_length, encode_prompts, prompt_tokenizer
from fv_plugin.replay import LastTokenReplay, cache_kwarg, cache_rows, position_ids
from fv_plugin.tasks import Task

__all__ = [
    "HeadStatistics",
    "IndirectEffects",
    "LastTokenReplay",
    "average_indirect_effect",
    "average_indirect_effect_naive",
    "cache_kwarg",
    "cache_rows",
    "head_statistics",
    "mean_head_activations",
    "position_ids",
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
        effects: ``[prompts, layers, heads]``: patched minus unpatched probability of the answer's first token;
            ``nan`` where a screen left the head out on that prompt.
        base_probs: ``[prompts]``: unpatched probability on each (shuffled) prompt.
    """

    effects: torch.Tensor
    base_probs: torch.Tensor

    @property
    def aie(self) -> torch.Tensor:
        """``[layers, heads]``: mean over the prompts each head ran on."""
        return self.effects.nanmean(0)

    @property
    def complete(self) -> torch.Tensor:
        """``[layers, heads]``: whether the head ran on every prompt (all of them, without a screen)."""
        return ~self.effects.isnan().any(0)

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        """The ``k`` (layer, head) pairs with the largest AIE, best first; after a screen, the heads that ran on
        every prompt rank above those that did not."""
        flat, complete = self.aie.flatten(), self.complete.flatten()
        if not 0 < k <= flat.numel():
            raise ValueError(f"k must be in 1..{flat.numel()}, got {k}")
        heads = self.aie.shape[1]
        order = flat.argsort(descending=True)
        order = order[(~complete[order]).int().argsort(stable=True)]  # complete heads first, each part by AIE
        return [(int(i) // heads, int(i) % heads) for i in order[:k]]


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


@torch.no_grad()
def average_indirect_effect(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    means: torch.Tensor,
    *,
    heads_per_batch: int = 256,
    prompts_per_batch: int = 16,
    screen: int | None = None,
    finalists: int | None = None,
    arch: ArchSpec | None = None,
    progress: bool | None = None,
) -> IndirectEffects:
    """Exact AIE of every head on ``prompts`` (shuffled-label ICL prompts).

    The prefixes of ``prompts_per_batch`` prompts run once, together (KV cache); then, layer by layer, the last
    token is re-run from that layer on, one batch row per (prompt, head of the layer) with that head patched, at
    most ``heads_per_batch`` rows per forward. No row runs a layer below the one it patches.

    With ``screen`` and ``finalists`` (both or neither), every head runs on the first ``screen`` prompts and only
    the ``finalists`` heads with the largest mean effect on them run on the other prompts.
    """
    resolved = resolve_architecture(model, arch)
    n_layers, n_heads = resolved.num_layers, num_heads(resolved)
    if means.shape[:2] != (n_layers, n_heads):
        raise ValueError(f"means has shape {tuple(means.shape)}, expected [{n_layers}, {n_heads}, head_dim]")
    if heads_per_batch < 1 or prompts_per_batch < 1:
        raise ValueError(
            f"heads_per_batch and prompts_per_batch must be >= 1, got {heads_per_batch} and {prompts_per_batch}"
        )
    if (screen is None) != (finalists is None) or (screen is not None and min(screen, finalists or 0) < 1):
        raise ValueError(f"give screen and finalists together, both >= 1 (got {screen} and {finalists})")
    effects = torch.full((len(prompts), n_layers * n_heads), float("nan"))
    bases = torch.empty(len(prompts))
    first = len(prompts) if screen is None else min(screen, len(prompts))
    with stage("indirect effects", len(prompts), unit="prompt", progress=progress) as bar:

        def run(which: range, heads: torch.Tensor | None) -> None:  # every head, or these flat head indices
            order = [which[i] for i in by_length(tokenizer, [prompts[i] for i in which])]  # little padding
            for start in range(0, len(order), prompts_per_batch):
                group = order[start : start + prompts_per_batch]
                chosen = [prompts[i] for i in group]
                probs, base = _group_effects(model, resolved, tokenizer, chosen, means, heads_per_batch, heads)
                bases[group], effects[group] = base, probs - base[:, None]
                bar.update(len(group))

        run(range(first), None)
        if first < len(prompts):
            run(range(first, len(prompts)), effects[:first].mean(0).topk(min(finalists or 1, effects.shape[1])).indices)
    return IndirectEffects(effects=effects.view(len(prompts), n_layers, n_heads), base_probs=bases)


def _layer_rows(
    layer: int, prompts: int, heads: torch.Tensor, per_batch: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (each row's prompt, each row's ``[layer, head]``) covering every (prompt, head in ``heads``)
    of ``layer``."""
    index = torch.arange(prompts).repeat_interleave(len(heads))
    grid = torch.stack([torch.full((prompts * len(heads),), layer), heads.repeat(prompts)], dim=1)
    return [(index[i : i + per_batch], grid[i : i + per_batch]) for i in range(0, len(index), per_batch)]


def _group_effects(
    model: nn.Module,
    resolved: ResolvedArch,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    means: torch.Tensor,
    per_batch: int,
    heads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled prompts: the answer's probability with each head (or each flat head index in ``heads``)
    patched (``[prompts, layers * heads]``, ``nan`` for heads not run), and unpatched (``[prompts]``)."""
    n_layers, n_heads, device = resolved.num_layers, num_heads(resolved), input_device(model)
    enc = encode_prompts(tokenizer, prompts)
    if enc.input_ids.shape[1] < 2:
        raise ValueError("prompts must have at least two tokens")
    answers = enc.answer_ids
    runner = LastTokenReplay(
        model, resolved, enc.input_ids.to(device), cache_kwarg(model), enc.attention_mask.to(device)
    )
    base = runner.reference.softmax(-1).cpu()[torch.arange(len(prompts)), answers]
    probs = torch.full((len(prompts), n_layers * n_heads), float("nan"))
    wanted = torch.arange(n_layers * n_heads) if heads is None else heads.sort().values
    for layer in range(n_layers):
        in_layer = wanted[wanted // n_heads == layer] % n_heads
        if in_layer.numel() == 0:
            continue
        for index, rows in _layer_rows(layer, len(prompts), in_layer, per_batch):
            with patch_head_inputs(resolved, [layer], _patcher(means, rows)):
                # replaying layers does not reproduce some models: they re-run the whole last token
                logits = runner.logits(layer, index) if runner.usable else runner.full_logits(index)
            found = logits.float().softmax(-1).cpu()[torch.arange(len(index)), answers[index]]
            probs[index, layer * n_heads + rows[:, 1]] = found
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
        """Whether these statistics are those ``config`` would make: the same prompts, and an AIE screen that
        kept at least the heads ``config``'s would (or no screen)."""
        fields = ("n_shots", "n_mean", "n_aie", "seed", "template", "prepend_bos")
        same = all(getattr(self.config, name) == getattr(config, name) for name in fields)
        complete = self.effects.complete
        if complete.all():  # every head ran on every prompt
            return same
        wanted = config.aie_finalists(complete.numel())
        kept = int(complete.sum())
        return same and wanted is not None and wanted <= kept and config.aie_screen == self.config.aie_screen


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
    tokenizer = prompt_tokenizer(tokenizer, prepend_bos=config.prepend_bos)
    options: dict[str, Any] = {"batch_size": config.batch_size, "arch": arch, "progress": progress}
    resolved = resolve_architecture(model, arch)
    finalists = config.aie_finalists(num_heads(resolved) * resolved.num_layers)
    icl = prompt_means(model, tokenizer, clean, heads=True, layers=layers, name="ICL prompts", **options)
    zero, recorded = None, None
    if zero_shot or layers:  # the same queries without demonstrations
        zero_prompts = clean_prompts(task, config, n_shots=0)
        found: dict[str, Any] = {"heads": zero_shot, "layers": layers, "rows": zero_rows}
        zero = prompt_means(model, tokenizer, zero_prompts, name="zero-shot prompts", **found, **options)
        recorded = RecordedStates(tuple(p.text for p in zero_prompts), zero.rows) if zero_rows else None
    assert icl.heads is not None
    effects = average_indirect_effect(
        model,
        tokenizer,
        shuffled,
        icl.heads,
        heads_per_batch=config.heads_per_batch,
        prompts_per_batch=config.batch_size,
        screen=config.aie_screen if finalists is not None else None,
        finalists=finalists,
        arch=arch,
        progress=progress,
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
