"""PPO math against hand-computed values and slow, obviously-correct references (STYLE tiers b, c)."""
import math

import pytest
import torch

import ppo


def gae_reference(rewards, values, length, gamma, lam):
    """One sequence, plain Python, straight from the definition A_t = Σ_k (γλ)^k δ_{t+k}."""
    v = [values[t] if t < length else 0.0 for t in range(length + 1)]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(length)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t)) for t in range(length)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_plain_definition(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths], dtype=torch.float64)
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        ref = gae_reference(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert torch.allclose(adv[b, :n], torch.tensor(ref, dtype=torch.float64), atol=1e-12)
        assert torch.equal(adv[b, n:], torch.zeros(7 - n, dtype=torch.float64))  # nothing after EOS
        assert torch.allclose(ret[b, :n], adv[b, :n] + values[b, :n])
        assert torch.equal(ret[b, n:], torch.zeros(7 - n, dtype=torch.float64))


def test_gae_by_hand():
    # one 2-token episode, γ = 1, λ = 0.5: δ1 = 1 - 0.5 = 0.5, δ0 = 0 + 0.5 - 0.2 = 0.3, A0 = 0.3 + 0.5·0.5
    adv, ret = ppo.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.5]]), torch.ones(1, 2), 1.0, 0.5)
    assert torch.allclose(adv, torch.tensor([[0.55, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[0.75, 1.0]]))


def test_whiten_refuses_fewer_than_two_tokens():
    """A variance needs two tokens: one gave 0 advantages silently, none gave NaN."""
    for mask in (torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)):
        with pytest.raises(ValueError, match="2 or more tokens"):
            ppo.whiten(torch.tensor([[0.5, 3.0]]), mask)


def test_unknown_kl_estimator_is_an_error():
    with pytest.raises(ValueError, match="'k2': expected k1 or k3"):  # it meant k3
        ppo.kl_per_token(torch.zeros(2), torch.ones(2), "k2", torch.ones(2))


def test_whiten_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = ppo.whiten(x, mask)
    # mean 2, unbiased variance 1 -> (-1, 0, 1); the masked 100 neither counts nor survives
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    w2 = ppo.whiten(x, mask, shift_mean=False)
    assert torch.allclose(w2, torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6)


def test_moments_use_only_real_tokens():
    """Count, mean and unbiased variance by hand: (1, 2, 3) -> 3, 2, 1; the masked 100 does not count.
    The explained variance ppo.py logs is 1 - var(returns - V) / var(returns) from these moments."""
    n, mean, var = ppo.moments(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert (n.item(), mean.item(), var.item()) == (3.0, 2.0, 1.0)


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.4)])
    ones = torch.ones(2)
    assert torch.allclose(ppo.kl_per_token(logp, ref, "k1", ones), torch.tensor([math.log(2), math.log(0.5)]))
    # k3 = r - 1 - log r with r = π_ref/π: r = 0.5 -> 0.5 - 1 + log 2; r = 2 -> 1 - log 2
    k3 = torch.tensor([0.5 - 1 + math.log(2), 2 - 1 - math.log(2)])
    assert torch.allclose(ppo.kl_per_token(logp, ref, "k3", ones), k3, atol=1e-6)
    assert torch.equal(ppo.kl_per_token(logp, logp, "k1", ones), torch.zeros(2))
    assert torch.equal(ppo.kl_per_token(logp, logp, "k3", ones), torch.zeros(2))


def test_kl_estimators_are_unbiased_on_average():
    # E_π[k1] = E_π[k3] = KL(π‖π_ref) for exact samples of π
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    kl = (p * (p / q).log()).sum()
    lp, lq = p.log(), q.log()
    for est in ("k1", "k3"):
        assert torch.allclose((p * ppo.kl_per_token(lp, lq, est, torch.ones(3))).sum(), kl, atol=1e-6)


def test_kl_after_eos_is_zero_even_where_it_overflows():
    """A pad token after EOS that the policy finds e^-100 less likely than the reference: k3 = e^100 - ...
    overflows to inf in fp32, and a product with the mask gave NaN, which GAE spread to every token."""
    logp, ref = torch.tensor([[-1.0, -101.0]]), torch.tensor([[-1.5, -1.0]])
    mask = torch.tensor([[1, 0]])  # (B, R): the second token comes after EOS
    kl = ppo.kl_per_token(logp, ref, "k3", mask)
    assert kl[0, 1] == 0 and math.isclose(kl[0, 0].item(), math.exp(-0.5) - 1 + 0.5, rel_tol=1e-6)
    rewards = ppo.per_token_rewards(kl, torch.tensor([1.0]), mask.float(), 0.1)
    adv, _ = ppo.gae(rewards, torch.zeros(1, 2), mask.float(), 1.0, 0.95)
    assert torch.isfinite(adv).all()


