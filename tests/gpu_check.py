"""The prepared GPU check (`make gpu-check`): what only a GPU can show, in under 8 minutes on one
H100/H200, downloading nothing. Without CUDA the same code runs on tiny models on the CPU in well
under a minute, each stage in this process (tests/test_gpu_check.py runs it), so it cannot rot
before a GPU is lent.

    python tests/gpu_check.py --out runs/gpu-check        # writes OUT/report.md and OUT/report.json

Everything runs through the project's own scripts, as subprocesses with their own flags, on
random-init Llama-shaped models of real shapes built from a config (the SmolLM2 tokenizer from
models/):
- probe: a bf16 matmul's rate, the measured peak that MFU is also quoted against;
- SFT: sft.py steps of a ~1.1B model (TinyLlama's shape) at 2048 tokens in bf16: tokens/s, MFU
  ((6·N + 12·L·d·T)·tokens, PaLM's count: N the matmul weights, the second term attention's scores and
  values over T tokens, not halved for the causal mask), peak memory. The LM head's logits are an fp32
  matmul at fp32 speed (log-probs in fp32, salsa.token_logprobs; no TF32), 9% of N but a larger share of
  the time;
- PPO: ppo.py steps at App. A.3's batch of 8 with 512 new tokens on that shape, fp32 policy and bf16
  policy: rollout tokens/s and share of the step, scoring and training time, peak memory; beside
  them a plain bf16 forward and backward of as many random tokens, to show where the time goes;
- memory plan: the peak of plain ppo.py (one process, no FSDP, no activation checkpointing) at two sizes
  against the held rows of the README's plan at world size 1 (16 B/param each for the policy and its
  critic, ppo.py's default --critic reward; 2 B/param for each bf16 frozen model); the rest of the peak
  (activations, KV cache, workspace) scaled by the layers' widths L·(d + f) to 7B. GiB (2**30 bytes) throughout, of memory
  allocated by tensors (torch.cuda.max_memory_allocated): the allocator's reserve and the CUDA context
  come on top;
- the FSDP2 path, on the smaller shape: torchrun with one rank shards every model (on CUDA, bf16 compute
  over fp32 master weights), generates with the policy gathered, writes a sharded checkpoint and resumes.

The device gives it one try. So each stage's output goes to OUT/logs/STAGE.log, the reports are
rewritten after every stage, a failed stage is recorded and the next one runs, the whole check has a
deadline (--budget) that each stage's timeout counts down to, and each stage's models and checkpoints
are deleted once its numbers are read (at 1.1B they would fill the device's 64 GiB disk).
"""
import argparse
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import salsa  # noqa: E402

# (hidden, intermediate, layers, heads, kv heads) of the random-init Llama models
SHAPES = {"1.1b": (2048, 5632, 22, 32, 4), "0.5b": (1536, 4096, 16, 24, 4),
          "tiny": (64, 128, 2, 4, 2), "tiny2": (96, 192, 3, 4, 2)}
# dense bf16 FLOP/s of the SXM parts, by torch.cuda.get_device_name(); other parts (PCIe, NVL) differ: none
DATASHEET_BF16 = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}
TOKENIZER = ROOT / "models" / "SmolLM2-135M-Instruct"


