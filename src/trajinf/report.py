"""HTML reports with matplotlib figures embedded as PNG (one self-contained file).

Every number is in an HTML table (no raw JSON), every page of results opens with one sentence
that states the result computed from the numbers (``result_sentence``), figures have labelled
axes and show seeds as dots, known bad steps are marked in the per-step views, and one
trajectory is rendered token by token with its action mask (what training sees).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
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
th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;color:#555;font-size:13px;padding:2px 0}
.lead{font-size:18px;line-height:1.45;border-left:4px solid #3182bd;padding:6px 12px;
 background:#f3f8fc}
.row{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap}
.msg{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;margin:2px 0}
.neg{background:#fde0dd}.pos{background:#e0f3db}.muted{color:#777}
.bad{border-left:4px solid #cb181d;padding-left:4px}.badtag{color:#cb181d;font-weight:600}
.toks{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;line-height:1.9;
 border:1px solid #ddd;padding:8px}
.tok{border-right:1px solid #fff}.act{background:#c7e9c0;font-weight:600}.ctx{color:#888}
img{max-width:100%}
"""


class Raw(str):
    """A table cell that is already HTML (``html_table`` escapes every other cell)."""


def html_table(
    header: Sequence[str], rows: Sequence[Sequence], *, caption: str | None = None
) -> str:
    """An HTML table; numbers right-aligned, strings escaped unless wrapped in ``Raw``."""

    def cell(v) -> str:
        if isinstance(v, Raw):
            return f"<td>{v}</td>"
        if isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool):
            return f"<td class='num'>{html.escape(fmt(v))}</td>"
        return f"<td>{html.escape('' if v is None else str(v))}</td>"

    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table>{cap}<tr>{head}</tr>{body}</table>"


def fmt(x, nd: int = 3) -> str:
    """A number for a table: floats to ``nd`` places, missing / non-finite as an en dash."""
    if x is None or (isinstance(x, float | np.floating) and not np.isfinite(x)):
        return "–"
    if isinstance(x, float | np.floating):
        return f"{x:.{nd}f}"
    return str(x)


def fmt_p(p: float | None) -> str:
    """A p-value; None (no spread across seeds) says so."""
    if p is None or not np.isfinite(p):
        return "undefined (same difference on every seed)"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


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


# ---------------------------------------------------------------- the result in one sentence


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None, int, int]:
    """Mean difference, paired t-test p (None without spread), n, seeds where a > b."""
    from scipy import stats

    n = min(len(a), len(b))
    x, y = np.asarray(a[:n], float), np.asarray(b[:n], float)
    d = x - y
    p = None
    if n >= 2 and not np.allclose(d, d[0]):
        p = float(stats.ttest_rel(x, y).pvalue)
    return float(d.mean()), p, n, int((d > 0).sum())


