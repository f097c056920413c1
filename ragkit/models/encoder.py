"""The embedder: a sentence-transformers model with a fingerprint, length-bucketed batches and progress.

`SentenceTransformer.encode` already sorts each call's texts by length, which limits padding; ragkit feeds
it blocks of passages so that it can stream large corpora and report progress between blocks.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ragkit.errors import ResourceError, UsageError
from ragkit.index.encoder_info import EncoderInfo
from ragkit.models.dpr import embedder_location
from ragkit.models.exported import (EXPORTED_BACKENDS, ExportedBackend, calibration_sample, check_available, is_exported,
                                    load_engine, with_engine, with_module)
from ragkit.models.registry import (ALIASES, ModelRef, missing_model_error, quiet_transformers, resolve,
                                    say_if_own_code_is_ignored)


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ResourceError(f"--device {device}: no CUDA device is available", hint="Use --device cpu.")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise UsageError(f"--device {device}: expected cpu, cuda, cuda:N, mps or auto")
    return device


def weights_fingerprint(module: Any) -> str:
    """A hash of every parameter's name, shape, dtype and a strided sample of its values.

    Sampling keeps this fast for large encoders while still telling apart a fine-tuned copy, whose
    weights differ everywhere, from the original.
    """
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // 4096)
            sample = flat[::stride].to("cpu", torch.float32).contiguous().numpy()
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(np.round(sample, 6).tobytes())
    return digest.hexdigest()[:32]


@functools.lru_cache(maxsize=4)
def _load_sentence_transformer(location: str, device: str, trust_remote_code: bool) -> Any:
    from sentence_transformers import SentenceTransformer

    quiet_transformers()
    say_if_own_code_is_ignored(location, trust_remote_code)
    return SentenceTransformer(location, device=device, trust_remote_code=trust_remote_code)


ENCODER_BACKENDS = ("torch", "int8", *EXPORTED_BACKENDS)
BLOCK_SIZE = 4096  # texts per encode() block: the unit of progress, streaming and calibration
# "model": the model's own pooling (a sentence-transformers folder's Pooling module; mean for a plain HF model).
# Contriever pools by mean without normalising (--pooling mean --no-normalize), DPR by CLS (--pooling cls
# --no-normalize): the same weights pooled another way are another embedder.
POOLINGS = ("model", "mean", "cls", "max", "lasttoken")


def _pooling_layer(model: Any) -> tuple[int, Any] | None:
    for i, module in enumerate(model):
        if type(module).__name__ == "Pooling":
            return i, module
    return None


def _pooling_mode(module: Any) -> str:
    mode = getattr(module, "pooling_mode", None)  # sentence-transformers >= 6
    if mode is None and hasattr(module, "get_pooling_mode_str"):  # 5.x
        mode = module.get_pooling_mode_str()
    return "+".join(mode) if isinstance(mode, (tuple, list)) else str(mode)


def embedding_dimension(model: Any) -> int:
    """A sentence-transformers model's output dimension (sentence-transformers >= 6 renamed
    get_sentence_embedding_dimension to get_embedding_dimension)."""
    dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(dim_of())


def pool_as(model: Any, pooling: str, name: str) -> tuple[Any, str, str]:
    """`model` pooling by `pooling` ("model": as it is): (the model, its own pooling, the one it now uses).
    A changed model is a shallow copy sharing the weights: loaded models are cached and shared."""
    if pooling not in POOLINGS:
        raise UsageError(f"--pooling {pooling}: expected one of {', '.join(POOLINGS)}")
    layer = _pooling_layer(model)
    own = _pooling_mode(layer[1]) if layer else "model"
    if pooling in ("model", own):
        return model, own, own
    if layer is None:
        raise UsageError(f"--pooling {pooling}: {name} has no sentence-transformers Pooling module to replace")
    return _with_pooling(model, layer, pooling), own, pooling


def pooled_fingerprint(model: Any, own: str, pooling: str) -> str:
    """The weights' fingerprint, marked when the model pools other than its own way (the same weights pooled
    another way embed differently); unchanged otherwise, so indexes built before pooling was recorded match."""
    fingerprint = weights_fingerprint(model)
    if pooling != own:
        fingerprint = hashlib.sha256(f"{fingerprint}|pooling={pooling}".encode()).hexdigest()
    return fingerprint


def _with_pooling(model: Any, layer: tuple[int, Any], mode: str) -> Any:
    """A copy of `model` (same module objects, so the same weights) whose Pooling module (`layer`: its place
    and the module) pools by `mode` (sentence-transformers' own module)."""
    index, module = layer
    try:  # sentence-transformers >= 6 moved the module
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:
        from sentence_transformers.models import Pooling
    config = module.get_config_dict()
    dim = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    return with_module(model, index, Pooling(dim, pooling_mode=mode).to(next(model.parameters()).device))


class Encoder:
    """Embeds passages and queries with one sentence-transformers model.

    backend "int8": the Linear layers dynamically quantised to int8 (PyTorch's CPU kernels), a faster CPU
    path whose vectors approximate the float model's; the exported backends (ragkit/models/exported.py): the
    transformer exported once and run by ONNX Runtime (float, or its dynamic int8) or OpenVINO (float32,
    bfloat16 matrix products where the CPU has them, or NNCF's static int8 calibrated on the first block
    it embeds: for an index, on its first passages).
    The fingerprint stays that of the float weights, so an index built on one backend accepts queries
    embedded on another (docs/benchmarks.md measures what each costs)."""

    _calibrate: ExportedBackend | None = None  # openvino-int8 waiting for its first texts to calibrate on

    def __init__(
        self,
        name: str = "minilm",
        *,
        device: str | None = None,
        normalize: bool = True,
        max_seq_length: int | None = None,
        trust_remote_code: bool = False,
        backend: str = "torch",
        pooling: str = "model",
    ) -> None:
        if backend not in ENCODER_BACKENDS:
            raise UsageError(f"--backend {backend}: expected one of {', '.join(ENCODER_BACKENDS)}")
        self.ref: ModelRef = resolve(name)
        self.device = resolve_device(device)
        if backend in EXPORTED_BACKENDS:
            check_available(EXPORTED_BACKENDS[backend])
            if self.device != "cpu":
                raise UsageError(f"--backend {backend} runs on the CPU; on --device {self.device} use --backend torch")
        try:
            self.model = _load_sentence_transformer(embedder_location(self.ref), self.device, trust_remote_code)
        except (OSError, ValueError, RuntimeError) as exc:
            raise missing_model_error(self.ref, exc) from exc
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        self.model, self.own_pooling, self.pooling = pool_as(self.model, pooling, name)
        self.normalize = normalize
        # what an index records: a folder by its absolute path, so that `index add`/`search` from another
        # directory finds it; hub ids and the shipped aliases as typed (they resolve anywhere)
        self.name = self.ref.location if self.ref.kind == "local" and name.lower() not in ALIASES else name
        self.backend = backend
        if backend == "int8":
            from ragkit.models.quantize import quantize_int8_dynamic

            _ = self.info  # fingerprint the float weights first
            self.model = quantize_int8_dynamic(self.model, self.device)  # a copy: the cached float model stays
        elif backend in EXPORTED_BACKENDS:
            spec = EXPORTED_BACKENDS[backend]
            if spec.calibrated and not is_exported(spec, self._transformer_fingerprint):
                self._calibrate = spec  # exported on the first encode(), calibrated on its texts
            else:
                self.model = self._exported(spec)

    @classmethod
    def for_index(cls, index: Any, *, model: str | None = None, device: str | None = None,
                  backend: str = "torch", queries: bool = False) -> "Encoder":
        """The passage encoder of `index` (`queries`: its query encoder, the same model unless it records a
        separate one): its own model (or `model`, which must have the same weights), with its normalisation
        and length; a model that is gone is named with the index."""
        built = index.encoder.for_queries() if queries else index.encoder
        try:
            encoder = cls(model or built.name, device=device, normalize=built.normalize,
                          max_seq_length=built.max_seq_length, backend=backend,
                          pooling=built.pooling if built.pooling in POOLINGS else "model")
        except ResourceError as exc:
            if model is not None:
                raise
            raise ResourceError(f"{exc.message} (the embedder {index.root} was built with)",
                                hint="Restore it there, or pass --model with a copy of it.") from None
        index.check_encoder(encoder.info, queries=queries)
        if encoder._calibrate is not None:  # openvino-int8's first export: on the passages its build read first
            import itertools

            encoder.calibrate([p.embedding_text() for _, p in itertools.islice(index.iter_passages(), BLOCK_SIZE)])
        return encoder

    @functools.cached_property
    def _transformer_fingerprint(self) -> str:
        """What an export is keyed by: the weights of the transformer it runs (not pooling or a Dense layer)."""
        return weights_fingerprint(self.model[0])

    def _exported(self, backend: ExportedBackend, calibration: Sequence[str] | None = None) -> Any:
        """The model with its transformer run by an exported engine (a copy: the cached model stays)."""
        import torch

        _ = self.info, self._transformer_fingerprint  # fingerprint the PyTorch weights first
        engine = load_engine(self.model, backend, self._transformer_fingerprint, torch.get_num_threads(),
                             calibration=calibration)
        return with_engine(self.model, engine)

    def calibrate(self, texts: Sequence[str]) -> None:
        """openvino-int8 before its first export: export it now, calibrated on a sample of `texts` (what the
        first block of a build would be). Otherwise nothing: an export is calibrated once."""
        if self._calibrate is not None and texts:
            sample = [self._bounded(t) for t in calibration_sample(texts)]
            self.model, self._calibrate = self._exported(self._calibrate, sample), None

    @functools.cached_property
    def info(self) -> EncoderInfo:
        dim = embedding_dimension(self.model)
        fingerprint = pooled_fingerprint(self.model, self.own_pooling, self.pooling)
        return EncoderInfo(
            name=self.name,
            dim=int(dim),
            normalize=self.normalize,
            max_seq_length=self.model.max_seq_length,
            fingerprint=fingerprint,
            pooling=self.pooling,
        )

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 64,
        block_size: int = BLOCK_SIZE,
        on_block: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """float32 array (len(texts), dim); `on_block(n)` is called after each block of n texts."""
        dim = self.info.dim
        out = np.empty((len(texts), dim), dtype=np.float32)
        for start in range(0, len(texts), block_size):
            block = [self._bounded(t) for t in texts[start : start + block_size]]
            self.calibrate(block)
            out[start : start + len(block)] = self.model.encode(
                block,
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=self.normalize,
                show_progress_bar=False,
            )
            if on_block is not None:
                on_block(len(block))
        return out

    CHARS_PER_TOKEN_BOUND = 32  # no tokenizer in use makes tokens this long on average

    def _bounded(self, text: str) -> str:
        """The text cut to what the model can read: it truncates to max_seq_length tokens anyway, but the
        tokenizer would first tokenise all of it (a 10 MB query took 2.1 GB). Says so, once."""
        limit = (self.model.max_seq_length or 512) * self.CHARS_PER_TOKEN_BOUND
        if len(text) <= limit:
            return text
        if not getattr(self, "_said_truncated", False):
            from ragkit.console import info

            info(f"warning: a text of {len(text):,} characters was cut to {limit:,}: the embedder reads "
                 f"{self.model.max_seq_length} tokens")
            self._said_truncated = True
        return text[:limit]

    def encode_queries(self, queries: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        return self.encode(queries, batch_size=batch_size)


class Throughput:
    """Counts items over wall time for the throughput line printed after a long job."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def with_query_encoder(passages: EncoderInfo, query: Encoder | None) -> EncoderInfo:
    """The record of an index whose passages were embedded as `passages` records and whose queries `query`
    embeds (a DPR context/question pair); both give vectors of one dimension. No `query`: unchanged."""
    import dataclasses

    if query is None:
        return passages
    if query.info.dim != passages.dim:
        raise UsageError(f"--query-model {query.name} gives dimension {query.info.dim}; the passage embedder "
                         f"{passages.name} gives {passages.dim}")
    return dataclasses.replace(passages, query=query.info)

