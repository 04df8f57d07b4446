"""What a new user meets first: the tokenizer load_model gives, the pipeline, the command line's help and errors,
strengths the model's dtype cannot hold, task files with newlines and with their own splits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model
from transformers import PreTrainedTokenizerFast

import fv_plugin


def _right_padding_tokenizer_without_pad() -> PreTrainedTokenizerFast:
    """A character-level tokenizer as many checkpoints ship it: right padding, no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(i): i for i in range(3, VOCAB)}
    vocab.update({"<unused>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.padding_side = "right"
    return fast


def _greedy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> list[list[int]]:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None)
    return out[:, batch["input_ids"].shape[1] :].tolist()


def test_load_model_tokenizer_generates_a_batch_as_each_prompt_alone(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    shipped = _right_padding_tokenizer_without_pad()
    assert shipped.pad_token is None
    shipped.save_pretrained(tmp_path)
    model, tokenizer = fv_plugin.load_model(str(tmp_path))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.eos_token
    prompts = ["the quick brown fox jumps over", "hi"]
    alone = [_greedy(model, tokenizer, [prompt])[0] for prompt in prompts]
    assert _greedy(model, tokenizer, prompts) == alone
    # The oracle can tell: padded on the right, the short row continues after its pad tokens.
    tokenizer.padding_side = "right"
    assert _greedy(model, tokenizer, prompts) != alone


def test_a_tokenizer_without_pad_or_eos_token_is_left_with_a_warning() -> None:
    tokenizer = _right_padding_tokenizer_without_pad()
    tokenizer.eos_token = None
    with pytest.warns(UserWarning, match="neither a pad token nor an end-of-text token"):
        fv_plugin.models.ready_for_batches(tiny_model("llama"), tokenizer)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is None
