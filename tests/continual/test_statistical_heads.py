"""The LDA and RanPAC heads on hand-made statistics, against their closed forms computed in one go."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf
from torch import nn

from sdlora_peft.continual.heads import LDAHead, RanPACHead, make_head
from sdlora_peft.continual.heads.lda import ledoit_wolf
from sdlora_peft.continual.heads.ranpac import RIDGES


def blobs(classes: list[int], per_class: int = 30, dims: int = 6, seed: int = 0, spread: float = 3.0):
    """Gaussian classes with a shared, non-spherical covariance."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dims, dims, generator=generator, dtype=torch.float64)
    centres = {c: spread * torch.randn(dims, generator=generator, dtype=torch.float64) for c in classes}
    noise = [torch.randn(per_class, dims, generator=generator, dtype=torch.float64) @ mixing for _ in classes]
    features = torch.cat([centres[c] + n for c, n in zip(classes, noise)])
    labels = torch.tensor([c for c in classes for _ in range(per_class)])
    return features, labels


def centred_by_class(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    centred = features.clone()
    for label in labels.unique():
        centred[labels == label] -= features[labels == label].mean(0)
    return centred


@given(st.integers(5, 60), st.integers(2, 12), st.integers(0, 1000))
def test_ledoit_wolf_from_sums_equals_sklearn_on_the_samples(count, dims, seed):
    samples = torch.from_numpy(np.random.default_rng(seed).standard_normal((count, dims)) * np.arange(1, dims + 1))
    covariance, shrinkage = ledoit_wolf(samples.T @ samples, samples.square().sum(1).square().sum(), count)
    expected, expected_shrinkage = sklearn_ledoit_wolf(samples.numpy(), assume_centered=True)
    np.testing.assert_allclose(covariance.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert shrinkage == pytest.approx(expected_shrinkage, rel=1e-9, abs=1e-12)


def test_lda_scores_equal_the_closed_form_over_all_classes_at_once():
    features, labels = blobs([0, 1, 2, 3, 4])
    head = LDAHead()
    head.end_task(nn.Identity(), features[labels < 2], labels[labels < 2], [0, 1])
    head.end_task(nn.Identity(), features[labels >= 2], labels[labels >= 2], [2, 3, 4])

    centred = centred_by_class(features, labels)
    covariance = torch.from_numpy(sklearn_ledoit_wolf(centred.numpy(), assume_centered=True)[0])
    means = torch.stack([features[labels == c].mean(0) for c in range(5)])
    precision_means = torch.linalg.solve(covariance, means.T)
    expected = features @ precision_means - 0.5 * (means * precision_means.T).sum(1)

    scores = head.scores(features, torch.zeros(len(labels), 7))
    torch.testing.assert_close(scores[:, :5], expected.float(), rtol=1e-5, atol=1e-4)
    assert torch.isinf(scores[:, 5:]).all()  # classes never seen score -inf
    assert (scores.argmax(1) == labels).float().mean() > 0.9


def test_lda_does_not_depend_on_the_order_of_the_classes():
    features, labels = blobs([0, 1, 2, 3], seed=3)
    forward, backward = LDAHead(), LDAHead()
    for classes in ([0, 1], [2, 3]):
        mask = torch.isin(labels, torch.tensor(classes))
        forward.end_task(nn.Identity(), features[mask], labels[mask], classes)
    for classes in ([3], [1, 2], [0]):
        mask = torch.isin(labels, torch.tensor(classes))
        backward.end_task(nn.Identity(), features[mask], labels[mask], classes)
    logits = torch.zeros(len(labels), 4)
    torch.testing.assert_close(forward.scores(features, logits), backward.scores(features, logits))


def test_lda_with_fixed_shrinkage_and_its_state_round_trip():
    features, labels = blobs([0, 1, 2])
    head = LDAHead(shrinkage=0.25)
    head.end_task(nn.Identity(), features, labels, [0, 1, 2])
    sample_covariance = centred_by_class(features, labels).T @ centred_by_class(features, labels) / len(labels)
    target = (
        sample_covariance.trace() / len(sample_covariance) * torch.eye(len(sample_covariance), dtype=torch.float64)
    )
    torch.testing.assert_close(head.covariance(), 0.75 * sample_covariance + 0.25 * target)

    restored = LDAHead(shrinkage=0.25)
    restored.load_state(*head.state())
    logits = torch.zeros(len(labels), 3)
    assert torch.equal(restored.scores(features, logits), head.scores(features, logits))


def test_lda_sdc_moves_the_means_with_the_drift():
    features, labels = blobs([0, 1])
    head = make_head("lda-sdc")
    head.end_task(nn.Identity(), features, labels, [0, 1])
    shift = torch.full((features.shape[1],), 5.0, dtype=torch.float64)
    head.compensate_drift(features, features + shift)  # every feature moves by the same vector
    torch.testing.assert_close(head.means[0], features[labels == 0].mean(0) + shift)
    moved = head.scores(features + shift, torch.zeros(len(labels), 2))
    assert (moved.argmax(1) == labels).float().mean() > 0.9


def closed_form_ranpac(head: RanPACHead, features: torch.Tensor, labels: torch.Tensor, classes: list[int]):
    """relu(x W) (G + lambda I)^-1 C from all samples at once, with the head's own W and lambda."""
    hidden = torch.relu(features.float() @ head._projection).double()
    targets = (labels.unsqueeze(1) == torch.tensor(classes)).double()
    gram = hidden.T @ hidden + float(head.ridge) * torch.eye(hidden.shape[1], dtype=torch.float64)
    return hidden @ torch.linalg.solve(gram, hidden.T @ targets)


def test_ranpac_equals_ridge_regression_on_all_samples_seen():
    features, labels = blobs([0, 1, 2, 3], dims=5)
    head = RanPACHead(projection_dim=64, seed=7)
    head.end_task(nn.Identity(), features[labels < 2], labels[labels < 2], [0, 1])
    head.end_task(nn.Identity(), features[labels >= 2], labels[labels >= 2], [2, 3])
    assert float(head.ridge) in RIDGES
    scores = head.scores(features, torch.zeros(len(labels), 6))
    expected = closed_form_ranpac(head, features, labels, [0, 1, 2, 3])
    torch.testing.assert_close(scores[:, :4], expected.float(), rtol=1e-4, atol=1e-5)
    assert torch.isinf(scores[:, 4:]).all()
    assert (scores.argmax(1) == labels).float().mean() > 0.9


def test_ranpac_ridge_is_the_best_held_out_fit_of_the_task():
    features, labels = blobs([0, 1, 2], per_class=40, dims=5, seed=2)
    head = RanPACHead(projection_dim=32, seed=1)
    head.end_task(nn.Identity(), features, labels, [0, 1, 2])
    hidden = head.project(features).double()
    targets = (labels.unsqueeze(1) == torch.tensor([0, 1, 2])).double()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1 + 3))
    fit, held = order[: int(0.8 * len(order))], order[int(0.8 * len(order)) :]

    def held_out_error(ridge: float) -> float:
        gram = hidden[fit].T @ hidden[fit] + ridge * torch.eye(32, dtype=torch.float64)
        weights = torch.linalg.solve(gram, hidden[fit].T @ targets[fit])
        return float((hidden[held] @ weights - targets[held]).square().mean())

    usable = [ridge for ridge in RIDGES if ridge >= 1e-8 * float(head.gram.trace())]  # solvable in float64
    assert float(head.ridge) in usable
    assert held_out_error(float(head.ridge)) <= min(held_out_error(ridge) for ridge in usable) * (1 + 1e-6)


