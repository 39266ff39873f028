"""The one rule every selection keeps: no Split output or channel Slice becomes empty."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .groups import Group


class ChunkGuard:
    """How many classes of each Split/Slice chunk (``Group.keep_any``) are still kept, so a
    selection can skip the last one of a chunk.  Chunks may span groups: the count is shared
    by all of them, so one guard serves a whole selection."""

    def __init__(self, groups: Iterable[Group]) -> None:
        self.left: list[int] = []
        self.members: list[set[int]] = []
        seen: set[tuple[int, ...]] = set()
        for g in groups:
            for chunk in g.keep_any:
                key = tuple(np.asarray(chunk).tolist())
                if key not in seen:
                    seen.add(key)
                    self.left.append(len(key))
                    self.members.append(set(key))
        self._chunks_of: dict[int, list[int]] | None = None

    @property
    def chunks_of(self) -> dict[int, list[int]]:
        """Class -> the chunks holding it (built on first use: most selections never ask)."""
        if self._chunks_of is None:
            self._chunks_of = {}
            for k, members in enumerate(self.members):
                for c in sorted(members):
                    self._chunks_of.setdefault(c, []).append(k)
        return self._chunks_of

    def free(self, classes: np.ndarray, removal: np.ndarray) -> bool:
        """Whether removing ``removal`` (some of one group's ``classes``) leaves a kept class
        in every chunk it touches, each of those chunks within ``classes``: then no other
        group's selection reads their counts, and the removal needs no class-by-class check
        (an attention group's one chunk is all its heads)."""
        if not self.members:
            return True
        own = set(np.asarray(classes).tolist())
        touched = [m for m in self.members if not m.isdisjoint(own)]
        if not touched:
            return True
        gone = set(np.asarray(removal).tolist())
        return all(m <= own and not m <= gone for m in touched)

    def last_of_chunk(self, c: int) -> bool:
        """Whether class ``c`` is the last kept class of one of its chunks."""
        return any(self.left[k] == 1 for k in self.chunks_of.get(c, ()))

    def remove(self, c: int) -> None:
        """Count class ``c`` as removed from its chunks."""
        for k in self.chunks_of.get(c, ()):
            self.left[k] -= 1
