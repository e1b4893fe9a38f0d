"""Ingest 2-D COVID-19 CT slices (Soares et al. SARS-CoV-2 CT-scan dataset or UCSD COVID-CT).

Two folder layouts are accepted under ``root`` (exactly one must be present):

- ``soares``: ``COVID/`` and ``non-COVID/`` with files like ``Covid (1022).png`` (Soares et al.
  2020, doi 10.1101/2020.04.24.20078584; Kaggle plameneduardo/sarscov2-ctscan-dataset).
- ``ucsd``: ``CT_COVID/`` and ``CT_NonCOVID/`` with files like ``2020.02.10.20021584-p6-52%0.png``
  and ``1%0.jpg`` (Zhao et al. 2020, UCSD-AI4H/COVID-CT).

Every image is decoded fully (a truncated or corrupt file is a :class:`DataError`, or skipped
with ``skip_bad=True``), converted to one grey channel (the Soares non-COVID images are all RGBA
while some COVID ones are RGB: the colour mode must not reach the model), scaled to ``[0, 1]`` by
the real range of its storage type (8-bit / 255, 16-bit / 65535), resized to ``size x size`` and
written as a ``covid2d`` dataset (see :mod:`ctharden.data.dataset`).

Neither dataset has patient ids, so train/test/fold groups are pseudo-patients (an approximation,
stated in the report's ``grouping`` field):

- soares: class + block of ``block_size`` neighbouring file numbers (``number // block_size``);
  neighbouring numbers are slices of the same scan. A scan that straddles a block boundary can
  still end up in two groups.
- ucsd: COVID images by the medRxiv/bioRxiv paper id that prefixes the name (images from one
  paper share patients), or by the paper name before a ``-p<page>-<figure>`` suffix; non-COVID by
  the stem before the first ``%`` or ``_`` (``1%0.jpg`` and ``1%1.jpg`` are one group).
- anything else is grouped by its whole file stem and counted in the report.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from ctharden.core.errors import ConfigError, DataError
from ctharden.data.dataset import DatasetWriter, read_info, read_manifest

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "DecodedImage",
    "decode_grayscale",
    "detect_layout",
    "ingest_covid",
    "resize_square",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# layout name -> (COVID folder, non-COVID folder)
LAYOUTS: dict[str, tuple[str, str]] = {
    "soares": ("COVID", "non-COVID"),
    "ucsd": ("CT_COVID", "CT_NonCOVID"),
}
CLASS_KEYS: dict[int, str] = {1: "covid", 0: "noncovid"}
RESAMPLE = "PIL Image.resize BILINEAR on float32 (triangle filter widened when downscaling, i.e. antialiased)"
GRAY = "ITU-R 601-2 luma (299 R + 587 G + 114 B) / 1000; alpha composited onto black when not opaque"

_SOARES_NUMBER = (re.compile(r"\((\d+)\)\s*$"), re.compile(r"(\d+)\s*$"))
_PAPER_ID = re.compile(r"^(\d{4}\.\d{2}\.\d{2}\.\d{5,9})(?!\d)")  # medRxiv/bioRxiv DOI suffix
_PAPER_PAGE = re.compile(r"^(.+?)-p\d+-\d+")  # "<paper>-p<page>-<figure>..."
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class DecodedImage:
    """One decoded image at its original resolution.

    ``pixels``: ``(height, width)`` float32 grey values in ``[0, 1]`` (display units, no HU).
    ``value_scale``: the divisor applied to the stored integer values (255, 65535 or 1 for floats).
    """

    pixels: np.ndarray
    mode: str
    width: int
    height: int
    alpha_composited: bool
    value_scale: float


@dataclass(frozen=True)
class _Entry:
    """One image file to ingest and its ids (decided from the name alone, before decoding)."""

    path: Path
    rel: str
    label: int
    sample_id: str
    patient_id: str
    patient_id_kind: str
    parsed: bool


def _safe(text: str) -> str:
    """Map ``text`` to id-safe characters (letters, digits, ``._-``); runs of others become ``-``."""
    return _UNSAFE.sub("-", text).strip("-.") or "x"


def detect_layout(root: Path) -> str:
    """Return ``"soares"`` or ``"ucsd"``; :class:`DataError` if neither, both, or only half is present."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected a COVID-CT dataset folder)")
    found = {name: [(root / d).is_dir() for d in dirs] for name, dirs in LAYOUTS.items()}
    complete = [name for name, present in found.items() if all(present)]
    expected = " or ".join(f"{LAYOUTS[n][0]}/ + {LAYOUTS[n][1]}/ ({n})" for n in LAYOUTS)
    if len(complete) == 1:
        return complete[0]
    if len(complete) > 1:
        raise DataError(f"{root}: holds both the Soares and the UCSD layout; expected one of {expected}")
    partial = [f"{d}/" for name, dirs in LAYOUTS.items() for d, ok in zip(dirs, found[name], strict=True) if ok]
    got = f"found only {', '.join(partial)}" if partial else "found neither"
    raise DataError(f"{root}: not a COVID-CT dataset ({got}); expected {expected}")


