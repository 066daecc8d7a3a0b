"""Reward model: Bradley-Terry on preference pairs (SALSA eq. 1), then a normalisation bias and gain.

    python reward.py --model runs/sft-seed1 --out runs/rm
    torchrun --nproc_per_node 8 reward.py --model runs/sft-seed1 --out runs/rm

The model is a standard AutoModelForSequenceClassification (num_labels=1): the SFT backbone and a new
bias-free scalar head of standard deviation 1/sqrt(d+1) (Stiennon et al. 2020: rewards start at about unit scale),
read by salsa.reward_scores at the EOS closing the response. Each side of a pair is tokenised as what
PPO scores: prompt_ids(prompt) + response + EOS. The normalisation is stored in config.json as
`reward_bias` and `reward_gain`, so one directory holds everything: the mean and 1/std of the raw
rewards of --norm-samples responses of the initial SFT model, sampled like PPO's first rollouts
(--norm-temperature = ppo.py's 0.7), so PPO starts at reward 0 with unit spread (Ziegler et al. 2019
normalise both) and a β means the same for every reward model; with --norm-samples 0, the mean and
spread over held-out chosen+rejected. A BT model's scale is arbitrary (eq. 1 sees only differences).
ppo.py subtracts --missing-eos-penalty from a response with no EOS after this normalisation, so its
first scores average about -penalty x norm/no_eos_frac (metrics.json), 0 only when every sample stops.
metrics.json's eval/* are on the saved model's (normalised) scale; metrics.jsonl's rows during
training are raw scores (accuracy is the same on both).

Departures: pairs longer than --max-len are dropped, not truncated (a cut response has no EOS, so the
head would learn to score text PPO never shows it); no warmup (App. A.2 names only linear decay);
weights and AdamW state in --dtype (bfloat16 trains without fp32 master weights). Under torchrun
both models are sharded with FSDP2 (salsa.distribute).
"""
import math
import os
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import salsa


@dataclass
class Args:
    model: str = salsa.arg("models/SmolLM2-135M-Instruct", "SFT model to start from (paper: init from SFT, Sec. 3.1)")
    data: str = salsa.arg("HuggingFaceH4/ultrafeedback_binarized", "preference pairs, hub name or .json/.jsonl/"
                          ".parquet, with `chosen` and `rejected` messages (UltraFeedback-binarized schema)")
    split: str = salsa.arg("train_prefs", "split of a hub --data")
    eval_data: str = salsa.arg("", "held-out pairs (file or hub name); empty: --data's --eval-split if --data is "
                               "a hub name, else an --eval-frac holdout")
    eval_split: str = salsa.arg("test_prefs", "split of a hub --eval-data")
    eval_frac: float = salsa.arg(0.05, "fraction of a local --data held out when --eval-data is empty")
    max_len: int = salsa.arg(2048, "pairs with a side longer than this many tokens are dropped (App. A.1's length)", low=1)
    lr: float = salsa.arg(2e-5, "peak learning rate, decayed linearly to 0 (App. A.2)")
    batch_size: int = salsa.arg(8, "pairs per optimizer step, all ranks together (App. A.2)", low=1)
    micro_batch: int = salsa.arg(1, "at most this many pairs per forward on one rank (2x rows: chosen and rejected)", low=1)
    weight_decay: float = salsa.arg(0.001, "AdamW weight decay (App. A.2)")
    epochs: int = salsa.arg(1, "passes over the training pairs", low=1)
    max_steps: int = salsa.arg(0, "optimizer steps (0: --epochs worth)", low=0)
    max_grad_norm: float = salsa.arg(1.0, "gradient clipping norm (0: none)", low=0)
    eval_every: int = salsa.arg(500, "held-out evaluation every N steps (0: only at the end)", low=0)
    save_every: int = salsa.arg(500, "steps between resumable checkpoints in OUT.ckpt (the 2 newest are kept; 0: none)", low=0)
    resume: bool = salsa.arg(False, "continue from the newest checkpoint in OUT.ckpt, with the same flags")
    norm_samples: int = salsa.arg(64, "SFT responses whose raw rewards set the bias and gain (0: held-out pairs)", low=0)
    norm_max_new_tokens: int = salsa.arg(64, "max new tokens of each normalisation response", low=1)
    norm_temperature: float = salsa.arg(0.7, "sampling temperature of the normalisation responses, ppo.py's "
                                        "--temperature (0: greedy)")
    seed: int = salsa.arg(0, "seed of shuffling, head init and normalisation sampling")
    dtype: salsa.DType = salsa.arg("float32", "weights and AdamW state dtype")
    attn: str = salsa.arg("sdpa", "attention implementation (sdpa, eager, flash_attention_2)")
    allow_pickle: bool = salsa.arg(False, "load a --model whose weights are only a pickle (pytorch_model.bin runs code)")
    out: str = salsa.arg("runs/rm", "output directory (must not exist; ppo.py's default --reward); checkpoints and "
                                    "metrics.jsonl go to OUT.ckpt")


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(r_chosen - r_rejected).mean()  # SALSA eq. 1: -log sigma(R(x, y_w) - R(x, y_l))


