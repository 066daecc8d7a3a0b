"""sft.py: assistant-only labels, the loss against plain HF cross-entropy, end-to-end runs on a tiny
model (the loss falls; seeds differ; micro-batches, two ranks and a killed-then-resumed run change
nothing), bad rows, and the shipped data/chat.jsonl."""
import json
import math
import re
import signal
import subprocess
import sys
import time
from itertools import groupby
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import salsa
import sft

ROOT = Path(__file__).resolve().parents[1]
EIGHT_STEPS = ("--max-steps", "8", "--save-every", "2", "--eval-every", "4")  # base, two-rank and resumed runs
TWO_TURNS = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."},
             {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "3 + 3 = 6."}]


def write_chats(path: Path) -> str:
    """40 short sums, one two-turn chat, and one whose user turn alone outlasts --max-len 64."""
    rows = [[{"role": "user", "content": f"What is {a} + {a % 7}?"}, {"role": "assistant", "content": f"{a + a % 7}."}]
            for a in range(40)]
    rows += [TWO_TURNS, [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return str(path)


def flags(tiny, data, out, *extra):
    return ["--model", tiny, "--data", data, "--out", str(out), "--max-len", "64", "--batch-size", "4",
            "--micro-batch", "2", "--lr", "1e-3", "--eval-frac", "0.1", *extra]


def run_inline(tiny, data, out, *extra) -> str:
    sft.main(salsa.parse_args(sft.Args, flags(tiny, data, out, "--max-steps", "3", "--save-every", "100", *extra)))
    return str(out)


def weights(out) -> dict:
    return load_file(f"{out}/model.safetensors")


def losses(out) -> list:
    return [(r["step"], r["train/loss"]) for r in salsa.read_jsonl(f"{out}.ckpt/metrics.jsonl")]


def test_labels_are_the_assistant_turns(tok):
    ids, labels = salsa.tokenize_chat(tok, TWO_TURNS, 512)
    assert all(lab in (-100, t) for t, lab in zip(ids, labels))
    runs = groupby(zip(ids, labels), key=lambda pair: pair[1] != -100)
    spans = [tok.decode([t for t, _ in run]) for labelled, run in runs if labelled]
    assert spans == ["2 + 2 = 4.<|im_end|>", "3 + 3 = 6.<|im_end|>"]
    prompt = tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
    assert "What is 2 + 2?" in prompt and "And 3 + 3?" in prompt and "SmolLM" in prompt  # default system turn
    assert "= 4" not in prompt and "= 6" not in prompt

    first = next(i for i, lab in enumerate(labels) if lab != -100)
    assert salsa.tokenize_chat(tok, TWO_TURNS, first) is None  # the answer starts past max_len
    cut_ids, cut_labels = salsa.tokenize_chat(tok, TWO_TURNS, first + 2)
    assert cut_ids == ids[:first + 2] and sum(lab != -100 for lab in cut_labels) == 2


def test_sft_loss_matches_hf_cross_entropy(tiny, tok):
    model = salsa.load_model(tiny, tok)
    chats = [TWO_TURNS, TWO_TURNS[:2], [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]]
    examples = [salsa.tokenize_chat(tok, m, 512) for m in chats]
    with torch.no_grad():
        nll, n = sft.sft_nll(model, *sft.collate(examples, tok.pad_token_id, "cpu"))
        ref = sum(F.cross_entropy(model(torch.tensor([ids])).logits[0, :-1], torch.tensor(labels[1:]), reduction="sum")
                  for ids, labels in examples)  # one unpadded row at a time, full-vocabulary logits
    assert n == sum(lab != -100 for _, labels in examples for lab in labels) == sft.n_labels(examples)
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-4)

    model.get_output_embeddings().weight.data.zero_()  # zero logits: every token costs log V nats
    with torch.no_grad():
        nll, n = sft.sft_nll(model, *sft.collate(examples, tok.pad_token_id, "cpu"))
    torch.testing.assert_close(nll.item(), n * math.log(len(tok)), rtol=1e-6, atol=1e-4)


@pytest.fixture(scope="module")
def base_run(tiny, tmp_path_factory):
    """An uninterrupted 8-step run as a subprocess; the resume test repeats it with a kill."""
    tmp = tmp_path_factory.mktemp("sft")
    data = write_chats(tmp / "chats.jsonl")
    args = flags(tiny, data, tmp / "base", *EIGHT_STEPS)
    subprocess.run([sys.executable, "sft.py", *args], cwd=ROOT, check=True, capture_output=True)
    return tmp, data, tmp / "base"


def test_end_to_end(base_run, tok):
    _, _, out = base_run
    rows = salsa.read_jsonl(f"{out}.ckpt/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.2
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["dropped"] == 1 and summary["train_conversations"] + summary["eval_conversations"] == 41
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_dropped_and_kept_rows_are_named(tiny, tmp_path, capsys):
    """Rows dropped for length, and conversations ending with a user turn (kept: their earlier answers
    are learnt), are counted and named by their line in the file."""
    data = Path(write_chats(tmp_path / "chats.jsonl"))  # line 42 is too long for --max-len 64
    with open(data, "a") as fh:
        fh.write(json.dumps({"messages": TWO_TURNS + [{"role": "user", "content": "And?"}]}) + "\n")
        # '<|im_end|>' written in an answer: tokenised as the end of turn, the rest of the answer never learnt
        fh.write(json.dumps({"messages": [{"role": "user", "content": "Show the template."},
                                          {"role": "assistant", "content": "It ends a turn with <|im_end|> then"}]}) + "\n")
    run_inline(tiny, str(data), tmp_path / "out")
    out = capsys.readouterr().out
    assert f"kept 1 conversations that end with a user turn (nothing after their last answer is learnt): {data} line 43" in out
    assert f"dropped 1 conversations whose first assistant token lies beyond --max-len 64: {data} line 42" in out
    assert (f"dropped 1 conversations that write a special token as text (e.g. '<|im_end|>', which the tokenizer reads "
            f"as a control token): {data} line 44") in out


def test_seeds_change_only_the_order(tiny, tmp_path):
    data = write_chats(tmp_path / "chats.jsonl")
    a, b, c = (weights(run_inline(tiny, data, tmp_path / name, "--seed", seed))
               for name, seed in [("a", "1"), ("b", "1"), ("c", "2")])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_the_held_out_rows_are_the_same_whatever_the_seed():
    """Every SFT model of a soup is scored on the same held-out rows and trained on the rest: --seed seeds torch's
    global generator, which the split must not draw from (then seeds 1 and 2 would train on different rows)."""
    chats = list(range(40))
    splits = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        splits.append(sft.hold_out(chats, 0.1))
    assert splits[0] == splits[1] and len(splits[0][1]) == 4 and sorted(sum(splits[0], [])) == chats


def test_micro_batches_weigh_tokens_like_one_batch(tiny, tmp_path):
    data = write_chats(tmp_path / "chats.jsonl")
    one = run_inline(tiny, data, tmp_path / "one", "--micro-batch", "4")
    four = run_inline(tiny, data, tmp_path / "four", "--micro-batch", "1")
    assert [loss for _, loss in losses(one)] == pytest.approx([loss for _, loss in losses(four)], rel=1e-6)
    w1, w4 = weights(one), weights(four)
    # 1e-5: Adam's g / sqrt(v) turns rounding in near-zero gradients into ~2e-6; weighting each
    # micro-batch's mean equally instead would move weights by ~3e-3.
    assert all(torch.allclose(w1[k], w4[k], atol=1e-5) for k in w1)


def test_two_ranks_give_the_one_process_run(base_run, tiny):
    tmp, data, base = base_run
    out = tmp / "two-ranks"
    args = flags(tiny, data, out, *EIGHT_STEPS)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "sft.py", *args],
                   cwd=ROOT, check=True, capture_output=True)
    assert [loss for _, loss in losses(out)] == pytest.approx([loss for _, loss in losses(base)], rel=1e-6)
    w, ref = weights(out), weights(base)
    assert all(torch.allclose(w[k], ref[k], atol=1e-5) for k in ref)  # 4e-6 measured: Adam on rounding, as above


