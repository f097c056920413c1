"""A/B testing two runs on the same examples: the paired difference of a metric, its 95% bootstrap interval and
a two-sided paired permutation (sign-flip) p-value.

Paired, because both runs answered the same questions: per-example differences remove the between-question
variance that makes two independent intervals overlap when one run is in fact better. Hand-written (about 30
lines of NumPy) since scipy is not a ragkit dependency and its permutation_test is not paired over ids."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ragkit.errors import InputError, Location


@dataclass(frozen=True)
class PairedResult:
    metric: str
    n: int
    mean_a: float
    mean_b: float
    difference: float  # mean of b - a
    ci95: tuple[float, float]
    p_value: float
    resamples: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def per_example(report: dict[str, Any], metric: str, where: str) -> dict[str, float]:
    """id -> the metric's value, from a report's rows."""
    values: dict[str, float] = {}
    for i, row in enumerate(report.get("rows") or [], start=1):
        if metric not in row.get("metrics", {}):
            raise InputError(Location(where, None, f"rows[{i}].metrics.{metric}"), f"no '{metric}' for example "
                             f"'{row.get('id')}'", hint="Compare runs of the same task, or pick --metric.")
        values[str(row["id"])] = float(row["metrics"][metric])
    if not values:
        raise InputError(Location(where, None, "rows"), "the report has no per-example rows to pair")
    return values


def paired_test(a: dict[str, float], b: dict[str, float], metric: str, *, where: tuple[str, str],
                resamples: int = 10_000, seed: int = 0) -> PairedResult:
    import numpy as np

    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        side, ids = (where[0], only_a) if only_a else (where[1], only_b)
        raise InputError(Location(side, None, "rows"), f"example '{ids[0]}' is only in this report "
                         f"({len(only_a)} + {len(only_b)} ids differ); a paired test needs the same examples")
    ids = sorted(a)
    x, y = np.array([a[i] for i in ids]), np.array([b[i] for i in ids])
    d = y - x
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    signs = rng.choice((-1.0, 1.0), size=(resamples, len(d)))
    observed = abs(d.mean())
    # +1 on both sides: the observed labelling is one of the permutations (never a p of 0)
    extreme = int((np.abs((signs * d).mean(axis=1)) >= observed - 1e-12).sum())
    return PairedResult(metric, len(d), float(x.mean()), float(y.mean()), float(d.mean()), (float(low), float(high)),
                        (extreme + 1) / (resamples + 1), resamples)
