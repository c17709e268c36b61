"""What every bench plot shares: a headless backend, and a PNG written whole or not at all."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from search.core.atomic import atomic_path


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out ``fig``, write it to ``path`` atomically as PNG, and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    fig.clf()
    pyplot().close(fig)