def tokenize_pair(tok, row, where: str):
    """(prompt, chosen, rejected) ids of a checked row: each side's chat rendering up to its response's EOS."""
    for key in ("chosen", "rejected"):
        messages = salsa.check_messages(row.get(key) if isinstance(row, dict) else None, f"{where} `{key}`")
        if messages[-1]["role"] != "assistant":
            raise salsa.InputError(f"{where}: `{key}` must end with the assistant's response")
    if row["chosen"][:-1] != row["rejected"][:-1]:
        raise salsa.InputError(f"{where}: `chosen` and `rejected` must share the conversation before their last message")
    prompt, sides = salsa.prompt_ids(tok, row["chosen"][:-1], where), []
    for key in ("chosen", "rejected"):
        full = salsa.render(tok, row[key], where=f"{where} `{key}`")
        if full[: len(prompt)] != prompt or tok.eos_token_id not in full[len(prompt):]:
            raise salsa.InputError(f"{where}: the chat template's rendering of `{key}` does not extend the prompt "
                             f"and close the response with {tok.eos_token!r}; use a chat tokenizer that does")
        sides.append(full[: full.index(tok.eos_token_id, len(prompt)) + 1])
    return prompt, *sides


def load_pairs(tok, source: str, split: str, max_len: int, dist) -> list[tuple]:
    """(prompt, chosen, rejected) ids of every usable row; which rows were dropped, and why, is printed."""
    rows = salsa.read_rows(source, split)
    pairs = [(where, tokenize_pair(tok, row, where)) for where, row in tqdm(rows, desc=f"tokenize {source}",
                                                                            disable=not dist.main)]
    same = [where for where, p in pairs if p[1] == p[2]]  # no preference to learn: the loss is log 2, its gradient 0
    long = [where for where, p in pairs if max(len(p[1]), len(p[2])) > max_len]
    both = [(where, row["chosen"] + row["rejected"][-1:]) for where, row in rows]  # checked by tokenize_pair
    special = salsa.rows_with_special_text(tok, both, "pairs", dist)
    dropped = set(same + long) | special  # once, not per row (a reviewer timed 15.6 s for that on 61k rows)
    kept = [p for where, p in pairs if where not in dropped]
    salsa.log0(dist, f"{source}: {len(kept)} pairs")
    for why, wheres in ((f"a side longer than --max-len {max_len}", long), ("`chosen` equal to `rejected`", same)):
        if wheres:
            salsa.log0(dist, f"{source}: dropped {len(wheres)} pairs with {why}: {salsa.rows_note(wheres)}")
    if not kept:
        raise salsa.InputError(f"{source}: no usable pair (see above); raise --max-len or fix the rows")
    return kept


