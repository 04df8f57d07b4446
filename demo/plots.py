"""The demo's figures (matplotlib, drawn off-screen)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def aie_heatmap(aie: Sequence[Sequence[float]], heads: Sequence[tuple[int, int]] = ()) -> Any:
    """Average indirect effect per (layer, head), the chosen heads circled."""
    plt = _pyplot()
    values = torch.tensor(aie, dtype=torch.float32)
    fig, ax = plt.subplots(figsize=(4.2, 5.2))
    limit = float(values.abs().max()) or 1.0
    image = ax.imshow(values.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, origin="lower")
    for layer, head in heads:
        ax.scatter([head], [layer], s=80, facecolors="none", edgecolors="black", linewidths=1.5)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("Average indirect effect (chosen heads circled)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def layer_curve(sweep: dict[str, Sequence[float]], chosen: int) -> Any:
    """Zero-shot validation accuracy with the vector added at each layer; the chosen layer marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    ax.plot(sweep["layers"], sweep["accuracy"], marker="o", label="accuracy")
    if "probability" in sweep:
        ax.plot(sweep["layers"], sweep["probability"], marker=".", linestyle="--", label="answer probability")
    ax.axvline(chosen, color="grey", linestyle=":", label=f"chosen layer {chosen}")
    ax.set_xlabel("layer the vector is added after")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Zero-shot validation accuracy by layer", fontsize=9)
    fig.tight_layout()
    return fig


def similarity(names: Sequence[str], matrix: torch.Tensor, title: str = "Cosine similarity") -> Any:
    """A labelled cosine-similarity matrix."""
    plt = _pyplot()
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 0.8 + 0.4 * n))
    image = ax.imshow(matrix.float().numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig
