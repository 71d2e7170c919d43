"""bench.html: tables instead of dict dumps, one sentence per scenario, seeds as dots."""

from __future__ import annotations

import numpy as np
from test_report import _parse, assert_no_json_pre

from trajinf.bench.env_report import scenario_sentences, write_bench_report
from trajinf.report import result_sentence


def _entry(method, budget, seeds):
    return {
        "scenario": "mixed",
        "method": method,
        "budget": budget,
        "n_selected": 5,
        "success_mean": float(np.mean(seeds)),
        "success_std": float(np.std(seeds, ddof=1)),
        "success_per_seed": seeds,
        "agreement_mean": 0.4,
        "agreement_std": 0.1,
        "paired": {},
    }


def _results():
    summary = {
        "a": _entry("inf", 0.1, [0.4, 0.5]),
        "b": _entry("random", 0.1, [0.1, 0.0]),
        "c": _entry("full", 1.0, [0.2, 0.1]),
        "d": _entry("inf", 0.25, [0.3, 0.35]),
        "e": _entry("random", 0.25, [0.2, 0.1]),
    }
    variant = {
        "seconds": 1.0,
        "cost_epochs": 0.5,
        "harmful": {"auroc_low_score": 0.7},
        "bad_step": {},
        "top_sources": {"expert": 4, "noisy": 1},
    }
    return {
        "config": {"headline": 0.1},
        "envs": {
            "builtin": {
                "target_families": ["cook"],
                "base": {"success_rate": 0.1, "step_agreement": 0.3},
                "epoch_seconds": 2.0,
                "runtime_s": 10.0,
                "scenarios": {
                    "mixed": {
                        "pool": {
                            "expert": {"n": 10, "labelled_success": 10},
                            "noisy": {"n": 20, "labelled_success": 5},
                            "target_success": 0.5,
                        },
                        "variants": {"inf": variant},
                    }
                },
                "summary": summary,
            }
        },
    }


def test_bench_report_has_tables_and_the_sentence(tmp_path):
    res = _results()
    (sentence,) = scenario_sentences(res)
    assert sentence == "builtin / mixed: " + result_sentence(
        {"inf": [0.4, 0.5], "random": [0.1, 0.0], "full": [0.2, 0.1]}, subject="inf"
    )
    write_bench_report(res, tmp_path / "bench.html")
    page = _parse(tmp_path / "bench.html")
    assert_no_json_pre(page)
    assert page.paragraphs[0] == sentence
    pool = next(t for t in page.tables if t and t[0][0] == "source")
    assert ["all", "30", "15", "0.500"] in pool
    text = (tmp_path / "bench.html").read_text()
    assert "{'expert'" not in text and "expert 4, noisy 1" in text


def test_bench_terminal_ends_with_the_table_and_sentences(capsys):
    from trajinf.bench.env_report import headline_rows
    from trajinf.cli.bench import _print_result

    res = _results()
    rows = headline_rows(res)
    assert [r[2] for r in rows] == ["inf", "random", "full"]  # budget 0.25 left out
    assert rows[0][4] == "0.450±0.071" and rows[0][5] == "0.40 0.50"
    _print_result(res)
    out = capsys.readouterr().out
    assert (
        out.split()[-len(scenario_sentences(res)[0].split()) :]
        == scenario_sentences(res)[0].split()
    )
