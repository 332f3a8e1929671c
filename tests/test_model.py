"""CFRH's pieces against hand-computed cases: similarity builder, loss terms, relaxed codes, the model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cfrh.codes import pack_codes
from cfrh.config import ConfigError
from cfrh.loss import LossWeights, loss_terms, reconstruction_error
from cfrh.model import (CFRHModel, FeatureStats, ModalityAutoencoder, ModelError, ModelSpec, alpha_for_epoch,
                        alpha_stage, idf_weights, prepare_features, relaxed_codes)
from cfrh.similarity import (cosine_similarity, dgcpn_coherence, fused_similarity, jdsh_weighting, joint_modal_similarity,
                             offdiagonal_iqr_spread)
from cfrh.trainers import Trainer
from cfrh.training import TrainConfig

R = 1 / math.sqrt(2)
IMAGE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
TEXT = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
S_I = np.array([[1, 0, R], [0, 1, R], [R, R, 1]])
S_T = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=float)


def _numpy_joint(s_i: np.ndarray, s_t: np.ndarray) -> np.ndarray:
    a = s_i / np.linalg.norm(s_i, axis=1, keepdims=True)
    b = s_t / np.linalg.norm(s_t, axis=1, keepdims=True)
    return 0.5 * (a @ b.T + (a @ b.T).T)


# -- similarity -----------------------------------------------------------------------------------
def test_cosine_similarity_by_hand():
    np.testing.assert_allclose(cosine_similarity(IMAGE).numpy(), S_I, atol=1e-12)
    np.testing.assert_allclose(cosine_similarity(TEXT).numpy(), S_T, atol=1e-12)
    zero_row = cosine_similarity(torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
    assert torch.isfinite(zero_row).all() and zero_row[0].abs().sum() == 0


def test_joint_modal_similarity_by_hand():
    s_c = joint_modal_similarity(torch.from_numpy(S_I), torch.from_numpy(S_T)).numpy()
    # Row 0 of N(S_I) is (1, 0, r)/√1.5, of N(S_T) (1, 1, 0)/√2: their product is 1/√3.
    assert s_c[0, 0] == pytest.approx(1 / math.sqrt(3), abs=1e-12)
    # Entry (0, 2): ½(N(S_I)_0·N(S_T)_2 + N(S_I)_2·N(S_T)_0)
    #             = ½(r/√1.5 + (r, r, 1)/√2 · (1, 1, 0)/√2) = ½(r/√1.5 + r)
    assert s_c[0, 2] == pytest.approx(0.5 * (R / math.sqrt(1.5) + R), abs=1e-12)
    np.testing.assert_allclose(s_c, _numpy_joint(S_I, S_T), atol=1e-12)
    np.testing.assert_allclose(s_c, s_c.T, atol=1e-15)


def test_fused_similarity_is_the_named_formula():
    s = fused_similarity(IMAGE, TEXT, mu=2.0, beta=0.5, gamma=0.3, eta=0.2).numpy()
    np.testing.assert_allclose(s, 2.0 * (0.5 * S_I + 0.3 * S_T + 0.2 * _numpy_joint(S_I, S_T)), atol=1e-12)
    # eta = 0 leaves out the joint term entirely.
    s0 = fused_similarity(IMAGE, TEXT, mu=1.0, beta=1.0, gamma=1.0, eta=0.0).numpy()
    np.testing.assert_allclose(s0, S_I + S_T, atol=1e-12)


def test_fused_similarity_options():
    a_i, a_t = 2 * S_I - 1, 2 * S_T - 1
    s = fused_similarity(IMAGE, TEXT, mu=1.5, beta=0.4, gamma=0.4, eta=0.2, rescale="affine").numpy()
    np.testing.assert_allclose(s, 1.5 * (0.4 * a_i + 0.4 * a_t + 0.2 * _numpy_joint(a_i, a_t)), atol=1e-12)
    s = fused_similarity(IMAGE, TEXT, mu=1.0, beta=0.5, gamma=0.5, eta=0.0, refine="djsrh", refine_weight=0.25)
    base = 0.5 * S_I + 0.5 * S_T
    np.testing.assert_allclose(s.numpy(), 0.75 * base + 0.25 * base @ base.T / 3, atol=1e-12)
    with pytest.raises(ValueError, match="refine"):
        fused_similarity(IMAGE, TEXT, mu=1, beta=1, gamma=1, eta=0, refine="nope")
    with pytest.raises(ValueError, match="weighting"):
        fused_similarity(IMAGE, TEXT, mu=1, beta=1, gamma=1, eta=0, weighting="nope")


def test_joint_similarity_over_anchors():
    # The batch as its own anchors is JDSH's S_c exactly.
    np.testing.assert_array_equal(
        fused_similarity(IMAGE, TEXT, mu=2.0, beta=0.5, gamma=0.3, eta=0.2, anchors=(IMAGE, TEXT)).numpy(),
        fused_similarity(IMAGE, TEXT, mu=2.0, beta=0.5, gamma=0.3, eta=0.2).numpy())
    # Two anchor pairs: image anchors (1, 0), (0, 1); text anchors (1, 0), (0, 1). Profiles: image rows
    # (1, 0), (0, 1), (r, r); text rows (1, 0), (1, 0), (0, 1) — normalised, so N(P_I) N(P_T)ᵀ =
    # [[1, 1, 0], [0, 0, 1], [r, r, r]], symmetrised [[1, ½, r/2], [½, 0, (1+r)/2], [r/2, (1+r)/2, r]].
    anchors = (torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    s_c = np.array([[1, 0.5, R / 2], [0.5, 0, (1 + R) / 2], [R / 2, (1 + R) / 2, R]])
    got = fused_similarity(IMAGE, TEXT, mu=1.0, beta=0.0, gamma=0.0, eta=1.0, anchors=anchors).numpy()
    np.testing.assert_allclose(got, s_c, atol=1e-12)
    # S_I and S_T stay the batch's own; η = 0 ignores the anchors
    got = fused_similarity(IMAGE, TEXT, mu=1.0, beta=0.5, gamma=0.5, eta=0.0, anchors=anchors).numpy()
    np.testing.assert_allclose(got, 0.5 * S_I + 0.5 * S_T, atol=1e-12)


def test_dgcpn_refinement_within_a_batch_by_hand():
    # 4 rows: k = ⌈.4·4⌉ = 2, so each row keeps its single largest entry besides itself (the diagonal)
    s = torch.tensor([[1, .6, .8, 0], [.6, 1, .96, .8], [.8, .96, 1, .6], [0, .8, .6, 1]], dtype=torch.float64)
    p = np.array([[0, 0, 1, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0]], dtype=float)
    np.testing.assert_allclose(dgcpn_coherence(s).numpy(), 0.8 * 4 * p @ p.T, atol=1e-12)
    # through fused_similarity: S_I = S_T = s's cosines, β = 1, γ = η = 0, ρ = .3
    feats = torch.tensor([[1, 0], [.6, .8], [.8, .6], [0, 1]], dtype=torch.float64)
    got = fused_similarity(feats, feats, mu=1, beta=1, gamma=0, eta=0, refine="dgcpn", refine_weight=0.3).numpy()
    np.testing.assert_allclose(got, 0.7 * s.numpy() + 0.3 * 3.2 * p @ p.T, atol=1e-12)


def test_jdsh_weighting_with_batch_thresholds_by_hand():
    s = torch.full((8, 8), 0.1, dtype=torch.float64)
    s[0, 1] = s[1, 0] = 4.0                     # the one clearly similar pair: above the 98th percentile
    s[2, 3] = s[3, 2] = -4.0                    # clearly dissimilar pairs: below the 13th
    s[0, 4] = s[4, 0] = s[5, 6] = s[6, 5] = -1.0
    s[1, 4] = s[4, 1] = 0.5                     # middling
    s.fill_diagonal_(9.0)
    off = s.numpy()[~np.eye(8, dtype=bool)]
    mean = off.mean()
    left, right = np.quantile(off, [0.13, 0.98])   # 56 entries: right between .5 and 4, left at .1 (not below it)
    assert 0.5 < right < 4 and -1 < left <= 0.1
    want = s.numpy().copy()
    want[0, 1] = want[1, 0] = mean + (4 - mean) * (1 + 0.2 * np.exp(4 - 4))
    want[2, 3] = want[3, 2] = mean + (-4 - mean) * (1 + 0.1 * np.exp(-(-4 + 4)))
    want[0, 4] = want[4, 0] = want[5, 6] = want[6, 5] = mean + (-1 - mean) * (1 + 0.1 * np.exp(-(-1 + 4)))
    np.testing.assert_allclose(jdsh_weighting(s).numpy(), want, atol=1e-12)


# -- loss terms -------------------------------------------------------------------------------------
def test_loss_terms_by_hand():
    b_i = torch.tensor([[1.0, 1.0], [1.0, -1.0]])     # normalised: (1,1)/√2, (1,-1)/√2
    b_t = torch.tensor([[3.0, 3.0], [-1.0, 1.0]])     # normalised: (1,1)/√2, (-1,1)/√2
    s = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    rec_i, tgt_i = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2)
    rec_t = tgt_t = torch.tensor([[0.3, 0.4], [1.0, 0.0]])
    t = loss_terms(b_i, b_t, s, rec_i, tgt_i, rec_t, tgt_t, LossWeights(intra=0.1, cross=1.0, recon=0.1, pair=0.5))
    # B̂_I B̂_Iᵀ = B̂_T B̂_Tᵀ = I: each off-diagonal misses S by .5 → mean .125, two modalities → .25
    assert t["intra"].item() == pytest.approx(0.25)
    # B̂_I B̂_Tᵀ = [[1, 0], [0, -1]]: squared misses 0, .25, .25, 4 → mean 1.125, and its transpose again
    assert t["cross"].item() == pytest.approx(2.25)
    # image rows miss by 1 and 0 → mean 0.5; text reconstructs exactly
    assert t["recon"].item() == pytest.approx(0.5)
    assert t["pair"].item() == 0.0    # both image rows are empty: no pair counts (next test)
    assert t["total"].item() == pytest.approx(0.1 * 0.25 + 2.25 + 0.1 * 0.5 + 0.5 * 0.0)


def test_pair_term_leaves_out_pairs_with_an_empty_side():
    b_i = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b_t = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 0.0]])   # paired cosines 1, 1, r
    s = torch.eye(3)
    full_i, full_t = torch.ones(3, 2), torch.ones(3, 4)
    pair = lambda f_i, f_t: loss_terms(b_i, b_t, s, f_i, f_i, f_t, f_t)["pair"].item()  # noqa: E731
    assert pair(full_i, full_t) == pytest.approx(-(2 + R) / 3)        # JDSH's mean over every pair
    empty_i, empty_t = full_i.clone(), full_t.clone()
    empty_i[2], empty_t[1] = 0, 0                                     # image 2 and text 1 have no feature
    assert pair(empty_i, full_t) == pytest.approx(-2 / 2)
    assert pair(empty_i, empty_t) == pytest.approx(-1.0)              # only pair 0 is left
    assert pair(torch.zeros(3, 2), full_t) == 0.0                     # no pair left: no pull


def test_reconstruction_error_sums_features_and_averages_rows():
    err = reconstruction_error(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2))
    assert err.item() == pytest.approx((1 + 4 + 0) / 2)


# -- relaxed codes ----------------------------------------------------------------------------------
def test_relaxed_codes_gradient():
    h = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: relaxed_codes(x, 2.5), (h,))
    relaxed_codes(h, 2.5).sum().backward()
    expected = 2.5 * (1 - np.tanh(2.5 * h.detach().numpy()) ** 2)   # d tanh(αh)/dh = α(1 − tanh²(αh))
    np.testing.assert_allclose(h.grad.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_gradcheck_through_autoencoder_and_loss():
    torch.manual_seed(0)
    net = ModalityAutoencoder(6, [5], 8).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: net(v, 1.7), (x,))
    b_i = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    b_t = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    s = cosine_similarity(torch.randn(4, 3, dtype=torch.float64))
    tgt_i, tgt_t = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    total = lambda a, b: loss_terms(a, b, s, a, tgt_i, b, tgt_t, LossWeights(pair=1.0))["total"]  # noqa: E731
    assert torch.autograd.gradcheck(total, (b_i, b_t))


def test_batch_iqr_scale_divides_by_the_interquartile_spread():
    # off-diagonal entries 0, 1, ..., 10 and 100: quartiles (linear) 2.75 and 8.25, so the spread is 5.5 / 1.349,
    # where the standard deviation (27.6) is the one far entry's
    s = torch.full((4, 4), 9.0)
    s[~torch.eye(4, dtype=torch.bool)] = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100])
    assert offdiagonal_iqr_spread(s).item() == pytest.approx(5.5 / 1.3489795)
    # a bulk of one value (ten of twelve entries 0): the quartiles coincide, the floor is a tenth of the std
    s[~torch.eye(4, dtype=torch.bool)] = torch.tensor([0.0] * 10 + [1.0, 5.0])
    assert offdiagonal_iqr_spread(s).item() == pytest.approx(0.1 * torch.tensor([0.0] * 10 + [1.0, 5.0]).std().item())
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(16, 8, generator=g), torch.randn(16, 5, generator=g)
    weights = dict(beta=0.35, gamma=0.35, eta=0.3)
    bracket = fused_similarity(image, text, mu=1.0, scale="fixed", **weights)
    scaled = fused_similarity(image, text, mu=0.5, scale="batch-iqr", **weights)
    torch.testing.assert_close(scaled, 0.5 * bracket / offdiagonal_iqr_spread(bracket))
    with pytest.raises(ValueError, match="scale must be one of"):
        fused_similarity(image, text, mu=0.5, scale="batch-mad", **weights)


def test_alpha_stages_follow_the_run_not_its_epoch_count():
    # 50 or more epochs: one stage per epoch, whatever the batch (DJSRH's √(epoch + 1) exactly)
    assert {alpha_stage(e, 50, b, 39) for e in (0, 7, 49) for b in (0, 20, 38)} == {(0, 50), (7, 50), (49, 50)}
    assert alpha_stage(99, 100, 5, 10) == (99, 100)
    # One epoch of 1,562 steps (200,000 pairs under the step budget): 50 stages of 31-32 steps, ending at the
    # last, where counting epochs would have kept stage 0 (α = 1) throughout
    stages = [alpha_stage(0, 1, b, 1562)[0] for b in range(1562)]
    assert stages[0] == 0 and stages[-1] == 49 and stages == sorted(stages)
    assert {stages.count(k) for k in range(50)} == {31, 32}
    # 13 epochs (20,000 pairs): stage 49 in the last epoch, not 12
    assert alpha_stage(12, 13, 119, 120) == (49, 50) and alpha_stage(6, 13, 60, 120)[0] == 25
    # ... and the trainer's α there is the end of a 50-epoch run's, √50 (per epoch it would be √13)
    assert Trainer(TrainConfig()).alpha(12, 13, 119, 120) == math.sqrt(50)
    assert Trainer(TrainConfig()).alpha(7, 50, 30, 39) == math.sqrt(8)


def test_alpha_schedules():
    assert [alpha_for_epoch(e) for e in (0, 3, 8)] == [1.0, 2.0, 3.0]   # √(epoch+1)
    assert alpha_for_epoch(0, "linear", 5, 9.0) == 1.0 and alpha_for_epoch(4, "linear", 5, 9.0) == 9.0
    assert alpha_for_epoch(2, "constant", 5, 4.0) == 4.0
    # sqrt-progress: α² from 1 to alpha_max² over the run; with 50 epochs and alpha_max² = 50 it is sqrt
    assert [alpha_for_epoch(e, "sqrt-progress", 50, math.sqrt(50)) for e in (0, 3, 49)] == \
        pytest.approx([1.0, 2.0, math.sqrt(50)])
    assert alpha_for_epoch(999, "sqrt-progress", 1000, 5.0) == pytest.approx(5.0)
    with pytest.raises(ModelError, match="alpha_schedule"):
        alpha_for_epoch(0, "cosine")


# -- the model ----------------------------------------------------------------------------------------
def _model(bits: int = 16, **kw) -> CFRHModel:
    torch.manual_seed(0)
    return CFRHModel(ModelSpec(image_dim=12, text_dim=7, bits=bits, image_hidden=[20], text_hidden=[9], **kw))


def test_hash_is_packed_sign_of_the_encoder_after_preparation():
    model = _model(24, image_preprocess="center-l2", text_preprocess="none")
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((50, 12)).astype(np.float32), rng.poisson(1.0, (50, 7)).astype(np.uint8)
    model.set_feature_stats(FeatureStats.of(img), FeatureStats.of(txt))
    codes = model.hash_image(img)
    assert codes.shape == (50, 3) and codes.dtype == np.uint8
    x = torch.from_numpy(img) - torch.from_numpy(img.mean(0))
    with torch.no_grad():
        h = model.image.encoder(x / x.norm(dim=1, keepdim=True)).numpy()
        h_t = model.text.encoder(torch.from_numpy(txt.astype(np.float32))).numpy()
    np.testing.assert_array_equal(codes, pack_codes(h))
    np.testing.assert_array_equal(model.hash_text(txt), pack_codes(h_t))
    assert model.training  # hashing does not leave the model in eval mode
    with pytest.raises(ModelError, match=r"\(N, 12\)"):
        model.hash_image(img[:, :5])


def test_model_spec_rejects_bad_settings():
    with pytest.raises(ModelError, match="multiple of 8"):
        ModelSpec(image_dim=4, text_dim=4, bits=12)
    with pytest.raises(ModelError, match="image_preprocess"):
        ModelSpec(image_dim=4, text_dim=4, bits=16, image_preprocess="zscore")


# -- the [train] table ------------------------------------------------------------------------------
def test_train_config_validation():
    cfg = TrainConfig.from_dict({"epochs": 3, "lr_image": 1, "bits": [8, 16]})
    assert cfg.epochs == 3 and cfg.lr_image == 1.0 and isinstance(cfg.lr_image, float) and cfg.bits == [8, 16]
    with pytest.raises(ConfigError, match="unknown train settings \\['epoch'\\]"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="train.epochs = '3' should be a int"):
        TrainConfig.from_dict({"epochs": "3"})
    with pytest.raises(ConfigError, match="optimizer = 'lbfgs'; choose one of adam, adamw, sgd"):
        TrainConfig.from_dict({"optimizer": "lbfgs"})
    with pytest.raises(ConfigError, match="multiples of 8"):
        TrainConfig.from_dict({"bits": [12]})
    with pytest.raises(ConfigError, match="should be a list"):
        TrainConfig.from_dict({"image_hidden": 512})


def test_center_l2_keeps_empty_rows_empty():
    """A row with no feature (no tag, no vocabulary word) is not moved to −mean by centring: it stays zero, so it
    is like nothing, not like every other empty row."""
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
    mean = torch.tensor([0.5, 1.5, 0.5])
    got = prepare_features(x, "center-l2", mean)
    assert torch.equal(got[0], torch.zeros(3))
    torch.testing.assert_close(got[1], torch.tensor([0.5, 1.5, -0.5]) / math.sqrt(2.75))
    torch.testing.assert_close(got[2], torch.tensor([-0.5, -1.5, 1.5]) / math.sqrt(4.75))
    torch.testing.assert_close(prepare_features(x, "l2", mean)[1], torch.tensor([1.0, 3.0, 0.0]) / math.sqrt(10))


def test_idf_weights_are_scikit_learns_smoothed_idf():
    """Columns non-zero in 4, 1 and 0 of 4 rows: ln(5/5) + 1, ln(5/2) + 1, ln(5/1) + 1 — what scikit-learn's
    TfidfTransformer computes; a column non-zero in every row gets exactly 1."""
    from sklearn.feature_extraction.text import TfidfTransformer

    x = np.array([[1, 2, 0], [3, 0, 0], [1, 0, 0], [2, 0, 0]], dtype=np.float32)
    stats = FeatureStats.of(x)
    assert stats.rows == 4 and stats.nonzero.tolist() == [4, 1, 0]
    w = idf_weights(stats)
    np.testing.assert_allclose(w, [1.0, math.log(2.5) + 1, math.log(5) + 1], rtol=1e-6)
    assert w[0] == 1.0
    np.testing.assert_allclose(w, TfidfTransformer(smooth_idf=True).fit(x).idf_, rtol=1e-6)
    # the same statistics from a tensor
    t = FeatureStats.of(torch.from_numpy(x))
    assert t.nonzero.tolist() == [4, 1, 0] and t.rows == 4
    np.testing.assert_allclose(t.mean, [1.75, 0.5, 0.0])


def test_idf_center_l2_weights_the_centred_columns_and_keeps_empty_rows_empty():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
    mean, weight = torch.tensor([0.5, 1.5, 0.5]), torch.tensor([1.0, 2.0, 3.0])
    got = prepare_features(x, "idf-center-l2", mean, weight)
    assert torch.equal(got[0], torch.zeros(3))
    torch.testing.assert_close(got[1], torch.tensor([0.5, 3.0, -1.5]) / math.sqrt(11.5))
    torch.testing.assert_close(got[2], torch.tensor([-0.5, -3.0, 4.5]) / math.sqrt(29.5))


def test_idf_leaves_dense_features_as_centring_alone_does():
    """Dense features (no column zero in any row: CLIP, LDA, Fourier) get weight 1 everywhere,
    so idf-center-l2 hashes them bit for bit as center-l2 does; sparse ones it changes."""
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((60, 12)).astype(np.float32)
    sparse = (rng.random((60, 7)) < 0.2).astype(np.float32) * rng.poisson(2.0, (60, 7)).astype(np.float32)
    plain, idf = _model(16, image_preprocess="center-l2", text_preprocess="center-l2"), \
        _model(16, image_preprocess="idf-center-l2", text_preprocess="idf-center-l2")
    for model in (plain, idf):
        model.set_feature_stats(FeatureStats.of(dense), FeatureStats.of(sparse))
    assert torch.equal(idf.image_weight, torch.ones(12)) and plain.image_weight is None
    assert torch.equal(idf.prepare_image(torch.from_numpy(dense)), plain.prepare_image(torch.from_numpy(dense)))
    np.testing.assert_array_equal(idf.hash_image(dense), plain.hash_image(dense))
    assert idf.text_weight.min() > 1.0   # every sparse column is zero in some row
    assert not torch.allclose(idf.prepare_text(torch.from_numpy(sparse)), plain.prepare_text(torch.from_numpy(sparse)))
    # the weights are part of the saved state; a model without them (center-l2) has none to load
    assert "text_weight" in idf.state_dict() and "text_weight" not in plain.state_dict()
