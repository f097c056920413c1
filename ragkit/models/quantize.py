"""Post-training int8 quantisation shared by the generator and the encoder (CPU)."""

from __future__ import annotations

from typing import Any

from ragkit.errors import UsageError


def quantize_int8_dynamic(model: Any, device: str) -> Any:
    """int8 dynamic quantisation of every Linear layer (weights int8 per output channel, activations
    quantised per batch).

    CPU only: it is PyTorch's own x86/ARM kernel path; on a GPU use --quantize 8bit/4bit (bitsandbytes)."""
    import warnings

    import torch

    if device != "cpu":
        raise UsageError("--quantize int8 is the CPU path; on a GPU use --quantize 8bit or 4bit (bitsandbytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks its quantised tensor constructors deprecated (still supported)
        # per-output-channel weight scales: on MiniLM the embeddings keep cosine 0.98 to the float ones
        # (0.92 with one scale per tensor) at the same speed
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8)


def ready_for_inference(model: Any, quantize: str, device: str, *, merge: bool = True) -> Any:
    """A loaded model (a peft LoRA model or a plain one) ready to decode under --quantize: an adapter is
    merged into its base unless that base holds bitsandbytes 4-/8-bit weights (merging would round the
    adapter away, so it stays on top), and int8 quantises after the merge, so the adapter is counted."""
    if merge and quantize not in ("4bit", "8bit") and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if quantize == "int8":
        model = quantize_int8_dynamic(model, device)
    return model
