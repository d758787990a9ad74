"""Scorers, task files and the paper's metrics against hand-computed values."""
import json

import pytest

from transplant_core.errors import InvalidArgument, NotFound
from transplant_core.metrics import bootstrap_ci, recovery, retention, tir
from transplant_core.tasks import extract_boxed, load_task, score


@pytest.mark.parametrize("out,answer,scorer,ok", [
    ("19", "19", "exact", True), ("  19 ", "19", "exact", True), ("190", "19", "exact", False),
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}", "boxed", True), ("19", "19", "boxed", False),
    ("the answer is 42.", "42", "contains", True), ("answer: 7", "7", r"regex:answer: (\d+)", True),
    ("answer: 8", "7", r"regex:answer: (\d+)", False), ("xyz", "", "regex:y", True),
])
def test_scorers(out, answer, scorer, ok):
    assert score(out, answer, scorer) is ok


def test_boxed_takes_the_last_balanced_box():
    assert extract_boxed("\\boxed{1} then \\boxed{{a}b}") == "{a}b"
    assert extract_boxed("\\boxed{unclosed") is None


def test_jsonl_task_and_its_errors(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n\n"
                    + json.dumps({"prompt": "q", "answer": "b", "scorer": "contains"}) + "\n")
    t = load_task(str(good))
    assert len(t) == 2 and t.examples[1].scorer == "contains"
    cases = {
        '{"prompt": "p"}\n': "line 1.*answer",
        '{"prompt": "p", "answer": "a"}\nnot json\n': "t2.jsonl:2: not valid JSON",
        '{"prompt": "p", "answer": "a", "scorer": "fuzzy"}\n': "unknown scorer 'fuzzy'",
        '{"prompt": "p", "answer": "a", "scorer": "regex:("}\n': "invalid regular expression",
        '': "no examples",
    }
    for body, msg in cases.items():
        bad = tmp_path / "t2.jsonl"
        bad.write_text(body)
        with pytest.raises(InvalidArgument, match=msg.replace("line 1", "t2.jsonl:1")):
            load_task(str(bad))
    with pytest.raises(NotFound):
        load_task(str(tmp_path / "missing.jsonl"))


def test_metrics_hand_computed():
    assert tir(0.12, 0.06) == pytest.approx(2.0)
    assert tir(0.5, 0.0) is None
    assert recovery(0.12, 0.06, 0.08) == pytest.approx(300.0)       # the paper's Phi-3 row at 32 tokens
    assert recovery(0.36, 0.34, 0.34) is None                       # baselines tie: undefined
    assert recovery(0.10, 0.06, 0.22) == pytest.approx(25.0)
    assert retention(0.9, 1.0) == pytest.approx(0.9) and retention(0.3, 0.0) is None


def test_bootstrap_interval():
    lo, hi = bootstrap_ci([True] * 50 + [False] * 50, n_boot=4000, seed=1)
    # normal approximation: 0.5 +- 1.96 * 0.05
    assert 0.38 < lo < 0.42 and 0.58 < hi < 0.62
    assert bootstrap_ci([True] * 10) == (1.0, 1.0)


def test_paired_drop():
    from transplant_core.metrics import paired_drop

    before = [True] * 60 + [False] * 4
    sure = [False] * 40 + [True] * 20 + [False] * 4            # 40 of 60 lost: a real drop
    drop, lower = paired_drop(before, sure)
    assert drop == pytest.approx(40 / 64) and lower > 0.45
    noisy = [False] * 2 + [True] * 58 + [True] * 2 + [False] * 2   # 2 lost, 2 gained
    drop, lower = paired_drop(before, noisy)
    assert drop == 0 and lower < 0
    with pytest.raises(ValueError):
        paired_drop([True], [True, False])
