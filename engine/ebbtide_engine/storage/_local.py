"""Placeholder: the local-directory backend (being written)."""

from __future__ import annotations

import pathlib

from ebbtide_engine.storage import _memory


class LocalStore(_memory.MemoryStore):
    def __init__(self, root: pathlib.Path) -> None:
        super().__init__(str(root))