def result_sentence(
    per_seed: Mapping[str, Sequence[float]],
    *,
    subject: str = "influence",
    metric: str = "held-out success",
) -> str:
    """One sentence stating which method won, by how much and with what p-value.

    ``per_seed``: method -> its value per seed (same seed order for every method). The winner
    is the highest mean; it is compared with the next best by a paired t-test over seeds.
    Methods tied at the top with the same value on every seed win together (``subject`` named
    first); tied means with different seeds, or all methods tied, give "No ... method won".
    When ``subject`` is neither winner nor runner-up, its mean and rank are added.
    """
    per_seed = {m: list(v) for m, v in per_seed.items() if len(v)}
    if not per_seed:
        return "No results: no method produced a measurement."
    means = {m: float(np.mean(v)) for m, v in per_seed.items()}
    n = min(len(v) for v in per_seed.values())
    values = np.concatenate([np.asarray(v, float) for v in per_seed.values()])
    if np.allclose(values, values[0]):
        return (
            f"No method won: all {len(per_seed)} methods reached {values[0]:.3f} {metric} on "
            f"every seed (n = {n}), so this run cannot tell them apart."
        )
    ranked = sorted(per_seed, key=lambda m: -means[m])
    top = [m for m in ranked if np.isclose(means[m], means[ranked[0]])]
    if len(top) == len(ranked):
        return (
            f"No method won: all {len(ranked)} methods tied at a mean {metric} of "
            f"{means[ranked[0]]:.3f} over {n} seeds."
        )
    named = set(top)
    same = all(np.allclose(per_seed[m][:n], per_seed[top[0]][:n]) for m in top)
    if not same:
        out = (
            f"No single method won: {', '.join(top)} tied at {means[top[0]]:.3f} {metric} "
            f"(n = {n} seeds)"
        )
    else:  # methods with the same value on every seed win together (e.g. nothing was dropped)
        w = subject if subject in top else top[0]
        r = ranked[len(top)]
        named.add(r)
        others = [m for m in top if m != w]
        who = w if not others else f"{w} (and {', '.join(others)}: the same on every seed)"
        diff, p, k, ahead = _paired(per_seed[w], per_seed[r])
        sig = "significant" if p is not None and p < 0.05 else "not significant"
        out = (
            f"{who} won with {means[w]:.3f} {metric} against {means[r]:.3f} for the next best, "
            f"{r} ({diff:+.3f}, ahead on {ahead} of {k} seeds; paired t-test p = {fmt_p(p)}, "
            f"{sig} at 0.05)"
        )
    if subject in per_seed and subject not in named:
        rank = ranked.index(subject) + 1
        out += f"; {subject} reached {means[subject]:.3f} (rank {rank} of {len(ranked)})"
    return out + "."


def paired_rows(tests: Mapping[str, dict]) -> list[list]:
    """Rows (comparison, mean difference, p-value, n, seeds ahead) of ``paired_tests`` output."""
    rows = []
    for name, t in tests.items():
        if not t:
            continue
        ahead = t.get("n_ahead")
        rows.append(
            [
                name,
                Raw(f"{t['mean_diff']:+.3f}"),
                fmt_p(t.get("p_value")),
                t.get("n"),
                "–" if ahead is None else f"{ahead} of {t.get('n')}",
            ]
        )
    return rows


PAIRED_HEADER = ("comparison", "mean difference", "p-value (paired t)", "n seeds", "ahead on")


# ------------------------------------------------------------------------------ figures


