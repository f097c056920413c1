"""Fusing dense and sparse rankings: reciprocal-rank fusion, or min-max normalised score fusion.

Written here because the choice is two lines of arithmetic over ragkit's own Hit lists; the libraries that
do it (ranx, pyserini) bring whole evaluation or Java stacks with them.
"""

from __future__ import annotations

from collections.abc import Sequence

from ragkit.index import Hit

FUSIONS = ("rrf", "score")
RRF_K = 60  # Cormack et al. (2009)


def fuse(dense: Sequence[Hit], sparse: Sequence[Hit], k: int, *, method: str = "rrf", weight: float = 0.5,
         rrf_k: int = RRF_K) -> list[Hit]:
    """Top-k of the fused ranking; `weight` is the dense side's share (0 = sparse only, 1 = dense only).

    rrf:   score(d) = w / (rrf_k + rank_dense(d)) + (1 - w) / (rrf_k + rank_sparse(d))
    score: score(d) = w * minmax(dense score) + (1 - w) * minmax(sparse score), 0 where a side missed d

    Each fused hit keeps its rank on both sides (`hit.ranks`, None where a side missed it): what a reader
    of hybrid results wants to see is which side found a passage."""
    if method not in FUSIONS:
        raise ValueError(f"unknown fusion {method!r}")
    fused: dict[str, float] = {}
    by_id: dict[str, Hit] = {}
    side_ranks: dict[str, dict[str, int | None]] = {}
    for side, hits, share in (("dense", dense, weight), ("sparse", sparse, 1.0 - weight)):
        for h in hits:
            side_ranks.setdefault(h.id, {"dense": None, "sparse": None})[side] = h.rank
        if not hits:
            continue
        if method == "rrf":
            parts = {h.id: share / (rrf_k + h.rank) for h in hits}
        else:
            top, bottom = max(h.score for h in hits), min(h.score for h in hits)
            span = top - bottom
            parts = {h.id: share * ((h.score - bottom) / span if span > 0 else 1.0) for h in hits}
        for h in hits:
            fused[h.id] = fused.get(h.id, 0.0) + parts[h.id]
            by_id.setdefault(h.id, h)
    ranked = sorted(fused, key=lambda i: (-fused[i], i))[:k]
    return [Hit(i, fused[i], r, by_id[i].title, by_id[i].text, by_id[i].metadata, ranks=side_ranks[i])
            for r, i in enumerate(ranked, start=1)]
