"""Tests of the shared module salsa.py: each function against hand-computed values (STYLE tier b)
or a slow, obviously-correct reference (tier c).

    .venv/bin/python -m pytest -q tests/test_salsa.py
"""
import copy
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import salsa

TEMP = 0.7


# ---------------------------------------------------------------- log-probs
@pytest.fixture(scope="module")
def sharp(tiny, tok):
    """The tiny model with its final norm scaled up: at init the logits are nearly uniform
    (std ~0.1), which would let a wrong log-prob pass any tolerance."""
    model = salsa.load_model(tiny, tok)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def batch(tok):
    """Real chat prompts of different lengths, each followed by random 'response' tokens."""
    g = torch.Generator().manual_seed(0)
    prompts = ["Hi", "Name three rivers in Europe, please.", "2+2?"]
    return [salsa.prompt_ids(tok, p) + torch.randint(3, len(tok), (n,), generator=g).tolist()
            for p, n in zip(prompts, (5, 2, 9))]


def reference_logprobs(model, seq):
    """One unpadded sequence, the textbook way: full logits, / T, log_softmax, pick the next token."""
    ids = torch.tensor([seq])  # (1, L)
    logp_all = torch.log_softmax(model(ids).logits[0, :-1].float() / TEMP, dim=-1)  # (L-1, V)
    return logp_all.gather(-1, ids[0, 1:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def batched_logprobs(model, tok, batch, **kw):
    ids, mask = salsa.pad(batch, tok.pad_token_id)  # (B, T)
    hidden = salsa.hidden_states(model, ids, mask)  # (B, T, d)
    return salsa.token_logprobs(model, hidden[:, :-1], ids[:, 1:], temperature=TEMP, **kw)  # (B, T-1)


def real(x, batch):
    """The positions of a left-padded (B, T-1) tensor whose state and target are both real tokens."""
    return [row[len(row) + 1 - len(seq):] for row, seq in zip(x, batch)]


def test_token_logprobs_match_unpadded_reference(sharp, tok, batch):
    with torch.no_grad():
        logp, ent = batched_logprobs(sharp, tok, batch)
        for got_lp, got_ent, seq in zip(real(logp, batch), real(ent, batch), batch):
            want_lp, want_ent = reference_logprobs(sharp, seq)
            assert want_lp.std() > 0.5  # the logits are far from uniform, so the check has teeth
            torch.testing.assert_close(got_lp, want_lp, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_ent, want_ent, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()  # padded positions too: masks multiply them


def test_token_logprobs_chunked_equals_one_chunk(sharp, tok, batch):
    """Values and parameter gradients of many small checkpointed chunks equal one big chunk."""
    vocab = sharp.get_output_embeddings().weight.shape[0]
    n = sum(len(s) - 1 for s in batch)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(len(s) - 1, generator=g) for s in batch]

    def values_and_grads(max_logits):
        sharp.zero_grad()
        logp, ent = batched_logprobs(sharp, tok, batch, max_logits=max_logits)
        loss = sum((w * lp).sum() + (w * e).sum() for w, lp, e in zip(weights, real(logp, batch), real(ent, batch)))
        loss.backward()
        return logp.detach(), ent.detach(), {k: p.grad.clone() for k, p in sharp.named_parameters()}

    one = values_and_grads(2**27)
    many = values_and_grads(5 * vocab)  # 5 rows per chunk
    assert n > 10 * 5
    torch.testing.assert_close(many[0], one[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(many[1], one[1], atol=1e-5, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in one[2].values())  # every parameter takes part in the check
    for k, want in one[2].items():  # summation order differs across chunks: fp32 error relative to the largest entry
        torch.testing.assert_close(many[2][k], want, atol=1e-4 * want.abs().max().item(), rtol=1e-4, msg=k)
    sharp.zero_grad()

    with torch.no_grad():
        for got, want in zip(batched_logprobs(sharp, tok, batch, max_logits=5 * vocab), one[:2]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_token_logprobs_of_a_bf16_model_come_from_an_fp32_matmul(tiny, tok):
    """Under FSDP's bf16 compute the final states and the head are bf16; a bf16 matmul would round the
    logits (~0.015 nats per token: PPO's KL budget over an answer). Reference: float64 on the same values."""
    model = salsa.load_model(tiny, tok, dtype="bfloat16")
    g = torch.Generator().manual_seed(0)
    h = (50 * torch.randn(64, model.config.hidden_size, generator=g)).bfloat16()  # (N, d): logits of several nats
    targets = torch.randint(len(tok), (64,), generator=g)
    with torch.no_grad():
        logp, ent = salsa.token_logprobs(model, h, targets, TEMP)
        w = model.get_output_embeddings().weight.double()
        want = torch.log_softmax(h.double() @ w.T / TEMP, -1)  # (N, V)
    assert logp.dtype == torch.float32 and want.exp().max() > 0.05  # far from uniform: the check has teeth
    torch.testing.assert_close(logp.double(), want.gather(-1, targets[:, None]).squeeze(-1), atol=2e-5, rtol=0)
    torch.testing.assert_close(ent.double(), -(want.exp() * want).sum(-1), atol=2e-5, rtol=0)


def test_token_logprobs_softcap_the_logits_before_the_temperature(tiny, tok):
    """Gemma-2's final logit soft-capping, cap·tanh(logits / cap), then the temperature, as its forward and the
    sampler apply them. Reference: float64, with logits far past the cap so that leaving it out shows."""
    model = salsa.load_model(tiny, tok)
    model.config.final_logit_softcapping = 2.0
    g = torch.Generator().manual_seed(0)
    h = 50 * torch.randn(16, model.config.hidden_size, generator=g)  # (N, d)
    targets = torch.randint(len(tok), (16,), generator=g)
    with torch.no_grad():
        logp, _ = salsa.token_logprobs(model, h, targets, TEMP)
        logits = h.double() @ model.get_output_embeddings().weight.double().T  # (N, V)
        want = torch.log_softmax(torch.tanh(logits / 2.0) * 2.0 / TEMP, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert logits.abs().max() > 10  # the cap bites
    torch.testing.assert_close(logp.double(), want, atol=1e-5, rtol=0)


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1],
                         [1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 1],
                         [0, 0, 0, 0, 0]])
    assert salsa.position_ids(mask).tolist() == [[0, 0, 0, 1, 2],
                                                  [0, 1, 2, 3, 4],
                                                  [0, 0, 0, 0, 0],
                                                  [0, 0, 0, 0, 0]]


def test_pad_left_and_right():
    ids, mask = salsa.pad([[1, 2, 3], [4], [5, 6]], pad_id=9)
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, 3)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    ids, mask = salsa.pad([[1, 2, 3], [4], [5, 6]], pad_id=9, left=False)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9], [5, 6, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


# ---------------------------------------------------------------- optimisation
def test_lr_lambda_by_hand():
    # total 10, warmup 2: steps 0, 1 ramp to 1/3, 2/3 below the peak; the peak at step 2, then decay
    # over the 8 steps after warmup.
    linear = [salsa.lr_lambda(s, 10, 2) for s in range(11)]
    assert linear == pytest.approx([1 / 3, 2 / 3, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])
    cosine = [salsa.lr_lambda(s, 10, 2, "cosine") for s in (0, 1, 2, 4, 6, 8, 10, 12)]
    c = math.sqrt(2) / 4  # 0.5 * cos(pi / 4)
    assert cosine == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5 + c, 0.5, 0.5 - c, 0.0, 0.0])
    assert salsa.lr_lambda(12, 10, 2) == 0.0  # never negative past the end
    assert salsa.lr_lambda(0, 4, 0) == 1.0  # no warmup: start at the peak
    # App. A.1's warmup ratio 0.03 over the recipe's 30 SFT steps is one step (sft.py: ceil(0.9)): a warm one
    warmup = math.ceil(0.03 * 30)
    assert warmup == 1 and [salsa.lr_lambda(s, 30, warmup) for s in (0, 1)] == [0.5, 1.0]


