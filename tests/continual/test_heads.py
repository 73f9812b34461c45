"""Heads and the masked loss on small real tensors and a tiny real model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdlora_peft.continual import zoo
from sdlora_peft.continual.heads import (
    AlignedHead,
    ClassMeanHead,
    CosineClassifier,
    classifier_linear,
    classifier_path,
    make_head,
)
from sdlora_peft.continual.train import masked_cross_entropy


def test_masked_loss_gives_old_classes_no_gradient():
    head = nn.Linear(4, 6)
    features = torch.randn(8, 4)
    loss = masked_cross_entropy(head(features), torch.tensor([2, 3] * 4), torch.tensor([2, 3]))
    loss.backward()
    rows_with_gradient = head.weight.grad.abs().sum(dim=1) > 0
    assert rows_with_gradient.tolist() == [False, False, True, True, False, False]


def clusters(classes: list[int], per_class: int = 40, dims: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = {c: 4 * torch.randn(dims, generator=generator) for c in classes}
    features = torch.cat([centres[c] + torch.randn(per_class, dims, generator=generator) for c in classes])
    labels = torch.tensor([c for c in classes for _ in range(per_class)])
    return features, labels


def test_class_mean_head_scores_by_nearest_mean():
    head = ClassMeanHead()
    features, labels = clusters([0, 1, 2])
    head.end_task(nn.Identity(), features, labels, [0, 1, 2])
    scores = head.scores(features, torch.zeros(len(labels), 5))
    assert (scores.argmax(dim=1) == labels).float().mean() > 0.95
    assert torch.isinf(scores[:, 3:]).all()  # classes never seen score -inf
    assert head.stored_statistics() == {"class_means": 3, "floats_per_class": 8}


def test_aligned_head_retrains_the_classifier_on_sampled_features():
    model, _, _ = zoo.tiny_model("image", num_labels=4)
    linear = classifier_linear(model)
    head = AlignedHead(samples_per_class=64, epochs=10, lr=0.05)
    first, first_labels = clusters([0, 1], dims=linear.in_features)
    second, second_labels = clusters([2, 3], dims=linear.in_features, seed=1)
    head.end_task(model, first, first_labels, [0, 1])
    head.end_task(model, second, second_labels, [2, 3])  # task 1's classes come back from their Gaussians alone
    features, labels = torch.cat([first, second]), torch.cat([first_labels, second_labels])
    with torch.no_grad():
        accuracy = (linear(features).argmax(dim=1) == labels).float().mean()
    assert accuracy > 0.9
    dims = linear.in_features
    assert head.stored_statistics() == {"class_means": 4, "class_covariances": 4, "floats_per_class": dims + dims**2}


def test_cosine_head_replaces_the_classifier_and_ignores_feature_scale():
    model, _, _ = zoo.tiny_model("image", num_labels=3)
    make_head("cosine").prepare(model)
    module = model.get_submodule(classifier_path(model))
    assert isinstance(module, CosineClassifier)
    features = torch.randn(5, module.linear.in_features)
    assert torch.allclose(module(features), module(10 * features), atol=1e-5)
    assert module(features).abs().max() <= module.scale + 1e-5


def test_unknown_head_lists_the_known_ones():
    with pytest.raises(ValueError, match="linear.*cosine.*ncm.*aligned"):
        make_head("knn")


def test_decoder_features_are_taken_at_the_last_real_token():
    from sdlora_peft.continual.train import _pooled

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right_padded = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left_padded = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert torch.equal(_pooled(hidden, right_padded), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(_pooled(hidden, left_padded), hidden[:, 3])
    assert torch.equal(_pooled(hidden[:, 0], None), hidden[:, 0])  # encoder heads already get pooled features


@pytest.mark.parametrize("name", ["ncm-sdc", "aligned-sdc"])
def test_drift_compensation_moves_each_mean_with_the_samples_near_it(name):
    head = make_head(name)
    assert head.compensates_drift and head.name == name
    old, old_labels = clusters([0, 1], dims=4)
    head.means = {c: old[old_labels == c].mean(0) for c in (0, 1)}
    before = head.means.copy()
    # the current task's samples sit on the old classes; those near class 0 drift one way, near class 1 the other
    current, near = clusters([0, 1], dims=4, seed=0)
    shift = torch.tensor([3.0, 0.0, 0.0, 0.0])
    after = current + torch.where((near == 0).unsqueeze(1), shift, -shift)

    head.compensate_drift(current, after)

    assert torch.allclose(head.means[0] - before[0], shift, atol=0.05)
    assert torch.allclose(head.means[1] - before[1], -shift, atol=0.05)
    head.compensate_drift(after, after + 1.0)  # a uniform drift moves every mean by exactly that much
    assert torch.allclose(head.means[0] - before[0], shift + 1.0, atol=0.05)


def test_heads_without_drift_compensation_ask_for_no_extra_features():
    assert not any(make_head(name).compensates_drift for name in ("linear", "cosine", "ncm", "aligned"))
