"""LIDC-IDRI reader XML: parse each radiologist's marks and group them into physical nodules.

An LIDC ``LidcReadMessage`` XML holds up to four ``readingSession`` elements (one per reader).
Each ``unblindedReadNodule`` is one reader's mark: a nodule >= 3 mm has ``characteristics``
(including ``malignancy`` 1-5) and per-slice contours (``roi`` with ``imageZposition`` and
``edgeMap`` pixel points); a nodule < 3 mm is a single point with no characteristics. Non-nodules
are ignored. Chest-radiograph XMLs (``IdriReadMessage``) are not CT and are skipped.

Grouping rule (readers' marks of the same physical nodule -> one nodule), documented here once:

1. Only marks >= 3 mm (those with a malignancy rating) are grouped; the paper keeps only them.
2. Two marks by *different* readers are candidates for the same nodule if their filled contours
   share at least one pixel on a common slice (contour overlap), or their volume centroids are
   within ``centroid_tol_mm`` (default 5 mm) in physical space.
3. Candidate pairs are merged greedily in order of increasing centroid distance, and a merge is
   refused if the group would then hold two marks by the same reader (single linkage with a
   one-mark-per-reader constraint). Every group is one nodule, read by 1-4 readers.

Coordinates: ``col``/``row`` are pixel indices (x, y) in the DICOM image; ``z`` is the
``imageZposition`` in mm. Pixel spacing comes from the DICOM series when available.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ctharden.core.errors import DataError

_NS = {"n": "http://www.nih.gov"}
_PATIENT_RE = re.compile(r"LIDC-IDRI-\d{4}")
Z_TOL_MM = 0.01  # imageZposition values of one slice agree to this tolerance


@dataclass
class Contour:
    """One reader's contour on one slice. ``points`` is ``(n, 2)`` int pixel (col, row)."""

    z_mm: float
    sop_uid: str
    inclusion: bool
    points: np.ndarray


@dataclass
class ReaderMark:
    """One reader's mark of one nodule (an ``unblindedReadNodule``)."""

    xml_path: Path
    reader_index: int
    reader_id: str
    nodule_id: str
    malignancy: int | None
    characteristics: dict[str, int]
    contours: list[Contour]
    _masks: dict[float, tuple[int, int, np.ndarray]] | None = field(default=None, repr=False)

    @property
    def is_large(self) -> bool:
        """True for a >= 3 mm mark (one that carries a malignancy rating)."""
        return self.malignancy is not None

    @property
    def z_range(self) -> tuple[float, float]:
        zs = [c.z_mm for c in self.contours]
        return min(zs), max(zs)

    def masks(self) -> dict[float, tuple[int, int, np.ndarray]]:
        """Filled contour per slice: ``{z_mm: (col0, row0, bool mask (rows, cols))}``.

        Inclusion contours are filled (edge pixels included, as LIDC's edge maps are the nodule's
        outer boundary); exclusion contours (holes) are subtracted.
        """
        if self._masks is None:
            by_z: dict[float, list[Contour]] = {}
            for c in self.contours:
                by_z.setdefault(round(c.z_mm, 2), []).append(c)
            out: dict[float, tuple[int, int, np.ndarray]] = {}
            for z, contours in by_z.items():
                pts = np.concatenate([c.points for c in contours])
                col0, row0 = pts.min(axis=0)
                w, h = pts.max(axis=0) - (col0, row0) + 1
                img = Image.new("1", (int(w), int(h)), 0)
                draw = ImageDraw.Draw(img)
                for c in sorted(contours, key=lambda c: not c.inclusion):  # inclusions first
                    poly = [(int(x - col0), int(y - row0)) for x, y in c.points]
                    fill = 1 if c.inclusion else 0
                    if len(poly) == 1:
                        draw.point(poly, fill=fill)
                    else:
                        draw.polygon(poly, fill=fill, outline=fill)
                out[z] = (int(col0), int(row0), np.array(img, dtype=bool))
            self._masks = out
        return self._masks

    def centroid(self, spacing_mm: tuple[float, float]) -> np.ndarray:
        """Area-weighted centroid ``(col, row, z_mm)`` of the filled contours (pixel, pixel, mm)."""
        total = np.zeros(3)
        weight = 0.0
        for z, (col0, row0, mask) in self.masks().items():
            rows, cols = np.nonzero(mask)
            n = len(rows)
            if n == 0:
                continue
            total += (cols.sum() + n * col0, rows.sum() + n * row0, n * z)
            weight += n
        if weight == 0:
            raise DataError(f"{self.xml_path}: nodule {self.nodule_id!r} has empty contours")
        return total / weight

    def diameter_mm(self, spacing_mm: tuple[float, float]) -> float:
        """Largest in-plane extent (max Feret diameter over slices) in mm."""
        best = 0.0
        for c in self.contours:
            if not c.inclusion or len(c.points) < 2:
                continue
            p = c.points.astype(np.float64) * np.asarray(spacing_mm)
            d = np.sqrt(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)).max()
            best = max(best, float(d))
        return best


