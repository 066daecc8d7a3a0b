"""The README's per-run numbers of the study, from the records in study/ (no weights needed):

    .venv/bin/python study/runs.py [DIR]     DIR: a study's records (default study/; the rerun: study/whole-critic)

First the starting points (the SFT pair and the soup, greedy): gold on the dev half (even rows) and the test
half (odd rows), and the reward model's test score (results/reward_hist). For each run: gold − SFT on all 256
questions (bootstrap over questions), the reward model's test score, KL to init (mean of the last 5 steps); and
over each run's whole training: the rollouts' entropy, mean response length, explained
variance and no-EOS share (their ranges). Last, SALSA − PPO at each β on the test half, paired by seed and
question (bootstrap over both, as the report's), with how many pairs each method scores higher on. The questions are the task's, rebuilt with the study's seed
and sizes (salsa.py task), which study/shared/SHA256SUMS pins."""
import csv
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
S = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
import salsa  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    salsa.make_task(f"{tmp}/data", 320, 320, 256, 256, seed=0)  # the Study's task_sizes and task_seed
    qs = [(str(q["id"]), q["turns"][0]) for q in salsa.load_questions(f"{tmp}/data/eval.jsonl", "", 0)]


def gold(name: str) -> torch.Tensor:
    answers = {str(r["question_id"]): r["choices"][0]["turns"][0] for r in salsa.read_jsonl(S / "answers" / f"{name}.jsonl")}
    return torch.tensor([salsa.gold_score(p, answers[q]) for q, p in qs], dtype=torch.float64)  # (questions,)


test = {q for q, _ in qs[1::2]}  # the test half's question ids (odd rows)
with open(S / "results" / "reward_hist" / "reward_hist.csv") as f:  # read once: one row per (model, question)
    rm_rows = [r for r in csv.DictReader(f) if r["question_id"] in test]


def rm_test(name: str) -> float:
    """The reward model's mean score of `name`'s answers to the test half."""
    scores = [float(r["reward"]) for r in rm_rows if r["model"] == name]
    return sum(scores) / len(scores)


sft = gold("sft")
for name in ("sft", "sft-seed2", "soup"):
    g = gold(name)
    print(f"{name}: gold dev {g[0::2].mean():.3f}, test {g[1::2].mean():.3f}; reward model, test {rm_test(name):.3f}")
floor = torch.tensor([salsa.gold_score(p, salsa.NO_CONTENT) for _, p in qs])  # the gold score's floor, for scale
print(f"the answer {salsa.NO_CONTENT!r}: gold dev {floor[0::2].mean():.3f}, test {floor[1::2].mean():.3f}")
print()
print("| Run | Gold − SFT, all [95% CI] | RM, test | KL to init | Entropy | Response length | Explained var. | No-EOS |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for run in sorted(p.name for p in (S / "metrics").iterdir()):
    logs = salsa.read_jsonl(S / "metrics" / run / "metrics.jsonl")
    span = lambda k: f"{min(r[k] for r in logs):.2f}..{max(r[k] for r in logs):.2f} (start {logs[0][k]:.2f})"
    mean, lo, hi = salsa.bootstrap((gold(run) - sft)[None], 2000)
    print(f"| {run} | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] | {rm_test(run):.3f} | {sum(r['objective/kl_init'] for r in logs[-5:]) / 5:.2f} | "
          f"{span('objective/entropy')} | {span('objective/response_len')} | {span('val/explained_var')} | "
          f"{span('objective/no_eos_frac')} |")

print()
print("| β | SALSA − PPO, test [95% CI] | SALSA higher | PPO higher | same |")
print("|---:|---:|---:|---:|---:|")
names = sorted(p.name for p in (S / "metrics").iterdir())
for beta in sorted({n.split("-beta")[1].split("-seed")[0] for n in names if n.startswith("ppo-beta")}, key=float):
    seeds = [n.split("-seed")[1] for n in names if n.startswith(f"ppo-beta{beta}-seed")]
    both = [(f"ppo-beta{beta}-seed{s}", f"salsa-beta{beta}-seed{s}") for s in seeds if f"salsa-beta{beta}-seed{s}" in names]
    ppo, salsa_ = (torch.stack([gold(pair[i])[1::2] for pair in both]) for i in (0, 1))  # (seeds, test questions)
    mean, lo, hi = salsa.bootstrap(salsa_ - ppo, 2000)
    mean = round(mean, 9) + 0.0  # thirds of a gold score sum to -1e-17, not 0: no "-0.000"
    print(f"| {beta} | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] | {int((salsa_ > ppo).sum())} | {int((salsa_ < ppo).sum())} | "
          f"{int((salsa_ == ppo).sum())} |")
