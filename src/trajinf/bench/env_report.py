"""``bench.html``: the environment benchmark's tables and plots (one page, images inline)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from trajinf.report import (  # report selects Agg
    Raw,
    figure_html,
    html_table,
    page,
    plt,
    result_sentence,
    write_html,
)


def _fmt(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _p(test) -> str:
    if not test:
        return "–"
    p = test.get("p_value")
    return f"{test['mean_diff']:+.3f} (p={_fmt(p)})"


def _counts(d) -> str:
    """``{"expert": 12, "noisy": 3}`` as "expert 12, noisy 3"."""
    if not isinstance(d, dict):
        return str(d)
    return ", ".join(f"{k} {v}" for k, v in d.items())


def pool_table(summary: dict) -> str:
    """A scenario's pool composition (``summarize_pool``'s dict) as a table; scalar entries
    (e.g. the target's success rate) become rows of their own."""
    rows, extra = [], []
    for src, d in summary.items():
        if isinstance(d, dict) and "n" in d:
            ok = d.get("labelled_success", 0)
            rows.append([src, d["n"], ok, ok / max(1, d["n"])])
        else:
            extra.append([src, d if isinstance(d, int | float) else _counts(d)])
    n = sum(r[1] for r in rows)
    ok = sum(r[2] for r in rows)
    rows.append([Raw("<b>all</b>"), n, ok, ok / max(1, n)])
    out = html_table(("source", "trajectories", "labelled success", "success rate"), rows)
    if extra:
        out += html_table(("pool property", "value"), extra)
    return out


def scenario_sentences(results: dict) -> list[str]:
    """One sentence per environment and scenario (at the headline budget): which method
    won, by how much, with what p-value (``report.result_sentence``)."""
    head = results["config"].get("headline", 0.1)
    out = []
    for env, r in results["envs"].items():
        for scn in r["scenarios"]:
            per_seed = {
                e["method"]: e["success_per_seed"]
                for e in r["summary"].values()
                if e["scenario"] == scn and (e["budget"] == head or e["method"] == "full")
            }
            if per_seed:
                out.append(f"{env} / {scn}: {result_sentence(per_seed, subject='inf')}")
    return out


HEADLINE_HEADER = ("env", "scenario", "method", "n", "success±std", "per seed", "vs random")


def headline_rows(results: dict) -> list[list[str]]:
    """The retrained cells at the headline budget (and full), one row each: what the
    terminal prints at the end of ``trajinf bench`` above the sentences."""
    head = results["config"].get("headline", 0.1)
    rows = []
    for env, r in results["envs"].items():
        for e in r["summary"].values():
            if e["budget"] != head and e["method"] != "full":
                continue
            t = e["paired"].get("random")
            p = None if not t else t.get("p_value")
            vs = "–" if not t else f"{t['mean_diff']:+.3f} (p {_fmt(p)})"
            rows.append(
                [
                    env,
                    e["scenario"],
                    e["method"],
                    str(e["n_selected"]),
                    f"{e['success_mean']:.3f}±{e['success_std']:.3f}",
                    " ".join(f"{x:.2f}" for x in e["success_per_seed"]),
                    vs,
                ]
            )
    return rows


def summary_table(summary: dict) -> str:
    """Rows: scenario, method, budget, selected, success, agreement, vs random, vs full."""
    head = (
        "<tr><th>scenario</th><th>method</th><th>budget</th><th>selected</th><th>success "
        "mean ± std (per seed)</th><th>expert-step agreement</th><th>vs random</th>"
        "<th>vs full</th></tr>"
    )
    rows = []
    for e in summary.values():
        seeds = ", ".join(f"{s:.2f}" for s in e["success_per_seed"])
        rows.append(
            f"<tr><td>{e['scenario']}</td><td>{html.escape(e['method'])}</td>"
            f"<td>{e['budget']:g}</td><td>{e['n_selected']}</td>"
            f"<td>{e['success_mean']:.3f} ± {e['success_std']:.3f} ({seeds})</td>"
            f"<td>{e['agreement_mean']:.3f} ± {e['agreement_std']:.3f}</td>"
            f"<td>{_p(e['paired'].get('random'))}</td><td>{_p(e['paired'].get('full'))}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def variants_table(scenarios: dict) -> str:
    """Per scenario and scoring variant: cost and detection / localization AUROC."""
    head = (
        "<tr><th>scenario</th><th>variant</th><th>score s</th><th>cost (epochs)</th>"
        "<th>planted AUROC (low score / min step)</th><th>bad-step AUROC pooled / within</th>"
        "<th>one-bad-step top-1 (chance)</th><th>top of budget by source</th></tr>"
    )
    rows = []
    for scn, r in scenarios.items():
        for v, d in r["variants"].items():
            h, b = d["harmful"], d["bad_step"]
            rows.append(
                f"<tr><td>{scn}</td><td>{v}</td><td>{d['seconds']:.1f}</td>"
                f"<td>{d['cost_epochs']:.2f}</td>"
                f"<td>{_fmt(h.get('auroc_low_score'))} / {_fmt(h.get('auroc_min_step'))}</td>"
                f"<td>{_fmt(b.get('auroc_pooled'))} / {_fmt(b.get('auroc_within_mean'))}</td>"
                f"<td>{_fmt(b.get('one_bad_step_top1'))} ({_fmt(b.get('one_bad_step_top1_chance'))})</td>"
                f"<td>{html.escape(_counts(d['top_sources']))}</td></tr>"
            )
    return f"<table>{head}{''.join(rows)}</table>"


def lds_table(lds: dict | None) -> str:
    """LDS per method (mean over target subtasks ± standard error)."""
    if not lds:
        return "<p>LDS not run for this environment.</p>"
    rows = "".join(
        f"<tr><td>{m}</td><td>{_fmt(d['lds'])}</td><td>{_fmt(d['se'])}</td>"
        f"<td>{', '.join(_fmt(x) for x in d['per_query'])}</td></tr>"
        for m, d in lds["methods"].items()
    )
    return (
        f"<p>{lds['n_models']} models on random 50 % subsets; queries: {lds['queries']}</p>"
        "<table><tr><th>method</th><th>LDS</th><th>s.e.</th><th>per query</th></tr>"
        f"{rows}</table>"
    )


def headline_plot(summary: dict, scenario: str, budget: float, title: str):
    """Bars of success (mean ± std, seeds as dots) of every method of one scenario + budget."""
    rows = [
        e
        for e in summary.values()
        if e["scenario"] == scenario and (e["budget"] == budget or e["method"] == "full")
    ]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(rows) + 2), 3.2))
    x = np.arange(len(rows))
    ax.bar(
        x,
        [e["success_mean"] for e in rows],
        yerr=[e["success_std"] for e in rows],
        color=["C0" if e["method"].startswith("inf") else "C7" for e in rows],
        capsize=3,
    )
    for i, e in enumerate(rows):
        ax.plot([i] * len(e["success_per_seed"]), e["success_per_seed"], "k.", ms=4)
    ax.plot([], [], "k.", ms=4, label="one seed")
    ax.legend(fontsize=7)
    ax.set_xticks(x, [e["method"] for e in rows], rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("selection method")
    ax.set_ylabel("held-out success")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def budget_plot(summary: dict, scenario: str, title: str):
    """Success vs budget for the methods run at several budgets."""
    by: dict[str, list] = {}
    for e in summary.values():
        if e["scenario"] == scenario and e["method"] != "full":
            by.setdefault(e["method"], []).append(e)
    by = {m: sorted(v, key=lambda e: e["budget"]) for m, v in by.items() if len(v) > 1}
    if not by:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3))
    for m, v in by.items():
        line = ax.errorbar(
            [e["budget"] for e in v],
            [e["success_mean"] for e in v],
            yerr=[e["success_std"] for e in v],
            marker="o",
            capsize=3,
            label=m,
        )
        for e in v:  # seeds as dots, in the line's colour
            seeds = e["success_per_seed"]
            ax.plot([e["budget"]] * len(seeds), seeds, ".", ms=4, color=line[0].get_color())
    ax.set_xlabel("budget (fraction of pool)")
    ax.set_ylabel("held-out success")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_bench_report(results: dict, path: str | Path) -> None:
    """Write the benchmark page from ``bench.json``'s dict."""
    sentences = scenario_sentences(results)
    body = [
        "<p class='lead'>" + "<br>".join(html.escape(s) for s in sentences) + "</p>"
        if sentences
        else "<p class='lead'>No retrained cells yet: nothing to compare.</p>",
        "<p>Every method retrains the same base agent for the same optimizer steps on its "
        "selection; success is measured on held-out target tasks at the headline budget "
        f"{results['config'].get('headline', 0.1):g}. Numbers are as measured.</p>",
    ]
    head = results["config"].get("headline", 0.1)
    for env, r in results["envs"].items():
        body.append(f"<h2>{env}</h2>")
        body.append(
            f"<p>target families {r['target_families']}; base agent success "
            f"{_fmt(r['base'].get('success_rate'))}, agreement "
            f"{_fmt(r['base'].get('step_agreement'))}; one training epoch over the mixed pool "
            f"{r['epoch_seconds']:.1f} s; runtime {r['runtime_s']:.0f} s</p>"
        )
        for scn in r["scenarios"]:
            body.append(f"<h3>{scn}</h3>" + pool_table(r["scenarios"][scn]["pool"]))
            for fig in (
                headline_plot(r["summary"], scn, head, f"{env} / {scn} / budget {head:g}"),
                budget_plot(r["summary"], scn, f"{env} / {scn}: success vs budget"),
            ):
                if fig is not None:
                    body.append(figure_html(fig))
        body.append("<h3>Retrained cells</h3>" + summary_table(r["summary"]))
        body.append(
            "<h3>Scoring variants: cost and detection</h3>" + variants_table(r["scenarios"])
        )
        body.append("<h3>Linear datamodeling score</h3>" + lds_table(r.get("lds")))
    write_html(page("trajinf bench", body), path)


