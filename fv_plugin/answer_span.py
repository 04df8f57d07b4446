"""``positions="answer"``: which tokens end an answer (a newline or an end of sequence), from the tokenizer.

The steering hooks see token ids, not text: :func:`answer_end_ids` lists the ids whose text contains a newline,
and the end-of-sequence ids of the tokenizer and of the model's generation config. It decodes the whole
vocabulary once per tokenizer (about a second for 50k tokens) and keeps the result.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

__all__ = ["answer_end_ids", "answer_ends_for", "end_of_sequence_ids"]

_CACHE: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _eos_ids(value: object) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def end_of_sequence_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """The end-of-sequence ids of the tokenizer and of ``model.generation_config`` (where generation stops)."""
    config = getattr(model, "generation_config", None)
    found = _eos_ids(getattr(tokenizer, "eos_token_id", None)) + _eos_ids(getattr(config, "eos_token_id", None))
    return sorted(set(found))


def _decoded_ends(tokenizer: Any) -> list[int]:
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False)
    return [i for i, text in enumerate(texts) if "\n" in text]


def answer_end_ids(tokenizer: Any, model: Any = None) -> torch.Tensor:
    """Sorted ``int64`` ids of the tokens that end an answer: every token whose text holds a newline, the
    tokenizer's end-of-sequence token and ``model.generation_config.eos_token_id`` (when ``model`` is given).

    Raises:
        TypeError: when ``tokenizer`` cannot decode token ids (it is not a tokenizer).
    """
    if not callable(getattr(tokenizer, "batch_decode", None)) or not hasattr(tokenizer, "__len__"):
        raise TypeError(
            f"positions='answer' needs the model's tokenizer (tokenizer=...) to know which tokens end an answer, "
            f"got {type(tokenizer).__name__}"
        )
    with _LOCK:
        found = _CACHE.get(tokenizer)
    if found is None:
        found = torch.tensor(sorted(set(_decoded_ends(tokenizer))), dtype=torch.long)
        with _LOCK:
            _CACHE[tokenizer] = found
    extra = torch.tensor(end_of_sequence_ids(tokenizer, model), dtype=torch.long)
    return torch.unique(torch.cat([found, extra]))


def answer_ends_for(positions: str | None, tokenizer: Any, model: Any) -> torch.Tensor | None:
    """The end ids a steering with ``positions`` needs (``None`` unless it is ``"answer"``)."""
    if positions != "answer":
        return None
    if tokenizer is None:
        raise ValueError(
            "positions='answer' needs the model's tokenizer to know which tokens end an answer (a newline, an end "
            "of sequence): pass tokenizer=..., e.g. steer(model, fv, positions='answer', tokenizer=tokenizer)"
        )
    return answer_end_ids(tokenizer, model)
