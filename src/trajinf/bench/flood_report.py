"""The flood's report: a markdown table per environment and an HTML page with the per-round plot
(inline SVG, no plotting dependency)."""

from __future__ import annotations

import html
from pathlib import Path

PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#000000", "#aec7e8", "#ff9896", "#98df8a", "#c5b0d5", "#ffbb78",
)  # fmt: skip


def _p(tests: dict, method: str, against: str) -> str:
    t = tests.get(f"{method} vs {against}")
    if not t:
        return ""
    p = t["p_value"]
    return f"{t['mean_diff']:+.3f} (p {'n/a' if p is None else f'{p:.3f}'})"


def flood_markdown(res: dict, against: str = "rs") -> str:
    """One table: per method, success per round (mean ± std over seeds), the difference to
    ``against`` with its paired p-value, expansion, selection size and cost."""
    summ = res["summary"]
    rounds = sorted(summ, key=int)
    if not rounds:
        return f"### {res['env']}\n\n(no finished rows)\n"
    methods = list(summ[rounds[0]]["methods"])
    head = ["method"]
    for r in rounds:
        head += [f"round {r}", f"vs {against} (r{r})"]
    ends = sorted({rounds[0], rounds[-1]}, key=int)  # one expansion column when one round
    head += [f"expansion r{r}" for r in ends] + ["picked", "succ. share", "cost (epochs)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        row = [m.replace("|", "\\|")]  # a bare | would split the markdown cell
        for r in rounds:
            d = summ[r]["methods"].get(m)
            row.append(f"{d['success_mean']:.3f} ± {d['success_std']:.3f}" if d else "")
            row.append(_p(summ[r].get(f"paired_vs_{against}", {}), m, against))
        for r in ends:
            e = summ[r]["methods"].get(m, {}).get("expansion_mean")
            row.append("" if e is None else f"{e:.3f}")
        d1 = summ[rounds[0]]["methods"][m]
        row += [
            f"{d1['n_selected_mean']:.0f}",
            f"{d1['selected_success_mean']:.2f}",
            f"{d1['cost_epochs_mean']:.2f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    agent = res["agent"]
    seeds = len(summ[rounds[0]]["methods"][methods[0]]["seeds"])
    note = (
        f"\n{res['env']}: agent {agent['fingerprint']} (test success {agent['test_success']:.3f} on "
        f"{res['n_test']} tasks of {', '.join(res['target_families'])}; {res['n_base_failed']} "
        f"failed, the expansion set), {seeds} seeds; rows {res.get('rows_seconds', 0) / 60:.1f} "
        f"min of compute in all, this invocation {res['runtime_s'] / 60:.1f} min.\n"
    )
    return f"### {res['env']}\n\n" + "\n".join(lines) + "\n" + note


def round_plot_svg(res: dict, width: int = 560, height: int = 320) -> str:
    """Mean held-out success per round, one line per method."""
    summ = res["summary"]
    rounds = sorted(summ, key=int)
    methods = list(summ[rounds[0]]["methods"]) if rounds else []
    left, right, top, bottom = 50, 150, 20, 40
    w, h = width - left - right, height - top - bottom
    vals = [summ[r]["methods"][m]["success_mean"] for r in rounds for m in summ[r]["methods"]]
    ymax = max([0.1, *vals])
    ymax = min(1.0, ymax * 1.1)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (w * i / max(1, len(rounds) - 1) if len(rounds) > 1 else w / 2)
        return x, top + h * (1 - v / ymax)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#444"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#444"/>',
    ]
    for j in range(5):
        v = ymax * j / 4
        _, y = xy(0, v)
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for i, r in enumerate(rounds):
        x, _ = xy(i, 0)
        parts.append(f'<text x="{x:.1f}" y="{top + h + 16}" text-anchor="middle">round {r}</text>')
    for c, m in enumerate(methods):
        color = PALETTE[c % len(PALETTE)]
        pts = [
            xy(i, summ[r]["methods"][m]["success_mean"])
            for i, r in enumerate(rounds)
            if m in summ[r]["methods"]
        ]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>')
        ly = top + 12 * c
        parts.append(
            f'<text x="{left + w + 10}" y="{ly + 4}" fill="{color}">{html.escape(m)}</text>'
        )
    parts.append(
        f'<text x="14" y="{top + h / 2}" transform="rotate(-90 14 {top + h / 2})" '
        'text-anchor="middle">held-out success</text></svg>'
    )
    return "\n".join(parts)


def write_flood_report(results: dict, out: Path) -> None:
    """``flood.md`` (tables) and ``flood.html`` (tables + per-round plots) under ``out``."""
    from trajinf.atomic import atomic_write

    envs = list(results["envs"].values())
    md = "\n".join(flood_markdown(r) for r in envs)
    atomic_write(out / "flood.md", lambda f: f.write(md.encode()))
    body = []
    for r in envs:
        body.append(f"<h2>{html.escape(r['env'])}</h2>")
        body.append(round_plot_svg(r))
        body.append(f"<pre>{html.escape(flood_markdown(r))}</pre>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>trajinf bench: the flood"
        "</title></head><body><h1>The flood: success per round per method</h1>"
        + "\n".join(body)
        + "</body></html>"
    )
    atomic_write(out / "flood.html", lambda f: f.write(page.encode()))
