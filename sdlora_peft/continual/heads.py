"""How features become class scores in class-incremental learning.

Every head trains through the model's own classification layer with the logits of classes outside the current task
masked (the paper's protocol); they differ in how old and new classes are scored at evaluation:

- `linear`: the classification layer's logits over the classes seen so far (the paper's masked linear head);
- `cosine`: the classification layer becomes a cosine classifier (normalised features and class weights);
- `ncm`: nearest class mean of the adapted features, each class's mean taken when its task ends;
- `aligned`: per-class feature Gaussians, stored when a task ends; after each task the classification layer is
  re-trained on features sampled from them (classifier alignment, as in SLCA);
- `ncm-sdc`, `aligned-sdc`: the same, with the stored class means moved along with the features as the backbone
  learns (semantic drift compensation, Yu et al., CVPR 2020), estimated from the current task's own samples.

Heads store class statistics only (a mean, and for `aligned` a covariance, per class): the runs stay
rehearsal-free, and `stored_statistics()` reports what was kept.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.nn import functional as F

HEAD_NAMES = ("linear", "cosine", "ncm", "aligned", "ncm-sdc", "aligned-sdc")
CLASSIFIER_NAMES = ("classifier", "score", "head", "fc")


def classifier_path(model: nn.Module) -> str:
    """Dotted name of the model's classification layer (`classifier` for ViT, DINOv2, BERT; `score` for Llama)."""
    names = dict(model.named_modules())
    for name in CLASSIFIER_NAMES:
        if name in names:
            return name
    raise ValueError(
        f"Cannot find the classification layer of {type(model).__name__}: expected a module named one of "
        f"{list(CLASSIFIER_NAMES)}. Use a transformers *ForImageClassification / *ForSequenceClassification model."
    )


def classifier_linear(model: nn.Module) -> nn.Linear:
    """The trainable linear classification layer, looking through PEFT's modules_to_save wrapper."""
    module = model.get_submodule(classifier_path(unwrap(model)))
    if isinstance(module, ModulesToSaveWrapper):
        module = module.modules_to_save[module.active_adapters[0]]
    linear = module.linear if isinstance(module, CosineClassifier) else module
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"The classification layer is a {type(linear).__name__}, not a torch.nn.Linear.")
    return linear


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (any other model as it is)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


class CosineClassifier(nn.Module):
    """Cosine similarity between normalised features and normalised class weights, times a fixed scale."""

    def __init__(self, linear: nn.Linear, scale: float = 16.0) -> None:
        super().__init__()
        self.linear = nn.Linear(linear.in_features, linear.out_features, bias=False)
        self.linear.weight.data.copy_(linear.weight.data)
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=-1), F.normalize(self.linear.weight, dim=-1))


