"""Where things live inside each model family: one table keyed by ``config.model_type``.

Lookup order: a user override (``arch=`` argument or :func:`register_architecture`), the table, then a
generic fallback that finds the longest ``nn.ModuleList`` of the model's decoder blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

__all__ = ["ArchSpec", "ResolvedArch", "register_architecture", "resolve_architecture"]


@dataclass(frozen=True)
class ArchSpec:
    """Paths of the modules fv_plugin uses, relative to the model passed in.

    Attributes:
        layers: dotted path of the ``nn.ModuleList`` of decoder blocks, e.g. ``"model.layers"``.
        attn: path of the attention module inside one block, e.g. ``"self_attn"``.
        out_proj: path of the attention output projection inside ``attn``, e.g. ``"o_proj"``.
        attn_out_norm: path (inside one block) of a norm applied to the attention output before it joins the
            residual stream (Gemma 2/3, OLMo 2), or ``None``.
        num_heads_attr: config attribute holding the number of query heads.
        final_norm: path of the norm applied after the last decoder layer (before the unembedding).
    """

    layers: str
    attn: str = "self_attn"
    out_proj: str = "o_proj"
    attn_out_norm: str | None = None
    num_heads_attr: str = "num_attention_heads"
    final_norm: str | None = "model.norm"


_LLAMA_LIKE = ArchSpec(layers="model.layers")
_POST_NORM = ArchSpec(layers="model.layers", attn_out_norm="post_attention_layernorm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        layers="transformer.h", attn="attn", out_proj="c_proj", num_heads_attr="n_head", final_norm="transformer.ln_f"
    ),
    "gptj": ArchSpec(
        layers="transformer.h", attn="attn", out_proj="out_proj", num_heads_attr="n_head", final_norm="transformer.ln_f"
    ),
    "gpt_neox": ArchSpec(
        layers="gpt_neox.layers", attn="attention", out_proj="dense", final_norm="gpt_neox.final_layer_norm"
    ),
    "falcon": ArchSpec(layers="transformer.h", attn="self_attention", out_proj="dense", final_norm="transformer.ln_f"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "gemma2": _POST_NORM,
    "gemma3_text": _POST_NORM,
    "gemma3": dataclasses.replace(
        _POST_NORM, layers="model.language_model.layers", final_norm="model.language_model.norm"
    ),
    "olmo2": _POST_NORM,
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Teach fv_plugin a model family (or replace what it knows), keyed by ``config.model_type``."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"spec must be an fv_plugin.ArchSpec, got {type(spec).__name__}")
    ARCHITECTURES[model_type] = spec


@dataclass(frozen=True)
class ResolvedArch:
    """An :class:`ArchSpec` resolved against one model instance."""

    spec: ArchSpec
    layers: nn.ModuleList
    base: nn.Module  # the module that owns ``layers`` and runs them in order
    hidden_size: int
    num_heads: int | None
    model_type: str
    final_norm: nn.Module | None = None  # None when it cannot be found (fast paths then fall back)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].get_submodule(self.spec.attn)

    def out_proj(self, layer: int) -> nn.Module:
        return self.attention(layer).get_submodule(self.spec.out_proj)


def _get_path(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _find_layers(model: nn.Module, path: str) -> tuple[nn.ModuleList, str] | None:
    # Accept both the *ForCausalLM model and its base model (paths then lose their first component).
    parts = path.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        found = _get_path(model, candidate)
        if isinstance(found, nn.ModuleList):
            return found, candidate
    return None


def _fallback_layers(model: nn.Module) -> str | None:
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        first = type(module[0]).__name__
        if block_names and first not in block_names:
            continue
        if best is None or len(module) > best[0]:
            best = (len(module), name)
    return None if best is None else best[1]


def _config(model: nn.Module) -> object:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"{type(model).__name__} has no `.config`; fv_plugin needs a Hugging Face transformers model "
            "(a PreTrainedModel such as the one AutoModelForCausalLM returns)."
        )
    text_config = getattr(config, "get_text_config", None)
    return text_config() if callable(text_config) else config


def resolve_architecture(model: nn.Module, arch: ArchSpec | None = None) -> ResolvedArch:
    """Find the decoder layers and related modules of ``model``.

    Raises:
        ValueError: when the layers cannot be found; the message names the ``arch=`` override.
    """
    config = _config(model)
    top_config = getattr(model, "config", config)
    model_type = str(getattr(top_config, "model_type", None) or getattr(config, "model_type", "unknown"))
    spec = arch or ARCHITECTURES.get(model_type) or ARCHITECTURES.get(str(getattr(config, "model_type", "")))
    found = _find_layers(model, spec.layers) if spec is not None else None
    if found is None and arch is None:
        path = _fallback_layers(model)
        if path is not None:
            spec = dataclasses.replace(spec or ArchSpec(layers=path), layers=path)
            found = _find_layers(model, path)
    if found is None or spec is None:
        raise ValueError(
            f"Could not find the decoder layers of model_type {model_type!r} ({type(model).__name__}). "
            "Tell fv_plugin where they are with `arch=fv_plugin.ArchSpec(layers='model.layers', "
            "attn='self_attn', out_proj='o_proj')` or `fv_plugin.register_architecture("
            f"{model_type!r}, ArchSpec(...))`."
        )
    layers, path = found
    base_path = path.rpartition(".")[0]
    base = model.get_submodule(base_path) if base_path else model
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not isinstance(hidden, int):
        raise ValueError(f"model_type {model_type!r}: config has no integer `hidden_size` or `n_embd`.")
    heads = getattr(config, spec.num_heads_attr, None)
    norm = _find_module(model, spec.final_norm) if spec.final_norm else None
    return ResolvedArch(
        spec=dataclasses.replace(spec, layers=path),
        layers=layers,
        base=base,
        hidden_size=hidden,
        num_heads=heads if isinstance(heads, int) else None,
        model_type=model_type,
        final_norm=norm,
    )


def _find_module(model: nn.Module, path: str) -> nn.Module | None:
    parts = path.split(".")
    for start in range(len(parts)):
        found = _get_path(model, ".".join(parts[start:]))
        if found is not None:
            return found
    return None
