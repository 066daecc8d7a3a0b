"""FSDP2 under `torchrun --nproc_per_node 2` (CPU, gloo), against the same code in one process.

This file is also the worker: `python tests/test_fsdp.py MODEL OUT` (one process) and its torchrun
form load a tiny model through salsa (sharded when there are two ranks), score a fixed probe, take
one sft step on a fixed global batch split over the ranks, save the model, sample with a different
response length on each rank, and store what they saw in OUT/rank{r}.pt. `python tests/test_fsdp.py
ppo FLAGS...` runs ppo.py's main with responses that depend only on their prompt (fixed_rollout), so
one process and two ranks train on the same batch, and counts FSDP's gradient reduce-scatters.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ppo  # noqa: E402
import salsa  # noqa: E402
import sft  # noqa: E402

CHATS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in
         [("Is 2 > 1?", "Yes, it is."), ("Name a colour.", "Blue"), ("Say hi.", "Hi there, how are you today?"),
          ("Count to three, please, slowly.", "One, two, three.")]]


def worker(model_path: str, out: str):
    dist = salsa.setup_dist(0)
    tok = salsa.load_tokenizer(model_path)
    batch = [salsa.tokenize_chat(tok, m, 64) for m in CHATS]  # the global batch, 4 rows of different lengths
    probe, probe_mask = salsa.pad([ids for ids, _ in batch], tok.pad_token_id, device=dist.device)  # (4, T)
    model = salsa.load_model(model_path, tok, device=dist.device, dist=dist, train=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)  # before any forward gathers the root
    policy = salsa.shard(ppo.PolicyWithValue(salsa.load_model(model_path, tok, device=dist.device, dist=dist,
                                                              train=True)).to(dist.device), dist, train=True)
    with torch.no_grad():
        logp0, _ = salsa.token_logprobs(model, salsa.hidden_states(model, probe, probe_mask)[:, :-1], probe[:, 1:])
        policy_logp, _, _ = policy(probe, probe_mask, 3, 1.0)  # (4, T-3): the PPO path (lm nested in the root)

    nll, _ = sft.sft_nll(model, *sft.collate(batch[dist.rank::dist.world], tok.pad_token_id, dist.device))
    (nll / sft.n_labels(batch)).backward()
    grad_norm = salsa.full(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    opt.step()
    loss = salsa.all_sum(nll.detach(), dist) / sft.n_labels(batch)
    with torch.no_grad():
        logits = model(input_ids=probe, attention_mask=probe_mask).logits  # the sharded model's own forward
    salsa.save_model(f"{out}/model", model, tok, dist=dist)

    prompt, prompt_mask = salsa.pad([ids[:6] for ids, _ in batch[:2]], tok.pad_token_id, device=dist.device)
    cfg = salsa.generation_config(tok, 1.0, 2 + 6 * dist.rank)  # rank 1 samples 8 tokens, rank 0 only 2
    cfg.eos_token_id = -1  # no early stop: the lengths differ for sure
    seq, *_ = ppo.rollout(model, prompt, prompt_mask, cfg, synced=dist.world > 1)
    sharded = all(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    torch.save({"logp0": logp0, "policy_logp": policy_logp, "loss": loss, "grad_norm": grad_norm, "logits": logits,
                "rollout_len": seq.shape[1] - prompt.shape[1], "resharded": sharded}, f"{out}/rank{dist.rank}.pt")


def fixed_rollout(model, prompt, prompt_mask, gen_cfg, synced):
    """ppo.rollout's contract, with a response and EOS that depend on its prompt alone: the same rows whichever
    rank samples them, and however the batch is split. A prompt whose length is 3 mod 4 gets 9 tokens, others 1:
    of 4 prompts one token apart, however they are split, one rank holds 12 response tokens and the other 4, so
    a token mean over the batch is not the mean of the ranks' token means."""
    P, rows = prompt.shape[1], []
    for ids in (prompt[i][prompt_mask[i] > 0].tolist() for i in range(prompt.shape[0])):
        key = sum(ids) % 997
        n = 9 if len(ids) % 4 == 3 else 1
        rows.append([(key * (t + 7)) % 500 + 10 for t in range(n)] + [gen_cfg.eos_token_id])
    resp, _ = salsa.pad(rows, gen_cfg.pad_token_id, left=False, device=prompt.device)  # (B, R)
    resp_mask, has_eos = ppo.response_mask(resp, gen_cfg.eos_token_id)
    return torch.cat([prompt, resp], 1), torch.cat([prompt_mask, resp_mask], 1), resp_mask, has_eos


