"""PPO for language models with a KL penalty against a (soup) reference: SALSA, arXiv 2411.01798.

    python ppo.py --ref soup --soup-models runs/sft-seed1 runs/sft-seed2 --reward runs/rm --out runs/salsa
    python ppo.py --ref sft --model runs/sft-seed1 --reward runs/rm --out runs/ppo
    torchrun --nproc_per_node 8 ppo.py --ref soup ...        (FSDP2 via salsa.distribute; see README)

The objective per prompt x and sampled response y (the only thing SALSA changes is the reference):
    --ref sft   eq. 2:  R(x,y) - β·KL(π‖π_sft)                         (plain PPO)
    --ref soup  eq. 4:  R(x,y) - β·KL(π‖π_soup), θ_soup = Σ w_i θ_i     (eq. 3; SALSA)
    --ref mkl   eq. 5:  R(x,y) - β/2·[KL(π‖π_ref) + KL(π‖π_other)]      (the paper's ablation)
The policy always starts from the first SFT model (`--model`, or the first of `--soup-models`).

One step, numbered like the algorithm box in `main`:
    1 rollout  2 score  3 log-probs/values  4 per-token rewards  5 GAE  6 PPO epochs  7 KL controller

Choices, and where we depart from the usual recipe:
- Value function (--critic reward, the default): a whole critic, as TRL and OpenRLHF train it: a copy
  of the reward model, trained, whose normalised head read at every response position is V (at the
  start, the reward model's score of the answer so far). It has its own learning rate (--value-lr,
  1e-4 here). --critic head is the cheaper alternative: a zero-initialised linear head on the policy's
  last hidden states (one trained network: half the memory and compute; value gradients flow into the
  policy, vf_coef 0.1 keeps them small). At 135M the head did not learn (explained variance near 0
  whatever its lr, features or warm-up), while the whole critic at 1e-4 averaged +0.3 to +0.5 over
  the last 10 of 20 steps (README, "Why the critic is a whole critic"). A critic that does not learn leaves
  GAE a λ-discounted return: the first token of a 35-token answer gets 0.95^34 ≈ 0.17 of the credit.
  val/explained_var shows whether it learns.
- Old log-probs come from a teacher-forced forward after sampling, not from `generate`'s scores,
  so the first minibatch's ratio is exactly 1; logits are divided by the temperature in both.
  Sampling is plain temperature sampling (top_k 0, top_p 1): any other warper would make the
  sampling distribution differ from the one we score, and the KL estimate could go negative.
- Logits are computed on response positions only (never over the prompt).
- The reward-model score goes on the response's last real token (its EOS); a response with no
  EOS within --max-new-tokens loses --missing-eos-penalty. Positions after EOS carry no reward,
  no KL, no value target and no loss.
- AdamW eps 1e-5 (OpenAI's and summarize_from_feedback_details' choice), not PyTorch's 1e-8:
  with tiny early gradients, 1e-8 turns Adam into sign descent and the first updates are large.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm import tqdm

import salsa


@dataclass
class Args:
    model: str = salsa.arg("", "policy init, an SFT model dir (default: the first of --soup-models)")
    reward: str = salsa.arg("runs/rm", "reward model dir written by reward.py")
    ref: Literal["sft", "soup", "mkl"] = salsa.arg("soup", "KL reference: sft (eq. 2), soup (eq. 4), mkl (eq. 5)")
    soup: str = salsa.arg("", "a soup directory written by soup.py (--ref soup); else built from --soup-models")
    soup_models: list[str] = salsa.arg([], "SFT models of the soup (--ref soup) or of the MKL penalty (--ref mkl)")
    alpha: float = salsa.arg(0.5, "soup weight of the second model, eq. 3 (paper: 0.5 best); >2 models: uniform")
    data: str = salsa.arg("HuggingFaceH4/ultrafeedback_binarized", "prompts: hub name or local json/jsonl/parquet")
    split: str = salsa.arg("train_prefs", "dataset split of --data")
    out: str = salsa.arg("runs/salsa", "output dir of the final policy (+ its critic); must not exist")
    init_kl_coef: float = salsa.arg(-1.0, "initial β; <0: App. A.3's 0.2 for sft and 0.01 for soup, and for mkl "
                                          "(none given) sft's")
    adaptive_kl: bool = salsa.arg(True, "Ziegler et al. 2019 adaptive β (App. A.3 says 'initial' β)")
    target_kl: float = salsa.arg(6.0, "adaptive controller's target KL, nats per sequence")
    kl_horizon: int = salsa.arg(10000, "adaptive controller's horizon, in sequences (batch 8: β moves at most "
                                       "0.016% a step, 0.3% in 20 steps; doubling it takes 4,333)", low=1)
    kl_estimator: Literal["k1", "k3"] = salsa.arg("k1", "per-token KL: k1 = log π - log π_ref; k3 = r - 1 - log r "
                                                  "(as a reward its gradient is not the KL's: see kl_per_token)")
    lr: float = salsa.arg(2e-6, "learning rate (App. A.3: 2e-6 for 7B, 1e-7 for Gemma-2B), linear decay")
    critic: Literal["reward", "head"] = salsa.arg("reward", "value model: reward = a trained copy of the reward "
                                                  "model (a second trained network); head = a linear head on the "
                                                  "policy's states (half the memory; at 135M it does not learn)")
    value_lr: float = salsa.arg(0.0, "learning rate of the critic alone (linear decay too); 0: 1e-4 for --critic "
                                     "reward, 1e-3 for --critic head (measured at 135M; OpenRLHF's 7B critic: 9e-6)")
    batch_size: int = salsa.arg(8, "prompts per PPO step, over all ranks (App. A.3)", low=1)
    ppo_epochs: int = salsa.arg(2, "optimisation epochs over each batch (our reading of App. A.3's '2 epochs "
                                   "of training'; it could mean 2 passes over the prompts, --steps)", low=1)
    minibatches: int = salsa.arg(1, "optimizer steps per epoch; batch_size must divide evenly", low=1)
    micro_batch: int = salsa.arg(1, "rows per forward/backward on each rank (App. A.3's batch 8 on 8 GPUs is 1)", low=1)
    steps: int = salsa.arg(0, "PPO steps; 0 = one pass over the prompts", low=0)
    temperature: float = salsa.arg(0.7, "sampling temperature (rollout and scoring alike)")
    max_new_tokens: int = salsa.arg(64, "response length limit", low=1)
    max_prompt_len: int = salsa.arg(256, "prompts longer than this many tokens are dropped (count printed)", low=1)
    missing_eos_penalty: float = salsa.arg(1.0, "subtracted from the score of a response with no EOS")
    gamma: float = salsa.arg(1.0, "discount")
    lam: float = salsa.arg(0.95, "GAE λ")
    cliprange: float = salsa.arg(0.2, "policy ratio clip ε (Schulman 2017 eq. 7)")
    cliprange_value: float = salsa.arg(0.2, "value clip around the rollout's values")
    vf_coef: float = salsa.arg(0.1, "value loss coefficient")
    whiten_rewards: bool = salsa.arg(False, "scale per-token rewards to unit variance before GAE (mean kept)")
    max_grad_norm: float = salsa.arg(1.0, "gradient clipping (0: none; TRL's PPO never applies it)", low=0)
    kl_init: bool = salsa.arg(True, "also log KL(π‖π_init) to the policy's starting SFT model, comparable across "
                                    "references (--ref soup loads that model: one more frozen forward a step)")
    gold: str = salsa.arg("", "py:module:function scoring (prompt, response) with a gold judge: log each step's "
                              "mean gold score of the rollouts (offline: py:salsa:gold_score)")
    seed: int = salsa.arg(1, "seed of data order and sampling")
    save_every: int = salsa.arg(50, "checkpoint every N steps (atomic; --resume continues)", low=1)
    sample_every: int = salsa.arg(10, "print and save a table of sampled responses every N steps", low=1)
    resume: bool = salsa.arg(False, "continue from the latest checkpoint in OUT.ckpt")
    dtype: salsa.DType = salsa.arg("float32", "weights and AdamW state dtype of the policy and critic (and of the "
                                   "frozen models, unless --frozen-dtype); bfloat16 halves memory but AdamW then "
                                   "updates bf16 weights: no fp32 master copy, and at lr 2e-6 most updates round away")
    frozen_dtype: Literal["", "float32", "bfloat16", "float16"] = salsa.arg(
        "", "weights dtype of the frozen reference(s) and reward model (empty: --dtype); bfloat16 halves their "
        "memory, their heads still run in fp32, and the KL at step 0 is rounding noise, not 0 (README)")
    attn: str = salsa.arg("sdpa", "attention implementation (sdpa, eager, flash_attention_2)")
    allow_pickle: bool = salsa.arg(False, "load models whose weights are only a pickle (pytorch_model.bin runs code)")


class PolicyWithValue(nn.Module):
    """The causal LM plus its critic: a whole one (`critic`, a reward model being trained) whose normalised
    head read on the state before each response token is V, or else a scalar head on the LM's own states."""

    def __init__(self, lm, critic=None):
        super().__init__()
        self.lm = lm
        self.critic = critic
        if critic is None:
            self.v_head = nn.Linear(lm.config.hidden_size, 1, dtype=lm.dtype)
            nn.init.zeros_(self.v_head.weight)  # V = 0 at the start: no made-up value before any return is seen
            nn.init.zeros_(self.v_head.bias)

    def value_model(self) -> nn.Module:
        """What the value loss trains (with its own lr and gradient clipping)."""
        return self.v_head if self.critic is None else self.critic

    def forward(self, ids, mask, n_prompt: int, temperature: float):
        """log π(y_t | ...), entropy and V for each response position t, each (B, R)."""
        logp, entropy, h = response_logprobs(self.lm, ids, mask, n_prompt, temperature)
        if self.critic is None:
            return logp, entropy, self.v_head(h).squeeze(-1).float()
        h = salsa.hidden_states(self.critic, ids, mask)[:, n_prompt - 1:-1]  # (B, R, d): the critic's, before y_t
        return logp, entropy, salsa.reward_head(self.critic, h)

    def generate(self, **kw):  # sampling goes through the FSDP root too: salsa.shard registers this as a forward
        return self.lm.generate(**kw)


