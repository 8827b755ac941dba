"""Losses against hand-computed references and torch's own implementations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import cosine_loss, dist_loss, kd_loss, soft_cross_entropy, teacher_confidence
from trainer.terms import LossWeights, total_loss


def test_kd_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    temp = 2.0
    total = 0.0
    for i in range(2):
        zs = [math.exp(v / temp) for v in s[i].tolist()]
        zt = [math.exp(v / temp) for v in t[i].tolist()]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    expected = total / 2 * temp ** 2                      # mean over samples, times T^2
    assert kd_loss(s, t, temp).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_matches_torch_kl_div_batchmean(temp):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g) * 3
    ref = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), reduction="batchmean",
                   log_target=True) * temp ** 2
    torch.testing.assert_close(kd_loss(s, t, temp), ref)
    assert kd_loss(t, t, temp).item() == pytest.approx(0, abs=1e-6)
    # the reduction is per sample: doubling the batch with a copy leaves the value unchanged
    torch.testing.assert_close(kd_loss(torch.cat([s, s]), torch.cat([t, t]), temp), ref)


def test_soft_cross_entropy_equals_torch_for_hard_labels():
    g = torch.Generator().manual_seed(1)
    s, y = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    q = F.one_hot(y, 5).float()
    torch.testing.assert_close(soft_cross_entropy(s, q, 0.1), F.cross_entropy(s, y, label_smoothing=0.1))
    mixed = 0.7 * q + 0.3 * F.one_hot((y + 1) % 5, 5).float()
    ref = 0.7 * F.cross_entropy(s, y, reduction="none") + 0.3 * F.cross_entropy(s, (y + 1) % 5, reduction="none")
    torch.testing.assert_close(soft_cross_entropy(s, mixed), ref.mean())


def test_dist_is_zero_for_matching_and_positive_otherwise():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(12, 6, generator=g)
    assert dist_loss(t, t, 1.0).item() == pytest.approx(0, abs=1e-5)
    assert dist_loss(-t, t, 1.0).item() > 1.0
    # DIST is invariant to a per-sample shift of logits (softmax) and measures relations only
    assert dist_loss(t + 5.0, t, 1.0).item() == pytest.approx(0, abs=1e-5)


def test_cosine_and_total():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert cosine_loss(a, a).item() == pytest.approx(0)
    assert cosine_loss(a, -a).item() == pytest.approx(2)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    q = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    w = LossWeights(ce=0.5, kd=2.0, dist=0.0, pooled=0.0, patches=0.0, temperature=3.0, label_smoothing=0.0,
                    kd_gate="none")
    total, parts = total_loss(w, s, q, torch.ones(4, dtype=torch.bool), t)
    assert set(parts) == {"ce", "kd"}
    torch.testing.assert_close(total, 0.5 * soft_cross_entropy(s, q) + 2.0 * kd_loss(s, t, 3.0))


def test_unlabelled_samples_send_no_cross_entropy_gradient():
    """CE averages over labelled samples only; an unlabelled row gets gradient from the teacher terms alone."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 4, generator=g, requires_grad=True)
    t = torch.randn(6, 4, generator=g)
    labelled = torch.tensor([True, True, False, True, False, False])
    q = F.one_hot(torch.tensor([0, 3, 0, 2, 0, 0]), 4).float() * labelled[:, None]
    ce = soft_cross_entropy(s, q, 0.1, labelled)
    ce.backward()
    assert (s.grad[~labelled] == 0).all() and (s.grad[labelled] != 0).any()
    torch.testing.assert_close(ce, soft_cross_entropy(s[labelled], q[labelled], 0.1))   # mean over labelled ones
    s.grad = None
    none = soft_cross_entropy(s, torch.zeros(6, 4), 0.1, torch.zeros(6, dtype=torch.bool))
    assert none.item() == 0
    w = LossWeights(ce=1.0, kd=1.0, pooled=0.0, patches=0.0, label_smoothing=0.1, kd_gate="none")
    total, parts = total_loss(w, s, q, labelled, t)
    total.backward()
    kd_grad = torch.autograd.grad(kd_loss(s, t, w.temperature), s)[0]
    torch.testing.assert_close(s.grad[~labelled], kd_grad[~labelled])


def test_kd_confidence_weights_each_view_by_what_the_teacher_gives_its_label():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g) * 2
    q = torch.tensor([[1.0, 0, 0, 0], [0, 0.7, 0.3, 0], [0, 0, 0, 1.0], [0, 0, 0, 0], [0, 0, 0, 0]])
    labelled = torch.tensor([True, True, True, False, False])
    p = F.softmax(t, -1)
    want = torch.stack([p[0, 0], 0.7 * p[1, 1] + 0.3 * p[1, 2], p[2, 3], p[3].max(), p[4].max()])
    torch.testing.assert_close(teacher_confidence(t, q, labelled), want)
    w = LossWeights(ce=0.0, kd=1.0, pooled=0.0, patches=0.0, kd_gate="confidence", temperature=2.0)
    _, parts = total_loss(w, s, q, labelled, t)
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction="none", log_target=True).sum(-1)
    assert parts["kd"].item() == pytest.approx(float((kl * want).mean() * 4), rel=1e-5)     # a weighted mean over all


def test_kd_gate_drops_labelled_views_the_teacher_gets_wrong():
    s = torch.zeros(4, 3)
    t = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]])       # teacher top class: 0, 1, 0, 2
    q = F.one_hot(torch.tensor([0, 0, 0, 0]), 3).float()
    labelled = torch.tensor([True, True, False, True])
    w = LossWeights(ce=0.0, kd=1.0, pooled=0.0, patches=0.0, kd_gate="correct")
    _, parts = total_loss(w, s, q * labelled[:, None], labelled, t)
    keep = torch.tensor([True, False, True, False])                              # right, wrong, unlabelled, wrong
    assert parts["kd"].item() == pytest.approx(kd_loss(s[keep], t[keep], w.temperature).item())
