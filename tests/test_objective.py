"""InfoNCE and heads against a straightforward float64 reference written from the formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from codir_ds.losses import ProjectionHeads, contrastive_logits, contrastive_stats, info_nce, pooled_mse, token_cosine, token_mse


def reference_info_nce(anchors, candidates, positives, tau, anchor_labels=None, candidate_labels=None):
    """-log(exp(s_pos/tau) / (exp(s_pos/tau) + sum over allowed negatives exp(s_neg/tau))), averaged, by loops."""
    total = 0.0
    for i in range(anchors.shape[0]):
        pos = torch.exp(anchors[i] @ candidates[positives[i]] / tau)
        denominator = pos
        for j in range(candidates.shape[0]):
            if j == positives[i]:
                continue
            if anchor_labels is not None and candidate_labels[j] == anchor_labels[i]:
                continue
            denominator = denominator + torch.exp(anchors[i] @ candidates[j] / tau)
        total = total - torch.log(pos / denominator)
    return total / anchors.shape[0]


def unit_rows(*shape, generator):
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).requires_grad_(True)


@pytest.mark.parametrize("queue_rows", [0, 7, 33])
def test_info_nce_value_and_gradients_match_reference(queue_rows):
    g = torch.Generator().manual_seed(queue_rows + 1)
    batch, dim, tau = 5, 16, 0.07
    anchors = unit_rows(batch, dim, generator=g)
    candidates = unit_rows(batch + queue_rows, dim, generator=g)  # in-batch rows first, then the queue
    positives = torch.arange(batch)

    ours = info_nce(contrastive_logits(anchors, candidates, positives, tau), positives)
    ours_grads = torch.autograd.grad(ours, (anchors, candidates))
    ref = reference_info_nce(anchors, candidates, positives, tau)
    ref_grads = torch.autograd.grad(ref, (anchors, candidates))

    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for mine, theirs in zip(ours_grads, ref_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-10)


def test_empty_queue_single_anchor_has_zero_loss():
    anchors = torch.nn.functional.normalize(torch.randn(1, 8, dtype=torch.float64), dim=-1)
    loss = info_nce(contrastive_logits(anchors, anchors, torch.tensor([0]), 0.07), torch.tensor([0]))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)  # no negatives at all: the positive is certain


def test_label_aware_masking_matches_reference_and_ignores_same_label_negatives():
    g = torch.Generator().manual_seed(3)
    batch, rows, dim, tau = 6, 20, 12, 0.1
    anchors = unit_rows(batch, dim, generator=g)
    candidates = unit_rows(rows, dim, generator=g)
    positives = torch.arange(batch) * 2
    candidate_labels = torch.randint(0, 3, (rows,), generator=g)
    anchor_labels = candidate_labels[positives]

    logits = contrastive_logits(anchors, candidates, positives, tau, anchor_labels, candidate_labels)
    ours = info_nce(logits, positives)
    ref = reference_info_nce(anchors, candidates, positives, tau, anchor_labels, candidate_labels)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for mine, theirs in zip(torch.autograd.grad(ours, (anchors, candidates)), torch.autograd.grad(ref, (anchors, candidates))):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-10)

    # Moving a same-label negative changes nothing; moving a different-label one does.
    same = next(j for j in range(rows) if candidate_labels[j] == anchor_labels[0] and j != positives[0])
    other = next(j for j in range(rows) if candidate_labels[j] != anchor_labels[0])
    for j, should_change in ((same, False), (other, True)):
        moved = candidates.detach().clone()
        moved[j] = anchors[0].detach()
        loss_0 = lambda c: info_nce(contrastive_logits(anchors[:1], c, positives[:1], tau, anchor_labels[:1], candidate_labels), positives[:1])
        changed = not torch.isclose(loss_0(moved), loss_0(candidates.detach()))
        assert changed == should_change


def test_contrastive_stats():
    anchors = torch.eye(3, dtype=torch.float64)
    candidates = torch.cat([torch.eye(3, dtype=torch.float64), -torch.eye(3, dtype=torch.float64)[:1]])
    positives = torch.tensor([0, 1, 2])
    stats = contrastive_stats(contrastive_logits(anchors, candidates, positives, 0.5), positives, 0.5)
    assert stats["top1_accuracy"] == 1.0
    assert stats["positive_similarity"] == pytest.approx(1.0)
    # negatives: each anchor sees 2 orthogonal rows (0) and row 3 (-1 for anchor 0, 0 otherwise)
    assert stats["negative_similarity"] == pytest.approx(-1 / 9)


def test_projection_heads_are_unit_norm_and_sized():
    heads = ProjectionHeads(student_dim=6, teacher_dim=10, projection_dim=4)
    zs, zt = heads.project_student(torch.randn(3, 6)), heads.project_teacher(torch.randn(5, 10))
    assert zs.shape == (3, 4)
    assert zt.shape == (5, 4)
    torch.testing.assert_close(zs.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(zt.norm(dim=-1), torch.ones(5))
    assert math.isclose(heads.teacher.weight.shape[1], 10)


def test_baseline_intermediate_losses_match_their_definitions():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 3 * 8, dtype=torch.float64), torch.randn(5, 3 * 8, dtype=torch.float64)
    expected = sum(
        ((s / s.norm() - t / t.norm()) ** 2).sum() for row_s, row_t in zip(student, teacher) for s, t in zip(row_s.split(8), row_t.split(8))
    ) / (5 * 3)
    assert torch.allclose(pooled_mse(student.unflatten(-1, (3, -1)), teacher.unflatten(-1, (3, -1))).double(), expected, rtol=1e-5)

    states_s, states_t = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    real = [(b, layer, t) for b in range(2) for layer in range(3) for t in range(4) if mask[b, t]]
    mse = sum(((states_s[b, layer, t] - states_t[b, layer, t]) ** 2).mean() for b, layer, t in real) / len(real)
    assert torch.allclose(token_mse(states_s, states_t, mask), mse, rtol=1e-5)
    picked_s = torch.stack([states_s[b, layer, t] for b, layer, t in real])
    picked_t = torch.stack([states_t[b, layer, t] for b, layer, t in real])
    reference = F.cosine_embedding_loss(picked_s, picked_t, torch.ones(len(real)))
    assert torch.allclose(token_cosine(states_s, states_t, mask), reference, rtol=1e-5)