def response_logprobs(model, ids, mask, n_prompt: int, temperature: float):
    """log π(y_t | ...) and entropy (B, R) of the response tokens, and the states that predict them."""
    h = salsa.hidden_states(model, ids, mask)[:, n_prompt - 1:-1]  # (B, R, d): states that predict y_t
    return *salsa.token_logprobs(model, h, ids[:, n_prompt:], temperature), h


def kl_per_token(logp, ref_logp, estimator: str, mask):
    """Per-token KL(π‖π_ref) estimate from samples of π, 0 outside `mask` (B, R): k1 = log π - log π_ref;
    k3 = (r - 1) - log r, r = π_ref / π, is ≥ 0. Both are unbiased estimates of the KL's value, but only
    k1 as a reward gives PPO the KL's gradient: the score-function gradient of E_π[k] treats k as fixed
    and misses E_π[∇k], which is 0 for k1 and E_π[(1 - r)∇log π] ≠ 0 for k3 (test_ppo_math checks
    both on a bandit). k3 is here to compare with TRL's kl_estimator, not as a better penalty."""
    log_ratio = logp - ref_logp
    if estimator not in ("k1", "k3"):
        raise ValueError(f"KL estimator {estimator!r}: expected k1 or k3")
    kl = log_ratio if estimator == "k1" else torch.expm1(-log_ratio) + log_ratio
    # where, not a product: k3 of a pad token after EOS can overflow to inf, and inf·0 is a NaN that GAE
    # would carry back to every token of the row and whitening to the whole batch
    return torch.where(mask.bool(), kl, 0.0)


