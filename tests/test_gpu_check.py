"""examples/gpu_check.py without CUDA: its message, its arguments, and the checks it runs, on CPU tiny models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_model

from fv_plugin.runtime import LayerDelta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import gpu_check


def test_without_cuda_it_says_so_and_exits_cleanly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert "CUDA is not available" in out and "nothing was checked" in out


def test_arguments_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    args = gpu_check.parse_args(["--skip", "overhead, extract", "--layer", "2"])
    assert args.skip == {"overhead", "extract"} and args.layer == 2
    for bad in (["--skip", "fp8"], ["--gpu-fraction", "1.5"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.parse_args(bad)
        assert exc.value.code == 2
    assert "unknown check(s) ['fp8']" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_steering_check_passes_on_a_correct_model(dtype: torch.dtype) -> None:
    model = tiny_model("llama", dtype)
    detail = gpu_check.steering_check(model, char_tokenizer(), 1, torch.device("cpu"))
    assert "cached == uncached" in detail


def test_the_steering_check_fails_when_the_vector_is_not_added(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        LayerDelta, "for_batch", lambda self, batch, device, dtype: torch.zeros_like(self.rows, dtype=dtype)
    )
    with pytest.raises(AssertionError, match="differs from input \\+ vector"):
        gpu_check.steering_check(tiny_model("llama"), char_tokenizer(), 1, torch.device("cpu"))


def test_split_memory_and_the_summary() -> None:
    memory = gpu_check.split_memory(600 * 2**20, 0.5)
    assert memory[0] == "300MiB" and memory["cpu"] == f"{4 * 600 + 1024}MiB"

    def broken(args: argparse.Namespace) -> str:
        raise RuntimeError("no device")

    args = argparse.Namespace(skip={"skipped"})
    outcomes = gpu_check.run_checks(args, {"good": lambda a: "fine", "bad": broken, "skipped": lambda a: "x"})
    assert [(o.name, o.ok) for o in outcomes] == [("good", True), ("bad", False)]
    assert gpu_check.summary(outcomes) == "1/2 checks passed; failed: bad"


def test_the_extraction_check_times_both_methods_and_the_recovery() -> None:
    import warnings

    import fv_plugin

    small = fv_plugin.ExtractionConfig(n_mean=6, n_aie=2, n_shots=3, ks=(2,), strengths=(1.0,), head_strengths=(1.0,))
    with warnings.catch_warnings():  # a random model: the vector may not beat it
        warnings.simplefilter("ignore")
        line, recovery = gpu_check.extraction_check(
            tiny_model("llama"), char_tokenizer(), fv_plugin.load_task("capitalize"), small
        )
    assert "auto" in line and "heads" in line and "of ICL" in line and (recovery != recovery or recovery >= 0)
