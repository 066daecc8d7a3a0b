"""How far PPO's rollouts are from the distribution it scores, in fp32 and in bf16 (a measurement, not a test).

    python tests/bf16_gap.py                      # SmolLM2-135M-Instruct from models/, 8 bench prompts

ppo.py samples with `generate` (a KV-cached decode, one token at a time) and scores the samples with a
teacher-forced forward (salsa.hidden_states, then salsa.token_logprobs: the LM head in fp32). Both divide
the logits by the same temperature, so in fp32 they are one distribution up to float rounding. In bf16
(`--dtype bfloat16`, or FSDP's bf16 compute on CUDA, which casts the same fp32 weights to bf16 for every
forward) they are not: the cached decode and the full forward round differently, and generate's LM head
is a bf16 matmul. PPO's old log-probs are the scorer's, so its first ratio is still exactly 1; the samples
come from a slightly different policy, as with any sampler separate from the trainer.

For each dtype this prints, over the sampled response tokens: the mean and largest |log p_sampler -
log p_scorer| of the sampled token, the mean |sum over a response| of that difference, and
KL(sampler || scorer) per token, the sum over the vocabulary. It also scores the bf16 states with a bf16
LM head, the part of the gap that token_logprobs' fp32 head removes. A bf16 model here is the fp32
checkpoint cast, as FSDP's compute is (its fp32 master weights aside).

Last, the KL that `ppo.py --frozen-dtype bfloat16` starts from: the fp32 policy's samples scored by it and by
the same weights in bf16 (the frozen reference), k1 summed over each response. It is PPO's KL at step 0,
which is exactly 0 when the reference has the policy's dtype.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ppo  # noqa: E402
import salsa  # noqa: E402


def gap(model, tok, prompts, temperature: float, new_tokens: int, seed: int) -> dict:
    """Sample once with generate (its logits kept), score the samples as ppo.py does, compare."""
    prompt, prompt_mask = salsa.pad(prompts, tok.pad_token_id)  # (B, P), left-padded
    cfg = salsa.generation_config(tok, temperature, new_tokens)
    cfg.return_dict_in_generate, cfg.output_logits = True, True  # the raw logits, before the temperature
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=prompt_mask, generation_config=cfg)
        P = prompt.shape[1]
        resp = out.sequences[:, P:]  # (B, R)
        resp_mask, _ = ppo.response_mask(resp, cfg.eos_token_id)
        mask = torch.cat([prompt_mask, resp_mask], 1)
        h = salsa.hidden_states(model, out.sequences, mask)[:, P - 1:-1]  # (B, R, d): the states predicting resp
        scored, _ = salsa.token_logprobs(model, h, resp, temperature)  # (B, R), what PPO scores
        sampler_all = torch.log_softmax(torch.stack(out.logits, 1).float() / temperature, -1)  # (B, R, V)
        scorer_all = torch.log_softmax(F.linear(h.float(), model.get_output_embeddings().weight.float()) / temperature, -1)
        head_w = model.get_output_embeddings().weight
        bf16_head = torch.log_softmax(F.linear(h.bfloat16(), head_w.bfloat16()).float() / temperature, -1)
    on = resp_mask.bool()
    sampled = sampler_all.gather(-1, resp[..., None]).squeeze(-1)  # (B, R)
    d = (sampled - scored).masked_fill(~on, 0)
    kl = (sampler_all.exp() * (sampler_all - scorer_all)).sum(-1)[on]
    head_d = (bf16_head.gather(-1, resp[..., None]).squeeze(-1) - scored)[on]
    return {"tokens": int(on.sum()), "mean_abs_token": d[on].abs().mean().item(), "max_abs_token": d[on].abs().max().item(),
            "mean_abs_sequence": d.sum(1).abs().mean().item(), "kl_per_token": kl.mean().item(),
            "bf16_head_mean_abs_token": head_d.abs().mean().item()}


def frozen_gap(policy, ref, tok, prompts, temperature: float, new_tokens: int, seed: int) -> dict:
    """KL(π‖π_ref) as ppo.py logs it before any update (k1 per response), with the reference's weights in
    another dtype: the policy samples and both score, as in ppo.py's steps 1 and 3."""
    prompt, prompt_mask = salsa.pad(prompts, tok.pad_token_id)
    torch.manual_seed(seed)
    seq, mask, resp_mask, _ = ppo.rollout(policy, prompt, prompt_mask, salsa.generation_config(tok, temperature, new_tokens), False)
    with torch.no_grad():
        logp, ref_logp = (ppo.response_logprobs(m, seq, mask, prompt.shape[1], temperature)[0] for m in (policy, ref))
    kl = ppo.kl_per_token(logp, ref_logp, "k1", resp_mask).sum(-1)  # (B,) nats per response
    return {"tokens": int(resp_mask.sum()), "kl_mean": kl.mean().item(), "kl_min": kl.min().item(), "kl_max": kl.max().item()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--prompts", default=str(ROOT / "data" / "bench_prompts.jsonl"), help="JSONL rows with `prompt`")
    p.add_argument("--n", type=int, default=8, help="prompts (the file's first N)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="ppo.py's default")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    tok = salsa.load_tokenizer(a.model)
    rows = [json.loads(line) for line in Path(a.prompts).read_text().splitlines()[: a.n]]
    prompts = [salsa.prompt_ids(tok, r["prompt"], f"{a.prompts}:{i + 1}") for i, r in enumerate(rows)]
    print(f"{a.model}: {len(prompts)} prompts, {a.new_tokens} new tokens, temperature {a.temperature}, seed {a.seed}")
    for dtype in ("float32", "bfloat16"):
        r = gap(salsa.load_model(a.model, tok, dtype=dtype).eval(), tok, prompts, a.temperature, a.new_tokens, a.seed)
        print(f"{dtype}: {r['tokens']} tokens; |log p_sampler - log p_scorer| per token: mean {r['mean_abs_token']:.4f}, "
              f"max {r['max_abs_token']:.4f}; per response (summed): mean {r['mean_abs_sequence']:.3f}; "
              f"KL(sampler || scorer) {r['kl_per_token']:.2e} nats/token; a bf16 LM head on the same states would be "
              f"off the fp32 one by {r['bf16_head_mean_abs_token']:.4f} per token", flush=True)
    policy = salsa.load_model(a.model, tok).eval()
    r = frozen_gap(policy, salsa.load_model(a.model, tok, dtype="bfloat16").eval(), tok, prompts, a.temperature,
                   a.new_tokens, a.seed)
    print(f"--frozen-dtype bfloat16: KL(policy || reference) at step 0, k1 per response over {r['tokens']} tokens: "
          f"mean {r['kl_mean']:+.3f} nats, from {r['kl_min']:+.3f} to {r['kl_max']:+.3f} (0 with the policy's dtype)")


if __name__ == "__main__":
    main()