def response_mask(resp, eos_id: int):
    """1 up to and including the first EOS, 0 after it; (B, R) -> (B, R), and whether an EOS was seen (B,)."""
    is_eos = resp == eos_id
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long(), is_eos.any(-1)


def per_token_rewards(kl, score, mask, kl_coef: float):
    """SALSA eq. 4 as a per-token reward: -β·KL_t on every response token, plus R(x,y) on the last one."""
    rewards = -kl_coef * kl * mask  # (B, R)
    last = mask.sum(-1).long() - 1  # (B,) index of the EOS (or the last token when there is none)
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016), a reverse loop over time, batched.
    Values after the last real token are 0: the episode ends at EOS. Returns (advantages, returns)."""
    values, rewards = values * mask, rewards * mask
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_v = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv * mask, (adv + values) * mask


def moments(x, mask, dist=salsa.Dist()):
    """(count, mean, unbiased variance) of x over the real tokens of every rank's batch."""
    n = salsa.all_sum(mask.sum(), dist)
    mean = salsa.all_sum((x * mask).sum(), dist) / n
    return n, mean, salsa.all_sum(((x - mean) ** 2 * mask).sum(), dist) / (n - 1).clamp(min=1)


def whiten(x, mask, shift_mean=True, dist=salsa.Dist()):
    """Unit variance over the real tokens of every rank's batch (check_args makes them 2 or more), and zero
    mean unless `shift_mean` is False: then the mean is added back (--whiten-rewards, as TRL's whiten_rewards)."""
    n, mean, var = moments(x, mask, dist)
    if n < 2:
        raise ValueError(f"whitening needs 2 or more tokens to estimate a variance, got {int(n)}")
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    return (white if shift_mean else white + mean) * mask


