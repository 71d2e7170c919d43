"""HTML reports with matplotlib figures embedded as PNG (one self-contained file)."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from trajinf.data.schema import Trajectory
from trajinf.data.trajectories import load_pool

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1,h2{font-weight:600} table{border-collapse:collapse;margin:1em 0;font-size:14px}
td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}
.msg{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;margin:2px 0}
.neg{background:#fde0dd}.pos{background:#e0f3db}.muted{color:#777}
img{max-width:100%}
"""


def figure_html(fig) -> str:
    """Render a matplotlib figure as an inline ``<img>`` and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def page(title: str, body: Sequence[str]) -> str:
    """A complete HTML page from body fragments."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        + "\n".join(body)
        + "</body></html>"
    )


def write_html(text: str, path: str | Path) -> None:
    """Write a page atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def score_histogram(scores: pd.DataFrame, *, by: str = "source"):
    """Histogram of trajectory scores, one series per value of ``by``."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    groups = (
        scores.groupby(scores[by].fillna("?").astype(str)) if by in scores else [("all", scores)]
    )
    bins = np.histogram_bin_edges(scores["score"].dropna(), bins=30)
    for name, g in groups:
        ax.hist(g["score"].dropna(), bins=bins, alpha=0.55, label=f"{name} (n={len(g)})")
    ax.set_xlabel("influence score")
    ax.set_ylabel("trajectories")
    ax.legend(fontsize=8)
    return fig


def step_heatmap(step_scores: pd.DataFrame, ids: Sequence[str], *, title: str = ""):
    """Heatmap of per-step scores: rows = trajectories ``ids``, columns = step index."""
    sub = step_scores[step_scores["id"].isin(ids)]
    n_steps = int(sub["step"].max()) + 1 if len(sub) else 1
    mat = np.full((len(ids), n_steps), np.nan)
    row = {i: k for k, i in enumerate(ids)}
    for r in sub.itertuples(index=False):
        mat[row[r.id], int(r.step)] = r.score
    lim = np.nanmax(np.abs(mat)) if np.isfinite(mat).any() else 1.0
    fig, ax = plt.subplots(figsize=(min(2 + 0.5 * n_steps, 12), 0.3 * len(ids) + 1.2))
    im = ax.imshow(mat, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(ids)), [str(i)[:28] for i in ids], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    return fig


def _message_text(m: dict) -> str:
    text = m.get("content") or ""
    for c in m.get("tool_calls") or []:
        fn = c.get("function", {})
        text += f"{fn.get('name')}({fn.get('arguments')})"
    return text


def trajectory_html(traj: Trajectory, steps: dict[int, float], max_chars: int = 300) -> str:
    """Messages of one trajectory, assistant actions colored by their step score."""
    parts, k = [], 0
    for m in traj.messages:
        role = m.get("role")
        text = html.escape(_message_text(m)[:max_chars])
        if role == "assistant":
            s = steps.get(k)
            cls = "" if s is None else ("neg" if s < 0 else "pos")
            tag = "" if s is None else f" [{s:+.3g}]"
            parts.append(f"<div class='msg {cls}'><b>{role} step {k}{tag}</b>: {text}</div>")
            k += 1
        elif role != "system":
            parts.append(f"<div class='msg muted'>{role}: {text}</div>")
    return "".join(parts)


