"""Supervised fine-tuning on chat data (SALSA App. A.1), the loss on assistant tokens only (our choice:
the paper does not say).

SALSA's reference is a soup of SFT models fine-tuned from one base with different seeds; run this
once per seed, then average the results with soup.py:

    python sft.py --data data/chat.jsonl --seed 1 --out runs/sft-seed1
    torchrun --nproc_per_node 8 sft.py --data HuggingFaceH4/ultrachat_200k --seed 1 --out runs/sft-seed1

The loss is the mean NLL of every assistant token of the global batch (summed over micro-batches and
ranks, divided once by the batch's token count), so a token weighs the same however the batch is
split; only labelled positions reach the lm_head. Epochs are concatenated shuffles: a batch may
straddle two. Under torchrun the model is sharded with FSDP2 (salsa.distribute).
"""
import math
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from tqdm import tqdm

import salsa


@dataclass
class Args:
    model: str = salsa.arg("models/SmolLM2-135M-Instruct", "base model, HF directory or hub name (paper: Llama2-7B, Mistral-7B, Gemma-2B)")
    data: str = salsa.arg("HuggingFaceH4/ultrachat_200k", "rows with `messages` (UltraChat-200k schema, as in the paper): hub name or .jsonl/.json/.parquet; data/chat.jsonl works offline")
    split: str = salsa.arg("train_sft", "split of a hub --data")
    eval_data: str = salsa.arg("", "held-out rows, same schema; empty = hold out --eval-frac of --data")
    eval_split: str = salsa.arg("test_sft", "split of a hub --eval-data")
    eval_frac: float = salsa.arg(0.05, "fraction of --data held out when no --eval-data; the same rows for every seed")
    out: str = salsa.arg("runs/sft-seed1", "final model directory (must not exist); checkpoints and metrics.jsonl go to OUT.ckpt")
    seed: int = salsa.arg(1, "data-order seed; the paper trains two SFT models that differ only by it (App. A.1)")
    lr: float = salsa.arg(2.5e-5, "peak learning rate (App. A.1)")
    warmup_ratio: float = salsa.arg(0.03, "fraction of the steps with linear warmup (App. A.1)")
    batch_size: int = salsa.arg(8, "global batch in sequences, all ranks together (App. A.1: 8; 16 for Gemma-2B)", low=1)
    micro_batch: int = salsa.arg(8, "at most this many sequences per forward on one rank (each rank takes "
                                    "--batch-size / ranks); gradients accumulate over them", low=1)
    max_len: int = salsa.arg(2048, "tokens kept per conversation, the first ones (App. A.1)", low=1)
    epochs: int = salsa.arg(1, "passes over the training rows (the paper does not say)", low=1)
    max_steps: int = salsa.arg(0, "optimizer steps; 0 = epochs x rows / batch size", low=0)
    schedule: Literal["linear", "cosine"] = salsa.arg("linear", "lr decay after warmup (the paper does not say; TRL's default is linear)")
    weight_decay: float = salsa.arg(0.0, "AdamW weight decay on every weight (the paper gives none for SFT; TRL's default is 0)")
    max_grad_norm: float = salsa.arg(1.0, "gradient-norm clipping (TRL's default; 0: none)", low=0)
    eval_every: int = salsa.arg(500, "steps between held-out losses (one more at the end; 0: only then)", low=0)
    save_every: int = salsa.arg(500, "steps between resumable checkpoints in OUT.ckpt (the 2 newest are kept; 0: none)", low=0)
    resume: bool = salsa.arg(False, "continue from the newest checkpoint in OUT.ckpt, with the same flags")
    dtype: salsa.DType = salsa.arg("float32", "weight dtype; bfloat16 halves memory but AdamW then updates bf16 weights")
    attn: str = salsa.arg("sdpa", "attention implementation (paper: flash attention = flash_attention_2, needs flash-attn)")
    allow_pickle: bool = salsa.arg(False, "load a --model whose weights are only a pickle (pytorch_model.bin runs code)")


