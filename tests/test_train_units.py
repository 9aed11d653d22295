"""Unit tests of the algorithm's pieces: NFT loss, advantages, selection, decay schedules, audit."""
import math

import pytest
import torch

from solrl_core.train.advantages import advantages
from solrl_core.train.audit import bottom_k_overlap, kendall_tau_b, ranking_agreement, spearman, top_k_overlap
from solrl_core.train.nft import nft_loss, noised
from solrl_core.train.prompts import PromptCursor, load_prompts
from solrl_core.train.schedules import blend_, ema_decay, old_decay
from solrl_core.train.selection import check_sizes, kept_indices


def _loss_inputs(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 3, 4, 4, generator=g)
    eps = torch.randn(b, 3, 4, 4, generator=g)
    t = torch.rand(b, generator=g)
    v = torch.randn(b, 3, 4, 4, generator=g).requires_grad_(True)
    v_old = torch.randn(b, 3, 4, 4, generator=g)
    v_ref = torch.randn(b, 3, 4, 4, generator=g)
    return x0, eps, t, v, v_old, v_ref


def test_nft_loss_finite_and_gradient_only_through_v():
    x0, eps, t, v, v_old, v_ref = _loss_inputs()
    v_old.requires_grad_(True)
    v_ref.requires_grad_(True)
    out = nft_loss(v, v_old, v_ref, noised(x0, eps, t), x0, t, torch.tensor([0.0, 0.3, 0.7, 1.0]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert v_old.grad is None and v_ref.grad is None


def test_nft_loss_and_gradient_hand_computed():
    """Spec section 2 worked by hand on two 2-element samples (same data, r' = 0 and 0.25)."""
    x0 = torch.tensor([[1.0, -1.0]] * 2)
    x_t = torch.tensor([[2.0, 0.0]] * 2)
    t = torch.tensor([0.5, 0.5])
    v = torch.tensor([[2.0, 2.0]] * 2, requires_grad=True)
    v_old = torch.tensor([[0.0, 4.0]] * 2)
    v_ref = torch.tensor([[2.0, 0.0]] * 2)
    # beta = 0.5. Positive: v_pos = 0.5 v + 0.5 v_old = [1, 3]; x0_pos = x_t - 0.5 v_pos = [1.5, -1.5];
    #   err = [0.5, -0.5], w = 0.5, L_pos = mean(0.25 / 0.5, 0.25 / 0.5) = 0.5.
    # Negative: v_neg = 1.5 v_old - 0.5 v = [-1, 5]; x0_neg = [2.5, -2.5]; err = [1.5, -1.5], w = 1.5,
    #   L_neg = mean(2.25 / 1.5, 2.25 / 1.5) = 1.5.
    # r' = 0: (0 * 0.5 + 1 * 1.5) / 0.5 * 5 = 15;  r' = 0.25: (0.25 * 0.5 + 0.75 * 1.5) / 0.5 * 5 = 12.5.
    # policy loss = (15 + 12.5) / 2 = 13.75; KL = mean((v - v_ref)^2) = mean(0, 4, 0, 4) = 2, times 0.1.
    out = nft_loss(v, v_old, v_ref, x_t, x0, t, torch.tensor([0.0, 0.25]), beta=0.5, kl_coef=0.1)
    assert out.policy_loss.item() == pytest.approx(13.75, rel=1e-6)
    assert out.kl.item() == pytest.approx(2.0, rel=1e-6)
    assert out.loss.item() == pytest.approx(13.95, rel=1e-6)
    out.loss.backward()
    # d err_neg / dv = +t beta = 0.25, d err_pos / dv = -0.25; d mean(err^2 / w) / d err_i = err_i / w (D = 2).
    # Sample 0 (r' = 0): 5 / beta / 2 (batch mean) * (err_neg / 1.5 * 0.25) = 5 * [0.25, -0.25] = [1.25, -1.25].
    # Sample 1: 5 * (0.25 * [0.5, -0.5] / 0.5 * -0.25 + 0.75 * [0.25, -0.25]) = 5 * [0.125, -0.125].
    # KL: 0.1 * 2 (v - v_ref) / 4 = [0, 0.1] for both samples.
    torch.testing.assert_close(v.grad, torch.tensor([[1.25, -1.15], [0.625, -0.525]]))
    # r' = 1 is the positive branch alone: 0.5 / 0.5 * 5 = 5 (and r' = 0 the negative: 1.5 / 0.5 * 5 = 15).
    ones = nft_loss(v, v_old, None, x_t, x0, t, torch.ones(2), beta=0.5, kl_coef=0.0)
    zeros = nft_loss(v, v_old, None, x_t, x0, t, torch.zeros(2), beta=0.5, kl_coef=0.0)
    assert ones.loss.item() == pytest.approx(5.0, rel=1e-6) and zeros.loss.item() == pytest.approx(15.0, rel=1e-6)


def test_kl_zero_when_policy_equals_reference():
    x0, eps, t, v, v_old, _ = _loss_inputs(2)
    x_t = noised(x0, eps, t)
    out = nft_loss(v, v_old, v.detach().clone(), x_t, x0, t, torch.full((4,), 0.5), kl_coef=1.0)
    assert out.kl.item() == 0.0
    off = nft_loss(v, v_old, v.detach() + 1.0, x_t, x0, t, torch.full((4,), 0.5), kl_coef=1.0)
    assert off.kl.item() == pytest.approx(1.0)
    assert off.loss.item() == pytest.approx(out.loss.item() + 1.0, rel=1e-5)


def test_adaptive_weight_is_detached():
    """Gradient equals the one of the loss with the weight frozen as a constant."""
    x0, eps, t, v, v_old, _ = _loss_inputs(3)
    x_t = noised(x0, eps, t)
    r = torch.tensor([1.0, 1.0, 1.0, 1.0])
    nft_loss(v, v_old, None, x_t, x0, t, r, beta=1.0, kl_coef=0.0).loss.backward()
    grad = v.grad.clone()
    v2 = v.detach().clone().requires_grad_(True)
    err = x_t - t.reshape(-1, 1, 1, 1) * v2 - x0
    w = err.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    ((err ** 2 / w).mean(dim=(1, 2, 3)) * 5).mean().backward()
    torch.testing.assert_close(grad, v2.grad)
    # With a differentiable weight the gradient would differ.
    v3 = v.detach().clone().requires_grad_(True)
    err3 = x_t - t.reshape(-1, 1, 1, 1) * v3 - x0
    ((err3 ** 2 / err3.abs().mean(dim=(1, 2, 3), keepdim=True)).mean(dim=(1, 2, 3)) * 5).mean().backward()
    assert not torch.allclose(grad, v3.grad)


def test_advantages_use_the_population_std():
    r = torch.tensor([[0.0, 2.0], [4.0, 6.0]])
    # Prompt means 1 and 5, so r - mean = -1, +1, -1, +1. Global mean 3; deviations -3, -1, 1, 3:
    # population variance (ddof 0) = (9 + 1 + 1 + 9) / 4 = 5, std = sqrt(5) = 2.2360679...
    # (the unbiased std would be sqrt(20 / 3) = 2.5819889...).
    a = 1 / (2.2360679775 + 1e-4)  # = 0.4471935...
    adv, r_opt = advantages(r)
    expected = torch.tensor([[-a, a], [-a, a]])
    torch.testing.assert_close(adv, expected)
    # r' = clamp(A / 5 / 2 + 0.5, 0, 1)
    torch.testing.assert_close(r_opt, torch.tensor([[0.5 - a / 10, 0.5 + a / 10], [0.5 - a / 10, 0.5 + a / 10]]))


def test_advantages_std_is_global_and_skips_dropped_samples():
    r = torch.tensor([[1.0, 3.0, float("nan")], [2.0, 2.0, 2.0]])
    # Finite values 1, 3, 2, 2, 2: mean 2, population variance (1 + 1 + 0 + 0 + 0) / 5 = 0.4,
    # std = sqrt(0.4) = 0.6324555320 (unbiased: sqrt(0.5)). Prompt 0's mean is over its finite samples: 2.
    a = 1 / (0.6324555320 + 1e-4)  # = 1.5808...
    adv, _ = advantages(r)
    torch.testing.assert_close(adv[0, :2], torch.tensor([-a, a]))
    assert math.isnan(adv[0, 2].item())
    assert torch.equal(adv[1], torch.zeros(3))


def test_advantages_clip_and_nan_samples():
    r = torch.zeros(2, 100)
    r[0, 7] = 1.0  # one outlier among 100: (1 - 0.01) / 0.0707 ~ 14 standard deviations, clipped to 5
    r[1, 1] = float("nan")
    adv, r_opt = advantages(r)
    assert adv[0, 7].item() == 5.0 and r_opt[0, 7].item() == 1.0
    assert math.isnan(adv[1, 1].item()) and math.isnan(r_opt[1, 1].item())
    assert torch.equal(adv[1, 2:], torch.zeros(98))


def test_selection_best_worst_with_ties_and_nan():
    proxy = torch.tensor([[0.5, 0.9, 0.1, 0.9, 0.1, 0.3]])
    # best 2: the two 0.9 (positions 1, 3); worst 2: the two 0.1 (positions 2, 4)
    assert kept_indices(proxy, 4).tolist() == [[1, 2, 3, 4]]
    # ties resolved by position: best 1 of the 0.9s is position 1, worst 1 of the 0.1s is position 2
    assert kept_indices(proxy, 2).tolist() == [[1, 2]]
    nan = torch.tensor([[float("nan"), 0.2, 0.8, 0.5]])
    assert kept_indices(nan, 2).tolist() == [[1, 2]]  # NaN is neither best nor worst while finite ones remain
    assert kept_indices(nan, 4).tolist() == [[0, 1, 2, 3]]


def test_selection_other_modes_and_invalid_sizes():
    proxy = torch.tensor([[0.0, 1.0, 0.45, 0.55, 0.9]])
    assert kept_indices(proxy, 2, "mean_deviation").tolist() == [[0, 1]]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert kept_indices(proxy, 3, "random", g1).tolist() == kept_indices(proxy, 3, "random", g2).tolist()
    with pytest.raises(ValueError, match="K must be <= N"):
        check_sizes(4, 6, "best_worst")
    with pytest.raises(ValueError, match="K must be even"):
        check_sizes(8, 3, "best_worst")
    check_sizes(8, 3, "mean_deviation")


def test_decay_schedules_and_blend():
    # Spec step 7: d = min(0.001 * step, 0.5), EMA decay min((1 + s) / (10 + s), 0.9).
    assert old_decay(1) == pytest.approx(0.001) and old_decay(100) == pytest.approx(0.1)
    assert old_decay(500) == 0.5 and old_decay(10_000) == 0.5
    assert ema_decay(1) == pytest.approx(2 / 11) and ema_decay(9) == pytest.approx(10 / 19)
    assert ema_decay(80) == pytest.approx(0.9) and ema_decay(1000) == 0.9  # 81 / 90 = 0.9: the cap
    target = {"w": torch.tensor([1.0, 1.0])}
    blend_(target, {"w": torch.tensor([3.0, 5.0])}, 0.25)
    torch.testing.assert_close(target["w"], torch.tensor([2.5, 4.0]))  # 0.25 * 1 + 0.75 * 3, 0.25 * 1 + 0.75 * 5


def test_rank_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, generator=g)
    b = a + 0.5 * torch.randn(30, generator=g)
    b[3] = b[4]  # a tie
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-9)
    assert kendall_tau_b(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-9)
    perfect = ranking_agreement(a[None], a[None] * 2, k=4)
    assert perfect == {"spearman": 1.0, "kendall": 1.0, "top4_overlap": 1.0, "bottom4_overlap": 1.0}


