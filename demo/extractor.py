"""What the Extract tab does, without the UI: check an uploaded task, extract a vector, score it.

Extraction runs on its own copy of the model, one at a time, so the model that serves steering requests never
carries its hooks (fv_plugin's recording and patching hooks act only in the thread that opened them; the copy
keeps the serving model free of them altogether).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fv_plugin
from demo.engine import DemoError, Limits
from fv_plugin.side_effects import TextEffects, text_effects

METHODS = fv_plugin.METHODS


@dataclass(frozen=True)
class ExtractSettings:
    """Small samples (the library defaults are 100 prompts for the means and 25 for the AIE) so that one
    extraction takes about a minute on a busy 2-core CPU instead of several."""

    n_mean: int = 8
    n_aie: int = 2
    n_shots: int = 10
    k: int = 10
    layer_stride: int = 3
    ks: tuple[int, ...] = (10, 40)  # method="auto": its grids, kept small
    strengths: tuple[float, ...] = (1.0, 2.0)
    head_strengths: tuple[float, ...] = (1.0, 4.0)
    text_paragraphs: int = 12  # side effects on the first neutral paragraphs, at these strengths
    text_strengths: tuple[float, ...] = (1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Extraction:
    """One extracted vector with its zero-shot accuracy on the task's test split, before and after."""

    fv: fv_plugin.FunctionVector
    task: fv_plugin.Task
    before: float
    after: float
    icl: float
    n_test: int
    seconds: float
    text: TextEffects


class Extractor:
    """Extracts vectors for users on a copy of the serving model.

    Args:
        model, tokenizer: the serving model (copied on first use unless ``load_copy`` is given).
        model_name: written into extracted vectors.
        limits: upload limits (default: :class:`~demo.engine.Limits`).
        settings: the extraction's sample sizes.
        load_copy: returns a second ``(model, tokenizer)``; defaults to a deep copy of ``model``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str,
        limits: Limits | None = None,
        settings: ExtractSettings = ExtractSettings(),
        load_copy: Callable[[], tuple[Any, Any]] | None = None,
    ) -> None:
        self.model_name = model_name
        self.limits = limits or Limits()
        self.settings = settings
        self.num_layers = fv_plugin.resolve_architecture(model).num_layers
        # fv_plugin drops the hooks a deep copy inherits the first time the copy is steered.
        self._load_copy = load_copy or (lambda: (copy.deepcopy(model), tokenizer))
        self._copy: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    @property
    def copy(self) -> tuple[Any, Any] | None:
        """The extraction model and tokenizer, once loaded."""
        return self._copy

    def check_task_file(self, path: str | Path) -> fv_plugin.Task:
        """Load an uploaded task file within the demo's limits, or raise a :class:`DemoError` saying why not."""
        file = Path(path)
        size = file.stat().st_size
        if size > self.limits.max_upload_bytes:
            raise DemoError(f"The file has {size:,} bytes; the demo accepts up to {self.limits.max_upload_bytes:,}.")
        try:
            task = fv_plugin.load_task(file)
        except ValueError as exc:
            raise DemoError(f"Could not read the task file: {str(exc).replace(str(file), file.name)}") from exc
        if len(task) > self.limits.max_task_pairs:
            raise DemoError(f"The task has {len(task)} pairs; the demo accepts up to {self.limits.max_task_pairs}.")
        if len(task.train) < 2 or len(task.valid) < 1:
            raise DemoError(f"The task has {len(task)} pairs; give at least 10 so it can be split for extraction.")
        return task

    def extract(self, task: fv_plugin.Task, *, method: str = "auto", progress: bool = False) -> Extraction:
        """Extract a vector for ``task`` with the demo's small settings and score it on the test split."""
        if method not in METHODS:
            raise DemoError(f"Method must be one of {METHODS}, got {method!r}.")
        s = self.settings
        with self._lock:
            if self._copy is None:
                self._copy = self._load_copy()
            model, tokenizer = self._copy
            start = time.perf_counter()
            fv = fv_plugin.extract_function_vector(
                model,
                tokenizer,
                task,
                method=method,
                n_mean=s.n_mean,
                n_aie=s.n_aie,
                n_shots=s.n_shots,
                k=s.k,
                layers=range(0, self.num_layers, s.layer_stride),
                ks=s.ks,
                strengths=s.strengths,
                head_strengths=s.head_strengths,
                progress=progress,
            )
            fv = dataclasses.replace(fv, model_name=self.model_name)
            seconds = time.perf_counter() - start
            zero = fv_plugin.make_prompts(task, n_shots=0, split="test")
            icl = fv_plugin.make_prompts(task, n_shots=s.n_shots, split="test")
            before = fv_plugin.zero_shot_scores(model, tokenizer, zero)[0]
            after = fv_plugin.zero_shot_scores(model, tokenizer, zero, [fv])[0]
            with_demos = fv_plugin.zero_shot_scores(model, tokenizer, icl)[0]
            texts = fv_plugin.neutral_texts()[: s.text_paragraphs]
            text = text_effects(model, tokenizer, [fv], s.text_strengths, texts=texts, new_tokens=16)
        return Extraction(fv, task, before, after, with_demos, len(zero), seconds, text)
