"""Reports: the one-sentence result, HTML tables instead of JSON, bad steps, the action mask."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from trajinf.data.tokenize import tokenize_trajectory
from trajinf.envs.builtin import ToolWorld
from trajinf.envs.policies import ExpertPolicy, NoisyExpertPolicy
from trajinf.envs.rollout import rollout
from trajinf.report import (
    fmt_p,
    html_table,
    known_bad_steps,
    result_sentence,
    write_demo_report,
    write_score_report,
)


class _Page(HTMLParser):
    """Collects <pre> texts, tables (as rows of cell texts) and <p> texts of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.pre: list[str] = []
        self.paragraphs: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.spans: list[tuple[str, str]] = []  # (class, text) of token spans
        self._stack: list[tuple[str, str]] = []
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        cls = dict(attrs).get("class") or ""
        self._stack.append((tag, cls))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        if tag in ("pre", "p", "td", "th", "span"):
            self._text = []

    def handle_endtag(self, tag):
        tag_open, cls = self._stack.pop() if self._stack else (tag, "")
        text = "".join(self._text)
        if tag == "pre":
            self.pre.append(text)
        elif tag == "p":
            self.paragraphs.append(text)
        elif tag in ("td", "th") and self.tables and self.tables[-1]:
            self.tables[-1][-1].append(text)
        elif tag == "span" and "tok" in cls:
            self.spans.append((cls, text))

    def handle_data(self, data):
        self._text.append(data)


def _parse(path) -> _Page:
    p = _Page()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def assert_no_json_pre(page: _Page) -> None:
    """Fail on any <pre> whose text parses as JSON (a raw dump instead of a table)."""
    for text in page.pre:
        try:
            json.loads(text)
        except ValueError:
            continue
        raise AssertionError(f"report has a raw JSON block: {text[:200]}")


# ---------------------------------------------------------------- the one sentence


def test_sentence_names_winner_margin_and_the_paired_p_value():
    per_seed = {
        "influence": [0.50, 0.45, 0.60],
        "random": [0.10, 0.20, 0.15],
        "task-success": [0.30, 0.35, 0.20],
        "full": [0.0, 0.05, 0.0],
    }
    s = result_sentence(per_seed)
    p = stats.ttest_rel(per_seed["influence"], per_seed["task-success"]).pvalue
    assert s.startswith("influence won with 0.517 held-out success against 0.283")
    assert "task-success (+0.233" in s
    assert f"p = {p:.3f}" in s
    assert "ahead on 3 of 3 seeds" in s
    assert ("not significant" in s) == (p >= 0.05)


def test_sentence_when_a_baseline_wins_says_where_influence_stands():
    s = result_sentence({"influence": [0.2, 0.3], "rds": [0.4, 0.5], "random": [0.0, 0.1]})
    assert s.startswith("rds won with 0.450")
    assert "next best, influence (+0.200" in s
    assert "undefined" in s  # the same +0.2 on both seeds: no t-test
    assert "rank" not in s  # influence is the runner-up, already named


def test_sentence_when_nothing_won():
    s = result_sentence({"influence": [0.0, 0.0], "random": [0.0, 0.0], "full": [0.0, 0.0]})
    assert s.startswith("No method won")
    assert "0.000" in s
    tie = result_sentence({"influence": [0.1, 0.3], "random": [0.3, 0.1]})
    assert tie.startswith("No method won")
    top = result_sentence({"influence": [0.5, 0.3], "rds": [0.3, 0.5], "random": [0.0, 0.1]})
    assert top.startswith("No single method won: influence, rds tied at 0.400")


def test_sentence_methods_equal_on_every_seed_win_together():
    per_seed = {
        "influence-drop-harmful": [0.5, 0.375, 0.6875],
        "influence": [0.5, 0.375, 0.6875],
        "rds": [0.3125, 0.375, 0.375],
        "random": [0.0, 0.0, 0.0],
    }
    s = result_sentence(per_seed)
    p = stats.ttest_rel(per_seed["influence"], per_seed["rds"]).pvalue
    assert s.startswith(
        "influence (and influence-drop-harmful: the same on every seed) won with 0.521 held-out "
        "success against 0.354 for the next best, rds (+0.167, ahead on 2 of 3 seeds; "
        f"paired t-test p = {p:.3f}"
    )


def test_fmt_p_and_table_escape():
    assert fmt_p(None).startswith("undefined")
    assert fmt_p(0.0312) == "0.031"
    t = html_table(("a", "b"), [["<x>", 0.5]])
    assert "&lt;x&gt;" in t and "0.500" in t


# ---------------------------------------------------------------- the demo report


@pytest.fixture(scope="module")
def small_pool():
    env = ToolWorld()
    tasks = env.tasks("train", 6, 0)
    expert = rollout(env, tasks, ExpertPolicy(), source="expert", seed=0)
    noisy = rollout(env, tasks, NoisyExpertPolicy(0.6), source="noisy", seed=1, id_prefix="n")
    pool = expert + noisy
    assert any(known_bad_steps(t) for t in noisy)  # the fixture must hold bad steps
    return pool