def ppo_worker(argv):
    """ppo.py's main on fixed rollouts; each rank writes how many gradient reduce-scatters FSDP made."""
    from torch.distributed.fsdp import FSDPModule
    # FSDP2's gradient reduce-scatter: reduce_scatter_single from torch 2.13, reduce_scatter_tensor before
    # (the device's torch 2.11)
    name = "reduce_scatter_single" if hasattr(torch.distributed, "reduce_scatter_single") else "reduce_scatter_tensor"
    calls, reduce_scatter, sharded, shard = [], getattr(torch.distributed, name), [], salsa.shard
    setattr(torch.distributed, name, lambda *a, **kw: calls.append(1) or reduce_scatter(*a, **kw))
    salsa.shard = lambda *a, **kw: sharded.append(isinstance(m := shard(*a, **kw), FSDPModule)) or m
    ppo.rollout = fixed_rollout
    bf16 = []
    if os.environ.get("CUDA_DTYPES"):  # FSDP2's CUDA policy on the CPU: bf16 compute, fp32 master weights and reduce
        from torch.distributed.fsdp import MixedPrecisionPolicy
        salsa.mixed_precision = lambda device: bf16.append(1) or MixedPrecisionPolicy(torch.bfloat16, torch.float32)
    args = salsa.parse_args(ppo.Args, argv)
    ppo.main(args)
    Path(f"{args.out}.ckpt", f"reduce_scatters{os.environ.get('RANK', 0)}").write_text(str(len(calls)))
    Path(f"{args.out}.ckpt", f"sharded{os.environ.get('RANK', 0)}").write_text(str(sum(sharded)))
    Path(f"{args.out}.ckpt", f"bf16_{os.environ.get('RANK', 0)}").write_text(str(len(bf16)))


