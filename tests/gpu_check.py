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
  (6·N·tokens, N the matmul weights), peak memory;
- PPO: ppo.py steps at App. A.3's batch of 8 with 512 new tokens on that shape, fp32 policy and bf16
  policy: rollout tokens/s and share of the step, scoring and training time, peak memory; beside
  them a plain bf16 forward and backward of the same tokens, to show where the time goes;
- memory plan: the PPO peak at two sizes against the per-GPU formula at world size 1 (16 B/param each
  for the policy and its critic, ppo.py's default --critic reward; 2 B/param for each bf16 frozen
  model), and the line through both extrapolated to 7B.
- the FSDP2 path: torchrun with one rank shards every model (on CUDA, bf16 compute over fp32 master
  weights), generates with the policy gathered, writes a sharded checkpoint and resumes from it.
"""
import argparse
import importlib
import json
import os
import shutil
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
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s of the SXM parts
TOKENIZER = ROOT / "models" / "SmolLM2-135M-Instruct"


def build(path: Path, shape: str, tok, device) -> int:
    """A random-init causal LM and a reward model of one shape, saved as HF directories; returns the
    number of matmul weights (all parameters but the input embedding)."""
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
    return sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)


def script(name: str, *flags, ranks: int = 0) -> list[dict]:
    """Run a stage script to the end and return its metrics.jsonl rows (OUT is the flag after --out);
    ranks > 0: under torchrun with that many processes (FSDP2, also at 1). Without CUDA a stage runs
    in this process instead (its `main` on the same flags; ranks 1: with the variables torchrun would
    set): on tiny models a subprocess's imports are most of its time, and the CPU path must stay well
    under a minute. On a GPU each stage has a process of its own, so each peak memory is its own."""
    argv = list(map(str, flags))
    out = argv[argv.index("--out") + 1]
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
    print("$", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)  # a hung rank ends the check
    if res.returncode:
        raise SystemExit(f"{name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return salsa.read_jsonl(f"{out}.ckpt/metrics.jsonl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def matmul_rate(device, n: int) -> float:
    """FLOP/s of an n x n x n bf16 matmul, the mean of 10 after 3 warm-ups."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t)


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
    out = Path(p.parse_args().out)
    if out.exists():
        raise SystemExit(f"{out} exists: give another --out")
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    big, small = ("1.1b", "0.5b") if gpu else ("tiny2", "tiny")
    seq_len, new_tokens, prompt_words = (2048, 512, 200) if gpu else (64, 16, 12)
    tok = salsa.load_tokenizer(str(TOKENIZER))
    work = out / "work"
    name = torch.cuda.get_device_name() if gpu else "CPU"
    rep = {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "shapes": {big: SHAPES[big], small: SHAPES[small]}}
    start = time.time()
    rep["probe_bf16_flops"] = matmul_rate(device, 8192 if gpu else 256)
    peak = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    n_big, n_small = build(work / big, big, tok, device), build(work / small, small, tok, device)
    rep["params"] = {big: n_big, small: n_small}

    # data: long chat rows for SFT (cut to --max-len), prompts of about prompt_words words for PPO
    g = torch.Generator().manual_seed(0)
    words = lambda n: " ".join(tok.decode([int(i)]).strip() or "a" for i in torch.randint(1000, 20000, (n,), generator=g))
    chats = [{"messages": [{"role": "user", "content": "Write a long text."},
                           {"role": "assistant", "content": words(seq_len + 50)}]} for _ in range(10)]
    (work / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": words(prompt_words)}) + "\n" for _ in range(8)))

    sft = script("sft.py", "--model", work / big / "lm", "--data", work / "sft.jsonl", "--eval-frac", 0.1,
                 "--max-len", seq_len, "--batch-size", 8, "--micro-batch", 8, "--max-steps", 3, "--dtype", "bfloat16",
                 "--eval-every", 0, "--save-every", 0, "--out", work / "sft")
    tok_s = max(r["train/tokens_per_s"] for r in sft[1:])  # the first step warms up
    rep["sft"] = {"tokens_per_s": tok_s, "peak_gb": sft[-1]["mem/peak_gb"],
                  "mfu_probe": 6 * n_big * tok_s / rep["probe_bf16_flops"],
                  "mfu_datasheet": 6 * n_big * tok_s / peak if peak else None}

    ppo_flags = ["--ref", "sft", "--data", work / "prompts.jsonl", "--batch-size", 8, "--max-new-tokens", new_tokens,
                 "--max-prompt-len", 4 * prompt_words, "--steps", 2, "--save-every", 1000, "--sample-every", 1000,
                 "--frozen-dtype", "bfloat16"]
    rep["ppo"] = {}
    for shape, dtype in ((big, "float32"), (big, "bfloat16"), (small, "float32")):
        rows = script("ppo.py", *ppo_flags, "--model", work / shape / "lm", "--reward", work / shape / "rm",
                      "--dtype", dtype, "--out", work / f"ppo-{shape}-{dtype}")
        m = rows[-1]  # the second step: the first one warms up
        step = m["time/rollout"] + m["time/score"] + m["time/train"]
        rep["ppo"][f"{shape} {dtype}"] = {
            "step_s": step, "rollout_s": m["time/rollout"], "score_s": m["time/score"], "train_s": m["time/train"],
            "rollout_share": m["time/rollout"] / step, "response_len": m["objective/response_len"],
            "rollout_tokens_per_s": 8 * m["objective/response_len"] / m["time/rollout"], "peak_gb": m["mem/peak_gb"],
            "prompt_width": m["prompt_width"]}
    # the FSDP2 path on one GPU: torchrun's one rank shards every model (bf16 compute over fp32 master weights
    # on CUDA), generates with the policy gathered, writes a sharded checkpoint after step 1; a second run
    # resumes from it (the checkpoint copied) and must log step 2 as the uninterrupted run did
    fsdp = [*ppo_flags, "--model", work / big / "lm", "--reward", work / big / "rm", "--save-every", 1]
    rows = script("ppo.py", *fsdp, "--out", work / "fsdp", ranks=1)
    ckpt = Path(salsa.latest_checkpoint(f"{work / 'fsdp'}.ckpt"))
    shutil.copytree(f"{work / 'fsdp'}.ckpt", work / "fsdp-resumed.ckpt")  # its log too: the resume cuts it at step 1
    resumed = script("ppo.py", *fsdp, "--resume", "--out", work / "fsdp-resumed", ranks=1)
    m = rows[-1]
    rep["fsdp"] = {"step_s": m["time/rollout"] + m["time/score"] + m["time/train"], "rollout_s": m["time/rollout"],
                   "score_s": m["time/score"], "train_s": m["time/train"], "peak_gb": m["mem/peak_gb"],
                   "checkpoint": ckpt.name, "shard_files": sorted(f.name for f in ckpt.glob("*.distcp")),
                   "resumed_steps": [r["step"] for r in resumed],
                   "resume_max_abs_diff": max(abs(resumed[-1][k] - m[k]) for k in m if not k.startswith(("time/", "mem/")))}
    width = rep["ppo"][f"{big} bfloat16"]["prompt_width"] + new_tokens
    rep["plain_bf16_fwd_bwd_s"] = plain_step(work / big / "lm", 8, width, device)

    # the memory plan at world size 1: 2 x 16 B/param (policy and critic: fp32 weights, gradients, Adam m, v)
    # + 2 x 2 B/param (bf16 frozen reference and reward model)
    plan = {}
    for shape, n in ((big, n_big), (small, n_small)):
        total = n + SHAPES[shape][0] * len(tok)  # the input embedding is held too
        plan[shape] = {"params": total, "formula_gb": 36 * total / 2**30,
                       "measured_gb": rep["ppo"][f"{shape} float32"]["peak_gb"]}
    slope = (plan[big]["measured_gb"] - plan[small]["measured_gb"]) / (plan[big]["params"] - plan[small]["params"])
    plan["7.24b_line_gb"] = plan[big]["measured_gb"] + slope * (7.24e9 - plan[big]["params"])
    plan["7.24b_formula_gb"] = 36 * 7.24e9 / 2**30
    rep["memory_plan"] = plan
    rep["seconds"] = time.time() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=1))
    (out / "report.md").write_text(report(rep, big, small, seq_len, new_tokens))
    print((out / "report.md").read_text())