def test_only_k1_as_a_reward_gives_the_kl_gradient():
    """One-token bandit, exact expectations: PPO's score-function gradient with a per-token reward k is
    Σ π·k·∇log π (k held fixed). For k1 that is ∇KL(π‖π_ref), computed here by autograd; for k3 it is not,
    though both have E_π[k] = KL (kl_per_token's docstring)."""
    logits, ref = torch.tensor([0.5, -0.3, 1.2, 0.0, -1.0], requires_grad=True), torch.tensor([0.1, 0.4, -0.2, 0.3, 0.0])
    lq = ref.log_softmax(-1)
    true = torch.autograd.grad((logits.softmax(-1) * (logits.log_softmax(-1) - lq)).sum(), logits)[0]
    for est, equal in (("k1", True), ("k3", False)):
        lp = logits.log_softmax(-1)
        k = ppo.kl_per_token(lp.detach(), lq, est, torch.ones(5))
        surrogate = (lp.exp().detach() * k * lp).sum()  # its gradient: Σ π·k·∇log π
        grad = torch.autograd.grad(surrogate, logits)[0]
        assert torch.allclose(grad, true, atol=1e-6) == equal, (est, grad, true)


def test_clipped_losses_by_hand():
    # ratio e (log-ratio 1) with A = +1 is clipped to 1.2: loss = max(-e, -1.2) = -1.2.
    # ratio e with A = -1: loss = max(e, 1.2) = e (the pessimistic bound does not clip).
    # ratio e^-1 with A = -1: max(e^-1, 0.8) = 0.8.
    old = torch.zeros(1, 3)
    logp = torch.tensor([[1.0, 1.0, -1.0]])
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    mask = torch.ones(1, 3)
    values, old_values, returns = torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1, 3), torch.tensor([[2.0, 0.0, 0.0]])
    pg, vf, stats = ppo.ppo_losses(logp, old, values, old_values, adv, returns, mask, 0.2, 0.2)
    assert math.isclose(pg.item(), -1.2 + math.e + 0.8, rel_tol=1e-6)
    # value: v = 1, clipped to 0.2; returns 2: 0.5·max(1, 1.8²) = 1.62
    assert math.isclose(vf.item(), 0.5 * 1.8 ** 2, rel_tol=1e-6)
    # One rule for both clip fractions: a token counts where the max took the clipped term (its gradient is 0).
    # All three ratios leave [0.8, 1.2], but the second token's loss is the unclipped e: two tokens, not three.
    assert stats["ppo/clipfrac"] == 2.0
    assert stats["ppo/vf_clipfrac"] == 1.0  # token 1: (0.2 - 2)² > (1 - 2)²; tokens 2, 3: both terms are 0
    assert math.isclose(stats["ppo/ratio_mean"], 2 * math.e + math.exp(-1), rel_tol=1e-6)


def test_value_below_the_clip_range_is_clipped_from_below():
    # v = -1 from old 0 is clipped to -0.2; return -2: 0.5·max((-1 + 2)², (-0.2 + 2)²) = 1.62, the clipped term
    v, old, ret = torch.tensor([[-1.0]]), torch.zeros(1, 1), torch.tensor([[-2.0]])
    zero, one = torch.zeros(1, 1), torch.ones(1, 1)
    _, vf, stats = ppo.ppo_losses(zero, zero, v, old, one, ret, one, 0.2, 0.2)
    assert math.isclose(vf.item(), 0.5 * 1.8 ** 2, rel_tol=1e-6) and stats["ppo/vf_clipfrac"] == 1.0


def test_ratios_inside_the_clip_range_are_not_clipped():
    # ratios 1 and e^0.1 ≈ 1.105 lie in [0.8, 1.2]: both terms are equal, so the loss is not the clipped term
    zero, one = torch.zeros(1, 2), torch.ones(1, 2)
    _, _, stats = ppo.ppo_losses(torch.tensor([[0.0, 0.1]]), zero, zero, zero, torch.tensor([[1.0, -1.0]]), zero, one,
                                 0.2, 0.2)
    assert stats["ppo/clipfrac"] == 0.0


