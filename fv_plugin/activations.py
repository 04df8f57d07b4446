"""Reading activations: last-token hidden states of prompts at chosen layers, and a task's hidden-state vectors.

:func:`task_state_vectors` is the one place the hidden-state methods' vectors are computed: the mean last-token state of
clean ICL prompts (``layer_mean``, the task-vector baseline) and that mean minus the mean over the same queries
zero-shot (``difference``, the ICL-minus-zero-shot vector).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from fv_plugin.architectures import ArchSpec
from fv_plugin.config import ExtractionConfig
from fv_plugin.devices import input_device
from fv_plugin.hooks import record_layer_outputs
from fv_plugin.prompt_sets import clean_prompts
from fv_plugin.tasks import Task
from fv_plugin.vector import FunctionVector

__all__ = [
    "clean_prompts",
    "difference_vector",
    "last_token_hidden_states",
    "mean_last_token_hidden_state",
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
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """Hidden state of each prompt's final token after each of ``layers``.

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
    with record_layer_outputs(model, layers, arch=arch) as seen:
        for start in tqdm(batches, desc="hidden states", disable=not progress):
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)  # type: ignore[operator]
            mask = enc["attention_mask"]
            positions = torch.arange(mask.shape[1])
            last = torch.where(mask.bool(), positions, -1).amax(dim=1)
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
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """Per layer: the mean last-token hidden state of the clean ICL prompts (``"layer_mean"``), or that minus the
    mean over the same queries zero-shot (``"difference"``). Float32 ``[hidden]`` on the CPU."""
    if method not in ("difference", "layer_mean"):
        raise ValueError(f"method must be 'difference' or 'layer_mean', got {method!r}")
    options = {"batch_size": config.batch_size, "arch": arch, "progress": progress}
    icl = last_token_hidden_states(model, tokenizer, [p.text for p in clean_prompts(task, config)], layers, **options)  # type: ignore[arg-type]
    if method == "layer_mean":
        return {at: icl[at].mean(0) for at in layers}
    zero_texts = [p.text for p in clean_prompts(task, config, n_shots=0)]
    zero = last_token_hidden_states(model, tokenizer, zero_texts, layers, **options)  # type: ignore[arg-type]
    return {at: icl[at].mean(0) - zero[at].mean(0) for at in layers}
