"""HTML pages of ``trajinf bench perf`` and ``trajinf bench peers`` (figures inline, base64 PNG)."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib.pyplot as plt

from trajinf.report import figure_html, page, write_html


def _table(rows: list[dict], cols: list[str], fmt: str = "{:.3g}") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)

    def cell(v: object) -> str:
        if isinstance(v, float):
            return fmt.format(v)
        return html.escape("" if v is None else str(v))

    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _extraction_fig(ex: dict):
    fig, ax = plt.subplots(figsize=(6, 2.6))
    names, vals = ["(a) train fwd+bwd", "(b) factorized per-step"], [1.0, ex["ratio_b_over_a"]]
    if ex.get("ratio_c_over_a"):
        names.append("(c) LESS mode")
        vals.append(ex["ratio_c_over_a"])
    ax.barh(names, vals, color=["#999", "#2b8cbe", "#e34a33"][: len(vals)])
    ax.axvline(1.3, ls="--", c="k", lw=0.8, label="goal for (b): 1.3x")
    ax.set_xlabel("time per token / training fwd+bwd")
    ax.legend(fontsize=8)
    return fig


def _scaling_fig(sc: dict):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    pool, ext = sc["pool_size"], sc["pool_size_extrapolated"]
    ax = axes[0]
    for key, c in (("train_s", "#999"), ("factorized_s", "#2b8cbe")):
        ax.plot([p["items"] for p in pool], [p[key] for p in pool], "o-", c=c, label=key)
        ax.plot([e["items"] for e in ext], [e[key] for e in ext], "x--", c=c)
    ax.set(xscale="log", yscale="log", xlabel="pool items (x = extrapolated)", ylabel="seconds")
    ax.legend(fontsize=8)
    for ax, part, x, lab in (
        (axes[1], "seq_length", "tokens_per_item", "tokens per item"),
        (axes[2], "width", "hidden", "hidden size"),
    ):
        pts = sc[part]
        ax.plot([p[x] for p in pts], [p["train_tokens_per_s"] for p in pts], "o-", c="#999",
                label="train fwd+bwd")  # fmt: skip
        ax.plot([p[x] for p in pts], [p["factorized_tokens_per_s"] for p in pts], "o-",
                c="#2b8cbe", label="factorized")  # fmt: skip
        ax.set(xscale="log", xlabel=lab, ylabel="tokens/s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _scoring_fig(sco: dict):
    fig, ax = plt.subplots(figsize=(6, 3))
    dirs = [r["directions"] for r in sco["rows"]]
    keys = ["raw_eff"] + [f"chunked_{c}_eff" for c in sco["chunks"]] + ["streaming_store_eff"]
    for k in keys:
        ax.plot(dirs, [100 * r[k] for r in sco["rows"]], "o-", label=k.replace("_eff", ""))
    ax.axhline(50, ls="--", c="k", lw=0.8, label="goal 50 %")
    ax.set(xscale="log", xlabel="target directions", ylabel="% of measured GEMM rate")
    ax.legend(fontsize=7)
    return fig


def _rss_fig(rss: list[dict]):
    fig, ax = plt.subplots(figsize=(6, 3))
    n = [r["rows"] for r in rss]
    for mode, c in (("features", "#2b8cbe"), ("top_k", "#e34a33")):
        ax.plot(
            n, [r[f"{mode}_peak_rss_mb"] for r in rss], "o-", c=c, label=f"{mode} peak RSS (VmHWM)"
        )
        ax.plot(n, [r[f"{mode}_peak_anon_mb"] for r in rss], "s--", c=c,
                label=f"{mode} peak anonymous")  # fmt: skip
    ax.set(xscale="log", xlabel="feature rows in the store", ylabel="MiB")
    ax.legend(fontsize=7)
    return fig


def write_perf_html(res: dict, path: Path) -> None:
    """The perf page: machine, then one section per measurement with its table and plot."""
    m, ex = res["machine"], res["extraction"]
    body = [
        f"<p>{html.escape(res['date'])} · {html.escape(str(m['cpu']))} · {m['cores']} cores · "
        f"torch {html.escape(m['torch'])} ({m['torch_threads']} thread) · "
        f"load {m['load_avg_1m']:.2f} · quick={res['quick']} · {res['seconds']:.0f} s</p>",
        "<h2>Extraction vs a training step</h2>",
        _table(
            [
                {"stage": "(a) train fwd+bwd", **ex["a_train_fwd_bwd"], "ratio": 1.0},
                {"stage": "(b) factorized", **ex["b_factorized"], "ratio": ex["ratio_b_over_a"]},
                {"stage": "(c) LESS (LoRA)", **ex["c_less_lora"], "ratio": ex["ratio_c_over_a"]},
            ],
            ["stage", "seconds", "tokens_per_s", "ratio"],
        ),
        figure_html(_extraction_fig(ex)),
        "<h2>Scaling</h2><p>Pool sizes above the measured points are a linear fit (dashed, x).</p>",
        figure_html(_scaling_fig(res["scaling"])),
        _table(
            res["scaling"]["seq_length"] + res["scaling"]["width"],
            ["params", "hidden", "items", "tokens_per_item", "train_s", "factorized_s", "ratio"],
        ),
        "<h2>Scoring throughput vs GEMM rate</h2>",
        f"<p>Measured GEMM rate (fp32, 1 thread): {res['scoring']['gemm_flops'] / 1e9:.1f} "
        f"GFLOP/s; pool {res['scoring']['n_rows']} x D {res['scoring']['dim']}.</p>",
        figure_html(_scoring_fig(res["scoring"])),
        "<h2>Peak memory of scoring as the pool grows</h2>",
        figure_html(_rss_fig(res["rss"])),
        _table(res["rss"], list(res["rss"][0].keys())),
        "<h2>Store bytes per item</h2>",
        _table([res["store_bytes"]], list(res["store_bytes"].keys())),
        "<h2>fp16 vs fp32 feature storage</h2>",
        _table([res["fp16"]], list(res["fp16"].keys()), fmt="{:.5g}"),
    ]
    write_html(page("trajinf bench perf", body), path)


def _peers_fig(rows: list[dict]):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if "error" in r or r.get("total_over_epoch") is None or r["fit_seconds"] == 0:
            continue
        c = "#2b8cbe" if r["method"].startswith("trajinf") else "#777"
        ax.errorbar(r["total_over_epoch"], r["lds"], yerr=r["lds_se"], fmt="o", c=c)
        ax.annotate(r["method"], (r["total_over_epoch"], r["lds"]), fontsize=6,
                    xytext=(3, 2), textcoords="offset points")  # fmt: skip
    ax.set(xscale="log", xlabel="(featurize + score) / one training epoch", ylabel="LDS")
    return fig


def write_peers_html(res: dict, path: Path) -> None:
    """The peers page: ground-truth strength, the method table, a time-vs-LDS scatter."""
    gt = res["ground_truth"]
    rows = res["peers"]["rows"]
    body = [
        f"<p>{html.escape(res['date'])} · {html.escape(str(res['machine']['cpu']))}</p>",
        "<h2>Ground truth</h2>",
        _table(
            [
                {
                    "n_models": gt["n_models"],
                    "n_train": gt["n_train"],
                    "n_query": gt["n_query"],
                    "exact grad-dot LDS": gt["exact_grad_dot_all_params"]["lds"],
                    "exact (block linears)": gt["exact_grad_dot_block_linears"]["lds"],
                    "skill oracle": gt["skill_oracle"]["lds"],
                    "epoch s": gt["epoch_seconds"],
                }
            ],
            [
                "n_models",
                "n_train",
                "n_query",
                "exact grad-dot LDS",
                "exact (block linears)",
                "skill oracle",
                "epoch s",
            ],
        ),  # fmt: skip
        "<h2>Methods</h2>",
        _table(
            [r if "error" not in r else {"method": r["method"], "error": r["error"]} for r in rows],
            [
                "method",
                "fit_seconds",
                "score_seconds",
                "total_over_epoch",
                "lds",
                "lds_se",
                "rank_agreement",
                "error",
            ],
        ),  # fmt: skip
        figure_html(_peers_fig(rows)),
    ]
    write_html(page("trajinf bench peers", body), path)