def test_value_inside_the_clip_range_is_not_clipped():
    """0.0989 is within 0.2 of 0.0079, so the clipped value is the value itself: no clip counted, the loss
    the plain one. (In float32 old + (v - old) rounds to v + 1 ulp here, nearer the return 0.2015: it once
    counted as clipped, and torchrun's ranks and one process disagreed on vf_clipfrac.)"""
    values, old_values, returns = torch.tensor([[0.09891923516988754]]), torch.tensor([[0.007902819663286209]]), \
        torch.tensor([[0.20152810215950012]])
    assert (old_values + (values - old_values)).item() != values.item()  # the rounding this test is about
    zeros, ones = torch.zeros(1, 1), torch.ones(1, 1)
    _, vf, stats = ppo.ppo_losses(zeros, zeros, values, old_values, ones, returns, ones, 0.2, 0.2)
    assert stats["ppo/vf_clipfrac"] == 0.0 and vf.item() == (0.5 * (values - returns) ** 2).item()


def test_losses_ignore_masked_tokens():
    args = [torch.tensor([[0.3, 50.0]]), torch.zeros(1, 2), torch.tensor([[0.1, 9.0]]), torch.zeros(1, 2),
            torch.tensor([[1.0, 7.0]]), torch.tensor([[0.5, -3.0]])]
    pg, vf, _ = ppo.ppo_losses(*args, torch.tensor([[1.0, 0.0]]), 0.2, 0.2)
    pg1, vf1, _ = ppo.ppo_losses(*[a[:, :1] for a in args], torch.ones(1, 1), 0.2, 0.2)
    assert pg.item() == pg1.item() and vf.item() == vf1.item()


def test_masked_log_ratio_that_overflows_exp_leaves_loss_and_gradient_finite():
    """After EOS the policy's log-prob can rise 100 nats above the rollout's: exp(100) is inf in fp32, and
    0 * inf is NaN, which multiplying by the mask does not remove. The loss and its gradient must be those
    of the unmasked token alone."""
    logp = torch.tensor([[0.1, 100.0]], requires_grad=True)
    zeros, mask = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    assert torch.exp(logp[0, 1]).isinf()  # the overflow this test is about
    adv, values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.1, 0.0]]), torch.tensor([[0.5, 0.0]])
    pg, _, stats = ppo.ppo_losses(logp, zeros, values, zeros, adv, returns, mask, 0.2, 0.2)
    pg.backward()
    # ratio e^0.1 = 1.105 is inside the clip range, A = 1: loss -e^0.1, its gradient -e^0.1; the masked token's 0
    assert math.isclose(pg.item(), -math.exp(0.1), rel_tol=1e-6)
    assert torch.allclose(logp.grad, torch.tensor([[-math.exp(0.1), 0.0]]))
    assert math.isclose(stats["ppo/ratio_mean"], math.exp(0.1), rel_tol=1e-6)
    assert math.isclose(stats["ppo/approx_kl"], 0.5 * 0.1 ** 2, rel_tol=1e-5)


def test_adaptive_kl_controller():
    # KL 9 vs target 6: e = 0.5 clipped to 0.2; β = 0.1·(1 + 0.2·8/10000)
    assert math.isclose(ppo.adaptive_kl(0.1, 9.0, 6.0, 10000, 8), 0.1 * (1 + 0.2 * 8 / 10000))
    # KL 5.4: e = -0.1, not clipped
    assert math.isclose(ppo.adaptive_kl(0.1, 5.4, 6.0, 10000, 8), 0.1 * (1 - 0.1 * 8 / 10000))
    assert ppo.adaptive_kl(0.1, 6.0, 6.0, 10000, 8) == 0.1
    # KL 3: e = -0.5 clipped to -0.2 (the lower clip: KL far below target lowers β no faster)
    assert math.isclose(ppo.adaptive_kl(0.1, 3.0, 6.0, 10000, 8), 0.1 * (1 - 0.2 * 8 / 10000))


def test_response_mask_cuts_after_first_eos():
    eos = 2
    resp = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    mask, has_eos = ppo.response_mask(resp, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, True, False, True]


def test_score_lands_on_eos_and_nothing_after():
    kl = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    r = ppo.per_token_rewards(kl, torch.tensor([3.0, -1.0]), mask, kl_coef=0.2)
    assert torch.allclose(r, torch.tensor([[-0.1, -0.1 + 3.0, 0.0, 0.0], [-0.2, -0.2, -0.2, -0.2 - 1.0]]))