def read_chats(source: str, split: str) -> list[tuple[str, list[dict]]]:
    """(where, messages) per row, every row checked before anything is written."""
    return [(where, salsa.check_messages(row.get("messages") if isinstance(row, dict) else None, where))
            for where, row in salsa.read_rows(source, split)]


def hold_out(chats: list, frac: float) -> tuple[list, list]:
    # A fixed generator, not --seed: every SFT model of the soup is scored on the same held-out rows.
    perm = torch.randperm(len(chats), generator=torch.Generator().manual_seed(0)).tolist()
    held = set(perm[:round(frac * len(chats))])
    return [c for i, c in enumerate(chats) if i not in held], [c for i, c in enumerate(chats) if i in held]


def tokenize(tok, chats: list, max_len: int, show: bool) -> tuple[list, list[str]]:
    """(ids, labels) per conversation, and where the ones dropped for an assistant turn beyond max_len were."""
    out = [salsa.tokenize_chat(tok, m, max_len, where) for where, m in tqdm(chats, "tokenize", disable=not show)]
    return [x for x in out if x is not None], [where for (where, _), x in zip(chats, out) if x is None]


def collate(examples: list, pad_id: int, device):
    ids, mask = salsa.pad([e[0] for e in examples], pad_id, left=True, device=device)  # (B, T)
    # A first token has no state before it: unlabelled, else a pad position would learn to predict it.
    labels, _ = salsa.pad([[-100] + e[1][1:] for e in examples], -100, left=True, device=device)  # (B, T)
    return ids, mask, labels


def sft_nll(model, ids, mask, labels) -> tuple[torch.Tensor, int]:
    """Summed NLL of the labelled (assistant) tokens and their count, -Σ_t log π(y_t | y_<t): the SFT loss,
    also soup.py's greedy score. Only labelled positions reach the lm_head."""
    h = salsa.hidden_states(model, ids, mask)  # (B, T, d)
    keep = labels[:, 1:] != -100  # (B, T-1): the state at t predicts token t+1
    logp, _ = salsa.token_logprobs(model, h[:, :-1][keep], labels[:, 1:][keep])  # (N,)
    return -logp.sum(), int(keep.sum())


def n_labels(examples: list) -> int:
    return sum(sum(t != -100 for t in labels[1:]) for _, labels in examples)


@torch.no_grad()
def eval_loss(model, examples: list, micro: int, pad_id: int, dist) -> float:
    """Token-weighted mean NLL over the held-out conversations, each rank taking every world-th one.
    Every rank makes the same number of forwards (FSDP gathers in each): a rank out of rows scores
    the first one again and drops it."""
    mine, nll = examples[dist.rank::dist.world], torch.zeros((), dtype=torch.float64, device=dist.device)
    for i in tqdm(range(0, math.ceil(len(examples) / dist.world), micro), "eval", disable=not dist.main, leave=False):
        part = mine[i:i + micro]
        nll_sum, _ = sft_nll(model, *collate(part or examples[:1], pad_id, dist.device))
        if part:
            nll += nll_sum.double()
    return salsa.all_sum(nll, dist).item() / n_labels(examples)