# ---------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def model(tiny, tok):
    return salsa.load_model(tiny, tok)


def steps(ckpt):
    return sorted(p.name for p in Path(ckpt).iterdir())


@pytest.mark.parametrize("crash_in", ["torch.save", "save_pretrained"])
def test_crash_mid_checkpoint_keeps_previous(tmp_path, monkeypatch, model, tok, crash_in):
    ckpt = tmp_path / "run.ckpt"
    salsa.save_checkpoint(str(ckpt), 1, model, tok, {"step": 1})

    def crash(obj, f, *a, **kw):  # torch.save(obj, f) / save_pretrained(dir): half a file, then die
        Path(f if crash_in == "torch.save" else Path(obj, "model.safetensors")).write_bytes(b"half")
        raise OSError("disk full")

    if crash_in == "torch.save":
        monkeypatch.setattr(torch, "save", crash)
    else:
        monkeypatch.setattr(model, "save_pretrained", lambda d, **kw: crash(d, None))
    with pytest.raises(OSError, match="disk full"):
        salsa.save_checkpoint(str(ckpt), 2, model, tok, {"step": 2}, keep=1)
    monkeypatch.undo()

    assert salsa.latest_checkpoint(str(ckpt)) == str(ckpt / "step-00000001")
    assert [p for p in steps(ckpt) if not p.startswith(".")] == ["step-00000001"]  # the half one is hidden
    assert torch.load(ckpt / "step-00000001" / "trainer_state.pt") == {"step": 1}
    salsa.save_checkpoint(str(ckpt), 2, model, tok, {"step": 2}, keep=1)  # a retry succeeds over the debris
    assert salsa.latest_checkpoint(str(ckpt)) == str(ckpt / "step-00000002")


