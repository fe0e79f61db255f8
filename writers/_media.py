"""Backend-neutral media helpers: arrays from tensors, PNG encoding, histogram buckets, safe names."""

from __future__ import annotations

import hashlib
import io
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def to_numpy(values: Any, name: str) -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor (any device, grad or not) or a sequence."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        t = values.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return np.asarray(t.numpy())
    try:
        return np.asarray(values)
    except Exception as exc:
        raise TypeError(
            f"{name}: got {type(values).__name__}; expected an array, tensor or sequence"
        ) from exc


def is_figure(obj: Any) -> bool:
    """A matplotlib Figure (checked by duck typing so matplotlib is never imported here)."""
    return hasattr(obj, "savefig") and hasattr(obj, "canvas")


def figure_png(fig: Any, *, close: bool = True) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    if close:
        try:
            import matplotlib.pyplot as plt

            plt.close(fig)
        except ImportError:  # a Figure without pyplot cannot be registered with it anyway
            pass
    return buf.getvalue()


def image_hwc(image: Any, name: str = "image") -> np.ndarray:
    """``uint8 [H, W, C]`` (C in 1, 3, 4) from HW, CHW or HWC data; floats are taken as [0, 1]."""
    arr = to_numpy(image, name)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim == 3:
        if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.transpose(arr, (1, 2, 0))
    else:
        raise ValueError(
            f"{name}: got shape {arr.shape}; expected [H, W], [C, H, W] or [H, W, C] with C in 1, 3, 4"
        )
    if arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: got shape {arr.shape}; expected 1, 3 or 4 channels")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
        return np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8))
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name}: got dtype {arr.dtype}; expected uint8, integer, bool or float data")
    scaled = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.ascontiguousarray((np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def encode_png(hwc: np.ndarray) -> bytes:
    """PNG bytes of a ``uint8 [H, W, C]`` array (no Pillow needed)."""
    height, width, channels = hwc.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + hwc[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        _PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    )


def png_size(png: bytes) -> tuple[int, int, int]:
    """``(height, width, channels)`` read from a PNG header."""
    if not png.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG")
    width, height, _, color_type = struct.unpack(">IIBB", png[16:26])
    return height, width, {0: 1, 2: 3, 4: 2, 6: 4}.get(color_type, 3)


def image_png(image: Any, name: str = "image") -> bytes:
    """PNG bytes of a matplotlib Figure, PNG bytes, or HW/CHW/HWC array or tensor."""
    if isinstance(image, (bytes, bytearray)):
        png_size(bytes(image))
        return bytes(image)
    if is_figure(image):
        return figure_png(image)
    return encode_png(image_hwc(image, name))


@dataclass(frozen=True)
class EmbeddingFiles:
    """An embedding as TensorBoard projector files: ``tensors.tsv`` (one row per line, tab-separated
    float32 values) and ``metadata.tsv`` (one label per line, no header: a single column), or ``None``."""

    tensors: bytes
    metadata: bytes | None
    shape: tuple[int, int]

    def write_to(self, folder: Path) -> None:
        """``folder/tensors.tsv`` (and ``metadata.tsv``), the folder made if missing."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tensors.tsv").write_bytes(self.tensors)
        if self.metadata is not None:
            (folder / "metadata.tsv").write_bytes(self.metadata)


def tag_step_path(kind: str, tag: str, step: int, suffix: str = "") -> PurePosixPath:
    """``<kind>/<safe tag>/step_<step, 10 digits><suffix>``: where a backend keeps a tag's media, in
    step order when listed by name."""
    return PurePosixPath(kind, safe_filename(tag), f"step_{step:010d}{suffix}")


def embedding_rows(values: Any, metadata: Sequence[str] | None, name: str) -> np.ndarray:
    """``float32 [N, D]`` rows, N, D >= 1, checked against ``metadata`` (one label per row)."""
    arr = to_numpy(values, name)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"{name}: got shape {arr.shape}; expected rows [N, D] with N, D >= 1")
    if metadata is not None and len(metadata) != arr.shape[0]:
        raise ValueError(
            f"{name}: got {len(metadata)} metadata labels; expected one per row ({arr.shape[0]})"
        )
    return arr.astype(np.float32, copy=False)


def embedding_files(
    values: Any, metadata: Sequence[str] | None = None, name: str = "embedding"
) -> EmbeddingFiles:
    """The projector's TSV files of ``values`` ``[N, D]`` and ``metadata`` (tabs and line breaks in a
    label become spaces: they would split it into columns or rows)."""
    arr = embedding_rows(values, metadata, name)
    buf = io.BytesIO()
    np.savetxt(buf, arr, fmt="%.9g", delimiter="\t")
    labels = None
    if metadata is not None:
        clean = (re.sub(r"[\t\r\n]", " ", str(label)) for label in metadata)
        labels = "".join(f"{label}\n" for label in clean).encode("utf-8")
    return EmbeddingFiles(buf.getvalue(), labels, (int(arr.shape[0]), int(arr.shape[1])))


@dataclass(frozen=True)
class Histogram:
    """Bucketed finite values: ``counts[i]`` values lie in ``[edges[i], edges[i + 1]]``."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    edges: list[float]
    counts: list[float]

    @property
    def bucket_limits(self) -> list[float]:
        """TensorBoard's right bucket edges."""
        return self.edges[1:]

    def as_dict(self) -> dict[str, Any]:
        return {
            "min": self.min,
            "max": self.max,
            "num": self.num,
            "sum": self.sum,
            "sum_squares": self.sum_squares,
            "edges": self.edges,
            "counts": self.counts,
        }


def histogram(values: Any, bins: int = 64, name: str = "values") -> Histogram:
    """Histogram of the finite values (non-finite ones are dropped; an empty input has no buckets).
    A :class:`Histogram` (a replayed one, say) is returned as it is."""
    if isinstance(values, Histogram):
        return values
    arr = to_numpy(values, name).astype(np.float64, copy=False).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return Histogram(0.0, 0.0, 0, 0.0, 0.0, [], [])
    lo, hi = float(arr.min()), float(arr.max())
    # one unit-wide bucket for constant data, as TensorBoard draws it
    edges = np.array([lo - 0.5, hi + 0.5]) if lo == hi else np.linspace(lo, hi, bins + 1)
    counts, edges = np.histogram(arr, bins=edges)
    return Histogram(
        min=lo,
        max=hi,
        num=int(arr.size),
        sum=float(arr.sum()),
        sum_squares=float(np.dot(arr, arr)),
        edges=[float(e) for e in edges],
        counts=[float(c) for c in counts],
    )


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def safe_filename(tag: str) -> str:
    """A single path component for ``tag``: no separators, no ``..``, no leading dot, never empty.
    Where sanitising changed the tag, a short hash of the full tag is appended, so two tags never
    share a file name (``attn/map`` and ``attn_map``, or two non-ASCII tags).

    >>> safe_filename("attn_map"), safe_filename("attn/map")
    ('attn_map', 'attn_map-8b79778d')
    """
    name = _UNSAFE.sub("_", tag.replace("/", "_")).replace("..", "_")
    name = re.sub(r"_+", "_", name).strip("._")[:200] or "unnamed"
    if name == tag:
        return name
    return f"{name}-{hashlib.sha1(tag.encode('utf-8')).hexdigest()[:8]}"
