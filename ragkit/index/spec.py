"""Index specs: `flat`, `hnsw`, `ivf-pq`, a raw Faiss factory string, or `auto`.

A spec names the Faiss index that holds the vectors. Parameters go after a colon, e.g.
`hnsw:M=32,ef_search=128`, `ivf-pq:nlist=1024,m=48,nprobe=16,refine=100`, `IVF256,SQ8`, `auto`.
ivf-pq's `refine=R` keeps the vectors on disk and re-ranks R candidates exactly (ragkit.index.exact);
`hnsw=M` makes its coarse quantiser an HNSW graph (the default from 4096 lists; 0 = exact search).
`auto` chooses from the corpus size, a memory budget and optionally a build-time budget, in the spirit
of autofaiss.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ragkit.errors import UsageError

NAMED_KINDS = ("flat", "hnsw", "ivf-pq", "auto")
IDMAP_BYTES = 48  # IndexIDMap2 keeps an id array and a reverse hash map: ~48 bytes per vector
FLAT_AUTO_MAX_VECTORS = 100_000  # exact search stays fast (a few ms per query on a CPU) up to here
# From this many inverted lists the coarse quantiser is an HNSW graph over the centroids: assigning 21M vectors
# to 16,384 centroids by exact search is ~5e14 flops (hours on 2 cores); the graph does it in log time
HNSW_QUANTIZER_MIN_LISTS = 4096
HNSW_QUANTIZER_M = 32
# auto's IVF-PQ search settings (search-time only: the build does not depend on them). Measured at 21M x 768
# (benchmarks/wikipedia_scale.py, IVF16384_HNSW32,PQ96x8, 300 queries): recall@10 0.847 at nprobe=32,refine=100,
# 0.937 at 32/400, 0.964 at 64/400 (12 ms a query in batches), 0.971 at 128/400; 64/400 is the cheapest >= 0.95
AUTO_REFINE = 400  # candidates re-ranked exactly from the float16 vectors kept on disk
AUTO_NPROBE = 64  # lists probed: with exact re-ranking, list coverage is what recall is left to lose
MIN_PQ_TRAIN = 256  # 8-bit PQ needs at least 256 training vectors per sub-quantiser


@dataclass(frozen=True)
class IndexSpec:
    """A parsed spec; `kind` is flat, hnsw, ivf-pq or factory (a raw Faiss factory string)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    factory_string: str | None = None  # for kind == "factory"

    @property
    def text(self) -> str:
        if self.kind == "factory":
            return str(self.factory_string)
        if not self.params:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))

    @property
    def removes_in_place(self) -> bool:
        """Faiss HNSW cannot remove vectors; ragkit keeps tombstones for it instead."""
        return "HNSW" not in self.factory(8, 1000)

    @property
    def is_ivf(self) -> bool:
        return self.factory(8, 1000).startswith("IVF")

    @property
    def refine(self) -> int:
        """Candidates re-ranked by exact scores from the vectors kept on disk (0: none; ivf-pq only)."""
        return int(self.params.get("refine", 0))

    def factory(self, dim: int, n: int) -> str:
        """The Faiss factory string (without the id map) for `n` vectors of `dim`."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "hnsw":
            return f"HNSW{int(self.params.get('M', 32))},Flat"
        if self.kind == "ivf-pq":
            nlist = int(self.params.get("nlist") or default_nlist(n))
            m = int(self.params.get("m") or default_pq_m(dim))
            hnsw = int(self.params.get("hnsw", default_quantizer_m(nlist)))
            return f"IVF{nlist}{f'_HNSW{hnsw}' if hnsw else ''},PQ{m}x8"
        if self.kind == "factory":
            return str(self.factory_string)
        raise UsageError(f"index spec '{self.kind}' must be resolved before use")

    def search_params(self) -> dict[str, int]:
        out = {}
        if "ef_search" in self.params:
            out["efSearch"] = int(self.params["ef_search"])
        elif self.kind == "hnsw":
            out["efSearch"] = 128
        if "nprobe" in self.params:
            out["nprobe"] = int(self.params["nprobe"])
        return out


_PARAM_NAMES = {
    "hnsw": {"M": int, "ef_search": int, "ef_construction": int},
    "ivf-pq": {"nlist": int, "m": int, "nprobe": int, "hnsw": int, "refine": int},
    "flat": {},
    "auto": {},
}


_ZERO_MEANS_OFF = {"hnsw", "refine"}  # hnsw=0: a flat coarse quantiser; refine=0: no exact re-ranking


def default_quantizer_m(nlist: int) -> int:
    """HNSW links of the coarse quantiser for `nlist` lists (0: exact search over the centroids)."""
    return HNSW_QUANTIZER_M if nlist >= HNSW_QUANTIZER_MIN_LISTS else 0


def parse_spec(text: str) -> IndexSpec:
    """Parse a spec string; unknown names and bad parameters are usage errors."""
    raw = text.strip()
    name, _, rest = raw.partition(":")
    kind = name.strip().lower()
    if kind in NAMED_KINDS:
        allowed = _PARAM_NAMES[kind]
        params: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = item.partition("=")
            key = {"m_hnsw": "M", "efsearch": "ef_search", "efconstruction": "ef_construction"}.get(key.lower(), key)
            if kind == "hnsw" and key.lower() == "m":
                key = "M"
            if not eq or key not in allowed:
                raise UsageError(
                    f"index spec '{raw}': unknown parameter '{item}'",
                    hint=f"{kind} takes {', '.join(allowed) or 'no parameters'}.",
                )
            try:
                params[key] = allowed[key](value)
            except ValueError:
                raise UsageError(f"index spec '{raw}': {key} must be an integer") from None
            if params[key] < 0 or (params[key] == 0 and key not in _ZERO_MEANS_OFF):
                raise UsageError(f"index spec '{raw}': {key} must be positive"
                                 + (" (or 0 for none)" if key in _ZERO_MEANS_OFF else ""))
        return IndexSpec(kind, params)
    if _looks_like_factory(raw):
        _check_factory(raw)
        return IndexSpec("factory", {}, raw)
    raise UsageError(
        f"unknown index spec '{raw}'",
        hint="Use flat, hnsw, ivf-pq, auto (with optional :key=value parameters) or a Faiss factory string.",
    )


def _looks_like_factory(text: str) -> bool:
    return bool(re.match(r"^(IVF|HNSW|PQ|OPQ|SQ|Flat|LSH|PCA|RR|NSG|IDMap|L2norm)", text))


def _check_factory(text: str) -> None:
    import faiss

    if text.startswith("IDMap"):
        raise UsageError(f"index spec '{text}': leave out IDMap, ragkit adds the id map itself")
    # the syntax is checked here; whether it fits the vectors' dimension (PQ48 needs d % 48 == 0) is only
    # known at build time, so any common embedding dimension that accepts it will do
    error = ""
    for dim in PROBE_DIMS:
        try:
            faiss.index_factory(dim, text)
            return
        except RuntimeError as exc:
            error = error or (str(exc).strip().splitlines()[-1] if str(exc).strip() else "")
    raise UsageError(f"index spec '{text}': Faiss rejects this factory string ({error})") from None


PROBE_DIMS = (64, 384, 768, 1024, 1536, 4096)


def default_nlist(n: int) -> int:
    """About 4·sqrt(n) lists (a power of two), with at least 39 training points per list."""
    if n < 39:
        return 1
    target = 4 * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(target)))
    return max(1, min(nlist, n // 39))


def default_pq_m(dim: int) -> int:
    """Sub-quantisers of 4 dimensions each (m = dim/4), or the nearest divisor of dim below that."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def parse_memory(text: str | None) -> int | None:
    """'2G', '512M', '1.5GB', '100000' (bytes) -> bytes."""
    if text is None or str(text).strip() == "":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise UsageError(f"--max-memory '{text}': expected a size such as 512M or 2G")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    value = int(float(match.group(1)) * scale)
    if value <= 0:  # a zero budget divided the planner by zero
        raise UsageError(f"--max-memory '{text}': expected a positive size such as 512M or 2G")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def estimate_memory(spec: IndexSpec, n: int, dim: int) -> int:
    """Resident bytes of the Faiss index for n vectors (a planning estimate, within ~20%)."""
    if spec.kind == "flat":
        return n * (4 * dim + IDMAP_BYTES)
    if spec.kind == "hnsw":
        m = int(spec.params.get("M", 32))
        # level 0 keeps 2M int32 links per vector; upper levels add ~1/M of that again
        return int(n * (4 * dim + 8 * m * (1 + 1 / m) + IDMAP_BYTES))
    if spec.kind == "ivf-pq":
        nlist = int(spec.params.get("nlist") or default_nlist(n))
        m = int(spec.params.get("m") or default_pq_m(dim))
        graph = nlist * 8 * int(spec.params.get("hnsw", default_quantizer_m(nlist))) * 2  # the coarse HNSW links
        return n * (m + 8) + nlist * dim * 4 + graph + 256 * dim * 4
    return n * (4 * dim + IDMAP_BYTES)  # a raw factory string: assume flat codes, the worst case


