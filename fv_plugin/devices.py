"""Where a model's inputs go and what a module computes in, for plain, quantized and dispatched models.

accelerate keeps offloaded parameters on ``meta`` and moves them (and the inputs) to a module's execution
device when it runs; bitsandbytes stores 8-bit weights as int8 and 4-bit weights as packed uint8. So neither a
parameter's device nor its dtype says where or in what a module computes: this module asks accelerate's hook and
bitsandbytes' compute dtype first.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["execution_device", "input_device", "input_dtype"]


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs ``module`` on (its hook's ``execution_device``), else its first real parameter's."""
    hook = getattr(module, "_hf_hook", None)
    target = getattr(hook, "execution_device", None)
    if target is not None:
        return torch.device(target) if not isinstance(target, int) else torch.device("cuda", target)
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where token ids for ``model`` should be put: where its input embedding executes (CPU if unknown)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        embeddings = get_embeddings()
        if isinstance(embeddings, nn.Module):
            found = execution_device(embeddings)
            if found is not None:
                return found
    return execution_device(model) or torch.device("cpu")


def input_dtype(module: nn.Module, fallback: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype ``module`` computes in: a 4-bit layer's compute dtype, else its first floating parameter's.

    Quantized weights (int8, packed uint8) say nothing about it, so they are skipped; ``fallback`` (the model's
    dtype, typically) is used when nothing else tells.
    """
    compute = getattr(module, "compute_dtype", None)
    if isinstance(compute, torch.dtype):
        return compute
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return fallback