def ppo_losses(logp, old_logp, values, old_values, adv, returns, mask, cliprange, cliprange_value):
    """Clipped surrogate (Schulman 2017 eq. 7) and clipped value loss; token sums and statistics. Both
    clip fractions count one rule: the tokens whose loss is the clipped term (the max took it), so
    their gradient is 0."""
    # the log-ratio is zeroed off the mask before exp: after EOS it can exceed 88, exp overflows to
    # inf, and 0 * inf is a NaN that the mask would not remove (from the loss nor from the gradient)
    log_ratio = torch.where(mask.bool(), logp - old_logp, 0.0)
    ratio = torch.exp(log_ratio)
    pg_plain, pg_clipped = -adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange)
    pg = torch.max(pg_plain, pg_clipped)  # PPO clip, eq. 7
    # clamp the value itself, not old + clamp(values - old): that sum rounds, so a value inside the range
    # would differ from itself by an ulp and count as clipped
    v_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_plain, vf_clipped = (values - returns) ** 2, (v_clipped - returns) ** 2
    vf = 0.5 * torch.max(vf_plain, vf_clipped)
    stats = {"ppo/clipfrac": (pg_clipped > pg_plain).float(), "ppo/ratio_mean": ratio,
             "ppo/approx_kl": 0.5 * log_ratio ** 2, "ppo/vf_clipfrac": (vf_clipped > vf_plain).float()}
    return (pg * mask).sum(), (vf * mask).sum(), {k: (v * mask).sum().item() for k, v in stats.items()}


def adaptive_kl(kl_coef: float, kl: float, target: float, horizon: int, n: int) -> float:
    """Ziegler et al. 2019: e = clip(KL/target - 1, ±0.2); β ← β·(1 + e·n/horizon), KL in nats/sequence."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n / horizon)


def micro_batches(prompt_mask, size: int):
    """Rows grouped `size` at a time by prompt length, longest first, each group with the number of
    left-pad columns all its rows share: a micro-batch is cut to its own longest prompt, which saves
    the padding compute of a batch of mixed lengths (and starts with the largest, to fail fast)."""
    lengths = prompt_mask.sum(-1)  # (B,)
    groups = lengths.argsort(descending=True, stable=True).view(-1, size)  # (B / size, size)
    return [(g, prompt_mask.shape[1] - int(lengths[g].max())) for g in groups]


@torch.no_grad()
def rollout(model, prompt, prompt_mask, gen_cfg, synced: bool):
    """Sample responses to left-padded prompts (B, P); returns the sequences (B, P + R) with every
    token after a response's first EOS replaced by pad, their mask, the response mask (B, R) and
    whether each response stopped (B,). `synced` keeps ranks stepping until all have finished;
    under FSDP the weights are gathered once for the whole call."""
    model.eval()
    P = prompt.shape[1]
    with salsa.gathered(model):
        seq = model.generate(input_ids=prompt, attention_mask=prompt_mask, generation_config=gen_cfg, synced_gpus=synced)
    resp_mask, has_eos = response_mask(seq[:, P:], gen_cfg.eos_token_id)  # (B, R), (B,)
    seq = torch.cat([prompt, seq[:, P:].masked_fill(resp_mask == 0, gen_cfg.pad_token_id)], 1)
    return seq, torch.cat([prompt_mask, resp_mask], 1), resp_mask, has_eos


def load_prompts(args, tok, dist=salsa.Dist()) -> list[tuple[list[int], str | list]]:
    """(token ids, prompt) of rows with `prompt` (UltraFeedback) or `messages` (UltraChat, up to the last
    user turn); the prompt as the row gives it is what a gold judge reads."""
    every = []
    for where, row in salsa.read_rows(args.data, args.split):
        if "prompt" in row:
            every.append((where, salsa.prompt_ids(tok, row["prompt"], where), row["prompt"]))
        else:
            msgs = salsa.check_messages(row.get("messages"), where, answered=False)
            last_user = max((j for j, m in enumerate(msgs) if m["role"] == "user"), default=None)
            if last_user is None:
                raise salsa.InputError(f"{where}: no `prompt`, and no user turn in `messages` to prompt with")
            every.append((where, salsa.prompt_ids(tok, msgs[: last_user + 1], where), msgs[: last_user + 1]))
    special = salsa.rows_with_special_text(tok, [(w, [{"content": raw}] if isinstance(raw, str) else raw)
                                               for w, _, raw in every], "prompts", dist)
    every = [e for e in every if e[0] not in special]
    prompts = [(ids, raw) for _, ids, raw in every if len(ids) <= args.max_prompt_len]
    if long := [where for where, ids, _ in every if len(ids) > args.max_prompt_len]:
        salsa.log0(dist, f"{args.data}: dropped {len(long)} prompts longer than --max-prompt-len "
                         f"{args.max_prompt_len}: {salsa.rows_note(long)}")
    if len(prompts) < args.batch_size:
        raise salsa.InputError(f"{args.data}: {len(prompts)} usable prompts, fewer than --batch-size {args.batch_size}")
    return prompts


def load_references(args, tok, dist):
    """[(model, weight)]: the frozen models whose weighted per-token KLs form the penalty, and the
    policy's starting model for KL(π‖π_init) (None without --kl-init; sft and mkl: their first reference)."""
    kw = dict(dtype=args.frozen_dtype or args.dtype, attn=args.attn, device=dist.device, dist=dist,
              allow_pickle=args.allow_pickle)
    if args.ref == "sft":  # eq. 2
        refs = [(salsa.load_model(args.model, tok, **kw), 1.0)]
    elif args.ref == "mkl":  # eq. 5: β/2·[KL(π‖π_ref) + KL(π‖π_other)]
        refs = [(salsa.load_model(p, tok, **kw), 1.0 / len(args.soup_models)) for p in args.soup_models]
    elif args.soup:  # eq. 4 with the soup directory soup.py wrote
        refs = [(salsa.load_model(args.soup, tok, **kw), 1.0)]
    else:  # eq. 3, built in memory: no soup checkpoint needed
        from soup import load_soup
        n = len(args.soup_models)
        weights = [1 - args.alpha, args.alpha] if n == 2 else [1 / n] * n
        refs = [(salsa.distribute(lambda: load_soup(args.soup_models, weights, tok, dtype=kw["dtype"]), dist), 1.0)]
    init = None
    if args.kl_init:  # sft and mkl: their first reference is the policy's init; a soup run loads it
        init = refs[0][0] if args.ref != "soup" else salsa.load_model(args.model, tok, **kw)
    for model in [m for m, _ in refs] + [init]:
        if model is not None:
            model.eval().requires_grad_(False)
    return refs, init