def build(path: Path, shape: str, tok, device) -> tuple[int, int, int]:
    """A random-init causal LM and a reward model of one shape, saved as HF directories; returns the
    LM's matmul weights (all parameters but the input embedding), the LM's parameters, the reward model's."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM
    d, f, layers, heads, kv = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, num_labels=1)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it is fast, saved from the CPU
        lm, rm = LlamaForCausalLM(cfg), AutoModelForSequenceClassification.from_config(cfg)
    rm.config.reward_bias = 0.0
    for model, name in ((lm, "lm"), (rm, "rm")):
        model.to("cpu").save_pretrained(path / name)
        tok.save_pretrained(path / name)
    if device.type == "cuda":  # this process holds no model from here on: give the stages its cache
        torch.cuda.empty_cache()
    count = lambda model, skip="-": sum(p.numel() for n, p in model.named_parameters() if skip not in n)
    return count(lm, "embed_tokens"), count(lm), count(rm)


def script(name: str, *flags, ranks: int = 0, logs: Path | None = None, timeout: float = 600) -> list[dict]:
    """Run a stage script to the end and return its metrics.jsonl rows (OUT is the flag after --out);
    ranks > 0: under torchrun with that many processes (FSDP2, also at 1). Without CUDA a stage runs
    in this process instead (its `main` on the same flags; ranks 1: with the variables torchrun would
    set): on tiny models a subprocess's imports are most of its time, and the CPU path must stay well
    under a minute. On a GPU each stage has a process of its own, so each peak memory is its own; its output
    goes to logs/OUT's name.log, and past `timeout` seconds it is stopped, torchrun's workers too (they would
    hold the GPU)."""
    argv = list(map(str, flags))
    out = argv[argv.index("--out") + 1]
    if timeout <= 0:
        raise RuntimeError(f"{name} not started: the check's deadline (--budget) has passed")
    if not torch.cuda.is_available() and ranks <= 1:
        module = importlib.import_module(name.removesuffix(".py"))
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port())} if ranks else {}
        print("$ (in this process)", *(["RANK=0 WORLD_SIZE=1"] if ranks else []), name, " ".join(argv), flush=True)
        os.environ.update(env)
        try:
            module.main(salsa.parse_args(module.Args, argv))
        finally:
            for key in env:
                del os.environ[key]
            if torch.distributed.is_initialized():  # the next stage starts its own group
                torch.distributed.destroy_process_group()
        return salsa.read_jsonl(f"{out}.ckpt/metrics.jsonl")
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks else []
    cmd = [sys.executable, *launch, str(ROOT / name), *argv]
    log = logs / f"{Path(out).name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), ">", log, flush=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # a hung rank, or the deadline: the check goes on without this stage
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun's workers are in sessions of their own: on SIGTERM it
            try:  # stops them itself
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise RuntimeError(f"{name} ran past its {timeout:.0f} s (the check's deadline); see {log}") from None
    if code:
        raise RuntimeError(f"{name} failed with exit code {code}:\n" + log.read_text()[-3000:])
    return salsa.read_jsonl(f"{out}.ckpt/metrics.jsonl")


def drop(*dirs: Path):
    """Delete a finished stage's outputs (a model, a checkpoint): its numbers are read, and the disk is small."""
    for d in dirs:
        for path in (d, Path(f"{d}.ckpt")):
            shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def matmul_rate(device, n: int, seconds: float = 1.0) -> float:
    """FLOP/s of an n x n x n bf16 matmul over about `seconds` of back-to-back calls, after 3 warm-ups (10 calls
    at 8192 take about 15 ms on an H100: too short to time)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    calls, t = 0, time.perf_counter()
    while calls < 10 or time.perf_counter() - t < seconds:
        for _ in range(10):
            a @ b
        calls += 10
        sync(device)
    return calls * 2 * n**3 / (time.perf_counter() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_step(path: Path, rows: int, tokens: int, device) -> float:
    """Seconds of one plain bf16 forward and backward (logits in bf16, a mean loss) of rows x tokens."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    ids = torch.randint(3, model.config.vocab_size, (rows, tokens), device=device)
    times = []
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        model(input_ids=ids).logits.float().mean().backward()
        sync(device)
        times.append(time.perf_counter() - t)
    del model
    return min(times[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="report folder (must not exist)")
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole check: a stage still "
                   "running at the deadline is killed and recorded, the reports keep what was measured")
    p.add_argument("--require-cuda", action="store_true", help="stop if there is no CUDA device (the device "
                   "call: a CPU fallback there would write a CPU report under a GPU check's name)")
    a = p.parse_args()
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"{out} exists: give another --out")
    gpu = torch.cuda.is_available()
    if a.require_cuda and not gpu:
        raise SystemExit(f"--require-cuda: torch {torch.__version__} sees no CUDA device")
    device = torch.device("cuda" if gpu else "cpu")
    big, small = ("1.1b", "0.5b") if gpu else ("tiny2", "tiny")
    seq_len, new_tokens, prompt_words = (2048, 512, 200) if gpu else (64, 16, 12)
    tok = salsa.load_tokenizer(str(TOKENIZER))
    work, logs = out / "work", out / "logs"
    name = torch.cuda.get_device_name() if gpu else "CPU"
    start = time.time()
    left = lambda: a.budget - (time.time() - start)
    rep = {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "shapes": {big: SHAPES[big], small: SHAPES[small]},
           "errors": {}, "stage_seconds": {}}
    out.mkdir(parents=True)

    def stage(key: str, measure, timed=True):
        """rep[key] = measure(), or the error in rep["errors"][key]; the reports rewritten either way. A timed
        stage is not started past the deadline."""
        print(f"--- {key} ({left():.0f} s left)", flush=True)
        began = time.time()
        try:
            if timed and left() <= 0:
                raise RuntimeError(f"{key} not started: the check's deadline (--budget) has passed")
            rep[key] = measure()
        except Exception as e:  # recorded, and the next stage runs: the device gives one try
            rep["errors"][key] = f"{type(e).__name__}: {e}"[-3000:]
            print(f"{key} failed: {rep['errors'][key]}", flush=True)
        rep["stage_seconds"][key] = round(time.time() - began, 1)  # to plan a second try, or the stages' budget
        rep["seconds"] = time.time() - start
        (out / "report.json").write_text(json.dumps(rep, indent=1))
        (out / "report.md").write_text(report(rep, big, small, seq_len, new_tokens))

    stage("free_disk_gib", lambda: shutil.disk_usage(out).free / 2**30, timed=False)
    stage("probe_bf16_flops", lambda: matmul_rate(device, 8192 if gpu else 256, 1.0 if gpu else 0.2), timed=False)
    stage("params", lambda: {s: dict(zip(("matmul", "lm", "rm"), build(work / s, s, tok, device))) for s in (big, small)},
          timed=False)  # what every later stage needs
    if "params" in rep["errors"]:
        raise SystemExit(f"no models to check: {rep['errors']['params']}")
    peak = DATASHEET_BF16.get(name)

    # data: long chat rows for SFT (cut to --max-len), prompts of about prompt_words words for PPO
    g = torch.Generator().manual_seed(0)
    words = lambda n: " ".join(tok.decode([int(i)]).strip() or "a" for i in torch.randint(1000, 20000, (n,), generator=g))
    chats = [{"messages": [{"role": "user", "content": "Write a long text."},
                           {"role": "assistant", "content": words(seq_len + 50)}]} for _ in range(10)]
    (work / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": words(prompt_words)}) + "\n" for _ in range(8)))

    def sft():
        rows = script("sft.py", "--model", work / big / "lm", "--data", work / "sft.jsonl", "--eval-frac", 0.1,
                      "--max-len", seq_len, "--batch-size", 8, "--micro-batch", 8, "--max-steps", 3, "--dtype",
                      "bfloat16", "--eval-every", 0, "--save-every", 0, "--out", work / "sft", logs=logs, timeout=left())
        drop(work / "sft")
        tok_s = sum(r["train/tokens_per_s"] for r in rows[1:]) / len(rows[1:])  # the first step warms up
        d, _, layers, _, _ = SHAPES[big]
        flops = (6 * rep["params"][big]["matmul"] + 12 * layers * d * seq_len) * tok_s  # PaLM's count, per second
        return {"tokens_per_s": tok_s, "peak_gb": rows[-1]["mem/peak_gb"], "model_flops_per_s": flops,
                "mfu_probe": flops / rep["probe_bf16_flops"] if "probe_bf16_flops" in rep else None,
                "mfu_datasheet": flops / peak if peak else None}
    stage("sft", sft)

    ppo_flags = ["--ref", "sft", "--data", work / "prompts.jsonl", "--batch-size", 8,
                 "--max-prompt-len", 4 * prompt_words, "--steps", 2, "--save-every", 1000, "--sample-every", 1000,
                 "--frozen-dtype", "bfloat16"]

    def ppo(shape, dtype):
        run = work / f"ppo-{shape}-{dtype}"
        rows = script("ppo.py", *ppo_flags, "--max-new-tokens", new_tokens, "--model", work / shape / "lm",
                      "--reward", work / shape / "rm", "--dtype", dtype, "--out", run, logs=logs, timeout=left())
        drop(run)
        m = rows[-1]  # the second step: the first one warms up
        step = m["time/rollout"] + m["time/score"] + m["time/train"]
        return {"step_s": step, "rollout_s": m["time/rollout"], "score_s": m["time/score"], "train_s": m["time/train"],
                "rollout_share": m["time/rollout"] / step, "response_len": m["objective/response_len"],
                "rollout_tokens_per_s": 8 * m["objective/response_len"] / m["time/rollout"], "peak_gb": m["mem/peak_gb"],
                "prompt_width": m["prompt_width"]}
    for shape, dtype in ((big, "float32"), (big, "bfloat16"), (small, "float32")):
        stage(f"ppo {shape} {dtype}", lambda: ppo(shape, dtype))
    rep["ppo"] = {k.removeprefix("ppo "): rep.pop(k) for k in list(rep) if k.startswith("ppo ")}

    # the FSDP2 path on one GPU, on the smaller shape (its sharded checkpoint holds weights and both Adam moments
    # of policy and critic, 12 B/param): torchrun's one rank shards every model (bf16 compute over fp32 master
    # weights on CUDA), generates with the policy gathered, writes a sharded checkpoint after step 1; a second run
    # resumes from it (the checkpoint hard-linked) and must log step 2 as the uninterrupted run did
    def fsdp():  # it checks the path, not the speed: 64 new tokens keep it inside the budget
        flags = [*ppo_flags, "--model", work / small / "lm", "--reward", work / small / "rm", "--save-every", 1,
                 "--max-new-tokens", min(new_tokens, 64)]
        rows = script("ppo.py", *flags, "--out", work / "fsdp", ranks=1, logs=logs, timeout=left())
        ckpt = Path(salsa.latest_checkpoint(f"{work / 'fsdp'}.ckpt"))
        shards = sorted(f.name for f in ckpt.glob("*.distcp"))
        # its log too: the resume cuts it at step 1
        shutil.copytree(f"{work / 'fsdp'}.ckpt", work / "fsdp-resumed.ckpt", copy_function=os.link)
        resumed = script("ppo.py", *flags, "--resume", "--out", work / "fsdp-resumed", ranks=1, logs=logs,
                         timeout=left())
        drop(work / "fsdp", work / "fsdp-resumed")
        m = rows[-1]
        return {"model": small, "new_tokens": min(new_tokens, 64),
                "step_s": m["time/rollout"] + m["time/score"] + m["time/train"],
                "rollout_s": m["time/rollout"], "score_s": m["time/score"], "train_s": m["time/train"],
                "peak_gb": m["mem/peak_gb"], "checkpoint": ckpt.name, "shard_files": shards,
                "resumed_steps": [r["step"] for r in resumed],
                "resume_max_abs_diff": max(abs(resumed[-1][k] - m[k]) for k in m if not k.startswith(("time/", "mem/")))}
    stage("fsdp", fsdp)
    width = rep["ppo"].get(f"{big} bfloat16", {}).get("prompt_width", 4 * prompt_words) + new_tokens
    stage("plain_bf16_fwd_bwd_s", lambda: plain_step(work / big / "lm", 8, width, device))

    # the memory plan in one process (plain ppo.py: no FSDP, no activation checkpointing), the held rows of the
    # README's plan at world size 1: 16 B/param for the policy and for its critic (fp32 weights, gradients, Adam m,
    # v) + 2 B/param each for the bf16 frozen reference (the policy's shape) and reward model (the critic's). The
    # rest of the peak (activations, workspace) grows with the layers' widths at these token counts, L·(d + f),
    # not with the parameters (the LM head's vocabulary is most of the parameters that do not reach it)
    def plan():
        plan = {}
        for shape in (big, small):
            n_lm, n_rm = rep["params"][shape]["lm"], rep["params"][shape]["rm"]
            d, f, layers, _, _ = SHAPES[shape]
            formula, measured = 18 * (n_lm + n_rm) / 2**30, rep["ppo"][f"{shape} float32"]["peak_gb"]
            plan[shape] = {"params": n_lm + n_rm, "formula_gb": formula, "measured_gb": measured,
                           "rest_gb": measured - formula, "rest_per_width_kb": (measured - formula) * 2**30 / 1e3 / (layers * (d + f))}
        d, f, layers, vocab = 4096, 14336, 32, 32000  # Mistral-7B: 7.24B parameters, its critic without the LM head
        plan["7.24b_formula_gb"] = 18 * (2 * 7.24e9 - vocab * d) / 2**30
        plan["7.24b_gb"] = plan["7.24b_formula_gb"] + plan[big]["rest_per_width_kb"] * 1e3 * layers * (d + f) / 2**30
        return plan
    stage("memory_plan", plan, timed=False)  # arithmetic on what was measured
    shutil.rmtree(work, ignore_errors=True)
    print((out / "report.md").read_text())
    if rep["errors"]:
        raise SystemExit(f"{len(rep['errors'])} stage(s) failed: {', '.join(rep['errors'])} (see {out}/report.md)")


def report(r: dict, big: str, small: str, seq_len: int, new_tokens: int) -> str:
    """report.md from what has been measured so far: a section whose stage failed or has not run says so."""
    f = lambda x: "-" if x is None else f"{x:.3g}"
    lines = [f"# GPU check, {r['date']}: {r['device']}, torch {r['torch']}, transformers {r['transformers']}", "",
             f"Measured by `make gpu-check` in {r['seconds']:.0f} s"
             + (f"; bf16 matmul probe {r['probe_bf16_flops'] / 1e12:.1f} TFLOP/s" if "probe_bf16_flops" in r else "")
             + (f"; {r['free_disk_gib']:.0f} GiB free on disk at the start" if "free_disk_gib" in r else "")
             + (". Memory in GiB (2**30 bytes) allocated by tensors; the allocator's reserve and the CUDA context "
                "come on top." if r["device"] != "CPU" else ". Memory: the process's resident set, GiB (on the CPU "
                "every stage runs in this one process, so each peak is the largest so far)."),
             "Stage seconds: " + ", ".join(f"{k} {v:g}" for k, v in r["stage_seconds"].items()) + ".", ""]
    lines += [f"- **{k} failed**: {v.splitlines()[0][:300]}" for k, v in r["errors"].items()] + [""] * bool(r["errors"])
    if "sft" in r:
        n = r["params"][big]["matmul"]
        lines += [f"## SFT: sft.py, {big} ({n / 1e9:.2f}B matmul weights), bf16, 8 x {seq_len} tokens", "",
                  f"- {r['sft']['tokens_per_s']:.0f} tokens/s; MFU {f(r['sft']['mfu_probe'])} of the probe, "
                  f"{f(r['sft']['mfu_datasheet'])} of the datasheet's dense bf16 peak (PaLM's count: 6N + 12·L·d·T "
                  f"FLOPs per token; the mean of steps 2 and 3); peak memory {r['sft']['peak_gb']:.1f} GiB (bf16 "
                  "weights and Adam states, no fp32 copy, no activation checkpointing). The LM head's logits are an "
                  "fp32 matmul at fp32 speed (fp32 log-probs; PyTorch's default uses no TF32): 9% of N at 1.1B, and a larger "
                  "share of the time, not measured here, so this is not a pure bf16 MFU.", ""]
    ppo = r.get("ppo") or {k.removeprefix("ppo "): v for k, v in r.items() if k.startswith("ppo ")}  # as they come
    if ppo:
        lines += [f"## PPO: ppo.py, batch 8, {new_tokens} new tokens, 2 epochs, frozen models in bf16 (the second step)",
                  "", "| policy | step (s) | rollout (s) | share | rollout tokens/s | scoring (s) | training (s) | peak GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['step_s']:.2f} | {v['rollout_s']:.2f} | {v['rollout_share']:.2f} | "
                  f"{v['rollout_tokens_per_s']:.0f} | {v['score_s']:.2f} | {v['train_s']:.2f} | {v['peak_gb']:.1f} |"
                  for k, v in ppo.items()]
        lines += [""]
    if "fsdp" in r:
        z = r["fsdp"]
        how = "torchrun --nproc_per_node 1" if r["device"] != "CPU" else "world size 1 in the check's own process"
        lines += [f"FSDP2 on one rank ({how}, the fp32 policy, {z['model']}, {z['new_tokens']} new tokens: it checks "
                  f"the path, not the speed): step {z['step_s']:.2f} s = rollout "
                  f"{z['rollout_s']:.2f} + scoring {z['score_s']:.2f} + training {z['train_s']:.2f}; peak "
                  f"{z['peak_gb']:.1f} GiB; sharded checkpoint {z['checkpoint']} ({', '.join(z['shard_files'])}); "
                  f"resumed, it logged steps {z['resumed_steps']}, its step 2 off the uninterrupted run's by at most "
                  f"{z['resume_max_abs_diff']:.3g}.", ""]
    if "plain_bf16_fwd_bwd_s" in r:
        lines += [f"A plain bf16 forward and backward of 8 rows of random tokens as wide as the PPO batch (prompts "
                  f"and new tokens) on {big}: {r['plain_bf16_fwd_bwd_s']:.3f} s (PPO trains 2 epochs of 8 one-row "
                  "micro-batches, plus its critic and fp32 log-probs).", ""]
    if "memory_plan" in r:
        p = r["memory_plan"]
        lines += ["## Memory plan in one process (plain ppo.py, no FSDP, no activation checkpointing): the held "
                  "rows of the README's plan at world size 1, fp32 policy and critic 16 B/param each, their bf16 "
                  "frozen reference and reward model 2 B/param each", "",
                  "| model | policy + critic parameters | held, formula (GiB) | measured peak (GiB) | rest (GiB) | "
                  "rest per unit of L·(d + f) (KB) |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {s} | {p[s]['params'] / 1e9:.2f}B | {p[s]['formula_gb']:.1f} | {p[s]['measured_gb']:.1f} | "
                  f"{p[s]['rest_gb']:.1f} | {p[s]['rest_per_width_kb']:.1f} |" for s in (small, big)]
        lines += ["", f"The rest (activations, the rollout's KV cache, workspace) is scaled by the layers' widths L·(d + f), not by the parameters; "
                  "the last column says how well that holds between the two sizes. A 7.24B policy and its critic "
                  f"(Mistral-7B's shape, the critic without an LM head) in one process: {p['7.24b_formula_gb']:.0f} GiB "
                  f"held by the formula, {p['7.24b_gb']:.0f} GiB with {big}'s rest scaled (GiB: the README's table is "
                  "in GB, 1.074 times larger). Under FSDP on 8 GPUs the held part divides by 8; the README's other "
                  "rows (the rollout's gathered bf16 policy, the gathered roots, checkpointed activations) are not "
                  "measured here.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
