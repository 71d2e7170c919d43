"""The ``trajinf`` command line: each verb is a thin layer over one library call."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any, Literal, Union, get_args, get_origin

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trajinf.errors import literal_choices
from trajinf.job.config import JobOption, ScoreJobConfig, build_job_config, job_options

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Influence of agent trajectories and their steps on a target skill.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's help: readable in an 80-column terminal
)
console = Console(stderr=True)
STATE = {"debug": False}


def _cli_type(opt: JobOption) -> Any:
    """The typer annotation of a job option: Literal choices (plus a resolved default such as
    "auto"), a repeatable option for tuples, the plain type otherwise."""
    choices = literal_choices(opt.type)
    if choices is not None:
        values = tuple(c for c in choices if c is not None)
        if opt.default is not None and opt.default not in values:
            values = (*values, opt.default)
        return Literal[values]  # type: ignore[valid-type]
    inner = _inner(opt.type)
    if get_origin(inner) in (list, tuple):
        return list[get_args(inner)[0]]
    return opt.type if inner is opt.type else inner | None


def _inner(tp: Any) -> Any:
    """``X`` of ``X | None``; ``tp`` itself otherwise."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _typer_option(opt: JobOption) -> Any:
    default = [] if get_origin(_cli_type(opt)) is list else opt.default
    decl = opt.flag
    if isinstance(opt.default, bool):
        decl = f"{opt.flag}/--no-{opt.flag[2:]}"
    return typer.Option(default, decl, help=opt.help, show_default=default not in (None, []))


def with_job_options(*, exclude: Iterable[str] = ()) -> Callable:
    """Give a verb every scoring-job option (:func:`trajinf.job.config.job_options`, from the
    config dataclasses' fields) except ``exclude``, as typer options after its own
    parameters; the verb takes them as ``**options`` and builds its config with
    :func:`job_config`."""
    skip = set(exclude)

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        for opt in job_options().values():
            if opt.name not in skip:
                params.append(
                    inspect.Parameter(
                        opt.name,
                        inspect.Parameter.KEYWORD_ONLY,
                        default=_typer_option(opt),
                        annotation=_cli_type(opt),
                    )
                )
        fn.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return fn

    return decorate


def job_config(options: dict[str, Any], *, has_checkpoints: bool) -> ScoreJobConfig:
    """The scoring job config of a verb's job options (a repeated option becomes its field's
    list or tuple, an empty one None); a bad value raises a one-line error naming its
    option."""
    table = job_options()
    values = {}
    for name, value in options.items():
        if isinstance(value, list):
            kind = tuple if get_origin(_inner(table[name].type)) is tuple else list
            value = kind(str(v) for v in value) or None
        values[name] = value
    return build_job_config(has_checkpoints=has_checkpoints, **values)


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