class Head:
    """The masked linear head; subclasses change how classes are scored at evaluation."""

    name = "linear"
    compensates_drift = False  # whether `compensate_drift` wants the task's features from before its training

    def prepare(self, model: nn.Module) -> None:
        """Adapt the (not yet PEFT-wrapped) model's classification layer before training starts."""

    def compensate_drift(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Called when a task ends, before `end_task`, with its training samples' features from before and after
        the task's training (only if `compensates_drift`)."""

    def end_task(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        """Called when a task ends with the adapted features of its training samples."""

    def scores(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Class scores (one column per class of the label space) for evaluation."""
        return logits

    def stored_statistics(self) -> dict:
        """What the head keeps about old classes (for results.json: nothing but statistics)."""
        return {}


class CosineHead(Head):
    name = "cosine"

    def prepare(self, model: nn.Module) -> None:
        path = classifier_path(model)
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, CosineClassifier(getattr(parent, child)))


class ClassMeanHead(Head):
    """Nearest class mean (cosine) of the adapted features; means are taken when each class's task ends."""

    name = "ncm"

    def __init__(self, compensates_drift: bool = False) -> None:
        self.means: dict[int, torch.Tensor] = {}
        self.compensates_drift = compensates_drift
        if compensates_drift:
            self.name = f"{self.name}-sdc"

    @torch.no_grad()
    def compensate_drift(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """Move each stored mean by the average drift (`after - before`) of the current task's samples, weighted by
        a Gaussian of their distance to the mean before training. The bandwidth adapts to each class: the median
        squared distance, so the nearest half of the samples carries most of the weight whatever the feature scale.
        Only the current task's samples are used: the run stays rehearsal-free."""
        before = before.float()
        drift = after.float() - before
        for label, mean in self.means.items():
            squared = (before - mean).pow(2).sum(dim=1)
            weights = torch.softmax(-squared / (2 * squared.median().clamp_min(1e-12)), dim=0)
            self.means[label] = mean + weights @ drift

    def end_task(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        for label in classes:
            self.means[label] = features[labels == label].float().mean(0)

    def scores(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        scores = torch.full_like(logits, float("-inf"), dtype=torch.float32)
        labels = sorted(self.means)
        prototypes = F.normalize(torch.stack([self.means[c] for c in labels]), dim=-1)
        scores[:, labels] = F.normalize(features.float(), dim=-1) @ prototypes.T
        return scores

    def stored_statistics(self) -> dict:
        dims = next(iter(self.means.values())).numel() if self.means else 0
        return {"class_means": len(self.means), "floats_per_class": dims}


class AlignedHead(ClassMeanHead):
    """Classifier alignment: re-train the classification layer on features sampled from per-class Gaussians."""

    name = "aligned"

    def __init__(
        self,
        samples_per_class: int = 256,
        epochs: int = 5,
        lr: float = 0.01,
        seed: int = 0,
        compensates_drift: bool = False,
    ) -> None:
        super().__init__(compensates_drift)
        self.covariances: dict[int, torch.Tensor] = {}
        self.samples_per_class, self.epochs, self.lr, self.seed = samples_per_class, epochs, lr, seed

    def end_task(self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> None:
        super().end_task(model, features, labels, classes)
        for label in classes:
            own = features[labels == label].float()
            centred = own - self.means[label]
            self.covariances[label] = centred.T @ centred / max(len(own) - 1, 1)
        self._align(classifier_linear(model))

    def scores(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits

    @torch.no_grad()
    def _sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = [], []
        for label, mean in self.means.items():
            dims = mean.numel()
            covariance = self.covariances[label] + 1e-4 * torch.eye(dims)  # shrinkage: few samples, many dims
            cholesky = torch.linalg.cholesky(covariance)
            noise = torch.randn(self.samples_per_class, dims, generator=generator)
            features.append(mean + noise @ cholesky.T)
            labels.append(torch.full((self.samples_per_class,), label))
        return torch.cat(features), torch.cat(labels)

    def _align(self, linear: nn.Linear) -> None:
        """A few epochs of SGD on sampled features of all seen classes, only on the seen classes' logits."""
        generator = torch.Generator().manual_seed(self.seed + len(self.means))
        features, labels = self._sample(generator)
        seen = torch.tensor(sorted(self.means))
        device, dtype = linear.weight.device, linear.weight.dtype
        optimizer = torch.optim.SGD(linear.parameters(), lr=self.lr, momentum=0.9)
        for _ in range(self.epochs):
            order = torch.randperm(len(labels), generator=generator)
            for batch in order.split(64):
                logits = linear(features[batch].to(device, dtype))
                masked = torch.full_like(logits, float("-inf"))
                masked[:, seen] = logits[:, seen]
                loss = F.cross_entropy(masked, labels[batch].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    def stored_statistics(self) -> dict:
        dims = super().stored_statistics()["floats_per_class"]
        return {
            "class_means": len(self.means),
            "class_covariances": len(self.covariances),
            "floats_per_class": dims + dims**2,
        }


def make_head(name: str, seed: int = 0) -> Head:
    """The head named `name` (one of HEAD_NAMES)."""
    if name not in HEAD_NAMES:
        raise ValueError(f"Unknown head {name!r}; choose one of {list(HEAD_NAMES)}.")
    base, _, suffix = name.partition("-")
    if base == "aligned":
        return AlignedHead(seed=seed, compensates_drift=suffix == "sdc")
    if base == "ncm":
        return ClassMeanHead(compensates_drift=suffix == "sdc")
    return CosineHead() if base == "cosine" else Head()
