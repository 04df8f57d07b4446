"""Report folders: every number as JSON, the plots as PNG, and a Markdown summary that reads on its own.

Rendering only: :mod:`fv_plugin.experiments` computes the reports. :func:`write_eval_report` writes what
``fv eval`` measured, :func:`write_comparison_report` what ``fv compare`` did.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fv_plugin.analysis import TokenScore, head_locations, layer_sweep
from fv_plugin.compare import ModelComparison
from fv_plugin.evaluation import EvalResult
from fv_plugin.experiments import EvalReport, TaskReport
from fv_plugin.records import Selection
from fv_plugin.vector import FunctionVector

__all__ = ["selection_table", "write_comparison_report", "write_eval_report"]


def _vector_summary(fv: FunctionVector) -> dict[str, Any]:
    return {
        "layer": fv.layer,
        "method": fv.method,
        "norm": round(fv.norm(), 4),
        "heads": [list(h) for h in fv.heads or ()],
        "head_scores": list(fv.head_scores or ()),
        "model_name": fv.model_name,
    }


def _score(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def selection_table(selection: Selection, *, top: int = 8) -> str:
    """Markdown: how ``method="auto"`` chose (the chosen candidate, the best of each method, the runners-up), with
    each one's first-token accuracy, exact match of the greedy answer and side effect (where scored)."""
    order = sorted(range(len(selection.candidates)), key=lambda i: -selection.candidates[i].accuracy)
    scored = [i for i in order if selection.candidates[i].exact_match is not None]
    order = sorted(scored, key=lambda i: -(selection.candidates[i].exact_match or 0.0)) + order
    best_of: dict[str, int] = {}
    for i in order:
        best_of.setdefault(selection.candidates[i].method, i)
    shown = [selection.chosen, *best_of.values(), *order[:top]]
    budget = selection.side_effect_budget
    lines = [
        f"{len(selection.candidates)} candidates scored on {selection.n_queries} zero-shot queries "
        f"({selection.queries}); without a vector: first token {selection.baseline_accuracy:.2f}, exact match "
        f"{_score(selection.baseline_exact_match)}; side-effect budget {_score(budget)} nats; accuracy tolerance "
        f"{_score(selection.accuracy_tolerance)}. Rule: {selection.rule}.",
        "",
        "| candidate | first token | exact match | side effect (KL, nats) | answer probability | |",
        "|---|---|---|---|---|---|",
    ]
    for i in dict.fromkeys(shown):  # in order, once each
        c = selection.candidates[i]
        mark = "**chosen**" if i == selection.chosen else ("best " + c.method if best_of.get(c.method) == i else "")
        lines.append(
            f"| {c.label()} | {c.accuracy:.2f} | {_score(c.exact_match)} | {_score(c.side_effect, 3)} | "
            f"{c.answer_prob:.3f} | {mark} |"
        )
    return "\n".join(lines)


def _save(fig: Any, folder: Path, name: str) -> str:
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / "plots" / name)
    return f"plots/{name}"


def _task_json(t: TaskReport) -> dict[str, Any]:
    out: dict[str, Any] = {"task": t.task, "seconds": round(t.seconds, 1), "vector": _vector_summary(t.vector)}
    out["results"] = {
        mode: {"unsteered": base.to_dict(), "steered": steered.to_dict()} for mode, (base, steered) in t.results.items()
    }
    if t.icl_correct is not None:
        out["icl_correct_queries"] = sorted(t.icl_correct)
        out["results_icl_correct"] = {
            mode: {"unsteered": base.to_dict(rows=False), "steered": steered.to_dict(rows=False)}
            for mode, (base, steered) in t.results_for("icl_correct").items()
        }
    out["text_effects"] = t.text.to_dict() if t.text is not None else None
    for name in ("strength", "layers", "k"):
        sweep = getattr(t, name)
        out[f"{name}_sweep"] = sweep.to_dict() if sweep is not None else None
    sweep = layer_sweep(t.vector)
    out["validation_layer_sweep"] = sweep.to_dict() if sweep is not None else None
    out["top_tokens"] = [dataclasses.asdict(s) for s in t.tokens]
    if t.heads_vector is not None:
        out["heads_vector"] = _vector_summary(t.heads_vector)
        aie = t.heads_vector.aie
        out["aie"] = aie.tolist() if aie is not None else None
        out["head_locations"] = [dataclasses.asdict(h) for h in head_locations(t.heads_vector)]
        out["heads_vector_top_tokens"] = [dataclasses.asdict(s) for s in t.head_tokens]
    return out


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _tokens(scores: Sequence[TokenScore], k: int = 6) -> str:
    return ", ".join(f"`{s.token.strip() or repr(s.token)}`" for s in scores[:k])


