"""The teacher-signal store: label once, distil many times.

``label(teacher, x, ids, out, LabelSpec(...))`` writes a store (resumable, crash-safe);
``open_store(path)`` reads it; :class:`~darkknowledge.teachers.StoreTeacher` serves it
to training by example id. See :mod:`.format` for the layout on disk.
"""

from . import fingerprint
from .fingerprint import FIELDS
from .label import LabelSpec, base_fingerprint, label
from .reader import SignalStore, open_store, read_manifest

__all__ = [
    "FIELDS",
    "LabelSpec",
    "SignalStore",
    "base_fingerprint",
    "fingerprint",
    "label",
    "open_store",
    "read_manifest",
]
