"""Plots (matplotlib, the ``viz`` extra). Each draws values that the rest of the package returns as data.

Every function returns a :class:`matplotlib.figure.Figure` made without pyplot, so nothing global is touched
and figures can be drawn from several threads; save one with ``fig.savefig(path)``.

=====================  ==========================================================
plot                   data
=====================  ==========================================================
:func:`plot_aie`       :func:`fv_plugin.analysis.aie_matrix`, ``fv.heads``
:func:`plot_layer_curve`  ``fv.layer_sweep`` or any layer :class:`~fv_plugin.Sweep`
:func:`plot_sweep`     a :class:`~fv_plugin.Sweep` (strength, layer or k)
:func:`plot_similarity`  :func:`fv_plugin.analysis.similarity_matrix`
:func:`plot_top_tokens`  :func:`fv_plugin.analysis.top_tokens`
:func:`plot_head_depths`  :func:`fv_plugin.analysis.head_locations` per model
:func:`plot_transfer`  :class:`~fv_plugin.compare.TaskComparison` rows
:func:`plot_specificity`  :class:`~fv_plugin.side_effects.Specificity` (one prompt mode)
:func:`plot_text_effects`  :class:`~fv_plugin.side_effects.TextEffects`
:func:`plot_token_probs`  next-token probabilities of a few tokens under several settings
:func:`plot_choice`    ``fv.selection``: accuracy against side effect, the choice marked
=====================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fv_plugin.analysis import HeadLocation, TokenScore, aie_matrix, layer_sweep, similarity_matrix
from fv_plugin.records import Selection, Sweep
from fv_plugin.side_effects import Specificity, TextEffects
from fv_plugin.vector import FunctionVector

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "plot_aie",
    "plot_choice",
    "plot_head_depths",
    "plot_layer_curve",
    "plot_similarity",
    "plot_specificity",
    "plot_sweep",
    "plot_text_effects",
    "plot_token_probs",
    "plot_top_tokens",
    "plot_transfer",
]


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('plots need matplotlib: pip install "fv_plugin[viz]"') from exc
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_aie(
    fv: FunctionVector | torch.Tensor, heads: Sequence[tuple[int, int]] | None = None, *, title: str | None = None
) -> Figure:
    """Heatmap of the average indirect effect of every head (layers down, heads across); chosen heads boxed.

    ``fv`` is a vector extracted with ``method="heads"`` (its AIE matrix and heads are used) or an AIE matrix
    ``[layers, heads]``, with ``heads`` to mark.
    """
    if isinstance(fv, FunctionVector):
        matrix = aie_matrix(fv)
        if matrix is None:
            raise ValueError(f"the vector (method {fv.method!r}) stores no AIE matrix; extract it with method='heads'")
        heads = fv.heads if heads is None else heads
        title = title or f"AIE per head: {fv.task or 'task'}"
    else:
        matrix = fv.detach().float().cpu()
        if matrix.ndim != 2:
            raise ValueError(f"an AIE matrix is [layers, heads], got shape {tuple(matrix.shape)}")
    n_layers, n_heads = matrix.shape
    fig = _figure(max(3.0, 1.2 + 0.35 * n_heads), max(3.0, 0.9 + 0.2 * n_layers))
    ax = fig.add_subplot()
    limit = float(matrix.abs().max()) or 1.0
    image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="upper")
    fig.colorbar(image, ax=ax, label="AIE (gain in answer probability)")
    for layer, head in heads or ():
        ax.add_patch(_box(head, layer))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or "AIE per head")
    return fig


def _box(x: int, y: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5, label=f"{y}.{x}")


def plot_layer_curve(curve: FunctionVector | Sweep, *, title: str | None = None) -> Figure:
    """Accuracy (and answer probability) against the layer the vector is added at, the chosen layer marked.

    ``curve`` is a vector whose layer was chosen by the validation sweep (its ``layer_sweep``) or a layer
    :class:`~fv_plugin.Sweep`.
    """
    if isinstance(curve, FunctionVector):
        found = layer_sweep(curve)
        if found is None:
            raise ValueError("the vector stores no layer sweep (its layer was given); use fv_plugin.sweep_layers")
        title = title or f"layer sweep: {curve.task or 'task'} ({found.split})"
        curve = found
    if curve.parameter != "layer":
        raise ValueError(f"expected a layer sweep, got a {curve.parameter!r} sweep; use plot_sweep")
    fig = plot_sweep(curve, title=title)
    fig.axes[0].axvline(curve.best, color="grey", linewidth=0.8)
    return fig


def plot_sweep(sweep: Sweep, *, title: str | None = None) -> Figure:
    """Accuracy and answer probability against the swept setting, with the unsteered accuracy as a line."""
    fig = _figure(5.5, 3.2)
    ax = fig.add_subplot()
    ax.plot(sweep.values, sweep.accuracy, marker="o", label="accuracy")
    ax.plot(sweep.values, sweep.answer_prob, marker=".", linestyle="--", label="answer probability")
    if sweep.baseline_accuracy is not None:
        ax.axhline(sweep.baseline_accuracy, color="grey", linewidth=0.8, linestyle=":", label="no vector")
    ax.set_xlabel(sweep.parameter)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best")
    ax.set_title(title or f"{sweep.task}: accuracy against {sweep.parameter}")
    return fig


def plot_similarity(
    vectors: Sequence[FunctionVector] | torch.Tensor, labels: Sequence[str] | None = None, *, title: str | None = None
) -> Figure:
    """Cosine-similarity matrix of vectors (or of a precomputed ``[n, n]`` matrix), annotated."""
    if isinstance(vectors, torch.Tensor):
        matrix = vectors.detach().float().cpu()
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a similarity matrix is square, got shape {tuple(matrix.shape)}")
    else:
        matrix = similarity_matrix(list(vectors))
        labels = labels or [v.task or f"#{i}" for i, v in enumerate(vectors)]
    n = matrix.shape[0]
    labels = list(labels) if labels is not None else [f"#{i}" for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} vectors")
    fig = _figure(max(3.5, 1.5 + 0.5 * n), max(3.0, 1.2 + 0.45 * n))
    ax = fig.add_subplot()
    image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ax.set_xticks(range(n), labels, rotation=60, ha="right")
    ax.set_yticks(range(n), labels)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title or "cosine similarity of function vectors")
    return fig


def plot_top_tokens(tokens: Sequence[TokenScore], *, title: str | None = None) -> Figure:
    """Horizontal bars of the logits of a vector's top tokens (best at the top)."""
    if not tokens:
        raise ValueError("no tokens to plot")
    fig = _figure(4.5, max(2.5, 0.6 + 0.28 * len(tokens)))
    ax = fig.add_subplot()
    labels = [repr(t.token) for t in tokens]
    ax.barh(range(len(tokens)), [t.logit for t in tokens])
    ax.set_yticks(range(len(tokens)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("logit (final norm + unembedding of the vector)")
    ax.set_title(title or "top tokens")
    return fig


def plot_head_depths(heads: Mapping[str, Sequence[HeadLocation]], *, title: str | None = None) -> Figure:
    """Relative depth of each model's chosen heads (0 = first layer, 1 = last), marker size by AIE rank."""
    if not heads:
        raise ValueError("no heads to plot")
    fig = _figure(5.5, 1.2 + 0.6 * len(heads))
    ax = fig.add_subplot()
    for row, (name, locations) in enumerate(heads.items()):
        depths = [h.depth for h in locations]
        sizes = [60 * (1 - i / max(len(locations), 1)) + 10 for i in range(len(locations))]
        ax.scatter(depths, [row] * len(depths), s=sizes, alpha=0.7, label=name)
    ax.set_yticks(range(len(heads)), list(heads))
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("relative depth of the head's layer")
    ax.set_title(title or "where the top heads sit")
    return fig


def plot_transfer(
    tasks: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str | None = None, ylabel: str = "accuracy"
) -> Figure:
    """Grouped bars: one group per task, one bar per series (e.g. zero-shot, own FV, mapped FV)."""
    if not tasks or not series:
        raise ValueError("nothing to plot")
    for name, values in series.items():
        if len(values) != len(tasks):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(tasks)} tasks")
    fig = _figure(max(5.0, 1.5 + 0.9 * len(tasks)), 3.4)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [t + (i - (len(series) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, list(values), width=width, label=name)
    ax.set_xticks(range(len(tasks)), list(tasks), rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "transfer")
    return fig


def plot_specificity(spec: Specificity, mode: str = "zero_shot", *, title: str | None = None) -> Figure:
    """Accuracy change (steered - unsteered) of each task's vector (rows) on each task's ``mode`` prompts."""
    if mode not in spec.steered:
        raise ValueError(f"no {mode!r} prompts were measured; measured: {sorted(spec.steered)}")
    change = spec.change(mode)
    n = len(spec.tasks)
    fig = _figure(max(3.5, 1.7 + 0.5 * n), max(3.0, 1.3 + 0.45 * n))
    ax = fig.add_subplot()
    image = ax.imshow(change.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax, label="accuracy change")
    ax.set_xticks(range(n), list(spec.tasks), rotation=60, ha="right")
    ax.set_yticks(range(n), list(spec.tasks))
    ax.set_xlabel(f"prompts ({mode.replace('_', '-')})")
    ax.set_ylabel("vector")
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{float(change[i, j]):+.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(title or f"each vector on each task ({mode.replace('_', '-')})")
    return fig


def plot_text_effects(effects: TextEffects, *, title: str | None = None) -> Figure:
    """Perplexity ratio, KL and degenerate fraction of neutral text against strength (the vector at every token)."""
    fig = _figure(8.5, 3.0)
    ppl, kl, bad = fig.subplots(1, 3)
    ppl.plot(effects.strengths, effects.perplexity_ratio, marker="o")
    ppl.axhline(1.1, color="grey", linewidth=0.8, linestyle=":", label="+10%")
    if effects.rise_10 is not None:
        ppl.axvline(effects.rise_10, color="grey", linewidth=0.8)
    ppl.set_ylabel("perplexity / plain")
    ppl.legend(loc="best", fontsize=8)
    kl.plot(effects.strengths, effects.kl, marker="o")
    kl.set_ylabel("KL from plain (nats / token)")
    bad.plot(effects.strengths, effects.degenerate, marker="o")
    bad.axhline(effects.base_degenerate, color="grey", linewidth=0.8, linestyle=":", label="plain")
    bad.set_ylim(-0.02, 1.02)
    bad.set_ylabel("degenerate continuations")
    bad.legend(loc="best", fontsize=8)
    for ax in (ppl, kl, bad):
        ax.set_xlabel("strength")
    fig.suptitle(title or "the vector on neutral text")
    return fig


def plot_token_probs(
    tokens: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str | None = None
) -> Figure:
    """Grouped horizontal bars of next-token probabilities: one group per token (listed first at the top), one bar
    per series, e.g. ``{"plain": [...], "steered": [...], "10-shot ICL": [...]}`` for the same prompt.

    Tokens are labelled with ``repr`` so that leading spaces and newlines show.
    """
    if not tokens or not series:
        raise ValueError("nothing to plot: give at least one token and one series")
    for name, values in series.items():
        if len(values) != len(tokens):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(tokens)} tokens")
        if not all(0.0 <= float(v) <= 1.0 for v in values):
            raise ValueError(f"series {name!r} has values outside [0, 1]; pass probabilities, not logits")
    fig = _figure(6.0, max(2.6, 1.0 + 0.45 * len(tokens)))
    ax = fig.add_subplot()
    height = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * height
        ax.barh([t + offset for t in range(len(tokens))], [float(v) for v in values], height=height, label=name)
    ax.set_yticks(range(len(tokens)), [repr(t) for t in tokens])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of the next token")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "next-token probabilities")
    return fig


def plot_choice(selection: FunctionVector | Selection, *, title: str | None = None) -> Figure:
    """How ``method="auto"`` chose: each finalist's exact match on the validation queries against its side effect
    (KL on neutral text), one marker per method, the chosen candidate circled, the side-effect budget and the
    model without a vector as lines.

    ``selection`` is a vector made by ``method="auto"`` (its ``selection``) or a
    :class:`~fv_plugin.records.Selection`. Candidates without a side effect (dropped after the first round, or a
    file written before side effects were scored) are left out.
    """
    if isinstance(selection, FunctionVector):
        if selection.selection is None:
            raise ValueError(f"the vector (method {selection.method!r}) was not chosen by method='auto': no selection")
        title = title or f"auto's choice: {selection.task or 'task'}"
        selection = selection.selection
    shown = [c for c in selection.candidates if c.side_effect is not None]
    if not shown:
        raise ValueError("no candidate has a side effect recorded (made before side effects were scored?)")
    fig = _figure(5.5, 3.6)
    ax = fig.add_subplot()
    for method in dict.fromkeys(c.method for c in shown):
        group = [c for c in shown if c.method == method]
        exact = [c.exact_match if c.exact_match is not None else c.accuracy for c in group]
        ax.scatter([c.side_effect or 0.0 for c in group], exact, label=method, alpha=0.75)
    best = selection.best
    if best.side_effect is not None:
        y = best.exact_match if best.exact_match is not None else best.accuracy
        ax.scatter([best.side_effect], [y], s=160, facecolors="none", edgecolors="black", label="chosen")
    if selection.side_effect_budget is not None:
        ax.axvline(selection.side_effect_budget, color="grey", linewidth=0.8, linestyle="--", label="budget")
    base = selection.baseline_exact_match
    ax.axhline(
        base if base is not None else selection.baseline_accuracy,
        color="grey",
        linewidth=0.8,
        linestyle=":",
        label="no vector",
    )
    ax.set_xlabel("side effect: KL on neutral text (nats)")
    ax.set_ylabel("validation exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or "auto's choice: accuracy against side effect")
    return fig
