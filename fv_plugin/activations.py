"""Reading activations: last-token hidden states of prompts at chosen layers, a task's hidden-state vectors, and
which prompts pass a vector's condition (:func:`gate_decisions`, the decision ``steer(..., gate=True)`` takes).

:func:`task_state_vectors` is the one place the hidden-state methods' vectors are computed: the mean last-token state of
clean ICL prompts (``layer_mean``, the task-vector baseline) and that mean minus the mean over the same queries
zero-shot (``difference``, the ICL-minus-zero-shot vector).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from fv_plugin.architectures import ArchSpec, resolve_architecture
from fv_plugin.condition import Condition
from fv_plugin.config import ExtractionConfig
from fv_plugin.devices import input_device
from fv_plugin.gating import check_gate
from fv_plugin.hooks import ForwardStopped, record_head_inputs, record_layer_outputs
from fv_plugin.progress import progress_enabled, stage
from fv_plugin.prompt_sets import clean_prompts
from fv_plugin.prompts import Prompt, encode_prompts
from fv_plugin.scoring import last_logits_only
from fv_plugin.tasks import Task
from fv_plugin.vector import FunctionVector

__all__ = [
    "PromptMeans",
    "RecordedStates",
    "clean_prompts",
    "difference_vector",
    "gate_decisions",
    "last_token_hidden_states",
    "mean_last_token_hidden_state",
    "prompt_means",
    "task_state_vectors",
]


@torch.no_grad()
def last_token_hidden_states(
    model: nn.Module,
    tokenizer: object,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 8,
    arch: ArchSpec | None = None,
    progress: bool | None = None,
    stop: bool = False,
) -> dict[int, torch.Tensor]:
    """Hidden state of each prompt's final token after each of ``layers``; ``stop``: run each forward only up
    to the highest of ``layers`` (the layers above and the unembedding are skipped).

    Returns:
        ``{layer: tensor [len(prompts), hidden]}`` in float32 on the CPU.
    """
    if not prompts:
        raise ValueError("prompts is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if getattr(tokenizer, "pad_token", None) is None:
        raise ValueError("the tokenizer has no pad token; set `tokenizer.pad_token = tokenizer.eos_token` first")
    device = input_device(model)
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    batches = range(0, len(prompts), batch_size)
    with record_layer_outputs(model, layers, arch=arch, stop=stop) as seen:
        for start in tqdm(batches, desc="hidden states", disable=not progress_enabled(progress)):
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)  # type: ignore[operator]
            mask = enc["attention_mask"]
            positions = torch.arange(mask.shape[1])
            last = torch.where(mask.bool(), positions, -1).amax(dim=1)
            with contextlib.suppress(ForwardStopped):
                model(input_ids=enc["input_ids"].to(device), attention_mask=mask.to(device))
            rows = torch.arange(mask.shape[0])
            for layer in layers:
                out[layer].append(seen[layer][rows, last.to(seen[layer].device)].float().cpu())
    return {layer: torch.cat(chunks) for layer, chunks in out.items()}


def mean_last_token_hidden_state(
    model: nn.Module,
    tokenizer: object,
    prompts: Sequence[str],
    layer: int,
    *,
    batch_size: int = 8,
    arch: ArchSpec | None = None,
) -> torch.Tensor:
    """Mean over ``prompts`` of the final token's hidden state after ``layer``, shape ``[hidden]``."""
    return last_token_hidden_states(model, tokenizer, prompts, [layer], batch_size=batch_size, arch=arch)[layer].mean(0)


def difference_vector(
    model: nn.Module,
    tokenizer: object,
    prompts: Sequence[str],
    baseline_prompts: Sequence[str],
    *,
    layer: int,
    batch_size: int = 8,
    arch: ArchSpec | None = None,
    task: str | None = None,
) -> FunctionVector:
    """Mean last-token hidden state of ``prompts`` minus that of ``baseline_prompts`` after ``layer``.

    With ICL prompts and the same queries zero-shot this is the ICL-minus-zero-shot task vector; with
    contrasting prompts, a contrastive steering vector.

    Example:
        >>> fv = difference_vector(model, tok, icl_prompts, zero_shot_prompts, layer=18)  # doctest: +SKIP
    """
    if not baseline_prompts:
        raise ValueError("baseline_prompts is empty")
    states = last_token_hidden_states(model, tokenizer, list(prompts), [layer], batch_size=batch_size, arch=arch)
    base = last_token_hidden_states(model, tokenizer, list(baseline_prompts), [layer], batch_size=batch_size, arch=arch)
    config: Any = getattr(model, "config")  # noqa: B009
    return FunctionVector(
        vector=states[layer].mean(0) - base[layer].mean(0),
        layer=layer,
        model_type=str(config.model_type),
        hidden_size=int(states[layer].shape[1]),
        model_name=str(getattr(config, "_name_or_path", "") or "") or None,
        task=task,
        method="difference",
    )


