"""What the demo does, without the UI: steer a prompt, extract a vector, compare vectors.

Everything here uses fv_plugin's public API only. One :class:`Engine` holds the shared model; each request
passes its own vectors and options, and steering lives in the request's own context (``fv_plugin.steer``), so
concurrent users never see each other's vectors.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import fv_plugin

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
POSITIONS = fv_plugin.POSITION_MODES
METHODS = ("heads", "difference")


class DemoError(ValueError):
    """A request the demo refuses; the message is shown to the user as is."""


@dataclass(frozen=True)
class Limits:
    """Per-request limits that keep one shared model responsive for everyone."""

    max_prompt_chars: int = 2_000
    max_prompt_tokens: int = 512
    max_new_tokens: int = 64
    max_vectors: int = 3
    max_weight: float = 4.0
    max_strength: float = 10.0
    max_upload_bytes: int = 1_000_000
    max_task_pairs: int = 5_000


@dataclass(frozen=True)
class ExtractSettings:
    """Small samples (the library defaults are 100 prompts for the means and 25 for the AIE) so that one
    extraction takes about a minute on a busy 2-core CPU instead of several."""

    n_mean: int = 8
    n_aie: int = 2
    n_shots: int = 10
    k: int = 10
    layer_stride: int = 3


@dataclass(frozen=True)
class SteerResult:
    unsteered: str
    steered: str


@dataclass(frozen=True)
class Extraction:
    """One extracted vector with its zero-shot accuracy on the task's test split, before and after."""

    fv: fv_plugin.FunctionVector
    before: float
    after: float
    icl: float
    n_test: int
    seconds: float


def load_vector_set(folder: Path) -> dict[str, fv_plugin.FunctionVector]:
    """Every ``<name>.safetensors`` in ``folder`` by name (an empty dict when the folder does not exist)."""
    if not folder.is_dir():
        return {}
    return {path.stem: fv_plugin.FunctionVector.load(path) for path in sorted(folder.glob("*.safetensors"))}


def available_vector_sets(root: Path = VECTORS_DIR) -> dict[str, dict[str, fv_plugin.FunctionVector]]:
    """The shipped vector sets, keyed by model short name."""
    if not root.is_dir():
        return {}
    sets = {folder.name: load_vector_set(folder) for folder in sorted(root.iterdir()) if folder.is_dir()}
    return {name: vectors for name, vectors in sets.items() if vectors}


