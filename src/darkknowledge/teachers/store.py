"""A teacher served from a signal store: signals looked up by example id, no forward."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import DKError
from ..signals import Batch, Signals
from ..store import SignalStore


class StoreTeacher:
    """Implements the teacher protocol from a store written by ``dk label``.

    ``expect`` (optional) holds fingerprint fields the run depends on (e.g. the
    ``data`` and ``example_ids`` digests of the student's training set); a store that
    differs in any of them is refused with a one-line error naming the field.
    Stored signals hold only for the inputs that were labelled: the batch's ``x`` is
    not looked at, so never combine a store with random augmentation.
    """

    def __init__(self, store, expect: dict | None = None):
        self.store = store if isinstance(store, SignalStore) else SignalStore(Path(store))
        if expect:
            self.store.check(expect)

    def signals(self, batch: Batch) -> Signals:
        try:
            return self.store.get(batch.ids)
        except KeyError as e:
            raise DKError(f"{e.args[0]}: the store was labelled for other examples") from None

    def modules(self) -> list[nn.Module]:
        return []  # no network: the teacher ran when the store was labelled
