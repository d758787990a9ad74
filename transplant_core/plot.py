"""A heatmap of module scores (layer by module kind), for people who would rather look."""
from __future__ import annotations

from pathlib import Path

from .refs import ModuleRef


def score_heatmap(scores: dict[ModuleRef, float], path: Path, title: str = "LAE module scores") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({r.layer for r in scores})
    kinds = sorted({r.kind for r in scores}, key=lambda k: (ModuleRef(0, k).group, k))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for r, s in scores.items():
        grid[layers.index(r.layer), kinds.index(r.kind)] = s
    fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2, 0.45 * len(layers) + 1.8))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="score (mean |a_donor - a_target|)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
