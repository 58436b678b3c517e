"""An ONNX copy of a bundle behind the Embedder interface (``input_size``, ``mean``, ``std``,
``embedding_dim``, ``forward``), so index extraction and evaluation take ``runtime=onnx|onnx-int8`` exactly
as they take the eager model: same data loading, same shards, same metrics."""

from __future__ import annotations

import torch
from torch import nn

from cbir.export.runtimes import OnnxEncoder


class OnnxEmbedder(nn.Module):
    """Normalised model inputs (a torch batch, any memory format) → float32 embeddings from ONNX Runtime."""

    scriptable = False  # no graph of its own to export: it is one

    def __init__(self, encoder: OnnxEncoder, *, input_size: int, mean, std, embedding_dim: int, runtime: str) -> None:
        super().__init__()
        self.encoder, self.runtime = encoder, runtime
        self.input_size, self.mean, self.std = int(input_size), tuple(mean), tuple(std)
        self.embedding_dim = int(embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(self.encoder(batch))

    def fingerprint(self) -> str:
        """What the extraction shards and the index record as "the model": the ONNX file's hash."""
        return f"{self.runtime}:{self.encoder.fingerprint()}"