def _natural_key(name: str) -> tuple[Any, ...]:
    """Sort ``Covid (2)`` before ``Covid (10)``; the full name breaks ties deterministically."""
    parts = re.split(r"(\d+)", name)
    return (tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name)


def _soares_ids(stem: str, label: int, block_size: int) -> tuple[str, str, str, bool]:
    """``(sample_id, patient_id, patient_id_kind, parsed)`` for a Soares file stem."""
    cls = CLASS_KEYS[label]
    for pattern in _SOARES_NUMBER:
        m = pattern.search(stem)
        if m:
            digits = m.group(1)
            block = int(digits) // block_size
            return (
                f"soares-{cls}-{digits}",
                f"soares-{cls}-block{block:04d}",
                f"file-number-block({block_size})",
                True,
            )
    return f"soares-{cls}-{_safe(stem)}", f"soares-{cls}-file-{_safe(stem)}", "file-stem", False


def _ucsd_ids(stem: str, label: int) -> tuple[str, str, str, bool]:
    """``(sample_id, patient_id, patient_id_kind, parsed)`` for a UCSD COVID-CT file stem.

    Paper groups are not prefixed by class: a paper contributing to both classes is one group.
    """
    cls = CLASS_KEYS[label]
    sample_id = f"ucsd-{cls}-{_safe(stem)}"
    m = _PAPER_ID.match(stem)
    if m:
        return sample_id, f"ucsd-paper-{m.group(1)}", "paper-id", True
    if label == 1:
        m = _PAPER_PAGE.match(stem)
        if m:
            return sample_id, f"ucsd-paper-{_safe(m.group(1))}", "paper-name", True
    else:
        prefix = re.split(r"[%_]", stem, maxsplit=1)[0]
        if prefix.strip():
            return sample_id, f"ucsd-{cls}-{_safe(prefix)}", "file-stem", True
    return sample_id, f"ucsd-{cls}-file-{_safe(stem)}", "file-stem", False