def markdown_tables(results: dict) -> str:
    """``bench.md``: the same tables as bench.html in Markdown (what docs/benchmarks.md quotes)."""
    lines: list[str] = []
    for env, r in results["envs"].items():
        base = r["base"]
        lines += [
            f"### {env}",
            "",
            f"Target families {r['target_families']}; base agent success "
            f"{_fmt(base.get('success_rate'))}, expert-step agreement "
            f"{_fmt(base.get('step_agreement'))}; one training epoch over the mixed pool "
            f"{r['epoch_seconds']:.1f} s; this invocation ran {r['runtime_s']:.0f} s (finished cells, scores and models are reused).",
            "",
            "| scenario | method | budget | selected | success mean ± std | per seed | agreement | "
            "vs random | vs full |",
            "|---|---|---:|---:|---|---|---|---|---|",
        ]
        for e in r["summary"].values():
            seeds = ", ".join(f"{s:.2f}" for s in e["success_per_seed"])
            lines.append(
                f"| {e['scenario']} | {e['method']} | {e['budget']:g} | {e['n_selected']} | "
                f"{e['success_mean']:.3f} ± {e['success_std']:.3f} | {seeds} | "
                f"{e['agreement_mean']:.3f} ± {e['agreement_std']:.3f} | "
                f"{_p(e['paired'].get('random'))} | {_p(e['paired'].get('full'))} |"
            )
        lines += [
            "",
            "| scenario | variant / prior | seconds | cost (epochs) | planted AUROC low score / "
            "min step | bad-step AUROC pooled / within | one-bad-step top-1 (chance) | top of "
            "budget by source |",
            "|---|---|---:|---:|---|---|---|---|",
        ]
        for scn, d in r["scenarios"].items():
            rows = [(v, x) for v, x in d["variants"].items()]
            rows += [(f"prior:{p}", x) for p, x in (d.get("priors") or {}).items()]
            for v, x in rows:
                h, b = x["harmful"], x["bad_step"]
                cost = x.get("cost_epochs")
                lines.append(
                    f"| {scn} | {v} | {x['seconds']:.1f} | {_fmt(cost, 2)} | "
                    f"{_fmt(h.get('auroc_low_score'))} / {_fmt(h.get('auroc_min_step'))} | "
                    f"{_fmt(b.get('auroc_pooled'))} / {_fmt(b.get('auroc_within_mean'))} | "
                    f"{_fmt(b.get('one_bad_step_top1'))} ({_fmt(b.get('one_bad_step_top1_chance'))})"
                    f" | {_counts(x['top_sources'])} |"
                )
        lds_res = r.get("lds")
        if lds_res:
            lines += [
                "",
                f"LDS ({lds_res['n_models']} models on random 50 % subsets of the mixed pool; "
                f"queries = target families {lds_res['queries']}):",
                "",
                "| method | LDS | s.e. | per query |",
                "|---|---:|---:|---|",
            ]
            for m, d in lds_res["methods"].items():
                per = ", ".join(_fmt(x) for x in d["per_query"])
                lines.append(f"| {m} | {_fmt(d['lds'])} | {_fmt(d['se'])} | {per} |")
        mask = r.get("update_mask")
        if mask:
            lines += ["", "| mask threshold | density | Jaccard across seeds | chance Jaccard |"]
            lines.append("|---:|---:|---:|---:|")
            for thr, m in mask.items():
                lines.append(
                    f"| {thr} | {m['density_a']:.3f} | {m['jaccard']:.3f} | "
                    f"{m['chance_jaccard']:.3f} |"
                )
        lines.append("")
    return "\n".join(lines)
