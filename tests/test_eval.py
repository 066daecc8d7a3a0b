"""eval.py: verdict parsing on judge-like replies, both-order aggregation and the win-rate arithmetic
against the paper's own rows, the judge client against a stub server on loopback (retries, Retry-After,
replies with no verdict, timeout, cache of verdicts only), answers on a tiny model (format, second turn,
resume), the alpha line's ends against its ingredients, and every command end to end with its table or plots."""
import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import ROOT, make_tiny
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import eval as ev
import salsa

ECHO = ('output your final verdict by strictly following this format: "[[A]]" if assistant A is better, '
        '"[[B]]" if assistant B is better, and "[[C]]" for a tie.')
MT_BENCH = [{"question_id": 81 + i, "category": "writing", "turns": [f"Write a haiku about {w}.", "Now make it rhyme."]}
            for i, w in enumerate(["rain", "tea", "snow"])]


def run(*argv, cwd=ROOT):
    res = subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, argv)], cwd=cwd, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "JUDGE_KEY": "sk-secret"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def fastchat_answers(path, model_id, answers: dict):
    return write_jsonl(path, [{"question_id": q, "model_id": model_id, "choices": [{"index": 0, "turns": t}]}
                              for q, t in answers.items()])


# ---------------------------------------------------------------- verdicts and win rates
@pytest.mark.parametrize("reply, verdict", [
    ("Assistant A answers both parts; B misses the second.\n\nFinal verdict: [[A]]", "A"),
    ("At first glance [[A]] looks right, but B is more accurate on the math. My final verdict is [[B]]", "B"),
    (f"As instructed, I {ECHO} Both responses are equally good.\n\n[[C]]", "C"),
    (f"I will {ECHO}\nHaving compared them, [[A]]", "A"),
    (f"Instructions recap: {ECHO}", "error"),  # only the echoed instructions: no verdict of its own
    ("Both are equally helpful. My final verdict: [[C]] for a tie.", "C"),  # not the echo: it is unquoted
    ("Final verdict: [[A]]\n\nIf assistant B had cited sources it would have won.", "A"),
    (f"I {ECHO.replace(chr(34), '“', 1)}\n[[B]]", "B"),  # a curly quote in the echo
    ("Both answers are fine, I cannot pick one.", "error"),
    ("Verdict: [[D]]", "error"),
    ("Verdict: [A]", "error"),
    ("", "error"),
])
def test_parse_verdict(reply, verdict):
    assert ev.parse_verdict(reply) == verdict


@pytest.mark.parametrize("ab, ba, outcome", [
    ("A", "B", "win"), ("B", "A", "loss"), ("C", "C", "tie"),
    ("A", "A", "tie"), ("B", "B", "tie"),  # position bias: inconsistent, so a tie
    ("A", "C", "tie"), ("C", "B", "tie"),
    ("A", "error", "error"), ("error", "B", "error"),
])
def test_both_orders(ab, ba, outcome):
    assert ev.pair_outcome(ab, ba) == outcome


# (win, loss, tie, win rate, adjusted win rate) as printed in the paper's Tables 2, 3, 4 and 5
PAPER_ROWS = [(29, 21, 110, 18.12, 52.50), (21, 29, 110, 13.12, 47.50), (102, 62, 335, 20.44, 54.01),
              (44, 91, 365, 8.80, 45.30), (477, 447, 1075, 23.86, 50.75), (42, 23, 95, 26.25, 55.94),
              (126, 69, 305, 25.20, 55.70), (14, 8, 138, 8.75, 51.88), (24, 19, 451, 4.86, 50.51),
              (69, 85, 340, 13.97, 48.38), (29, 20, 111, 18.13, 52.81)]


@pytest.mark.parametrize("win, loss, tie, wr, adj", PAPER_ROWS)
def test_win_rates_match_the_paper(win, loss, tie, wr, adj):
    outcomes = ["win"] * win + ["loss"] * loss + ["tie"] * tie + ["error"] * 3  # errors count in no rate
    s = ev.summary(outcomes, own(outcomes), n_boot=200, seed=0)
    assert (s["win"], s["loss"], s["tie"], s["error"]) == (win, loss, tie, 3)
    assert abs(s["win_rate"] - wr) <= 0.005 + 1e-9 and abs(s["adj_win_rate"] - adj) <= 0.005 + 1e-9
    assert s["ci_low"] < s["adj_win_rate"] < s["ci_high"]


# MT-Bench-sized rows (n = 160) whose adjusted win rate ends in 5 at the third decimal, so that float32
# rounding (x.mean() of a float32 tensor) printed them 1 off: 50.63, 54.37, 45.63
@pytest.mark.parametrize("win, loss, tie, adj", [(16, 14, 130, "50.62"), (20, 6, 134, "54.38"), (32, 46, 82, "45.62")])
def test_adjusted_win_rate_is_exact(win, loss, tie, adj):
    float32 = 100 * torch.tensor([1.0] * win + [0.5] * tie + [0.0] * loss).mean().item()
    assert f"{float32:.2f}" != adj == f"{100 * (win + tie / 2) / 160:.2f}"  # the row tells the two apart
    outcomes = ["win"] * win + ["loss"] * loss + ["tie"] * tie
    s = ev.summary(outcomes, own(outcomes), n_boot=10, seed=0)
    assert f"{s['adj_win_rate']:.2f}" == adj


