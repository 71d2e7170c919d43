"""``trajinf bench peers``: LDS ground truth + the peer-library harness -> peers.json + peers.html.

The harness lives in the source checkout (``benchmarks/lds.py`` trains the subset models in this
interpreter; ``benchmarks/peers/run_peers.py`` runs every method under the separate peers
virtualenv, whose pinned libraries must not enter the main one). Both run as subprocesses; this
module checks the inputs first, so a missing peers interpreter fails before any training.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from trajinf.errors import TrajinfError

INSTALL_HINT = (
    "python3 -m venv .venv-peers && .venv-peers/bin/pip install torch==2.13.0 && "
    ".venv-peers/bin/pip install -c benchmarks/peers/constraints.txt "
    "-r benchmarks/peers/requirements.txt && "
    ".venv-peers/bin/pip install -c benchmarks/peers/constraints.txt --no-deps "
    "kronfluence==1.0.1 traker==0.3.2 dattri==0.3.0 && .venv-peers/bin/pip install "
    "--no-deps --ignore-requires-python logix-ai==0.1.1 && .venv-peers/bin/pip install "
    "--no-deps -e . (see benchmarks/peers/README.md)"
)


def benchmarks_dir(start: Path | None = None) -> Path:
    """The checkout's ``benchmarks/`` (with lds.py and peers/run_peers.py): searched from the
    current directory upwards, then next to the installed package (editable installs)."""
    here = Path(__file__).resolve()
    candidates = [p / "benchmarks" for p in [(start or Path.cwd()).resolve(), *Path.cwd().parents]]
    candidates.append(here.parents[3] / "benchmarks")
    for c in candidates:
        if (c / "lds.py").is_file() and (c / "peers" / "run_peers.py").is_file():
            return c
    raise TrajinfError(
        "bench peers: benchmarks/lds.py and benchmarks/peers/run_peers.py not found; "
        "run from a trajinf source checkout"
    )


def check_python(python: Path) -> Path:
    """The peers interpreter, or a TrajinfError naming it with the install command."""
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise TrajinfError(
            f"bench peers: peers interpreter {python} not found (--python); install it with: "
            + INSTALL_HINT
        )
    return python


def _stream(cmd: Sequence[str], log: Callable[[str], None], cwd: Path) -> None:
    """Run ``cmd``, passing its output lines to ``log``; a failure raises with the last lines."""
    tail: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-15:]
            if line.startswith(("[run_peers]", "  ", "{")) and "Warning" not in line:
                log(line)
    if proc.returncode != 0:
        raise TrajinfError(
            f"bench peers: {shlex.join(cmd[:3])} ... exited {proc.returncode}: "
            + " | ".join(tail[-4:])
        )


def run_peers_bench(
    out: Path,
    *,
    python: Path,
    models: int = 128,
    methods: str = "all",
    hidden: int | None = None,
    layers: int | None = None,
    queries_per_skill: int | None = None,
    rebuild: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Build (or reuse) the LDS ground truth in ``out/lds``, run the peers harness with
    ``python``, write ``out/peers.json`` and ``out/peers.html``; returns the combined dict."""
    from trajinf.bench.perf import machine_info
    from trajinf.bench.perf_report import write_peers_html

    python = check_python(Path(python))
    bench = benchmarks_dir()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gt_dir = out / "lds"
    lds_cmd = [sys.executable, str(bench / "lds.py"), "--out", str(gt_dir), "--models",
               str(models), "--report", str(out / "lds_report.json")]  # fmt: skip
    for flag, val in (("--hidden", hidden), ("--layers", layers),
                      ("--queries-per-skill", queries_per_skill)):  # fmt: skip
        if val is not None:
            lds_cmd += [flag, str(val)]
    if rebuild:
        lds_cmd.append("--rebuild")
    log(f"peers: ground truth ({models} subset models) -> {gt_dir}")
    _stream(lds_cmd, log, bench.parent)
    raw = out / "peers_raw.json"
    peer_cmd = [str(python), str(bench / "peers" / "run_peers.py"), "--gt", str(gt_dir),
                "--out", str(raw), "--methods", methods]  # fmt: skip
    log(f"peers: methods {methods} under {python}")
    _stream(peer_cmd, log, bench.parent)
    res = {
        "command": shlex.join(sys.argv),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "ground_truth": json.loads((out / "lds_report.json").read_text()),
        "peers": json.loads(raw.read_text()),
    }
    (out / "peers.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    write_peers_html(res, out / "peers.html")
    return res
