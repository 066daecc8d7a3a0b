"""Evaluation, SALSA (arXiv 2411.01798) §4: answers, pairwise judging (Tables 2-5), reward analyses (Figs. 2-3).

    python eval.py answer --model runs/salsa --questions mt-bench/question.jsonl --out runs/eval/mt-bench/salsa.jsonl
    python eval.py judge --questions mt-bench/question.jsonl --answers salsa.jsonl ppo.jsonl sft.jsonl \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-4-turbo --out runs/eval/table  # key: $OPENAI_API_KEY
    python eval.py judge --judge rm:runs/rm ...   or   --judge py:module:function    (offline judges)
    python eval.py alpha-line --models runs/sft-s1 runs/sft-s2 --reward runs/rm --questions ... --out runs/eval/fig2ab
    python eval.py plane --models A B C --reward runs/rm --questions ... --out runs/eval/fig2c
    python eval.py reward-hist --answers salsa.jsonl ppo.jsonl --reward runs/rm --questions ... --out runs/eval/fig3

No torchrun form: one process per model and device (CUDA_VISIBLE_DEVICES). Questions: MT-Bench (`turns`:
the second is asked after the model's own first answer), Arena-Hard v0.1 (`uid`, `prompt`, or `question_id`,
`turns[{content}]`), prompt rows (`prompt`, `prompt_id`: UltraFeedback's test_prefs).
Choices, and where we depart from the paper or FastChat:
- Answers are greedy by default (the paper gives no sampling settings; FastChat samples per category).
- Judge prompts: FastChat's pair-v2 (the paper's App. B) and pair-v2-multi-turn for MT-Bench's second turn,
  from data/judge_prompts.jsonl = FastChat's fastchat/llm_judge/data/judge_prompts.jsonl, verbatim (Apache-2.0).
  FastChat would grade math and coding against reference answers (pair-math-v1); the paper does not.
- Each pair is judged in both orders; verdicts that disagree make a tie (FastChat's rule); a reply with no
  verdict is asked again (--retries), then is an error, counted apart, never a win. The verdict is the reply's
  last [[A]]/[[B]]/[[C]] (a judge that reasons aloud may name another first); FastChat takes [[A]] if it appears
  anywhere, else [[B]], else [[C]], so a reply holding both [[A]] and a final [[B]] is A's win there. Win rate = win / n,
  adjusted = (win + tie / 2) / n with n = win + loss + tie (Tables 1-5); the bootstrap interval is ours (it
  resamples questions, a question's turns together).
- The reward of (x, y) is the reward model on prompt_ids(x) + y + EOS, the sequence PPO scores when y ended
  itself. An answer cut at --max-new-tokens gets the EOS too (the answers file does not record the cut; `answer`
  prints how many were): PPO scores such a response without EOS and subtracts --missing-eos-penalty.
"""
import csv
import hashlib
import itertools
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import salsa
from soup import read_states, soup_state_dicts


