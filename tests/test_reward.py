"""reward.py and salsa's reward-model helpers: the Bradley-Terry loss by hand, the scored token under
left and right padding, the script end to end (1 process and torchrun x2), and bad rows."""
import json
import math
import os
import signal
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import reward
import salsa

ROOT = Path(__file__).resolve().parents[1]
WORDS = "apple river stone cloud green seven table music quiet north".split()


def write_pairs(path, n, seed, long_every=0):
    """Trivially separable preferences: the chosen answer says "yes yes", the rejected "no no".
    Every `long_every`-th prompt is too long for --max-len 64 and must be dropped."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as fh:
        for i in range(n):
            k = 40 if long_every and i % long_every == 0 else int(torch.randint(2, 7, (1,), generator=g))
            q = " ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (k,), generator=g)) + "?"
            user = {"role": "user", "content": q}
            fh.write(json.dumps({"prompt": q, "chosen": [user, {"role": "assistant", "content": "yes yes"}],
                                 "rejected": [user, {"role": "assistant", "content": "no no"}]}) + "\n")
    return str(path)


def reward_cmd(tiny, tmp, out, *extra, nproc=1):
    train, held = write_pairs(tmp / "train.jsonl", 70, 0, long_every=10), write_pairs(tmp / "eval.jsonl", 32, 1)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                   f"--nproc_per_node={nproc}", "--standalone"]
    return launch + ["reward.py", "--model", tiny, "--data", train, "--eval-data", held, "--lr", "1e-3",
                     "--batch-size", "8", "--micro-batch", "4", "--max-steps", "16",
                     "--eval-every", "8", "--max-len", "64", "--norm-samples", "12", "--norm-max-new-tokens", "12",
                     "--out", str(out), *extra]


def run_reward(tiny, tmp, out, *extra, nproc=1):
    res = subprocess.run(reward_cmd(tiny, tmp, out, *extra, nproc=nproc), cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res, json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reward")
    res, metrics = run_reward(tiny, tmp, tmp / "rm")
    return tmp, res, metrics


def test_bt_loss_by_hand():
    zero, two = torch.tensor([0.0]), torch.tensor([2.0])
    assert reward.bt_loss(zero, zero).item() == pytest.approx(math.log(2))  # r_w = r_l: a coin flip
    assert reward.bt_loss(two, zero).item() == pytest.approx(math.log(1 + math.exp(-2)))
    assert reward.bt_loss(zero, two).item() == pytest.approx(math.log(1 + math.exp(2)))
    both = reward.bt_loss(torch.tensor([0.0, 3.0]), torch.tensor([0.0, 1.0])).item()  # batch mean
    assert both == pytest.approx((math.log(2) + math.log(1 + math.exp(-2))) / 2)


def test_reward_scores_ignore_padding_on_both_sides(tiny, tok):
    rm = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1).eval()
    rm.config.reward_bias = 0.0
    seqs = [[5, 17, 300, 42, 2], [9, 2], [1, 77, 78, 79, 80, 81, 2]]
    with torch.no_grad():  # reference: HF's own forward on each sequence alone (no padding at all)
        alone = torch.tensor([rm(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs])
        lefts, rights, T = [2, 6, 0], [1, 0, 1], 8  # pads before and after each row's real tokens
        ids, mask = torch.full((3, T), tok.pad_token_id), torch.zeros(3, T, dtype=torch.long)  # (B, T)
        for i, (s, l, r) in enumerate(zip(seqs, lefts, rights)):
            assert l + len(s) + r == T
            ids[i, l:l + len(s)], mask[i, l:l + len(s)] = torch.tensor(s), 1
        got = salsa.reward_scores(rm, ids, mask)
        assert got.dtype == torch.float32 and got.shape == (3,)
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
        scrambled = torch.where(mask.bool(), ids, torch.randint(3, 1000, ids.shape))  # any id on a pad
        torch.testing.assert_close(salsa.reward_scores(rm, scrambled, mask), alone, atol=1e-5, rtol=1e-5)
        rm.config.reward_bias = 0.75
        torch.testing.assert_close(salsa.reward_scores(rm, ids, mask), alone - 0.75, atol=1e-5, rtol=1e-5)
        rm.config.reward_gain = 2.5  # the gain scales after the bias is taken off
        torch.testing.assert_close(salsa.reward_scores(rm, ids, mask), (alone - 0.75) * 2.5, atol=1e-5, rtol=1e-5)


def test_reward_end_to_end(trained, tok):
    tmp, res, metrics = trained
    # 70 rows, every 10th too long for --max-len 64: the count and the first lines of the file
    assert f"train.jsonl: 63 pairs\n" in res.stdout
    assert (f"train.jsonl: dropped 7 pairs with a side longer than --max-len 64: {tmp}/train.jsonl line 1; "
            f"{tmp}/train.jsonl line 11; {tmp}/train.jsonl line 21; and 4 more") in res.stdout
    assert metrics["eval/accuracy"] >= 0.9 and metrics["eval/loss"] < 0.2  # log 2 = 0.69 at chance
    logged = salsa.read_jsonl(str(tmp / "rm.ckpt" / "metrics.jsonl"))
    assert [r["step"] for r in logged[:-1]] == list(range(1, 17)) and "eval/accuracy" in logged[7]
    assert logged[0]["train/loss"] > 0.5 and logged[-2]["train/loss"] < 0.2

    rm = salsa.load_reward_model(str(tmp / "rm"))
    assert rm.config.reward_bias == pytest.approx(metrics["norm/bias"]) and not rm.training
    assert rm.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    samples = json.loads((tmp / "rm" / "norm_samples.json").read_text())
    assert len(samples) == 12
    with torch.no_grad():
        scores = torch.cat([salsa.reward_scores(rm, *salsa.pad([s["ids"]], tok.pad_token_id)) for s in samples])
    assert abs(scores.mean().item()) < 1e-4  # normalised: the SFT samples average 0 with a spread of 1
    assert scores.std().item() == pytest.approx(1.0, abs=1e-4) and rm.config.reward_gain != 1.0
    assert metrics["norm/gain"] == pytest.approx(rm.config.reward_gain)
    torch.testing.assert_close(scores, torch.tensor([s["reward"] for s in samples]), atol=1e-4, rtol=0)

    eos_text = tok.decode([tok.eos_token_id])  # responses are decoded with their special tokens
    assert metrics["norm/no_eos_frac"] == sum(eos_text not in s["response"] for s in samples) / len(samples)
    # metrics.json's held-out numbers are the saved model's: recomputed from it, not the raw scores before
    held = reward.load_pairs(tok, str(tmp / "eval.jsonl"), "train", 64, salsa.Dist())
    again = reward.evaluate(rm, held, types.SimpleNamespace(micro_batch=4), salsa.Dist())
    for key in ("eval/loss", "eval/margin", "eval/reward_mean", "eval/reward_std", "eval/accuracy"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-5), key

    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp / "rm"))  # any tool can load it
    ids = torch.tensor([samples[0]["ids"]])
    with torch.no_grad():
        raw = hf(input_ids=ids).logits[0, 0].item()
    assert (raw - hf.config.reward_bias) * hf.config.reward_gain == pytest.approx(scores[0].item(), abs=1e-4)


def test_reward_two_ranks_match_one(trained, tiny):
    """torchrun x2 (gloo) with a micro-batch per rank = 1 process with two micro-batches."""
    tmp, _, one = trained
    _, two = run_reward(tiny, tmp, tmp / "rm2", nproc=2)
    for key in ("eval/loss", "eval/margin", "eval/accuracy", "norm/bias"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key


def test_resume_after_kill_gives_the_uninterrupted_run(trained, tiny):
    """Killed (-9) after a checkpoint and a step past it, then --resume: the same final metrics
    (held-out accuracy, loss, normalisation bias) and weights as the run never stopped, and each step
    logged once."""
    from safetensors.torch import load_file
    tmp, _, want = trained
    out = tmp / "resumed"
    cmd = reward_cmd(tiny, tmp, out, "--save-every", "4")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = Path(f"{out}.ckpt/metrics.jsonl")
    while proc.poll() is None and not (salsa.latest_checkpoint(f"{out}.ckpt") and log.read_text().count("\n") > 4):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists(), "the run ended before it could be killed"
    subprocess.run(cmd + ["--resume"], cwd=ROOT, check=True, capture_output=True)
    assert json.loads((out / "metrics.json").read_text()) == want
    w, ref = load_file(out / "model.safetensors"), load_file(tmp / "rm" / "model.safetensors")
    assert w.keys() == ref.keys() and all(torch.equal(w[k], ref[k]) for k in ref)
    steps = [r["step"] for r in salsa.read_jsonl(log)]
    assert steps == list(range(1, 17)) + [16]  # the last row is the final evaluation


def test_norm_fallback_standardises_held_out_pairs(tiny, tok, tmp_path):
    _, metrics = run_reward(tiny, tmp_path, tmp_path / "rm", "--norm-samples", "0", "--max-steps", "2")
    assert metrics["norm/source"] == "held-out chosen+rejected"
    assert not json.loads((tmp_path / "rm" / "norm_samples.json").read_text())
    rm = salsa.load_reward_model(str(tmp_path / "rm"))
    held = [reward.tokenize_pair(tok, json.loads(line), "eval") for line in open(tmp_path / "eval.jsonl")]
    with torch.no_grad():
        r_w, r_l = reward.pair_rewards(rm, held, "cpu")
    both = torch.cat([r_w, r_l])
    assert abs(both.mean().item()) < 1e-4 and both.std().item() == pytest.approx(1.0, abs=1e-4)


def test_pairs_without_a_preference_are_dropped_and_named(tok, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 6, 0)
    lines = open(data).read().splitlines()
    same = json.loads(lines[2])
    same["rejected"] = same["chosen"]  # chosen == rejected: the loss is log 2 whatever the model, nothing to learn
    lines[2] = json.dumps(same)
    Path(data).write_text("\n".join(lines) + "\n")
    special = json.loads(lines[4])
    special["rejected"][-1]["content"] += " <|endoftext|> and more"  # read as a control token, not as text
    lines[4] = json.dumps(special)
    Path(data).write_text("\n".join(lines) + "\n")
    pairs = reward.load_pairs(tok, data, "train", 64, salsa.Dist())
    assert len(pairs) == 4
    out = capsys.readouterr().out
    assert f"pairs.jsonl: dropped 1 pairs with `chosen` equal to `rejected`: {data} line 3" in out
    assert f"dropped 1 pairs that write a special token as text (e.g. '<|endoftext|>'" in out and f"{data} line 5" in out


@pytest.mark.parametrize("row, message", [
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]},
     "no assistant message"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "b"}]},
     "`rejected` must end with the assistant"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
     "`rejected`: message 0 is the assistant's, before any user message"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "must share the conversation"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "`rejected`"),
])
def test_bad_row_stops_before_any_output(tiny, tmp_path, row, message):
    data = write_pairs(tmp_path / "bad.jsonl", 5, 0)
    lines = open(data).read().splitlines()
    lines[3] = json.dumps(row)
    Path(data).write_text("\n".join(lines) + "\n")
    out = tmp_path / "rm"
    args = salsa.parse_args(reward.Args, ["--model", tiny, "--data", data, "--out", str(out)])
    with pytest.raises(salsa.InputError, match=f"bad.jsonl line 4.*{message}"):  # the file's fourth line
        reward.main(args)
    assert not out.exists() and not Path(f"{out}.ckpt").exists()


def test_accuracy_counts_a_tie_half():
    """A zero head scores every side alike: at chance, 0.5 a pair, not 0."""
    assert reward.agree(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, 1.0])).item() == 1.5


def test_a_backbone_that_does_not_load_is_refused(tmp_path, tiny, tok):
    """Weights saved under another prefix: transformers would init the backbone at random, and its load
    report is silenced (the new head is missing by design), so the reward model trained on noise."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(tiny, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    save_file({f"base_model.model.{k}": v for k, v in weights.items()}, tmp_path / "m" / "model.safetensors",
              metadata={"format": "pt"})
    args = salsa.parse_args(reward.Args, ["--model", str(tmp_path / "m")])
    with pytest.raises(salsa.InputError, match=r"backbone tensors were not in its weights \(e\.g\. model\."):
        reward.init_reward_model(args, tok)
    reward.init_reward_model(salsa.parse_args(reward.Args, ["--model", tiny]), tok)  # only the head is new: fine


def test_a_checkpoint_is_not_taken_for_a_reward_model(trained):
    """OUT.ckpt/step-N holds reward_bias 0 and reward_gain 1: PPO would train on raw rewards."""
    tmp, _, _ = trained
    shutil.copytree(tmp / "rm", tmp / "step")
    (tmp / "step" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(salsa.InputError, match="is a resumable checkpoint of reward.py"):
        salsa.load_reward_model(str(tmp / "step"))
    with pytest.raises(SystemExit):  # a negative clip norm would reverse the gradient
        salsa.parse_args(reward.Args, ["--max-grad-norm", "-1"])
