"""``fv bench condition``: what learning a vector's condition costs against the forwards an extraction cannot
avoid, and its validation error rates, for saved vectors; optionally against another version of the prompt sets.

The cost is counted by hooks as in ``fv bench extract``: ``tokens`` are token passes through the decoder stack (a
token run through ``m`` of ``L`` layers counts ``m / L``), so ``tokens / unavoidable`` is the ratio of
token x layer work to the plain passes of the 125 ICL prompts (counted unpadded). The task's zero-shot train
prompts are run first, outside the count, and kept as a default extraction keeps them (its zero-shot stage).

``--previous FILE`` names another ``condition_fit`` module (for example an earlier release's,
``git show REV:fv_plugin/condition_fit.py > previous_fit.py``): its ``condition_prompts(task, tokenizer)`` sets are
fitted the same way, their cost is what that version ran (every prompt through the whole model), and both
conditions are also scored on the previous validation set less the texts the current fit saw (one yardstick).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fv_plugin.activations import RecordedStates, last_token_hidden_states, prompt_means
from fv_plugin.architectures import resolve_architecture
from fv_plugin.condition import Condition, RateEstimate
from fv_plugin.condition_fit import LabelledPrompts, condition_prompts, fit_condition, learn_condition
from fv_plugin.config import ExtractionConfig
from fv_plugin.hooks import count_forward_work
from fv_plugin.models import DEFAULT_MODEL, load_model
from fv_plugin.prompt_sets import clean_prompts, statistics_prompts
from fv_plugin.scoring import wilson_interval
from fv_plugin.tasks import Task, load_task
from fv_plugin.vector import FunctionVector

__all__ = ["ConditionCost", "add_arguments", "measure_condition", "run"]


@dataclass(frozen=True)
class ConditionCost:
    """One condition: its layer, validation rates (``fn``, ``fp``), fitting prompts, work and time."""

    task: str
    version: str
    first_layer: int
    layer: int
    fn: str
    fp: str
    n_fit: tuple[int, int]
    tokens: float
    unavoidable: int
    seconds: float

    def row(self) -> str:
        ratio = self.tokens / self.unavoidable
        return (
            f"{self.task:16} {self.version:9} L{self.layer:<3} (vector {self.first_layer:>2})  FN {self.fn:28} "
            f"FP {self.fp:28} fit {self.n_fit[0]}+{self.n_fit[1]:<4} {self.tokens:8.0f} tokens = {ratio:.3f}x "
            f"{self.seconds:6.1f} s"
        )


def _rate(failed: torch.Tensor) -> RateEstimate:
    count, n = int(failed.sum()), int(failed.numel())
    return RateEstimate(count, n, wilson_interval(count, n))


def _recorded(model: nn.Module, tokenizer: Any, task: Task, layers: Sequence[int]) -> RecordedStates:
    """The zero-shot train prompts' states, as a default extraction's zero-shot stage keeps them."""
    prompts = clean_prompts(task, ExtractionConfig(), n_shots=0)
    rows = prompt_means(model, tokenizer, prompts, rows=layers, progress=False).rows
    return RecordedStates(tuple(p.text for p in prompts), rows)


def _states(model: nn.Module, tokenizer: Any, texts: Sequence[str], layers: list[int]) -> dict[int, torch.Tensor]:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    found = last_token_hidden_states(model, tokenizer, [texts[i] for i in order], layers, batch_size=16, stop=True)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    return {at: states[back] for at, states in found.items()}


def _previous(
    model: nn.Module, tokenizer: Any, task: Task, fv: FunctionVector, module: ModuleType
) -> tuple[Condition, LabelledPrompts, dict[int, torch.Tensor], float]:
    """The other version's condition, its validation prompts and their states, and the tokens it ran."""
    data = module.condition_prompts(task, tokenizer)
    layers = list(range(fv.first_layer))
    train, valid = (_states(model, tokenizer, d.texts, layers) for d in data)
    tokens = sum(len(tokenizer(t)["input_ids"]) for d in data for t in d.texts)  # every prompt, the whole model
    return fit_condition(train, valid, data), data[1], valid, float(tokens)


def _yardstick(condition: Condition, data: LabelledPrompts, states: dict[int, torch.Tensor], skip: set[str]) -> str:
    keep = [i for i, t in enumerate(data.texts) if t not in skip]
    passed = condition.passes(states[condition.layer][keep])
    labels = torch.tensor([data.labels[i] for i in keep])
    return f"FN {_rate(~passed[labels])}  FP {_rate(passed[~labels])}"


def measure_condition(
    model: nn.Module, tokenizer: Any, fv: FunctionVector, task: Task, previous: ModuleType | None = None
) -> tuple[list[ConditionCost], list[str]]:
    """The current fit (and ``previous``'s) for ``fv``: rows of figures, and lines of the common yardstick."""
    unavoidable = sum(len(tokenizer(p.text)["input_ids"]) for ps in statistics_prompts(task) for p in ps)
    recorded = _recorded(model, tokenizer, task, list(range(fv.first_layer)))
    start = time.perf_counter()
    with count_forward_work(model, resolve_architecture(model)) as count:
        condition = learn_condition(model, tokenizer, task, fv, recorded=recorded)
    rows = [_cost(task, "current", fv, condition, count()[0], unavoidable, time.perf_counter() - start)]
    if previous is None:
        return rows, []
    start = time.perf_counter()
    before, data, states, tokens = _previous(model, tokenizer, task, fv, previous)
    rows.append(_cost(task, "previous", fv, before, tokens, unavoidable, time.perf_counter() - start))
    seen = set(condition_prompts(task, tokenizer, zero_shot=recorded.texts)[0].texts)
    lines = [
        f"{task.name}, previous valid set less the current fit's texts: {name:8} {_yardstick(c, data, states, seen)}"
        for name, c in (("previous", before), ("current", condition))
    ]
    return rows, lines


def _cost(
    task: Task, version: str, fv: FunctionVector, c: Condition, tokens: float, unavoidable: int, seconds: float
) -> ConditionCost:
    fn, fp = str(c.false_negative), str(c.false_positive)
    return ConditionCost(task.name, version, fv.first_layer, c.layer, fn, fp, c.n_train, tokens, unavoidable, seconds)


def _load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("previous_condition_fit", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--previous {path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded short name, local path or Hub id")
    parser.add_argument("--vectors", required=True, help="folder of <task>.safetensors vectors of that model")
    parser.add_argument("--tasks", nargs="*", default=None, help="task names (default: every vector in the folder)")
    parser.add_argument("--previous", default=None, help="another condition_fit.py to compare with")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")


def run(args: argparse.Namespace) -> list[ConditionCost]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    previous = _load_module(args.previous) if args.previous else None
    model, tokenizer = load_model(args.model)
    paths = sorted(Path(args.vectors).glob("*.safetensors"))
    found: list[ConditionCost] = []
    notes: list[str] = []
    for path in paths:
        if args.tasks is not None and path.stem not in args.tasks:
            continue
        rows, lines = measure_condition(model, tokenizer, FunctionVector.load(path), load_task(path.stem), previous)
        for row in rows:
            print(row.row(), flush=True)
        print("\n".join(lines), flush=True)
        found += rows
        notes += lines
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [asdict(r) for r in found], "yardstick": notes}, indent=1))
    return found