def own(outcomes: list[str]) -> list[str]:
    """Every judgment its own question (one turn each, as on Arena-Hard)."""
    return [str(i) for i in range(len(outcomes))]


def test_bootstrap_interval():
    assert ev.summary(["win"] * 10, own("x" * 10), 100, 0)["ci_low"] == 100.0  # no spread, no interval
    x, y = ["win", "tie", "loss"] * 40, ["loss", "tie", "win"] * 40
    a, b = ev.summary(x, own(x), 500, 1), ev.summary(y, own(y), 500, 1)
    assert a["ci_low"] == pytest.approx(100 - b["ci_high"]) and a["ci_high"] == pytest.approx(100 - b["ci_low"])
    half_width = 100 * 1.96 * (1 / 6 / 120) ** 0.5  # normal approximation: outcomes 1, 1/2, 0 have variance 1/6
    assert a["ci_high"] - a["ci_low"] == pytest.approx(2 * half_width, rel=0.2)
    # a 95% interval, not a 90% one: of 3 questions (win, win, loss) every draw is the loss with probability
    # 1/27 = 3.7%, inside the lower 5% tail and outside the 2.5% one: the interval reaches 0
    s = ev.summary(["win", "win", "loss"], ["1", "2", "3"], 4000, 0)
    assert (s["ci_low"], s["ci_high"]) == (0.0, 100.0)


def test_bootstrap_resamples_questions_not_turns():
    """Two turns judged alike carry one question's evidence: the interval is that of the questions alone, exactly
    (each resample's ratio is the same), not the sqrt(2)-narrower one of 240 independent turns."""
    x = ["win", "tie", "loss"] * 40
    one_turn = ev.summary(x, own(x), 500, 1)
    two_alike = ev.summary([o for o in x for _ in range(2)], [q for q in own(x) for _ in range(2)], 500, 1)
    assert (two_alike["ci_low"], two_alike["ci_high"]) == pytest.approx((one_turn["ci_low"], one_turn["ci_high"]))
    assert two_alike["adj_win_rate"] == one_turn["adj_win_rate"] == 50.0
    as_turns = ev.summary([o for o in x for _ in range(2)], own(x * 2), 500, 1)  # the old, turn-level bootstrap
    width = {k: s["ci_high"] - s["ci_low"] for k, s in (("q", two_alike), ("t", as_turns))}
    assert width["t"] == pytest.approx(width["q"] / 2 ** 0.5, rel=0.2)
    # errors leave the count, and a question whose turns are all errors leaves the resampling
    s = ev.summary(["win", "error", "error", "error", "loss", "tie"], ["1", "1", "2", "2", "3", "3"], 200, 0)
    assert (s["error"], s["adj_win_rate"]) == (3, 50.0)  # (1 + 0 + 1/2) / 3
    # resamples of questions 1 (1 of 1) and 3 (1/2 of 2): 100, 50 or 25, never the 0 of question 3's loss alone
    assert (s["ci_low"], s["ci_high"]) == (25.0, 100.0)
    # each resample's rate counts turns (20 wins of one turn, 20 losses of four: 20 of 100), not the mean of its
    # questions' rates, which would centre the interval on 50
    s = ev.summary(["win"] * 20 + ["loss"] * 80, [f"w{i}" for i in range(20)] + [f"l{i // 4}" for i in range(80)], 2000, 0)
    assert s["adj_win_rate"] == 20.0 and s["ci_low"] < 20.0 < s["ci_high"] < 40.0


def test_judge_prompts_are_fastchats():
    t = {r["name"]: r for r in salsa.read_jsonl(ROOT / "data" / "judge_prompts.jsonl")}
    system, user = ev.judge_prompt(t, ["Q1", "Q2"], ["a1", "a2"], ["b1", "b2"], 0)
    assert system.startswith("Please act as an impartial judge") and ECHO in system
    assert user == ("[User Question]\nQ1\n\n[The Start of Assistant A's Answer]\na1\n[The End of Assistant A's Answer]"
                    "\n\n[The Start of Assistant B's Answer]\nb1\n[The End of Assistant B's Answer]")
    system, user = ev.judge_prompt(t, ["Q1", "Q2"], ["a1", "a2"], ["b1", "b2"], 1)
    assert "focus on who provides a better answer to the second user question" in system
    assert user.index("a1") < user.index("Q2") < user.index("a2") < user.index("b1") < user.index("b2")


# ---------------------------------------------------------------- the judge client
class Stub:
    """An OpenAI-compatible endpoint on 127.0.0.1: replies follow a script of (status, payload) or
    (status, payload, headers), then `default(user_prompt)`."""

    def __init__(self, default):
        self.script, self.default, self.requests = [], default, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, self.headers.get("Authorization"), body))
                status, payload, *headers = stub.script.pop(0) if stub.script else (200, stub.default(body["messages"][1]["content"]))
                if status == "sleep":
                    time.sleep(payload)
                    status, payload = 200, "too late"
                data = payload.encode() if isinstance(payload, str) else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": payload["text"]}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in dict(*headers).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def last_answer(user: str, who: str) -> str:
    if f"[The Start of Assistant {who}'s Answer]" in user:  # pair-v2
        return user.split(f"[The Start of Assistant {who}'s Answer]")[1].split("[The End")[0]
    return user.split(f"### Assistant {who}:")[2].split("<|The End")[0]  # pair-v2-multi-turn: the second answer


