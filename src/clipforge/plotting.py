"""Figures without pyplot: a matplotlib :class:`~matplotlib.figure.Figure` on the Agg canvas, saved atomically.

Nothing here selects a matplotlib backend or registers figures with pyplot, so a user's chosen backend and
open figures are left as they were (``matplotlib.use("Agg")`` in a library would switch them behind the caller).
Import this module inside the function that draws: it imports matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clipforge.files import atomic_path


def new_figure(**options: Any) -> Figure:
    """``Figure(**options)`` (``figsize``, ``dpi``, ...) drawn by the Agg canvas; add axes with
    ``figure.subplots()``. No ``plt.close`` is needed: pyplot never holds it."""
    figure = Figure(**options)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path, **options: Any) -> Path:
    """Write ``figure`` to ``path`` atomically, in the format its suffix names (``options`` go to
    ``savefig``: ``dpi``, ...); returns ``path``."""
    path = Path(path)
    options.setdefault("format", path.suffix.lstrip(".").lower() or "png")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, **options)
    return path
