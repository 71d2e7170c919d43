"""Console entry point: imports every verb module (each registers on ``trajinf.cli.app.app``)."""

from __future__ import annotations

import sys

from trajinf.cli import bench, bench_perf, env, extract, score  # noqa: F401  (register verbs)
from trajinf.cli.app import STATE, app, console
from trajinf.errors import TrajinfError


def main() -> None:
    """Console entry point: user errors print one line and exit 2 (traceback with --debug)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars only: HF's per-save bars drown them

    try:
        app()
    except TrajinfError as e:
        if STATE["debug"]:
            raise
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        sys.exit(2)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        if STATE["debug"]:
            raise
        console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        sys.exit(2)