def test_keep_deletes_only_older(tmp_path, model, tok):
    ckpt = tmp_path / "run.ckpt"
    for step in (8, 9, 10):  # 10 sorts after 9 only thanks to the zero padding
        salsa.save_checkpoint(str(ckpt), step, model, tok, {"step": step}, keep=2)
    assert steps(ckpt) == ["step-00000009", "step-00000010"]
    assert salsa.latest_checkpoint(str(ckpt)) == str(ckpt / "step-00000010")
    assert torch.load(ckpt / "step-00000010" / "trainer_state.pt") == {"step": 10}
    assert salsa.latest_checkpoint(str(tmp_path / "nothing")) is None


def test_latest_checkpoint_skips_incomplete(tmp_path):
    for name, files in [("step-00000001", ["model.safetensors", "trainer_state.pt"]),
                        ("step-00000002", ["model.safetensors"]),  # no trainer state: cannot resume from it
                        (".step-00000003.tmp123", ["model.safetensors", "trainer_state.pt"])]:  # never renamed
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(b"x")
    assert salsa.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step-00000001")


def test_keep_counts_complete_checkpoints_only(tmp_path, model, tok):
    ckpt = tmp_path / "run.ckpt"
    salsa.save_checkpoint(str(ckpt), 1, model, tok, {"step": 1}, keep=2)
    (ckpt / "step-00000099").mkdir()  # e.g. weights copied by hand, no trainer state: not resumable
    salsa.save_checkpoint(str(ckpt), 2, model, tok, {"step": 2}, keep=2)
    assert steps(ckpt) == ["step-00000001", "step-00000002", "step-00000099"]
    assert salsa.latest_checkpoint(str(ckpt)) == str(ckpt / "step-00000002")


def test_prepare_out(tmp_path, model, tok):
    out = tmp_path / "sft"
    ckpt = salsa.prepare_out(str(out), resume=False)
    assert ckpt == f"{out}.ckpt" and not Path(ckpt).exists() and not out.exists()  # made by the first write
    Path(ckpt).mkdir()
    assert salsa.prepare_out(str(out), resume=False) == ckpt  # an empty checkpoint dir is no earlier run

    salsa.save_checkpoint(ckpt, 3, model, tok, {"step": 3})
    with pytest.raises(salsa.InputError, match=r"sft\.ckpt.*--resume"):
        salsa.prepare_out(str(out), resume=False)
    assert salsa.prepare_out(str(out), resume=True) == ckpt
    assert steps(ckpt) == ["step-00000003"]  # resuming touches nothing

    # a killed run's leftovers: a half-written checkpoint, the final model's temp dir, its logs (no checkpoint)
    shutil.rmtree(ckpt)
    for d in (Path(ckpt, ".step-00000002.tmp"), tmp_path / ".sft.tmp4242"):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
    logs = [Path(ckpt, log) for log in ("metrics.jsonl", "samples.jsonl")]
    for log in logs:
        log.write_text('{"step": 1}\n')
    (tmp_path / ".other.tmp1").mkdir()  # another run's: not ours to delete
    assert salsa.prepare_out(str(out), resume=True) == ckpt
    assert sorted(p.name for p in Path(ckpt).iterdir()) == ["metrics.jsonl", "samples.jsonl"]  # the logs wait for:
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp1", "sft.ckpt"]
    assert salsa.restore(None, None, model, None, None, str(logs[0])) == 0  # a fresh start, its inputs checked
    assert list(Path(ckpt).iterdir()) == []

    done = tmp_path / "done"
    done.mkdir()
    with pytest.raises(salsa.InputError, match="done already exists"):
        salsa.prepare_out(str(done), resume=True)
    assert not Path(f"{done}.ckpt").exists()  # refused before writing anything


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(salsa.InputError, match=f"^{path} line 3: not JSON .*: fix or delete that line"):
        salsa.read_jsonl(path)
    path.write_text('{"step": 1}\n\n[{"step": 2}]\n')  # JSON, but no row: truncate_log died on it with a traceback
    with pytest.raises(salsa.InputError, match=rf"^{path} line 3: expected a JSON object of fields, got \[{{"):
        salsa.truncate_log(path, 1)
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # a killed run's cut last line
    salsa.truncate_log(path, 1)
    assert path.read_text() == '{"step": 1}\n'


