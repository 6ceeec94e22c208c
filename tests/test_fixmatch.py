"""FixMatch loss against hand-computed values, masking, gradient paths and one step on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from ml_backend.core.config import TrainConfig
from ml_backend.core.fixmatch import fixmatch_loss, fixmatch_step


def _ce(logits: list[float], label: int) -> float:
    """Cross-entropy of one example, by hand."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def test_loss_matches_hand_computation():
    logits_x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    # Weak confidences: softmax(4, 0) = 0.982 (normal), softmax(0, 0) = 0.5, softmax(-1, 3) = 0.982.
    weak = torch.tensor([[4.0, 0.0], [0.0, 0.0], [-1.0, 3.0]])
    strong = torch.tensor([[0.5, 0.0], [1.0, -1.0], [0.2, 0.3]])
    loss, loss_x, loss_u, mask = fixmatch_loss(logits_x, y, weak, strong, 0.95, 2.0)

    expected_x = (_ce([2.0, 0.0], 0) + _ce([0.0, 1.0], 1)) / 2
    expected_u = (_ce([0.5, 0.0], 0) + 0.0 + _ce([0.2, 0.3], 1)) / 3
    assert mask.tolist() == [1.0, 0.0, 1.0]
    assert loss_x.item() == pytest.approx(expected_x, rel=1e-6)
    assert loss_u.item() == pytest.approx(expected_u, rel=1e-6)
    assert loss.item() == pytest.approx(expected_x + 2.0 * expected_u, rel=1e-6)


def test_nothing_confident_means_empty_mask_and_zero_unlabelled_loss():
    weak = torch.tensor([[0.3, 0.0], [0.0, 0.1]])
    strong = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    loss, loss_x, loss_u, mask = fixmatch_loss(
        torch.zeros(1, 2), torch.tensor([1]), weak, strong, 0.95, 1.0)
    assert mask.sum() == 0 and loss_u.item() == 0.0
    assert loss.item() == pytest.approx(loss_x.item())


def test_gradients_flow_through_strong_view_only():
    logits_x = torch.zeros(2, 2, requires_grad=True)
    weak = torch.tensor([[5.0, 0.0], [0.0, 5.0]], requires_grad=True)
    strong = torch.zeros(2, 2, requires_grad=True)
    loss, *_ = fixmatch_loss(logits_x, torch.tensor([0, 1]), weak, strong, 0.9, 1.0)
    loss.backward()
    assert weak.grad is None
    assert strong.grad is not None and strong.grad.abs().sum() > 0
    assert logits_x.grad is not None and logits_x.grad.abs().sum() > 0


def test_no_unlabelled_images_is_supervised_only():
    loss, loss_x, loss_u, mask = fixmatch_loss(
        torch.zeros(2, 2), torch.tensor([0, 1]), torch.zeros(0, 2), torch.zeros(0, 2), 0.95, 1.0)
    assert mask.numel() == 0 and loss_u.item() == 0.0 and loss.item() == loss_x.item()