def task_state_vectors(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    layers: Sequence[int],
    *,
    method: Literal["difference", "layer_mean"] = "difference",
    config: ExtractionConfig = ExtractionConfig(),
    arch: ArchSpec | None = None,
    progress: bool | None = None,
) -> dict[int, torch.Tensor]:
    """Per layer: the mean last-token hidden state of the clean ICL prompts (``"layer_mean"``), or that minus the
    mean over the same queries zero-shot (``"difference"``). Float32 ``[hidden]`` on the CPU."""
    if method not in ("difference", "layer_mean"):
        raise ValueError(f"method must be 'difference' or 'layer_mean', got {method!r}")
    options: dict[str, Any] = {"batch_size": config.batch_size, "arch": arch, "progress": progress}
    icl = prompt_means(model, tokenizer, clean_prompts(task, config), layers=layers, name="ICL prompts", **options)
    if method == "layer_mean":
        return dict(icl.states)
    zero_prompts = clean_prompts(task, config, n_shots=0)
    zero = prompt_means(model, tokenizer, zero_prompts, layers=layers, name="zero-shot prompts", **options)
    return {at: icl.states[at] - zero.states[at] for at in layers}


@dataclass(frozen=True)
class PromptMeans:
    """Mean last-token activations over a set of prompts: every head (``heads``, ``[layers, heads, head_dim]``,
    or ``None`` when not recorded) and the hidden state after each recorded layer (``states``: ``[hidden]``);
    ``rows``: each prompt's own last-token hidden state after the layers asked for (``[prompts, hidden]``)."""

    heads: torch.Tensor | None
    states: dict[int, torch.Tensor] = field(default_factory=dict)
    rows: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedStates:
    """Last-token hidden states an extraction already ran: ``texts[i]``'s state after layer ``l`` is
    ``states[l][i]`` (float32 ``[len(texts), hidden]`` on the CPU). Lets later stages skip those prompts."""

    texts: tuple[str, ...]
    states: dict[int, torch.Tensor]

    def lookup(self, text: str, layers: Sequence[int]) -> list[torch.Tensor] | None:
        """``text``'s states after ``layers``, or ``None`` when it was not recorded at all of them."""
        if text not in self.texts or any(at not in self.states for at in layers):
            return None
        i = self.texts.index(text)
        return [self.states[at][i] for at in layers]


@torch.no_grad()
def prompt_means(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    heads: bool = False,
    layers: Sequence[int] = (),
    rows: Sequence[int] = (),
    batch_size: int = 16,
    arch: ArchSpec | None = None,
    name: str = "prompts",
    progress: bool | None = None,
) -> PromptMeans:
    """Mean last-token head activations (``heads=True``) and hidden states after ``layers``, in one pass over
    ``prompts`` (left-padded batches of ``batch_size``), float32 on the CPU; ``rows``: layers after which each
    prompt's own last-token state is kept too (same pass)."""
    if not prompts:
        raise ValueError("no prompts")
    resolved = resolve_architecture(model, arch)
    head_layers = list(range(resolved.num_layers)) if heads else []
    device = input_device(model)
    head_sum: torch.Tensor | None = None
    state_sum = {at: torch.zeros(()) for at in layers}
    kept: dict[int, list[torch.Tensor]] = {at: [] for at in rows}
    with (
        record_head_inputs(resolved, head_layers) as seen_heads,
        record_layer_outputs(model, sorted({*layers, *rows}), arch=arch) as seen_states,
        stage(name, len(prompts), unit="prompt", progress=progress) as bar,
    ):
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            enc = encode_prompts(tokenizer, batch)
            ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
            model(input_ids=ids, attention_mask=mask, **last_logits_only(model))
            if heads:
                summed = torch.stack([seen_heads[at].float().sum(0).cpu() for at in head_layers])
                head_sum = summed if head_sum is None else head_sum + summed
            for at in layers:
                state_sum[at] = state_sum[at] + seen_states[at][:, -1].float().sum(0).cpu()
            for at in rows:
                kept[at].append(seen_states[at][:, -1].float().cpu())
            bar.update(len(batch))
    n = len(prompts)
    means = (head_sum / n).view(resolved.num_layers, resolved.num_heads or 1, -1) if head_sum is not None else None
    own = {at: torch.cat(parts) for at, parts in kept.items()}
    return PromptMeans(heads=means, states={at: state_sum[at] / n for at in layers}, rows=own)


@torch.no_grad()
def gate_decisions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    fv: FunctionVector,
    *,
    batch_size: int = 8,
    arch: ArchSpec | None = None,
) -> list[bool]:
    """Whether each prompt passes ``fv``'s condition: the decision ``steer(model, fv, gate=True)`` takes for a row
    holding that prompt (as ``tokenizer(prompts)`` encodes it), computed with the same rule on the plain model's
    hidden state at the prompt's last token. (Inside ``steer``, other vectors steering layers below
    ``condition.layer`` in the same call change that state; this function sees the model without them.)

    Raises:
        ValueError: when ``fv`` has no condition (:func:`fv_plugin.gating.check_gate`) or ``prompts`` is empty.

    Example:
        >>> fv_plugin.gate_decisions(model, tok, ["Q: hot\nA:", "Tell me a story."], fv)  # doctest: +SKIP
        [True, False]
    """
    check_gate([fv])
    condition = cast(Condition, fv.condition)  # check_gate raised if it is None
    layer = condition.layer
    options: dict[str, Any] = {"batch_size": batch_size, "arch": arch, "progress": False, "stop": True}
    states = last_token_hidden_states(model, tokenizer, prompts, [layer], **options)
    return [bool(v) for v in condition.passes(states[layer]).tolist()]
