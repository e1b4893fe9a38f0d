"""The LIDC-IDRI annotation funnel: how many reads, marks and nodules pass each filter.

Shared by the 3D (:mod:`ctharden.data.lidc`) and 2D (:mod:`ctharden.data.lidc_slices`) modes, which
add their own image counts. Every number is counted, none is assumed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ctharden.data.lidc_xml import Nodule, ReadMessage, malignancy_label


@dataclass
class AnnotationFunnel:
    """The annotation filters (XML only) and the labelled nodules whose images are missing."""

    xml_files: int = 0
    xml_files_not_ct: int = 0
    reading_sessions: int = 0
    marks: int = 0
    marks_ge3mm: int = 0
    marks_lt3mm: int = 0
    non_nodule_marks: int = 0
    nodules_ge3mm: int = 0
    nodules_by_n_readers: Counter[int] = field(default_factory=Counter)
    dropped_mean_eq_3: int = 0
    malignant: int = 0
    benign: int = 0
    xml_without_images: int = 0
    labelled_without_images: int = 0

    def add_message(self, msg: ReadMessage) -> None:
        """Count one reader XML: its sessions and marks."""
        self.xml_files += 1
        self.reading_sessions += msg.n_sessions
        self.marks += len(msg.marks)
        self.marks_ge3mm += sum(m.is_large for m in msg.marks)
        self.marks_lt3mm += sum(not m.is_large for m in msg.marks)
        self.non_nodule_marks += msg.n_non_nodules

    def add_nodule(self, nodule: Nodule) -> int | None:
        """Count one grouped nodule; return its label (None: mean rating == 3, dropped)."""
        self.nodules_ge3mm += 1
        self.nodules_by_n_readers[len(nodule.marks)] += 1
        label = malignancy_label(nodule.malignancy_mean)
        if label is None:
            self.dropped_mean_eq_3 += 1
        elif label == 1:
            self.malignant += 1
        else:
            self.benign += 1
        return label

    def as_dict(self) -> dict[str, Any]:
        """Every count (field order), ``nodules_by_n_readers`` with string keys, and ``labelled``."""
        d: dict[str, Any] = dict(self.__dict__)
        d["nodules_by_n_readers"] = {str(k): v for k, v in sorted(self.nodules_by_n_readers.items())}
        d["labelled"] = self.malignant + self.benign
        return d