def test_save_model_loads_and_writes_json(tmp_path, model, tok):
    out = tmp_path / "final"
    salsa.save_model(str(out), model, tok, files={"metrics.json": {"loss": 1.5, "steps": [1, 2]}})
    back = AutoModelForCausalLM.from_pretrained(out)
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert json.loads((out / "metrics.json").read_text()) == {"loss": 1.5, "steps": [1, 2]}
    assert AutoTokenizer.from_pretrained(out).pad_token_id == tok.pad_token_id
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dir left


# ---------------------------------------------------------------- broken model directories
def copy_model(src, dst) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return Path(dst)


def test_broken_model_directories_are_refused_naming_the_file(tiny, tok, tmp_path):
    """Each is one InputError naming the file and what to do, before transformers sees it."""
    from safetensors.torch import load_file, save_file
    no_config = copy_model(tiny, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    cut = copy_model(tiny, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickle = copy_model(tiny, tmp_path / "pickle")
    torch.save(load_file(pickle / "model.safetensors"), pickle / "pytorch_model.bin")
    (pickle / "model.safetensors").unlink()
    nan = copy_model(tiny, tmp_path / "nan")
    weights = load_file(nan / "model.safetensors")
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})
    for path, message in [(no_config, "no_config: no config.json"), (cut, r"cut/model\.safetensors: truncated"),
                          (pickle, r"pickle: weights only as a pickle \(pytorch_model\.bin\).*--allow-pickle"),
                          (nan, "nan: tensor model.norm.weight holds NaN or inf"),
                          (tmp_path / "missing", "missing: no such model directory")]:
        with pytest.raises(salsa.InputError, match=message):
            salsa.load_model(str(path), tok)
    assert isinstance(salsa.load_model(str(pickle), tok, allow_pickle=True), torch.nn.Module)  # opted in
    from soup import read_layout  # soups read safetensors only: no --allow-pickle would help (soup.py has none)
    with pytest.raises(salsa.InputError, match=r"pickle: no model\.safetensors, and a soup reads safetensors only"):
        read_layout(str(pickle))


def test_a_stage_ends_an_input_error_with_one_line(tiny, tmp_path):
    """No traceback for input errors the project detects (a traceback is for bugs), and no OUT.ckpt left."""
    import subprocess
    import sys
    cut = copy_model(tiny, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:100])
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                     + "\n")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "sft.py", "--model", str(cut), "--data", str(chats), "--out",
                          str(tmp_path / "out"), "--batch-size", "1"], cwd=root, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {cut}/model.safetensors: truncated")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()


def test_an_input_error_is_written_in_one_write(monkeypatch):
    """Under PYTHONUNBUFFERED (CI sets it) every write is a system call: print's text and its newline were two,
    and two ranks failing at once interleaved into one line ("error: A" "error: B" "\\n" "\\n"). One write each."""
    import io
    import sys
    writes = []

    class Recorder(io.StringIO):
        def write(self, s):
            writes.append(s)
            return len(s)

    def main(args):
        raise salsa.InputError("data.jsonl row 3: no prompt")

    monkeypatch.setattr(sys, "stderr", Recorder())
    with pytest.raises(SystemExit) as stop:
        salsa.run(main, dataclass(type("Args", (), {})), [])
    assert stop.value.code == 2 and writes == ["error: data.jsonl row 3: no prompt\n"]


def test_a_stage_ends_its_process_group(monkeypatch):
    """A stage that leaves its gloo group to interpreter exit can abort there ("terminate called without an
    active exception", SIGABRT: pytorch#190489): CI's 2-rank PPO saved its model, then rank 1 died so. `run`
    destroys the group when main returns, and after an InputError raised on every rank at once."""
    from gpu_check import free_port
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    seen = []

    def main(args, fail=False):
        salsa.setup_dist(0)
        seen.append(torch.distributed.is_initialized())
        if fail:
            e = salsa.InputError("rank 0's model: no config.json")
            e.every_rank = True  # as distribute raises it
            raise e

    try:
        salsa.run(main, dataclass(type("Args", (), {})), [])
        assert seen == [True] and not torch.distributed.is_initialized()
        with pytest.raises(SystemExit) as stop:
            salsa.run(lambda args: main(args, fail=True), dataclass(type("Args", (), {})), [])
        assert stop.value.code == 2 and seen == [True, True] and not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():  # the old code: later tests in this worker start their own
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- chat data
def test_resume_needs_the_world_it_was_written_by(tmp_path):
    """Shards and generators are per rank: a checkpoint resumes only as it was written, else one line says how."""
    for name, state in (("one", {"step": 1}), ("two", {"step": 1, "world": 2, "optimizer": salsa.Sharded("x")})):
        (tmp_path / name).mkdir()
        torch.save(state, tmp_path / name / "trainer_state.pt")
    assert salsa.load_trainer_state(str(tmp_path / "one"))["step"] == 1  # older states have no world: one process
    for name, dist, message in (
            ("one", salsa.Dist(world=2, sharded=True), "written by one process: resume it the same way "
                                                       "\\(now under torchrun at world size 2\\)"),
            ("two", salsa.Dist(), "at world size 2: resume it the same way \\(now by one process\\)"),
            ("two", salsa.Dist(world=4, sharded=True), "at world size 2: .* \\(now under torchrun at world size 4\\)")):
        with pytest.raises(salsa.InputError, match=message) as e:
            salsa.load_trainer_state(str(tmp_path / name), dist)
        assert e.value.every_rank  # every rank read the same file: all stop together
    assert salsa.load_trainer_state(str(tmp_path / "two"), salsa.Dist(world=2, sharded=True))["step"] == 1