class _Tiny(nn.Module):
    """Mean-pooled pixels -> linear -> 2 logits, with a BatchNorm to exercise train mode."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)
        self.fc = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x.mean(dim=(2, 3))))


def _step_inputs(n_u: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    u = torch.randn(n_u, 3, 8, 8, generator=g)
    return x, torch.tensor([0, 1, 0, 1]), u, u + 0.1


@pytest.mark.parametrize("n_u", [0, 6])
def test_step_updates_weights_and_reports_stats(n_u):
    torch.manual_seed(0)
    model = _Tiny(3)
    model.eval()
    before = model.fc.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = fixmatch_step(model, *_step_inputs(n_u), opt, TrainConfig(threshold=0.0))
    assert model.training
    assert not torch.equal(model.fc.weight, before)
    assert stats.lr == 0.1 and math.isfinite(stats.loss)
    assert stats.loss == pytest.approx(stats.loss_x + stats.loss_u, rel=1e-5)
    # threshold 0: every unlabelled image is masked in.
    assert stats.mask_rate == (1.0 if n_u else 0.0)
    assert 0.0 <= stats.pseudo_anomaly_rate <= 1.0


def test_step_with_high_threshold_masks_everything_out():
    torch.manual_seed(0)
    model = _Tiny(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = fixmatch_step(model, *_step_inputs(6), opt, TrainConfig(threshold=1.0))
    assert stats.mask_rate == 0.0 and stats.loss_u == 0.0 and stats.pseudo_anomaly_rate == 0.0


def test_distribution_alignment_pulls_the_pseudo_labels_to_the_target_share():
    from ml_backend.core.fixmatch import DistributionAlignment

    align = DistributionAlignment([0.99, 0.01], momentum=0.0)
    probs = torch.tensor([[0.8, 0.2]] * 9 + [[0.02, 0.98]])  # mean anomaly share 0.278
    aligned = align(probs)
    torch.testing.assert_close(aligned.sum(1), torch.ones(10))
    assert aligned[:9, 1].max() < 0.01  # the doubtful ones are no longer near-anomalies
    assert aligned[9, 1] < probs[9, 1] and aligned[9].argmax() == 1  # the sure one stays
    # A batch whose mean already is the target passes through unchanged.
    balanced = DistributionAlignment([0.5, 0.5], momentum=0.0)
    same = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    torch.testing.assert_close(balanced(same), same)


def test_distribution_alignment_changes_the_mask_through_the_loss():
    from ml_backend.core.fixmatch import DistributionAlignment

    logits_x, y = torch.zeros(2, 2), torch.tensor([0, 1])
    weak = torch.log(torch.tensor([[0.04, 0.96]] * 4 + [[0.97, 0.03]] * 4))
    strong = torch.zeros(8, 2)
    *_, plain = fixmatch_loss(logits_x, y, weak, strong, 0.95, 1.0)
    align = DistributionAlignment([0.99, 0.01], momentum=0.0)
    *_, aligned = fixmatch_loss(logits_x, y, weak, strong, 0.95, 1.0, align)
    assert plain.tolist() == [1.0] * 4 + [1.0] * 4
    assert aligned[:4].sum() < 4  # half the batch "anomalous" against a 1 % prior: doubted
    assert aligned[4:].tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="positive target"):
        DistributionAlignment([1.0, 0.0])


def test_the_most_anomalous_share_of_a_batch_gets_no_normal_pseudo_label():
    # Ten unlabelled images, all confidently "normal" except the last, a confident anomaly;
    # their anomaly logit rises with the index, so images 8 and 9 are the top fifth.
    margin = torch.tensor([-9.0, -8.5, -8.0, -7.5, -7.0, -6.5, -6.0, -5.5, -5.0, 9.0])
    weak = torch.stack([torch.zeros(10), margin], dim=1)
    strong = torch.zeros(10, 2)
    logits_x, y = torch.zeros(2, 2), torch.tensor([0, 1])
    *_, plain = fixmatch_loss(logits_x, y, weak, strong, 0.95, 1.0)
    *_, kept = fixmatch_loss(logits_x, y, weak, strong, 0.95, 1.0, protect_top_share=0.2)
    assert plain.tolist() == [1.0] * 10
    # Image 8 ("normal", in the top fifth) drops out; image 9's anomaly pseudo-label stays.
    assert kept.tolist() == [1.0] * 8 + [0.0, 1.0]
    with pytest.raises(ValueError, match="protect_top_share"):
        TrainConfig(protect_top_share=1.0)


def test_anomaly_pseudo_labels_can_need_less_confidence_than_normal_ones():
    # Weak-view anomaly probabilities 0.02, 0.10, 0.85, 0.97: confidences 0.98, 0.90, 0.85, 0.97.
    p = torch.tensor([0.02, 0.10, 0.85, 0.97])
    weak = torch.stack([torch.zeros(4), torch.log(p / (1 - p))], dim=1)
    strong = torch.zeros(4, 2)
    logits_x, y = torch.zeros(2, 2), torch.tensor([0, 1])
    *_, same = fixmatch_loss(logits_x, y, weak, strong, 0.95, 1.0)
    *_, classwise = fixmatch_loss(logits_x, y, weak, strong, 0.95, 1.0, anomaly_threshold=0.8)
    assert same.tolist() == [1.0, 0.0, 0.0, 1.0]
    # The 0.85 anomaly now teaches; the 0.90 "normal" still needs 0.95.
    assert classwise.tolist() == [1.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="anomaly_threshold"):
        TrainConfig(anomaly_threshold=0.4)


def test_the_teachers_pseudo_labels_override_the_models_where_it_decides():
    # Weak views: a confident "normal", a confident "anomaly", two unsure images.
    p = torch.tensor([0.01, 0.99, 0.5, 0.6])
    weak = torch.stack([torch.zeros(4), torch.log(p / (1 - p))], dim=1)
    strong = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]]))
    logits_x, y = torch.zeros(2, 2), torch.tensor([0, 1])
    teacher = torch.tensor([1, -1, 0, -1])  # "anomaly", undecided, "normal", undecided
    _, _, loss_u, mask = fixmatch_loss(logits_x, y, weak, strong, 0.95, 1.0, teacher=teacher)
    # Image 0 is taught "anomaly", 2 "normal" (both in despite the model); 1 keeps its own
    # confident "anomaly"; 3 stays out (0.6 < 0.95).
    assert mask.tolist() == [1.0, 1.0, 1.0, 0.0]
    expected = -(math.log(0.1) + math.log(0.8) + math.log(0.7)) / 4
    assert loss_u.item() == pytest.approx(expected, rel=1e-5)


def test_the_step_counts_the_teachers_pseudo_labels_in_its_statistics():
    torch.manual_seed(0)
    model = _Tiny(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher = torch.tensor([1, 1, 1, 0, 0, -1])
    stats = fixmatch_step(model, *_step_inputs(6), opt, TrainConfig(threshold=1.0),
                          teacher=teacher)
    # Threshold 1: only the teacher's five images are in, three of them "anomaly".
    assert stats.mask_rate == pytest.approx(5 / 6)
    assert stats.pseudo_anomaly_rate == pytest.approx(3 / 5)


def test_teacher_pseudo_labels_take_the_top_and_bottom_shares_of_the_ranking():
    from ml_backend.core.fixmatch import teacher_pseudo_labels

    ranking = np.array([0.3, 2.0, -1.0, 0.9, -0.5, 1.5, 0.0, -2.0, 0.1, 0.2])
    labels = teacher_pseudo_labels(ranking, 0.2, 0.3)
    assert labels.tolist() == [-1, 1, 0, -1, 0, 1, -1, 0, -1, -1]
    assert (teacher_pseudo_labels(ranking, 0.0, 0.0) == -1).all()
    assert teacher_pseudo_labels(ranking, 0.05, 0.0).sum() == -10  # 0.5 image rounds to none
    with pytest.raises(ValueError, match="NaN"):
        teacher_pseudo_labels(np.array([0.0, np.nan]), 0.5, 0.0)


@pytest.mark.parametrize(("top", "bottom", "message"), [
    (1.0, 0.0, "teacher_top_share"), (0.0, -0.1, "teacher_normal_share"),
    (0.5, 0.6, "at most 1")])
def test_teacher_shares_are_validated(top, bottom, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(teacher_top_share=top, teacher_normal_share=bottom)
    assert not TrainConfig().uses_teacher
    assert TrainConfig(teacher_normal_share=0.5).uses_teacher
