"""A task's prompt sets, in one place: which prompts each stage reads, from which split, by one rule each.

- :func:`clean_prompts`: ``n_mean`` train queries with ``n_shots`` demonstrations; the head means and the
  hidden-state means. With ``n_shots=0``: the same queries zero-shot (``difference``, ``head_difference``).
- :func:`shuffled_prompts`: ``n_aie`` train queries whose demonstrations' labels are permuted (``seed + 1``); the AIE.
- :func:`validation_prompts`: zero-shot queries from valid, or valid and train (``ExtractionConfig.validation``);
  every choice: the method, layer, number of heads and strength of ``method="auto"``, and an explicit method's layer.
- :func:`eval_prompts`: queries from ``EvalConfig.split`` (test by default) in one prompt mode; reports only:
  :func:`~fv_plugin.evaluate`, the evaluation sweeps, side effects, ``fv extract``'s printed accuracy.

Demonstrations always come from train. The test split enters no choice: only :func:`eval_prompts` reads it, and
only reports read :func:`eval_prompts`. The splits are :attr:`~fv_plugin.Task.train`, :attr:`~fv_plugin.Task.valid`
and :attr:`~fv_plugin.Task.test`.
"""

from __future__ import annotations

from fv_plugin.config import EvalConfig, ExtractionConfig
from fv_plugin.prompts import Prompt, make_prompts
from fv_plugin.tasks import Task

__all__ = ["clean_prompts", "eval_prompts", "shuffled_prompts", "statistics_prompts", "validation_prompts"]


def clean_prompts(
    task: Task, config: ExtractionConfig = ExtractionConfig(), *, n_shots: int | None = None
) -> list[Prompt]:
    """The extraction's prompts: ``config.n_mean`` train queries with ``config.n_shots`` demonstrations (or
    ``n_shots``; 0 gives the same queries zero-shot), sampled with ``config.seed``."""
    shots = config.n_shots if n_shots is None else n_shots
    return make_prompts(task, n=config.n_mean, n_shots=shots, split="train", template=config.template, seed=config.seed)


def shuffled_prompts(task: Task, config: ExtractionConfig = ExtractionConfig()) -> list[Prompt]:
    """The AIE's corrupted prompts: ``config.n_aie`` train queries whose demonstrations' labels are permuted
    among themselves, sampled with ``config.seed + 1``."""
    return make_prompts(
        task,
        n=config.n_aie,
        n_shots=config.n_shots,
        split="train",
        shuffle_labels=True,
        template=config.template,
        seed=config.seed + 1,
    )


def statistics_prompts(task: Task, config: ExtractionConfig = ExtractionConfig()) -> tuple[list[Prompt], list[Prompt]]:
    """The ICL prompts of :func:`~fv_plugin.head_statistics`: the clean ones and the shuffled-label ones."""
    return clean_prompts(task, config), shuffled_prompts(task, config)


def validation_prompts(task: Task, config: ExtractionConfig = ExtractionConfig()) -> list[Prompt]:
    """The zero-shot queries every choice is scored on: the valid split, then (``config.validation ==
    "valid+train"``) the train split asked zero-shot; never the test split."""
    splits = ("valid", "train") if config.validation == "valid+train" else ("valid",)
    prompts: list[Prompt] = []
    for split in splits:
        if getattr(task, split):
            prompts += make_prompts(task, n_shots=0, split=split, template=config.template, seed=config.seed)
    if not prompts:
        raise ValueError(f"task {task.name!r} has no validation queries; give it more pairs")
    return prompts


def eval_prompts(task: Task, config: EvalConfig = EvalConfig()) -> list[Prompt]:
    """The prompts :func:`~fv_plugin.evaluate` scores for ``config`` (queries from ``config.split``, the test split
    by default): the template with ``config.n_shots`` demonstrations (none for ``"zero_shot"``, permuted labels for
    ``"shuffled"``), or each query inside each of ``config.natural_templates`` (``"natural"``)."""
    if config.mode == "natural":
        pairs = list(getattr(task, config.split))[: config.n]
        if not pairs:
            raise ValueError(f"task {task.name!r} has no {config.split} pairs")
        return [
            Prompt(text=t.replace("{x}", p.input), answers=tuple(" " + a for a in p.answers), query=p)
            for p in pairs
            for t in config.natural_templates
        ]
    shots = 0 if config.mode == "zero_shot" else config.n_shots
    return make_prompts(
        task,
        n=config.n,
        n_shots=shots,
        split=config.split,
        shuffle_labels=config.mode == "shuffled",
        template=config.template,
        seed=config.seed,
    )
