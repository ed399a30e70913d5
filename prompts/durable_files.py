"""Durable file writes for the prompt store and its change log: the bytes reach the disk
before a name points at them, and a new name reaches the disk before anyone is told."""
from __future__ import annotations

import os
from pathlib import Path


def write_durably(path: Path, payload: bytes) -> None:
    """Create `path` (it must not exist) with `payload`, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries (a new link, a rename) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
