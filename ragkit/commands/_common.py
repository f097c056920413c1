"""What every command shares: error-to-exit-code handling and option aliases that read the same everywhere."""

from __future__ import annotations

import contextlib
import os
import pickle
import sqlite3
import sys
import traceback
from collections.abc import Iterator
from typing import Annotated

import typer

from ragkit.errors import ExitCode, RagkitError
from ragkit.io.atomic import is_disk_full


def debug_enabled() -> bool:
    return os.environ.get("RAGKIT_DEBUG", "") not in ("", "0")


def fail(message: str, hint: str | None, code: int) -> typer.Exit:
    """Print `Error: ...` (and `Hint: ...`) on stderr; return the Exit to raise."""
    sys.stderr.write(f"Error: {message}\n")
    if hint:
        sys.stderr.write(f"Hint: {hint}\n")
    sys.stderr.flush()
    return typer.Exit(code)


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Turn library errors into one line on stderr and the documented exit code."""
    try:
        yield
    except RagkitError as exc:
        if debug_enabled():
            traceback.print_exc()
        raise fail(exc.message, exc.hint, int(exc.exit_code)) from None
    except KeyboardInterrupt:
        raise fail("interrupted", None, int(ExitCode.INTERRUPTED)) from None
    except BrokenPipeError:
        # `ragkit ... | head`: the reader went away; stop quietly.
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None
    except typer.Exit:
        raise
    except Exception as exc:
        if is_disk_full(exc):  # a writer that does not name its folder itself (those raise DiskFullError)
            where = f" writing {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
            raise fail(f"no space left on the device{where}", "Free space and run the command again.",
                       int(ExitCode.MISSING_RESOURCE)) from None
        if isinstance(exc, pickle.UnpicklingError):  # torch.load(weights_only=True) met more than tensors
            raise fail("a model's weights file (.bin/.pt) holds pickled objects beyond plain tensors: not loaded "
                       "(ragkit reads weights only and never runs a pickle's code)",
                       "Use a safetensors checkpoint, or convert this one where you trust its source.",
                       int(ExitCode.MISSING_RESOURCE)) from None
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError):
            # only an index's passage store is SQLite: a damaged one is a bad resource, not a bug (an
            # IntegrityError is: ragkit handles those itself)
            raise fail(f"an index's passage store is unreadable (SQLite: {exc})",
                       "Check it with `ragkit index info DIR --verify`; restore it or rebuild.",
                       int(ExitCode.MISSING_RESOURCE)) from None
        if debug_enabled():  # anything else is a bug: say so in one line, traceback on request
            traceback.print_exc()
        raise fail(
            f"internal error: {type(exc).__name__}: {exc}",
            "Rerun with RAGKIT_DEBUG=1 for the traceback, and report it.",
            int(ExitCode.INTERNAL),
        ) from None


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Embedder: hub id, local folder, or alias (minilm = shipped all-MiniLM-L6-v2).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (cuda when available).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Texts per encoder forward pass.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=0, help="Faiss CPU threads (0 = Faiss default).")]
EfSearchOpt = Annotated[int, typer.Option("--ef-search", min=0, help="HNSW efSearch (0 = the index's setting).")]
NprobeOpt = Annotated[int, typer.Option("--nprobe", min=0, help="IVF lists probed (0 = the index's setting).")]
RefineOpt = Annotated[int, typer.Option("--refine", min=-1, help="Candidates re-ranked by exact scores from the vectors kept on disk (an index built with ivf-pq:refine=R); 0 = off, -1 = the index's setting.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="If another process is changing the index, queue behind it instead of exiting 4 at once.")]
RetrievalModeOpt = Annotated[str, typer.Option("--retrieval-mode", help="dense (embedder + Faiss), sparse (BM25 side of the index) or hybrid (both, fused).")]
FusionOpt = Annotated[str, typer.Option("--fusion", help="Hybrid fusion: rrf (reciprocal rank, k=60) or score (min-max normalised scores).")]
DenseWeightOpt = Annotated[float, typer.Option("--dense-weight", min=0.0, max=1.0, help="Hybrid: the dense side's share (0 = BM25 only, 1 = dense only).")]
PoolingOpt = Annotated[str, typer.Option("--pooling", help="How token states become one vector: model (the model's own Pooling module; mean for a plain HF model), mean, cls, max or lasttoken. Contriever: mean with --no-normalize; DPR: cls with --no-normalize. Recorded in the index: its queries are pooled the same way, other pooling is refused.")]
EncoderBackendOpt = Annotated[str, typer.Option("--backend", help="Encoder compute path: torch (float); int8 (PyTorch dynamic int8 Linear layers, CPU, approximate vectors); onnx / onnx-int8 (ONNX Runtime, float or dynamic int8), openvino / openvino-bf16 / openvino-int8 (OpenVINO: float32, bfloat16 products on CPUs with AVX-512 BF16/AMX, or static int8 calibrated once on the first texts embedded): CPU, the transformer exported once and cached, needs ragkit's onnx / openvino extra (pip install 'ragkit\\[onnx]'); see docs/benchmarks.md for their speed and quality.")]
