"""Evaluating on a subsample that still speaks for the whole set: stratified random sampling with
weights (seed 002's importance-sampled evaluation).

The examples are split into strata by a field (a categorical field's values, or quantile bins of a
numeric one such as PopQA's `pop`), each stratum is sampled without replacement in proportion to its
size (at least two where it has two, so its variance can be estimated), and every sampled example
carries the weight N_h / n_h. The estimate of a metric's full-set mean is the stratified mean
sum_h (N_h / N) * mean_h, unbiased for the full set; its standard error is
sqrt(sum_h (N_h / N)^2 * (1 - n_h / N_h) * s_h^2 / n_h) (finite-population correction included), and
the 95% interval is the normal one. When the field predicts the metric (popular entities are answered
more often), the interval is narrower than a simple random sample's of the same size.

Written by hand: the estimator is a few lines of textbook survey statistics (Cochran, Sampling
Techniques, ch. 5), and the survey packages that implement it bring data-frame stacks for it."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragkit.errors import InputError, Location, UsageError


@dataclass
class Sample:
    examples: list[Any]  # the sampled examples, in their file order
    strata: dict[str, tuple[int, int]]  # stratum label -> (N_h in the full set, n_h sampled)
    stratum_of: dict[str, str]  # example id -> its stratum label
    population: int
    field: str | None
    seed: int

    def weight(self, example_id: str) -> float:
        big, small = self.strata[self.stratum_of[example_id]]
        return big / small

    def describe(self) -> dict[str, Any]:
        return {"method": "stratified random sample, proportional allocation" if self.field else "simple random sample",
                "field": self.field, "population": self.population, "n": len(self.examples), "seed": self.seed,
                "strata": [{"stratum": label, "population": big, "sampled": small}
                           for label, (big, small) in self.strata.items()]}


def _labels(examples: Sequence[Any], field: str | None, bins: int, source: str) -> list[str]:
    if field is None:
        return ["all"] * len(examples)
    values = []
    for e in examples:
        if field not in e.fields:
            raise InputError(Location(source, e.line or None, field), f"field '{field}' (--stratify) is missing")
        values.append(e.fields[field])
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numeric or len(set(values)) <= bins:
        return [str(v) for v in values]
    ordered = sorted(values)
    edges = [ordered[min(len(ordered) - 1, (len(ordered) * i) // bins)] for i in range(1, bins)]
    edges = sorted(set(edges))
    labels = []
    for v in values:
        i = sum(v >= edge for edge in edges)
        low = "-inf" if i == 0 else f"{edges[i - 1]:g}"
        high = "inf" if i == len(edges) else f"{edges[i]:g}"
        labels.append(f"{field} in [{low}, {high})")
    return labels


def draw(examples: Sequence[Any], n: int, *, field: str | None = None, bins: int = 5, seed: int = 0,
         source: str = "<data>") -> Sample:
    """A stratified (or, without `field`, simple) random sample of `n` of `examples`."""
    if n < 1:
        raise UsageError(f"--sample {n}: expected a positive number of examples")
    if bins < 2:
        raise UsageError(f"--strata {bins}: expected at least 2 bins")
    population = len(examples)
    labels = _labels(examples, field, bins, source)
    members: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        members[label].append(i)
    if n >= population:
        chosen = list(range(population))
        sizes = {label: (len(ix), len(ix)) for label, ix in members.items()}
    else:
        sizes = _allocate({label: len(ix) for label, ix in members.items()}, n)
        rng = random.Random(seed)
        chosen = sorted(i for label, ix in sorted(members.items()) for i in rng.sample(ix, sizes[label][1]))
    return Sample([examples[i] for i in chosen], dict(sorted(sizes.items())),
                  {examples[i].id: labels[i] for i in chosen}, population, field, seed)


def _allocate(sizes: dict[str, int], n: int) -> dict[str, tuple[int, int]]:
    """Proportional allocation by largest remainders, each stratum at least min(2, N_h) where n allows."""
    total = sum(sizes.values())
    floor_ = {h: min(2, size) for h, size in sizes.items()}
    if sum(floor_.values()) > n:
        raise UsageError(f"--sample {n} is smaller than two examples per stratum ({len(sizes)} strata): "
                         "sample more, or use fewer --strata")
    exact = {h: n * size / total for h, size in sizes.items()}
    alloc = {h: max(floor_[h], min(sizes[h], int(exact[h]))) for h in sizes}
    while sum(alloc.values()) < n:
        h = max((h for h in sizes if alloc[h] < sizes[h]), key=lambda h: exact[h] - alloc[h])
        alloc[h] += 1
    while sum(alloc.values()) > n:
        h = max((h for h in sizes if alloc[h] > floor_[h]), key=lambda h: alloc[h] - exact[h])
        alloc[h] -= 1
    return {h: (sizes[h], alloc[h]) for h in sizes}


def estimate(rows: Sequence[dict[str, Any]], sample: Sample, metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The full-set estimate of each metric from the scored sample rows (id -> metrics), with its 95% interval."""
    out = {}
    for name in metrics:
        by_stratum: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            if name in r["metrics"]:
                by_stratum[sample.stratum_of[r["id"]]].append(float(r["metrics"][name]))
        if not by_stratum:
            continue
        mean = variance = 0.0
        for label, values in by_stratum.items():
            big, _ = sample.strata[label]
            share = big / sample.population
            got = len(values)
            stratum_mean = sum(values) / got
            spread = sum((v - stratum_mean) ** 2 for v in values) / (got - 1) if got > 1 else 0.0
            mean += share * stratum_mean
            variance += share ** 2 * (1 - got / big) * spread / got
        half = 1.96 * math.sqrt(variance)  # every QA metric lies in [0, 1]: so does its interval
        out[name] = {"mean": mean, "n": sum(len(v) for v in by_stratum.values()),
                     "ci95": [max(0.0, mean - half), min(1.0, mean + half)],
                     "se": math.sqrt(variance), "estimate_of": sample.population}
    return out
