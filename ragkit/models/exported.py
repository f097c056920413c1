"""Encoder backends that run the transformer in ONNX Runtime or OpenVINO instead of PyTorch.

Why by hand: sentence-transformers' own backend="onnx"/"openvino" load through optimum, and no optimum
exporter installs beside transformers 5 (optimum-onnx 0.1.0 pins transformers < 4.58 and fails to import on
5.x; optimum-intel 2.2.0 pins < 5.6). So ragkit exports only the transformer (torch.onnx's exporter for ONNX
Runtime; OpenVINO's own PyTorch frontend for OpenVINO) and swaps it into the sentence-transformers model:
tokenisation, pooling, Dense and Normalize stay sentence-transformers' modules, so the vectors differ from
PyTorch's only by the engine's arithmetic, which a probe checks before an export is cached.

An export is made once per (weights, backend, engine version) and cached under the ragkit cache
(exports/), written to a temporary folder and renamed, so a crash never leaves half an export behind.
openvino-int8 is calibrated on the first texts the encoder is asked to embed (CALIBRATION_TEXTS spread over
its first block); that export is then reused for every later text, queries included, and export.json
records how many texts calibrated it and their digest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragkit.errors import ResourceError, UsageError


@dataclasses.dataclass(frozen=True)
class ExportedBackend:
    """One engine path: what it exports, how it computes, the probe agreement it must reach."""

    name: str
    export: str  # the cached export it runs: "onnx", "onnx-int8", "openvino" (float32 and bf16 share it), "openvino-int8"
    min_cosine: float  # per-probe-text cosine between engine and PyTorch sentence vectors
    precision: str = "f32"  # OpenVINO's INFERENCE_PRECISION_HINT; its CPU default is bf16 where the CPU has it
    calibrated: bool = False  # static int8: activation ranges measured on texts before the export is cached

    @property
    def engine(self) -> str:
        return "openvino" if self.export.startswith("openvino") else "onnxruntime"

    @property
    def requires(self) -> tuple[str, ...]:  # torch.onnx's exporter needs onnx and onnxscript; NNCF quantises
        if self.engine == "openvino":
            return ("openvino", "nncf") if self.calibrated else ("openvino",)
        return ("onnxruntime", "onnx", "onnxscript")

    @property
    def extra(self) -> str:  # the ragkit extra that installs `requires`
        return "openvino" if self.engine == "openvino" else "onnx"


EXPORTED_BACKENDS: dict[str, ExportedBackend] = {
    "onnx": ExportedBackend("onnx", "onnx", 0.9999),
    # ONNX Runtime's dynamic int8: per-channel weight scales, activations quantised per batch (no calibration)
    "onnx-int8": ExportedBackend("onnx-int8", "onnx-int8", 0.98),
    "openvino": ExportedBackend("openvino", "openvino", 0.9999),
    # bfloat16 matrix products (AVX-512 BF16 / AMX); float32 accumulation keeps the vectors close
    "openvino-bf16": ExportedBackend("openvino-bf16", "openvino", 0.99, precision="bf16"),
    # NNCF's static int8 (int8 weights and activations, VNNI/AMX kernels), calibrated once on the first
    # texts the encoder is given (CALIBRATION_TEXTS of its first block)
    "openvino-int8": ExportedBackend("openvino-int8", "openvino-int8", 0.98, calibrated=True),
}
CALIBRATION_TEXTS = 300  # sentence-transformers' own static-quantisation default
CALIBRATION_BATCH = 16
PROBE = ("Who wrote On the Origin of Species?",
         "Charles Darwin published On the Origin of Species in 1859; it argues that populations evolve over "
         "generations through natural selection.")


def check_available(backend: ExportedBackend) -> None:
    import importlib.util

    missing = [name for name in backend.requires if importlib.util.find_spec(name) is None]
    if missing:
        raise ResourceError(f"--backend {backend.name} needs {', '.join(missing)}, which is not installed",
                            hint=f"pip install 'ragkit[{backend.extra}]'")
    if backend.precision == "bf16":
        ov = openvino_module()
        if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise ResourceError(f"--backend {backend.name}: this CPU has no bfloat16 arithmetic (AVX-512 BF16 or AMX)",
                                hint="Use --backend openvino (float32).")


def engine_version(backend: ExportedBackend) -> str:
    import torch

    if backend.engine == "openvino":
        return f"openvino-{openvino_module().__version__.split('-')[0]}"
    import onnxruntime

    return f"onnxruntime-{onnxruntime.__version__}-torch-{torch.__version__.split('+')[0]}"


def _hf_model(module: Any) -> Any:
    """The transformers model inside a sentence-transformers Transformer module (ST >= 6: .model; 5.x:
    .auto_model), refused when the module feeds it anything but text token ids."""
    if type(module).__name__ != "Transformer":
        raise UsageError(f"an exported --backend runs a sentence-transformers Transformer module; this model "
                         f"starts with {type(module).__name__}", hint="Use --backend torch or int8.")
    config = getattr(module, "modality_config", None)
    if config is not None:
        text = config.get("text", {}) if isinstance(config, Mapping) else {}
        if text.get("method", "forward") != "forward" or text.get("method_output_name") not in (
                None, "last_hidden_state", ["last_hidden_state"], ("last_hidden_state",)):
            raise UsageError("an exported --backend runs encoders whose token embeddings are the model's "
                             "last_hidden_state; this one is configured otherwise", hint="Use --backend torch or int8.")
    return getattr(module, "model", None) or module.auto_model


def _tokenize(st_model: Any, texts: Sequence[str]) -> dict[str, Any]:
    """`texts` tokenised as sentence-transformers tokenises them for encode (>= 6: preprocess; 5.x: tokenize)."""
    tokenize = getattr(st_model, "preprocess", None) or st_model.tokenize
    return tokenize(list(texts))


def _probe_features(st_model: Any) -> dict[str, Any]:
    """The probe texts as token-id tensors (two lengths, so that the export sees a padded batch)."""
    features = _tokenize(st_model, PROBE)
    return {k: v for k, v in features.items() if hasattr(v, "dim") and v.dim() == 2}


def _token_embeddings_module(model: Any, names: tuple[str, ...]) -> Any:
    """The module that is exported: token-id tensors in (positionally, in `names` order), token embeddings out."""
    import torch

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model(**dict(zip(names, tensors)), return_dict=True).last_hidden_state

    return TokenEmbeddings().eval()


def _export_onnx(module: Any, features: dict[str, Any], folder: Path, *, int8: bool) -> None:
    import torch

    names = tuple(features)
    config = getattr(module.model, "config", None)
    longest = getattr(config, "max_position_embeddings", None) or 4096
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=int(longest))
    with torch.no_grad():
        torch.onnx.export(module, tuple(features[n] for n in names), str(folder / "model.onnx"),
                          input_names=list(names), output_names=["token_embeddings"],
                          dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),), dynamo=True,
                          external_data=True, verbose=False)
    if int8:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(folder / "model.onnx", folder / "model.int8.onnx", weight_type=QuantType.QInt8,
                         per_channel=True, use_external_data_format=True, reduce_range=int8_saturates(),
                         # the exporter's fused ops carry no inferred types; everything here is float
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        for stale in folder.glob("model.onnx*"):
            stale.unlink()


def int8_saturates() -> bool:
    """Whether this CPU lacks an int8 dot-product instruction (VNNI, AMX). Without one, x86 int8 kernels multiply
    u8 x s8 pairs with AVX2's vpmaddubsw, whose int16 sums saturate: on such a CPU the int8 exports here
    embedded at cosine 0.66 to PyTorch (AMD EPYC without AVX-512) and were refused. ONNX Runtime's
    `reduce_range` and NNCF's `overflow_fix` quantise weights to 7 bits to stay clear of it; where VNNI is
    present they cost accuracy for nothing, so they follow the CPU. Not x86 (or no /proc/cpuinfo): False."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags.split()))