def score_histogram(scores: pd.DataFrame, *, by: str = "source"):
    """Histogram of trajectory scores, one series per value of ``by``."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    groups = (
        scores.groupby(scores[by].fillna("?").astype(str)) if by in scores else [("all", scores)]
    )
    bins = np.histogram_bin_edges(scores["score"].dropna(), bins=30)
    for name, g in groups:
        ax.hist(g["score"].dropna(), bins=bins, alpha=0.55, label=f"{name} (n={len(g)})")
    ax.set_xlabel("influence score (trajectory)")
    ax.set_ylabel("trajectories")
    ax.legend(fontsize=8)
    return fig


def step_heatmap(
    step_scores: pd.DataFrame,
    ids: Sequence[str],
    *,
    title: str = "",
    bad_steps: Mapping[str, set[int]] | None = None,
):
    """Heatmap of per-step scores: rows = trajectories ``ids``, columns = step index.

    Steps known to be bad (``bad_steps``: id -> step indices, e.g. a noisy expert's random
    actions) are marked with a black x.
    """
    sub = step_scores[step_scores["id"].isin(ids)]
    n_steps = int(sub["step"].max()) + 1 if len(sub) else 1
    mat = np.full((len(ids), n_steps), np.nan)
    row = {i: k for k, i in enumerate(ids)}
    for r in sub.itertuples(index=False):
        mat[row[r.id], int(r.step)] = r.score
    lim = np.nanmax(np.abs(mat)) if np.isfinite(mat).any() else 1.0
    fig, ax = plt.subplots(figsize=(min(3 + 0.5 * n_steps, 12), 0.3 * len(ids) + 1.4))
    im = ax.imshow(mat, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    marked = [(s, row[i]) for i in ids for s in (bad_steps or {}).get(i, ()) if 0 <= s < n_steps]
    if marked:
        xs, ys = zip(*marked, strict=True)
        ax.scatter(xs, ys, marker="x", color="black", s=30, label="known bad step")
        ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 1.15), frameon=False)
    ax.set_yticks(range(len(ids)), [str(i)[:28] for i in ids], fontsize=7)
    ax.set_xticks(range(0, n_steps, max(1, n_steps // 15)))
    ax.set_xlabel("step")
    ax.set_ylabel("trajectory")
    ax.set_title(title, fontsize=10, loc="left")
    fig.colorbar(im, ax=ax, fraction=0.03, label="step score")
    return fig


def success_bars(methods: dict, *, base: float | None = None):
    """Bar chart of mean success per method with std error bars and per-seed dots."""
    names = list(methods)
    means = [methods[m]["success_rate_mean"] for m in names]
    stds = [methods[m]["success_rate_std"] for m in names]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names)), 3.6))
    colors = ["#6baed6" if m.startswith("influence") else "#d9d9d9" for m in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors, edgecolor="#555")
    for i, m in enumerate(names):
        ys = methods[m]["per_seed"]
        jitter = np.linspace(-0.12, 0.12, len(ys)) if len(ys) > 1 else [0.0]
        ax.scatter(i + np.asarray(jitter), ys, color="#08306b", s=14, zorder=3)
    ax.scatter([], [], color="#08306b", s=14, label="one seed")
    if base is not None:
        ax.axhline(base, color="#999", linestyle="--", label=f"base agent {base:.2f}")
    ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    ax.set_xlabel("selection method")
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
    ax.plot([0, 1], [0, 1], color="#bbb", linestyle=":", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (planted found)")
    ax.legend(fontsize=8)
    return fig


# -------------------------------------------------------------------- trajectories


def known_bad_steps(traj: Trajectory) -> set[int]:
    """Steps a trajectory's meta names as bad: a noisy expert's random actions, a planted
    wrong rule's steps, a one-bad-step demo's corrupted step (labels for reports only)."""
    bad = {int(s) for s in traj.meta.get("noisy_steps") or []}
    bad |= {int(s) for s in traj.meta.get("planted_steps") or []}
    if "bad_step" in traj.meta:
        bad.add(int(traj.meta["bad_step"]))
    return bad


def _message_text(m: dict) -> str:
    text = m.get("content") or ""
    for c in m.get("tool_calls") or []:
        fn = c.get("function", {})
        text += f"{fn.get('name')}({fn.get('arguments')})"
    return text


def trajectory_html(
    traj: Trajectory,
    steps: dict[int, float],
    max_chars: int = 300,
    *,
    flagged: frozenset[int] | set[int] = frozenset(),
) -> str:
    """Messages of one trajectory, actions colored by their step score (red below zero), known
    bad steps outlined in red, and ``flagged`` steps (the harm flag's bad steps) tagged."""
    parts, k = [], 0
    bad = known_bad_steps(traj)
    for m in traj.messages:
        role = m.get("role")
        text = html.escape(_message_text(m)[:max_chars])
        if role == "assistant":
            s = steps.get(k)
            cls = "" if s is None else ("neg" if s < 0 else "pos")
            tag = "" if s is None else f" [{s:+.3g}]"
            if k in bad:
                cls += " bad"
                tag += " <span class='badtag'>known bad step</span>"
            if k in flagged:
                cls += "" if k in bad else " bad"
                tag += " <span class='badtag'>harm: bad step</span>"
            parts.append(f"<div class='msg {cls}'><b>{role} step {k}{tag}</b>: {text}</div>")
            k += 1
        elif role != "system":
            parts.append(f"<div class='msg muted'>{role}: {text}</div>")
    return "".join(parts)


def action_mask_html(traj: Trajectory, tokenizer, *, max_tokens: int = 1500) -> str:
    """``traj`` token by token as the model sees it, action-mask tokens (the loss: what
    training and influence use) in green, context in grey (``data.tokenize`` decides)."""
    from trajinf.data.tokenize import tokenize_trajectory

    tok = tokenize_trajectory(traj, tokenizer)
    ids, mask = tok.input_ids[:max_tokens], tok.action_mask[:max_tokens]
    spans = []
    for i, m in zip(ids.tolist(), mask.tolist(), strict=True):
        text = html.escape(tokenizer.decode([i]))
        spans.append(f"<span class='tok {'act' if m else 'ctx'}'>{text}</span>")
    n_act, n = int(tok.action_mask.sum()), len(tok.input_ids)
    cut = f" (first {max_tokens} shown)" if n > max_tokens else ""
    return (
        f"<p>Trajectory <b>{html.escape(traj.id)}</b> ({html.escape(str(traj.source))}): "
        f"{n} tokens{cut}, of which {n_act} (<span class='act'>green</span>) are in the action "
        "mask: the assistant's actions and their end-of-turn token, the only tokens the loss, the "
        "gradients and so the influence scores see. <span class='ctx'>Grey</span> tokens (system, "
        "goal, observations, tool results, role headers) are context only.</p>"
        f"<div class='toks'>{''.join(spans)}</div>"
    )


def items_table_html(
    rows: pd.DataFrame, trajs: dict[str, Trajectory], step_scores: pd.DataFrame
) -> str:
    """A table of trajectories with score, flags and their colored text."""
    by_id = {i: dict(zip(g["step"], g["score"], strict=True)) for i, g in step_scores.groupby("id")}
    out = []
    for r in rows.itertuples(index=False):
        t = trajs.get(r.id)
        body = trajectory_html(t, by_id.get(r.id, {})) if t is not None else ""
        out.append(
            [
                str(r.id),
                Raw(f"{r.score:+.4g}"),
                getattr(r, "source", ""),
                getattr(r, "success", ""),
                getattr(r, "harmful", ""),
                Raw(body),
            ]
        )
    return html_table(("id", "score", "source", "success", "harmful", "trajectory"), out)


def score_report_body(
    scores: pd.DataFrame,
    step_scores: pd.DataFrame,
    trajs: Sequence[Trajectory],
    *,
    top: int = 10,
    tokenizer=None,
) -> list[str]:
    """Fragments for the score section of a report (reused by the demo report).

    With a ``tokenizer``, the top-ranked trajectory is also rendered with its action mask.
    """
    ranked = scores.dropna(subset=["score"]).sort_values("score", ascending=False)
    best, worst = ranked.head(top), ranked.tail(top).iloc[::-1]
    by_id = {t.id: t for t in trajs}
    bad = {t.id: known_bad_steps(t) for t in trajs if known_bad_steps(t)}
    body = ["<h2>Score distribution by source</h2>", figure_html(score_histogram(scores))]
    if "harmful" in scores:
        n = int(scores["harmful"].fillna(False).sum())
        body.append(f"<p>{n} of {len(scores)} trajectories flagged harmful.</p>")
    body += [
        "<h2>Per-step scores</h2>",
        "<p>Blue steps move the model toward the target, red steps away from it; an x marks a "
        "step the data's labels call bad (a noisy expert's random action, a planted wrong "
        "rule).</p>",
        figure_html(step_heatmap(step_scores, list(best["id"]), title=f"top {top}", bad_steps=bad)),
        figure_html(
            step_heatmap(step_scores, list(worst["id"]), title=f"bottom {top}", bad_steps=bad)
        ),
    ]
    with_bad = [i for i in ranked["id"] if i in bad][:top]
    if with_bad:
        body.append(
            figure_html(
                step_heatmap(
                    step_scores,
                    with_bad,
                    title=f"{len(with_bad)} trajectories with known bad steps (by score)",
                    bad_steps=bad,
                )
            )
        )
    if tokenizer is not None and len(best) and best["id"].iloc[0] in by_id:
        body += [
            "<h2>What training sees: the action mask</h2>",
            action_mask_html(by_id[best["id"].iloc[0]], tokenizer),
        ]
    body += [
        f"<h2>Top {top}</h2>",
        items_table_html(best, by_id, step_scores),
        f"<h2>Bottom {top}</h2>",
        items_table_html(worst, by_id, step_scores),
    ]
    return body


def _job_tokenizer(scores_dir: Path):
    """The tokenizer of the model a scoring job ran with (job.json), or None if not loadable."""
    try:
        from transformers import AutoTokenizer

        model = json.loads((scores_dir / "job.json").read_text())["model"]
        return AutoTokenizer.from_pretrained(model)
    except Exception:  # noqa: BLE001 - the report only loses the action-mask section
        return None


def write_score_report(
    scores_dir: str | Path, pool: str | Path, out: str | Path, *, top: int = 10, tokenizer=None
) -> Path:
    """Write the report of a ``trajinf score`` output directory to ``out`` (HTML).

    ``tokenizer`` (default: the scoring job's model's, when it can be loaded) renders the
    top trajectory with its action mask.
    """
    scores_dir = Path(scores_dir)
    scores = pd.read_parquet(scores_dir / "scores.parquet")
    steps = pd.read_parquet(scores_dir / "step_scores.parquet")
    trajs = load_pool(pool)
    tokenizer = tokenizer if tokenizer is not None else _job_tokenizer(scores_dir)
    body = [_score_sentence(scores, trajs)]
    body += score_report_body(scores, steps, trajs, top=top, tokenizer=tokenizer)
    body += harm_section(scores_dir, scores, steps, trajs, top=top)
    write_html(page("trajinf influence report", body), out)
    return Path(out)


def harm_section(
    scores_dir: Path,
    scores: pd.DataFrame,
    step_scores: pd.DataFrame,
    trajs: Sequence[Trajectory],
    *,
    top: int = 10,
) -> list[str]:
    """The flagged trajectories (most harmful first) with the harm flag's bad steps tagged,
    from the scoring job's ``harm_steps.parquet`` and ``job.json["harm"]`` (nothing when the
    job has no harm scores)."""
    path = scores_dir / "harm_steps.parquet"
    if not path.exists() or "harm" not in scores.columns:
        return []
    info = json.loads((scores_dir / "job.json").read_text()).get("harm") or {}
    hs = pd.read_parquet(path)
    bad = {i: set(g.loc[g["bad"], "step"].astype(int)) for i, g in hs.groupby("id")}
    flagged = scores[scores["harmful"].fillna(False).astype(bool)]
    flagged = flagged.sort_values("harm", ascending=False).head(top)
    by_id = {t.id: t for t in trajs}
    steps = {i: dict(zip(g["step"], g["score"], strict=True)) for i, g in step_scores.groupby("id")}
    body = [
        "<h2>Flagged as harmful</h2>",
        f"<p>{int(scores['harmful'].fillna(False).sum())} of {len(scores)} trajectories flagged: "
        f"their harm (the largest drop of one step's {html.escape(str(info.get('signal')))} "
        "below the rest of its trajectory) is above "
        f"{info.get('threshold', float('nan')):.3g}, the level-{info.get('alpha')} threshold "
        f"calibrated on {info.get('n_calibration')} target trajectories scored leave-one-out "
        f"({html.escape(str(info.get('method')))}). Steps tagged <span class='badtag'>harm: bad "
        "step</span> exceed it on their own; <code>trajinf select --repair</code> weights them "
        "0 and keeps the rest.</p>",
    ]
    rows = []
    for r in flagged.itertuples(index=False):
        t = by_id.get(r.id)
        text = trajectory_html(t, steps.get(r.id, {}), flagged=bad.get(r.id, set())) if t else ""
        rows.append(
            [str(r.id), Raw(f"{r.harm:.3g}"), Raw(f"{r.harm_p:.3g}"),
             ", ".join(map(str, sorted(bad.get(r.id, ())))), Raw(text)]
        )  # fmt: skip
    if rows:
        body.append(html_table(("id", "harm", "p", "bad steps", "trajectory"), rows))
    return body


def _score_sentence(scores: pd.DataFrame, trajs: Sequence[Trajectory]) -> str:
    """The score report's first paragraph: what ranks highest, by source, and what is flagged."""
    src = {t.id: str(t.source) for t in trajs}
    ranked = scores.dropna(subset=["score"]).sort_values("score", ascending=False)
    k = max(1, len(ranked) // 10)
    top = pd.Series([src.get(i, "?") for i in ranked["id"].head(k)]).value_counts()
    flagged = int(scores["harmful"].fillna(False).sum()) if "harmful" in scores else 0
    mix = ", ".join(f"{c} {n}" for n, c in zip(top.index, top.to_numpy(), strict=True))
    return (
        f"<p class='lead'>{len(ranked)} trajectories scored; the top 10 % ({k}) come from: {mix}"
        f"; {flagged} flagged harmful.</p>"
    )


# ------------------------------------------------------------------------- demo report


def demo_table_rows(results: dict) -> list[list]:
    """Rows of the demo's result table (method, trajectories selected, held-out success mean ±
    std, per seed, paired difference vs random with p, expert-step agreement): the same rows
    in the HTML report and at the end of the terminal run (80 columns wide)."""
    tests = results.get("paired_tests", {})
    rows = []
    for name, r in results["methods"].items():
        t = tests.get(f"{name} vs random")
        p = None if not t else t.get("p_value")
        vs = "–" if not t else f"{t['mean_diff']:+.3f} (p {'–' if p is None else fmt_p(p)})"
        rows.append(
            [
                name,
                r.get("n_selected"),
                f"{r['success_rate_mean']:.3f}±{r['success_rate_std']:.3f}",
                " ".join(f"{x:.2f}" for x in r["per_seed"]),
                vs,
                f"{r.get('step_agreement_mean', float('nan')):.3f}",
            ]
        )
    return rows


DEMO_HEADER = ("method", "n", "success±std", "per seed", "vs random", "agreement")


def demo_sentence(results: dict) -> str:
    """The demo's result in one sentence, from ``results.json``'s dict."""
    return result_sentence({m: r["per_seed"] for m, r in results["methods"].items()})


def pool_rows(pool: Sequence[Trajectory], target_families: Sequence[str]) -> list[list]:
    """Pool composition by source: count, labelled successes, share in target families."""
    fams = set(target_families)
    by: dict[str, list[Trajectory]] = {}
    for t in pool:
        by.setdefault("planted" if t.meta.get("planted") else str(t.source), []).append(t)
    rows = []
    for src, ts in sorted(by.items()):
        ok = sum(bool(t.success) for t in ts)
        in_target = sum(t.meta.get("family") in fams for t in ts)
        rows.append([src, len(ts), ok, ok / len(ts), in_target])
    ok = sum(bool(t.success) for t in pool)
    in_target = sum(t.meta.get("family") in fams for t in pool)
    rows.append([Raw("<b>all</b>"), len(pool), ok, ok / max(1, len(pool)), in_target])
    return rows


_DETECTION_LABELS = {
    "n_pool": "pool trajectories",
    "n_planted": "planted-harmful trajectories",
    "auroc_low_score": "AUROC: low trajectory score finds planted",
    "auroc_min_step": "AUROC: low minimum step score finds planted",
    "flagged": "flagged harmful",
    "flag_recall": "flag recall (planted flagged)",
    "flag_precision": "flag precision (flagged that are planted)",
}


def detection_rows(harm: Mapping) -> list[list]:
    """Rows (measure, value) of a harmful-detection dict."""
    return [[_DETECTION_LABELS.get(k, k), v] for k, v in harm.items()]


def selection_rows(results: dict) -> list[list]:
    """Per method: what it selected (families, sources, labelled successes) and the retrained
    agent's held-out success per target family, seeds joined by " / "
    (``results["methods"][m]["selected"]`` and ``["per_family"]``, one dict per seed)."""

    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))

    rows = []
    for name, r in results["methods"].items():
        sel = r.get("selected") or []
        if not sel:
            continue
        rows.append(
            [
                name,
                " / ".join(str(x["n"]) for x in sel),
                " / ".join(str(x["labelled_success"]) for x in sel),
                " / ".join(counts(x["families"]) for x in sel),
                " / ".join(counts(x["sources"]) for x in sel),
                " / ".join(
                    ", ".join(f"{f} {v:.2f}" for f, v in fam.items())
                    for fam in r.get("per_family") or []
                ),
            ]
        )
    return rows


