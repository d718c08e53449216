"""InfoNCE and heads against a straightforward float64 reference written from the formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from codir_ds.method.losses import (
    CONTRASTIVE_STATS,
    contrastive_logits,
    contrastive_stats,
    gradient_norm_ratio,
    info_nce,
    pooled_mse,
    token_cosine,
    token_mse,
)
from codir_ds.method.memory_bank import MemoryBank
from codir_ds.method.momentum_memory import MomentumMemory
from codir_ds.method.negatives import NegativeQueue
from codir_ds.method.objective import CodirObjective, ProjectionHeads


def reference_info_nce(anchors, candidates, positives, tau, anchor_labels=None, candidate_labels=None, anchor_ids=None, candidate_ids=None):
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
            if anchor_ids is not None and candidate_ids[j] == anchor_ids[i]:
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


def test_objective_contrasts_each_step_with_the_rows_of_earlier_steps():
    """Queue mode, one rank: step 1 sees its own batch only; step 2 its batch then step 1's rows, the same-label
    ones masked when labels are given, the anchor's own example masked by id; the loss equals the loop reference."""
    torch.manual_seed(0)
    objective = CodirObjective(student_dim=6, teacher_dim=10, projection_dim=4, contrastive_temperature=0.2, queue=NegativeQueue(8, 10)).double()
    objective.queue.features = objective.queue.features.double()
    project_s, project_t = objective.heads.project_student, objective.heads.project_teacher
    s1, t1, s2, t2 = (torch.randn(n, d, dtype=torch.float64) for n, d in ((3, 6), (3, 10), (2, 6), (2, 10)))
    labels1, labels2, ids1, ids2 = torch.tensor([0, 1, 1]), torch.tensor([1, 0]), torch.tensor([10, 11, 12]), torch.tensor([10, 13])

    loss1, stats1 = objective(s1, t1, labels1, ids1)
    assert objective.queue.filled == 0  # step 1's rows wait for its backward
    torch.testing.assert_close(loss1, reference_info_nce(project_s(s1), project_t(t1), torch.arange(3), 0.2, labels1, labels1))
    loss2, _ = objective(s2, t2, labels2, ids2)
    assert objective.queue.filled == 3
    torch.testing.assert_close(objective.queue.stored()[0], t1)

    # anchor 0 (id 10) also meets its own example, of another label, among step 1's rows: masked by its id
    candidates, candidate_labels, candidate_ids = project_t(torch.cat([t2, t1])), torch.cat([labels2, labels1]), torch.cat([ids2, ids1])
    reference = reference_info_nce(project_s(s2), candidates, torch.arange(2), 0.2, labels2, candidate_labels, ids2, candidate_ids)
    torch.testing.assert_close(loss2, reference)
    assert not torch.isclose(reference, reference_info_nce(project_s(s2), candidates, torch.arange(2), 0.2, labels2, candidate_labels))
    assert set(stats1) == set(CONTRASTIVE_STATS)
    assert objective.negatives_state()["queue"]["filled"] == 5  # a checkpoint holds step 2's rows too


def test_objective_with_a_bank_draws_negatives_of_another_label():
    torch.manual_seed(0)
    features, labels = torch.randn(12, 10), torch.tensor([0, 1] * 6)
    bank = MemoryBank(features, torch.zeros(12, 2), labels, regression=False)
    sampler = torch.Generator().manual_seed(3)
    objective = CodirObjective(6, 10, 4, 0.1, bank=bank, num_negatives=5, sampler=sampler)
    ids = torch.tensor([0, 3])
    anchors = torch.randn(2, 6)
    loss, stats = objective(anchors, features[ids], labels[ids], ids)

    rows = bank.sample_negatives(ids, labels[ids], 5, torch.Generator().manual_seed(3))
    assert (labels[rows] != labels[ids].unsqueeze(1)).all()
    a, p, n = (
        objective.heads.project_student(anchors),
        objective.heads.project_teacher(features[ids]),
        objective.heads.project_teacher(features[rows]),
    )
    logits = torch.cat([(a * p).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", a, n)], dim=1) / 0.1
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(2, dtype=torch.long)))
    assert objective.negatives_state()["sampler"].equal(sampler.get_state())