def openvino_module() -> Any:
    """`import openvino`, with its telemetry declined first.

    OpenVINO (at import and in its converter) and NNCF (at import) send usage events to Google Analytics
    unless the user has opted out: openvino-telemetry takes a missing consent file
    (~/intel/openvino_telemetry) as consent when it shows no dialog, as they do. ragkit does not report
    on its users, so in its process every consent check declines, before either is imported."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # without the package both use a stub that sends nothing
        pass
    else:
        OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED
    import openvino

    return openvino


def _export_openvino(module: Any, features: dict[str, Any], folder: Path,
                     calibration: list[dict[str, np.ndarray]] | None = None) -> None:
    import torch

    ov = openvino_module()

    with torch.no_grad():
        converted = ov.convert_model(module, example_input=tuple(features.values()))
    for port, name in zip(converted.inputs, features):
        port.get_tensor().set_names({name})
    converted.outputs[0].get_tensor().set_names({"token_embeddings"})
    if calibration:
        import nncf

        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

        overflow = OverflowFix.ENABLE if int8_saturates() else OverflowFix.FIRST_LAYER  # the latter: NNCF's default
        converted = nncf.quantize(converted, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calibration),
                                  advanced_parameters=AdvancedQuantizationParameters(overflow_fix=overflow))
    ov.save_model(converted, str(folder / "model.xml"), compress_to_fp16=False)


def calibration_sample(texts: Sequence[str]) -> list[str]:
    """Up to CALIBRATION_TEXTS texts spread evenly over `texts` (a corpus block is often sorted by source)."""
    if len(texts) <= CALIBRATION_TEXTS:
        return list(texts)
    step = len(texts) / CALIBRATION_TEXTS
    return [texts[int(i * step)] for i in range(CALIBRATION_TEXTS)]


def _calibration_batches(st_model: Any, texts: Sequence[str], names: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    batches = []
    for start in range(0, len(texts), CALIBRATION_BATCH):
        features = _tokenize(st_model, texts[start:start + CALIBRATION_BATCH])
        batches.append({n: features[n].numpy().astype(np.int64) for n in names})
    return batches


class Engine:
    """A loaded export: token-id arrays by name in, float32 token embeddings out."""

    def __init__(self, backend: ExportedBackend, folder: Path, threads: int) -> None:
        meta = json.loads((folder / "export.json").read_text())
        self.inputs: tuple[str, ...] = tuple(meta["inputs"])
        self.backend = backend
        try:
            if backend.engine == "openvino":
                core = openvino_module().Core()
                self._compiled = core.compile_model(core.read_model(str(folder / "model.xml")), "CPU",
                                                    {"INFERENCE_NUM_THREADS": threads,
                                                     "INFERENCE_PRECISION_HINT": backend.precision})
            else:
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                options.intra_op_num_threads = threads
                options.log_severity_level = 3
                onnx_file = folder / ("model.int8.onnx" if backend.export == "onnx-int8" else "model.onnx")
                self._session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # engines raise their own exception types for a damaged file
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ResourceError(f"{folder}: the cached --backend {backend.name} export does not load ({reason})",
                                hint=f"Delete {folder}; the next run exports it again.") from None

    def __call__(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        feed = {name: np.ascontiguousarray(arrays[name], dtype=np.int64) for name in self.inputs}
        if self.backend.engine == "openvino":
            return self._compiled(feed)[0]
        return self._session.run(["token_embeddings"], feed)[0]


def export_folder(backend: ExportedBackend, fingerprint: str) -> Path:
    from ragkit.models.registry import cache_root

    return cache_root() / "exports" / f"{backend.export}-{fingerprint}-{engine_version(backend)}"


def is_exported(backend: ExportedBackend, fingerprint: str) -> bool:
    return (export_folder(backend, fingerprint) / "export.json").exists()


def load_engine(st_model: Any, backend: ExportedBackend, fingerprint: str, threads: int,
                calibration: Sequence[str] | None = None) -> Engine:
    """The engine for `st_model`'s transformer (module 0), exported and probe-checked the first time
    (a calibrated backend's first time needs `calibration`, the texts its activation ranges come from).
    The caller has run check_available (Encoder does, before loading the model)."""
    from ragkit.io.atomic import staged_dir

    folder = export_folder(backend, fingerprint)
    if not (folder / "export.json").exists():
        if backend.calibrated and not calibration:
            raise ValueError(f"--backend {backend.name}: the first export needs calibration texts")
        from ragkit.console import info

        info(f"exporting the encoder for --backend {backend.name} once (cached in {folder.parent})")
        hf_model = _hf_model(st_model[0])
        features = _probe_features(st_model)
        module = _token_embeddings_module(hf_model, tuple(features))
        meta: dict[str, Any] = {"inputs": list(features), "export": backend.export, "fingerprint": fingerprint,
                                "engine": engine_version(backend)}
        if backend.export in ("onnx-int8", "openvino-int8"):
            meta["int8_7bit_weights"] = int8_saturates()  # made for a CPU without VNNI (see int8_saturates)
        with staged_dir(folder) as tmp, _quiet():
            if backend.engine == "openvino":
                batches = _calibration_batches(st_model, calibration, tuple(features)) if backend.calibrated else None
                _export_openvino(module, features, tmp, batches)
                if backend.calibrated:
                    digest = hashlib.sha256("\x00".join(calibration).encode()).hexdigest()
                    meta["calibration"] = {"texts": len(calibration), "sha256": digest}
            else:
                _export_onnx(module, features, tmp, int8=backend.export == "onnx-int8")
            (tmp / "export.json").write_text(json.dumps(meta, indent=1))
            agreement = probe_agreement(st_model, Engine(backend, tmp, threads))
            if agreement < backend.min_cosine:
                hint = "Use --backend torch; the export is not cached."
                if backend.calibrated:
                    hint = (f"It was calibrated on {len(calibration)} texts: embed a larger first block (up to "
                            f"{CALIBRATION_TEXTS} are used), or use --backend openvino-bf16 / openvino; not cached.")
                raise ResourceError(f"--backend {backend.name}: the exported encoder embeds the probe texts at "
                                    f"cosine {agreement:.5f} to PyTorch's (needs {backend.min_cosine})", hint=hint)
    return Engine(backend, folder, threads)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporters trace the model and report it at length (tracer warnings, torchvision notices, a
    quantisation tip on the root logger, progress lines): ragkit says one line instead. Anything printed
    goes to stderr, never into a JSONL stdout."""
    import logging
    import sys
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def probe_agreement(st_model: Any, engine: Engine) -> float:
    """The lowest cosine, over the probe texts, between sentence vectors with the engine and with PyTorch."""
    import torch

    with torch.no_grad():
        expected = st_model.encode(list(PROBE), convert_to_numpy=True)
        swapped = with_engine(st_model, engine).encode(list(PROBE), convert_to_numpy=True)
    cosine = (expected * swapped).sum(1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(swapped, axis=1))
    return float(cosine.min())


def with_module(st_model: Any, index: int, module: Any) -> Any:
    """A shallow copy of `st_model` whose module `index` is `module`, the others shared with it (loaded
    models are cached and shared, so they are never changed in place): a new Pooling, an engine."""
    import copy
    from collections import OrderedDict

    clone = copy.copy(st_model)
    clone._modules = OrderedDict(st_model._modules)
    clone._modules[str(index)] = module
    return clone


def with_engine(st_model: Any, engine: Engine) -> Any:
    """`st_model` with its first module (the transformer) run in `engine`."""
    return with_module(st_model, 0, _engine_module(st_model[0], engine))


def _engine_module(transformer: Any, engine: Engine) -> Any:
    """sentence-transformers' Transformer module with its forward pass run by `engine`; everything else
    (tokenize, max_seq_length, its config) is the original's."""
    import torch

    class EngineTransformer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.original = transformer  # keeps the float weights: the device, fingerprint and config come from it

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._modules["original"], name)

        def forward(self, features: dict[str, Any], **_: Any) -> dict[str, Any]:
            arrays = {name: features[name].cpu().numpy() for name in engine.inputs}
            features["token_embeddings"] = torch.from_numpy(engine(arrays))
            return features

    return EngineTransformer()