def available_memory() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass(frozen=True)
class AutoChoice:
    spec: IndexSpec
    reason: str


def auto_candidates(n: int, dim: int, budget: int) -> list[IndexSpec]:
    """What `auto` may take for n vectors of dim within `budget` bytes, most accurate first: exact search
    (small corpora), HNSW, then IVF-PQ re-ranking its candidates exactly from the vectors on disk, with the
    default number of lists and then with fewer (cheaper to build, for a time budget)."""
    out = []
    flat = IndexSpec("flat")
    if n <= FLAT_AUTO_MAX_VECTORS and estimate_memory(flat, n, dim) <= budget:
        out.append(flat)
    hnsw = IndexSpec("hnsw", {"M": 32})
    if estimate_memory(hnsw, n, dim) <= budget:
        out.append(hnsw)
    if n < MIN_PQ_TRAIN:
        return out
    nlist = default_nlist(n)
    # Re-ranked codes need not be large: a sub-quantiser per 8 dims finds the candidates (the exact vectors
    # decide the order); smaller codes where the budget requires
    for m in sorted((m for m in range(1, dim + 1) if dim % m == 0 and m <= max(1, dim // 8)), reverse=True):
        if estimate_memory(IndexSpec("ivf-pq", {"nlist": nlist, "m": m}), n, dim) <= budget:
            while True:
                out.append(IndexSpec("ivf-pq", {"nlist": nlist, "m": m, "nprobe": min(nlist, AUTO_NPROBE),
                                                "refine": AUTO_REFINE}))
                if nlist < 512:
                    break
                nlist //= 4
            break
    return out


def describe(spec: IndexSpec, n: int, dim: int) -> str:
    """One line on what a spec costs, as auto's reason."""
    memory = format_bytes(estimate_memory(spec, n, dim))
    if spec.kind == "flat":
        return f"{n} vectors fit exact search: ~{memory}"
    if spec.kind == "hnsw":
        return f"HNSW (M={spec.params.get('M', 32)}) needs ~{memory}"
    m = spec.params.get("m")
    refine = f", re-ranking {spec.refine} candidates from the exact vectors on disk" if spec.refine else ""
    return f"{spec.factory(dim, n)} ({m} bytes/vector{refine}) needs ~{memory}"


def choose_auto(n: int, dim: int, max_memory: int | None = None, max_seconds: float | None = None) -> AutoChoice:
    """The most accurate of `auto_candidates` within a memory budget (default: half the RAM) and, when
    given, a build-time budget (the estimate of ragkit.index.build_time)."""
    from ragkit.index.build_time import estimate_build_seconds, format_seconds

    budget = max_memory if max_memory is not None else available_memory() // 2
    options = auto_candidates(n, dim, budget)
    for spec in options:
        seconds = estimate_build_seconds(spec, n, dim)
        if max_seconds is None or seconds <= max_seconds:
            return AutoChoice(spec, f"{describe(spec, n, dim)} within {format_bytes(budget)}; ~{format_seconds(seconds)} "
                                    "to build")
    if options:
        fastest = min(options, key=lambda s: estimate_build_seconds(s, n, dim))
        raise UsageError(
            f"max_build_time {format_seconds(max_seconds or 0)}: no index that fits {format_bytes(budget)} builds "
            f"{n} vectors of dim {dim} in time; the fastest, {fastest.text}, needs "
            f"~{format_seconds(estimate_build_seconds(fastest, n, dim))}",
            hint="Allow more time, or build shards in parallel on several machines.")
    if n < MIN_PQ_TRAIN:
        raise UsageError(f"--max-memory {format_bytes(budget)} is too small even for {n} vectors")
    nlist = default_nlist(n)
    smallest = estimate_memory(IndexSpec("ivf-pq", {"nlist": nlist, "m": 1}), n, dim)
    raise UsageError(
        f"--max-memory {format_bytes(budget)} is too small for {n} vectors of dim {dim}",
        hint=f"The most compact index (IVF{nlist},PQ1) needs ~{format_bytes(smallest)}.",
    )


def check_trainable(spec: IndexSpec, n: int) -> None:
    """IVF-PQ learns its codebooks from the vectors: refuse a corpus too small to train on."""
    if spec.kind == "ivf-pq" and n < MIN_PQ_TRAIN:
        raise UsageError(f"index spec ivf-pq needs at least {MIN_PQ_TRAIN} vectors to train, the corpus has {n}",
                         hint="Use --spec flat for small corpora.")


def ivf_lists(factory: str) -> int:
    """The inverted lists a Faiss factory string names, after any transform (`OPQ16,IVF4096,...`); 0: none."""
    found = re.search(r"IVF(\d+)", factory)
    return int(found.group(1)) if found else 0


def check_lists(spec: IndexSpec, n: int) -> None:
    """k-means for an inverted file needs at least one training vector per list: more lists than vectors was a
    Faiss RuntimeError (exit 1) after the whole corpus had been embedded."""
    lists = spec.params.get("nlist") if spec.kind == "ivf-pq" else None
    if spec.kind == "factory":
        lists = ivf_lists(spec.factory_string or "") or None
    if lists and n < lists:
        raise UsageError(f"index spec {spec.text}: {lists} inverted lists need at least {lists} vectors to train; "
                         f"the corpus has {n}", hint="Use fewer lists, or --spec flat / auto.")


def resolve_spec(spec: IndexSpec, n: int, dim: int, max_memory: int | None,
                 max_seconds: float | None = None) -> tuple[IndexSpec, str | None]:
    """Turn `auto` into a concrete spec and pin data-dependent defaults (nlist, m) for the manifest."""
    reason = None
    if spec.kind == "auto":
        choice = choose_auto(n, dim, max_memory, max_seconds)
        spec, reason = choice.spec, choice.reason
    if spec.kind == "ivf-pq":
        params = dict(spec.params)
        params.setdefault("nlist", default_nlist(n))
        params.setdefault("m", default_pq_m(dim))
        if dim % params["m"]:
            raise UsageError(f"index spec ivf-pq: m={params['m']} must divide the dimension {dim}")
        check_trainable(spec, n)
        params.setdefault("nprobe", min(params["nlist"], 16))
        if default_quantizer_m(params["nlist"]) and "hnsw" not in params:
            params["hnsw"] = default_quantizer_m(params["nlist"])  # pinned in the manifest: what was built
        spec = replace(spec, params=params)
    check_lists(spec, n)
    if max_memory is not None and estimate_memory(spec, n, dim) > max_memory:
        raise UsageError(
            f"index spec {spec.text} needs ~{format_bytes(estimate_memory(spec, n, dim))} "
            f"for {n} vectors, over --max-memory {format_bytes(max_memory)}",
            hint="Use --spec auto to pick an index that fits.",
        )
    if max_seconds is not None:
        from ragkit.index.build_time import estimate_build_seconds, format_seconds

        if estimate_build_seconds(spec, n, dim) > max_seconds:
            raise UsageError(f"index spec {spec.text} needs ~{format_seconds(estimate_build_seconds(spec, n, dim))} to "
                             f"build {n} vectors, over max_build_time {format_seconds(max_seconds)}",
                             hint="Use --spec auto to pick an index that builds in time, or `ragkit index plan`.")
    if estimate_memory(spec, n, dim) > available_memory():  # e.g. hnsw:M=100000000 grew until the OOM killer
        raise UsageError(
            f"index spec {spec.text} needs ~{format_bytes(estimate_memory(spec, n, dim))} for {n} vectors, more "
            f"than this machine's memory ({format_bytes(available_memory())})",
            hint="Use --spec auto (with --max-memory) to pick an index that fits, or `ragkit index plan`.",
        )
    return spec, reason
