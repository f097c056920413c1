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
