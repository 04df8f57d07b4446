"""What a function vector is and where it lives, as data: top tokens, similarities, AIE maps, head depths.

The plots in :mod:`fv_plugin.viz` draw exactly these values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fv_plugin.architectures import ArchSpec, resolve_architecture
from fv_plugin.devices import execution_device, input_device, input_dtype
from fv_plugin.records import Sweep
from fv_plugin.vector import FunctionVector

__all__ = [
    "HeadLocation",
    "TokenScore",
    "aie_matrix",
    "head_locations",
    "layer_sweep",
    "similarity_matrix",
    "top_tokens",
]


@dataclass(frozen=True)
class TokenScore:
    """One vocabulary entry: its ``token`` text, id, and ``logit`` (and softmax ``prob``) under the vector."""

    token: str
    token_id: int
    logit: float
    prob: float


@torch.no_grad()
def top_tokens(
    model: nn.Module, tokenizer: object, fv: FunctionVector, k: int = 10, *, arch: ArchSpec | None = None
) -> list[TokenScore]:
    """The ``k`` tokens the vector promotes most: its logits through the final norm and the unembedding.

    This decodes the vector as if it were the final hidden state (the "logit lens" view the paper uses).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    resolved = resolve_architecture(model, arch)
    if fv.size != resolved.hidden_size:
        raise ValueError(f"the vector has size {fv.size} but the model's hidden size is {resolved.hidden_size}")
    get_head = getattr(model, "get_output_embeddings", None)
    unembed = get_head() if callable(get_head) else None
    if unembed is None:
        raise ValueError(
            f"{type(model).__name__} has no output embeddings; pass the *ForCausalLM model, not its base model"
        )
    norm = resolved.final_norm
    first = norm if norm is not None else unembed
    dtype = input_dtype(first, fallback=input_dtype(unembed))
    hidden = fv.vector.reshape(1, 1, -1).to(device=execution_device(first) or input_device(model), dtype=dtype)
    if norm is not None:
        hidden = norm(hidden)
    logits = unembed(hidden.to(device=execution_device(unembed) or hidden.device)).float()[0, 0].cpu()
    vocab = len(tokenizer)  # type: ignore[arg-type]
    logits = logits[:vocab]  # the embedding matrix may be padded past the tokenizer's vocabulary
    probs = logits.softmax(-1)
    best = logits.topk(min(k, logits.numel()))
    decode = tokenizer.decode  # type: ignore[attr-defined]
    return [
        TokenScore(token=decode([int(i)]), token_id=int(i), logit=float(v), prob=float(probs[i]))
        for v, i in zip(best.values, best.indices, strict=True)
    ]


def similarity_matrix(vectors: Sequence[FunctionVector | torch.Tensor]) -> torch.Tensor:
    """Cosine similarity of every pair of vectors, ``[n, n]`` float32 (a zero vector has similarity 0)."""
    if not vectors:
        raise ValueError("no vectors to compare")
    rows = [v.vector if isinstance(v, FunctionVector) else v for v in vectors]
    sizes = {int(r.numel()) for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"vectors of different sizes {sorted(sizes)} cannot be compared; use one model's vectors")
    stacked = torch.stack([r.detach().reshape(-1).float().cpu() for r in rows])
    unit = stacked / stacked.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T


def aie_matrix(fv: FunctionVector) -> torch.Tensor | None:
    """The ``[layers, heads]`` average indirect effects stored with a head-based vector (``fv.aie``), or ``None``."""
    return fv.aie


def layer_sweep(fv: FunctionVector) -> Sweep | None:
    """The validation sweep that chose the vector's layer (``fv.layer_sweep``), or ``None`` if the layer was given."""
    return fv.layer_sweep


@dataclass(frozen=True)
class HeadLocation:
    """A head chosen by AIE: its layer, index, AIE and relative depth ``layer / (layers - 1)`` in [0, 1]."""

    layer: int
    head: int
    aie: float
    depth: float


def head_locations(fv: FunctionVector, num_layers: int | None = None) -> list[HeadLocation]:
    """Where the vector's heads sit; ``num_layers`` defaults to the rows of its stored AIE matrix."""
    if not fv.heads:
        raise ValueError(f"the vector (method {fv.method!r}) has no heads; extract it with method='heads'")
    if num_layers is None:
        aie = aie_matrix(fv)
        if aie is None:
            raise ValueError("the vector stores no AIE matrix: pass num_layers")
        num_layers = aie.shape[0]
    scores = fv.head_scores or tuple(float("nan") for _ in fv.heads)
    span = max(num_layers - 1, 1)
    return [
        HeadLocation(layer=layer, head=head, aie=float(score), depth=layer / span)
        for (layer, head), score in zip(fv.heads, scores, strict=True)
    ]
