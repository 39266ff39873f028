"""The one rule every selection keeps: no Split output or channel Slice becomes empty."""

from __future__ import annotations

from typing import Iterable

from .groups import Group


class ChunkGuard:
    """How many classes of each Split/Slice chunk (``Group.keep_any``) are still kept, so a
    selection can skip the last one of a chunk.  Chunks may span groups: the count is shared
    by all of them, so one guard serves a whole selection."""

    def __init__(self, groups: Iterable[Group]) -> None:
        self.left: list[int] = []
        self.chunks_of: dict[int, list[int]] = {}
        seen: set[tuple[int, ...]] = set()
        for g in groups:
            for chunk in g.keep_any:
                key = tuple(int(c) for c in chunk)
                if key not in seen:
                    seen.add(key)
                    for c in key:
                        self.chunks_of.setdefault(c, []).append(len(self.left))
                    self.left.append(len(key))

    def last_of_chunk(self, c: int) -> bool:
        """Whether class ``c`` is the last kept class of one of its chunks."""
        return any(self.left[k] == 1 for k in self.chunks_of.get(c, ()))

    def remove(self, c: int) -> None:
        """Count class ``c`` as removed from its chunks."""
        for k in self.chunks_of.get(c, ()):
            self.left[k] -= 1