@dataclass
class Args:
    questions: str = salsa.arg("", "MT-Bench, Arena-Hard or prompt rows (.jsonl/.json/.parquet), or a hub dataset")
    split: str = salsa.arg(salsa.QUESTIONS_SPLIT, "dataset split of a hub --questions (UltraFeedback's test split, §4)")
    limit: int = salsa.arg(0, "use only the first N questions (0 = all)", low=0)
    out: str = salsa.arg("", "answer: answers .jsonl (resumed); judge: table path without suffix; analyses: a dir")
    model: str = salsa.arg("", "answer: model directory")
    model_id: str = salsa.arg("", "answer: name in the answers file (default: the model dir's name)")
    answers: list[str] = salsa.arg([], "judge, reward-hist: answer files; judge compares every pair, in this order")
    reward: str = salsa.arg("", "analyses: reward model dir written by reward.py")
    models: list[str] = salsa.arg([], "alpha-line: two SFT models; plane: three, fine-tuned from one base (§4.2)")
    alphas: list[float] = salsa.arg([i / 10 for i in range(11)], "alpha-line: weights of the second model (Fig. 2a/b)")
    grid: int = salsa.arg(7, "plane: grid points along each side of the rectangle around the triangle (Fig. 2c)", low=2)
    margin: float = salsa.arg(0.25, "plane: how far the grid reaches past the triangle, in side lengths across and "
                                    "heights up (0.25 with --grid 7: the three models are grid points)")
    batch_size: int = salsa.arg(8, "prompts per generate / reward-model forward", low=1)
    max_new_tokens: int = salsa.arg(1024, "answer length limit (FastChat's MT-Bench default)", low=1)
    max_prompt_len: int = salsa.arg(2048, "longer prompts keep their last tokens, with a warning (App. A.1 max length)", low=1)
    temperature: float = salsa.arg(0.0, "sampling temperature; 0 = greedy")
    judge: str = salsa.arg("api", "api (an OpenAI-compatible endpoint), rm:DIR (a reward model), py:module:function")
    judge_url: str = salsa.arg("https://api.openai.com/v1", "api: base URL (or the full /chat/completions URL)")
    judge_model: str = salsa.arg("gpt-4-turbo", "api: judge model (the paper: GPT-4-Turbo, §4)")
    judge_key_env: str = salsa.arg("OPENAI_API_KEY", "api: environment variable holding the key (never logged)")
    judge_prompts: str = salsa.arg("data/judge_prompts.jsonl", "FastChat's judge prompts (pair-v2, pair-v2-multi-turn)")
    dataset: str = salsa.arg("", "judge: dataset name in the table (default: the question file's folder)")
    cache: str = salsa.arg("runs/eval/judge_cache.jsonl", "api: every reply with a verdict appended as it arrives; "
                                                        "reruns with the same --judge-url and --judge-model reuse it")
    concurrency: int = salsa.arg(8, "api: requests in flight", low=1)
    retries: int = salsa.arg(6, "api: retries on 429, 5xx and timeouts (the openai client's, with backoff and "
                                "Retry-After), and on replies with no verdict", low=0)
    timeout: float = salsa.arg(120.0, "api: seconds per request")
    tie_margin: float = salsa.arg(0.0, "rm/py judges: scores at most this far apart are a tie (0: only equal ones)")
    bootstrap: int = salsa.arg(1000, "judge: bootstrap resamples (of questions, with all their turns) of the "
                                     "95-percent interval of the adjusted win rate", low=1)
    seed: int = salsa.arg(0, "seed of sampling and of the bootstrap")
    dtype: salsa.DType = salsa.arg("float32", "weights dtype")
    attn: str = salsa.arg("sdpa", "attention implementation (sdpa, eager, flash_attention_2)")
    allow_pickle: bool = salsa.arg(False, "load models whose weights are only a pickle (pytorch_model.bin runs code)")