def _grouping_rule(layout: str, block_size: int) -> str:
    """The human-readable grouping rule recorded in the report and the dataset provenance."""
    if layout == "soares":
        return (
            f"soares: no patient ids; pseudo-patient = class + block of {block_size} neighbouring file "
            f"numbers (number // {block_size}, e.g. 'Covid (1022)' -> soares-covid-block"
            f"{1022 // block_size:04d}) because consecutive numbers are slices of one scan; files "
            "without a number are grouped by their whole stem. Approximation: a scan straddling a "
            "block boundary falls into two groups."
        )
    return (
        "ucsd: no patient ids; COVID images grouped by the medRxiv/bioRxiv paper id prefixing the "
        "name (e.g. 2020.02.10.20021584, kind paper-id) or, failing that, by the paper name before a "
        "'-p<page>-<figure>' suffix (kind paper-name) since images of one paper share patients; "
        "non-COVID grouped by the stem before the first '%' or '_' (e.g. 1%0.jpg and 1%1.jpg, kind "
        "file-stem); anything else by its whole stem. Approximation: one patient may appear in "
        "several papers or non-COVID stems."
    )


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with ``/`` separators; directories end in ``/``."""
    return path.relative_to(root).as_posix() + ("/" if path.is_dir() else "")


def _list_folder(root: Path, folder: str) -> tuple[list[Path], list[str]]:
    """Image files of one class folder (natural order) and the ignored entries (relative paths).

    Ignored: hidden files (``.DS_Store``, macOS ``._x.png`` resource forks), files without an
    image extension, and sub-directories (not searched).
    """
    images: list[Path] = []
    ignored: list[str] = []
    for path in sorted((root / folder).iterdir(), key=lambda p: _natural_key(p.name)):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            ignored.append(_rel(path, root))
    if not images:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"{root / folder}: class folder holds no image files (expected {exts})")
    return images, ignored


def _plan(root: Path, layout: str, block_size: int) -> tuple[list[_Entry], list[str]]:
    """List both class folders and assign ids; :class:`DataError` on a duplicate sample id."""
    entries: list[_Entry] = []
    ignored = sorted(_rel(p, root) for p in root.iterdir() if p.name not in LAYOUTS[layout])
    for folder, label in zip(LAYOUTS[layout], (1, 0), strict=True):
        images, skipped_names = _list_folder(root, folder)
        ignored += skipped_names
        for path in images:
            if layout == "soares":
                ids = _soares_ids(path.stem, label, block_size)
            else:
                ids = _ucsd_ids(path.stem, label)
            entries.append(_Entry(path, _rel(path, root), label, *ids))
    seen: dict[str, str] = {}
    for e in entries:
        if e.sample_id in seen:
            raise DataError(
                f"{root}: files {seen[e.sample_id]!r} and {e.rel!r} map to the same sample_id "
                f"{e.sample_id!r} (duplicate image or clashing names)"
            )
        seen[e.sample_id] = e.rel
    return entries, ignored


def _check_range(arr: np.ndarray, lo: float, hi: float) -> bool:
    return bool(arr.size) and float(arr.min()) >= lo and float(arr.max()) <= hi


def _to_unit_gray(img: Image.Image) -> tuple[np.ndarray, bool, float]:
    """Grey ``(H, W)`` float32 in ``[0, 1]``, whether alpha was composited, and the value scale."""
    mode = img.mode
    if mode == "I" or mode.startswith("I;16"):  # 16-bit (Pillow may also open 16-bit PNGs as I)
        arr = np.asarray(img, dtype=np.float64)
        if not _check_range(arr, 0, 65535):
            raise ValueError(f"mode {mode} values in [{arr.min():g}, {arr.max():g}] are not 16-bit unsigned")
        return (arr / 65535.0).astype(np.float32), False, 65535.0
    if mode == "F":  # float: the display scale is guessed from the value range, and recorded
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("float image has NaN or infinite values")
        for scale in (1.0, 255.0, 65535.0):
            if _check_range(arr, 0.0, scale):
                return (arr / scale).astype(np.float32), False, scale
        raise ValueError(f"float image values in [{arr.min():g}, {arr.max():g}]: unknown display scale")
    if mode in ("L", "LA"):
        pass
    elif mode == "1":
        img = img.convert("L")
    elif mode in ("P", "PA", "RGBA", "RGBa", "La"):
        img = img.convert("LA" if mode == "La" else "RGBA")  # palette -> colours (+ transparency)
    else:  # RGB, RGBX, CMYK, YCbCr, LAB, HSV ...
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.float64)
    if arr.ndim == 2:
        gray, alpha = arr, None
    else:
        alpha = arr[..., -1] if img.mode in ("LA", "RGBA") else None
        if arr.shape[-1] >= 3:
            gray = (arr[..., 0] * 299 + arr[..., 1] * 587 + arr[..., 2] * 114) / 1000.0
        else:
            gray = arr[..., 0]
    composited = alpha is not None and bool((alpha < 255).any())
    if composited:
        assert alpha is not None  # composited implies an alpha channel
        gray = gray * (alpha / 255.0)  # onto black
    return (gray / 255.0).astype(np.float32), composited, 255.0


def decode_grayscale(data: bytes, name: str = "<bytes>") -> DecodedImage:
    """Decode an image file's bytes fully and convert it to grey ``(H, W)`` float32 in ``[0, 1]``.

    Equal R, G, B channels give exactly the channel value / 255. Multi-frame files use frame 0.
    Raises :class:`DataError` naming ``name`` if the bytes cannot be decoded: truncated pixel data,
    a PNG with a bad chunk CRC or no end marker, unknown format. EXIF orientation is not applied.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images would be padded")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # PNG: chunk CRCs and the IEND end marker (a no-op for other formats)
        img = Image.open(io.BytesIO(data))
        img.load()  # PIL is lazy: force the full decode so truncation is detected here
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on bad bytes; all are data errors
        raise DataError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from None
    mode, (width, height) = img.mode, img.size
    try:
        pixels, composited, scale = _to_unit_gray(img)
    except (ValueError, OSError) as exc:
        raise DataError(f"{name}: cannot convert {mode} image to grey ({exc})") from None
    if width < 1 or height < 1:
        raise DataError(f"{name}: empty image ({width}x{height})")
    return DecodedImage(np.clip(pixels, 0.0, 1.0), mode, width, height, composited, scale)


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize grey ``(H, W)`` float32 ``[0, 1]`` to ``(size, size)`` (aspect ratio not kept, as in IMA).

    Uses PIL bilinear resampling on a float image: a triangle filter whose support widens with
    the downscale factor (antialiased), so values stay convex combinations (clipped to [0, 1]).
    """
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    out = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def _process(entry: _Entry, size: int) -> tuple[DecodedImage, np.ndarray, str] | DataError:
    """Read, hash, decode and resize one file; return the error instead of raising (ordered handling)."""
    try:
        data = entry.path.read_bytes()
    except OSError as exc:
        return DataError(f"{entry.path}: cannot read ({exc})")
    digest = hashlib.sha256(data).hexdigest()
    try:
        decoded = decode_grayscale(data, str(entry.path))
    except DataError as exc:
        return exc
    return decoded, resize_square(decoded.pixels, size), digest


def ingest_covid(
    root: Path,
    out: Path,
    *,
    size: int = 224,
    block_size: int = 25,
    skip_bad: bool = False,
    test_fraction: float = 0.2,
    n_folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Ingest a Soares or UCSD COVID-CT folder at ``root`` into a ``covid2d`` dataset at ``out``.

    Arrays: ``(size, size)`` float32 grey in ``[0, 1]`` (display units; 8-bit / 255, 16-bit / 65535),
    label 1 = COVID, 0 = non-COVID. Resampling: see :func:`resize_square` (PIL bilinear,
    antialiased, aspect ratio not kept). Manifest rows add provenance: ``original_path`` (relative
    to ``root``), ``original_mode``, ``original_width``, ``original_height``, ``file_sha256``,
    ``alpha_composited``, ``value_scale``. Files are processed one by one in natural name order,
    so the same inputs and seed give a byte-identical dataset (PNG decoding holds the GIL, so a
    thread pool measured no faster here: ~0.8 s for the 200-image sample). Writing is atomic: on
    any error ``out`` keeps its previous content (or does not exist).

    Returns a JSON-serialisable report (layout, counts, skipped/ignored files, grouping rule,
    original colour modes, content hash). ``ignored_non_image`` lists what was not ingested: other
    entries at the top of ``root`` (e.g. ``labels.csv``) and non-image or hidden files in the
    class folders. Raises :class:`DataError` on an unrecognised layout, an
    empty class folder, an undecodable image (unless ``skip_bad``) or clashing sample ids.
    """
    root, out = Path(root), Path(out)
    if size < 1:
        raise ConfigError(f"size must be >= 1, got {size}")
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    layout = detect_layout(root)
    entries, ignored = _plan(root, layout, block_size)
    grouping = _grouping_rule(layout, block_size)
    provenance = {
        "dataset": layout,
        "root": str(root),
        "layout": {"COVID": LAYOUTS[layout][0] + "/", "non-COVID": LAYOUTS[layout][1] + "/"},
        "size": size,
        "resample": RESAMPLE,
        "grayscale": GRAY,
        "grouping": grouping,
        "block_size": block_size if layout == "soares" else None,
        "skip_bad": skip_bad,
    }
    skipped: list[dict[str, str]] = []
    modes: Counter[str] = Counter()
    kept: Counter[int] = Counter()
    n_composited = 0
    with DatasetWriter(
        out, "covid2d", shape=(size, size), provenance=provenance,
        test_fraction=test_fraction, n_folds=n_folds, seed=seed,
    ) as writer:
        for entry in tqdm(entries, desc="COVID-CT images", unit="img", disable=None):
            result = _process(entry, size)
            if isinstance(result, DataError):
                if not skip_bad:
                    raise result
                skipped.append({"file": entry.rel, "reason": str(result)})
                continue
            decoded, array, digest = result
            writer.add(
                {
                    "sample_id": entry.sample_id,
                    "label": entry.label,
                    "patient_id": entry.patient_id,
                    "patient_id_kind": entry.patient_id_kind,
                    "source": layout,
                    "original_path": entry.rel,
                    "original_mode": decoded.mode,
                    "original_width": decoded.width,
                    "original_height": decoded.height,
                    "file_sha256": digest,
                    "alpha_composited": decoded.alpha_composited,
                    "value_scale": decoded.value_scale,
                },
                array,
            )
            modes[decoded.mode] += 1
            kept[entry.label] += 1
            n_composited += decoded.alpha_composited
        for label, folder in zip((1, 0), LAYOUTS[layout], strict=True):
            if not kept[label]:
                raise DataError(f"{root / folder}: no decodable images left after skipping bad files")
    info = read_info(out)
    manifest = read_manifest(out)
    bad = {s["file"] for s in skipped}
    unparsed = [e.rel for e in entries if not e.parsed and e.rel not in bad]
    return {
        "layout": layout,
        "root": str(root),
        "out": str(out),
        "n_samples": int(info["n_samples"]),
        "counts": {"COVID": kept[1], "non-COVID": kept[0]},
        "n_skipped": len(skipped),
        "skipped": skipped,
        "n_ignored_non_image": len(ignored),
        "ignored_non_image": ignored,
        "grouping": grouping,
        "patient_id_kinds": dict(sorted(Counter(manifest["patient_id_kind"]).items())),
        "n_groups": int(manifest["patient_id"].nunique()),
        "n_grouped_by_whole_stem": len(unparsed),
        "grouped_by_whole_stem": unparsed,
        "modes": dict(sorted(modes.items())),
        "n_alpha_composited": n_composited,
        "size": size,
        "resample": RESAMPLE,
        "split": info["split"],
        "content_hash": info["content_hash"],
    }
