"""What a new user meets first: the tokenizer load_model gives, the pipeline, the command line's help and errors,
strengths the model's dtype cannot hold, task files with newlines and with their own splits."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model
from transformers import PreTrainedTokenizerFast

import fv_plugin
from fv_plugin import cli

ROOT = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------------------------------- command line
HELP_IMPORTS = """
import contextlib, io, sys
from fv_plugin import cli
for args in (["--help"], *[[command, "--help"] for command in cli.COMMANDS]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli.main(args)
    assert "usage: fv" in out.getvalue() and "--help" in out.getvalue(), (args, out.getvalue())
print(sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers", "safetensors", "tqdm"}))
"""


def test_help_of_fv_and_every_command_imports_neither_torch_nor_transformers() -> None:
    out = subprocess.run(
        [sys.executable, "-c", HELP_IMPORTS], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_importing_the_package_is_lazy_and_every_public_name_resolves() -> None:
    code = "import sys, fv_plugin; print('torch' in sys.modules); print(fv_plugin.Task.__module__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "fv_plugin.tasks"]
    from fv_plugin import FunctionVector, steer

    assert steer is fv_plugin.steering.steer and FunctionVector is fv_plugin.vector.FunctionVector
    # The names type checkers see (the TYPE_CHECKING imports) are the names the package exports.
    tree = ast.parse((ROOT / "fv_plugin" / "__init__.py").read_text(encoding="utf-8"))
    checked = {
        alias.name: node.module
        for block in tree.body
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert set(checked) | {"__version__"} == set(fv_plugin.__all__)
    for name, module in checked.items():
        assert getattr(fv_plugin, name) is getattr(importlib.import_module(str(module)), name), name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = fv_plugin.nothing_here


def _bad_task(tmp_path: Path) -> Path:
    path = tmp_path / "bad.json"
    path.write_text('[{"input": "hot", "output": "cold"}, {"input": "up"}]', encoding="utf-8")
    return path


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the task files were checked")

    monkeypatch.setattr(fv_plugin.models, "load_model", refuse)


@pytest.mark.parametrize("command", ["extract", "eval", "compare"])
def test_a_bad_task_file_fails_in_one_line_before_any_model_loads(
    command: str, tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    task = str(_bad_task(tmp_path))
    argv = [command, "--task" if command == "extract" else "--tasks", task, "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("fv: error: ") and err.count("\n") == 1, err
    assert "bad.json, item 1" in err and "'output'" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_before_or_after_the_command_prints_the_traceback(
    where: str, tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["extract", "--task", str(_bad_task(tmp_path)), "--out", str(tmp_path / "v.safetensors")]
    argv = ["-v", *argv] if where == "before" else [*argv, "-v"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError" in err
    assert err.rstrip().splitlines()[-1].startswith("fv: error: ")


def test_a_missing_vector_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", "--vector", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.startswith("fv: error: ")


# ------------------------------------------------------------------------- strengths the dtype cannot hold
def _norm_1000(layer: int = 1) -> fv_plugin.FunctionVector:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    return fv_plugin.FunctionVector(vector=vector * (1000.0 / vector.norm()), layer=layer)


@pytest.mark.parametrize(
    ("dtype", "too_strong", "fine"),
    [(torch.float32, 1e30, 1e3), (torch.float16, 1e5, 1.0)],
)
def test_a_strength_the_model_dtype_cannot_hold_is_refused_before_the_model_runs(
    dtype: torch.dtype, too_strong: float, fine: float
) -> None:
    model = tiny_model("llama", dtype)
    fv = _norm_1000()
    ids = torch.tensor([[5, 6, 7, 8]])
    forwards: list[int] = []
    handle = model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        cases = {
            "steer": lambda: fv_plugin.steer(model, fv, strength=too_strong).__enter__(),
            "pair weight": lambda: fv_plugin.steer(model, (fv, too_strong)).__enter__(),
            "per-row": lambda: fv_plugin.steer(model, rows=[[fv], [(fv, too_strong)]]).__enter__(),
            "row strengths": lambda: fv_plugin.steer(model, fv, strength=torch.tensor([0.0, too_strong])).__enter__(),
            "processor": lambda: fv_plugin.attach(model).generate(
                input_ids=ids,
                max_new_tokens=2,
                logits_processor=[fv_plugin.FunctionVectorProcessor(fv, strength=too_strong)],
            ),
            "SteeredModel": lambda: fv_plugin.SteeredModel(model, [fv], strength=too_strong).generate(
                input_ids=ids, max_new_tokens=2
            ),
            "SteeredModel call": lambda: fv_plugin.SteeredModel(model).generate(
                input_ids=ids, max_new_tokens=2, steering=[(fv, too_strong)]
            ),
        }
        for name, run in cases.items():
            with pytest.raises(ValueError, match=f"more than {dtype} can hold"):
                run()
            assert forwards == [], name
        with fv_plugin.steer(model, fv, strength=fine):  # a large but representable strength still steers
            out = model(input_ids=ids).logits
        assert bool(torch.isfinite(out).all()) and forwards == [1]
    finally:
        handle.remove()
        fv_plugin.detach(model)