def main(args: Args):
    dist = salsa.setup_dist(args.seed)
    if args.batch_size % dist.world:
        raise salsa.InputError(f"--batch-size {args.batch_size} must split evenly over {dist.world} ranks")
    micro = min(args.micro_batch, args.batch_size // dist.world)  # rows per forward on this rank
    tok = salsa.load_tokenizer(args.model)
    chats = read_chats(args.data, args.split)
    train, held = (chats, read_chats(args.eval_data, args.eval_split)) if args.eval_data else hold_out(chats, args.eval_frac)
    ckpt = salsa.prepare_out(args.out, args.resume)  # after the rows are checked: a bad row writes nothing
    if ending := [where for where, m in train + held if m[-1]["role"] == "user"]:
        salsa.log0(dist, f"kept {len(ending)} conversations that end with a user turn (nothing after their last "
                         f"answer is learnt): {salsa.rows_note(ending)}")
    special = salsa.rows_with_special_text(tok, train + held, "conversations", dist)
    train, held = ([c for c in rows if c[0] not in special] for rows in (train, held))
    (train, dropped), (held, held_dropped) = (tokenize(tok, c, args.max_len, dist.main) for c in (train, held))
    salsa.log0(dist, f"{len(train)} train and {len(held)} held-out conversations")
    if dropped + held_dropped:
        salsa.log0(dist, f"dropped {len(dropped + held_dropped)} conversations whose first assistant token lies "
                         f"beyond --max-len {args.max_len}: {salsa.rows_note(dropped + held_dropped)}")
    if len(train) < args.batch_size:
        raise salsa.InputError(f"{args.data}: {len(train)} usable conversations, fewer than --batch-size {args.batch_size}")

    total = args.max_steps or args.epochs * len(train) // args.batch_size
    warmup = math.ceil(args.warmup_ratio * total)
    # --seed changes nothing but the data order: dropout is off (salsa.load_model) and nothing else
    # is random, so the soup's SFT models differ only by the order in which they see the same rows.
    g = torch.Generator().manual_seed(args.seed)
    shuffles = math.ceil(total * args.batch_size / len(train))
    order = torch.cat([torch.randperm(len(train), generator=g) for _ in range(shuffles)]).tolist()

    flags = {k: v for k, v in asdict(args).items() if k not in ("resume", "out")}
    flags["data_tokens"] = salsa.digest(ids for ids, _ in train + held)
    start, state = salsa.resume_point(ckpt, args.resume, flags, dist)
    # a sharded (torchrun) checkpoint holds no HF weights: load_optimizer_state restores them
    model = salsa.load_model((not dist.sharded and start) or args.model, tok, args.dtype, args.attn, dist.device, dist,
                             train=True, allow_pickle=args.allow_pickle)
    # eps 1e-8 and betas (0.9, 0.999): PyTorch's and the HF Trainer's defaults, which the paper's TRL runs used.
    # fused: one kernel over every tensor (on 2 CPU cores 0.07 s a step at 135M, the per-tensor loop 0.57 s)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay,
                            fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: salsa.lr_lambda(s, total, warmup, args.schedule))
    log = f"{ckpt}/metrics.jsonl"
    step = salsa.restore(start, state, model, opt, sched, log, dist)

    row = {}
    bar = tqdm(range(step, total), "sft", initial=step, total=total, disable=not dist.main)
    for step in bar:
        t0 = time.time()
        batch = [train[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        mine, n_tok = batch[dist.rank::dist.world], n_labels(batch)  # n_tok counts all ranks' tokens
        nll = torch.zeros((), dtype=torch.float64, device=dist.device)
        for i in range(0, len(mine), micro):
            nll_sum, _ = sft_nll(model, *collate(mine[i:i + micro], tok.pad_token_id, dist.device))
            salsa.sync_grads(model, last=i + micro >= len(mine))
            (nll_sum / n_tok).backward()
            nll += nll_sum.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step + 1, "train/loss": salsa.all_sum(nll, dist).item() / n_tok, "train/lr": lr,
               "train/grad_norm": salsa.full(grad_norm).item(),
               "train/tokens_per_s": sum(len(ids) for ids, _ in batch) / (time.time() - t0),  # prompts included
               "mem/peak_gb": salsa.peak_memory_gb(dist.device)}
        if held and (args.eval_every and (step + 1) % args.eval_every == 0 or step + 1 == total):
            row["eval/loss"] = eval_loss(model, held, micro, tok.pad_token_id, dist)
        bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{row['train/tokens_per_s']:.0f}")
        if dist.main:
            salsa.log_jsonl(log, row)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            state = salsa.trainer_state(model, opt, sched, step + 1, dist, flags=flags)
            salsa.save_checkpoint(ckpt, step + 1, model, tok, state, dist=dist)
    summary = {**row, "train_conversations": len(train), "eval_conversations": len(held),
               "dropped": len(dropped + held_dropped), "flags": flags}
    salsa.save_model(args.out, model, tok, files={"metrics.json": summary}, dist=dist)
    salsa.log0(dist, f"saved {args.out}")


if __name__ == "__main__":
    salsa.run(main, Args)
