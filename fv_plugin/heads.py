"""What attention heads contribute to the residual stream at their mean activations.

A head's contribution is computed by calling the model's own output projection (and, where the attention output
passes through a norm before the residual add, that norm), so quantized projections work without
dequantizing by hand and a bias is never counted once per head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fv_plugin.architectures import ArchSpec, ResolvedArch, resolve_architecture
from fv_plugin.devices import execution_device, input_device, input_dtype

__all__ = ["head_contributions", "head_vector"]


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _head_contribution(
    model: nn.Module, resolved: ResolvedArch, means: torch.Tensor, layer: int, head: int
) -> torch.Tensor:
    """One head's residual-stream contribution at its mean activation, float32 ``[hidden]`` on the CPU."""
    n_heads, dim = means.shape[1], means.shape[2]
    proj = resolved.out_proj(layer)
    # Quantized weights are int8 / packed uint8 and offloaded ones sit on meta: ask the module instead.
    dtype = input_dtype(proj, fallback=_model_dtype(model))
    device = execution_device(proj) or input_device(model)
    if resolved.spec.attn_out_norm is None:
        with_head = torch.zeros(1, 1, n_heads * dim)
        with_head[..., head * dim : (head + 1) * dim] = means[layer, head]
        without = torch.zeros_like(with_head)
        post: Callable[[torch.Tensor], torch.Tensor] = proj
    else:
        with_head = means[layer].reshape(1, 1, n_heads * dim).clone()
        without = with_head.clone()
        without[..., head * dim : (head + 1) * dim] = 0
        norm = resolved.layers[layer].get_submodule(resolved.spec.attn_out_norm)

        def post(x: torch.Tensor) -> torch.Tensor:
            return norm(proj(x))

    out = post(torch.cat([with_head, without]).to(device=device, dtype=dtype)).float()
    return (out[0, 0] - out[1, 0]).cpu()


@torch.no_grad()
def head_vector(
    model: nn.Module, means: torch.Tensor, heads: Sequence[tuple[int, int]], *, arch: ArchSpec | None = None
) -> torch.Tensor:
    """Residual-stream contribution of ``heads`` at their mean activations, summed: float32 ``[hidden]``.

    Each head's contribution is computed by calling the output projection itself on an input that holds only
    that head's mean activation, minus the projection of zeros (so a bias is never counted once per head); this
    works for quantized projections too. Where the attention output passes through a norm before the residual
    add, a head's contribution is the norm of the mean attention output minus the norm of it without that head.
    """
    resolved = resolve_architecture(model, arch)
    total = torch.zeros(resolved.hidden_size)
    for layer, head in heads:
        total += _head_contribution(model, resolved, means, layer, head)
    return total


@torch.no_grad()
def head_contributions(
    model: nn.Module, means: torch.Tensor, heads: Sequence[tuple[int, int]], *, arch: ArchSpec | None = None
) -> dict[tuple[int, int], torch.Tensor]:
    """Each of ``heads``' residual-stream contribution at its mean activation: ``{(layer, head): [hidden]}``."""
    resolved = resolve_architecture(model, arch)
    return {(layer, head): _head_contribution(model, resolved, means, layer, head) for layer, head in heads}