def report(r: dict, big: str, small: str, seq_len: int, new_tokens: int) -> str:
    f = lambda x: "-" if x is None else f"{x:.3g}"
    lines = [f"# GPU check, {r['date']}: {r['device']}, torch {r['torch']}, transformers {r['transformers']}", "",
             f"Measured by `make gpu-check` in {r['seconds']:.0f} s. bf16 matmul probe: {r['probe_bf16_flops'] / 1e12:.1f} "
             f"TFLOP/s.", "", f"## SFT: sft.py, {big} ({r['params'][big] / 1e9:.2f}B matmul weights), bf16, "
             f"8 x {seq_len} tokens", "",
             f"- {r['sft']['tokens_per_s']:.0f} tokens/s; MFU {f(r['sft']['mfu_probe'])} of the probe, "
             f"{f(r['sft']['mfu_datasheet'])} of the datasheet's bf16 peak; peak memory {r['sft']['peak_gb']:.1f} GB", "",
             f"## PPO: ppo.py, batch 8, {new_tokens} new tokens, 2 epochs, frozen models in bf16 (the second step)", "",
             "| policy | step (s) | rollout (s) | share | rollout tokens/s | scoring (s) | training (s) | peak GB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['step_s']:.2f} | {v['rollout_s']:.2f} | {v['rollout_share']:.2f} | {v['rollout_tokens_per_s']:.0f} | "
              f"{v['score_s']:.2f} | {v['train_s']:.2f} | {v['peak_gb']:.1f} |" for k, v in r["ppo"].items()]
    p = r["memory_plan"]
    z = r["fsdp"]
    how = "torchrun --nproc_per_node 1" if r["device"] != "CPU" else "world size 1 in the check's own process"
    lines += ["", f"FSDP2 on one rank ({how}, the fp32 policy): step {z['step_s']:.2f} s = rollout "
              f"{z['rollout_s']:.2f} + scoring {z['score_s']:.2f} + training {z['train_s']:.2f}; peak {z['peak_gb']:.1f} GB; "
              f"sharded checkpoint {z['checkpoint']} ({', '.join(z['shard_files'])}); resumed, it logged steps "
              f"{z['resumed_steps']}, its step 2 off the uninterrupted run's by at most {z['resume_max_abs_diff']:.3g}."]
    lines += ["", f"A plain bf16 forward and backward of the same 8 rows: {r['plain_bf16_fwd_bwd_s']:.3f} s (PPO trains "
              "2 epochs of 8 one-row micro-batches, plus its critic and fp32 log-probs).", "",
              "## Memory plan at world size 1 (fp32 policy and critic 16 B/param each, two bf16 frozen models 2 B/param each)", "",
              "| model | parameters | formula (GB) | measured peak (GB) |", "|---|---:|---:|---:|"]
    lines += [f"| {s} | {p[s]['params'] / 1e9:.2f}B | {p[s]['formula_gb']:.1f} | {p[s]['measured_gb']:.1f} |" for s in (small, big)]
    lines += ["", f"At 7.24B on one GPU: the formula says {p['7.24b_formula_gb']:.0f} GB held; the line through the two "
              f"measured peaks says {p['7.24b_line_gb']:.0f} GB. Under FSDP on 8 GPUs the held part divides by 8.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
