"""The figures' one way to matplotlib: a non-interactive backend, and the file format named by
the path's extension, checked before a run (a minute of timing must not end in an error)."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def image_format(path, opt: str = "--plot") -> str:
    """The format `path` is written in: its extension (png, svg, pdf, ... whatever matplotlib
    writes), png when it has none; ValueError naming `opt` for an extension matplotlib cannot
    write (it would fail only after the run)."""
    ext = Path(path).suffix.lower().lstrip(".")
    if not ext:
        return "png"
    from matplotlib.backend_bases import FigureCanvasBase
    supported = FigureCanvasBase.get_supported_filetypes()
    if ext not in supported:
        raise ValueError(f"{opt} {path}: matplotlib cannot write .{ext} files "
                         f"(it writes {', '.join(sorted(supported))})")
    return ext


def save(fig, path) -> None:
    """Write `fig` to exactly `path` (an extension-less path gets PNG bytes, not a '.png' added)."""
    fig.savefig(path, dpi=120, format=image_format(path))
    pyplot().close(fig)