def _paired_section(tests: Mapping[str, dict]) -> list[str]:
    """Influence's comparisons in a table; the baselines against each other folded below."""
    mine = {k: v for k, v in tests.items() if k.startswith("influence")}
    rest = {k: v for k, v in tests.items() if k not in mine}
    cap = "held-out success, {} minus the baseline, paired by seed"
    out = [html_table(PAIRED_HEADER, paired_rows(mine), caption=cap.format("influence"))]
    if rest:
        out.append(
            f"<details><summary>the other {len(rest)} comparisons</summary>"
            + html_table(PAIRED_HEADER, paired_rows(rest), caption=cap.format("each method"))
            + "</details>"
        )
    return out


def write_demo_report(
    results: dict,
    scores: pd.DataFrame,
    step_scores: pd.DataFrame,
    pool: Sequence[Trajectory],
    out: str | Path,
    *,
    tokenizer=None,
) -> Path:
    """The demo's report: the result sentence, success by method, paired tests, pool,
    harmful detection with its ROC, and the score report (with the action mask when a
    ``tokenizer`` is given)."""
    planted = [bool(t.meta.get("planted")) for t in pool]
    shown = scores.set_index("id").loc[[t.id for t in pool]].reset_index()
    shown["source"] = [
        "planted" if p else str(s) for p, s in zip(planted, shown["source"], strict=True)
    ]
    setup = (
        f"env <b>{html.escape(str(results['env']))}</b>, budget {results['budget']:.0%} of the "
        f"pool, {results['seeds']} seeds, target families "
        f"{html.escape(', '.join(results['target_families']))}; base agent success "
        f"{results.get('base_success_rate', float('nan')):.3f} before any selection. Runtime "
        f"{results['runtime_s']['total_s']:.0f} s wall"
        + (
            f", {results['runtime_s']['cpu_s']:.0f} s CPU."
            if "cpu_s" in results["runtime_s"]
            else "."
        )
    )
    body = [
        f"<p class='lead'>{html.escape(demo_sentence(results))}</p>",
        f"<p>{setup} Every method fine-tunes the same base agent for the same optimizer steps "
        "on its selection; success is greedy on held-out tasks of the target families. "
        "<i>task-random</i> and <i>task-success</i> draw only from the target families' pool "
        "trajectories: what the task labels alone can do.</p>",
        "<h2>Success of the retrained agent by selection method</h2>",
        "<div class='row'>",
        figure_html(success_bars(results["methods"], base=results.get("base_success_rate"))),
        html_table(DEMO_HEADER, demo_table_rows(results)),
        "</div>",
        "<h2>Paired tests</h2>",
        *_paired_section(results.get("paired_tests", {})),
        "<h2>What each method selected</h2>",
        html_table(
            ("method", "selected", "labelled success", "families", "sources", "success by family"),
            selection_rows(results),
            caption="seeds separated by / (the target families are "
            + ", ".join(results["target_families"])
            + ")",
        ),
        "<h2>Pool composition</h2>",
        html_table(
            ("source", "trajectories", "labelled success", "success rate", "in target families"),
            pool_rows(pool, results["target_families"]),
        ),
        "<h2>Planted-harmful detection</h2>",
    ]
    harm = results.get("harmful_detection", {})
    det = html_table(("measure", "value"), detection_rows(harm))
    if any(planted) and not all(planted):
        body += ["<div class='row'>", det, figure_html(harmful_roc(shown, planted)), "</div>"]
    else:
        body += [
            det,
            "<p>No planted-harmful trajectories in this pool (the environment has no "
            "re-planning expert to plant a wrong rule), so there is no ROC.</p>",
        ]
    body += score_report_body(shown, step_scores, pool, tokenizer=tokenizer)
    write_html(page("trajinf demo", body), out)
    return Path(out)
