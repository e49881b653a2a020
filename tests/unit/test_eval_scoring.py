"""pass@k against values computed by hand, the stop rule for loops, problem files, and the resumable results file."""

import json
from math import comb

import pytest

from data_pipeline.tokenizer import ByteTokenizer
from pretrain.errors import UserError
from pretrain.evaluation.humaneval import pass_at_k, score
from pretrain.evaluation.problems import load_problems, program
from pretrain.evaluation.results import ResultsFile
from pretrain.inference.stopping import StopRules


def test_pass_at_k_by_hand():
    # n=5, c=2: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k([5], [2], 1) == pytest.approx(0.4)
    assert pass_at_k([5], [2], 2) == pytest.approx(0.7)
    # n=10, c=1: pass@10 = 1 (some sample always passes), pass@5 = 1 - C(9,5)/C(10,5) = 0.5
    assert pass_at_k([10], [1], 10) == pytest.approx(1.0)
    assert pass_at_k([10], [1], 5) == pytest.approx(0.5)
    assert pass_at_k([3], [0], 1) == 0.0 and pass_at_k([3], [3], 1) == 1.0
    # the mean over problems: (1 - C(2,2)/C(4,2)) and (1 - C(4,2)/C(4,2)) -> (5/6 + 0) / 2
    assert pass_at_k([4, 4], [2, 0], 2) == pytest.approx((1 - comb(2, 2) / comb(4, 2)) / 2)


def test_score_reports_only_the_k_the_samples_allow():
    rows = [{"task_id": t, "sample": s, "passed": p} for t, s, p in
            [("a", 0, True), ("a", 1, False), ("b", 0, False), ("b", 1, False)] + [("c", i, i < 5) for i in range(10)]]
    assert score(rows[:4], 2) == {"pass@1": pytest.approx(0.25)}
    # c alone: 5 of 10 pass; pass@10 draws all 10 samples, so one of them passes
    assert score(rows[4:], 10) == {"pass@1": pytest.approx(0.5), "pass@10": pytest.approx(1.0)}


def test_the_loop_rule_ends_runs_of_a_short_pattern():
    tok = ByteTokenizer()
    rules = StopRules(tok, max_new_tokens=200, loop_tokens=12)
    for text, reason in [("x = 1\n" + " " * 40, "loop"), ("ab" * 30, "loop"), ("def f(x):\n    return x + 1\n", None),
                         ("a_b_c_d_e_f_g_h_" * 3, None)]:  # period 16 is no short loop
        completion = rules.start()
        rules.extend(completion, tok.encode(text))
        assert completion.finish_reason == reason, text
    with pytest.raises(UserError, match="--stop-on-loop 4"):
        StopRules(tok, 10, loop_tokens=4)


def test_problem_files(tmp_path):
    good = tmp_path / "mine.jsonl"
    rows = [{"task_id": f"T/{i}", "prompt": f"def f{i}():\n", "test": "def check(f):\n    assert f() == 1\n",
             "entry_point": f"f{i}"} for i in range(3)]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_problems(str(good), limit=2)
    assert [p.task_id for p in problems] == ["T/0", "T/1"]
    assert program(problems[0], "    return 1") == "def f0():\n    return 1\ndef check(f):\n    assert f() == 1\n\ncheck(f0)\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:1: each line must be an object with string fields"):
        load_problems(str(bad))
    with pytest.raises(UserError, match="not found"):
        load_problems(str(tmp_path / "missing.jsonl"))


def test_the_results_file_resumes_and_drops_a_torn_last_line(tmp_path):
    settings = {"model": "m", "samples": 2}
    results = ResultsFile(tmp_path, settings)
    results.add({"task_id": "a", "sample": 0, "passed": True})
    results.add({"task_id": "a", "sample": 1, "passed": False})
    results.close()
    with open(tmp_path / "humaneval.jsonl", "a") as f:
        f.write('{"task_id": "b", "sam')  # killed mid-write
    again = ResultsFile(tmp_path, settings)
    assert again.done("a", 0) and again.done("a", 1) and not again.done("b", 0)
    again.add({"task_id": "b", "sample": 0, "passed": True})
    again.close()
    lines = (tmp_path / "humaneval.jsonl").read_text().splitlines()
    assert [json.loads(line)["task_id"] for line in lines] == ["a", "a", "b"]
    with pytest.raises(UserError, match="other settings \\(samples differ\\)"):
        ResultsFile(tmp_path, {"model": "m", "samples": 5})
