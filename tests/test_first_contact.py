"""What a new user meets first: the tokenizer load_model gives, the pipeline, the command line's help and errors,
strengths the model's dtype cannot hold, task files with newlines and with their own splits."""

from __future__ import annotations

import ast
import importlib
import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, char_tokenizer, tiny_model
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


# --------------------------------------------------------------------------------------------- pipelines
def test_steered_model_in_a_pipeline_without_the_unsupported_model_message(caplog: pytest.LogCaptureFixture) -> None:
    from transformers import pipeline

    model, tokenizer = tiny_model("llama"), char_tokenizer()
    fv = fv_plugin.FunctionVector(vector=torch.randn(64, generator=torch.Generator().manual_seed(3)) * 40, layer=1)
    options = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
    library = logging.getLogger("transformers")  # it logs to its own handler and does not propagate
    library.addHandler(caplog.handler)
    try:
        steered = pipeline("text-generation", model=fv_plugin.SteeredModel(model, [fv]), tokenizer=tokenizer)
        got = steered("the quick brown fox", **options)[0]["generated_text"]
    finally:
        library.removeHandler(caplog.handler)
    assert "is not supported for text-generation" not in caplog.text, caplog.text[:300]
    assert type(steered.model) is fv_plugin.SteeredModel and isinstance(steered.model, type(model))
    with pytest.raises(TypeError, match="wrapped_model"):  # our own functions still see the wrapper
        fv_plugin.attach(steered.model)
    plain = pipeline("text-generation", model=model, tokenizer=tokenizer)("the quick brown fox", **options)
    ids = tokenizer("the quick brown fox", return_tensors="pt")
    with fv_plugin.steer(model, fv):  # the oracle: the same generation steered directly
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert got == expected and got != plain[0]["generated_text"]


# ------------------------------------------------------------------------------------ task files and splits
GERMAN = [
    ("dog", "Hund\n"),
    ("cat", "Katze"),
    ("house", "Haus\n"),
    ("tree", "Baum"),
    ("water", "Wasser"),
    ("sun", "Sonne"),
]
QA = [
    ("Where does a fish live?\nA. tree\nB. river\nC. sky", "B"),
    ("What do you wear on your feet?\nA. shoes\nB. hat\nC. gloves", "A"),
    ("What is cold?\nA. fire\nB. sun\nC. ice", "C"),
    ("What do bees make?\nA. milk\nB. honey\nC. wool", "B"),
    ("Which one is a fruit?\nA. apple\nB. stone\nC. chair", "A"),
    ("Which one flies?\nA. cow\nB. fish\nC. bird", "C"),
]


def _write_rows(path: Path, rows: list[tuple[str, str]], **extra: list[str]) -> Path:
    items = [{"input": x, "output": y, **{k: v[i] for k, v in extra.items()}} for i, (x, y) in enumerate(rows)]
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def test_task_fields_may_hold_newlines_inside_and_lose_them_at_the_ends(tmp_path: Path) -> None:
    german = fv_plugin.load_task(_write_rows(tmp_path / "english_german.json", GERMAN))
    assert [p.output for p in german.pairs] == [y.strip() for _, y in GERMAN]
    qa = fv_plugin.load_task(_write_rows(tmp_path / "commonsense_qa.json", QA))
    assert [p.input for p in qa.pairs] == [x for x, _ in QA]
    csv_file = tmp_path / "windows.csv"
    csv_file.write_bytes(b'input,output\r\n"two\r\nlines",a\r\nthree,b\r\n')
    assert fv_plugin.load_task(csv_file).pairs[0].input == "two\nlines"
    # Prompts keep the template around such fields, and the answer's tokens are the whole answer.
    prompts = fv_plugin.make_prompts(qa, n_shots=2, split="train")
    tokenizer = char_tokenizer()
    encoded = fv_plugin.encode_prompts(tokenizer, prompts)
    for prompt, answers in zip(prompts, encoded.answer_tokens, strict=True):
        demos = "".join(f"Q: {d.input}\nA: {d.output}\n\n" for d in prompt.demos)
        assert prompt.text == demos + f"Q: {prompt.query.input}\nA:"
        assert prompt.answer == " " + prompt.query.output
        assert answers[0] == tuple(tokenizer.convert_tokens_to_ids(list(prompt.answer)))


def test_an_answer_with_a_newline_inside_is_scored_on_its_first_token_and_matched_whole() -> None:
    from fv_plugin.evaluation import starts_with_answer

    pair = fv_plugin.Pair(input="write two lines", output="first\nsecond")
    task = fv_plugin.Task("lines", (pair, fv_plugin.Pair(input="one", output="uno")))
    prompts = [p for split in ("train", "test") for p in fv_plugin.make_prompts(task, n_shots=0, split=split)]
    (prompt,) = [p for p in prompts if p.query == pair]
    encoded = fv_plugin.encode_prompts(char_tokenizer(), [prompt])
    assert int(encoded.answer_ids[0]) == char_tokenizer().convert_tokens_to_ids(" ")  # what the model says next
    assert starts_with_answer(" first\nsecond\n\nQ: more", prompt.answers)
    assert not starts_with_answer(" first second", prompt.answers)