def prefer_good(user: str) -> dict:
    """A fair judge: picks the answer that says "good", whatever its position; "??" gets a reply with no verdict."""
    if "??" in user:
        return {"text": "I am not sure."}
    if "Assistant A" not in user:
        return {"text": "Comparing both. [[C]]"}
    a, b = ("good" in last_answer(user, who) for who in "AB")
    return {"text": f"Comparing both. [[{'A' if a > b else 'B' if b > a else 'C'}]]"}


@pytest.fixture
def stub():
    s = Stub(prefer_good)
    yield s
    s.server.shutdown()


def api_args(stub, tmp_path, **kw):
    return ev.Args(judge_url=stub.url, judge_model="stub-judge", judge_key_env="JUDGE_KEY", cache=str(tmp_path / "cache.jsonl"),
                   retries=2, timeout=0.5, concurrency=2, **kw)


def client(stub, key="sk-secret", retries=2):
    from openai import OpenAI
    return OpenAI(base_url=stub.url, api_key=key, timeout=0.5, max_retries=retries)


def test_api_success_retry_timeout(stub):
    assert ev.call_api(client(stub), "m", "sys", "good?", 2) == "Comparing both. [[C]]"
    path, auth, body = stub.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-secret" and body["temperature"] == 0
    assert body["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "good?"}]

    stub.script, n = [(500, "oops"), (429, "slow down")], len(stub.requests)
    assert ev.call_api(client(stub), "m", "sys", "x", 2) == "Comparing both. [[C]]"
    assert len(stub.requests) - n == 3  # two retries, then success

    stub.script, n = [("sleep", 1.0)] * 3, len(stub.requests)
    t0 = time.time()
    with pytest.raises(ev.JudgeError, match="3 tries"):
        ev.call_api(client(stub), "m", "sys", "x", 2)
    assert len(stub.requests) - n == 3 and time.time() - t0 < 6  # 3 x 0.5 s, then the client's backoff

    stub.script, n = [(401, "bad key")], len(stub.requests)
    with pytest.raises(RuntimeError, match="HTTP 401"):  # not retried, not counted: every request would fail
        ev.call_api(client(stub), "m", "sys", "x", 2)
    assert len(stub.requests) - n == 1


@pytest.mark.parametrize("reply, problem", [
    ("{not json", "malformed reply: '{not json'"),
    (json.dumps({"choices": []}), "malformed reply"),
    (json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]}), "malformed reply"),
    (json.dumps({"choices": [{"message": {"content": "I am not sure."}}]}), "no verdict: ...'I am not sure.'"),
    (json.dumps({"choices": [{"message": {"content": "At first [[A]] looks right, but"}, "finish_reason": "length"}]}),
     "cut at max_tokens (finish_reason length)"),
], ids=["malformed", "no choices", "null content", "no verdict", "cut at max_tokens"])
def test_api_retries_replies_without_a_verdict(stub, reply, problem):
    """Each is asked again (then the stub's default reply has a verdict); three of them spend --retries 2."""
    stub.script = [(200, reply)]
    assert ev.call_api(client(stub), "m", "sys", "x", 2) == "Comparing both. [[C]]" and len(stub.requests) == 2
    stub.script = [(200, reply)] * 3
    with pytest.raises(ev.JudgeError) as e:
        ev.call_api(client(stub), "m", "sys", "x", 2)
    assert f"gave up after 3 tries, last: {problem}" in str(e.value) and len(stub.requests) == 5


def test_api_honours_retry_after(stub):
    """The client waits as long as Retry-After says, not its own first backoff (0.5 s x jitter 0.75-1)."""
    stub.script, t0 = [(429, "slow down", {"Retry-After": "1.5"})], time.time()
    assert ev.call_api(client(stub), "m", "sys", "x", 2) == "Comparing both. [[C]]" and len(stub.requests) == 2
    assert time.time() - t0 >= 1.5