def check_args(args):
    """Every flag and model directory checked before any work, so a bad one writes nothing."""
    if not args.model and not args.soup_models:
        raise salsa.InputError("give --model (the SFT policy init) or --soup-models (the first is the policy init)")
    args.model = args.model or args.soup_models[0]
    if args.ref in ("soup", "mkl") and args.soup_models and args.soup_models[0] != args.model:
        raise salsa.InputError(f"the policy starts from the first soup model: --model {args.model} != "
                               f"{args.soup_models[0]}")
    if (args.ref == "mkl" or args.ref == "soup" and not args.soup) and len(args.soup_models) < 2:
        alternative = " or --soup DIR" if args.ref == "soup" else ""
        raise salsa.InputError(f"--ref {args.ref} needs --soup-models A B [...]{alternative}")
    if not 0 <= args.alpha <= 1:  # as soup.py without --extrapolate: a soup is a weighted average
        raise salsa.InputError(f"--alpha {args.alpha}: a soup weight lies in [0, 1]")
    if args.temperature <= 0:  # scoring divides the logits by it; 0 would sample greedily, then divide by 0
        raise salsa.InputError(f"--temperature {args.temperature}: PPO samples, so it must be > 0 (default 0.7)")
    if args.batch_size < 2:
        raise salsa.InputError("--batch-size must be 2 or more: advantages are whitened over the batch's tokens")
    if args.init_kl_coef < 0:
        args.init_kl_coef = 0.01 if args.ref == "soup" else 0.2  # App. A.3 (MKL: none given; as PPO)
    args.value_lr = args.value_lr or {"reward": 1e-4, "head": 1e-3}[args.critic]
    paths = [p for p in [args.model, args.soup, *args.soup_models, args.reward] if p]
    for path in paths:
        if not Path(path).is_dir():
            raise salsa.InputError(f"{path}: no such model directory")
        salsa.check_model_dir(path, args.allow_pickle)
    salsa.check_vocabularies(paths)  # the policy's token ids must mean the same to every model that scores them


def save_policy(path, policy, tok, dist, files=None):
    """The policy as a plain HF directory (transformers loads it) plus its critic: a reward-model directory
    critic/ (--critic reward) or value_head.safetensors. Every rank calls it (FSDP gathers the weights); rank 0 writes."""
    state = salsa.full_state_dict(policy, dist)
    part = lambda prefix: {k.removeprefix(prefix): v.contiguous() for k, v in state.items() if k.startswith(prefix)}

    def write(tmp):
        policy.lm.save_pretrained(tmp, safe_serialization=True, state_dict=part("lm."))
        tok.save_pretrained(tmp)
        if policy.critic is None:
            save_file(part("v_head."), f"{tmp}/value_head.safetensors")
        else:
            policy.critic.save_pretrained(f"{tmp}/critic", safe_serialization=True, state_dict=part("critic."))
            tok.save_pretrained(f"{tmp}/critic")  # a whole reward-model directory: eval.py --reward and ppo.py take it
        for name, obj in (files or {}).items():
            Path(tmp, name).write_text(json.dumps(obj, indent=1))
    if dist.main:
        salsa.save_atomic(path, write)