def test_ranks_clean_the_same_stale_save_at_once(tmp_path):
    """Every rank runs prepare_out; two deleting one crashed save's folder at once must both go on."""
    ckpt = tmp_path / "sft.ckpt"
    for n in range(3):
        stale = ckpt / f".step-0000000{n}.tmp"
        stale.mkdir(parents=True)
        for i in range(1000):
            (stale / f"__{i}_0.distcp").write_bytes(b"")
    ctx = torch.multiprocessing.get_context("fork")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=prepare_after, args=(start, str(tmp_path / "sft"))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0] and list(ckpt.iterdir()) == []


def prepare_after(start, out):
    start.wait()
    salsa.prepare_out(out, resume=False)


def test_read_rows_local(tmp_path):
    """Rows with where they are, one rule for every stage: a jsonl file's line number (blank lines
    count), else the row counted from 1; a UTF-8 byte-order mark is skipped, not a JSON error."""
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    ok = tmp_path / "ok.jsonl"
    ok.write_text("\n\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line between the rows
    (tmp_path / "ok.json").write_text(json.dumps(rows))
    assert salsa.read_rows(str(ok)) == [(f"{ok} line 1", rows[0]), (f"{ok} line 3", rows[1])]
    assert salsa.read_rows(str(tmp_path / "ok.json")) == [(f"{tmp_path / 'ok.json'} row {i}", r)
                                                          for i, r in enumerate(rows, 1)]
    for name in ("bom.jsonl", "bom.json"):  # as Notepad writes them
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + (ok if name.endswith("l") else tmp_path / "ok.json").read_bytes())
        assert [r for _, r in salsa.read_rows(str(tmp_path / name))] == rows

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n\n{"prompt": oops}\n')
    with pytest.raises(salsa.InputError, match=r"bad\.jsonl line 3"):
        salsa.read_rows(str(bad))
    (tmp_path / "rows.csv").write_text("prompt\na\n")
    with pytest.raises(salsa.InputError, match=r"rows\.csv: expected \.json, \.jsonl or \.parquet"):
        salsa.read_rows(str(tmp_path / "rows.csv"))
    with pytest.raises(salsa.InputError, match="missing.jsonl"):
        salsa.read_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(salsa.InputError, match="missing.jsonl"):
        salsa.read_rows("missing.jsonl")
    for line in ('"a string"', "5", "[1, 2]"):  # not objects: `"prompt" in row` would test a string's letters
        (tmp_path / "bare.jsonl").write_text('{"prompt": "a"}\n' + line + "\n")
        with pytest.raises(salsa.InputError, match=rf"bare\.jsonl line 2: expected a JSON object of fields, got {re.escape(line)}"):
            salsa.read_rows(str(tmp_path / "bare.jsonl"))


def no_hub(*a, **kw):
    raise ConnectionError("read_rows went to the hub")


def test_read_rows_missing_relative_path(tmp_path, monkeypatch):
    import sys
    import types
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=no_hub))  # no 10 s import
    for missing in ("data/missing.jsonl", "runs/sft-seed1"):  # a file, and a folder name shaped like org/name
        Path(missing).parent.mkdir(exist_ok=True)
        with pytest.raises(salsa.InputError, match=missing):
            salsa.read_rows(missing)


