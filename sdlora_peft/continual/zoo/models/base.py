"""What every zoo model loader returns besides the model, and the label keywords they all take."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel


@dataclass(frozen=True)
class ModelInfo:
    """What `load_model` built: enough to report a run and to pick the preprocessing."""

    name: str
    source: str
    modality: str
    hidden_size: int | None
    num_parameters: int
    pretrained: bool
    pooling: str | None = None  # a PooledClassifier's pooling; None: the architecture's own head


def label_kwargs(num_labels: int, id2label: dict[int, str] | None) -> dict:
    """Config keywords for the label space; labels default to their index as a string."""
    id2label = {int(i): str(n) for i, n in (id2label or {i: str(i) for i in range(num_labels)}).items()}
    if sorted(id2label) != list(range(num_labels)):
        raise ValueError(f"id2label must name the classes 0..{num_labels - 1}, got keys {sorted(id2label)}")
    return {"num_labels": num_labels, "id2label": id2label, "label2id": {n: i for i, n in id2label.items()}}


def model_info(name: str, source: str, modality: str, model: PreTrainedModel, pretrained: bool) -> ModelInfo:
    config = model.config.get_text_config() if modality == "text" else model.config
    hidden = getattr(config, "hidden_size", None)
    num_parameters = sum(p.numel() for p in model.parameters())
    return ModelInfo(name, source, modality, hidden, num_parameters, pretrained)