def _scores(pool):
    rng = np.random.default_rng(0)
    scores = pd.DataFrame(
        {
            "id": [t.id for t in pool],
            "score": rng.normal(size=len(pool)),
            "source": [t.source for t in pool],
            "success": [t.success for t in pool],
            "harmful": [False] * len(pool),
        }
    )
    rows = [(t.id, k, float(rng.normal())) for t in pool for k in range(len(t.steps()))]
    return scores, pd.DataFrame(rows, columns=["id", "step", "score"])


def _results(pool):
    methods = {
        "influence": [0.5, 0.4],
        "random": [0.1, 0.2],
        "task-random": [0.2, 0.2],
        "full": [0.0, 0.1],
    }
    from trajinf.loop.steps import paired_tests

    return {
        "env": "builtin",
        "budget": 0.1,
        "seeds": 2,
        "target_families": ["cook", "unlock"],
        "pool": {"expert": {"n": 6, "labelled_success": 6}},
        "base_success_rate": 0.05,
        "base_step_agreement": 0.3,
        "methods": {
            m: {
                "success_rate_mean": float(np.mean(v)),
                "success_rate_std": float(np.std(v, ddof=1)),
                "per_seed": v,
                "per_family": [{"cook": 0.5, "unlock": 0.25}] * 2,
                "step_agreement_mean": 0.5,
                "step_agreement_std": 0.1,
                "n_selected": 3,
                "selected": [
                    {
                        "families": {"cook": 2, "unlock": 1},
                        "sources": {"expert": 3},
                        "labelled_success": 3,
                        "n": 3,
                    },
                    {
                        "families": {"cook": 3},
                        "sources": {"noisy": 3},
                        "labelled_success": 1,
                        "n": 3,
                    },
                ],
            }
            for m, v in methods.items()
        },
        "paired_tests": paired_tests(methods, against=("random", "task-random", "full")),
        "harmful_detection": {"n_planted": 0, "n_pool": len(pool)},
        "runtime_s": {"total_s": 12.0},
    }


def test_demo_report_tables_sentence_bad_steps_and_action_mask(
    small_pool, chatml_tokenizer, tmp_path
):
    scores, steps = _scores(small_pool)
    results = _results(small_pool)
    path = write_demo_report(
        results, scores, steps, small_pool, tmp_path / "r.html", tokenizer=chatml_tokenizer
    )
    page = _parse(path)
    assert_no_json_pre(page)
    # the first paragraph is the computed sentence
    assert page.paragraphs[0] == result_sentence(
        {m: r["per_seed"] for m, r in results["methods"].items()}
    )
    assert page.paragraphs[0].startswith("influence won with 0.450")
    headers = [t[0] for t in page.tables if t]
    paired = next(t for t in page.tables if t and t[0][0] == "comparison")
    row = next(r for r in paired if r[0] == "influence vs random")
    assert row[1] == "+0.300" and row[3] == "2" and row[4] == "2 of 2"
    assert row[2] == fmt_p(stats.ttest_rel([0.5, 0.4], [0.1, 0.2]).pvalue)
    pool_table = next(t for t in page.tables if t and t[0][0] == "source")
    all_row = next(r for r in pool_table if r[0] == "all")
    assert all_row[1] == str(len(small_pool))
    assert ["measure", "value"] in headers
    chosen = next(t for t in page.tables if t and t[0][:2] == ["method", "selected"])
    assert [
        "influence",
        "3 / 3",
        "3 / 1",
        "cook 2, unlock 1 / cook 3",
        "expert 3 / noisy 3",
        "cook 0.50, unlock 0.25 / cook 0.50, unlock 0.25",
    ] in chosen
    html = path.read_text()
    assert "known bad step" in html  # bad steps highlighted in the per-step tables
    # the action mask: token spans whose green ones are exactly the mask of the top trajectory
    top = scores.sort_values("score", ascending=False)["id"].iloc[0]
    traj = next(t for t in small_pool if t.id == top)
    tok = tokenize_trajectory(traj, chatml_tokenizer)
    assert len(page.spans) == len(tok.input_ids)
    assert [("act" in c) for c, _ in page.spans] == tok.action_mask.tolist()
    acted = "".join(text for c, text in page.spans if "act" in c)
    for m in traj.messages:  # every action's text is in the green tokens, no observation is
        if m["role"] == "assistant" and m.get("content"):
            assert m["content"] in acted
    assert traj.messages[1]["content"][:20] not in acted


def test_the_json_detector_catches_a_raw_dump(tmp_path):
    p = tmp_path / "x.html"
    p.write_text('<html><body><pre>{"a": 1}</pre></body></html>')
    with pytest.raises(AssertionError, match="raw JSON"):
        assert_no_json_pre(_parse(p))


def test_score_report_has_a_first_sentence_and_no_json(small_pool, tmp_path):
    from trajinf.data.write import write_pool

    scores, steps = _scores(small_pool)
    d = tmp_path / "scores"
    d.mkdir()
    scores.to_parquet(d / "scores.parquet")
    steps.to_parquet(d / "step_scores.parquet")
    write_pool(small_pool, tmp_path / "pool.jsonl")
    path = write_score_report(d, tmp_path / "pool.jsonl", tmp_path / "r.html", top=3)
    page = _parse(path)
    assert_no_json_pre(page)
    assert re.match(rf"{len(small_pool)} trajectories scored; the top 10 %", page.paragraphs[0])
