"""Plot helpers that hold on any input: empty, a single value, all equal, NaN or inf among the values.

Every figure of the pipeline draws its histograms through `hist`, so a layer whose neurons are all dead, or all
have one cluster, still gets its picture (with a note where there is nothing to draw) instead of stopping the run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import finite


def bin_edges(values: np.ndarray, bins: int = 30, integer: bool = False) -> np.ndarray:
    """Edges that always have width: one bin per integer for counts; a unit-wide bin around a constant."""
    if integer:
        low, high = (int(np.floor(values.min())), int(np.ceil(values.max()))) if values.size else (1, 1)
        return np.arange(low - 0.5, high + 1.5)
    if not values.size:
        return np.linspace(0.0, 1.0, bins + 1)
    low, high = float(values.min()), float(values.max())
    if not high > low:  # constant (or a single value): a bin centred on it
        pad = max(abs(low) * 0.05, 0.5)
        return np.linspace(low - pad, high + pad, min(bins, 10) + 1)
    return np.linspace(low, high, bins + 1)


def hist(ax: Any, values: Any, bins: int | np.ndarray = 30, integer: bool = False, empty_note: str = "no data",
         **kwargs: Any) -> int:
    """A histogram of the finite values; a note in the panel when there are none. Returns how many were drawn."""
    data = finite(values)
    if not data.size:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, color="#777777")
        return 0
    edges = bins if isinstance(bins, np.ndarray) else bin_edges(data, int(bins), integer)
    ax.hist(data, bins=edges, **kwargs)
    return int(data.size)