def test_cache_and_counted_errors(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-secret")
    args = api_args(stub, tmp_path)
    games = {("p", "q", str(i), 0): ("sys", f"question {i} good") for i in range(4)}
    games[("p", "q", "bad", 0)], games[("p", "q", "unsure", 0)] = ("sys", "malformed"), ("sys", "unsure")
    stub.default = lambda user: "{not json" if user == "malformed" else {"text": "Hmm." if user == "unsure" else "[[A]]"}
    replies = ev.judge_api(args, games)
    assert replies["p", "q", "bad", 0] is None and replies["p", "q", "unsure", 0] is None
    assert sum(r is None for r in replies.values()) == 2 and len(stub.requests) == 4 + 3 + 3  # --retries 2
    cached = salsa.read_jsonl(args.cache)
    assert len(cached) == 4 and all(ev.parse_verdict(r["judgment"]) == "A" for r in cached)  # only verdicts
    stub.default = lambda user: {"text": "[[A]]"}
    assert "sk-secret" not in Path(args.cache).read_text()
    n = len(stub.requests)
    again = ev.judge_api(args, games)  # the four answers are cached; the failed two are asked again
    assert len(stub.requests) == n + 2 and all(r == "[[A]]" for r in again.values())
    cached = salsa.read_jsonl(args.cache)
    cached[0]["judgment"], cached[1]["judgment"] = "I am not sure.", None  # as older runs cached them
    del cached[2]["url"]  # a row from before the url was recorded: taken as it is
    write_jsonl(args.cache, cached)
    assert ev.judge_api(args, games) == again and len(stub.requests) == n + 4  # not cached: asked again
    with open(args.cache, "a") as fh:
        fh.write('{"key": "cut by a cra')  # a run killed mid-write
    assert ev.judge_api(args, games) == again and len(stub.requests) == n + 4
    games["p", "q", "new", 1] = ("sys", "one more")
    ev.judge_api(args, games)
    assert ev.judge_api(args, games)["p", "q", "new", 1] == "[[A]]" and len(stub.requests) == n + 5
    # the same judge model name at another endpoint is another judge: asked again (but for the row without a url),
    # cached apart
    other = dataclasses.replace(args, judge_url=stub.url.replace("127.0.0.1", "localhost"))
    assert ev.judge_api(other, games) == ev.judge_api(args, games) and len(stub.requests) == n + 5 + 6
    same = dataclasses.replace(args, judge_url=stub.url + "/chat/completions/")  # the full URL names the same base
    assert ev.judge_api(same, games) == again | {("p", "q", "new", 1): "[[A]]"} and len(stub.requests) == n + 11
    rows = [json.loads(line) for line in Path(args.cache).read_text().splitlines() if "cut by a cra" not in line]
    assert {r.get("url") for r in rows} == {None, stub.url, other.judge_url}


def test_judge_api_without_openai_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # as if not installed (the device machines have none)
    args = ev.Args(judge_url="http://127.0.0.1:9", cache=str(tmp_path / "cache.jsonl"))
    with pytest.raises(salsa.InputError, match="--judge api needs the openai package: pip install openai"):
        ev.judge_api(args, {("p", "q", "1", 0): ("sys", "good?")})
    assert not (tmp_path / "cache.jsonl").exists()


def test_judge_api_end_to_end(stub, tmp_path):
    """Two MT-Bench questions x two turns, three models; "good" wins in either position, "??" is unjudgeable:
    asked twice (--retries 1), an error, never cached."""
    qs = write_jsonl(tmp_path / "question.jsonl", MT_BENCH[:2])
    a = fastchat_answers(tmp_path / "a.jsonl", "salsa", {81: ["good", "good"], 82: ["good", "fine"]})
    b = fastchat_answers(tmp_path / "b.jsonl", "ppo", {81: ["meh", "meh"], 82: ["meh", "?? meh"]})
    c = fastchat_answers(tmp_path / "c.jsonl", "sft", {81: ["bleh", "bleh"], 82: ["bleh", "bleh"]})
    flags = ["--questions", qs, "--answers", a, b, c, "--out", tmp_path / "table", "--judge-url", stub.url,
             "--judge-model", "stub", "--judge-key-env", "JUDGE_KEY", "--cache", tmp_path / "cache.jsonl",
             "--dataset", "MT-Bench", "--judge-prompts", ROOT / "data" / "judge_prompts.jsonl",
             "--retries", 1]
    out = run("judge", *flags)
    # 6 ordered pairs x 4 turns; the 4 showing ppo's q82 turn 2 ("??") are asked twice
    assert len(stub.requests) == 6 * 4 + 4 and "2 tries, last: no verdict: ...'I am not sure.'" in out
    assert "sk-secret" not in out
    rows = {(r["model"], r["opponent"]): r for r in csv.DictReader(open(tmp_path / "table.csv"))}
    assert len(rows) == 6
    # salsa vs ppo: q81 t1 win, t2 win; q82 t1 win, t2 error (the multi-turn prompt shows "??")
    assert [rows["salsa", "ppo"][k] for k in ("win", "loss", "tie", "error")] == ["3", "0", "0", "1"]
    assert [rows["ppo", "salsa"][k] for k in ("win", "loss", "tie", "error")] == ["0", "3", "0", "1"]
    assert [rows["salsa", "sft"][k] for k in ("win", "loss", "tie", "error")] == ["3", "0", "1", "0"]
    assert float(rows["salsa", "sft"]["adj_win_rate"]) == 87.5 and float(rows["salsa", "sft"]["win_rate"]) == 75.0
    assert "| MT-Bench | stub | salsa vs sft | 3 | 0 | 1 | 75.00 | 87.50 |" in (tmp_path / "table.md").read_text()
    run("judge", *flags)
    assert len(stub.requests) == 28 + 4 * 2  # every verdict came from the cache; the 4 errors were asked again


def test_local_judge_and_table_merge(tmp_path, monkeypatch):
    """A Python scorer (longer is better) with a tie margin; a second dataset adds rows, a rerun replaces its own."""
    (tmp_path / "length_judge.py").write_text("def score(question, answer):\n    return len(answer)\n")
    qs = write_jsonl(tmp_path / "q.jsonl", [{"uid": "u1", "prompt": "p1"}, {"uid": "u2", "prompt": "p2"},
                                            {"question_id": "u3", "turns": [{"content": "p3"}]}])
    a = fastchat_answers(tmp_path / "a.jsonl", "A", {"u1": ["long answer"], "u2": ["ab"], "u3": ["abc"]})
    b = fastchat_answers(tmp_path / "b.jsonl", "B", {"u1": ["short"], "u2": ["abcdef"], "u3": ["abcd"]})
    flags = ["--questions", qs, "--answers", a, b, "--judge", "py:length_judge:score", "--tie-margin", "1.5",
             "--out", tmp_path / "t"]
    run("judge", *flags, "--dataset", "arena", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    for dataset in ("uf", "arena"):
        ev.judge(salsa.parse_args(ev.Args, [*map(str, flags), "--dataset", dataset]))
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [(r["dataset"], r["model"]) for r in rows] == [("uf", "A"), ("uf", "B"), ("arena", "A"), ("arena", "B")]
    assert [rows[0][k] for k in ("win", "loss", "tie")] == ["1", "1", "1"]  # 11 vs 5, 2 vs 6, 3 vs 4 (within 1.5)
    # another judge of the same pairs adds its rows beside the first judge's, and the table names each judge
    (tmp_path / "short_judge.py").write_text("def score(question, answer):\n    return -len(answer)\n")
    ev.judge(salsa.parse_args(ev.Args, [*map(str, flags[:-4]), "--judge", "py:short_judge:score", "--out",
                                        str(tmp_path / "t"), "--dataset", "arena"]))
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [(r["dataset"], r["judge"], r["model"]) for r in rows][2:] == [
        ("arena", "py:length_judge:score", "A"), ("arena", "py:length_judge:score", "B"),
        ("arena", "py:short_judge:score", "A"), ("arena", "py:short_judge:score", "B")]
    assert [rows[4][k] for k in ("win", "loss", "tie")] == ["2", "1", "0"]  # the shorter wins: 11 vs 5, 2 vs 6, 3 vs 4
    assert "| arena | py:short_judge:score | A vs B | 2 | 1 | 0 |" in (tmp_path / "t.md").read_text()


# ---------------------------------------------------------------- answers and reward analyses
@pytest.fixture(scope="module")
def lab(tmp_path_factory, tok):
    """Two tiny SFT-like models of one config, a third, and a tiny reward model (bias 0.25)."""
    d = tmp_path_factory.mktemp("eval")
    models = [make_tiny(d / f"sft{s}", tok, seed=s) for s in range(3)]
    for path in models:  # a random tiny model with tied embeddings greedily repeats the prompt's last token;
        model = AutoModelForCausalLM.from_pretrained(path)  # larger layer weights make the models answer apart
        with torch.no_grad():
            for name, w in model.named_parameters():
                if "proj" in name:
                    w.mul_(8)
        model.save_pretrained(path)
    rm = AutoModelForSequenceClassification.from_pretrained(models[0], num_labels=1)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    rm.config.pad_token_id, rm.config.reward_bias = tok.pad_token_id, 0.25
    rm.save_pretrained(d / "rm")
    tok.save_pretrained(d / "rm")
    return d, models, str(d / "rm"), write_jsonl(d / "question.jsonl", MT_BENCH)


def test_the_second_turn_is_asked_after_the_models_first_answer(lab, tok, monkeypatch, tmp_path):
    """In answer() itself, not only in `conversation`: the prompt of MT-Bench's turn 2 holds turn 1, then the
    model's own answer to it, then turn 2 (each prompt generate receives is decoded here)."""
    d, models, _, qs = lab
    seen = []

    def fake_generate(model, tok_, prompts, args, cut=None):
        cut += [False] * len(prompts)
        seen.extend(tok.decode(p) for p in prompts)
        return [tok.encode(f" reply {len(seen) - len(prompts) + i}", add_special_tokens=False) for i in range(len(prompts))]
    monkeypatch.setattr(ev, "generate", fake_generate)
    ev.answer(salsa.parse_args(ev.Args, ["--model", models[0], "--questions", qs, "--out", str(tmp_path / "a.jsonl")]))
    rows = {r["question_id"]: r["choices"][0]["turns"] for r in salsa.read_jsonl(tmp_path / "a.jsonl")}
    for q in MT_BENCH:
        first = rows[q["question_id"]][0]
        asked = [p for p in seen if q["turns"][0] in p and q["turns"][1] in p]  # turn 2's prompt
        assert len(asked) == 1 and asked[0].index(q["turns"][0]) < asked[0].index(first) < asked[0].index(q["turns"][1])


def test_answers_format_second_turn_and_resume(lab, tok, capsys):
    d, models, _, qs = lab
    out = d / "answers" / "sft0.jsonl"
    run("answer", "--model", models[0], "--questions", qs, "--out", out, "--max-new-tokens", 6, "--batch-size", 2)
    rows = salsa.read_jsonl(out)
    assert sorted(r["question_id"] for r in rows) == [81, 82, 83] and {r["model_id"] for r in rows} == {"sft0"}
    assert all(len(r["choices"][0]["turns"]) == 2 and all(isinstance(t, str) for t in r["choices"][0]["turns"])
               for r in rows)
    second = salsa.prompt_ids(tok, ev.conversation(MT_BENCH[0]["turns"], ["FIRST ANSWER"], 1))
    text = tok.decode(second)
    assert text.index("haiku about rain") < text.index("FIRST ANSWER") < text.index("make it rhyme")
    write_jsonl(out, rows[:1])  # as if killed after the first batch, while writing the second's first row
    out.write_text(out.read_text() + json.dumps(rows[1])[:40])
    log = run("answer", "--model", models[0], "--questions", qs, "--out", out, "--max-new-tokens", 6)
    assert "sft0.jsonl: dropped its last line, cut short" in log and "1 questions answered before, 2 to go" in log and re.search(r"sft0.jsonl: \d of 4 answers cut at", log)
    again = salsa.read_jsonl(out)
    assert sorted(r["question_id"] for r in again) == [81, 82, 83] and again[0] == rows[0]
    ev.answer(salsa.parse_args(ev.Args, ["--model", models[0], "--questions", qs, "--out", str(out), "--max-new-tokens", "6"]))
    assert "3 questions answered before, 0 to go" in capsys.readouterr().out
    # answers of another model directory, or decoded otherwise, are not taken as this run's
    for flags, diff in ((["--model", models[1], "--model-id", "sft0", "--max-new-tokens", "6"], f"--model {models[0]} \\(now {models[1]}\\), weights of sha256 [0-9a-f]{{16}} \\(now [0-9a-f]{{16}}: .*\\)"),
                        (["--model", models[0], "--max-new-tokens", "16"], r"--max-new-tokens 6 \(now 16\)")):
        with pytest.raises(salsa.InputError, match=f"sft0.jsonl holds answers made with {diff}: choose another --out"):
            ev.answer(salsa.parse_args(ev.Args, [*map(str, flags), "--questions", str(qs), "--out", str(out)]))
    assert salsa.read_jsonl(out) == again
    # a model retrained into the same directory: same path, same flags, other weights
    retrained = d / "retrained"
    shutil.copytree(models[0], retrained)
    run("answer", "--model", retrained, "--questions", qs, "--out", d / "retrained.jsonl", "--max-new-tokens", 6)
    shutil.copy(Path(models[1]) / "model.safetensors", retrained / "model.safetensors")
    with pytest.raises(salsa.InputError, match=r"retrained\.jsonl holds answers made with weights of sha256 [0-9a-f]{16} "
                                               r"\(now [0-9a-f]{16}: a model retrained into .*retrained\?\)"):
        ev.answer(salsa.parse_args(ev.Args, ["--model", str(retrained), "--questions", str(qs), "--out",
                                             str(d / "retrained.jsonl"), "--max-new-tokens", "6"]))
    # rows from before the digest was recorded are taken as they are
    rows = salsa.read_jsonl(d / "retrained.jsonl")
    write_jsonl(d / "retrained.jsonl", [{**r, "made_by": {k: v for k, v in r["made_by"].items() if k != "weights"}}
                                        for r in rows])
    ev.answer(salsa.parse_args(ev.Args, ["--model", str(retrained), "--questions", str(qs), "--out",
                                         str(d / "retrained.jsonl"), "--max-new-tokens", "6"]))
    assert "3 questions answered before, 0 to go" in capsys.readouterr().out


def test_generate_strips_the_eos_and_counts_the_cut(tok, monkeypatch):
    eos = tok.eos_token_id
    monkeypatch.setattr(salsa, "generate", lambda model, tok, prompts, cfg, bs: [[5, eos], [5, 6], [eos], []])
    cut = [True]  # appended to, not replaced
    assert ev.generate(None, tok, [[1]] * 4, ev.Args(max_new_tokens=2), cut) == [[5], [5, 6], [], []]
    assert cut == [True, False, True, False, True]


def test_questions_in_three_formats(tmp_path):
    arena = write_jsonl(tmp_path / "a.jsonl", [{"uid": "x1", "prompt": "hi"}, {"question_id": "x2", "turns": [{"content": "yo"}]}])
    uf = write_jsonl(tmp_path / "u.jsonl", [{"prompt_id": "p9", "prompt": "why?", "chosen": []}])
    assert salsa.load_questions(arena, "") == [{"id": "x1", "turns": ["hi"]}, {"id": "x2", "turns": ["yo"]}]
    assert salsa.load_questions(uf, "")[0]["id"] == "p9"
    with pytest.raises(salsa.InputError, match=r"bad\.jsonl line 2: question q7 has no question"):
        salsa.load_questions(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"uid": "q7", "text": "no prompt"}]), "")
    with pytest.raises(salsa.InputError, match=r"dup\.jsonl line 3: question x1 is also .*dup\.jsonl line 1"):
        salsa.load_questions(write_jsonl(tmp_path / "dup.jsonl", [{"uid": "x1", "prompt": "a"}, {"uid": "x2", "prompt": "b"},
                                                               {"uid": "x1", "prompt": "c"}]), "")


