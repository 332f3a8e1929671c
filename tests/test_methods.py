"""The baselines' targets and losses (cfrh.methods) on small matrices worked out by hand, their published settings,
and a gradient check of every loss."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from cfrh.methods import METHODS, alpha, dgcpn, djsrh, jdsh, relax

F64 = torch.float64


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# Three items. Image features (1,0), (0,1), (3,4): cosines 0, .6, .8, so
# S_I = 2cos − 1 = [[1,−1,.2],[−1,1,.6],[.2,.6,1]].
# Text features (1,0), (1,0), (0,1): S_T = [[1,1,−1],[1,1,−1],[−1,−1,1]].
IMAGE3 = t([[1, 0], [0, 1], [3, 4]])
TEXT3 = t([[1, 0], [1, 0], [0, 1]])
# Relaxed codes whose rows normalise to B_I = (1,0), (0,1), (1,0) and B_T = (1,0), (1,0), (0,1), so
# B_I B_Iᵀ = [[1,0,1],[0,1,0],[1,0,1]], B_T B_Tᵀ = [[1,1,0],[1,1,0],[0,0,1]], B_I B_Tᵀ = [[1,1,0],[0,0,1],[1,1,0]].
CODES_I = t([[0.5, 0], [0, 0.5], [0.3, 0]])
CODES_T = t([[0.2, 0], [0.9, 0], [0, 0.4]])
S3 = t([[1, 0.5, 0], [0.5, 1, 0], [0, 0, 1]])
# Squared differences summed over the 9 entries, by hand: B_I B_Iᵀ − S → 2.5, B_I B_Tᵀ − S → 5.5, B_T B_Iᵀ − S → 5.5,
# B_T B_Tᵀ − S → .5; paired cosines diag(B_I B_Tᵀ) = (1, 0, 0).


# -- DJSRH -----------------------------------------------------------------------------------------
def test_djsrh_target_by_hand():
    settings = dataclasses.replace(djsrh.WIKI, beta=0.5)  # η = .4, μ = 1.5 as published
    # S̃ = .5 S_I + .5 S_T, and S̃S̃ᵀ row by row
    s_tilde = np.array([[1, 0, -0.4], [0, 1, -0.2], [-0.4, -0.2, 1]])
    s_tilde_sq = np.array([[1.16, 0.08, -0.8], [0.08, 1.04, -0.4], [-0.8, -0.4, 1.2]])
    np.testing.assert_allclose(s_tilde @ s_tilde.T, s_tilde_sq, atol=1e-15)
    # S = 1.5 (.6 S̃ + .4 S̃S̃ᵀ / 3)
    want = [[1.132, 0.016, -0.52], [0.016, 1.108, -0.26], [-0.52, -0.26, 1.14]]
    np.testing.assert_allclose(djsrh.target(IMAGE3, TEXT3, settings).numpy(), want, atol=1e-14)


def test_djsrh_loss_by_hand():
    total, terms = djsrh.loss(CODES_I, CODES_T, S3, djsrh.WIKI)  # λ1 = λ2 = .3
    assert terms["image_image"].item() == pytest.approx(2.5 / 9, abs=1e-15)
    assert terms["image_text"].item() == pytest.approx(5.5 / 9, abs=1e-15)
    assert terms["text_text"].item() == pytest.approx(0.5 / 9, abs=1e-15)
    assert total.item() == pytest.approx((0.3 * 2.5 + 5.5 + 0.3 * 0.5) / 9, abs=1e-15)


# -- JDSH ------------------------------------------------------------------------------------------
def test_jdsh_weighting_by_hand():
    s = jdsh.MIRFLICKR  # left = −.49 − 2·.019 = −.528, right = −.49 + 4·.088 = −.138
    got = jdsh.weighting(t([[-0.8, -0.3], [0.5, 0.9]]), s).numpy()
    want = [[-0.8 * (1 + 0.1 * math.exp(0.28)), -0.3],  # below left: × (1 + L1 e^{−(s − MIN)}), MIN = −.52
            [0.5 * (1 + 0.2 * math.exp(-0.18)), 0.9 * (1 + 0.2 * math.exp(0.22))]]  # above right, MAX = .68
    np.testing.assert_allclose(got, want, atol=1e-15)
    edges = jdsh.weighting(t([-0.528, -0.138]), s)  # the thresholds themselves are not weighted
    np.testing.assert_allclose(edges.numpy(), [-0.528, -0.138], atol=1e-15)


def test_jdsh_target_by_hand():
    # two items: image cosine 7/8 → S_I off-diagonal 3/4; text cosine 1/2 → S_T off-diagonal 0
    image = t([[1, 0], [7 / 8, math.sqrt(15) / 8]])
    text = t([[1, 0], [1 / 2, math.sqrt(3) / 2]])
    # rows of S_I = (1, 3/4) have norm 5/4, so N(S_I) = [[.8, .6], [.6, .8]]; N(S_T) = I → S_h = [[.8, .6], [.6, .8]]
    np.testing.assert_allclose(jdsh.joint_similarity(t([[1, 0.75], [0.75, 1]]), t([[1, 0], [0, 1]])).numpy(),
                               [[0.8, 0.6], [0.6, 0.8]], atol=1e-15)
    # S_ = .5 S_I + .1 S_T + .4 S_h: diagonal .92, off-diagonal .615, both above right → × (1 + .2 e^{s − .68}); μ = 1.4
    diag, off = 0.92 * (1 + 0.2 * math.exp(0.24)), 0.615 * (1 + 0.2 * math.exp(-0.065))
    np.testing.assert_allclose(jdsh.target(image, text, jdsh.MIRFLICKR).numpy(),
                               1.4 * np.array([[diag, off], [off, diag]]), atol=1e-14)


def test_jdsh_loss_by_hand():
    total, terms = jdsh.loss(CODES_I, CODES_T, S3, jdsh.MIRFLICKR)  # INTRA = .1
    assert [terms[k].item() for k in ("image_image", "image_text", "text_image", "text_text")] == \
        pytest.approx([2.5 / 9, 5.5 / 9, 5.5 / 9, 0.5 / 9], abs=1e-15)
    assert terms["pair"].item() == pytest.approx(-1 / 3, abs=1e-15)  # −mean of the paired cosines (1, 0, 0)
    assert total.item() == pytest.approx((0.1 * 2.5 + 5.5 + 5.5 + 0.1 * 0.5) / 9 - 1 / 3, abs=1e-15)


# -- DGCPN -----------------------------------------------------------------------------------------
# Four items (1,0), (.6,.8), (.8,.6), (0,1): cosines C = [[1,.6,.8,0],[.6,1,.96,.8],[.8,.96,1,.6],[0,.8,.6,1]].
FEAT4 = t([[1, 0], [0.6, 0.8], [0.8, 0.6], [0, 1]])
C4 = np.array([[1, 0.6, 0.8, 0], [0.6, 1, 0.96, 0.8], [0.8, 0.96, 1, 0.6], [0, 0.8, 0.6, 1]])


def test_dgcpn_counts_follow_the_code_for_mirflickr():
    assert dgcpn.knn_counts(5000, dgcpn.MIRFLICKR) == (2000, 3000)  # the script's --knn_number 3000
    assert dgcpn.MIRFLICKR.scale_fraction * 5000 == 4000  # --scale 4000
    with pytest.raises(ValueError, match="at least 2"):
        dgcpn.knn_counts(2, dgcpn.MIRFLICKR)


def test_dgcpn_neighbours_and_target_by_hand():
    # k = .5·4 = 2 (knn_number 2): per row drop the 2 smallest and the largest (itself), keep the second largest:
    # row 0 keeps column 2 (.8), row 1 column 2 (.96), row 2 column 1 (.96), row 3 column 1 (.8)
    p = dgcpn.neighbour_distribution(t(C4), 2).numpy()
    np.testing.assert_array_equal(p, [[0, 0, 1, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0]])
    settings = dataclasses.replace(dgcpn.MIRFLICKR, neighbour_fraction=0.5)  # a1 = .01, a2 = .3, scale .8·4 = 3.2
    # P Pᵀ = [[1,1,0,0],[1,1,0,0],[0,0,1,1],[0,0,1,1]]; S = 2(.7 C + .3·3.2 P Pᵀ) − 1 = 1.4 C + 1.92 P Pᵀ − 1
    want = [[2.32, 1.76, 0.12, -1], [1.76, 2.32, 0.344, 0.12], [0.12, 0.344, 2.32, 1.76], [-1, 0.12, 1.76, 2.32]]
    np.testing.assert_allclose(dgcpn.target(FEAT4, FEAT4, settings).numpy(), want, atol=1e-14)
    # a1 weights the text cosines: with a1 = 1 the image features do not matter
    text_only = dataclasses.replace(settings, a1=1.0)
    noise = torch.rand(4, 7, dtype=F64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(dgcpn.target(noise, FEAT4, text_only).numpy(), want, atol=1e-14)
    # a batch takes its rows and columns of the training-set target
    np.testing.assert_array_equal(dgcpn.batch_target(t(want), torch.tensor([3, 0])).numpy(), [[2.32, -1], [-1, 2.32]])


def test_dgcpn_row_without_neighbours_is_zero_not_nan():
    # Item 0 shares no feature with items 1 and 2 (cosines 0); cos(1, 2) = .6. With k = 2 of 3, every row keeps
    # its second largest entry: row 0 a 0 (nothing to spread over: the code's 0/0), row 1 column 2, row 2 column 1.
    feats = t([[1, 0, 0], [0, 1, 0], [0, 0.6, 0.8]])
    first_order = dgcpn.cosine(feats)
    p = dgcpn.neighbour_distribution(first_order, 2).numpy()
    np.testing.assert_array_equal(p, [[0, 0, 0], [0, 0, 1], [0, 1, 0]])
    settings = dataclasses.replace(dgcpn.MIRFLICKR, neighbour_fraction=0.67)  # k = round(2.01) = 2, scale 2.4
    # P Pᵀ = diag(0, 1, 1); S = 2(.7 C + .3·2.4 P Pᵀ) − 1 = 1.4 C + 1.44 P Pᵀ − 1: finite everywhere
    want = [[0.4, -1, -1], [-1, 1.84, -0.16], [-1, -0.16, 1.84]]
    np.testing.assert_allclose(dgcpn.target(feats, feats, settings).numpy(), want, atol=1e-14)


def test_dgcpn_loss_by_hand():
    total, terms = dgcpn.loss(CODES_I, CODES_T, S3, dgcpn.MIRFLICKR)  # K = 1.5, dw = cw = 1
    by_hand = {"pair": ((1 - 1.5) ** 2 + 1.5 ** 2 + 1.5 ** 2) / 3,
               # off-diagonal squared differences only (the diagonal is masked on both sides)
               "dis_text_text": 0.5 / 9, "dis_image_text": 3.5 / 9, "dis_image_image": 2.5 / 9,
               # B_I B_Tᵀ − B_I B_Iᵀ, B_I B_Tᵀ − B_T B_Tᵀ, B_I B_Iᵀ − B_T B_Tᵀ, B_I B_Tᵀ − B_T B_Iᵀ
               "cons_it_ii": 6 / 9, "cons_it_tt": 6 / 9, "cons_ii_tt": 4 / 9, "cons_it_ti": 4 / 9}
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(by_hand, abs=1e-15)
    assert total.item() == pytest.approx(4.75 / 3 + 6.5 / 9 + 20 / 9, abs=1e-14)


def test_dgcpn_half_binary_step_reaches_one_net_only():
    codes_i, codes_t = CODES_I.clone().requires_grad_(), CODES_T.clone().requires_grad_()
    total, _ = dgcpn.loss(codes_i, codes_t.sign().detach(), S3, dgcpn.MIRFLICKR)
    total.backward()
    assert codes_i.grad is not None and codes_t.grad is None


# -- shared --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_loss_gradients_match_finite_differences(name):
    method = METHODS[name]
    g = torch.Generator().manual_seed(1)
    image, text = torch.rand(6, 5, dtype=F64, generator=g), torch.rand(6, 4, dtype=F64, generator=g)
    settings = dataclasses.replace(method.MIRFLICKR, neighbour_fraction=0.5) if name == "dgcpn" else method.MIRFLICKR
    s = method.target(image, text, settings)
    codes_i = torch.tanh(torch.randn(6, 8, dtype=F64, generator=g)).requires_grad_()
    codes_t = torch.tanh(torch.randn(6, 8, dtype=F64, generator=g)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: method.loss(a, b, s, settings)[0], (codes_i, codes_t))


def test_targets_and_losses_keep_float32():
    g = torch.Generator().manual_seed(2)
    image, text = torch.rand(10, 6, generator=g), torch.rand(10, 3, generator=g)
    codes_i, codes_t = torch.tanh(torch.randn(10, 16, generator=g)), torch.tanh(torch.randn(10, 16, generator=g))
    for name, method in METHODS.items():
        s = method.target(image, text, method.MIRFLICKR if name != "dgcpn" else
                          dataclasses.replace(method.MIRFLICKR, neighbour_fraction=0.5))
        total, terms = method.loss(codes_i, codes_t, s, method.MIRFLICKR)
        assert s.dtype == total.dtype == torch.float32 and s.shape == (10, 10), name
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values()), name


def test_relaxation_schedules():
    assert alpha(0, "sqrt") == 1.0 and alpha(3, "sqrt") == 2.0 and alpha(7, "constant") == 1.0
    h = t([[0.5, -1.0]])
    np.testing.assert_allclose(relax(h, 3, djsrh.WIKI).numpy(), np.tanh([[1.0, -2.0]]), atol=1e-15)
    np.testing.assert_allclose(relax(h, 3, dgcpn.MIRFLICKR).numpy(), np.tanh([[0.5, -1.0]]), atol=1e-15)
    with pytest.raises(ValueError, match="alpha_schedule"):
        alpha(1, "linear")


def test_published_settings():
    assert (djsrh.WIKI.beta, djsrh.WIKI.lambda1, djsrh.WIKI.lambda2, djsrh.WIKI.epochs, djsrh.WIKI.lr_image,
            djsrh.WIKI.lr_text, djsrh.WIKI.mu, djsrh.WIKI.eta, djsrh.WIKI.batch_size) == \
        (0.3, 0.3, 0.3, 200, 0.01, 0.01, 1.5, 0.4, 32)
    assert (jdsh.MIRFLICKR.a, jdsh.MIRFLICKR.b, jdsh.MIRFLICKR.l, jdsh.MIRFLICKR.mu, jdsh.MIRFLICKR.intra,
            jdsh.MIRFLICKR.epochs) == (0.5, 0.1, 0.4, 1.4, 0.1, 300)
    assert (dgcpn.MIRFLICKR.a1, dgcpn.MIRFLICKR.a2, dgcpn.MIRFLICKR.pair_target, dgcpn.MIRFLICKR.lr_image,
            dgcpn.MIRFLICKR.image_hidden, dgcpn.MIRFLICKR.dropout, dgcpn.MIRFLICKR.target_scope) == \
        (0.01, 0.3, 1.5, 0.005, (4096,), 0.5, "training-set")
    for method in METHODS.values():
        assert method.MIRFLICKR.optimizer == "sgd" and method.MIRFLICKR.momentum == 0.9
        assert method.MIRFLICKR.weight_decay == 5e-4 and method.MIRFLICKR.text_hidden == (4096,)
