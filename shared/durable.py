"""Durable small files: JSON written atomically (temporary file, fsync, rename, fsync of the folder).

A privacy ledger or the pointer to a site's installed policy must never be left half-written by a crash:
readers see either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomically(path: Path, state: Any, mode: int | None = None, sort_keys: bool = False,
                          indent: int | None = 2) -> None:
    """Replace ``path`` with ``state`` as JSON (indent 2 unless ``indent`` says otherwise (None: one line), no
    NaN, trailing newline), atomically and durably; ``mode`` sets the file's permissions before it becomes
    visible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=indent, allow_nan=False, sort_keys=sort_keys)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