def _pairs(rows: list[tuple[str, str]]) -> tuple[fv_plugin.Pair, ...]:
    return tuple(fv_plugin.Pair(input=x, output=y.strip()) for x, y in rows)


def test_without_its_own_splits_a_task_is_split_50_20_30_by_a_seeded_shuffle() -> None:
    pairs = tuple(fv_plugin.Pair(input=f"in {i}", output=f"out {i % 7}") for i in range(40))
    task = fv_plugin.Task("numbers", pairs)
    order = list(range(40))
    random.Random("numbers:0").shuffle(order)  # the documented rule, written out
    assert task.test == tuple(pairs[i] for i in order[:12])
    assert task.valid == tuple(pairs[i] for i in order[12:20])
    assert task.train == tuple(pairs[i] for i in order[20:])


def test_a_task_with_its_own_splits_uses_them_exactly(tmp_path: Path) -> None:
    train, valid, test = GERMAN[:3], GERMAN[3:4], GERMAN[4:]
    expected = (_pairs(train), _pairs(valid), _pairs(test))
    # In the API: one split name per pair, or the three parts.
    labels = ("train",) * 3 + ("valid",) + ("test",) * 2
    by_label = fv_plugin.Task("de", _pairs(GERMAN), splits=labels)
    by_parts = fv_plugin.Task.from_splits("de", *expected)
    # In files: a folder of split files (any of the three formats), split files, or a "split" field.
    folder = tmp_path / "de"
    folder.mkdir()
    _write_rows(folder / "train.json", train)
    (folder / "validation.jsonl").write_text(json.dumps({"input": valid[0][0], "output": valid[0][1]}) + "\n")
    (folder / "test.csv").write_text("input,output\n" + "".join(f"{x},{y.strip()}\n" for x, y in test))
    from_folder = fv_plugin.load_task(folder)
    from_files = fv_plugin.load_task(folder / "train.json", valid=folder / "validation.jsonl", test=folder / "test.csv")
    names = ["train", "train", "train", "dev", "test", "test"]
    from_field = fv_plugin.load_task(_write_rows(tmp_path / "marked.json", GERMAN, split=names))
    for task in (by_label, by_parts, from_folder, from_files, from_field):
        assert (task.train, task.valid, task.test) == expected, task.source
    assert from_folder.name == from_files.name == "de"


@pytest.mark.parametrize(
    ("rows", "extra", "match"),
    [
        (GERMAN, dict(split=["train", "test", "train", "", "test", "train"]), "item 3: no .split. field"),
        (GERMAN, dict(split=["train", "test", "holdout", "train", "test", "train"]), "'split' must be one of"),
        (GERMAN, dict(split=["test"] * 6), "no train pairs"),
    ],
)
def test_bad_split_fields_are_clear_errors(
    tmp_path: Path, rows: list[tuple[str, str]], extra: dict[str, list[str]], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        fv_plugin.load_task(_write_rows(tmp_path / "task.json", rows, **extra))


def test_a_folder_without_a_train_file_is_a_clear_error(tmp_path: Path) -> None:
    _write_rows(tmp_path / "test.json", GERMAN)
    with pytest.raises(ValueError, match="no train file"):
        fv_plugin.load_task(tmp_path)
    with pytest.raises(ValueError, match="splits must be a tuple"):
        fv_plugin.Task("de", _pairs(GERMAN), splits=("train",))


def test_fv_extract_takes_a_task_with_its_own_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[fv_plugin.Task] = []
    real = fv_plugin.tasks.load_task

    def record(*args: object, **kwargs: object) -> fv_plugin.Task:
        seen.append(real(*args, **kwargs))  # type: ignore[arg-type]
        return seen[-1]

    class Stop(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> None:
        raise Stop

    monkeypatch.setattr(fv_plugin.tasks, "load_task", record)
    monkeypatch.setattr(fv_plugin.models, "load_model", stop)
    train = _write_rows(tmp_path / "train.json", GERMAN[:4])
    test = _write_rows(tmp_path / "test.json", GERMAN[4:])
    with pytest.raises(Stop):
        cli.main(["extract", "--task", str(train), "--test", str(test), "--out", str(tmp_path / "v.safetensors")])
    assert seen[0].train == _pairs(GERMAN[:4]) and seen[0].test == _pairs(GERMAN[4:]) and seen[0].valid == ()
