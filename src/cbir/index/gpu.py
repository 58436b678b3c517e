"""Copy a CPU index to the GPUs faiss sees: one GPU, or all of them sharded or replicated.

Several GPUs go through FAISS's own cloner (``index_cpu_to_all_gpus`` with ``GpuMultipleClonerOptions``):

- ``shard=True``: each GPU holds 1/N of the vectors and every query visits all N (capacity grows with N:
  the choice when the index does not fit one GPU);
- ``shard=False``: each GPU holds a full copy and queries are split between them (throughput grows with N).

The saved index stays a CPU index; this copy exists only for searching.
"""

from __future__ import annotations

import faiss


def gpu_count() -> int:
    """GPUs faiss can use: 0 for a faiss built without GPU support."""
    return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0


def clone_to_gpus(index: faiss.Index, shard: bool = True) -> tuple[str, faiss.Index]:
    """(backend name, GPU index): ``faiss-gpu`` on one GPU, ``faiss-gpu-shards-N`` / ``faiss-gpu-replicas-N``
    over N > 1. Raises what the cloner raises for an index type without a GPU version."""
    count = gpu_count()
    if count > 1:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = bool(shard)
        gpu_index = faiss.index_cpu_to_all_gpus(index, co=options, ngpu=count)
        return f"faiss-gpu-{'shards' if shard else 'replicas'}-{count}", gpu_index
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
    gpu_index.referenced_resources = resources  # keep the GPU memory pool alive
    return "faiss-gpu", gpu_index