@pytest.mark.parametrize("messages, error", [
    ([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}], "message 0"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "message 1"),
    ([{"role": "user", "content": "hi"}], "no assistant"),
    ([], "non-empty list"),
    ([{"role": "system", "content": "Be kind."}, {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "message 1 is the assistant's, before any"),
])
def test_check_messages_names_the_row(messages, error):
    with pytest.raises(ValueError, match=rf"^train\.jsonl row 7: .*{error}"):
        salsa.check_messages(messages, "train.jsonl row 7")


CHAT = [{"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "No."}]


def labelled_spans(ids, labels):
    """Maximal runs of positions with a label, as (start, end)."""
    spans, start = [], None
    for i, lab in enumerate(labels + [-100]):
        if lab != -100 and start is None:
            start = i
        elif lab == -100 and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_tokenize_chat_labels_assistant_only(tok):
    ids, labels = salsa.tokenize_chat(tok, CHAT, max_len=1000)
    full = tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids == full and len(labels) == len(ids)
    spans = labelled_spans(ids, labels)
    assert [tok.decode(ids[a:b]) for a, b in spans] == ["Hello! How can I help?<|im_end|>", "No.<|im_end|>"]
    assert all(labels[i] == ids[i] for a, b in spans for i in range(a, b))
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert all(ids[a - len(header):a] == header for a, _ in spans)  # the header itself is not learnt

    cut = spans[0][0] + 2  # keeps two tokens of the first answer
    ids_cut, labels_cut = salsa.tokenize_chat(tok, CHAT, max_len=cut)
    assert ids_cut == ids[:cut] and labels_cut == labels[:cut]
    assert salsa.tokenize_chat(tok, CHAT, max_len=spans[0][0]) is None  # no assistant token survives


def test_a_template_refusing_a_row_names_it(tok):
    """Gemma's template raises on a system turn; the error names the row, not a jinja2 traceback."""
    gemma_like = copy.deepcopy(tok)
    gemma_like.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                                "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    with pytest.raises(salsa.InputError, match="data.jsonl line 6: the chat template refuses this conversation: "
                                               "System role not supported"):
        salsa.tokenize_chat(gemma_like, chat, 100, "data.jsonl line 6")
    with pytest.raises(salsa.InputError, match="line 2: the chat template refuses"):
        salsa.prompt_ids(gemma_like, chat[:2], "line 2")


def test_prompt_ids_end_with_assistant_header(tok):
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    ids = salsa.prompt_ids(tok, "Tell me a joke")
    assert ids[-len(header):] == header
    assert tok.decode(ids).endswith("<|im_start|>user\nTell me a joke<|im_end|>\n<|im_start|>assistant\n")
    prefix = salsa.prompt_ids(tok, CHAT[:3])  # the context of the second answer, as training saw it
    assert salsa.tokenize_chat(tok, CHAT, max_len=1000)[0][:len(prefix)] == prefix
    for bad in (CHAT[:2], "", "  \n", [], 5, [{"role": "user"}], ["hello"], [{"role": "gpt", "content": "hi"}, CHAT[0]],
                [{"role": "user", "content": " "}]):  # each was rendered, or crashed in the template, unnamed
        with pytest.raises(salsa.InputError, match="^row 4: "):
            salsa.prompt_ids(tok, bad, where="row 4")


def test_load_tokenizer_pad_is_not_eos(tok):
    raw = AutoTokenizer.from_pretrained(tok.name_or_path)
    assert raw.pad_token_id == raw.eos_token_id  # the premise: SmolLM2 ships pad = eos
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token_id < len(tok)
    assert tok.padding_side == "left"
    assert tok.pad_token_id == raw.unk_token_id  # <|endoftext|>: already in the vocabulary, no resize


def test_load_tokenizer_refuses_a_template_whose_turns_do_not_end_with_eos(tmp_path, tok):
    """Gemma's template closes a turn with <end_of_turn> while EOS is <eos>: SFT would learn to write
    <end_of_turn>, generation stops only at EOS, and PPO would score text past the turn's end."""
    gemma_like = AutoTokenizer.from_pretrained(tok.name_or_path)
    gemma_like.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n"
                                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    gemma_like.save_pretrained(tmp_path)
    assert gemma_like.eos_token == "<|im_end|>"  # the premise: the turn's end token is not EOS
    with pytest.raises(salsa.InputError, match=f"^{tmp_path}: its chat template ends an assistant turn without"):
        salsa.load_tokenizer(str(tmp_path))
    gemma_like.chat_template = gemma_like.chat_template.replace("<|endoftext|>", "<|im_end|>")
    gemma_like.save_pretrained(tmp_path)
    assert salsa.load_tokenizer(str(tmp_path)).eos_token == "<|im_end|>"  # the same template ending with EOS


# ---------------------------------------------------------------- flags
@dataclass
class Flags:
    max_len: int = salsa.arg(2048, "tokens per example (paper A.1)", low=1)
    lr: float = salsa.arg(2.5e-5, "peak learning rate")
    flag: bool = salsa.arg(True, "a switch")
    seeds: list[int] = salsa.arg([1, 2], "one SFT per seed")
    schedule: Literal["linear", "cosine"] = salsa.arg("linear", "decay after warmup")
    ref: str | None = salsa.arg(None, "reference model dir")


def test_parse_args(capsys):
    a = salsa.parse_args(Flags, [])
    assert a == Flags() and a.seeds == [1, 2]
    a.seeds.append(3)
    assert Flags().seeds == [1, 2]  # list defaults are not shared
    a = salsa.parse_args(Flags, ["--max-len", "5", "--lr", "1e-3", "--no-flag", "--seeds", "3", "4", "5",
                                 "--schedule", "cosine", "--ref", "soup"])
    assert a == Flags(max_len=5, lr=1e-3, flag=False, seeds=[3, 4, 5], schedule="cosine", ref="soup")
    assert type(a.max_len) is int and salsa.parse_args(Flags, ["--flag"]).flag is True
    with pytest.raises(SystemExit):
        salsa.parse_args(Flags, ["--schedule", "step"])
    with pytest.raises(SystemExit):
        salsa.parse_args(Flags, ["--max-len", "five"])
    capsys.readouterr()
    assert salsa.parse_args(Flags, ["--max-len", "1"]).max_len == 1  # the bound itself is allowed
    with pytest.raises(SystemExit):
        salsa.parse_args(Flags, ["--max-len", "0"])
    assert "argument --max-len: 0: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        salsa.parse_args(Flags, ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    for h in ("tokens per example (paper A.1) (default: 2048)", "peak learning rate", "a switch",
              "one SFT per seed (default: [1, 2])", "decay after warmup", "reference model dir",
              "--no-flag", "{linear,cosine}", "Tests of the shared module salsa.py"):
        assert h in text, h


# ---------------------------------------------------------------- dropout
def test_disable_dropout_modules():
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    model = GPT2LMHeadModel(cfg)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.3 for m in drops)
    salsa.disable_dropout(model)
    assert all(m.p == 0.0 for m in drops)
    model.train()
    x = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(model(x).logits, model(x).logits, atol=0, rtol=0)