def test_resume_gives_the_uninterrupted_run(base_run, tiny):
    tmp, data, base = base_run
    out = tmp / "resumed"
    args = [sys.executable, "sft.py", *flags(tiny, data, out, *EIGHT_STEPS)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ckpt_step():
        latest = salsa.latest_checkpoint(f"{out}.ckpt")
        return int(latest.rsplit("-", 1)[1]) if latest else None

    def logged():  # complete lines only: the run may be writing one
        return Path(f"{out}.ckpt/metrics.jsonl").read_text().count("\n")

    # Kill once a step past the first checkpoint is logged, so resuming must also forget that row.
    while proc.poll() is None and not (ckpt_step() and logged() > ckpt_step()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists(), "the run ended before it could be killed"
    resumed_at = ckpt_step()
    assert logged() > resumed_at
    text = Path(data).read_text()
    try:  # the data file regenerated in place (one row's answer changed): not the run this checkpoint is of
        Path(data).write_text(text.replace("What is 3 + 3?", "What is 3 + 4?", 1))
        other = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    finally:
        Path(data).write_text(text)
    assert other.returncode == 2 and "made with other flags or data (data_tokens)" in other.stderr, other.stderr[-2000:]
    subprocess.run(args + ["--resume"], cwd=ROOT, check=True, capture_output=True)
    w, ref = weights(out), weights(base)
    assert all(torch.equal(w[k], ref[k]) for k in ref)
    assert resumed_at < 8 and losses(out) == losses(base)  # every step logged once, the redone ones identical


def test_malformed_row_stops_before_any_output(tiny, tmp_path):
    data = Path(write_chats(tmp_path / "chats.jsonl"))
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:2] + ["{}"] + lines[2:]) + "\n")
    res = subprocess.run([sys.executable, "sft.py", *flags(tiny, str(data), tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True)
    # an input error is one line that names the file's line, and no traceback (those are for bugs)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[-1].startswith(f"error: {data} line 3: `messages` must be")
    assert list(tmp_path.iterdir()) == [data]

    data.write_text("\n".join(lines[:4] + ['{"messages": [{"role": "robot", "content": "hi"}]}'] + lines[4:]) + "\n")
    with pytest.raises(salsa.InputError, match=f"{re.escape(str(data))} line 5: message 0 must be"):
        sft.main(salsa.parse_args(sft.Args, flags(tiny, str(data), tmp_path / "out")))
    assert list(tmp_path.iterdir()) == [data]


def test_a_refused_run_keeps_an_earlier_runs_log(tiny, tmp_path):
    """A fresh start deletes the log of an earlier run that died before its first checkpoint, but only once
    its inputs are checked: a run refused for too few rows (found after OUT is checked) keeps it."""
    data = write_chats(tmp_path / "chats.jsonl")
    died = tmp_path / "out.ckpt"
    died.mkdir()
    (died / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(salsa.InputError, match="fewer than --batch-size 64"):
        sft.main(salsa.parse_args(sft.Args, flags(tiny, data, tmp_path / "out", "--batch-size", "64")))
    assert (died / "metrics.jsonl").read_text() == '{"step": 1}\n'
    run_inline(tiny, data, tmp_path / "out", "--max-steps", "1")  # a fresh start that runs: a log of its own
    assert [r["step"] for r in salsa.read_jsonl(died / "metrics.jsonl")] == [1]
    assert "train/loss" in salsa.read_jsonl(died / "metrics.jsonl")[0]


def test_chat_jsonl_is_correct_training_data(tok):
    path = ROOT / "data" / "chat.jsonl"
    assert path.stat().st_size <= 150_000
    chats = sft.read_chats(str(path), "train")
    assert len(chats) >= 300 and any(len(m) > 2 for _, m in chats)
    sums = 0
    for _, messages in chats:
        for q, a in zip(messages[::2], messages[1::2]):
            if m := re.fullmatch(r"What is (\d+) (\+|-|times) (\d+)\?", q["content"]):
                x, op, y = int(m[1]), m[2], int(m[3])
                assert a["content"].endswith(f"= {x + y if op == '+' else x - y if op == '-' else x * y}.")
                sums += 1
    assert sums >= 60
