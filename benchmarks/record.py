"""The JSON every benchmark writes: the date, the machine, the command that produced the figures, results."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any


def machine(**extra: Any) -> dict[str, Any]:
    """What the figures were measured on."""
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(), **extra}


def write_record(out: Path, command: str, results: dict[str, Any], **fields: Any) -> None:
    """Write ``{date, machine, command, **fields, results}`` to ``out`` and say so."""
    fields.setdefault("machine", machine())
    report = {"date": dt.date.today().isoformat(), "command": command, **fields, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
