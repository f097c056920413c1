"""Pruning a generator: structured layer dropping (keep every n-th decoder layer, or a list) and magnitude
pruning of the transformer layers' Linear weights through `torch.nn.utils.prune` (L1 unstructured, or
whole output rows by L2 norm), saved as a plain Hugging Face folder.

Layer dropping shrinks the model and its compute (the DistilBERT-style start of a distilled student);
magnitude pruning only zeroes weights: the saved tensors keep their shapes (smaller only when compressed),
and dense kernels run no faster. docs/training.md says what each buys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ragkit.errors import UsageError

METHODS = ("l1-unstructured", "ln-structured")


@dataclass
class PruneReport:
    layers_before: int
    layers_after: int
    params_before: int
    params_after: int
    nonzero_before: int
    nonzero_after: int
    sparsity: float  # share of the pruned Linear weights now zero

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def layer_list(model: Any) -> tuple[torch.nn.ModuleList, str]:
    """The decoder's (or encoder's) stack of layers and the config field that counts them."""
    config = model.config
    count_field = next((f for f in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, f)), None)
    if count_field is None:
        raise UsageError(f"{type(model).__name__}: its config does not say how many layers it has")
    count = getattr(config, count_field)
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if len(stacks) != 1:
        raise UsageError(f"{type(model).__name__}: cannot tell its layer stack ({len(stacks)} lists of {count} modules)")
    return stacks[0], count_field


def keep_layers(model: Any, keep: list[int]) -> None:
    """Keep only the layers `keep` (0-indexed, in order); the config, per-layer types and each attention
    layer's cache index follow."""
    stack, count_field = layer_list(model)
    total = len(stack)
    if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= total:
        raise UsageError(f"--keep-layers {','.join(map(str, keep))}: expected increasing layer numbers in 0-{total - 1}")
    kept = [stack[i] for i in keep]
    for _ in range(total):
        del stack[0]
    for layer in kept:
        stack.append(layer)
    for new_index, layer in enumerate(stack):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(model.config, count_field, len(keep))
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


def magnitude_prune(model: Any, sparsity: float, method: str = "l1-unstructured") -> float:
    """Zero `sparsity` of each Linear weight inside the layer stack (embeddings and the output head are
    left alone), made permanent; returns the share of those weights now zero."""
    import torch.nn.utils.prune as prune

    if not 0.0 <= sparsity < 1.0:
        raise UsageError(f"--sparsity {sparsity}: expected a fraction in [0, 1)")
    if method not in METHODS:
        raise UsageError(f"--method {method}: expected one of {', '.join(METHODS)}")
    stack, _ = layer_list(model)
    linears = [m for m in stack.modules() if isinstance(m, torch.nn.Linear)]
    for linear in linears:
        if sparsity == 0:
            break
        if method == "l1-unstructured":
            prune.l1_unstructured(linear, "weight", amount=sparsity)
        else:  # whole output rows (neurons) with the smallest L2 norm
            prune.ln_structured(linear, "weight", amount=sparsity, n=2, dim=0)
        prune.remove(linear, "weight")
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    return zeros / max(1, sum(m.weight.numel() for m in linears))


def prune_model(model: Any, *, keep: list[int] | None = None, every: int = 0, sparsity: float = 0.0,
                method: str = "l1-unstructured") -> PruneReport:
    stack, _ = layer_list(model)
    before = (len(stack), _count(model), _count(model, nonzero=True))
    if keep is not None and every:
        raise UsageError("--keep-layers and --keep-every both choose the layers: give one")
    if every:
        keep = list(range(0, len(stack), every))
    if keep is not None:
        keep_layers(model, keep)
    share = magnitude_prune(model, sparsity, method)
    if keep is None and sparsity == 0:
        raise UsageError("nothing to prune: give --keep-every N, --keep-layers LIST or --sparsity FRACTION")
    return PruneReport(before[0], len(layer_list(model)[0]), before[1], _count(model), before[2],
                       _count(model, nonzero=True), share)


def _count(model: Any, *, nonzero: bool = False) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        total += int((p != 0).sum()) if nonzero else p.numel()
    return total
