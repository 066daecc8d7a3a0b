"""ppo.py end to end and its invariants, on tiny random-init models (STYLE tiers a, c, d)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import ppo
import salsa
from conftest import ROOT, make_tiny

PROMPTS = ["Say yes or no.", "Is the sky blue?", "Answer with one word: are cats animals?", "Do fish swim?",
           "Yes or no: is water wet?", "Is two more than one?", "Reply yes or no, please, right now.", "Ok?"]


def run(script, *args, check=True, env=None):
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=env and {**os.environ, **env})
    if check and proc.returncode:
        raise AssertionError(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    """Two 'SFT' models (different random inits), a reward model with a random head, prompts."""
    d = tmp_path_factory.mktemp("ppo")
    a, b = make_tiny(d / "sft_a", tok, seed=1), make_tiny(d / "sft_b", tok, seed=2)
    torch.manual_seed(3)
    rm = AutoModelForSequenceClassification.from_pretrained(a, num_labels=1)
    rm.config.pad_token_id, rm.config.reward_bias = tok.pad_token_id, 0.0
    rm.save_pretrained(d / "rm")
    tok.save_pretrained(d / "rm")
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p in PROMPTS * 2])
    return {"a": a, "b": b, "rm": str(d / "rm"), "prompts": prompts, "dir": d}


def ppo_args(s, out, *extra):
    return ["--reward", s["rm"], "--data", s["prompts"], "--out", out, "--batch-size", 4, "--micro-batch", 2,
            "--max-new-tokens", 6, "--lr", 1e-4, "--save-every", 2, "--sample-every", 100, *extra]


def first_row(out):
    return salsa.read_jsonl(f"{out}.ckpt/metrics.jsonl")[0]


@pytest.mark.parametrize("critic", ["reward", "head"])
def test_first_minibatch_ratio_is_exactly_one(setup, tok, critic):
    """Old log-probs and values from the no-grad scoring pass equal the training forward's on the
    same micro-batches of a left-padded batch of different prompt lengths: the first ratio is 1."""
    whole = salsa.load_reward_model(setup["rm"]) if critic == "reward" else None
    policy = ppo.PolicyWithValue(salsa.load_model(setup["a"], tok), whole)
    prompt, pmask = salsa.pad([salsa.prompt_ids(tok, p) for p in PROMPTS[:4]], tok.pad_token_id)
    assert len(set(pmask.sum(-1).tolist())) > 1  # really different lengths
    seq, mask, rmask, _ = ppo.rollout(policy, prompt, pmask, salsa.generation_config(tok, 0.7, 8), False)
    P = prompt.shape[1]
    groups = ppo.micro_batches(pmask, 2)
    with torch.no_grad():
        old = {tuple(g.tolist()): policy(seq[g, c:], mask[g, c:], P - c, 0.7) for g, c in groups}
        full_logp, _, full_v = policy(seq, mask, P, 0.7)  # the whole batch at full width
    policy.train()
    for g, c in groups:
        logp, _, v = policy(seq[g, c:], mask[g, c:], P - c, 0.7)
        old_logp, _, old_v = old[tuple(g.tolist())]
        real = rmask[g] > 0
        assert torch.equal(torch.exp(logp - old_logp)[real], torch.ones_like(logp[real]))
        assert torch.equal(v, old_v)
        # cutting the shared left padding changes nothing but rounding
        assert torch.allclose(logp[real], full_logp[g][real], atol=1e-5)
        assert torch.allclose(v, full_v[g], atol=1e-5)


def test_micro_batches_group_by_length_and_cut_shared_padding():
    pmask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1]])  # lengths 2, 4, 1, 3
    groups = ppo.micro_batches(pmask, 2)
    assert [(g.tolist(), c) for g, c in groups] == [([1, 3], 0), ([0, 2], 2)]


WARPERS = {"do_sample": True, "temperature": 3.0, "top_k": 2, "top_p": 0.3, "min_p": 0.5, "typical_p": 0.5,
           "repetition_penalty": 5.0, "no_repeat_ngram_size": 1, "suppress_tokens": [5, 6, 7]}


def test_sampling_is_the_plain_temperature_distribution_ppo_scores(setup, tok, tmp_path, monkeypatch):
    """A model whose generation_config.json carries warpers (a hub model's top_p, min_p, repetition
    penalty...) still samples exactly softmax(logits / T), the distribution PPO scores: the probabilities
    torch.multinomial actually received are compared with the teacher-forced log-probs and entropies."""
    from transformers import GenerationConfig
    shutil.copytree(setup["a"], tmp_path / "warped")
    GenerationConfig(**WARPERS).save_pretrained(tmp_path / "warped")
    policy = ppo.PolicyWithValue(salsa.load_model(str(tmp_path / "warped"), tok))
    seen, multinomial = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, *a, **kw: seen.append(probs) or multinomial(probs, *a, **kw))
    prompt, pmask = salsa.pad([salsa.prompt_ids(tok, p) for p in PROMPTS[:3]], tok.pad_token_id)
    cfg = salsa.generation_config(tok, 0.7, 6)
    cfg.eos_token_id = -1  # no early stop: every position is sampled from a live row
    seq, mask, rmask, _ = ppo.rollout(policy, prompt, pmask, cfg, False)
    P = prompt.shape[1]
    probs = torch.stack(seen, 1)  # (B, R, V): what the sampler drew from
    assert probs.shape[1] == seq.shape[1] - P == 6
    with torch.no_grad():
        logp, entropy, _ = policy(seq, mask, P, 0.7)  # (B, R): the scoring forward PPO uses
    drawn = probs.gather(-1, seq[:, P:, None]).squeeze(-1)
    torch.testing.assert_close(drawn.log(), logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(-(probs * probs.clamp_min(1e-30).log()).sum(-1), entropy, atol=1e-4, rtol=0)
    assert (probs > 0).all()  # no token filtered out by a top-k, top-p, min-p or suppress list


def test_bf16_gap_measures_sampler_against_scorer(setup, tok):
    """tests/bf16_gap.py (the README's bf16 sampling figures) finds no gap in fp32, where sampling equals
    scoring, and finds one in bf16, where the cached decode rounds differently: the measurement can tell."""
    from bf16_gap import gap
    prompts = [salsa.prompt_ids(tok, p) for p in PROMPTS[:3]]
    fp32 = gap(salsa.load_model(setup["a"], tok), tok, prompts, 0.7, 8, seed=0)
    bf16 = gap(salsa.load_model(setup["a"], tok, dtype="bfloat16"), tok, prompts, 0.7, 8, seed=0)
    assert fp32["tokens"] > 0 and bf16["tokens"] > 0
    assert fp32["max_abs_token"] < 1e-4 and abs(fp32["kl_per_token"]) < 1e-6
    assert bf16["mean_abs_token"] > 1e-4 and bf16["mean_abs_token"] > 100 * fp32["mean_abs_token"]


def test_frozen_gap_is_zero_only_for_a_reference_of_the_policys_dtype(setup, tok):
    """bf16_gap.frozen_gap (the README's step-0 KL of --frozen-dtype bfloat16): exactly 0 against an fp32
    copy of the policy, not 0 against a bf16 one."""
    from bf16_gap import frozen_gap
    prompts = [salsa.prompt_ids(tok, p) for p in PROMPTS[:3]]
    policy = salsa.load_model(setup["a"], tok)
    same = frozen_gap(policy, salsa.load_model(setup["a"], tok), tok, prompts, 0.7, 8, seed=0)
    bf16 = frozen_gap(policy, salsa.load_model(setup["a"], tok, dtype="bfloat16"), tok, prompts, 0.7, 8, seed=0)
    assert same["tokens"] == bf16["tokens"] > 0
    assert same["kl_min"] == same["kl_max"] == 0
    assert bf16["kl_max"] - bf16["kl_min"] > 1e-3


def test_saved_policy_answers_greedily_whatever_the_seed(setup, tok):
    """A PPO policy saved after its rollouts (temperature 0.7) answers eval.py at --temperature 0 the
    same way under every seed: greedy is greedy, no sampling setting travels with the checkpoint."""
    import eval as ev
    d = setup["dir"]
    run("ppo.py", *ppo_args(setup, d / "greedy", "--ref", "sft", "--model", setup["a"], "--steps", 1))
    questions = write_jsonl(d / "questions.jsonl", [{"prompt_id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS[:3])])

    def answers(seed, temperature):
        out = d / f"greedy-seed{seed}-t{temperature}.jsonl"
        ev.answer(ev.Args(model=str(d / "greedy"), questions=questions, out=str(out), max_new_tokens=8, seed=seed,
                          temperature=temperature))
        return [r["choices"][0]["turns"] for r in salsa.read_jsonl(out)]
    assert answers(1, 0.0) == answers(2, 0.0) == answers(3, 0.0)
    assert answers(1, 1.0) != answers(2, 1.0)  # sampled, the seeds do differ: the test can tell


def test_kl_is_zero_for_sft_and_positive_for_soup_and_mkl_is_the_mean(setup):
    """Also KL(π‖π_init), the same quantity for every reference, the gold judge on the rollouts, the soup's α, the
    missing-EOS penalty, and a micro-batch size that leaves the gradient as it is."""
    d = setup["dir"]
    run("ppo.py", *ppo_args(setup, d / "k_sft", "--ref", "sft", "--model", setup["a"], "--steps", 2,
                            "--kl-estimator", "k3", "--gold", "py:tests.goldprobe:score"), env={"GOLD_LOG": d / "gold"})
    run("ppo.py", *ppo_args(setup, d / "k_soup", "--ref", "soup", "--soup-models", setup["a"], setup["b"], "--steps", 2,
                            "--critic", "head", "--missing-eos-penalty", 5))
    run("ppo.py", *ppo_args(setup, d / "k_other", "--ref", "soup", "--model", setup["a"], "--soup", setup["b"],
                            "--steps", 1))
    run("ppo.py", *ppo_args(setup, d / "k_mkl", "--ref", "mkl", "--soup-models", setup["a"], setup["b"], "--steps", 1))
    # eq. 3 at α 1 is the second model alone; k_other again with the minibatch in one micro-batch of 4, not 2 of 2
    run("ppo.py", *ppo_args(setup, d / "k_alpha1", "--ref", "soup", "--soup-models", setup["a"], setup["b"], "--alpha", 1,
                            "--steps", 1))
    run("ppo.py", *ppo_args(setup, d / "k_other4", "--ref", "soup", "--model", setup["a"], "--soup", setup["b"],
                            "--steps", 1, "--micro-batch", 4))
    sft, soup, other, mkl, alpha1, other4 = (first_row(d / n) for n in ("k_sft", "k_soup", "k_other", "k_mkl",
                                                                        "k_alpha1", "k_other4"))
    assert sft["objective/kl"] == 0.0
    assert soup["objective/kl"] > 0.0
    assert alpha1["objective/kl"] == pytest.approx(other["objective/kl"], rel=1e-6) and other["objective/kl"] > 0
    # the loss is a token mean over the whole minibatch however it is split: the same gradient
    assert other4["ppo/grad_norm_last"] == pytest.approx(other["ppo/grad_norm_last"], rel=1e-4)
    # the same rollouts (one seed) and reward model: --missing-eos-penalty 5 against 1 takes 4 more from each
    # response that did not stop (here every one: a stopped one is spared in the test after this one)
    assert sft["objective/no_eos_frac"] == soup["objective/no_eos_frac"] > 0
    assert soup["objective/score"] == pytest.approx(sft["objective/score"] - 4 * sft["objective/no_eos_frac"], abs=1e-5)
    # KL to init: 0 while π = π_init (step 1) whatever the reference, then the k1 estimate of the policy's drift
    assert [r["objective/kl_init"] for r in (sft, soup, other, mkl)] == [0.0] * 4
    sft2, soup2 = (salsa.read_jsonl(f"{d / n}.ckpt/metrics.jsonl")[1] for n in ("k_sft", "k_soup"))
    assert soup2["objective/kl_init"] != 0.0 and soup2["objective/kl_init"] != soup2["objective/kl"]
    assert sft2["objective/kl"] != sft2["objective/kl_init"] != 0.0  # the reference's KL is k3 here, kl_init k1
    judged = salsa.read_jsonl(str(d / "gold"))  # the gold judge saw each rollout's prompt as given and its text
    assert len(judged) == 8 and {j["prompt"] for j in judged} <= set(PROMPTS)
    samples = salsa.read_jsonl(f"{d / 'k_sft'}.ckpt/samples.jsonl")  # step 1's 4 rollouts, in batch order
    assert [j["response"] for j in judged[:4]] == [s["response"].strip() for s in samples]
    assert all(j["prompt"] in s["prompt"] for j, s in zip(judged[:4], samples))  # each with its own prompt
    assert sft["objective/gold"] == pytest.approx(sum(len(j["response"].split()) for j in judged[:4]) / 4)
    assert sft["objective/response_len"] == soup["objective/response_len"]  # same seed, same samples
    # eq. 5: 1/2·KL(π‖π_a) + 1/2·KL(π‖π_b), and KL(π‖π_a) = 0 at step 0 since π = π_a
    assert mkl["objective/kl"] == pytest.approx(0.5 * other["objective/kl"], rel=1e-5)
    for n in ("k_sft", "k_soup"):  # the final policy loads with transformers, its critic beside it
        assert isinstance(AutoModelForCausalLM.from_pretrained(d / n), torch.nn.Module)
    assert salsa.load_reward_model(str(d / "k_sft" / "critic")).config.reward_bias == 0.0  # --critic reward
    salsa.check_vocabularies([str(d / "k_sft"), str(d / "k_sft" / "critic")])  # it has the tokenizer: a --reward
    assert (d / "k_soup" / "value_head.safetensors").exists()  # --critic head


def test_the_missing_eos_penalty_spares_responses_that_stop(setup, tmp_path, monkeypatch):
    """--missing-eos-penalty comes off each response with no EOS and nothing off one that stopped. The tiny
    models never stop by themselves, so two rollouts of each batch are made to (their second token an EOS)."""
    real = ppo.rollout

    def two_stop(model, prompt, prompt_mask, cfg, synced):
        seq, P = real(model, prompt, prompt_mask, cfg, synced)[0], prompt.shape[1]
        seq[:2, P + 1] = cfg.eos_token_id
        resp_mask, has_eos = ppo.response_mask(seq[:, P:], cfg.eos_token_id)
        return seq, torch.cat([prompt_mask, resp_mask], 1), resp_mask, has_eos
    monkeypatch.setattr(ppo, "rollout", two_stop)
    first = {}
    for penalty in (1, 5):
        ppo.main(salsa.parse_args(ppo.Args, list(map(str, ppo_args(setup, tmp_path / f"p{penalty}", "--ref", "sft",
                                                                   "--model", setup["a"], "--steps", 1,
                                                                   "--missing-eos-penalty", penalty)))))
        first[penalty] = first_row(tmp_path / f"p{penalty}")
    frac = first[1]["objective/no_eos_frac"]
    assert 0 < frac <= 0.5 and first[5]["objective/no_eos_frac"] == frac
    assert first[5]["objective/score"] == pytest.approx(first[1]["objective/score"] - 4 * frac, abs=1e-5)


def test_bad_arguments_stop_before_any_output(setup, tmp_path):
    """Each bad flag, model or data file is one InputError naming it, and leaves nothing behind (no OUT, no
    OUT.ckpt), nor deletes the log of an earlier run that died before its first checkpoint (a fresh start does)."""
    a, b = setup["a"], setup["b"]
    died = tmp_path / "out.ckpt"
    died.mkdir()
    (died / "metrics.jsonl").write_text('{"step": 1}\n')
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi"}, {"messages": "Hi"}])
    nan = tmp_path / "nan"  # found only when loaded, after every flag and the data are checked
    shutil.copytree(a, nan)
    weights = load_file(nan / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    other = tmp_path / "other-vocab"  # a reference whose token ids mean other words than the policy's
    shutil.copytree(b, other)
    t = json.loads((other / "tokenizer.json").read_text())
    t["model"]["vocab"]["hello-there"] = t["model"]["vocab"].pop("hello")
    (other / "tokenizer.json").write_text(json.dumps(t))
    cases = [(["--ref", "soup", "--soup-models", a], "--ref soup needs --soup-models A B"),
             (["--ref", "sft", "--model", tmp_path / "nope"], "nope: no such model directory"),
             (["--ref", "soup", "--soup-models", a, b, "--alpha", 1.5], r"--alpha 1\.5: a soup weight lies in \[0, 1\]"),
             (["--ref", "soup", "--model", a, "--soup", other], "other-vocab: its vocabulary .* differs"),
             (["--ref", "sft", "--model", a, "--temperature", 0], "--temperature 0.0: PPO samples"),
             (["--ref", "sft", "--model", a, "--temperature", -0.7], "--temperature -0.7: PPO samples"),
             (["--ref", "sft", "--model", a, "--batch-size", 1], "--batch-size must be 2 or more"),
             (["--ref", "sft", "--model", a, "--batch-size", 3], "--batch-size 3 must split evenly"),
             (["--ref", "sft", "--model", a, "--batch-size", 64], "usable prompts, fewer than --batch-size 64"),
             (["--ref", "sft", "--model", a, "--data", bad], "bad.jsonl line 2: "),
             (["--ref", "sft", "--model", nan], "nan: tensor model.norm.weight holds NaN or inf")]
    for flags, message in cases:
        with pytest.raises(salsa.InputError, match=message):
            ppo.main(salsa.parse_args(ppo.Args, list(map(str, ppo_args(setup, tmp_path / "out", *flags)))))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "nan", "other-vocab", "out.ckpt"], flags
        assert os.listdir(died) == ["metrics.jsonl"] and (died / "metrics.jsonl").read_text() == '{"step": 1}\n', flags
    p = run("ppo.py", *ppo_args(setup, tmp_path / "out", "--ref", "soup", "--soup-models", a), check=False)
    assert p.returncode == 2 and p.stderr.splitlines()[-1].startswith("error: --ref soup needs --soup-models")


def test_long_prompts_are_dropped_and_named(setup, tok, tmp_path, capsys):
    rows = [{"prompt": p} for p in PROMPTS] + [{"prompt": "word " * 300}, {"messages": [{"role": "user", "content": "Hi"}]},
                                               {"messages": [{"role": "user", "content": "Hi<|im_end|>\n<|im_start|>x"}]}]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    args = salsa.parse_args(ppo.Args, ["--data", data, "--max-prompt-len", "64"])
    assert len(ppo.load_prompts(args, tok)) == 9
    out = capsys.readouterr().out
    assert f"dropped 1 prompts longer than --max-prompt-len 64: {data} line 9" in out
    assert f"dropped 1 prompts that write a special token as text (e.g. '<|im_start|>'" in out and f"{data} line 11" in out


def test_frozen_models_in_bf16(setup, tok, tmp_path, monkeypatch):
    """--frozen-dtype bfloat16 holds the reference(s) and the reward model in bf16 (half their memory);
    their heads still run in fp32 (salsa.token_logprobs, salsa.reward_scores)."""
    args = salsa.parse_args(ppo.Args, ["--ref", "mkl", "--soup-models", setup["a"], setup["b"], "--reward",
                                       setup["rm"], "--frozen-dtype", "bfloat16"])
    ppo.check_args(args)
    refs, init = ppo.load_references(args, tok, salsa.Dist())
    assert [r.dtype for r, _ in refs] == [torch.bfloat16] * 2 and not any(p.requires_grad for r, _ in refs
                                                                           for p in r.parameters())
    assert init is refs[0][0]  # mkl's first reference is the policy's init: KL(π‖π_init) needs no third model
    ids, mask = salsa.pad([salsa.prompt_ids(tok, "Hi") + [5, 6, tok.eos_token_id]], tok.pad_token_id)
    logp, _, _ = ppo.response_logprobs(refs[0][0], ids, mask, ids.shape[1] - 3, 0.7)
    assert logp.dtype == torch.float32
    loaded, real = [], salsa.load_reward_model  # the reward model is loaded in main: one step, each load's dtype
    monkeypatch.setattr(salsa, "load_reward_model", lambda *a, **k: loaded.append(m := real(*a, **k)) or m)
    ppo.main(salsa.parse_args(ppo.Args, list(map(str, ppo_args(setup, tmp_path / "bf16", "--ref", "sft", "--model",
                                                               setup["a"], "--steps", 1, "--frozen-dtype", "bfloat16")))))
    assert [m.dtype for m in loaded] == [torch.float32, torch.bfloat16]  # the trained critic, the frozen reward model


def test_resume_after_kill_gives_identical_metrics(setup):
    d = setup["dir"]
    extra = ("--ref", "soup", "--soup-models", setup["a"], setup["b"], "--steps", 6, "--sample-every", 1)
    run("ppo.py", *ppo_args(setup, d / "full", *extra))
    cut = ppo_args(setup, d / "cut", *extra)
    proc = subprocess.Popen([sys.executable, str(ROOT / "ppo.py"), *map(str, cut)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    log = d / "cut.ckpt" / "metrics.jsonl"  # killed a step past its checkpoint at step 2: that step is redone
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (d / "cut").exists(), "the run finished before it could be killed"
    with open(log, "a") as fh:  # as if killed while writing a row: the resume drops the cut line
        fh.write('{"step": 4, "objective/sc')
    other = run("ppo.py", *cut, "--resume", "--lr", 3e-4, check=False)  # its checkpoint was made at another lr
    assert other.returncode == 2 and "made with other flags or data (lr)" in other.stderr, other.stderr[-2000:]
    run("ppo.py", *cut, "--resume")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))} for r in rows]
    full_rows = {r["step"]: r for r in strip(salsa.read_jsonl(d / "full.ckpt" / "metrics.jsonl"))}
    cut_rows = strip(salsa.read_jsonl(d / "cut.ckpt" / "metrics.jsonl"))  # steps redone after the kill: once
    assert sorted(full_rows) == [r["step"] for r in cut_rows] == list(range(1, 7))
    assert all(r == full_rows[r["step"]] for r in cut_rows)  # every logged number identical
    samples = [salsa.read_jsonl(d / f"{n}.ckpt" / "samples.jsonl") for n in ("full", "cut")]
    assert samples[0] == samples[1] and [r["step"] for r in samples[0]] == [s for s in range(1, 7) for _ in range(4)]
    wa, wb = (AutoModelForCausalLM.from_pretrained(d / n).state_dict() for n in ("full", "cut"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_learns_a_trivial_preference(setup, tok):
    """SFT a tiny model to answer 'yes' or 'no', train a reward model that prefers 'yes' (over 'no'
    and over an empty answer), then PPO: the score rises and the KL to the SFT grows from 0."""
    d = setup["dir"] / "learn"
    d.mkdir()
    qs = [f"Question {i}: is {w} good?" for i, w in enumerate(["tea", "rain", "sun", "code", "art", "math", "food",
                                                                "music", "sleep", "work", "play", "snow"] * 4)]
    user = lambda q: [{"role": "user", "content": q}]
    say = lambda a: [{"role": "assistant", "content": a}]
    sft_rows = [{"messages": user(q) + say("yes" if i % 2 else "no")} for i, q in enumerate(qs)]
    prefs = [{"prompt": q, "chosen": user(q) + say("yes"), "rejected": user(q) + say("no" if i % 2 else "")}
             for i, q in enumerate(qs)]
    run("sft.py", "--model", setup["a"], "--data", write_jsonl(d / "sft.jsonl", sft_rows), "--out", d / "sft",
        "--lr", 2e-2, "--batch-size", 8, "--max-len", 64, "--max-steps", 60, "--eval-every", 0, "--warmup-ratio", 0)
    run("reward.py", "--model", d / "sft", "--data", write_jsonl(d / "prefs.jsonl", prefs), "--out", d / "rm",
        "--lr", 1e-2, "--batch-size", 8, "--micro-batch", 8, "--max-len", 64, "--max-steps", 30,
        "--norm-samples", 16, "--norm-max-new-tokens", 4)
    run("ppo.py", "--ref", "sft", "--model", d / "sft", "--reward", d / "rm", "--out", d / "ppo",
        "--data", write_jsonl(d / "prompts.jsonl", [{"prompt": q} for q in qs]), "--batch-size", 8,
        "--max-new-tokens", 4, "--steps", 30, "--lr", 1e-3, "--temperature", 1.0, "--save-every", 100,
        "--value-lr", 1e-3)  # the whole critic at the policy's lr (TRL's convention): at 1e-4 it lags these 30 steps
    rows = salsa.read_jsonl(d / "ppo.ckpt" / "metrics.jsonl")
    score, kl = [r["objective/score"] for r in rows], [r["objective/kl"] for r in rows]
    assert kl[0] == 0.0
    assert sum(score[-5:]) / 5 > sum(score[:5]) / 5 + 0.5, score
    assert sum(kl[-5:]) / 5 > 0.2, kl
    last = [s["response"] for s in salsa.read_jsonl(d / "ppo.ckpt" / "samples.jsonl") if s["step"] == 30]
    assert last.count("yes") >= 3, last


def test_value_head_has_its_own_learning_rate(setup):
    """One Adam step moves every weight by at most its lr (by about lr where the gradient is not tiny):
    the value head by --value-lr, the policy by --lr."""
    from safetensors.torch import load_file
    d = setup["dir"]
    run("ppo.py", *ppo_args(setup, d / "vlr", "--ref", "sft", "--model", setup["a"], "--steps", 1, "--ppo-epochs", 1,
                            "--lr", 1e-6, "--value-lr", 1e-2, "--max-grad-norm", 1e9, "--critic", "head"))
    head = load_file(d / "vlr" / "value_head.safetensors")  # from zero
    moved = max(v.abs().max().item() for v in head.values())
    assert 0.5e-2 < moved <= 1.0001e-2
    before, after = load_file(Path(setup["a"]) / "model.safetensors"), load_file(d / "vlr" / "model.safetensors")
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0 < moved <= 1.2e-6  # plus rounding: a norm weight near 1 moves in steps of 1.2e-7


def test_whole_critic_starts_as_the_reward_model_of_each_prefix_and_trains_at_its_own_lr(setup, tok):
    """--critic reward: V at response position t is the reward model's normalised score of the prompt and
    y_<t (a slow reference: reward_scores on each truncated row); one Adam step moves the critic by at most
    --value-lr and the policy by at most --lr; the critic is saved as a reward-model directory."""
    from safetensors.torch import load_file
    rm = salsa.load_reward_model(setup["rm"])
    rm.config.reward_bias, rm.config.reward_gain = 0.3, 1.7  # the normalisation must be applied too
    policy = ppo.PolicyWithValue(salsa.load_model(setup["a"], tok), rm)
    prompt, pmask = salsa.pad([salsa.prompt_ids(tok, p) for p in PROMPTS[:3]], tok.pad_token_id)
    seq, mask, rmask, _ = ppo.rollout(policy, prompt, pmask, salsa.generation_config(tok, 0.7, 5), False)
    P = prompt.shape[1]
    with torch.no_grad():
        _, _, v = policy(seq, mask, P, 0.7)  # (B, R)
        for i in range(seq.shape[0]):
            for t in range(int(rmask[i].sum())):
                ref = salsa.reward_scores(rm, seq[i:i + 1, :P + t], mask[i:i + 1, :P + t])
                assert v[i, t].item() == pytest.approx(ref.item(), abs=1e-5)
    d = setup["dir"]
    run("ppo.py", *ppo_args(setup, d / "clr", "--ref", "sft", "--model", setup["a"], "--steps", 1, "--ppo-epochs", 1,
                            "--lr", 1e-6, "--value-lr", 1e-3, "--max-grad-norm", 1e9))
    assert not (d / "clr" / "value_head.safetensors").exists()
    before, after = load_file(Path(setup["rm"]) / "model.safetensors"), load_file(d / "clr" / "critic" / "model.safetensors")
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0.5e-3 < moved <= 1.0001e-3
    before, after = load_file(Path(setup["a"]) / "model.safetensors"), load_file(d / "clr" / "model.safetensors")
    assert 0 < max((after[k] - before[k]).abs().max().item() for k in before) <= 1.2e-6
