"""The demo's probability chart (``fv_plugin.viz.plot_token_probs``), checked by the data it draws."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from fv_plugin import viz

PNG = b"\x89PNG\r\n\x1a\n"


def test_token_probability_bars_draw_exactly_their_data(tmp_path: Path) -> None:
    tokens = [" cold", " hot", "\n"]
    series = {"plain": [0.1, 0.5, 0.2], "steered": [0.7, 0.1, 0.0], "10-shot ICL": [0.8, 0.05, 0.01]}
    fig = viz.plot_token_probs(tokens, series, title="first token")
    ax = fig.axes[0]
    bars = list(ax.patches)
    assert [bar.get_width() for bar in bars] == [v for values in series.values() for v in values]
    # bar k of series s sits in token k's group: around its tick, in series order from top to bottom
    centres = [bar.get_y() + bar.get_height() / 2 for bar in bars]
    assert [round(c) for c in centres] == [0, 1, 2] * 3
    for k in range(3):
        group = centres[k::3]
        assert group == sorted(group) and max(group) - min(group) < 0.8
    assert [t.get_text() for t in ax.get_yticklabels()] == [repr(t) for t in tokens]
    assert ax.yaxis_inverted() and ax.get_xlim() == (0.0, 1.0)  # the first token on top; probabilities
    legend = ax.get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == list(series)
    colours = [[bar.get_facecolor() for bar in bars[s * 3 : s * 3 + 3]] for s in range(3)]
    assert all(len(set(c)) == 1 for c in colours) and len({c[0] for c in colours}) == 3  # one colour per series
    assert ax.get_title() == "first token"
    fig.savefig(tmp_path / "probs.png")
    assert (tmp_path / "probs.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    ("tokens", "series", "message"),
    [
        ([], {"plain": []}, "nothing to plot"),
        (["a"], {}, "nothing to plot"),
        (["a", "b"], {"plain": [0.5]}, "series 'plain' has 1 values for 2 tokens"),
        (["a"], {"plain": [3.2]}, "outside \\[0, 1\\]; pass probabilities"),
    ],
)
def test_token_probability_bars_refuse_bad_data(tokens: list, series: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        viz.plot_token_probs(tokens, series)
