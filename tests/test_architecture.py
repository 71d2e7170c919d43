"""The package layout's rules (docs/architecture.md): no import cycles between trajinf's modules,
no ``_private`` name imported from another module, few modules at the top, and the stages'
direction (data -> gradients -> store -> scoring -> selection; nothing below imports the CLI,
the loop or the benchmark)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "trajinf"


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(mod: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every trajinf import in ``mod``, lazy
    imports inside functions included (a cycle through a lazy import is still a cycle)."""
    tree = ast.parse(path.read_text())
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if not src.startswith("trajinf"):
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in MODULES:  # `from pkg import submodule`
                    out.append((sub, "", node.lineno))
                else:
                    out.append((src, a.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("trajinf")]
    return out


EDGES = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: {s for s, _n, _l in e if s in MODULES and s != m} for m, e in EDGES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return comps


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_cycle_detector_finds_a_planted_cycle() -> None:
    """The detector itself: a cycle added to the graph must be reported."""
    EDGES["trajinf.errors"].append(("trajinf.atomic", "", 0))
    EDGES["trajinf.atomic"].append(("trajinf.errors", "", 0))
    try:
        assert ["trajinf.atomic", "trajinf.errors"] in _cycles()
    finally:
        EDGES["trajinf.errors"].pop()
        EDGES["trajinf.atomic"].pop()


def test_no_private_names_imported_across_modules() -> None:
    bad = [
        f"{m}:{line} imports {name} from {src}"
        for m, edges in EDGES.items()
        for src, name, line in edges
        if name.startswith("_") and src != m
    ]
    assert bad == []


def test_at_most_a_dozen_modules_at_the_top_and_every_package_a_stage() -> None:
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())
    assert len(modules) <= 12, modules
    # a new package is a new stage: it must take its place in ORDER (and the docs)
    assert set(packages) <= set(ORDER), sorted(set(packages) - set(ORDER))


# Stage order: a package may import from packages before it, never after it.
ORDER = ["errors", "atomic", "data", "models", "gradients", "store", "scoring", "selection", "train",
         "job", "envs", "integrations", "report", "loop", "bench", "cli"]  # fmt: skip
# Documented exceptions: the envs' step priors need an env (selection.priors.replay), the CLI
# entry point (`__main__`) runs the CLI.
ALLOWED = {("selection", "envs"), ("__main__", "cli")}


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_stages_import_only_earlier_stages(mod: str) -> None:
    def stage(m: str) -> str:
        return m.split(".")[1] if "." in m else m

    here = stage(mod)
    if here not in ORDER:
        return
    late = [
        f"{mod}:{line} imports {src}"
        for src, _n, line in EDGES[mod]
        if stage(src) in ORDER
        and ORDER.index(stage(src)) > ORDER.index(here)
        and (here, stage(src)) not in ALLOWED
    ]
    assert late == []
