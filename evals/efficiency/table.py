"""The table a ``task=efficiency`` run prints: one row per length x method@budget, absolute numbers, ratios to the
full-KV cell and to the bytes floor measured in the same run."""
from __future__ import annotations

from evals.efficiency.floor import floor_ms_per_step

MIB = 2**20
PEAK_LABELS = {
    "cuda_max_allocated": "peak mem = torch.cuda.max_memory_allocated over the timed decode, reset per cell "
                          "(weights + this cell's cache + activations; a shared prefill cache is subtracted)",
    "process_peak_rss": "peak mem = peak RSS of the process over the timed decode, reset per cell (CPU: includes "
                        "weights and allocator caches, so it shows little; stored KV is the accounted memory)",
}


def cells_by_length(results: list[dict]):
    """Every efficiency cell of the results at every length, in the order given, as ``(length, metrics, this
    cell's numbers at that length, the full-KV numbers at the same length and batch size, or {} when none)``."""
    cells = [m for m in results if isinstance(m.get("efficiency"), dict)]
    references = {}
    for m in cells:
        if m["run"].get("reference"):
            for n, e in m["efficiency"].items():
                references.setdefault((int(n), e.get("batch", 1)), e)
    for n in sorted({int(n) for m in cells for n in m["efficiency"]}):
        for m in cells:
            e = m["efficiency"].get(str(n))
            if e is not None:
                yield n, m, e, references.get((n, e.get("batch", 1)), {})


def cell_label(metrics: dict) -> str:
    run = metrics["run"]
    return f"{run['method']}@{run['budget'] if run['budget'] is not None else 'full'}"


def ratio(value, reference, digits=2):
    if value is None or not reference:
        return "-"
    return f"{value / reference:.{digits}f}x"


def _mib(value, digits=2):
    return "-" if value is None else f"{value / MIB:.{digits}f}"


def _num(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def efficiency_table(results: list[dict]) -> str | None:
    """One row per length x method@budget with absolute numbers and ratios to the full-KV cell of the run."""
    entries = list(cells_by_length(results))
    if not entries:
        return None
    header = ["length", "batch", "method@budget", "tok/s", "ms/step", "floor ms", "x floor", "speedup", "peak MiB",
              "x full", "read/step MiB", "x full", "stored KV MiB", "x full", "+meta MiB"]
    floors = [floor_ms_per_step(m.get("context") or {}, e.get("bytes_read_per_step"), e.get("batch", 1))
              for _, m, e, _ in entries]
    rows = [[str(n), str(e.get("batch", 1)), cell_label(m), _num(e["decode_tokens_per_s"], 1),
             _num(e["ms_per_step"], 2), _num(floor, 2), ratio(e["ms_per_step"], floor),
             ratio(e["decode_tokens_per_s"], ref.get("decode_tokens_per_s")),
             _mib(e["decode_peak_mem_bytes"], 1), ratio(e["decode_peak_mem_bytes"], ref.get("decode_peak_mem_bytes")),
             _mib(e["bytes_read_per_step"], 3), ratio(e["bytes_read_per_step"], ref.get("bytes_read_per_step"), 3),
             _mib(e["stored_kv_bytes"], 3), ratio(e["stored_kv_bytes"], ref.get("stored_kv_bytes"), 3),
             _mib(e.get("metadata_bytes"), 3)] for (n, m, e, ref), floor in zip(entries, floors)]
    if any(e.get("kernels_per_step") is not None for _, _, e, _ in entries):  # a replayed CUDA graph was counted
        header.append("kernels/step")
        for row, (_, _, e, _) in zip(rows, entries):
            row.append(_num(e.get("kernels_per_step"), 0))
    sources = {e.get("peak_mem_source") for _, _, e, _ in entries}
    reference = any(m["run"].get("reference") for _, m, _, _ in entries)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    _, first, first_numbers, _ = entries[0]
    context = first.get("context") or {}
    bandwidth = context.get("copy_bytes_per_s")
    lines = [
        f"efficiency: {first['run'].get('model')}, {_num(first_numbers.get('new_tokens'), 0)} new tokens per row; "
        "one row per length x "
        f"method@budget; 'x full' = ratio to {'the full-KV cell' if reference else 'full KV (not in this run: -)'}",
        "tok/s and ms/step: the steady greedy decode step of this cell alone (CUDA-graph warm-up and capture left "
        "out); tok/s counts every row of the batch; speedup = tok/s / full's",
        "floor ms = (weights once + batch x read/step) / the device's copy bandwidth"
        + (f" ({bandwidth / 1e9:.0f} GB/s read+write, measured in this run; weights {context['weight_bytes'] / 2**30:.2f}"
           " GiB)" if bandwidth else " (not measured: -)") + "; x floor = ms/step / floor ms",
        *(PEAK_LABELS[s] for s in sorted(s for s in sources if s in PEAK_LABELS)),
        *(["peak mem: not measured on this device (-)"] if sources - set(PEAK_LABELS) else []),
        "read/step = accounted K/V + metadata bytes read per decode step (all layers); stored KV = K/V bytes kept "
        "at the end of the decode; +meta = the method's own metadata stored on top (page min/max keys, SparQ's "
        "sum of V)"
        + ("; kernels/step = kernel launches of one replayed step (the captured CUDA graph's kernel nodes)"
           if "kernels/step" in header else ""),
        fmt(header),
        fmt(["-" * w for w in widths]),
        *(fmt(r) for r in rows),
    ]
    return "\n".join(lines)
