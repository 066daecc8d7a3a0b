"""The recipe's task and gold judge: each constraint on crafted answers, the judge's arithmetic, the
generator's files (schemas, labels, no held-out prompt trained on, seeded), and `python salsa.py` end to
end on a tiny random-init model: every stage, results.md with its tables and plots, a rerun that skips."""
import json
import os
import random
import subprocess
import sys

import pytest
from conftest import ROOT, make_tiny

import salsa


@pytest.mark.parametrize("kind, value, answer, ok", [
    ("include", "quiet", "A quiet morning.", True),
    ("include", "quiet", "QUIET!", True),  # case-blind
    ("include", "quiet", "It was quietly done.", False),  # whole words only
    ("avoid", "people", "Many people came.", False),
    ("avoid", "people", "Peoples and persons.", True),
    ("max_words", "3", "one two three", True),
    ("max_words", "3", "one two three four", False),
    ("max_words", "3", "", False),  # an empty answer meets no length
    ("bullets", "3", "- a\n- b\n  - c", True),
    ("bullets", "3", "- a\n- b", False),
    ("bullets", "2", "- a\n-b\n* c\n- d", True),  # "-b" and "* c" are not bullets
    ("bullets", "2", "Intro.\n- a\n- b\nThe end.", True),
    ("lowercase", "", "all lower, 42.", True),
    ("lowercase", "", "Not lower.", False),
    ("lowercase", "", "123", False),  # no letters
    ("start", "Honestly", "Honestly, yes.", True),
    ("start", "Honestly", "**honestly** yes", True),
    ("start", "Honestly", "Yes, honestly.", False),
    ("start", "Honestly", "Honestlyyes", False),
    ("end", "the end", "Done. The end.", True),
    ("end", "the end", "done, the end!\n", True),
    ("end", "the end", "the end of it.", False),
    ("end", "the end", "bathe end.", False),
])
def test_each_constraint(kind, value, answer, ok):
    assert salsa.meets(kind, value, answer) is ok


def test_gold_score_is_the_fraction_met():
    prompt = ('Write about tea. Use the word "quiet". Answer in at most 5 words. Write only in lowercase letters.')
    assert salsa.constraints_of(prompt) == {"include": "quiet", "max_words": "5", "lowercase": ""}
    assert salsa.gold_score(prompt, "quiet tea.") == 1
    assert salsa.gold_score(prompt, "Quiet tea.") == pytest.approx(2 / 3)
    assert salsa.gold_score(prompt, "Tea is loud and hot, very hot.") == 0
    assert salsa.gold_score([{"role": "user", "content": prompt}], "quiet tea") == 1  # messages work too
    with pytest.raises(ValueError, match="not a task prompt"):
        salsa.gold_score("Write a haiku about rain.", "rain")


def test_prompts_state_what_the_judge_reads():
    rng = random.Random(1)
    for _ in range(300):
        prompt, topic, cons = salsa.task_prompt(rng)
        assert salsa.constraints_of(prompt) == cons and 1 <= len(cons) <= 3 and topic in prompt
        assert not ("bullets" in cons and ({"start", "max_words"} & set(cons)))  # one answer can meet them all
        assert salsa.gold_score(prompt, salsa.task_answer(rng, topic, cons, set(cons))) == 1
        assert salsa.gold_score(prompt, salsa.task_answer(rng, topic, cons, set())) < 1


def test_task_files(tmp_path, tok):
    salsa.make_task(str(tmp_path / "a"), 40, 40, 24, 16, seed=3)
    rows = {n: salsa.read_jsonl(tmp_path / "a" / f"{n}.jsonl") for n in ("sft", "prefs", "ppo", "eval")}
    assert [len(r) for r in rows.values()] == [40, 40, 24, 16]
    for i, r in enumerate(rows["sft"]):
        msgs = salsa.check_messages(r["messages"], f"row {i}")
        assert [m["role"] for m in msgs] == ["user", "assistant"] and salsa.gold_score(*[m["content"] for m in msgs]) == 1
        labels = salsa.tokenize_chat(tok, msgs, 256)[1]
        assert sum(x != -100 for x in labels) > 5  # fits --max-len 256 with its answer labelled
    for r in rows["prefs"]:
        assert r["chosen"][0] == r["rejected"][0] == {"role": "user", "content": r["prompt"]}
        assert salsa.gold_score(r["prompt"], r["chosen"][1]["content"]) > salsa.gold_score(r["prompt"], r["rejected"][1]["content"])
    prompts = {n: [r.get("prompt") or r["messages"][0]["content"] for r in v] for n, v in rows.items()}
    trained = set(prompts["sft"]) | set(prompts["prefs"]) | set(prompts["ppo"])
    assert not set(prompts["eval"]) & trained and sum(map(len, prompts.values())) == len(trained | set(prompts["eval"]))
    salsa.make_task(str(tmp_path / "b"), 40, 40, 24, 16, seed=3)
    salsa.make_task(str(tmp_path / "c"), 40, 40, 24, 16, seed=4)
    same = [(tmp_path / "a" / f).read_text() == (tmp_path / d / f).read_text() for d in "bc" for f in ("sft.jsonl", "eval.jsonl")]
    assert same == [True, True, False, False]


