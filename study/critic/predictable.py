"""How much of a rollout's score any critic could predict: the ceiling on val/explained_var (README, "Why the critic is a whole critic").

A critic at response token t sees the prompt and the first t tokens. The best it can do is V_t = E[score | prefix_t],
and the share of the score's variance that V_t explains is 1 - E[Var(score | prefix_t)] / Var(score). This
estimates that share for the SFT policy the study's PPO runs start from (their step-1 rollouts, where KL = 0 and
the return is the score): for N prompts, one sampled answer each; at t = 0, 1/4, 1/2 and 3/4 of its length, K
continuations of its first t tokens, sampled as ppo.py samples but at temperature 1 (ppo.py's default is 0.7; no top-k/top-p, 64 new tokens in
all); each scored by the reward model (normalised, as ppo.py's reward) and by the gold judge. Within a prefix the
spread is what no critic can know; the one-way ANOVA estimate of the between-prefix share (the intraclass
correlation, (MSB - MSW) / (MSB + (K-1) MSW)) is the ceiling at that depth, with a 95% interval that bootstraps
over prompts.

    python study/critic/predictable.py RUNS_STUDY [N] [K]     (defaults 32 prompts, 6 continuations)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import salsa  # noqa: E402

R = Path(sys.argv[1])
N, K = (int(sys.argv[2]), int(sys.argv[3])) if len(sys.argv) > 3 else (32, 6)
torch.manual_seed(0)
tok = salsa.load_tokenizer(str(R / "sft-seed1"))
policy = salsa.load_model(str(R / "sft-seed1"), tok)
rm = salsa.load_reward_model(str(R / "rm"))
rows = [row for _, row in salsa.read_rows(str(R / "data" / "ppo.jsonl"))][:N]
prompts = [salsa.prompt_ids(tok, row["prompt"]) for row in rows]
first = salsa.generate(policy, tok, prompts, salsa.generation_config(tok, 1.0, 64), batch_size=N)


@torch.no_grad()
def scores(prompt, raw, answers):
    """Normalised reward-model scores and gold scores of K answers (token ids) to one prompt."""
    ids, mask = salsa.pad([prompt + a for a in answers], tok.pad_token_id, left=False)
    texts = tok.batch_decode(answers, skip_special_tokens=True)
    return salsa.reward_scores(rm, ids, mask).tolist(), [salsa.gold_score(raw, t) for t in texts]


def icc(groups: torch.Tensor) -> float:
    """The between-group share of variance, (MSB - MSW) / (MSB + (K-1) MSW), of a (groups, K) table."""
    k = groups.shape[1]
    msb = k * groups.mean(1).var()
    msw = groups.var(1).mean()
    return ((msb - msw) / (msb + (k - 1) * msw)).item()


print(f"{N} prompts, {K} continuations each\n")
print("| depth t | reward model: ceiling [95%] | gold: ceiling [95%] |")
print("|---|---:|---:|")
for frac in (0, 0.25, 0.5, 0.75):
    rm_t, gold_t = [], []
    for prompt, row, answer in zip(prompts, rows, first):
        t = int(frac * len(answer))
        cfg = salsa.generation_config(tok, 1.0, 64 - t)
        cont = salsa.generate(policy, tok, [prompt + answer[:t]] * K, cfg, batch_size=K)
        r, g = scores(prompt, row["prompt"], [answer[:t] + c for c in cont])
        rm_t.append(r)
        gold_t.append(g)
    cells = []
    for table in (torch.tensor(rm_t), torch.tensor(gold_t)):
        gen = torch.Generator().manual_seed(0)
        boots = torch.tensor([icc(table[torch.randint(0, N, (N,), generator=gen)]) for _ in range(2000)])
        lo, hi = boots[~boots.isnan()].quantile(torch.tensor([0.025, 0.975])).tolist()  # nan: no spread at all
        cells.append(f"{icc(table):+.2f} [{lo:+.2f}, {hi:+.2f}]")
    print(f"| {frac:g} of the answer | {cells[0]} | {cells[1]} |", flush=True)