def test_ranpac_ridge_minimises_the_held_out_error_summed_over_the_tasks():
    """A task's own choice is noisy with few samples; the head takes the ridge best over every task so far."""
    features, labels = blobs([0, 1, 2, 3], per_class=10, dims=5, seed=4)
    head = RanPACHead(projection_dim=32, seed=1)
    first, second = labels < 2, labels >= 2
    head.end_task(nn.Identity(), features[first], labels[first], [0, 1])
    after_first = head.ridge_errors.clone()
    assert (after_first > 0).all()
    head.end_task(nn.Identity(), features[second], labels[second], [2, 3])
    second_errors = head._ridge_errors(head.project(features[second]), labels[second])  # end_task's own split
    torch.testing.assert_close(head.ridge_errors, after_first + second_errors)
    usable = torch.tensor([ridge >= 1e-8 * float(head.gram.trace()) for ridge in RIDGES])
    assert float(head.ridge) == RIDGES[int(torch.where(usable, after_first + second_errors, torch.inf).argmin())]


def test_ranpac_state_round_trip_redraws_the_same_projection():
    features, labels = blobs([0, 1], dims=4)
    head = RanPACHead(projection_dim=16, seed=3)
    head.end_task(nn.Identity(), features, labels, [0, 1])
    restored = RanPACHead(projection_dim=16, seed=3)
    restored.load_state(*head.state())
    logits = torch.zeros(len(labels), 2)
    assert torch.equal(restored.scores(features, logits), head.scores(features, logits))
