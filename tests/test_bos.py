"""One BOS setting (``prepend_bos``) reaches every path that turns prompts into tokens, and the vector keeps it."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, fresh_model, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import processors

import fv_plugin

BOS = 1  # char_tokenizer's "<s>": it never adds it itself
SMALL = fv_plugin.ExtractionConfig(
    n_mean=4, n_aie=2, n_shots=3, k=2, ks=(2,), strengths=(1.0,), head_strengths=(1.0,), max_validation=4,
    screen_queries=2, finalists=1, condition=False,  # the condition fit tokenizes its own prompts
)  # fmt: skip


@contextmanager
def first_tokens(model: torch.nn.Module) -> Iterator[list[int]]:
    """Oracle: the first real (unpadded) token of every row of every forward that starts a prompt (no cache yet)."""
    seen: list[int] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 models take either name
        if ids is None or (cache is not None and cache.get_seq_length() > 0):
            return
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        if mask.shape != ids.shape:  # the rest of a prompt whose start is cached
            return
        for row, keep in zip(ids, mask, strict=True):
            seen.append(int(row[keep.bool()][0]))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def test_prompt_tokenizer_puts_bos_first_once_and_leaves_the_rest_alone() -> None:
    tok = char_tokenizer()
    bos = fv_plugin.prompt_tokenizer(tok, prepend_bos=True)
    assert bos("ab")["input_ids"] == [BOS, *tok("ab")["input_ids"]]
    assert bos("ab", add_special_tokens=False)["input_ids"] == tok("ab")["input_ids"]  # answers stay bare
    batch = bos(["ab", "c"], return_tensors="pt", padding=True, padding_side="left")
    assert batch["input_ids"].tolist() == [[BOS, 97, 98], [0, BOS, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert fv_plugin.prompt_tokenizer(bos, prepend_bos=False) is tok and bos.pad_token_id == tok.pad_token_id
    adds = copy.deepcopy(tok)  # a tokenizer that adds BOS itself gets no second one
    adds.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert fv_plugin.prompt_tokenizer(adds, prepend_bos=True)("ab")["input_ids"] == [BOS, 97, 98]
    none = copy.deepcopy(tok)
    none.bos_token = None
    with pytest.raises(ValueError, match="no BOS token"):
        fv_plugin.prompt_tokenizer(none, prepend_bos=True)
    with pytest.raises(TypeError, match="prepend_bos"):
        fv_plugin.ExtractionConfig(prepend_bos="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_extraction_and_evaluation_tokenize_every_prompt_with_the_setting(prepend_bos: bool) -> None:
    model, tok, task = tiny_model("llama"), char_tokenizer(), fv_plugin.load_task("antonym")
    config = dataclasses.replace(SMALL, prepend_bos=prepend_bos)
    with first_tokens(model) as seen, warnings.catch_warnings():
        warnings.simplefilter("ignore", fv_plugin.WeakVectorWarning)  # a random model makes a weak vector
        fv = fv_plugin.extract_function_vector(model, tok, task, config, progress=False)
    assert fv.prepend_bos is prepend_bos and len(seen) > 10
    assert all(t == BOS for t in seen) if prepend_bos else BOS not in seen
    with first_tokens(model) as seen:  # evaluation follows the vector, generation included
        fv_plugin.evaluate(model, tok, task, vectors=[fv], n=3, generate=True, max_new_tokens=2)
        fv_plugin.evaluate(model, tok, task, mode="icl", n_shots=2, n=2, prepend_bos=prepend_bos)
        fv_plugin.sweep_strength(model, tok, task, fv, [1.0], n=2)
    assert len(seen) >= 9 and (all(t == BOS for t in seen) if prepend_bos else BOS not in seen)
    other = dataclasses.replace(fv, config=dataclasses.replace(config, prepend_bos=not prepend_bos))
    with pytest.raises(ValueError, match="with and without a BOS"):
        fv_plugin.evaluate(model, tok, task, vectors=[fv, other], n=2)


def test_the_setting_round_trips_through_the_vector_file(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, prepend_bos=True)
    fv = fv_plugin.FunctionVector(vector=torch.randn(64), layer=1, task="antonym", config=config)
    path = tmp_path / "fv.safetensors"
    fv.save(path)
    assert fv_plugin.FunctionVector.load(path).prepend_bos is True
    with safe_open(str(path), framework="pt") as handle:  # a file written before the setting existed
        header = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    meta = json.loads(header["fv_metadata"])
    del meta["config"]["prepend_bos"]
    del meta["config"]["accuracy_tolerance"]
    save_file(tensors, str(path), metadata={**header, "fv_metadata": json.dumps(meta)})
    old = fv_plugin.FunctionVector.load(path)
    assert old.prepend_bos is False
    assert old.config is not None and old.config.accuracy_tolerance == 0.0  # before it existed: the most accurate
    assert fv.config is not None and fv.config.accuracy_tolerance == "se"  # the default now
    assert fv_plugin.FunctionVector(vector=torch.randn(64), layer=1).prepend_bos is False  # no config: none


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_the_demo_tokenizes_its_rows_as_the_first_vectors_prompts_were(prepend_bos: bool) -> None:
    pytest.importorskip("gradio")
    from demo.engine import Engine, SteerRequest

    config = dataclasses.replace(SMALL, prepend_bos=prepend_bos)
    fv = fv_plugin.FunctionVector(vector=torch.randn(64), layer=1, task="antonym", config=config)
    engine = Engine(fresh_model("llama"), char_tokenizer(), model_name="tiny")
    job, _, _ = engine.job(SteerRequest("Q: hot\nA:", ((fv, 1.0),), task=fv_plugin.load_task("antonym")))
    plain, steered, icl = job.rows
    expected = fv_plugin.prompt_tokenizer(char_tokenizer(), prepend_bos=prepend_bos)("Q: hot\nA:")["input_ids"]
    assert list(plain.ids) == list(steered.ids) == expected
    full = (icl.prefix.ids if icl.prefix is not None else ()) + icl.ids
    assert (full[0] == BOS) is prepend_bos and full[-len(expected) + prepend_bos :] == tuple(expected[prepend_bos:])