def main(args: Args):
    check_args(args)
    gold = salsa.py_function(args.gold.removeprefix("py:")) if args.gold else None  # before any output
    dist = salsa.setup_dist(args.seed)
    local_batch = args.batch_size // dist.world  # derived sizes, checked to divide evenly
    mb_rows = local_batch // args.minibatches  # rows of one minibatch on this rank
    if args.batch_size % dist.world or local_batch % args.minibatches or mb_rows % min(args.micro_batch, mb_rows):
        raise salsa.InputError(f"--batch-size {args.batch_size} must split evenly over {dist.world} ranks, then "
                               f"into --minibatches {args.minibatches}, then into --micro-batch {args.micro_batch} rows")
    tok = salsa.load_tokenizer(args.model)
    prompts = load_prompts(args, tok, dist)
    steps = args.steps or len(prompts) // args.batch_size
    ckpt_dir = salsa.prepare_out(args.out, args.resume)  # after every check on the flags and data: a bad one writes nothing
    log = f"{ckpt_dir}/metrics.jsonl"

    kw = dict(dtype=args.dtype, attn=args.attn, device=dist.device, dist=dist)
    flags = {k: v for k, v in vars(args).items() if k not in ("resume", "out")}  # defaults filled in by check_args
    flags["data_tokens"] = salsa.digest(ids for ids, _ in prompts)
    resume_from, state = salsa.resume_point(ckpt_dir, args.resume, flags, dist)
    # a sharded (torchrun) checkpoint holds no HF weights: load_optimizer_state restores them
    lm = salsa.load_model((not dist.sharded and resume_from) or args.model, tok, **kw, train=True,
                          allow_pickle=args.allow_pickle)
    critic = salsa.load_reward_model(args.reward, args.dtype, args.attn, dist.device, dist, args.allow_pickle,
                                     train=True) if args.critic == "reward" else None
    policy = PolicyWithValue(lm, critic)
    if state and not dist.sharded:  # sharded: load_optimizer_state restores every weight
        policy.value_model().load_state_dict(state["value"])
    policy = salsa.shard(policy.to(dist.device), dist, train=True)
    refs, init = load_references(args, tok, dist)
    rm = salsa.load_reward_model(args.reward, args.frozen_dtype or args.dtype, args.attn, dist.device, dist,
                                 args.allow_pickle).requires_grad_(False)
    gen_cfg = salsa.generation_config(tok, args.temperature, args.max_new_tokens)

    updates = steps * args.ppo_epochs * args.minibatches
    # fused: one kernel over every tensor (on 2 CPU cores 0.07 s a step at 135M, the per-tensor loop 0.57 s)
    groups = [{"params": list(policy.lm.parameters())},
              {"params": list(policy.value_model().parameters()), "lr": args.value_lr}]  # the critic's own lr
    opt = torch.optim.AdamW(groups, lr=args.lr, eps=1e-5, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: salsa.lr_lambda(u, updates, 0, "linear"))
    torch.manual_seed(args.seed + dist.rank)  # sampling does not depend on how many models were loaded
    start = salsa.restore(resume_from, state, policy, opt, sched, log, dist)
    kl_coef, first = (state["kl_coef"], state["first"]) if state else (args.init_kl_coef, None)

    bar = tqdm(range(start, steps), initial=start, total=steps, disable=not dist.main, desc="ppo")
    for step in bar:
        # The prompts of this step: a fixed permutation per pass, so a resumed run sees the same batches.
        n_pass, i = divmod(step * args.batch_size, len(prompts) - len(prompts) % args.batch_size)
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed * 1000 + n_pass))
        rows = order[i + dist.rank * local_batch: i + (dist.rank + 1) * local_batch].tolist()
        prompt, prompt_mask = salsa.pad([prompts[r][0] for r in rows], tok.pad_token_id, device=dist.device)  # (B, P)
        P, t0 = prompt.shape[1], salsa.clock(dist.device)

        # 1. Rollout: sample with the KV cache, then cut each response after its first EOS.
        seq, mask, resp_mask, has_eos = rollout(policy, prompt, prompt_mask, gen_cfg, dist.world > 1)
        if gold:  # the gold judge on the rollouts (offline it is free): a training curve becomes a frontier
            answers = tok.batch_decode(seq[:, P:], skip_special_tokens=True)
            gold_mean = sum(float(gold(prompts[r][1], y.strip())) for r, y in zip(rows, answers)) / len(rows)
        t1 = salsa.clock(dist.device)

        # Scoring and training run on the same micro-batches, so each row is computed identically in both.
        groups = micro_batches(prompt_mask, min(args.micro_batch, mb_rows))
        with torch.no_grad():
            score = torch.zeros(resp_mask.shape[0], device=dist.device)  # (B,)
            old_logp, entropy, old_values, kl, kl_init = (torch.zeros(resp_mask.shape, device=dist.device)
                                                          for _ in range(5))
            for g, c in groups:
                ids, m, n_prompt = seq[g, c:], mask[g, c:], P - c
                # 2. Score: reward model on the last real token (EOS).
                score[g] = salsa.reward_scores(rm, ids, m)
                # 3. Old log-probs, values and reference log-probs, teacher-forced, temperature-scaled.
                old_logp[g], entropy[g], old_values[g] = policy(ids, m, n_prompt, args.temperature)  # (b, R) each
                ref_logp = [response_logprobs(ref, ids, m, n_prompt, args.temperature)[0] for ref, _ in refs]
                kl[g] = sum(w * kl_per_token(old_logp[g], lp, args.kl_estimator, resp_mask[g])  # mkl: the mean
                            for (_, w), lp in zip(refs, ref_logp))  # of two KLs (eq. 5)
                if init is not None:  # k1 whatever --kl-estimator: one unbiased estimate, the same for every run
                    init_logp = ref_logp[0] if init is refs[0][0] else response_logprobs(
                        init, ids, m, n_prompt, args.temperature)[0]
                    kl_init[g] = kl_per_token(old_logp[g], init_logp, "k1", resp_mask[g])
            score -= args.missing_eos_penalty * (~has_eos).float()  # responses that never stop
            rmask = resp_mask.to(old_logp.dtype)  # (B, R)
            # 4. Per-token rewards: -β·KL_t, and the score on the EOS token.
            rewards = per_token_rewards(kl, score, rmask, kl_coef)
            if args.whiten_rewards:
                rewards = whiten(rewards, rmask, shift_mean=False, dist=dist)
            # 5. GAE with γ, λ; returns = A + V; advantages whitened over the batch's response tokens.
            adv, returns = gae(rewards, old_values, rmask, args.gamma, args.lam)
            adv = whiten(adv, rmask, dist=dist)
        t2 = salsa.clock(dist.device)

        # 6. PPO epochs × minibatches × micro-batches; losses are token means over each minibatch.
        policy.train()
        lr = sched.get_last_lr()[0]  # this step's first update
        stats, n_tok = {}, 0.0
        for _ in range(args.ppo_epochs):
            for mb in torch.randperm(len(groups)).view(args.minibatches, -1).tolist():
                opt.zero_grad(set_to_none=True)
                picked = torch.cat([groups[j][0] for j in mb])
                mb_tokens = salsa.all_sum(rmask[picked].sum(), dist)  # token mean over every rank's minibatch
                for k, (micro, c) in enumerate(groups[j] for j in mb):
                    logp, _, values = policy(seq[micro, c:], mask[micro, c:], P - c, args.temperature)
                    pg, vf, s = ppo_losses(logp, old_logp[micro], values, old_values[micro], adv[micro],
                                           returns[micro], rmask[micro], args.cliprange, args.cliprange_value)
                    salsa.sync_grads(policy, last=k == len(mb) - 1)
                    ((pg + args.vf_coef * vf) / mb_tokens).backward()
                    for name, v in {**s, "ppo/policy_loss": pg.item(), "ppo/value_loss": vf.item()}.items():
                        stats[name] = stats.get(name, 0.0) + v
                    n_tok += rmask[micro].sum().item()
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.lm.parameters(), args.max_grad_norm or math.inf)
                torch.nn.utils.clip_grad_norm_(policy.value_model().parameters(), args.max_grad_norm or math.inf)  # its own norm
                opt.step()
                sched.step()
        t3 = salsa.clock(dist.device)

        # 7. KL controller, on the sequence KL of this batch (nats), before logging it.
        seq_kl = (kl * rmask).sum(-1).mean().item()
        # token means over every rank's tokens: ranks' responses differ in length, so a mean of their means is not
        # the batch's. The sums of the PPO epochs' statistics and of the entropy, then the two token counts.
        *sums, n_all, n_resp = salsa.all_sum(torch.tensor([*stats.values(), (entropy * rmask).sum().item(), n_tok,
                                                           rmask.sum().item()], dtype=torch.float64, device=dist.device),
                                             dist).tolist()
        token_means = {k: v / n_all for k, v in zip(stats, sums)} | {"objective/entropy": sums[-1] / n_resp}
        metrics = {
            "step": step + 1, "kl_coef": kl_coef,
            "objective/score": score.mean().item(), "objective/kl": seq_kl,
            **({"objective/kl_init": (kl_init * rmask).sum(-1).mean().item()} if init is not None else {}),
            **({"objective/gold": gold_mean} if gold else {}),
            "objective/non_score_reward": (-kl_coef * kl * rmask).sum(-1).mean().item(),
            "objective/response_len": rmask.sum(-1).mean().item(),
            "objective/no_eos_frac": (~has_eos).float().mean().item(),
            **token_means,  # over all epochs and minibatches
            "ppo/grad_norm_last": salsa.full(grad_norm).item(),  # the last minibatch's, before clipping
            # over every rank's tokens: a mean of the ranks' ratios would not be the batch's
            "val/explained_var": (1 - moments(returns - old_values, rmask, dist)[2] / moments(returns, rmask, dist)[2]).item(),
            "lr": lr, "prompt_width": P, "time/rollout": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2,
            "mem/peak_gb": salsa.peak_memory_gb(dist.device),
        }
        if dist.world > 1:  # means of the ranks' values (exact for per-sequence means: equal rows per rank)
            # the width: rank 0's; token means and explained variance: over every rank's tokens already
            names = [k for k in metrics if k not in ("step", "prompt_width", "val/explained_var", *token_means)]
            means = salsa.all_sum(torch.tensor([metrics[k] for k in names], dtype=torch.float64, device=dist.device), dist)
            metrics |= dict(zip(names, (means / dist.world).tolist()))
            seq_kl = metrics["objective/kl"]  # the KL controller must see the same KL on every rank
        if args.adaptive_kl:
            kl_coef = adaptive_kl(kl_coef, seq_kl, args.target_kl, args.kl_horizon, args.batch_size)
        first = first or metrics
        if dist.main:
            salsa.log_jsonl(log, metrics)
            bar.set_postfix(score=f"{metrics['objective/score']:.3f}", kl=f"{seq_kl:.3f}",
                            len=f"{metrics['objective/response_len']:.1f}")
            alarm(metrics, first)
            if (step + 1) % args.sample_every == 0 or step == 0:
                samples(tok, seq, P, score, step + 1, f"{ckpt_dir}/samples.jsonl")
        if (step + 1) % args.save_every == 0 and step + 1 < steps:
            value = None if dist.sharded else policy.value_model().state_dict()  # sharded: in the optimizer state
            state = salsa.trainer_state(policy, opt, sched, step + 1, dist, flags=flags, kl_coef=kl_coef, first=first,
                                        value=value)
            salsa.save_checkpoint(ckpt_dir, step + 1, policy.lm, tok, state, dist=dist)
    # only rank 0 writes the log, so only it reads it (another rank could get there first)
    files = {"metrics.json": salsa.read_jsonl(log)[-1], "args.json": vars(args)} if dist.main else None
    save_policy(args.out, policy, tok, dist, files=files)
    salsa.log0(dist, f"saved {args.out}")


