"""The one table at the end of benchmarks/gpu_check.sh: each step's outcome, each kernel against its PyTorch
reference (and the bytes-moved floor for those that move real bytes), each efficiency cell against full KV, and the
H200 targets.

    python benchmarks/gpu_check_summary.py --steps OUT/steps.tsv --kernels OUT/kernel_bench.json --results OUT/results
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from evals.efficiency.floor import floor_ms_per_step
from evals.efficiency.table import cell_label, cells_by_length, ratio


def step_rows(steps_tsv: Path) -> list[list[str]]:
    rows = []
    if not steps_tsv.is_file():
        return rows
    for line in steps_tsv.read_text().splitlines():
        name, status, seconds, log = (line.split("\t") + ["", "", "", ""])[:4]
        result = ""
        log_path = Path(log)
        if log_path.is_file():
            text = log_path.read_text(errors="replace")
            counts = re.findall(r"\d+ (?:passed|failed|skipped|error|errors)\b", text)
            result = ", ".join(dict.fromkeys(counts[-4:])) if "pytest" in name or "test" in name else ""
        rows.append([name, status, seconds, result])
    return rows


def kernel_rows(kernels_json: Path) -> list[list[str]]:
    if not kernels_json.is_file():
        return [["kernel bench", "missing", "", f"{kernels_json} was not written"]]
    rows = []
    for r in json.loads(kernels_json.read_text()):
        shape = f"{r['context'] // 1024}k, batch {r.get('batch', 1)}" if r.get("floor_us") else \
            f"{r['context'] // 1024}k/{r['budget']}"
        name = f"  {r['kernel']} {r['dtype']} ({shape})"
        if "triton_us" in r and r.get("floor_us"):
            result = (f"triton {r['triton_us']:.1f} us = {r['triton_us'] / r['floor_us']:.1f}x floor "
                      f"({r['floor_us']:.1f} us); torch {r['torch_us']:.1f} us = {r['torch_over_triton']:.2f}x triton; "
                      f"max err {r['max_err']:.1e}")
        elif "triton_us" in r:
            result = (f"triton {r['triton_us']:.1f} us per call; torch {r['torch_us']:.1f} us = "
                      f"{r['torch_over_triton']:.2f}x triton; max err {r['max_err']:.1e}")
        else:
            result = f"torch {r['torch_us']:.1f} us on {r['device']} (no Triton timing)"
        rows.append([name, "ok", "", result])
    return rows


def efficiency_metrics(results: Path) -> list[dict]:
    metrics = []
    for path in sorted(results.glob("runs/efficiency/*/*/*/*/metrics.json")):
        m = json.loads(path.read_text())
        if isinstance(m.get("efficiency"), dict):
            metrics.append(m)
    metrics.sort(key=lambda m: (not m["run"].get("reference"), m["run"]["method"], m["run"]["budget"] or 0))
    return metrics


def efficiency_rows(metrics: list[dict]) -> list[list[str]]:
    if not metrics:
        return [["efficiency", "missing", "", "no efficiency metrics"]]
    rows = []
    for length, m, e, ref in sorted(cells_by_length(metrics), key=lambda c: (c[2].get("batch", 1), c[0])):
        speed = e.get("decode_tokens_per_s")
        floor = floor_ms_per_step(m.get("context") or {}, e.get("bytes_read_per_step"), e.get("batch", 1))
        result = (f"{speed:.1f} tok/s ({ratio(speed, ref.get('decode_tokens_per_s'))} full), "
                  f"{e['ms_per_step']:.2f} ms/step = {ratio(e['ms_per_step'], floor)} floor; "
                  f"read/step {ratio(e.get('bytes_read_per_step'), ref.get('bytes_read_per_step'), 3)}, "
                  f"stored KV {ratio(e.get('stored_kv_bytes'), ref.get('stored_kv_bytes'), 3)}, "
                  f"peak mem {ratio(e.get('decode_peak_mem_bytes'), ref.get('decode_peak_mem_bytes'))}"
                  + (f", {e['kernels_per_step']} kernels/step" if e.get("kernels_per_step") is not None else "")
                  if speed else "no timing")
        rows.append([f"  {m['run']['model']} len={length} batch={e.get('batch', 1)} {cell_label(m)}", "ok", "",
                     result])
    return rows


def _cell(metrics: list[dict], method: str, budget, length: int, batch: int):
    """(this cell's numbers, full KV's at the same length and batch), or (None, {})."""
    for n, m, e, ref in cells_by_length(metrics):
        if (m["run"]["method"], m["run"]["budget"], n, e.get("batch", 1)) == (method, budget, length, batch):
            return e, ref
    return None, {}


def target_rows(metrics: list[dict], kernels_json: Path | None = None) -> list[list[str]]:
    """The issue's targets for one H200 run, each met or not (or missing)."""
    rows = []

    def check(name, value, bound, met):
        status = "missing" if value is None else ("met" if met(value) else "NOT met")
        rows.append([f"  {name}", status, "", "-" if value is None else f"{value:.2f} ({bound})"])

    context = next((m.get("context") for m in metrics if m["run"].get("reference")), None)
    for length in (32768, 98304):
        full, _ = _cell(metrics, "full", None, length, 1)
        floor = full and floor_ms_per_step(context, full.get("bytes_read_per_step"), 1)
        check(f"full KV ms/step / floor, {length // 1024}k batch 1", full and floor and full["ms_per_step"] / floor,
              "<= 1.3", lambda v: v <= 1.3)
    for length, batch, least in ((98304, 1, 1.6), (32768, 8, 2.5)):
        e, ref = _cell(metrics, "rocketkv", 256, length, batch)
        speedup = e and ref.get("decode_tokens_per_s") and e["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        check(f"rocketkv@256 tok/s / full's, {length // 1024}k batch {batch}", speedup or None, f">= {least}",
              lambda v, least=least: v >= least)
    e, ref = _cell(metrics, "rocketkv", 256, 98304, 1)
    peak = e and ref.get("decode_peak_mem_bytes") and e.get("decode_peak_mem_bytes") and \
        1 - e["decode_peak_mem_bytes"] / ref["decode_peak_mem_bytes"]
    check("rocketkv@256 peak memory below full's, 96k batch 1", peak or None, ">= 0.40", lambda v: v >= 0.40)
    return rows


def table(rows: list[list[str]]) -> str:
    header = ["check", "status", "time s", "result"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    fmt = lambda r: f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}"  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths] + ["-" * 6]), *(fmt(r) for r in rows)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=Path, required=True)
    ap.add_argument("--kernels", type=Path, required=True)
    ap.add_argument("--results", type=Path, required=True)
    args = ap.parse_args(argv)
    steps = step_rows(args.steps)
    metrics = efficiency_metrics(args.results)
    rows = []
    for row in steps:
        rows.append(row)
        if row[0].startswith("kernel bench"):
            rows += kernel_rows(args.kernels)
    if any(row[0].startswith("efficiency") for row in steps):
        rows += [["efficiency cells", "", "", ""], *efficiency_rows(metrics)]
    rows += [["targets (H200)", "", "", ""], *target_rows(metrics)]
    failed = [r[0] for r in steps if r[1] != "ok"]
    total = sum(int(r[2]) for r in steps if r[2].isdigit())
    print(f"== gpu_check summary: {len(steps) - len(failed)}/{len(steps)} steps ok, {total} s ==")
    print(table(rows))
    if failed:
        print(f"FAILED: {', '.join(failed)} (logs next to {args.steps})")
    return 1 if failed or not steps else 0


if __name__ == "__main__":
    sys.exit(main())