@dataclass
class ReadMessage:
    """One parsed LIDC XML file."""

    path: Path
    series_uid: str
    study_uid: str
    n_sessions: int
    marks: list[ReaderMark]
    n_non_nodules: int

    @property
    def patient_id(self) -> str:
        """``LIDC-IDRI-NNNN`` from the file's path (TCIA folder or file name), else the series UID."""
        m = _PATIENT_RE.findall(str(self.path))
        return m[-1] if m else self.series_uid


def _text(el: ET.Element, path: str) -> str | None:
    found = el.find(path, _NS)
    return found.text.strip() if found is not None and found.text is not None else None


def _edge_point(edge: ET.Element, path: Path, nodule_id: str) -> tuple[int, int]:
    """``(x, y)`` pixel coordinates of one ``edgeMap``; :class:`DataError` if either is missing."""
    x = edge.findtext("n:xCoord", namespaces=_NS)
    y = edge.findtext("n:yCoord", namespaces=_NS)
    if x is None or y is None:
        raise DataError(f"{path}: nodule {nodule_id!r} has an edgeMap without xCoord/yCoord")
    return int(x), int(y)


def is_lidc_ct_xml(path: Path) -> bool:
    """True if ``path`` looks like an LIDC CT read message (cheap check on its first bytes)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return b"LidcReadMessage" in head


def find_xml(root: Path) -> tuple[list[Path], int]:
    """LIDC CT XML files under ``root`` (sorted) and the number of other XML files (e.g. radiograph reads)."""
    ct, other = [], 0
    for path in sorted(root.rglob("*.xml")):
        if is_lidc_ct_xml(path):
            ct.append(path)
        else:
            other += 1
    return ct, other


def parse_read_message(path: str | Path) -> ReadMessage:
    """Parse one LIDC CT XML file; :class:`DataError` names the file if it is corrupt or not LIDC CT."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(f"{path}: XML file not found") from None
    except ET.ParseError as exc:
        raise DataError(f"{path}: corrupt XML ({exc})") from None
    if not root.tag.endswith("LidcReadMessage"):
        raise DataError(f"{path}: not an LIDC CT read message (root element {root.tag!r})")
    series_uid = _text(root, "n:ResponseHeader/n:SeriesInstanceUid")
    if not series_uid:
        raise DataError(f"{path}: no SeriesInstanceUid in ResponseHeader")
    study_uid = _text(root, "n:ResponseHeader/n:StudyInstanceUID") or ""
    marks: list[ReaderMark] = []
    sessions = root.findall("n:readingSession", _NS)
    n_non = 0
    for r_idx, session in enumerate(sessions):
        reader_id = _text(session, "n:servicingRadiologistID") or f"reader{r_idx}"
        n_non += len(session.findall("n:nonNodule", _NS))
        for nod in session.findall("n:unblindedReadNodule", _NS):
            nodule_id = _text(nod, "n:noduleID") or "?"
            chars: dict[str, int] = {}
            char_el = nod.find("n:characteristics", _NS)
            if char_el is not None:
                for child in char_el:
                    tag = child.tag.split("}")[-1]
                    if child.text and child.text.strip().lstrip("-").isdigit():
                        chars[tag] = int(child.text.strip())
            malignancy = chars.get("malignancy")
            if malignancy is not None and not 1 <= malignancy <= 5:
                raise DataError(f"{path}: nodule {nodule_id!r} has malignancy {malignancy} outside 1-5")
            contours = []
            for roi in nod.findall("n:roi", _NS):
                z = _text(roi, "n:imageZposition")
                pts = [_edge_point(e, path, nodule_id) for e in roi.findall("n:edgeMap", _NS)]
                if z is None or not pts:
                    raise DataError(f"{path}: nodule {nodule_id!r} has an roi without z position or points")
                contours.append(
                    Contour(
                        z_mm=float(z),
                        sop_uid=_text(roi, "n:imageSOP_UID") or "",
                        inclusion=(_text(roi, "n:inclusion") or "TRUE").upper() == "TRUE",
                        points=np.asarray(pts, dtype=np.int64),
                    )
                )
            if not contours:
                raise DataError(f"{path}: nodule {nodule_id!r} has no roi")
            marks.append(ReaderMark(path, r_idx, reader_id, nodule_id, malignancy, chars, contours))
    return ReadMessage(path, series_uid, study_uid, len(sessions), marks, n_non)