def test_alpha_line_ends_are_the_ingredients(lab, tok, monkeypatch):
    """Rewards, and with --judge py:... that function's scores, of each end's own answers."""
    d, models, rm_path, qs = lab
    (d / "n_chars.py").write_text("def score(question, answer):\n    return len(question) + 1000 * len(answer)\n")
    monkeypatch.chdir(d)
    args = ev.Args(models=models[:2], reward=rm_path, questions=qs, max_new_tokens=5, batch_size=2,
                   judge="py:n_chars:score")
    ends = ev.soup_rewards(args, [[1.0, 0.0], [0.0, 1.0]])
    rm = salsa.load_reward_model(rm_path)
    for path, (got, gold) in zip(models[:2], ends):
        model = salsa.load_model(path, tok).eval()
        questions = sorted(((salsa.prompt_ids(tok, q["turns"][0]), q["turns"][0]) for q in MT_BENCH), key=lambda p: len(p[0]))
        prompts = [p for p, _ in questions]
        answers = ev.generate(model, tok, prompts, args)
        assert got == ev.rewards(rm, tok.pad_token_id, [p + a + [tok.eos_token_id] for p, a in zip(prompts, answers)], 2)
        assert gold == [len(q) + 1000 * len(tok.decode(a, skip_special_tokens=True).strip()) for (_, q), a in zip(questions, answers)]
    assert ends[0][0] != ends[1][0]
    args.judge = "api"  # not a local function: rewards only
    assert all(g is None for _, g in ev.soup_rewards(args, [[0.5, 0.5]]))


