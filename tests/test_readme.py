"""The README's examples: the Steer block runs as written, and every name the other blocks use exists."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import fv_plugin

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_three_examples() -> None:
    blocks = _python_blocks()
    assert any("fv_plugin.steer(" in b for b in blocks), "the Steer example is missing"
    assert any("extract_function_vector(" in b for b in blocks), "the Extract example is missing"
    assert any("fv_plugin.vllm import steering" in b for b in blocks), "the Serve example is missing"


def test_readme_names_exist() -> None:
    """Every `fv_plugin.NAME` the README's Python blocks use is public."""
    used = {name for block in _python_blocks() for name in re.findall(r"\bfv_plugin\.([A-Za-z_]+)\b", block)}
    submodules = {"vllm", "viz", "compare", "side_effects", "experiments", "report", "export", "benchmarks"}
    missing = sorted(n for n in used if n not in fv_plugin.__all__ and n not in submodules)
    assert not missing, f"the README uses names that are not public: {missing}"


@pytest.mark.slow
def test_readme_steer_example_runs_and_steers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    block = next(b for b in _python_blocks() if "fv_plugin.steer(" in b)
    steered, plain = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(steered):
        exec(compile(block, "README.md", "exec"), {})
    # The same block without the steering context: the vector must change what the model writes.
    unsteered = block.replace("with fv_plugin.steer(model, fv):", "if True:")
    assert unsteered != block
    with contextlib.redirect_stdout(plain):
        exec(compile(unsteered, "README.md", "exec"), {})
    assert steered.getvalue().strip() and steered.getvalue() != plain.getvalue()