def test_recipe_end_to_end(tmp_path, tok):
    """`python salsa.py` with toy sizes: every stage, results.md, and a rerun that skips what is done."""
    pytest.importorskip("matplotlib")
    model = make_tiny(tmp_path / "tiny", tok)
    cmd = [sys.executable, str(ROOT / "salsa.py"), "--model", model, "--out", str(tmp_path / "r"),
           "--task-sizes", "16", "16", "16", "8", "--sft-steps", "2", "--rm-steps", "2", "--norm-samples", "4",
           "--ppo-steps", "1", "--max-new-tokens", "8", "--alphas", "0", "1", "--alpha-limit", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    r = tmp_path / "r"
    for stage in ("sft-seed1", "sft-seed2", "soup", "rm", "ppo", "salsa"):
        assert (r / stage / "config.json").exists(), stage
    assert "ppo.py --ref soup --soup" in res.stdout and "--init-kl-coef 0.01" in res.stdout  # printed, copyable
    md = (r / "results.md").read_text()
    for row in ("| salsa vs ppo |", "| salsa vs sft |", "| ppo vs sft |", "| salsa |", "| 0.00 |", "| sft-seed1 |"):
        assert row in md, row
    for png in ("alpha_line/alpha_line.png", "reward_hist/reward_hist.png"):
        assert (r / "results" / png).read_bytes()[:4] == b"\x89PNG"
    wins = (r / "results" / "wins.csv").read_text()
    assert "py:salsa:gold_score" in wins
    times = json.loads((r / "times.json").read_text())
    mtime = (r / "sft-seed1" / "model.safetensors").stat().st_mtime
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    # every stage up to the answers is skipped; answers, judge and reward-hist run again (they take seconds)
    assert again.stdout.count("skipped") == 8 and "$ " not in again.stdout.split("[answer")[0]
    assert (r / "sft-seed1" / "model.safetensors").stat().st_mtime == mtime
    assert json.loads((r / "times.json").read_text())["sft-seed1"] == times["sft-seed1"]


def test_full_scale_recipe_shape_under_torchrun(tmp_path, tok):
    """salsa.py's full-scale command (its docstring) on tiny models: torchrun on 2 ranks with every stage's
    default batch and micro-batch, the datasets given as files, one epoch per stage (--*-steps 0), and the
    API judge (a stub OpenAI-compatible server on loopback) on MT-Bench's two turns."""
    from test_eval import MT_BENCH, Stub, prefer_good, write_jsonl
    model = make_tiny(tmp_path / "tiny", tok)
    d = tmp_path / "data"
    d.mkdir()
    rng = random.Random(0)
    rows = [salsa.task_prompt(rng) for _ in range(33)]
    chat = lambda p, a: [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
    write_jsonl(d / "sft.jsonl", [{"messages": chat(p, salsa.task_answer(rng, t, c, set(c)))} for p, t, c in rows[:17]])
    write_jsonl(d / "prefs.jsonl", [{"prompt": p, "chosen": chat(p, salsa.task_answer(rng, t, c, set(c))),
                                     "rejected": chat(p, salsa.task_answer(rng, t, c, set()))} for p, t, c in rows])
    write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p, _, _ in rows[17:]])
    write_jsonl(d / "question.jsonl", MT_BENCH[:2])
    stub = Stub(prefer_good)
    cmd = [sys.executable, str(ROOT / "salsa.py"), "--model", model, "--out", str(tmp_path / "r"),
           "--launcher", f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2",
           "--sft-data", d / "sft.jsonl", "--prefs-data", d / "prefs.jsonl", "--prompts", d / "prompts.jsonl",
           "--questions", d / "question.jsonl", "--judge", "api", "--judge-url", stub.url, "--judge-model", "stub",
           "--max-len", 2048, "--sft-steps", 0, "--sft-lr", 2.5e-5, "--rm-steps", 0, "--rm-lr", 2e-5,
           "--norm-samples", 4, "--ppo-steps", 0, "--ppo-lr", 2e-6, "--max-new-tokens", 6,
           "--alphas", 0, 1, "--alpha-limit", 2]
    try:
        res = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=400,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        stub.server.shutdown()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = tmp_path / "r"
    # one epoch each: 16 of 17 SFT rows (one held out), 32 of 33 pairs, 16 prompts, at batch 8
    for stage, steps in (("sft-seed1", 2), ("rm", 4), ("ppo", 2), ("salsa", 2)):
        assert (r / stage / "config.json").exists(), stage
        assert json.loads((r / stage / "metrics.json").read_text())["step"] == steps, stage
    launched = [line for line in res.stdout.splitlines() if "] $ " in line and "torch.distributed.run" in line]
    assert [line.split("]")[0] for line in launched] == ["[sft-seed1", "[sft-seed2", "[reward", "[ppo", "[salsa"]
    import csv
    wins = list(csv.DictReader(open(r / "results" / "wins.csv")))
    assert len(wins) == 6 and {w["judge"] for w in wins} == {"stub"} and stub.requests  # 3 pairs, both views
    assert all(int(w["win"]) + int(w["loss"]) + int(w["tie"]) == 4 for w in wins)  # 2 questions x 2 turns each
    assert (r / "results.md").exists()


def test_recipe_refuses_unknown_ablation_before_any_work(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "salsa.py"), "--out", str(tmp_path / "r"), "--ablations", "mkl",
                          "dpo"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode != 0 and "expected some of gibberish, kl-hack, mkl, soup3" in res.stderr
    assert not (tmp_path / "r").exists()