def test_disable_dropout_attention():
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.5)
    model = LlamaForCausalLM(cfg)
    salsa.disable_dropout(model)
    model.train()  # the PPO update runs in train mode
    x = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(model(x).logits, model(x).logits, atol=0, rtol=0)


def base_tokenizer(tok, path: Path, bos: bool = False):
    """SmolLM2's tokenizer as a base model's: no chat template, and with `bos` a BOS (<|im_start|>) that
    it adds in front of every text, as Llama-2's, Mistral's and Gemma's tokenizers do."""
    tok.save_pretrained(path)
    for f in path.glob("*"):
        if "chat_template" in f.name:
            f.unlink()
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if bos:
        t = json.loads((path / "tokenizer.json").read_text())
        t["post_processor"] = {"type": "TemplateProcessing", "pair": [],
                               "single": [{"SpecialToken": {"id": tok.bos_token, "type_id": 0}},
                                          {"Sequence": {"id": "A", "type_id": 0}}],
                               "special_tokens": {tok.bos_token: {"id": tok.bos_token, "ids": [tok.bos_token_id],
                                                                  "tokens": [tok.bos_token]}}}
        (path / "tokenizer.json").write_text(json.dumps(t))
    return salsa.load_tokenizer(str(path))


def test_one_bos_where_the_tokenizer_adds_one(tmp_path, tok):
    """Base Llama-2/Mistral/Gemma tokenizers add BOS, and their models never saw text without it: every
    prompt, conversation and preference side starts with exactly one, also when the chat template writes
    its own (Llama-2-chat's does); SmolLM2's adds none, and gets none."""
    import reward
    base = base_tokenizer(tok, tmp_path, bos=True)
    bos = base.bos_token_id
    assert base("Hi")["input_ids"][0] == bos  # the premise: this tokenizer adds a BOS
    chat = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there!"}]
    row = {"chosen": chat, "rejected": chat[:1] + [{"role": "assistant", "content": "No."}]}
    for template in (None, "{{ bos_token }}" + salsa.BASE_CHAT_TEMPLATE):
        base.chat_template = template or salsa.BASE_CHAT_TEMPLATE
        ids, labels = salsa.tokenize_chat(base, chat, 512)
        seqs = [ids, salsa.prompt_ids(base, "Hey"), salsa.prompt_ids(base, chat + [{"role": "user", "content": "?"}]),
                *reward.tokenize_pair(base, row, "row")]
        for s in seqs:
            assert s[0] == bos and s[1] != bos and s.count(bos) == 1, base.decode(s[:3])
        assert labels[0] == -100 and base.decode([t for t in labels if t != -100]) == f"Hi there!{base.eos_token}"
    assert tok("Hi")["input_ids"][0] != tok.bos_token_id  # SmolLM2 adds no BOS (its <|im_start|> is a role marker)
    text = tok.apply_chat_template(chat, tokenize=False)
    assert salsa.tokenize_chat(tok, chat, 512)[0] == tok(text, add_special_tokens=False)["input_ids"]  # nothing added


