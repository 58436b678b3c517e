"""The fast inference path, in one place, for evaluation, index extraction and export.

Three independent switches, each a measurable win on some hardware (``benchmarks/extract_speed.py``):

- ``channels_last``: NHWC weights and inputs, the layout oneDNN (CPU) and cuDNN tensor cores prefer;
- ``bf16``: bfloat16 autocast on CPU or CUDA (GeM pools in float32; embeddings come back float32);
- ``compile``: ``torch.compile`` of the whole Embedder (one graph: backbone, head, normalisation).

Usage::

    model = prepare_for_inference(embedder, device="cuda", channels_last=True, compile=True)
    with inference_autocast("cuda", bf16=True):
        embeddings = model(as_model_input(images, "cuda", channels_last=True)).float()

or :func:`embed`, which does those three lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def prepare_for_inference(model: nn.Module, *, device: str | torch.device | None = None,
                          channels_last: bool = False, compile: bool | str = False) -> nn.Module:
    """Put ``model`` in eval mode on ``device`` (channels-last if asked) and return the module to call:
    ``model`` itself, or its ``torch.compile`` wrapper (which shares its parameters). ``compile`` may name
    a backend (``True`` = inductor; ``"eager"`` only traces, for quick tests)."""
    model.eval()
    if device is not None:
        model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if not compile:
        return model
    return torch.compile(model, backend="inductor" if compile is True else compile)


def _device_type(device: str | torch.device | None) -> str:
    return torch.device(device).type if device is not None else "cpu"


@contextlib.contextmanager
def inference_autocast(device: str | torch.device | None = "cpu", bf16: bool = False) -> Iterator[None]:
    """``torch.inference_mode()`` plus, with ``bf16``, bfloat16 autocast for ``device``'s type."""
    with torch.inference_mode(), torch.autocast(_device_type(device), dtype=torch.bfloat16, enabled=bf16):
        yield


def as_model_input(images: torch.Tensor, device: str | torch.device | None = None,
                   channels_last: bool = False) -> torch.Tensor:
    """``images`` on ``device`` in the memory format the prepared model expects."""
    if device is not None:
        images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def embed(model: nn.Module, images: torch.Tensor, *, device: str | torch.device | None = None,
          channels_last: bool = False, bf16: bool = False) -> torch.Tensor:
    """Float32 embeddings of one batch through a model from :func:`prepare_for_inference`."""
    with inference_autocast(device, bf16=bf16):
        return model(as_model_input(images, device, channels_last)).float()
