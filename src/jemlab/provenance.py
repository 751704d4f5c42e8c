"""Where a result came from: the commit of the jemlab checkout, recorded with every run and benchmark."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_sha() -> str | None:
    """The current commit of the jemlab checkout, if it is one (recorded with every run)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
