"""Report folders: every number as JSON, the plots as PNG, and a Markdown summary that reads on its own.

:func:`evaluate_tasks` + :func:`write_eval_report` are ``fv eval``; :func:`write_comparison_report` is the
output of ``fv compare``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from fv_plugin.analysis import TokenScore, aie_matrix, head_locations, layer_sweep, similarity_matrix, top_tokens
from fv_plugin.architectures import resolve_architecture
from fv_plugin.compare import ModelComparison
from fv_plugin.evaluation import MODES, EvalResult, Mode, Sweep, evaluate, sweep_k, sweep_layers, sweep_strength
from fv_plugin.extraction import Method, extract_function_vector, layer_vectors
from fv_plugin.mediation import average_indirect_effect, mean_head_activations
from fv_plugin.prompts import make_prompts
from fv_plugin.tasks import Task
from fv_plugin.vector import FunctionVector

__all__ = ["EvalReport", "TaskReport", "evaluate_tasks", "write_comparison_report", "write_eval_report"]

DEFAULT_STRENGTHS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
DEFAULT_KS: tuple[int, ...] = (1, 2, 5, 10, 20, 40)


@dataclass(frozen=True)
class TaskReport:
    """Everything measured for one task.

    ``results`` maps a mode to its unsteered and steered :class:`EvalResult`. ``heads_vector`` is the paper's
    head-based vector (with the AIE matrix) when the head analysis ran.
    """

    task: str
    vector: FunctionVector
    results: dict[str, tuple[EvalResult, EvalResult]]
    strength: Sweep | None = None
    layers: Sweep | None = None
    k: Sweep | None = None
    heads_vector: FunctionVector | None = None
    tokens: tuple[TokenScore, ...] = ()
    head_tokens: tuple[TokenScore, ...] = ()
    seconds: float = 0.0


@dataclass(frozen=True)
class EvalReport:
    """One model's :class:`TaskReport` per task, plus the cosine similarity of the tasks' vectors."""

    model: str
    tasks: tuple[TaskReport, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def similarity(self) -> torch.Tensor:
        return similarity_matrix([t.vector for t in self.tasks])


def _vector_summary(fv: FunctionVector) -> dict[str, Any]:
    return {
        "layer": fv.layer,
        "method": fv.method,
        "norm": round(fv.norm(), 4),
        "heads": [list(h) for h in fv.heads or ()],
        "head_scores": list(fv.head_scores or ()),
        "model_name": fv.model_name,
    }


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[Task],
    *,
    model_name: str,
    vectors: Mapping[str, FunctionVector] | None = None,
    method: str = "auto",
    modes: Sequence[str] = MODES,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    ks: Sequence[int] = DEFAULT_KS,
    heads: bool = True,
    layer_sweep_test: bool = True,
    layer_step: int = 1,
    n: int | None = None,
    n_natural: int | None = 12,
    n_mean: int = 100,
    n_aie: int = 25,
    n_shots: int = 10,
    seed: int = 0,
    progress: bool = False,
    on_task: Callable[[EvalReport], None] | None = None,
) -> EvalReport:
    """Extract (or take from ``vectors``) each task's vector and measure it in every way this package knows.

    Args:
        vectors: vectors per task name; a task without one gets one extracted with ``method``.
        modes: prompt modes to score with and without the vector (:data:`~fv_plugin.evaluation.MODES`).
        strengths, ks: the strength and number-of-heads sweeps (``ks`` needs ``heads``).
        heads: run the paper's head analysis (mean activations and AIE) for the AIE map, the k sweep and the
            head-based vector.
        layer_sweep_test: sweep layers on the test split (hidden-state forms are re-made at each layer), every
            ``layer_step``-th layer.
        n: test prompts per mode (default: all); n_natural: test queries in natural mode (each with every
            natural template).
        on_task: called with the report so far after each task (e.g. to write partial results).
    """
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown modes {bad}; choose from {MODES}")
    settings = {"method": method, "modes": list(modes), "n": n, "n_natural": n_natural, "n_mean": n_mean}
    settings["layer_step"] = layer_step
    settings.update({"n_aie": n_aie, "n_shots": n_shots, "seed": seed, "heads": heads})
    reports: list[TaskReport] = []
    for task in tqdm(tasks, desc="tasks", disable=not progress):
        start = time.perf_counter()
        fv = (vectors or {}).get(task.name)
        if fv is None:
            form = cast(Method, method)
            fv = extract_function_vector(model, tokenizer, task, method=form, n_mean=n_mean, n_shots=n_shots, seed=seed)
        results = {}
        for mode in modes:
            count, kind = (n_natural if mode == "natural" else n), cast(Mode, mode)
            base = evaluate(model, tokenizer, task, mode=kind, n=count, n_shots=n_shots, seed=seed)
            steered = evaluate(model, tokenizer, task, mode=kind, n=count, n_shots=n_shots, seed=seed, vectors=[fv])
            results[mode] = (base, steered)
        strength = sweep_strength(model, tokenizer, task, fv, strengths, n=n) if strengths else None
        layers = None
        if layer_sweep_test and not fv.is_head_patch:
            if fv.method in ("difference", "layer_mean"):
                state_form = cast(Literal["difference", "layer_mean"], fv.method)
                per_layer = layer_vectors(
                    model, tokenizer, task, method=state_form, n_mean=n_mean, n_shots=n_shots, seed=seed
                )
                at = sorted(per_layer)[::layer_step]
                layers = sweep_layers(model, tokenizer, task, per_layer.__getitem__, at, n=n)
            else:  # the same vector at every layer
                layers = sweep_layers(model, tokenizer, task, fv, range(0, _num_layers(model), layer_step), n=n)
        k_sweep, heads_fv = None, None
        head_tokens: tuple[TokenScore, ...] = ()
        if heads:
            clean = make_prompts(task, n=n_mean, n_shots=n_shots, split="train", seed=seed)
            means = mean_head_activations(model, tokenizer, clean)
            shuffled = make_prompts(task, n=n_aie, n_shots=n_shots, split="train", shuffle_labels=True, seed=seed + 1)
            effects = average_indirect_effect(model, tokenizer, shuffled, means)
            heads_fv = extract_function_vector(
                model,
                tokenizer,
                task,
                method="heads",
                layer=fv.layer,
                means=means,
                effects=effects,
                n_shots=n_shots,
                seed=seed,
            )
            usable = [k for k in ks if k <= effects.aie.numel()]
            if usable:
                k_sweep = sweep_k(model, tokenizer, task, means, effects, usable, layer=fv.layer, n=n)
            head_tokens = tuple(top_tokens(model, tokenizer, heads_fv, 10))
        reports.append(
            TaskReport(
                task=task.name,
                vector=fv,
                results=results,
                strength=strength,
                layers=layers,
                k=k_sweep,
                heads_vector=heads_fv,
                tokens=tuple(top_tokens(model, tokenizer, fv, 10)),
                head_tokens=head_tokens,
                seconds=time.perf_counter() - start,
            )
        )
        if on_task is not None:
            on_task(EvalReport(model=model_name, tasks=tuple(reports), settings=settings))
    return EvalReport(model=model_name, tasks=tuple(reports), settings=settings)


def _num_layers(model: nn.Module) -> int:
    return resolve_architecture(model).num_layers


def _save(fig: Any, folder: Path, name: str) -> str:
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / "plots" / name)
    return f"plots/{name}"


def _task_json(t: TaskReport) -> dict[str, Any]:
    out: dict[str, Any] = {"task": t.task, "seconds": round(t.seconds, 1), "vector": _vector_summary(t.vector)}
    out["results"] = {
        mode: {"unsteered": base.to_dict(), "steered": steered.to_dict()} for mode, (base, steered) in t.results.items()
    }
    for name in ("strength", "layers", "k"):
        sweep = getattr(t, name)
        out[f"{name}_sweep"] = sweep.to_dict() if sweep is not None else None
    sweep = layer_sweep(t.vector)
    out["validation_layer_sweep"] = dataclasses.asdict(sweep) if sweep is not None else None
    out["top_tokens"] = [dataclasses.asdict(s) for s in t.tokens]
    if t.heads_vector is not None:
        out["heads_vector"] = _vector_summary(t.heads_vector)
        aie = aie_matrix(t.heads_vector)
        out["aie"] = aie.tolist() if aie is not None else None
        out["head_locations"] = [dataclasses.asdict(h) for h in head_locations(t.heads_vector)]
        out["heads_vector_top_tokens"] = [dataclasses.asdict(s) for s in t.head_tokens]
    return out


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _tokens(scores: Sequence[TokenScore], k: int = 6) -> str:
    return ", ".join(f"`{s.token.strip() or repr(s.token)}`" for s in scores[:k])


def write_eval_report(report: EvalReport, folder: str | Path) -> Path:
    """Write ``report.json``, ``plots/*.png`` and ``summary.md`` into ``folder``; returns the summary's path."""
    from fv_plugin import viz

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"model": report.model, "settings": report.settings}
    data["tasks"] = [_task_json(t) for t in report.tasks]
    data["similarity"] = {"tasks": [t.task for t in report.tasks], "matrix": report.similarity.tolist()}
    plots: dict[str, dict[str, str]] = {}
    for t in report.tasks:
        made = plots.setdefault(t.task, {})
        if t.heads_vector is not None:
            made["aie"] = _save(viz.plot_aie(t.heads_vector), out, f"{t.task}_aie.png")
        if t.layers is not None:
            made["layers"] = _save(viz.plot_sweep(t.layers), out, f"{t.task}_layers.png")
        elif layer_sweep(t.vector) is not None:
            made["layers"] = _save(viz.plot_layer_curve(t.vector), out, f"{t.task}_layers.png")
        if t.strength is not None:
            made["strength"] = _save(viz.plot_sweep(t.strength), out, f"{t.task}_strength.png")
        if t.k is not None:
            made["k"] = _save(viz.plot_sweep(t.k), out, f"{t.task}_k.png")
        if t.tokens:
            made["tokens"] = _save(viz.plot_top_tokens(list(t.tokens)), out, f"{t.task}_tokens.png")
    similarity = None
    if len(report.tasks) > 1:
        fig = viz.plot_similarity(report.similarity, [t.task for t in report.tasks])
        similarity = _save(fig, out, "similarity.png")
    data["plots"] = plots
    (out / "report.json").write_text(json.dumps(data, indent=1, default=_json_default), encoding="utf-8")
    summary = out / "summary.md"
    summary.write_text(_eval_markdown(report, plots, similarity), encoding="utf-8")
    return summary


def _json_default(value: object) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _eval_markdown(report: EvalReport, plots: Mapping[str, Mapping[str, str]], similarity: str | None) -> str:
    modes = list(report.tasks[0].results) if report.tasks else []
    lines = [
        f"# Function vectors on {report.model}",
        "",
        "Each task's vector is added after its layer at the final prompt token (and, for the continuation, at",
        "every generated token). Scores are on the task's test split: first-token top-1 accuracy (natural text:",
        "an accepted answer appears in the greedy continuation), unsteered → steered. `Δp` is the mean change in",
        "the answer's first-token probability; `KL` the mean KL divergence (nats) from the unsteered to the",
        "steered next-token distribution in zero-shot prompts.",
        "",
        "| task | method (layer) | " + " | ".join(modes) + " | exact match, zero-shot | Δp | KL |",
        "|---|---|" + "---|" * (len(modes) + 3),
    ]
    for t in report.tasks:
        cells = [f"{_fmt(base.accuracy)} → **{_fmt(steered.accuracy)}**" for base, steered in t.results.values()]
        zero = t.results.get("zero_shot")
        em = f"{_fmt(zero[0].exact_match)} → {_fmt(zero[1].exact_match)}" if zero else "–"
        shift = _fmt(zero[1].prob_shift) if zero else "–"
        kl = _fmt(zero[1].kl) if zero else "–"
        method = f"{t.vector.method} ({t.vector.layer})"
        lines.append(f"| {t.task} | {method} | " + " | ".join(cells) + f" | {em} | {shift} | {kl} |")
    if report.tasks:
        means = []
        for mode in modes:
            base = _mean([t.results[mode][0].accuracy for t in report.tasks])
            steered = _mean([t.results[mode][1].accuracy for t in report.tasks])
            means.append(f"{base:.2f} → **{steered:.2f}**")
        lines.append("| **mean** | | " + " | ".join(means) + " | | | |")
    lines += ["", "## Per task", ""]
    for t in report.tasks:
        lines.append(f"### {t.task}")
        lines.append("")
        facts = [f"vector: {t.vector.method}, layer {t.vector.layer}, norm {t.vector.norm():.1f}"]
        if t.strength is not None:
            facts.append(f"best strength {t.strength.best:g} (accuracy {max(t.strength.accuracy):.2f})")
        if t.layers is not None:
            facts.append(f"best test layer {int(t.layers.best)} (accuracy {max(t.layers.accuracy):.2f})")
        if t.k is not None:
            facts.append(f"heads form: best k {int(t.k.best)} (accuracy {max(t.k.accuracy):.2f})")
        lines.append("- " + "; ".join(facts))
        if t.tokens:
            lines.append(f"- top tokens of the vector: {_tokens(t.tokens)}")
        if t.heads_vector is not None:
            top = ", ".join(f"{h.layer}.{h.head} ({h.aie:.3f})" for h in head_locations(t.heads_vector)[:5])
            lines.append(f"- top heads by AIE (layer.head): {top}")
            if t.head_tokens:
                lines.append(f"- top tokens of the heads form: {_tokens(t.head_tokens)}")
        lines.append(f"- time: {t.seconds:.0f} s")
        lines.append("")
        lines += [f"![{name}]({path})" for name, path in plots.get(t.task, {}).items()]
        lines.append("")
    if similarity is not None:
        lines += ["## Similarity of the tasks' vectors", "", f"![similarity]({similarity})", ""]
    lines += ["## Settings", "", "```json", json.dumps(report.settings, indent=1), "```", ""]
    return "\n".join(lines)


def write_comparison_report(comparison: ModelComparison, folder: str | Path) -> Path:
    """Write a comparison's ``report.json``, plots and ``summary.md`` into ``folder``; returns the summary."""
    from fv_plugin import viz

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tasks = list(comparison.tasks)
    plots = {
        "similarity_a": _save(
            viz.plot_similarity(comparison.similarity_a, tasks, title=comparison.model_a), out, "similarity_a.png"
        ),
        "similarity_b": _save(
            viz.plot_similarity(comparison.similarity_b, tasks, title=comparison.model_b), out, "similarity_b.png"
        ),
    }
    series = {
        f"{comparison.model_b} zero-shot": [r.accuracy["zero-shot"] for r in comparison.rows],
        f"{comparison.model_b} own vector": [r.accuracy["own"] for r in comparison.rows],
        f"{comparison.model_a} vector mapped": [r.accuracy["mapped"] for r in comparison.rows],
    }
    title = f"zero-shot accuracy on {comparison.model_b}"
    plots["transfer"] = _save(viz.plot_transfer(tasks, series, title=title), out, "transfer.png")
    depths = {}
    for label, attr in ((comparison.model_a, "heads_a"), (comparison.model_b, "heads_b")):
        found = [h for r in comparison.rows for h in getattr(r, attr)]
        if found:
            depths[label] = found
    if depths:
        plots["head_depths"] = _save(viz.plot_head_depths(depths), out, "head_depths.png")
    data = comparison.to_dict()
    data["plots"] = plots
    (out / "report.json").write_text(json.dumps(data, indent=1, default=_json_default), encoding="utf-8")
    summary = out / "summary.md"
    summary.write_text(_comparison_markdown(comparison, plots, depths), encoding="utf-8")
    return summary


def _comparison_markdown(c: ModelComparison, plots: Mapping[str, str], depths: Mapping[str, Sequence[Any]]) -> str:
    a, b = c.model_a, c.model_b
    lines = [
        f"# {a} and {b}: function vectors compared",
        "",
        f"Transfer: a linear map from {a}'s residual stream (after the layer of its vector) to {b}'s (after the",
        "layer of its own vector) is fitted by ridge least squares on neutral text, at character offsets where",
        f"both tokenizers end a token; {a}'s vector goes through its linear part. `R²` is measured on held-out",
        "paragraphs. Accuracies are first-token top-1, zero-shot, on the test split.",
        "",
        f"| task | layers ({a} → {b}) | map R² | cos(mapped, own) | norm mapped/own | {a}: 0-shot → own "
        f"| {b}: 0-shot | {b}: own | {b}: mapped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in c.rows:
        lines.append(
            f"| {r.task} | {r.layer_a} → {r.layer_b} | {r.map_r2:.2f} | {r.cosine:.2f} | {r.norm_ratio:.2f} | "
            f"{r.accuracy_a['zero-shot']:.2f} → {r.accuracy_a['own']:.2f} | {r.accuracy['zero-shot']:.2f} | "
            f"{r.accuracy['own']:.2f} | **{r.accuracy['mapped']:.2f}** |"
        )
    if c.rows:
        mean = {k: _mean([r.accuracy[k] for r in c.rows]) for k in ("zero-shot", "own", "mapped")}
        own_a = _mean([r.accuracy_a["own"] for r in c.rows])
        lines.append(
            f"| **mean** | | | | | {own_a:.2f} | {mean['zero-shot']:.2f} | {mean['own']:.2f} | "
            f"**{mean['mapped']:.2f}** |"
        )
    lines += ["", f"![transfer]({plots['transfer']})", "", "## Similarity of the tasks' vectors", ""]
    lines += [f"| {a} | {b} |", "|---|---|", f"| ![]({plots['similarity_a']}) | ![]({plots['similarity_b']}) |", ""]
    n = len(c.tasks)
    off = [(i, j) for i in range(n) for j in range(n) if i < j]
    if off:
        xs = torch.tensor([float(c.similarity_a[i, j]) for i, j in off])
        ys = torch.tensor([float(c.similarity_b[i, j]) for i, j in off])
        agreement = float(torch.corrcoef(torch.stack([xs, ys]))[0, 1]) if len(off) > 1 else float("nan")
        lines.append(
            f"Mean off-diagonal cosine: {a} {float(xs.mean()):.2f}, {b} {float(ys.mean()):.2f}; Pearson "
            f"correlation of the two matrices' off-diagonal entries: {agreement:.2f}."
        )
        lines.append("")
    if depths:
        lines += ["## Where the top heads sit", "", f"![head depths]({plots['head_depths']})", ""]
        for label, heads in depths.items():
            values = [h.depth for h in heads]
            lines.append(f"- {label}: mean relative depth {_mean(values):.2f} ({len(values)} heads over all tasks)")
        lines.append("")
    return "\n".join(lines)
