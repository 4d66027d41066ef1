"""Summary statistics the bench scripts print: the nearest-rank percentile."""

from __future__ import annotations


def pct(values: list[float], p: float) -> float:
    """The `p`th percentile (0-100) by nearest rank; NaN for no values, so a table still prints."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