def _task_plots(t: TaskReport, out: Path) -> dict[str, str]:
    from fv_plugin import viz

    made = {}
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
    if t.text is not None:
        fig = viz.plot_text_effects(t.text, title=f"{t.task}: neutral text")
        made["text"] = _save(fig, out, f"{t.task}_text.png")
    return made


def _report_plots(report: EvalReport, out: Path) -> dict[str, str]:
    from fv_plugin import viz

    made = {}
    if len(report.tasks) > 1:
        made["similarity"] = _save(
            viz.plot_similarity(report.similarity, [t.task for t in report.tasks]), out, "similarity.png"
        )
    for mode in report.specificity.steered if report.specificity is not None else ():
        assert report.specificity is not None
        made[f"specificity_{mode}"] = _save(
            viz.plot_specificity(report.specificity, mode), out, f"specificity_{mode}.png"
        )
    return made


def write_eval_report(report: EvalReport, folder: str | Path) -> Path:
    """Write ``report.json``, ``plots/*.png`` and ``summary.md`` into ``folder``; returns the summary's path."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"model": report.model, "settings": report.settings}
    data["tasks"] = [_task_json(t) for t in report.tasks]
    data["similarity"] = {"tasks": [t.task for t in report.tasks], "matrix": report.similarity.tolist()}
    data["specificity"] = report.specificity.to_dict() if report.specificity is not None else None
    plots = {t.task: _task_plots(t, out) for t in report.tasks}
    shared = _report_plots(report, out)
    data["plots"] = {**plots, "report": shared}
    (out / "report.json").write_text(json.dumps(data, indent=1, default=_json_default), encoding="utf-8")
    summary = out / "summary.md"
    summary.write_text(_eval_markdown(report, plots, shared), encoding="utf-8")
    return summary


def _json_default(value: object) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _cell(base: EvalResult, steered: EvalResult) -> str:
    low, high = steered.accuracy_ci
    return f"{_fmt(base.accuracy)} → **{_fmt(steered.accuracy)}** ({low:.2f}–{high:.2f})"


def _accuracy_table(report: EvalReport, protocol: str) -> list[str]:
    """One row per task (``unsteered → steered (95% interval of steered)``) and a mean row."""
    modes = list(report.tasks[0].results)
    lines = [
        "| task | method (layer) | n | " + " | ".join(modes) + " | exact match, zero-shot | Δp | KL |",
        "|---|---|---|" + "---|" * (len(modes) + 3),
    ]
    by_task = [(t, t.results_for(protocol)) for t in report.tasks]
    for t, results in by_task:
        cells = [_cell(base, steered) for base, steered in results.values()]
        zero = results.get("zero_shot")
        em = f"{_fmt(zero[0].exact_match)} → {_fmt(zero[1].exact_match)}" if zero else "–"
        shift, kl = (_fmt(zero[1].prob_shift), _fmt(zero[1].kl)) if zero else ("–", "–")
        n = next(iter(results.values()))[0].n
        method = f"{t.vector.method} ({t.vector.layer})"
        lines.append(f"| {t.task} | {method} | {n} | " + " | ".join(cells) + f" | {em} | {shift} | {kl} |")
    means = []
    for mode in modes:
        base = _mean([r[mode][0].accuracy for _, r in by_task if r[mode][0].n])
        steered = _mean([r[mode][1].accuracy for _, r in by_task if r[mode][1].n])
        means.append(f"{base:.2f} → **{steered:.2f}**")
    return [*lines, "| **mean** | | | " + " | ".join(means) + " | | | |"]


def _text_table(report: EvalReport) -> list[str]:
    rows = [t for t in report.tasks if t.text is not None]
    if not rows:
        return []
    strengths = rows[0].text.strengths if rows[0].text else ()
    head = ", ".join(f"s={s:g}" for s in strengths)
    lines = [
        "## Side effects on neutral text",
        "",
        f"Each vector added at every token of the {rows[0].text.n_texts if rows[0].text else 0} shipped neutral "
        "paragraphs at each strength: perplexity relative to the plain model, mean KL divergence (nats per token)",
        "from the plain next-token distribution, the strength at which perplexity has risen by 10%, and the",
        "fraction of greedy continuations of the paragraphs' openings (24 tokens, steered) that end in a loop.",
        "",
        f"| task | perplexity ratio: {head} | KL: {head} | +10% perplexity at | degenerate: plain, {head} |",
        "|---|---|---|---|---|",
    ]
    for t in rows:
        x = t.text
        assert x is not None
        ratio = ", ".join(f"{r:.2f}" for r in x.perplexity_ratio)
        kl = ", ".join(f"{k:.2f}" for k in x.kl)
        rise = f"{x.rise_10:.2f}" if x.rise_10 is not None else f"> {max(x.strengths):g}"
        bad = ", ".join(f"{d:.2f}" for d in (x.base_degenerate, *x.degenerate))
        lines.append(f"| {t.task} | {ratio} | {kl} | {rise} | {bad} |")
    return [*lines, ""]


def _specificity_section(report: EvalReport, shared: Mapping[str, str]) -> list[str]:
    spec = report.specificity
    if spec is None:
        return []
    lines = [
        "## Specificity: every vector on every task",
        "",
        "Accuracy change (steered − unsteered, first token, test split) of each task's vector (rows) on each",
        "task's prompts (columns). The diagonal is the vector's own task; off the diagonal is what it changes",
        "elsewhere (does the antonym vector break country → capital in-context learning?).",
        "",
    ]
    for mode in spec.steered:
        lines.append(
            f"- {mode.replace('_', '-')} prompts: mean change off the diagonal {spec.off_diagonal_change(mode):+.2f}"
        )
    lines.append("")
    lines += [f"![{name}]({path})" for name, path in shared.items() if name.startswith("specificity")]
    return [*lines, ""]


def _task_facts(t: TaskReport) -> list[str]:
    facts = [f"vector: {t.vector.method}, layer {t.vector.layer}, norm {t.vector.norm():.1f}"]
    if t.strength is not None:
        facts.append(f"best strength {t.strength.best:g} (accuracy {max(t.strength.accuracy):.2f})")
    if t.layers is not None:
        facts.append(f"best test layer {int(t.layers.best)} (accuracy {max(t.layers.accuracy):.2f})")
    if t.k is not None:
        facts.append(f"heads method: best k {int(t.k.best)} (accuracy {max(t.k.accuracy):.2f})")
    lines = ["- " + "; ".join(facts)]
    if t.tokens:
        lines.append(f"- top tokens of the vector: {_tokens(t.tokens)}")
    if t.heads_vector is not None:
        top = ", ".join(f"{h.layer}.{h.head} ({h.aie:.3f})" for h in head_locations(t.heads_vector)[:5])
        lines.append(f"- top heads by AIE (layer.head): {top}")
        if t.head_tokens:
            lines.append(f"- top tokens of the heads vector: {_tokens(t.head_tokens)}")
    if t.vector.selection is not None:
        lines += ["", 'How `method="auto"` chose:', "", selection_table(t.vector.selection, top=5), ""]
    return [*lines, f"- time: {t.seconds:.0f} s"]


_INTRO = """Each task's vector is added after its layer at the final prompt token (and, for the continuation, at
every generated token). Scores are on the task's test split: first-token top-1 accuracy (natural text: an
accepted answer appears in the greedy continuation), unsteered → steered, with the steered accuracy's 95%
Wilson interval in brackets. `Δp` is the mean change in the answer's first-token probability; `KL` the mean
KL divergence (nats) from the unsteered to the steered next-token distribution in zero-shot prompts."""


def _eval_markdown(report: EvalReport, plots: Mapping[str, Mapping[str, str]], shared: Mapping[str, str]) -> str:
    lines = [f"# Function vectors on {report.model}", "", _INTRO, ""]
    if report.tasks:
        lines += ["## Every test query", "", *_accuracy_table(report, "all"), ""]
    if report.tasks and all(t.icl_correct is not None for t in report.tasks):
        lines += [
            "## The paper's protocol: the test queries 10-shot ICL answers correctly",
            "",
            *_accuracy_table(report, "icl_correct"),
            "",
        ]
    lines += _text_table(report) + _specificity_section(report, shared)
    lines += ["## Per task", ""]
    for t in report.tasks:
        lines += [f"### {t.task}", "", *_task_facts(t), ""]
        lines += [f"![{name}]({path})" for name, path in plots.get(t.task, {}).items()]
        lines.append("")
    if "similarity" in shared:
        lines += ["## Similarity of the tasks' vectors", "", f"![similarity]({shared['similarity']})", ""]
    lines += ["## Settings", "", "```json", json.dumps(report.settings, indent=1, default=_json_default), "```", ""]
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