def test_analyses_write_data_and_plots(lab):
    """In process (the CLI is exercised by the tests above): each command writes its CSV and PNG."""
    pytest.importorskip("matplotlib")
    d, models, rm_path, qs = lab
    common = ["--reward", rm_path, "--questions", qs, "--max-new-tokens", "4"]
    ev.alpha_line(salsa.parse_args(ev.Args, ["--models", *models[:2], "--alphas", "0", "0.5", "1", "--out", str(d / "fig2ab"), *common]))
    rows = list(csv.DictReader(open(d / "fig2ab" / "alpha_line.csv")))
    assert [float(r["alpha"]) for r in rows] == [0, 0.5, 1] and all(float(r["stderr"]) > 0 for r in rows)
    ev.plane(salsa.parse_args(ev.Args, ["--models", *models, "--grid", "2", "--margin", "0.1", "--out", str(d / "fig2c"), *common]))
    rows = list(csv.DictReader(open(d / "fig2c" / "plane.csv")))
    assert len(rows) == 4 and all(abs(sum(float(r[w]) for w in ("w1", "w2", "w3")) - 1) < 1e-9 for r in rows)
    assert min(float(r["w1"]) for r in rows) < 0  # the grid reaches outside the triangle
    a = fastchat_answers(d / "ha.jsonl", "A", {q["question_id"]: ["yes", "sure"] for q in MT_BENCH})
    b = fastchat_answers(d / "hb.jsonl", "B", {q["question_id"]: ["no", "never"] for q in MT_BENCH})
    ev.reward_hist(salsa.parse_args(ev.Args, ["--answers", a, b, "--reward", rm_path, "--questions", qs, "--out", str(d / "fig3")]))
    assert len(list(csv.DictReader(open(d / "fig3" / "reward_hist.csv")))) == 2 * 3 * 2
    with pytest.raises(ValueError, match="one or more distinct models"):
        ev.reward_hist(salsa.parse_args(ev.Args, ["--reward", rm_path, "--questions", qs, "--out", str(d / "none")]))
    for png in ("fig2ab/alpha_line.png", "fig2c/plane.png", "fig3/reward_hist.png"):
        assert (d / png).read_bytes()[:4] == b"\x89PNG"


