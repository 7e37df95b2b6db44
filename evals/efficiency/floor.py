"""What bounds a decode step from below: the bytes it must read (the weights once, the accounted K/V and
metadata of every row) at the device's copy bandwidth, measured in the same run (these machines vary)."""
from __future__ import annotations

import time

import torch

COPY_BYTES = {"cuda": 2**30, "cpu": 2**26}  # per buffer: large enough to leave the caches


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every parameter, but the input embedding table only when the
    output head shares it (otherwise a step reads just its rows)."""
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != embedding.data_ptr():
        params.pop(embedding.data_ptr(), None)
    return sum(params.values())


def copy_bandwidth(device: torch.device, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves, counting what it reads and what it writes."""
    n = COPY_BYTES["cuda" if device.type == "cuda" else "cpu"]
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n * repeats / (time.perf_counter() - start)


def floor_ms_per_step(context: dict, bytes_read_per_step: float | None, batch: int) -> float | None:
    """The least ms a step can take: weights + every row's K/V and metadata, at the measured copy bandwidth."""
    if not context or bytes_read_per_step is None or not context.get("copy_bytes_per_s"):
        return None
    return 1e3 * (context["weight_bytes"] + batch * bytes_read_per_step) / context["copy_bytes_per_s"]