def launch(tiny, out, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    res = subprocess.run(cmd + [__file__, tiny, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    return tmp, launch(tiny, tmp / "one", 1), launch(tiny, tmp / "two", 2)


def test_sharded_load_scores_like_one_process(runs):
    """Meta init + broadcast from rank 0 (RoPE buffers, tied embeddings) and hidden_states through the
    FSDP root give one process's log-probs, for the plain LM and for the PPO policy around it."""
    _, (one,), two = runs
    for r in two:
        torch.testing.assert_close(r["logp0"], one["logp0"], rtol=0, atol=1e-5)
        torch.testing.assert_close(r["policy_logp"], one["policy_logp"], rtol=0, atol=1e-5)


def test_sharded_step_matches_one_process(runs, tiny):
    """Half the global batch per rank, gradients summed by FSDP's reduce-scatter, AdamW on shards:
    the same loss, gradient norm and updated weights as the whole batch in one process."""
    from safetensors.torch import load_file
    tmp, (one,), (two, _) = runs
    assert two["loss"].item() == pytest.approx(one["loss"].item(), rel=1e-6)
    assert two["grad_norm"].item() == pytest.approx(one["grad_norm"].item(), rel=1e-5)
    w0 = load_file(Path(tiny) / "model.safetensors")
    w1, w2 = (load_file(tmp / d / "model" / "model.safetensors") for d in ("one", "two"))
    assert w1.keys() == w2.keys() == w0.keys()
    for k in w1:  # lr 1e-2 moves every weight by ~1e-2; the sharded step must land within fp32 noise of it
        assert (w1[k] - w0[k]).abs().max() > 1e-3, k
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)


def test_saved_checkpoint_loads_with_transformers(runs, tok):
    """The full state dict gathered to rank 0 is a plain HF directory: same logits as the sharded model."""
    from transformers import AutoModelForCausalLM
    tmp, _, (two, _) = runs
    hf = AutoModelForCausalLM.from_pretrained(tmp / "two" / "model")
    batch = [salsa.tokenize_chat(tok, m, 64) for m in CHATS]
    ids, mask = salsa.pad([i for i, _ in batch], tok.pad_token_id)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, two["logits"], rtol=0, atol=1e-5)
    assert hf.config.architectures == ["LlamaForCausalLM"]


def test_rollout_with_different_lengths_per_rank_does_not_hang(runs):
    """Rank 0 stops after 2 tokens and keeps stepping (synced_gpus) until rank 1 has its 8; the
    weights are sharded again afterwards. launch() bounds it with a timeout."""
    _, _, (r0, r1) = runs
    assert (r0["rollout_len"], r1["rollout_len"]) == (2, 8)
    assert r0["resharded"] and r1["resharded"]


def test_bad_model_under_torchrun_stops_every_rank(tiny, tmp_path):
    """Rank 0 alone reads the weights (salsa.distribute): its InputError (here a NaN weight) must stop the
    other rank too, with the same one line, instead of leaving it waiting for the broadcast for ever."""
    from safetensors.torch import load_file, save_file
    nan = tmp_path / "nan"
    shutil.copytree(tiny, nan)
    w = load_file(nan / "model.safetensors")
    w["model.norm.weight"][0] = float("nan")
    save_file(w, nan / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "sft.py",
           "--model", nan, "--data", tmp_path / "chats.jsonl", "--batch-size", "2", "--eval-frac", "0",
           "--out", tmp_path / "out"]
    res = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode != 0 and len(errors) == 2, res.stderr[-2000:]  # one line per rank
    assert all(f"{nan}: tensor model.norm.weight holds NaN or inf" in e for e in errors), errors
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()


def test_ppo_under_torchrun_and_its_resume(tiny, tok, tmp_path):
    """ppo.py with an in-memory soup reference, sharded policy, soup and reward model; its sharded
    checkpoint (torch.distributed.checkpoint, each rank its own generators) resumed gives the same run."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification
    from conftest import make_tiny
    other = make_tiny(tmp_path / "other", tok, seed=5)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    rm.config.pad_token_id, rm.config.reward_bias = tok.pad_token_id, 0.0
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "Question {i}: yes or no?"}}\n' for i in range(8)))
    out = tmp_path / "ppo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "ppo.py",
           "--ref", "soup", "--soup-models", tiny, other, "--reward", tmp_path / "rm", "--data",
           tmp_path / "prompts.jsonl", "--out", out, "--batch-size", "4", "--micro-batch", "1",
           "--max-new-tokens", "5", "--steps", "3", "--save-every", "1", "--sample-every", "100"]

    def ppo_run(*extra):
        res = subprocess.run(list(map(str, cmd + list(extra))), cwd=ROOT, capture_output=True, text=True, timeout=180,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        rows = [{k: v for k, v in r.items() if not k.startswith(("time/", "mem/"))}
                for r in salsa.read_jsonl(f"{out}.ckpt/metrics.jsonl")]
        return rows, load_file(out / "model.safetensors"), load_file(out / "critic" / "model.safetensors")

    rows, weights, critic = ppo_run()  # --critic reward: a second trained network, sharded and resumed too
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["objective/kl"] != 0.0
    assert "lm_head.weight" not in weights and critic["score.weight"].shape == (1, 32)
    out.rename(tmp_path / "first")
    ckpt = Path(salsa.latest_checkpoint(f"{out}.ckpt"))
    assert ckpt.name == "step-00000002"
    # sharded: each rank wrote its own shards, and nothing gathered (no HF weights, no full optimizer state)
    assert sorted(f.name for f in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list(ckpt.glob("*.safetensors"))
    trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert isinstance(trainer_state["optimizer"], salsa.Sharded) and trainer_state["optimizer"].state == ""
    rows2, weights2, critic2 = ppo_run("--resume")
    by_step = {r["step"]: r for r in rows}  # ppo.py appends: the resumed run logs step 3 a second time
    assert {r["step"] for r in rows2} == {1, 2, 3} and all(r == by_step[r["step"]] for r in rows2)
    assert all(torch.equal(weights[k], weights2[k]) for k in weights) and all(torch.equal(critic[k], critic2[k]) for k in critic)


def test_ppo_update_under_fsdp_equals_one_process(tiny, tok, tmp_path):
    """One PPO step (2 epochs) on the same 4 rows: 2 ranks x 2 micro-batches, and torchrun's 1 rank x 4
    (FSDP2 at world size 1, the path `make gpu-check` takes on one GPU), against 1 process x 4.
    Embeddings, norms, every layer of the policy and of its critic (--critic reward) land where one process
    puts them; the metrics (score, KL, whitened advantages' losses, explained variance over every rank's
    tokens) agree; and FSDP reduces gradients once per optimizer step, not per micro-batch: 2 steps x 6
    FSDP units with parameters (2 layers and a root with embeddings, norm and head, for the LM and for the
    critic), where reducing every micro-batch makes 24."""
    from safetensors.torch import load_file
    from conftest import make_tiny
    other = make_tiny(tmp_path / "other", tok, seed=5)
    rm = tmp_path / "rm"
    shutil.copytree(tiny, rm)
    cfg = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps(cfg | {"architectures": ["LlamaForSequenceClassification"],
                                                      "num_labels": 1, "reward_bias": 0.0}))  # head from its init
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Question {i}: is {'yes ' * i}no?"}) + "\n"
                                                    for i in range(4)))
    flags = ["--ref", "soup", "--soup-models", tiny, other, "--reward", rm, "--data", tmp_path / "prompts.jsonl",
             "--batch-size", 4, "--micro-batch", 1, "--steps", 1, "--lr", 1e-3, "--value-lr", 1e-3, "--sample-every", 100]
    rows, weights = {}, {}
    for n, launch in ((1, []), (2, ["--nproc_per_node", "2"]), ("1 rank", ["--nproc_per_node", "1"])):
        out = tmp_path / f"ppo{n}".replace(" ", "")
        cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", *launch] if launch else []),
               __file__, "ppo", *flags, "--out", out]
        res = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=180,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr[-3000:]
        rows[n] = {k: v for k, v in salsa.read_jsonl(f"{out}.ckpt/metrics.jsonl")[0].items()
                   if not k.startswith(("time/", "mem/")) and k != "prompt_width"}  # timings; rank 0's rows are narrower
        weights[n] = load_file(out / "model.safetensors") | {f"critic.{k}": v for k, v in
                                                              load_file(out / "critic" / "model.safetensors").items()}
    assert rows[1]["objective/kl"] > 0 and rows[1].keys() == rows[2].keys() == rows["1 rank"].keys()
    for k in rows[1]:
        assert rows[2][k] == pytest.approx(rows[1][k], rel=1e-4, abs=1e-6), k
        assert rows["1 rank"][k] == pytest.approx(rows[1][k], rel=1e-4, abs=1e-6), k
    init = load_file(Path(tiny) / "model.safetensors")
    init |= {f"critic.{k}": v for k, v in init.items()}  # the critic starts as the reward model: tiny plus a new head
    assert weights[1].keys() == weights[2].keys() == init.keys() | {"critic.score.weight"}
    for k in weights[1]:  # lr 1e-3 moves every weight by ~1e-3 (Adam); the sharded update within fp32 noise of it
        moved = (weights[1][k] - init[k]).abs().max() if k in init else weights[1][k].abs().max()
        assert moved > 1e-4, k
        torch.testing.assert_close(weights[2][k], weights[1][k], rtol=0, atol=2e-6, msg=k)
        torch.testing.assert_close(weights["1 rank"][k], weights[1][k], rtol=0, atol=2e-6, msg=k)
    assert [int(Path(f"{tmp_path}/ppo2.ckpt/reduce_scatters{r}").read_text()) for r in (0, 1)] == [12, 12]
    sharded = [int((tmp_path / f"ppo{n}.ckpt" / "sharded0").read_text()) for n in ("1rank", "2", "1")]
    # the policy's LM, its critic and their wrapper, the soup, the init model, the reward model: under
    # torchrun, 1 rank or 2, every one is an FSDP module; in one process none is
    assert sharded[0] == sharded[1] == 6 and sharded[2] == 0



def test_ppo_under_fsdp_with_cuda_dtypes(tiny, tok, tmp_path):
    """The dtypes FSDP2 uses on CUDA (bf16 compute over fp32 master weights, fp32 gradient reduce), run on 2 CPU
    ranks, which CI has: the policy and its reference compute alike, so KL(π‖π_sft) is exactly 0 at the first
    step; the scoring pass and the training forward (with activation checkpointing) compute alike, so one epoch's
    single minibatch has ratio exactly 1 and clips nothing; and the fp32 master weights move and stay finite."""
    from safetensors.torch import load_file
    rm = tmp_path / "rm"
    shutil.copytree(tiny, rm)
    cfg = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps(cfg | {"architectures": ["LlamaForSequenceClassification"],
                                                      "num_labels": 1, "reward_bias": 0.0}))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Question {i}: is {'yes ' * i}no?"}) + "\n"
                                                    for i in range(4)))
    out = tmp_path / "ppo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "ppo",
           "--ref", "sft", "--model", tiny, "--reward", rm, "--data", tmp_path / "prompts.jsonl", "--batch-size", 4,
           "--micro-batch", 1, "--steps", 1, "--ppo-epochs", 1, "--lr", 1e-3, "--sample-every", 100, "--out", out]
    res = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_DTYPES": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    # every model was sharded with the bf16 policy: the LM, the critic and their wrapper, the reference, the reward model
    assert [int(Path(f"{out}.ckpt/bf16_{r}").read_text()) for r in (0, 1)] == [5, 5]
    m = salsa.read_jsonl(f"{out}.ckpt/metrics.jsonl")[0]
    assert m["objective/kl"] == 0.0 and m["objective/kl_init"] == 0.0
    assert m["ppo/ratio_mean"] == 1.0 and m["ppo/clipfrac"] == 0.0 and m["ppo/approx_kl"] == 0.0
    assert all(v == v and abs(v) != float("inf") for v in m.values() if isinstance(v, float)), m
    init, trained = load_file(Path(tiny) / "model.safetensors"), load_file(out / "model.safetensors")
    assert {v.dtype for v in trained.values()} == {torch.float32}  # the master weights, not their bf16 copies
    for k in init:
        assert torch.isfinite(trained[k]).all() and (trained[k] - init[k]).abs().max() > 1e-4, k


if __name__ == "__main__":
    if sys.argv[1] == "ppo":
        ppo_worker(sys.argv[2:])
    else:
        worker(*sys.argv[1:])