def alarm(m, first):
    """The paper's App. A.4 failure modes: the KL-hack (responses shrink to zero length, so the KL
    to a soup reference vanishes) and gibberish (small β: entropy blows up)."""
    if m["objective/response_len"] < 0.25 * first["objective/response_len"]:
        tqdm.write(f"step {m['step']}: WARNING mean response length {m['objective/response_len']:.1f} fell below a "
                   f"quarter of its start ({first['objective/response_len']:.1f}): KL-hack? (App. A.4; lower β)")
    if m["objective/entropy"] > 2 * first["objective/entropy"]:
        tqdm.write(f"step {m['step']}: WARNING entropy {m['objective/entropy']:.2f} is over twice its start "
                   f"({first['objective/entropy']:.2f}): gibberish? (App. A.4; raise β)")


def samples(tok, seq, P, score, step, path, n=4):
    """A small table of sampled responses, printed and appended to samples.jsonl."""
    rows = [{"step": step, "prompt": tok.decode(seq[i, :P], skip_special_tokens=True)[-200:],
             "response": tok.decode(seq[i, P:], skip_special_tokens=True), "score": round(score[i].item(), 3)}
            for i in range(min(n, seq.shape[0]))]
    tqdm.write(f"--- samples at step {step} (score | response)")
    for r in rows:
        tqdm.write(f"{r['score']:+.3f} | {r['response'][:160]!r}")
        salsa.log_jsonl(path, r)


if __name__ == "__main__":
    salsa.run(main, Args)