class Engine:
    """The shared model, the shipped vectors, and the demo's operations on them.

    Args:
        model, tokenizer: the model every user steers.
        model_name: the name shown in the UI and written into extracted vectors.
        vectors: the precomputed vectors available to everyone, by name.
        load_copy: returns a second ``(model, tokenizer)`` for extractions, so that a long extraction never
            holds hooks on the model that serves steering requests; defaults to a deep copy.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str,
        vectors: Mapping[str, fv_plugin.FunctionVector] | None = None,
        limits: Limits = Limits(),
        settings: ExtractSettings = ExtractSettings(),
        load_copy: Callable[[], tuple[Any, Any]] | None = None,
    ) -> None:
        self.model = fv_plugin.attach(model)  # hooks stay on: steer() blocks never add or remove them
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.vectors = dict(vectors or {})
        self.limits = limits
        self.settings = settings
        self.num_layers = fv_plugin.resolve_architecture(model).num_layers
        self._load_copy = load_copy
        self._extract_model: tuple[Any, Any] | None = None
        self._extract_lock = threading.Lock()

    # ------------------------------------------------------------------ steering
    def check_prompt(self, prompt: str) -> torch.Tensor:
        """The prompt's token ids ``[1, seq]``, or a :class:`DemoError` saying what is wrong with it."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise DemoError("Type a prompt first, e.g. 'Q: hot\\nA:'.")
        if len(prompt) > self.limits.max_prompt_chars:
            raise DemoError(f"The prompt has {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}.")
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        if ids.shape[1] > self.limits.max_prompt_tokens:
            raise DemoError(f"The prompt has {ids.shape[1]} tokens; the limit is {self.limits.max_prompt_tokens}.")
        return ids

    def resolve(
        self, choices: Sequence[tuple[str, float]], extra: Mapping[str, fv_plugin.FunctionVector] | None = None
    ) -> list[tuple[fv_plugin.FunctionVector, float]]:
        """``(name, weight)`` choices -> ``(vector, weight)`` pairs, from the shared vectors and the user's own."""
        pool = {**self.vectors, **(extra or {})}
        pairs = []
        for name, weight in choices:
            if not name:
                continue
            if name not in pool:
                raise DemoError(f"Unknown vector {name!r}; pick one of: {', '.join(sorted(pool)) or 'none'}.")
            if not -self.limits.max_weight <= float(weight) <= self.limits.max_weight:
                raise DemoError(f"Weight {weight} of {name!r} is outside ±{self.limits.max_weight}.")
            pairs.append((pool[name], float(weight)))
        if len(pairs) > self.limits.max_vectors:
            raise DemoError(f"Pick at most {self.limits.max_vectors} vectors.")
        return pairs

    def steer_pair(
        self,
        prompt: str,
        pairs: Sequence[tuple[fv_plugin.FunctionVector, float]],
        *,
        strength: float = 1.0,
        layer: int | None = None,
        positions: str = "generated",
        max_new_tokens: int = 8,
    ) -> SteerResult:
        """Unsteered and steered continuations of ``prompt`` from one batched, greedy ``generate`` call.

        Row 0 has strength 0 (the plain model), row 1 ``strength``; ``layer`` moves every vector to that layer.
        """
        ids = self.check_prompt(prompt)
        if not pairs:
            raise DemoError("Pick at least one vector to steer with.")
        if positions not in POSITIONS:
            raise DemoError(f"Positions must be one of {POSITIONS}, got {positions!r}.")
        if not 1 <= int(max_new_tokens) <= self.limits.max_new_tokens:
            raise DemoError(f"New tokens must be between 1 and {self.limits.max_new_tokens}, got {max_new_tokens}.")
        if not -self.limits.max_strength <= float(strength) <= self.limits.max_strength:
            raise DemoError(f"Strength must be within ±{self.limits.max_strength}, got {strength}.")
        if layer is not None:
            if not 0 <= int(layer) < self.num_layers:
                raise DemoError(f"Layer must be between 0 and {self.num_layers - 1}, got {layer}.")
            pairs = [(dataclasses.replace(fv, layer=int(layer)), w) for fv, w in pairs]
        batch = ids.repeat(2, 1)
        rows = torch.tensor([0.0, float(strength)])
        with torch.inference_mode(), fv_plugin.steer(self.model, *pairs, strength=rows, positions=positions):  # type: ignore[arg-type]
            out = self.model.generate(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=int(max_new_tokens),
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return SteerResult(unsteered=texts[0], steered=texts[1])

    # ---------------------------------------------------------------- extraction
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

    def _extraction_model(self) -> tuple[Any, Any]:
        if self._extract_model is None:
            if self._load_copy is not None:
                self._extract_model = self._load_copy()
            else:
                import copy

                # fv_plugin drops the hooks a deep copy inherits the first time the copy is steered.
                self._extract_model = (copy.deepcopy(self.model), self.tokenizer)
        return self._extract_model

    def extract(self, task: fv_plugin.Task, *, method: str = "heads", progress: bool = False) -> Extraction:
        """Extract a vector for ``task`` with the demo's small settings and score it on the test split.

        Runs on a separate copy of the model, one extraction at a time. (fv_plugin's recording and patching hooks
        act only in the thread that opened them; the copy keeps the serving model free of them altogether.)
        """
        if method not in METHODS:
            raise DemoError(f"Method must be one of {METHODS}, got {method!r}.")
        s = self.settings
        with self._extract_lock:
            model, tokenizer = self._extraction_model()
            start = time.perf_counter()
            fv = fv_plugin.extract_function_vector(
                model,
                tokenizer,
                task,
                method=method,  # type: ignore[arg-type]
                n_mean=s.n_mean,
                n_aie=s.n_aie,
                n_shots=s.n_shots,
                k=s.k,
                layers=range(0, self.num_layers, s.layer_stride),
                progress=progress,
            )
            fv = dataclasses.replace(fv, model_name=self.model_name)
            seconds = time.perf_counter() - start
            zero = fv_plugin.make_prompts(task, n_shots=0, split="test")
            icl = fv_plugin.make_prompts(task, n_shots=s.n_shots, split="test")
            before = fv_plugin.zero_shot_scores(model, tokenizer, zero)[0]
            after = fv_plugin.zero_shot_scores(model, tokenizer, zero, [fv])[0]
            with_demos = fv_plugin.zero_shot_scores(model, tokenizer, icl)[0]
        return Extraction(fv=fv, before=before, after=after, icl=with_demos, n_test=len(zero), seconds=seconds)