def test_base_model_gets_the_papers_chat_format(tmp_path, tok):
    """A tokenizer without a chat template (base Llama-2/Mistral/Gemma) gets <|user|>/<|assistant|>
    turns, assistant turns closed by EOS, and label masking still finds exactly the assistant spans."""
    base = base_tokenizer(tok, tmp_path)
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there!"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello."}]
    ids, labels = salsa.tokenize_chat(base, msgs, 512)
    eos = base.eos_token
    assert base.decode(ids) == f"<|user|>\nSay hi\n<|assistant|>\nHi there!{eos}\n<|user|>\nAgain\n<|assistant|>\nHello.{eos}\n"
    assert base.decode([t for t in labels if t != -100]) == f"Hi there!{eos}Hello.{eos}"
    assert base.decode(salsa.prompt_ids(base, "Hey")) == "<|user|>\nHey\n<|assistant|>\n"


def test_the_clock_waits_for_a_gpus_queued_work(monkeypatch):
    """PPO's stage timers: on CUDA, the time is read only after the device finished, or a stage's kernels
    (the last backward) are charged to the next. On a CPU nothing is queued and nothing is called."""
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    salsa.clock(torch.device("cpu"))
    assert waited == []
    salsa.clock(torch.device("cuda", 3))
    assert waited == [torch.device("cuda", 3)]


@pytest.mark.parametrize("family", ["phi", "granite"])
def test_a_head_salsa_would_misscore_is_refused(tmp_path, tok, family):
    """Phi's output layer has a bias, Granite divides the logits by config.logits_scaling: token_logprobs,
    log-softmax(h·Wᵀ) alone, gives other log-probs than the model samples from (shown first), so load_model
    refuses both and names what it leaves out."""
    from transformers import GraniteConfig, GraniteForCausalLM, PhiConfig, PhiForCausalLM
    torch.manual_seed(0)
    shape = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    if family == "phi":
        model = PhiForCausalLM(PhiConfig(**shape))
        torch.nn.init.normal_(model.lm_head.bias, std=2.0)  # a trained head's bias is not 0
    else:
        model = GraniteForCausalLM(GraniteConfig(**shape, logits_scaling=8.0))
        model.lm_head.weight.data *= 30  # logits as sharp as a trained model's
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ids = torch.tensor([tok("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        mine = salsa.token_logprobs(model, out.hidden_states[-1][0, :-1], ids[0, 1:])[0]
        theirs = torch.log_softmax(out.logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert (mine - theirs).abs().max() > 0.5  # what would go wrong
    with pytest.raises(salsa.InputError, match="bias" if family == "phi" else r"scales the logits \({'logits_scaling': 8.0}\)"):
        salsa.load_model(str(tmp_path), tok)


def test_a_rank_saves_and_restores_only_its_own_gpus_generator(monkeypatch):
    """get_rng_state_all would hold every visible GPU's, and a resume with fewer visible GPUs fails on it."""
    seen = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: seen.append(("get", device)) or torch.zeros(8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: seen.append(("set", device)))
    dist = salsa.Dist(device=torch.device("cuda", 2))
    salsa.set_rng_state(salsa.rng_state(dist), dist)
    assert seen == [("get", torch.device("cuda", 2)), ("set", torch.device("cuda", 2))]


def test_save_atomic_replace_keeps_the_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    """With `replace`, the old folder is moved aside before the new one takes its place: if that second rename
    fails, the old one goes back, and no temp or aside folder is left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real, calls = salsa.os.replace, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("the disk is full")
        real(src, dst)
    monkeypatch.setattr(salsa.os, "replace", second_fails)
    with pytest.raises(OSError, match="the disk is full"):
        salsa.save_atomic(str(out), lambda tmp: Path(tmp, "new.txt").write_text("new"), replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_save_atomic_onto_a_folder_that_appeared_leaves_no_temp(tmp_path):
    """`salsa.py task --out EXISTING` failed at the rename and left its .OUT.tmpPID behind."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("mine")
    with pytest.raises(OSError):
        salsa.save_atomic(str(tmp_path / "out"), lambda tmp: Path(tmp, "new.txt").write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out" / "kept.txt").read_text() == "mine"
