"""Approximate head effects (attribution patching) and how well a ranking agrees with the exact one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fv_plugin.architectures import ArchSpec, resolve_architecture
from fv_plugin.devices import input_device
from fv_plugin.hooks import patch_head_inputs
from fv_plugin.mediation import IndirectEffects, num_heads
from fv_plugin.prompts import Prompt, encode_prompts
from fv_plugin.scoring import last_logits_only

__all__ = ["attribution_patching", "rank_agreement"]


def attribution_patching(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    means: torch.Tensor,
    *,
    arch: ArchSpec | None = None,
    progress: bool = False,
) -> IndirectEffects:
    """Approximate AIE (attribution patching): one forward and one backward per prompt.

    The effect of patching head ``h`` is approximated to first order: the gradient of the answer's probability
    with respect to the head's last-token activation, dotted with (mean - activation).
    """
    resolved = resolve_architecture(model, arch)
    n_layers, n_heads = resolved.num_layers, num_heads(resolved)
    device = input_device(model)
    effects, bases = [], []
    seen: dict[int, torch.Tensor] = {}
    deltas: dict[int, torch.Tensor] = {}

    def add_delta(layer: int, x: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros(x.shape[0], x.shape[-1], device=x.device, dtype=x.dtype, requires_grad=True)
        deltas[layer], seen[layer] = delta, x[:, -1].detach()
        out = x.clone()
        out[:, -1] = out[:, -1] + delta
        return out

    for prompt in tqdm(prompts, desc="attribution patching", disable=not progress):
        enc = encode_prompts(tokenizer, [prompt])
        ids = enc.input_ids.to(device)
        answer = int(enc.answer_ids[0])
        with torch.enable_grad(), patch_head_inputs(resolved, range(n_layers), add_delta):
            logits = model(input_ids=ids, **last_logits_only(model)).logits[0, -1].float()
            prob = logits.softmax(-1)[answer]
            grads = torch.autograd.grad(prob, [deltas[i] for i in range(n_layers)])
        grid = torch.zeros(n_layers, n_heads)
        for layer, grad in enumerate(grads):
            change = means[layer].to(grad.device).flatten() - seen[layer][0].float()
            grid[layer] = (grad[0].float() * change).view(n_heads, -1).sum(-1).cpu()
        effects.append(grid)
        bases.append(prob.detach().cpu())
    return IndirectEffects(effects=torch.stack(effects), base_probs=torch.stack(bases))


def rank_agreement(approx: torch.Tensor, exact: torch.Tensor, k: int = 10) -> tuple[float, float]:
    """Spearman rank correlation of two score matrices and the overlap of their top-``k`` entries (0..1)."""

    def ranks(values: torch.Tensor) -> torch.Tensor:
        order = values.flatten().argsort()
        out = torch.empty_like(order, dtype=torch.float64)
        out[order] = torch.arange(order.numel(), dtype=torch.float64)
        return out

    a, b = ranks(approx), ranks(exact)
    a, b = a - a.mean(), b - b.mean()
    spearman = float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))
    top_a = set(approx.flatten().topk(k).indices.tolist())
    top_b = set(exact.flatten().topk(k).indices.tolist())
    return spearman, len(top_a & top_b) / k