def init_reward_model(args, tok, checkpoint: str | None = None):
    """The SFT model with a new scalar head, or (resuming in one process) the reward model of a checkpoint."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging
    # the head is missing from an SFT checkpoint by design: no load report; what else is missing is checked here
    logging.set_verbosity_error()
    rm, loaded = salsa.from_pretrained(AutoModelForSequenceClassification, checkpoint or args.model, args.dtype,
                                       args.attn, args.allow_pickle, num_labels=1, output_loading_info=True)
    if missing := set(loaded["missing_keys"]) - ({"score.weight"} if not checkpoint else set()):
        raise salsa.InputError(f"{checkpoint or args.model}: {len(missing)} backbone tensors were not in its weights "
                               f"(e.g. {sorted(missing)[0]}): they would train from a random init")
    if len(tok) > rm.get_input_embeddings().weight.shape[0]:
        rm.resize_token_embeddings(len(tok))
    rm.config.pad_token_id, rm.config.reward_bias, rm.config.reward_gain = tok.pad_token_id, 0.0, 1.0
    if not checkpoint:  # the same head on every rank: a generator of its own, not the rank-offset global seed
        torch.nn.init.normal_(rm.score.weight, std=1 / math.sqrt(rm.score.in_features + 1),
                              generator=torch.Generator().manual_seed(args.seed))
    salsa.disable_dropout(rm)
    return rm


def generate_references(args, tok, prompts: list[list[int]], dist) -> list[tuple]:
    """(prompt, prompt + response) pairs from the initial SFT model, responses cut after the first EOS."""
    if not prompts:
        return []
    policy = salsa.load_model(args.model, tok, args.dtype, args.attn, dist.device, dist,
                              allow_pickle=args.allow_pickle).eval()
    cfg = salsa.generation_config(tok, args.norm_temperature, args.norm_max_new_tokens)  # as ppo.py samples
    torch.manual_seed(args.seed)  # every rank draws the same samples
    # a response that never stops is kept whole and scored at its last token
    responses = salsa.generate(policy, tok, prompts, cfg, args.batch_size, dist, "normalisation samples")
    return [(p, p + r) for p, r in zip(prompts, responses)]


def agree(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """Pairs ordered as labelled, a tie counting half (a zero head is at chance, 0.5, not 0)."""
    return ((r_w > r_l).float() + 0.5 * (r_w == r_l).float()).sum()


def pair_rewards(rm, pairs: list[tuple], device):
    """Rewards (b,), (b,) of the chosen and rejected sides, from one forward on the 2b rows."""
    ids, mask = salsa.pad([p[1] for p in pairs] + [p[2] for p in pairs], rm.config.pad_token_id,
                          left=False, device=device)  # (2b, T); right padding leaves no fully masked query row
    r = salsa.reward_scores(rm, ids, mask)  # (2b,)
    return r[:len(pairs)], r[len(pairs):]


@torch.no_grad()
def evaluate(rm, pairs: list[tuple], args, dist) -> dict:
    """Accuracy (r_w > r_l, a tie half), mean margin, loss and mean reward over the held-out pairs, summed over ranks.
    Every rank makes the same number of forwards (FSDP gathers in each): a rank out of pairs scores
    the first pair again and drops it."""
    stats, mine = torch.zeros(6, device=dist.device), pairs[dist.rank::dist.world]
    for i in tqdm(range(0, math.ceil(len(pairs) / dist.world), args.micro_batch), desc="eval", leave=False,
                  disable=not dist.main):
        part = mine[i:i + args.micro_batch]
        r_w, r_l = pair_rewards(rm, part or pairs[:1], dist.device)
        if part:
            stats += torch.stack([agree(r_w, r_l), (r_w - r_l).sum(), bt_loss(r_w, r_l) * len(r_w),
                                  (r_w + r_l).sum(), (r_w ** 2 + r_l ** 2).sum(),
                                  torch.tensor(len(r_w), device=dist.device)]).float()
    correct, margin, loss, reward, square, n = salsa.all_sum(stats, dist).tolist()
    mean = reward / (2 * n)
    return {"eval/accuracy": correct / n, "eval/margin": margin / n, "eval/loss": loss / n, "eval/reward_mean": mean,
            "eval/reward_std": math.sqrt(max(square / (2 * n) - mean ** 2, 0.0) * 2 * n / max(2 * n - 1, 1)),
            "eval/pairs": int(n)}


def main(args: Args):
    dist = salsa.setup_dist(args.seed)
    if args.batch_size % dist.world:
        raise salsa.InputError(f"--batch-size {args.batch_size} must split evenly over {dist.world} ranks")
    micro = min(args.micro_batch, args.batch_size // dist.world)  # pairs per forward on this rank
    tok = salsa.load_tokenizer(args.model)
    train = load_pairs(tok, args.data, args.split, args.max_len, dist)
    random.Random(args.seed).shuffle(train)
    if args.eval_data or not os.path.exists(args.data):
        held_out = load_pairs(tok, args.eval_data or args.data, args.eval_split, args.max_len, dist)
    else:
        n_eval = max(1, int(len(train) * args.eval_frac))
        held_out, train = train[:n_eval], train[n_eval:]
    per_epoch = len(train) // args.batch_size
    if per_epoch == 0:
        raise salsa.InputError(f"{args.data}: {len(train)} training pairs, fewer than one --batch-size {args.batch_size}")
    total = args.max_steps or args.epochs * per_epoch
    order = [i for e in range(math.ceil(total / per_epoch))
             for i in random.Random(args.seed + e).sample(range(len(train)), per_epoch * args.batch_size)]
    ckpt = salsa.prepare_out(args.out, args.resume)  # after every check on the data: a bad row writes nothing
    log, flags = os.path.join(ckpt, "metrics.jsonl"), {k: v for k, v in asdict(args).items() if k not in ("resume", "out")}
    flags["data_tokens"] = salsa.digest(ids for pair in train + held_out for ids in pair)
    start, state = salsa.resume_point(ckpt, args.resume, flags, dist)

    # the normalisation samples come from the initial SFT model: drawn once, kept in every checkpoint
    refs = state["refs"] if state else generate_references(args, tok, [train[i][0] for i in order[:args.norm_samples]],
                                                            dist)
    # a sharded (torchrun) checkpoint holds no HF weights: load_optimizer_state restores them
    rm = salsa.distribute(lambda: init_reward_model(args, tok, not dist.sharded and start or None), dist, train=True)
    # fused: one kernel over every tensor (on 2 CPU cores 0.07 s a step at 135M, the per-tensor loop 0.57 s)
    opt = torch.optim.AdamW(rm.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: salsa.lr_lambda(s, total, 0))
    step = salsa.restore(start, state, rm, opt, sched, log, dist)
    bar = tqdm(range(step, total), desc="reward", initial=step, total=total, disable=not dist.main)
    for step in bar:
        mine = [train[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]][dist.rank::dist.world]
        stats = torch.zeros(3, device=dist.device)  # loss, correct, margin: summed over the batch
        for k in range(0, len(mine), micro):
            r_w, r_l = pair_rewards(rm, mine[k:k + micro], dist.device)
            loss = bt_loss(r_w, r_l)
            salsa.sync_grads(rm, last=k + micro >= len(mine))
            (loss * len(r_w) / args.batch_size).backward()  # summed over micro-batches and ranks: the batch mean
            stats += torch.stack([loss.detach() * len(r_w), agree(r_w, r_l), (r_w - r_l).detach().sum()])
        grad_norm = torch.nn.utils.clip_grad_norm_(rm.parameters(), args.max_grad_norm or math.inf)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss, acc, margin = (salsa.all_sum(stats, dist) / args.batch_size).tolist()
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
        row = {"step": step + 1, "train/loss": loss, "train/accuracy": acc, "train/margin": margin,
               "train/grad_norm": salsa.full(grad_norm).item(), "train/lr": lr}
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total:
            row |= evaluate(rm, held_out, args, dist)
        if dist.main:
            salsa.log_jsonl(log, row)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            state = salsa.trainer_state(rm, opt, sched, step + 1, dist, refs=refs, flags=flags)
            salsa.save_checkpoint(ckpt, step + 1, rm, tok, state, dist=dist)

    with torch.no_grad():  # rm.config.reward_bias is 0 and reward_gain 1 still: these are raw rewards
        raw = torch.tensor([salsa.reward_scores(rm, *salsa.pad([s], tok.pad_token_id, device=dist.device)).item()
                            for _, s in refs])
    mean, std = (raw.mean().item(), raw.std().item() if len(raw) > 1 else 0.0) if len(raw) else (
        (e := evaluate(rm, held_out, args, dist))["eval/reward_mean"], e["eval/reward_std"])
    rm.config.reward_bias = mean
    rm.config.reward_gain = 1 / std if std > 0 else 1.0  # one sample has no spread: the gain stays 1
    # on the scale the saved model returns (the rows logged during training are raw): margin, loss and
    # reward statistics change with the normalisation, the accuracy does not
    final = evaluate(rm, held_out, args, dist)
    # ppo.py subtracts --missing-eos-penalty from a response with no EOS, after this normalisation: its
    # first scores average about -penalty x this share, not 0
    no_eos = sum(tok.eos_token_id not in s[len(p):] for p, s in refs) / len(refs) if refs else 0.0
    metrics = final | {"step": total, "norm/bias": mean, "norm/gain": rm.config.reward_gain, "train/pairs": len(train),
                       "norm/source": f"{len(refs)} SFT samples" if refs else "held-out chosen+rejected",
                       "norm/no_eos_frac": no_eos}
    salsa.log0(dist, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    samples = [{"prompt": tok.decode(p), "response": tok.decode(s[len(p):]), "ids": s,
                "reward": (r - mean) * rm.config.reward_gain} for (p, s), r in zip(refs, raw.tolist())]
    if dist.main:
        salsa.log_jsonl(log, metrics)
    salsa.save_model(args.out, rm, tok, files={"metrics.json": metrics, "norm_samples.json": samples}, dist=dist)


if __name__ == "__main__":
    salsa.run(main, Args)