def items_table_html(
    rows: pd.DataFrame, trajs: dict[str, Trajectory], step_scores: pd.DataFrame
) -> str:
    """A table of trajectories with score, flags and their colored text."""
    by_id = {i: dict(zip(g["step"], g["score"], strict=True)) for i, g in step_scores.groupby("id")}
    out = [
        "<table><tr><th>id</th><th>score</th><th>source</th><th>success</th>"
        "<th>harmful</th><th>trajectory</th></tr>"
    ]
    for r in rows.itertuples(index=False):
        t = trajs.get(r.id)
        body = trajectory_html(t, by_id.get(r.id, {})) if t is not None else ""
        out.append(
            f"<tr><td>{html.escape(str(r.id))}</td><td>{r.score:+.4g}</td>"
            f"<td>{html.escape(str(getattr(r, 'source', '')))}</td>"
            f"<td>{getattr(r, 'success', '')}</td><td>{getattr(r, 'harmful', '')}</td>"
            f"<td>{body}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


def score_report_body(
    scores: pd.DataFrame, step_scores: pd.DataFrame, trajs: Sequence[Trajectory], *, top: int = 10
) -> list[str]:
    """Fragments for the score section of a report (reused by the demo report)."""
    ranked = scores.dropna(subset=["score"]).sort_values("score", ascending=False)
    best, worst = ranked.head(top), ranked.tail(top).iloc[::-1]
    by_id = {t.id: t for t in trajs}
    body = ["<h2>Score distribution by source</h2>", figure_html(score_histogram(scores))]
    if "harmful" in scores:
        n = int(scores["harmful"].fillna(False).sum())
        body.append(f"<p>{n} of {len(scores)} trajectories flagged harmful.</p>")
    body += [
        "<h2>Per-step scores</h2>",
        figure_html(step_heatmap(step_scores, list(best["id"]), title=f"top {top}")),
        figure_html(step_heatmap(step_scores, list(worst["id"]), title=f"bottom {top}")),
        f"<h2>Top {top}</h2>",
        items_table_html(best, by_id, step_scores),
        f"<h2>Bottom {top}</h2>",
        items_table_html(worst, by_id, step_scores),
    ]
    return body


def write_score_report(
    scores_dir: str | Path, pool: str | Path, out: str | Path, *, top: int = 10
) -> Path:
    """Write the report of a ``trajinf score`` output directory to ``out`` (HTML)."""
    scores_dir = Path(scores_dir)
    scores = pd.read_parquet(scores_dir / "scores.parquet")
    steps = pd.read_parquet(scores_dir / "step_scores.parquet")
    trajs = load_pool(pool)
    write_html(
        page("trajinf influence report", score_report_body(scores, steps, trajs, top=top)), out
    )
    return Path(out)


def success_bars(methods: dict, *, base: float | None = None):
    """Bar chart of mean success per method with std error bars and per-seed dots."""
    names = list(methods)
    means = [methods[m]["success_rate_mean"] for m in names]
    stds = [methods[m]["success_rate_std"] for m in names]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names)), 3.5))
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#9ecae1", edgecolor="#3182bd")
    for i, m in enumerate(names):
        ys = methods[m]["per_seed"]
        ax.scatter([i] * len(ys), ys, color="#08519c", s=12, zorder=3)
    if base is not None:
        ax.axhline(base, color="#999", linestyle="--", label=f"base agent {base:.2f}")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("success rate (held-out target tasks)")
    ax.set_ylim(0, 1.05)
    return fig


def harmful_roc(scores: pd.DataFrame, planted: Sequence[bool]):
    """ROC curve of ranking planted-harmful trajectories by low score."""
    s = -scores["score"].to_numpy(dtype=float)
    y = np.asarray(planted, dtype=bool)
    order = np.argsort(-s, kind="stable")
    tp = np.concatenate([[0], np.cumsum(y[order])]) / max(1, y.sum())
    fp = np.concatenate([[0], np.cumsum(~y[order])]) / max(1, (~y).sum())
    fig, ax = plt.subplots(figsize=(3.8, 3.5))
    ax.plot(fp, tp, label="low influence score")
    ax.plot([0, 1], [0, 1], color="#bbb", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=8)
    return fig


def _results_table(results: dict) -> str:
    rows = [
        "<table><tr><th>method</th><th>selected</th><th>success mean</th><th>std</th>"
        "<th>per seed</th><th>expert-step agreement</th></tr>"
    ]
    for name, r in results["methods"].items():
        seeds = " ".join(f"{x:.2f}" for x in r["per_seed"])
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{r.get('n_selected')}</td>"
            f"<td>{r['success_rate_mean']:.3f}</td><td>{r['success_rate_std']:.3f}</td>"
            f"<td>{seeds}</td><td>{r.get('step_agreement_mean', float('nan')):.3f} ± "
            f"{r.get('step_agreement_std', float('nan')):.3f}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def write_demo_report(
    results: dict,
    scores: pd.DataFrame,
    step_scores: pd.DataFrame,
    pool: Sequence[Trajectory],
    out: str | Path,
) -> Path:
    """The demo's report: success by method, harmful detection, and the score report."""
    planted = [bool(t.meta.get("planted")) for t in pool]
    shown = scores.set_index("id").loc[[t.id for t in pool]].reset_index()
    shown["source"] = [
        "planted" if p else str(s) for p, s in zip(planted, shown["source"], strict=True)
    ]
    body = [
        f"<p>env <b>{html.escape(str(results['env']))}</b>, budget {results['budget']:.0%}, "
        f"{results['seeds']} seeds, target families {html.escape(str(results['target_families']))}."
        f" Runtime {results['runtime_s']['total_s']:.0f} s.</p>",
        "<h2>Success of the retrained agent by selection method</h2>",
        figure_html(success_bars(results["methods"], base=results.get("base_success_rate"))),
        _results_table(results),
        "<h2>Paired tests against random and full</h2>",
        f"<pre>{html.escape(json.dumps(results.get('paired_tests', {}), indent=1))}</pre>",
        "<h2>Pool</h2>",
        f"<pre>{html.escape(json.dumps(results.get('pool', {}), indent=1))}</pre>",
        "<h2>Planted-harmful detection</h2>",
        f"<pre>{html.escape(json.dumps(results['harmful_detection'], indent=1))}</pre>",
    ]
    if any(planted) and not all(planted):
        body.append(figure_html(harmful_roc(shown, planted)))
    body += score_report_body(shown, step_scores, pool)
    write_html(page("trajinf demo", body), out)
    return Path(out)