# ---------------------------------------------------------------- questions and answers
def load_answers(path: str, questions: list[dict]) -> tuple[str, dict]:
    """(model_id, {question id: answer turns}), refused unless every question's every turn is answered."""
    if not Path(path).is_file():
        raise salsa.InputError(f"{path}: no such answers file: make it with `eval.py answer --out {path}` first")
    rows, answers = salsa.jsonl_rows(path), {}
    for where, r in rows:
        try:
            qid, turns = str(r["question_id"]), r["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            turns = None
        if not (isinstance(turns, list) and all(isinstance(t, str) for t in turns)):
            raise salsa.InputError(f"{where}: not a FastChat answer row, "
                                   '{"question_id": ..., "choices": [{"turns": ["...", ...]}]}')
        if qid in answers:
            raise salsa.InputError(f"{where}: question {qid} is answered twice: keep one row")
        answers[qid] = turns
    for q in questions:
        if len(answers.get(str(q["id"]), [])) < len(q["turns"]):
            raise salsa.InputError(f"{path}: question {q['id']} has no answer to each of its {len(q['turns'])} turns: "
                             "run `eval.py answer` on this question file first")
    return (rows[0][1].get("model_id") if rows else None) or Path(path).stem, answers


def conversation(turns: list[str], answers: list[str], k: int):
    """Turn k's prompt as salsa.prompt_ids takes it: the question, or the messages so far ending with it."""
    msgs = [{"role": r, "content": c} for u, a in zip(turns[:k], answers[:k])
            for r, c in (("user", u), ("assistant", a))]
    return msgs + [{"role": "user", "content": turns[k]}] if k else turns[0]


def prompt_ids(tok, prompt, max_len: int, where: str) -> list[int]:
    ids = salsa.prompt_ids(tok, prompt, where)
    if len(ids) > max_len:  # the end holds the question and the assistant header
        tqdm.write(f"{where}: prompt of {len(ids)} tokens cut to its last {max_len} (--max-prompt-len)")
    return ids[-max_len:]


def generate(model, tok, prompts: list[list[int]], args: Args, cut: list | None = None) -> list[list[int]]:
    """Answer token ids, up to (without) the first EOS; batched with left padding, KV cache on. Appends to
    `cut`, if given, one bool per answer: whether it ran to --max-new-tokens without an EOS."""
    cfg, eos = salsa.generation_config(tok, args.temperature, args.max_new_tokens), tok.eos_token_id
    out = salsa.generate(model, tok, prompts, cfg, args.batch_size)
    if cut is not None:
        cut += [r[-1:] != [eos] for r in out]
    return [r[:-1] if r[-1:] == [eos] else r for r in out]


@torch.no_grad()
def rewards(rm, pad_id: int, seqs: list[list[int]], batch_size: int) -> list[float]:
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = salsa.pad(seqs[i:i + batch_size], pad_id, device=rm.device)  # (B, T)
        out += salsa.reward_scores(rm, ids, mask).tolist()
    return out


def weights_digest(path: str) -> str:
    """A sha256 of a model directory's weight files (0.4 s per 540 MB on 2 cores here; a 7B model in fp32, 28 GB,
    about 20 s by that rate), '' for a hub name. `answer` records it: a model retrained into the same directory, whose path and
    flags are the same, would otherwise have the old model's answers taken as its own."""
    files = sorted(p for p in Path(path).glob("*") if p.suffix in (".safetensors", ".bin")) if Path(path).is_dir() else []
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            h.update(f.name.encode() + hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()[:16] if files else ""


def answer(args: Args):
    """Answers in FastChat's format, appended a batch of questions at a time (a row a kill cut short is
    dropped and redone); a rerun skips answered ids, if they were made by the same model directory, holding
    the same weights, with the same decoding (each row records it: rows written before it did are taken as
    they are)."""
    model_id, out = args.model_id or Path(args.model).name, Path(args.out)
    questions = salsa.load_questions(args.questions, args.split, args.limit)
    made_by = {k: getattr(args, k) for k in ("model", "dtype", "temperature", "max_new_tokens", "max_prompt_len", "seed")}
    made_by["weights"] = weights_digest(args.model)
    if out.exists():
        salsa.drop_cut_line(out)
    old = salsa.read_jsonl(out) if out.exists() else []
    done = {str(r["question_id"]): r["model_id"] for r in old}
    if set(done.values()) - {model_id}:
        raise salsa.InputError(f"{out} holds answers of another model than {model_id}: choose another --out")
    # a row compares on what it recorded (older rows lack the weights, the oldest everything); no digest: a hub name
    differs = lambda was: {k: v for k, v in made_by.items() if k in was and was[k] != v and (v or k != "weights")}
    if other := next((r["made_by"] for r in old if differs(r.get("made_by", {}))), None):
        diff = ", ".join(f"weights of sha256 {other[k]} (now {v}: a model retrained into {args.model}?)" if k == "weights"
                         else f"--{k.replace('_', '-')} {other[k]} (now {v})" for k, v in differs(other).items())
        raise salsa.InputError(f"{out} holds answers made with {diff}: choose another --out, or delete it to redo them")
    todo = [q for q in questions if str(q["id"]) not in done]
    print(f"{out}: {len(questions) - len(todo)} questions answered before, {len(todo)} to go")
    if not todo:
        return
    tok = salsa.load_tokenizer(args.model)
    model = salsa.load_model(args.model, tok, args.dtype, args.attn, salsa.setup_dist(args.seed).device,
                             allow_pickle=args.allow_pickle).eval()
    todo.sort(key=lambda q: len(q["turns"][0]))  # similar lengths share a batch: less padding
    out.parent.mkdir(parents=True, exist_ok=True)
    cut = []
    for i in tqdm(range(0, len(todo), args.batch_size), desc=f"answer {model_id}"):
        chunk = todo[i:i + args.batch_size]
        turns = [[] for _ in chunk]
        for k in range(max(len(q["turns"]) for q in chunk)):  # turn k + 1 is asked after the model's own turn k
            rows = [j for j, q in enumerate(chunk) if k < len(q["turns"])]
            prompts = [prompt_ids(tok, conversation(chunk[j]["turns"], turns[j], k), args.max_prompt_len,
                                  f"{args.questions} question {chunk[j]['id']} turn {k + 1}") for j in rows]
            for j, ids in zip(rows, generate(model, tok, prompts, args, cut)):
                turns[j].append(tok.decode(ids, skip_special_tokens=True).strip())
        for q, t in zip(chunk, turns):
            salsa.log_jsonl(out, {"question_id": q["id"], "model_id": model_id,
                                  "choices": [{"index": 0, "turns": t}], "tstamp": time.time(), "made_by": made_by})
    print(f"{out}: {sum(cut)} of {len(cut)} answers cut at --max-new-tokens {args.max_new_tokens} without an EOS")


# ---------------------------------------------------------------- judges
def parse_verdict(text: str) -> str:
    """The last [[A]]/[[B]]/[[C]] of a judge's reply, else "error". The instructions' own verdicts, when
    echoed back (`"[[A]]" if assistant A is better`, `"[[C]]" for a tie`, quoted), are cut first; only
    their exact form is: "[[C]] for a tie." is a verdict, and so is "[[A]]" before "If assistant B had..."."""
    echoed = r"[\"'“‘]\[\[[ABC]\]\][\"'”’] (?:if assistant [AB] is better|for a tie)"
    found = re.findall(r"\[\[([ABC])\]\]", re.sub(echoed, "", text))
    return found[-1] if found else "error"


def pair_outcome(v_ab: str, v_ba: str) -> str:
    """Model a's result from the verdicts with a shown first and with a shown second."""
    if "error" in (v_ab, v_ba):
        return "error"
    if v_ab != {"A": "B", "B": "A", "C": "C"}[v_ba]:  # the two orders disagree: a tie, as in FastChat
        return "tie"
    return {"A": "win", "B": "loss", "C": "tie"}[v_ab]


def judge_prompt(templates: dict, turns: list[str], a: list[str], b: list[str], k: int) -> tuple[str, str]:
    """(system, user) messages of FastChat's pair-v2 (turn 1) or pair-v2-multi-turn (turn 2)."""
    if k == 0:
        t = templates["pair-v2"]
        return t["system_prompt"], t["prompt_template"].format(question=turns[0], answer_a=a[0], answer_b=b[0])
    if k > 1:
        raise salsa.InputError(f"a question of {len(turns)} turns: the judge prompts cover two")
    t = templates["pair-v2-multi-turn"]
    return t["system_prompt"], t["prompt_template"].format(question_1=turns[0], question_2=turns[1], answer_a_1=a[0],
                                                           answer_a_2=a[1], answer_b_1=b[0], answer_b_2=b[1])


class JudgeError(Exception):
    """A judgment that failed for good: counted as an error, never cached, retried by a rerun."""


def call_api(client, model: str, system: str, user: str, retries: int) -> str:
    """The judge's reply, one that carries a verdict. The openai client retries 429, 5xx, timeouts and dropped
    connections itself (--retries times, exponential backoff, honouring Retry-After); a reply that carries no
    verdict (malformed, no choices, no content, no [[A]]/[[B]]/[[C]], cut at max_tokens) is asked again up to
    --retries times. Either way, then JudgeError."""
    import openai
    for _ in range(retries + 1):
        try:
            reply = client.chat.completions.create(model=model, temperature=0, max_tokens=2048, messages=[
                {"role": "system", "content": system}, {"role": "user", "content": user}])
        except openai.APIStatusError as e:
            if e.status_code < 500 and e.status_code != 429:  # a bad key, URL or model: no retry can help
                raise RuntimeError(f"{client.base_url}: HTTP {e.status_code}: check --judge-url, --judge-model "
                                   "and the key's environment variable (--judge-key-env)") from None
            raise JudgeError(f"gave up after {retries + 1} tries, last: HTTP {e.status_code}") from None
        except openai.APIConnectionError as e:  # timeouts too
            raise JudgeError(f"gave up after {retries + 1} tries, last: {type(e).__name__}: {e}") from None
        try:
            choice = reply.choices[0]
            text, cut = choice.message.content, choice.finish_reason == "length"
            if not cut and parse_verdict(text) != "error":
                return text
            # a reply cut short never gave its final verdict: any [[A]] in it is from the reasoning before
            problem = "cut at max_tokens (finish_reason length)" if cut else f"no verdict: ...{text[-200:]!r}"
        except (IndexError, TypeError, AttributeError):  # a reply that is not JSON comes back as its text
            problem = f"malformed reply: {str(reply)[:120]!r}"
    raise JudgeError(f"gave up after {retries + 1} tries, last: {problem}")


def judge_api(args: Args, games: dict) -> dict:
    """{game: reply text with a verdict, or None for an error}, through the on-disk cache; new replies appended
    as they come. Only replies with a verdict are cached: a rerun asks again what failed."""
    try:
        from openai import OpenAI  # only --judge api needs it
    except ImportError:  # the device machines and minimal installs have no openai
        raise salsa.InputError("--judge api needs the openai package: pip install openai "
                               "(or judge locally with --judge rm:DIR or py:module:function)") from None
    # the client refuses an empty key; a local server (vLLM, llama.cpp) ignores the placeholder, OpenAI says 401
    url = args.judge_url.rstrip("/").removesuffix("/chat/completions")
    client = OpenAI(base_url=url, timeout=args.timeout, api_key=os.environ.get(args.judge_key_env) or "no-key",
                    max_retries=args.retries)
    text = Path(args.cache).read_text() if Path(args.cache).exists() else ""
    cache = {}
    for line in text.splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # the line a killed run was writing
            continue
        # another endpoint's "gpt-4-turbo" (a local server's, a proxy's) is another judge; rows from before the
        # url was recorded are taken as they are. Older runs also cached replies with no verdict.
        if r.get("url", url) == url and parse_verdict(r["judgment"] or "") != "error":
            cache[r["key"]] = r["judgment"]
    Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
    if text and not text.endswith("\n"):  # what we append must not extend that cut line
        with open(args.cache, "a") as fh:
            fh.write("\n")
    keys = {g: hashlib.sha256(json.dumps([args.judge_model, *p]).encode()).hexdigest() for g, p in games.items()}
    todo = list({keys[g]: g for g in games if keys[g] not in cache}.values())  # identical prompts asked once
    print(f"judge: {len(games) - len(todo)} of {len(games)} judgments cached, {len(todo)} to ask {args.judge_model}")
    pool = ThreadPoolExecutor(args.concurrency)
    futures = {pool.submit(call_api, client, args.judge_model, *games[g], args.retries): g for g in todo}
    try:
        for f in tqdm(as_completed(futures), total=len(futures), desc="judge"):
            game = futures[f]
            try:
                cache[keys[game]] = f.result()
                salsa.log_jsonl(args.cache, {"key": keys[game], "judge": args.judge_model, "url": url, "game": game,
                                             "judgment": cache[keys[game]]})
            except JudgeError as e:
                tqdm.write(f"judge error on {game}: {e}")
    finally:  # a bad key or URL fails every request, Ctrl-C stops the run: ask nothing more
        pool.shutdown(wait=False, cancel_futures=True)
    return {g: cache.get(keys[g]) for g in games}


def local_scores(args: Args, runs: dict, units: list) -> dict:
    """{model_id: score of each unit's answer} from a reward model (rm:DIR) or a Python function
    (py:module:function of (prompt, answer), the prompt a turn-1 question or, for later turns, the messages
    so far as `conversation` builds them). A local judge is blind to the order of a pair."""
    flat = [(ans, qid, turns, k) for ans in runs.values() for qid, turns, k in units]
    prompts, answers = [conversation(t, ans[qid], k) for ans, qid, t, k in flat], [ans[q][k] for ans, q, _, k in flat]
    kind, _, spec = args.judge.partition(":")
    if kind == "py":
        s = [float(salsa.py_function(spec)(p, a)) for p, a in zip(prompts, answers)]
    elif kind == "rm":
        device = salsa.setup_dist(args.seed).device
        tok, rm = salsa.load_tokenizer(spec), salsa.load_reward_model(spec, args.dtype, args.attn, device,
                                                                      allow_pickle=args.allow_pickle)
        seqs = [prompt_ids(tok, p, args.max_prompt_len, f"answer {i}") + tok(a, add_special_tokens=False)["input_ids"]
                + [tok.eos_token_id] for i, (p, a) in enumerate(zip(prompts, answers))]
        s = rewards(rm, tok.pad_token_id, seqs, args.batch_size)
    else:
        raise salsa.InputError(f"--judge {args.judge}: expected api, rm:DIR or py:module:function")
    return {m: s[i * len(units):(i + 1) * len(units)] for i, m in enumerate(runs)}


def summary(outcomes: list[str], questions: list[str], n_boot: int, seed: int) -> dict:
    """Table 2-5 numbers in percent, plus a bootstrap 95% interval of the adjusted win rate.
    outcomes[i] is the judgment of a turn of questions[i]. The bootstrap resamples questions, each with all its
    turns: MT-Bench's second turn is judged on a conversation that holds the first, so the two are not independent
    draws, and resampling turns alone gives too narrow an interval when they agree."""
    n = {o: outcomes.count(o) for o in ("win", "loss", "tie", "error")}
    value = {"win": 1.0, "tie": 0.5, "loss": 0.0}
    kept = [(q, value[o]) for q, o in zip(questions, outcomes, strict=True) if o != "error"]
    if not kept:
        raise ValueError("every judgment was an error: nothing to tabulate")
    # rates exact from the counts, the bootstrap in float64: in float32, 81 / 160 comes out as 0.50625002
    # and a table prints 50.63, not the exact 50.625's 50.62
    group = {q: i for i, q in enumerate(dict.fromkeys(q for q, _ in kept))}  # question -> index, first seen first
    qid = torch.tensor([group[q] for q, _ in kept])  # (N,)
    score = torch.zeros(len(group), dtype=torch.float64).index_add_(0, qid, torch.tensor([x for _, x in kept]).double())
    count = torch.zeros(len(group), dtype=torch.float64).index_add_(0, qid, torch.ones(len(kept)).double())  # (Q,)
    idx = torch.randint(len(group), (n_boot, len(group)), generator=torch.Generator().manual_seed(seed))  # (n_boot, Q)
    boot = 100 * score[idx].sum(1) / count[idx].sum(1)  # each resample's adjusted win rate over its questions' turns
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {**n, "win_rate": 100 * n["win"] / len(kept), "adj_win_rate": 100 * (n["win"] + n["tie"] / 2) / len(kept),
            "ci_low": lo, "ci_high": hi}


def write_table(out: str, new: list[dict]):
    """CSV and Markdown like the paper's Tables 2-5; rows of other datasets, judges and pairs already there are
    kept (a reward-model judging of a pair does not replace its GPT-4 row)."""
    key = lambda r: (r["dataset"], r.get("judge"), r["model"], r["opponent"])
    path, done = Path(f"{out}.csv"), {key(r) for r in new}
    old = list(csv.DictReader(open(path))) if path.exists() else []
    rows = [r for r in old if key(r) not in done] + new
    write_csv(path, rows)
    print(f"wrote {path}")
    lines = ["| Dataset | Judge | Comparison | Win | Loss | Tie | Win Rate | Adj. Win Rate | Adj. 95% CI | Errors |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['dataset']} | {r.get('judge', '')} | {r['model']} vs {r['opponent']} | {r['win']} | {r['loss']} | {r['tie']} | "
              f"{float(r['win_rate']):.2f} | {float(r['adj_win_rate']):.2f} | "
              f"[{float(r['ci_low']):.2f}, {float(r['ci_high']):.2f}] | {r['error']} |" for r in rows]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def judge(args: Args):
    questions = salsa.load_questions(args.questions, args.split, args.limit)
    runs = dict(load_answers(p, questions) for p in args.answers)  # {model_id: {question id: turns}}
    if len(runs) < 2 or len(runs) < len(args.answers):
        raise salsa.InputError(f"--answers {' '.join(args.answers)}: give answers of two or more models, distinct model_ids")
    units = [(str(q["id"]), q["turns"], k) for q in questions for k in range(len(q["turns"]))]  # MT-Bench: 160
    # every pair in both orders: a table row for each model's view, like the paper's
    pairs = [(x, y) for a, b in itertools.combinations(runs, 2) for x, y in ((a, b), (b, a))]
    if args.judge == "api":
        templates = {t["name"]: t for t in salsa.read_jsonl(args.judge_prompts)}
        games = {(a, b, qid, k): judge_prompt(templates, turns, runs[a][qid], runs[b][qid], k)
                 for a, b in pairs for qid, turns, k in units}
        verdict = {g: parse_verdict(t or "") for g, t in judge_api(args, games).items()}
        outcome = {(a, b): [pair_outcome(verdict[a, b, qid, k], verdict[b, a, qid, k]) for qid, _, k in units]
                   for a, b in pairs}
    else:
        score = local_scores(args, runs, units)
        outcome = {(a, b): ["win" if x - y > args.tie_margin else "loss" if y - x > args.tie_margin else "tie"
                            for x, y in zip(score[a], score[b])] for a, b in pairs}
    dataset = args.dataset or (Path(args.questions).parent.name if Path(args.questions).exists() else args.questions)
    name = args.judge_model if args.judge == "api" else args.judge
    of = [qid for qid, _, _ in units]  # the question of each unit, which the bootstrap resamples
    write_table(args.out, [{"dataset": dataset, "model": a, "opponent": b, "judge": name,
                            **summary(o, of, args.bootstrap, args.seed)} for (a, b), o in outcome.items()])


# ---------------------------------------------------------------- reward analyses (§4.2)
def soup_rewards(args: Args, weights: list[list[float]]) -> list[tuple[list[float], list[float] | None]]:
    """Rewards of the answers to the first turns of --questions, one list per soup of --models, and with
    --judge py:module:function, that function's scores of the same answers too. One model object is
    reused: each soup is computed in memory and loaded into it, never written to disk."""
    device = salsa.setup_dist(args.seed).device
    tok = salsa.load_tokenizer(args.models[0])
    states = read_states(args.models)
    model = salsa.load_model(args.models[0], tok, args.dtype, args.attn, device, allow_pickle=args.allow_pickle).eval()
    rm = salsa.load_reward_model(args.reward, args.dtype, args.attn, device, allow_pickle=args.allow_pickle)
    questions = sorted(((prompt_ids(tok, q["turns"][0], args.max_prompt_len, f"{args.questions} question {q['id']}"),
                         q["turns"][0]) for q in salsa.load_questions(args.questions, args.split, args.limit)),
                       key=lambda p: len(p[0]))  # similar lengths share a batch
    prompts, gold = [p for p, _ in questions], salsa.py_function(args.judge[3:]) if args.judge.startswith("py:") else None
    out = []
    for w in tqdm(weights, desc="soups"):
        missing, unexpected = model.load_state_dict(soup_state_dicts(states, w), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # a tied lm_head is saved once, as the embedding
            raise salsa.InputError(f"{args.models[0]}: saved tensors do not match the model: {missing} {unexpected}")
        answers = generate(model, tok, prompts, args)
        r = rewards(rm, tok.pad_token_id, [p + a + [tok.eos_token_id] for p, a in zip(prompts, answers)],
                    args.batch_size)
        out.append((r, gold and [float(gold(q, tok.decode(a, skip_special_tokens=True).strip()))
                                 for (_, q), a in zip(questions, answers)]))
    return out


def reward_stats(x: list[float]) -> dict:
    t = torch.tensor(x, dtype=torch.float64)
    return {"mean_reward": t.mean().item(), "stderr": (t.std() / len(t) ** 0.5).item() if len(t) > 1 else 0.0}


def write_csv(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_figure(out: str, name: str, rows: list[dict], draw, replace: bool = False):
    """OUT/name.csv and OUT/name.png, written together (salsa.save_atomic): the recipe skips an analysis
    whose folder exists, so a crash or a Ctrl-C while plotting must leave no folder holding the CSV alone
    (nor, with `replace`, a new CSV beside the old plot)."""
    salsa.save_atomic(out, lambda tmp: (write_csv(Path(tmp, f"{name}.csv"), rows), salsa.plot(Path(tmp, f"{name}.png"), draw)),
                      replace)
    say_wrote(out, name)


def say_wrote(out: str, name: str):
    """What an analysis wrote: its CSV, and its plot unless matplotlib is missing."""
    print(f"wrote {Path(out, name)}.csv" + (" and .png" if Path(out, f"{name}.png").exists() else ""))


def alpha_line(args: Args):
    if len(args.models) != 2:
        raise salsa.InputError("alpha-line needs --models REF OTHER (soup = (1 - alpha) REF + alpha OTHER, eq. 3)")
    salsa.check_new(args.out)  # before the soups are computed: alpha-line writes a new folder
    rows = [{"alpha": a, **reward_stats(x), "n": len(x), **({"mean_gold": sum(g) / len(g)} if g else {})}
            for a, (x, g) in zip(args.alphas, soup_rewards(args, [[1 - a, a] for a in args.alphas]))]

    def draw(plt):
        plt.errorbar(args.alphas, [r["mean_reward"] for r in rows], [r["stderr"] for r in rows], marker="o", capsize=3)
        plt.xlabel("alpha   (soup = (1 - alpha) ref + alpha other)")
        plt.ylabel("mean reward ± s.e.")
        if "mean_gold" in rows[0]:
            ax = plt.gca().twinx()
            ax.plot(args.alphas, [r["mean_gold"] for r in rows], "s--", color="tab:orange")
            ax.set_ylabel(f"mean score of {args.judge[3:]} (squares)", color="tab:orange")
    write_figure(args.out, "alpha_line", rows, draw)


def plane(args: Args):
    """Fig. 2c: the models at the corners (0, 0), (1, 0), (1/2, √3/2); the soup at a point (x, y) has its
    barycentric coordinates as weights, negative outside the triangle."""
    if len(args.models) != 3:
        raise salsa.InputError("plane needs --models A B C: three SFT models of one base")
    salsa.check_new(args.out)
    h = 3**0.5 / 2
    xs = torch.linspace(-args.margin, 1 + args.margin, args.grid, dtype=torch.float64).tolist()
    # the same margin in heights up as in side lengths across: where x's grid holds 0, 1/2 and 1, y's holds 0
    # and h, so the three models themselves are points of the plot (at side lengths up, no y lay on 0 or h)
    ys = torch.linspace(-args.margin * h, h + args.margin * h, args.grid, dtype=torch.float64).tolist()
    pts = [(x, y) for y in ys for x in xs]  # rows of constant y, as imshow reads them
    weights = [[1 - x - y / (2 * h), x - y / (2 * h), y / h] for x, y in pts]
    rows = [{"x": x, "y": y, "w1": w[0], "w2": w[1], "w3": w[2], **reward_stats(r)}
            for (x, y), w, (r, _) in zip(pts, weights, soup_rewards(args, weights))]

    def draw(plt):
        grid = [[r["mean_reward"] for r in rows[i:i + args.grid]] for i in range(0, len(rows), args.grid)]
        dx, dy = (xs[1] - xs[0]) / 2, (ys[1] - ys[0]) / 2  # each cell centred on its grid point, not cornered there
        plt.imshow(grid, origin="lower", extent=[xs[0] - dx, xs[-1] + dx, ys[0] - dy, ys[-1] + dy], cmap="viridis")
        plt.colorbar(label="mean reward")
        plt.plot([0, 1, 0.5, 0], [0, 0, h, 0], "w:")
        for x, y, name in zip([0, 1, 0.5], [0, 0, h], args.models):
            plt.annotate(Path(name).name, (x, y), color="white", ha="center")
    write_figure(args.out, "plane", rows, draw)


def reward_hist(args: Args):
    """Fig. 3: the reward of every answered turn of each model, as overlaid histograms with their means."""
    questions = salsa.load_questions(args.questions, args.split, args.limit)
    runs = dict(load_answers(p, questions) for p in args.answers)  # {model_id: {question id: turns}}
    if not runs or len(runs) < len(args.answers):
        raise salsa.InputError(f"--answers {' '.join(args.answers)}: give answer files of one or more distinct models")
    units = [(str(q["id"]), q["turns"], k) for q in questions for k in range(len(q["turns"]))]
    args.judge = f"rm:{args.reward}"
    rows = [{"model": name, "question_id": qid, "turn": k + 1, "reward": v}
            for name, s in local_scores(args, runs, units).items() for (qid, _, k), v in zip(units, s)]

    def draw(plt):
        every = [r["reward"] for r in rows]
        bins = torch.linspace(min(every), max(every), 31).tolist()  # one set of bins: the bars line up
        for i, name in enumerate(runs):
            x = [r["reward"] for r in rows if r["model"] == name]
            plt.axvline(sum(x) / len(x), linestyle="--", color=f"C{i}")
            plt.hist(x, bins=bins, alpha=0.4, color=f"C{i}", label=f"{name} (mean {sum(x) / len(x):.3f})")
        plt.xlabel("reward")
        plt.legend()
    write_figure(args.out, "reward_hist", rows, draw, replace=True)  # the recipe reruns it every time


COMMANDS = {"answer": answer, "judge": judge, "alpha-line": alpha_line, "plane": plane, "reward-hist": reward_hist}


def main(args: Args, command: str):
    if not args.questions or not args.out:
        raise salsa.InputError(f"eval.py {command}: give --questions and --out")
    COMMANDS[command](args)


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        salsa.parse_args(Args, ["--help"])
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python eval.py {{{','.join(COMMANDS)}}} [flags]   (python eval.py --help lists the flags)")
    salsa.run(lambda args: main(args, sys.argv[1]), Args, sys.argv[2:])