@dataclass
class Nodule:
    """One physical nodule: the >= 3 mm marks of 1-4 readers grouped by the module's rule."""

    marks: list[ReaderMark]
    centroid: np.ndarray  # (col, row, z_mm), mean of the readers' centroids
    diameter_mm: float  # mean over readers of the largest in-plane extent

    @property
    def ratings(self) -> list[int]:
        return [m.malignancy for m in self.marks if m.malignancy is not None]

    @property
    def malignancy_mean(self) -> float:
        return float(np.mean(self.ratings))

    @property
    def z_range(self) -> tuple[float, float]:
        return min(m.z_range[0] for m in self.marks), max(m.z_range[1] for m in self.marks)

    def describe(self) -> str:
        ids = ", ".join(f"reader {m.reader_index}:{m.nodule_id}" for m in self.marks)
        z0, z1 = self.z_range
        return f"nodule [{ids}] z {z0:.1f}..{z1:.1f} mm"


def _overlap(a: ReaderMark, b: ReaderMark) -> bool:
    ma, mb = a.masks(), b.masks()
    for z in ma.keys() & mb.keys():
        ca, ra, A = ma[z]
        cb, rb, B = mb[z]
        c0, r0 = max(ca, cb), max(ra, rb)
        c1 = min(ca + A.shape[1], cb + B.shape[1])
        r1 = min(ra + A.shape[0], rb + B.shape[0])
        if c0 >= c1 or r0 >= r1:
            continue
        if (A[r0 - ra : r1 - ra, c0 - ca : c1 - ca] & B[r0 - rb : r1 - rb, c0 - cb : c1 - cb]).any():
            return True
    return False


def group_marks(
    marks: list[ReaderMark], spacing_mm: tuple[float, float], centroid_tol_mm: float = 5.0
) -> list[Nodule]:
    """Group >= 3 mm reader marks into nodules (rule in the module docstring), sorted by z then row."""
    large = [m for m in marks if m.is_large]
    if not large:
        return []
    scale = np.array([spacing_mm[0], spacing_mm[1], 1.0])
    cents = np.array([m.centroid(spacing_mm) for m in large]) * scale
    pairs: list[tuple[float, int, int]] = []
    for i in range(len(large)):
        for j in range(i + 1, len(large)):
            if large[i].reader_index == large[j].reader_index:
                continue
            dist = float(np.linalg.norm(cents[i] - cents[j]))
            if dist <= centroid_tol_mm or _overlap(large[i], large[j]):
                pairs.append((dist, i, j))
    parent = list(range(len(large)))
    readers: dict[int, set[int]] = {i: {m.reader_index} for i, m in enumerate(large)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for _, i, j in sorted(pairs):
        ri, rj = find(i), find(j)
        if ri == rj or readers[ri] & readers[rj]:
            continue
        parent[rj] = ri
        readers[ri] |= readers.pop(rj)

    groups: dict[int, list[int]] = {}
    for i in range(len(large)):
        groups.setdefault(find(i), []).append(i)
    nodules = []
    for members in groups.values():
        ms = [large[i] for i in members]
        centroid = np.mean([m.centroid(spacing_mm) for m in ms], axis=0)
        diameter = float(np.mean([m.diameter_mm(spacing_mm) for m in ms]))
        nodules.append(Nodule(ms, centroid, diameter))
    nodules.sort(key=lambda n: (n.centroid[2], n.centroid[1], n.centroid[0]))
    return nodules


def malignancy_label(mean: float) -> int | None:
    """Paper rule: 1 (malignant) if mean > 3, 0 (benign) if mean < 3, None (dropped) if mean == 3."""
    if math.isclose(mean, 3.0):
        return None
    return 1 if mean > 3.0 else 0


def malignancy_class(mean: float) -> int:
    """The 1-5 rating for the five-class variant: the mean rounded half up."""
    return int(min(5, max(1, math.floor(mean + 0.5))))