def test_the_plane_at_its_defaults_holds_the_three_models(tmp_path, monkeypatch):
    """Fig. 2c compares the soups with their ingredients: at --grid 7 --margin 0.25 the corners (0, 0), (1, 0),
    (1/2, √3/2) are grid points, whose weights are each model alone; every point's weights sum to 1."""
    seen = []
    monkeypatch.setattr(ev, "soup_rewards", lambda args, weights: seen.extend(weights) or [([0.0, 1.0], None)] * len(weights))
    monkeypatch.setattr(salsa, "plot", lambda png, draw: None)
    ev.plane(salsa.parse_args(ev.Args, ["--models", "a", "b", "c", "--questions", "q", "--out", str(tmp_path / "p")]))
    assert len(seen) == 49 and all(sum(w) == pytest.approx(1, abs=1e-12) for w in seen)
    rows = list(csv.DictReader(open(tmp_path / "p" / "plane.csv")))
    for x, y, corner in ((0, 0, [1, 0, 0]), (1, 0, [0, 1, 0]), (0.5, 3**0.5 / 2, [0, 0, 1])):  # where draw() names a, b, c
        at = [r for r in rows if abs(float(r["x"]) - x) < 1e-9 and abs(float(r["y"]) - y) < 1e-9]
        assert len(at) == 1 and [float(at[0][w]) for w in ("w1", "w2", "w3")] == pytest.approx(corner, abs=1e-12)


def test_the_alpha_line_starts_at_the_reference(tmp_path, monkeypatch):
    """Eq. 3: α = 0 is the first model (the reference), α = 1 the second, and the CSV's α is the soup's."""
    seen = []
    monkeypatch.setattr(ev, "soup_rewards", lambda args, weights: seen.extend(weights) or [([0.0, 1.0], None)] * len(weights))
    monkeypatch.setattr(salsa, "plot", lambda png, draw: None)
    ev.alpha_line(salsa.parse_args(ev.Args, ["--models", "ref", "other", "--alphas", "0", "0.25", "1", "--questions", "q",
                                             "--out", str(tmp_path / "line")]))
    assert seen == [[1, 0], [0.75, 0.25], [0, 1]]
    assert [float(r["alpha"]) for r in csv.DictReader(open(tmp_path / "line" / "alpha_line.csv"))] == [0, 0.25, 1]