def crd_reference_step(memory_s, memory_t, z, v1, v2, y, idx, tau, momentum, n):
    """One step of CRD's ContrastMemory + ContrastLoss, written out as RepDistiller's crd/ does it (bmm, index_select,
    Z from the first batch, momentum update of the rows of `y`); returns the loss and updates the memories in place."""
    batch, k1, dim = len(v1), idx.shape[1], v1.shape[1]
    out_v2 = torch.exp(torch.bmm(memory_s.index_select(0, idx.view(-1)).view(batch, k1, dim), v2.view(batch, dim, 1)) / tau)
    out_v1 = torch.exp(torch.bmm(memory_t.index_select(0, idx.view(-1)).view(batch, k1, dim), v1.view(batch, dim, 1)) / tau)
    if z[0] < 0:
        z[0], z[1] = out_v1.mean().item() * n, out_v2.mean().item() * n
    out_v1, out_v2 = out_v1 / z[0], out_v2 / z[1]

    def contrast_loss(x):
        m, pn = x.size(1) - 1, 1 / n
        log_d1 = torch.div(x.select(1, 0), x.select(1, 0) + m * pn + 1e-7).log()
        p_neg = x.narrow(1, 1, m)
        log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg + m * pn + 1e-7).log()
        return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / batch

    loss = contrast_loss(out_v1) + contrast_loss(out_v2)
    with torch.no_grad():
        for memory, v in ((memory_s, v1), (memory_t, v2)):
            position = memory.index_select(0, y) * momentum + v * (1 - momentum)
            memory.index_copy_(0, y, position / position.pow(2).sum(1, keepdim=True).pow(0.5))
    return loss.squeeze()


def test_crd_nce_objective_matches_crd_written_out_over_two_steps():
    torch.manual_seed(0)
    features, labels = torch.randn(12, 10), torch.tensor([0, 1, 2] * 4)
    bank = MemoryBank(features, torch.zeros(12, 3), labels, regression=False)
    memory = MomentumMemory(12, 4, 0.1, momentum=0.5)
    objective = CodirObjective(6, 10, 4, 0.1, bank=bank, num_negatives=5, sampler=torch.Generator().manual_seed(3), memory=memory)
    memory_s, memory_t, z = memory.student_rows.clone(), memory.teacher_rows.clone(), [-1.0, -1.0]
    replay = torch.Generator().manual_seed(3)
    for ids in (torch.tensor([0, 3]), torch.tensor([3, 7])):  # example 3 again: its rows moved at step 1
        anchors = torch.randn(2, 6)
        loss, stats = objective(anchors, features[ids], labels[ids], ids)
        rows = bank.sample_negatives(ids, labels[ids], 5, replay)
        v1, v2 = objective.heads.project_student(anchors), objective.heads.project_teacher(features[ids])
        reference = crd_reference_step(memory_s, memory_t, z, v1, v2, ids, torch.cat([ids[:, None], rows], 1), 0.1, 0.5, 12)
        torch.testing.assert_close(loss, reference)
        torch.testing.assert_close(memory.student_rows, memory_s)
        torch.testing.assert_close(memory.teacher_rows, memory_t)
        assert memory.normalisers.tolist() == pytest.approx(z)  # fixed at the first step
        assert set(stats) == set(CONTRASTIVE_STATS)
    loss.backward()  # gradients reach both heads: the student's through its scores, the teacher's through its own
    assert objective.heads.student.weight.grad.abs().sum() > 0
    assert objective.heads.teacher.weight.grad.abs().sum() > 0


def test_gradient_norm_ratio_is_the_ratio_of_the_two_gradients_norms_and_keeps_the_graph():
    w, v = torch.tensor([1.0, -2.0, 2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    term, rest = (w**2).sum(), 3 * w.sum() + 4 * v.sum()  # gradients (2w, 0) and (3, 3, 3, 4)
    ratio = gradient_norm_ratio(term, rest, [w, v])
    assert ratio.item() == pytest.approx(math.sqrt(4 * 9) / math.sqrt(27 + 16))
    (term + rest).backward()  # the graph is still there for the step's own backward
    assert w.grad.tolist() == [5.0, -1.0, 7.0]