def test_top_and_bottom_k_overlap_count_ties_as_in():
    full = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0])  # six drafts share the best reward
    proxy = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.7, 0.0])  # its top-4: drafts 4, 5, 6, 3
    assert top_k_overlap(proxy, full, 4) == 0.75  # draft 6 (0.5) is not in full precision's top-4
    assert bottom_k_overlap(proxy, full, 2) == 0.5  # proxy's bottom-2 (drafts 7, 0): full 0.0 yes, 1.0 no
    assert bottom_k_overlap(proxy, full, 3) == 1.0  # full bottom-3 reaches the tie at 1.0: drafts 0, 1 count
    reversed_ = ranking_agreement(proxy[None], -proxy[None], k=2)
    assert reversed_["top2_overlap"] == 0.0 and reversed_["bottom2_overlap"] == 0.0
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["kendall"] == pytest.approx(-1.0)


def test_prompt_cursor_is_a_seeded_resumable_permutation():
    prompts = [f"p{i}" for i in range(10)]
    cur = PromptCursor()
    seen = []
    for _ in range(5):
        batch, cur = cur.take(prompts, 4, seed=1)
        seen.extend(batch)
    assert sorted(seen[:10]) == sorted(prompts)  # first epoch covers every prompt once
    again, _ = PromptCursor(0, 0).take(prompts, 4, seed=1)
    assert again == seen[:4]
    assert len(load_prompts("shapes_single")) == 15