def test_an_analysis_that_fails_while_plotting_leaves_no_folder(lab, monkeypatch):
    """The recipe skips an analysis whose folder exists: a failed plot must not leave the CSV there alone,
    and an existing folder is refused before any soup is computed, not overwritten."""
    d, models, rm_path, qs = lab
    args = ["--models", *models[:2], "--alphas", "0", "1", "--reward", rm_path, "--questions", qs, "--max-new-tokens", "2"]

    def broken(png, draw):
        raise RuntimeError("the plot failed")
    monkeypatch.setattr(salsa, "plot", broken)
    with pytest.raises(RuntimeError, match="the plot failed"):
        ev.alpha_line(salsa.parse_args(ev.Args, [*args, "--out", str(d / "broken")]))
    assert not [p for p in d.iterdir() if "broken" in p.name]  # neither the folder nor its temp dir
    monkeypatch.setattr(ev, "soup_rewards", lambda *a: pytest.fail("computed the soups of a refused --out"))
    (d / "done").mkdir()
    for command, three in ((ev.alpha_line, []), (ev.plane, models[2:])):
        with pytest.raises(salsa.InputError, match=r"done already exists: choose another --out or delete it"):
            command(salsa.parse_args(ev.Args, [*args[:3], *three, *args[3:], "--out", str(d / "done")]))


def test_reward_hist_replaces_its_folder_only_once_complete(lab, monkeypatch):
    """The recipe reruns reward-hist over its folder: a rerun that fails while plotting keeps the old CSV and
    plot together (it wrote the new CSV beside the old plot), and one that succeeds replaces both."""
    d, _, rm_path, qs = lab
    a, b, c = (fastchat_answers(d / f"hist{m}.jsonl", m, {q["question_id"]: [m, m] for q in MT_BENCH}) for m in "ABC")
    models = lambda: {r["model"] for r in csv.DictReader(open(d / "hist" / "reward_hist.csv"))}
    hist = lambda *answers: ev.reward_hist(salsa.parse_args(ev.Args, ["--answers", *answers, "--reward", rm_path,
                                                                      "--questions", qs, "--out", str(d / "hist")]))
    monkeypatch.setattr(salsa, "plot", lambda png, draw: png.write_text("A and B"))
    hist(a, b)

    def broken(png, draw):
        raise RuntimeError("the plot failed")
    monkeypatch.setattr(salsa, "plot", broken)
    with pytest.raises(RuntimeError, match="the plot failed"):
        hist(a, c)
    assert models() == {"A", "B"} and (d / "hist" / "reward_hist.png").read_text() == "A and B"
    monkeypatch.setattr(salsa, "plot", lambda png, draw: png.write_text("A and C"))
    hist(a, c)
    assert models() == {"A", "C"} and (d / "hist" / "reward_hist.png").read_text() == "A and C"
    assert not [p for p in d.iterdir() if p.name.startswith(".hist")]  # no temp or old folder left


def test_plots_are_optional(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    salsa.plot(tmp_path / "x.png", lambda plt: None)
    assert "pip install matplotlib" in capsys.readouterr().out and not (tmp_path / "x.png").exists()


def test_a_missing_answers_file_is_named(tmp_path):
    with pytest.raises(salsa.InputError, match=r"nope\.jsonl: no such answers file: make it with `eval.py answer"):
        ev.load_answers(str(tmp_path / "nope.jsonl"), [])


@pytest.mark.parametrize("rows, message", [
    ([{"question_id": 1, "model_id": "m"}], "line 1: not a FastChat answer row"),
    ([{"question_id": 1, "choices": [{"turns": "Hi"}]}], "line 1: not a FastChat answer row"),  # a str, not turns
    ([{"question_id": 1, "choices": [{"turns": ["Hi"]}]}, {"question_id": "1", "choices": [{"turns": ["Yo"]}]}],
     "line 2: question 1 is answered twice: keep one row"),
], ids=["no choices", "turns not a list", "answered twice"])
def test_a_bad_answers_row_is_named(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(salsa.InputError, match=f"^{path} {message}"):
        ev.load_answers(path, [])


def test_an_answers_file_is_read_as_a_data_file_is(tmp_path):
    """Rows named by their line, a blank line counted (they were numbered without it), and a byte-order mark
    skipped (it was refused as not JSON), as the README says of every jsonl file."""
    path, good = tmp_path / "a.jsonl", json.dumps({"question_id": 1, "choices": [{"turns": ["Hi"]}]})
    path.write_text("\ufeff" + good + "\n\n" + json.dumps({"question_id": 2}) + "\n", encoding="utf-8")
    with pytest.raises(salsa.InputError, match=f"^{path} line 3: not a FastChat answer row"):
        ev.load_answers(str(path), [])
    path.write_text("\ufeff" + good + "\n", encoding="utf-8")
    assert ev.load_answers(str(path), [{"id": 1, "turns": ["q"]}]) == ("a", {"1": ["Hi"]})
