"""What the Extract and Compare tabs show of a vector's side effects: figures, sentences, tables (no UI)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fv_plugin
import fv_plugin.viz
from fv_plugin.side_effects import Specificity, TextEffects

__all__ = ["effects_table", "extract_figures", "side_effects_note", "text_sentence"]


def extract_figures(fv: fv_plugin.FunctionVector, text: TextEffects) -> tuple[Any, ...]:
    """The Extract tab's figures of a new vector, in the order of ``demo.ui.EXTRACT_FIGURES``."""
    heatmap = fv_plugin.viz.plot_aie(fv) if fv_plugin.aie_matrix(fv) is not None else None
    curve = fv_plugin.viz.plot_layer_curve(fv) if fv.layer_sweep is not None else None
    return (heatmap, curve, fv_plugin.viz.plot_text_effects(text, title="what else it changes: neutral text"))


def text_sentence(text: TextEffects) -> str:
    """One sentence on a vector's effects on neutral text (at strength 1 when it was measured there)."""
    at = text.strengths.index(1.0) if 1.0 in text.strengths else 0
    rise = f"{text.rise_10:.2f}" if text.rise_10 is not None else f"more than {max(text.strengths):g}"
    return (
        f"On neutral text ({text.n_texts} paragraphs, the vector at every token): perplexity x"
        f"{text.perplexity_ratio[at]:.2f} at strength {text.strengths[at]:g}, +10% from strength {rise}; "
        f"{text.degenerate[at]:.0%} of steered continuations end in a loop (plain: {text.base_degenerate:.0%})."
    )


def side_effects_note(spec: Specificity | None) -> str:
    if spec is None:
        return "**What the vectors change besides their task.**"
    changes = ", ".join(f"{mode.replace('_', '-')} {spec.off_diagonal_change(mode):+.2f}" for mode in spec.steered)
    return (
        "**What the vectors change besides their task.** The plots put each shipped vector (rows) on each task's "
        "test prompts (columns), zero-shot and with 10 demonstrations: the diagonal is the vector's own task, the "
        f"rest what it does elsewhere (mean accuracy change off the diagonal: {changes}). The table puts each "
        "vector at every token of neutral English paragraphs."
    )


def effects_table(text: Mapping[str, TextEffects]) -> str:
    """Markdown: each vector's perplexity ratio, KL and looping continuations on neutral text, per strength."""
    if not text:
        return ""
    strengths = next(iter(text.values())).strengths
    head = ", ".join(f"s={s:g}" for s in strengths)
    lines = [
        f"| vector | perplexity / plain ({head}) | KL, nats ({head}) | +10% perplexity at | loops: plain, {head} |",
        "|---|---|---|---|---|",
    ]
    for name, t in text.items():
        rise = f"{t.rise_10:.2f}" if t.rise_10 is not None else f"> {max(t.strengths):g}"
        loops = ", ".join(f"{d:.0%}" for d in (t.base_degenerate, *t.degenerate))
        ratio = ", ".join(f"{r:.2f}" for r in t.perplexity_ratio)
        lines.append(f"| {name} | {ratio} | {', '.join(f'{k:.2f}' for k in t.kl)} | {rise} | {loops} |")
    return "\n".join(lines)
