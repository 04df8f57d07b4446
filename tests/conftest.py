"""Tiny random models of every supported family, built from configs (no network), and oracles."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 128
_LLAMA_LIKE = dict(
    hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
)
FAMILY_CONFIGS: dict[str, dict[str, object]] = {
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, n_positions=256),
    "gptj": dict(n_embd=64, n_layer=3, n_head=4, n_positions=256, rotary_dim=8),
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128),
    "falcon": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": dict(_LLAMA_LIKE, head_dim=16),
    "gemma": dict(_LLAMA_LIKE, num_key_value_heads=1, head_dim=16),
    "gemma2": dict(_LLAMA_LIKE, num_key_value_heads=1, head_dim=16),
    "gemma3_text": dict(_LLAMA_LIKE, num_key_value_heads=1, head_dim=16),
    "phi3": dict(_LLAMA_LIKE, pad_token_id=0),
    "olmo2": _LLAMA_LIKE,
}
FAMILIES = list(FAMILY_CONFIGS)


def make_config(family: str, **overrides: object) -> object:
    kwargs = dict(FAMILY_CONFIGS[family], vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


@functools.cache
def tiny_model(family: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **config: object) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, **config))
    # Larger random weights give sharper, less tie-prone next-token distributions.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(4.0)
    return model.to(dtype).eval()


def fresh_model(family: str = "llama", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A model nobody else has attached to (hook-count tests)."""
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(make_config(family)).to(dtype).eval()


@pytest.fixture
def llama() -> nn.Module:
    return tiny_model("llama")


@functools.cache
def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ASCII (ids < 128), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i): i for i in range(3, VOCAB)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.padding_side = "left"
    return fast


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for name in ("model.layers", "transformer.h", "gpt_neox.layers"):
        with contextlib.suppress(AttributeError):
            found = model.get_submodule(name)
            if isinstance(found, nn.ModuleList):
                return found
    raise LookupError(type(model).__name__)


@contextlib.contextmanager
def next_layer_input(model: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Oracle: the hidden states entering layer ``layer + 1``, recorded by a forward pre-hook of the test's own."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        assert isinstance(hidden, torch.Tensor)
        seen.append(hidden.detach().clone())

    handle = decoder_layers(model)[layer + 1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def reference_steering(model: nn.Module, layer: int, delta: torch.Tensor, select: object) -> Iterator[None]:
    """Naive plain-torch steering: add ``delta`` [hidden] at positions ``select(batch, seq) -> bool mask``.

    Used with ``use_cache=False`` generation, where every forward sees the whole sequence.
    """

    def hook(module: nn.Module, args: object, output: object) -> object:
        hidden = output if isinstance(output, torch.Tensor) else output[0]  # type: ignore[index]
        mask = select(hidden.shape[0], hidden.shape[1])  # type: ignore[operator]
        steered = hidden + mask[..., None].to(hidden.dtype) * delta.to(hidden.dtype)
        return steered if isinstance(output, torch.Tensor) else (steered, *output[1:])  # type: ignore[index]

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def generate_cached_and_uncached(
    model: nn.Module,
    vectors: tuple[object, ...],
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    new: int = 5,
    **steer_options: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation under ``fv_plugin.steer`` with the KV cache and without it."""
    import fv_plugin

    outs = []
    for use_cache in (True, False):
        with fv_plugin.steer(model, *vectors, **steer_options):  # type: ignore[arg-type]
            outs.append(
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    do_sample=False,
                    use_cache=use_cache,
                    pad_token_id=0,
                    eos_token_id=None,
                )
            )
    return outs[0], outs[1]
