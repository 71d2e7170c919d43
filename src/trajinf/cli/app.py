"""The ``trajinf`` command line: each verb is a thin layer over one library call."""

from __future__ import annotations

from contextlib import contextmanager
from enum import StrEnum

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Influence of agent trajectories and their steps on a target skill.",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
STATE = {"debug": False}


class Mode(StrEnum):
    factorized = "factorized"
    less = "less"


class Method(StrEnum):
    influence = "influence"
    random = "random"
    full = "full"
    success = "success"
    rds = "rds"
    loss = "loss"
    gradnorm = "gradnorm"
    length = "length"
    prior = "prior"


STEP_SPLIT_HELP = (
    "Per-step features (factorized mode): position (gradient through the step's positions; one "
    "backward) or loss (each step's own loss: what a step weight acts on; one backward per "
    "step, ~4x)."
)


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    STATE["debug"] = debug


@contextmanager
def progress_bars():
    """Yield a factory ``(description, total) -> advance(n)`` backed by rich progress bars."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bars:

        def factory(description: str, total: int):
            task = bars.add_task(description, total=total)
            return lambda n=1: bars.advance(task, n)

        yield factory
