"""task=efficiency: random-token prompts, full-length decodes, the side-by-side table; benchmarks/gpu_check.sh."""
import importlib.util
import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, SUBPROCESS_TIMEOUT
from evals.efficiency.task import EfficiencyTask, efficiency_table
from rocketkv.harness.generation import decode
from rocketkv.harness.models import tiny_tokenizer
from evals.prompting import prompt_token_ids
from rocketkv.harness.runner import run
from rocketkv.harness.sample_runs import held_bytes

TINY = ["model=tiny-random", "task=efficiency", "progress=false"]


def test_prompts_have_exact_lengths_no_special_tokens_and_depend_only_on_the_seed():
    tok = tiny_tokenizer()
    task = EfficiencyTask({"lengths": [64, 300], "repeats": 2, "seed": 3})
    samples = task.samples(tok, 8192)
    assert [s.id for s in samples] == ["warmup_len64", "len64_rep0", "len64_rep1", "len300_rep0", "len300_rep1"]
    assert samples[0].meta["warmup"] and all(not s.meta.get("warmup") for s in samples[1:])
    special = set(tok.all_special_ids)
    for s in samples:
        ids = prompt_token_ids(tok, s, model_chat=True, model_max_len=8192)
        assert ids == s.prompt_ids and len(ids) == s.meta["length"] and not special & set(ids)
        assert s.max_new_tokens == 50 and s.stop == []
    again = EfficiencyTask({"lengths": [64, 300], "repeats": 2, "seed": 3}).samples(tok, 8192)
    assert [s.prompt_ids for s in again] == [s.prompt_ids for s in samples]
    other = EfficiencyTask({"lengths": [64, 300], "repeats": 2, "seed": 4}).samples(tok, 8192)
    assert all(a.prompt_ids != b.prompt_ids for a, b in zip(other, samples))
    assert len({tuple(s.prompt_ids) for s in samples}) == len(samples)  # warm-up and repeats differ


@pytest.mark.parametrize("override,message", [
    ("task.lengths=[1024,9000]", r"\[9000\].*max length 8192"),
    ("task.lengths=[8150]", r"\[8150\].*use lengths <= 8142"),
    ("task.lengths=[10]", r"task.lengths=\[10\] is not valid; give integers >= 64"),
    ("task.max_new_tokens=1", "max_new_tokens=1"),
])
def test_bad_settings_fail_before_loading(compose_cfg, tmp_path, monkeypatch, override, message):
    import rocketkv.harness.runner as runner

    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    with pytest.raises(ValueError, match=message):
        run(compose_cfg(*TINY, f"output_dir={tmp_path}", override))


def test_default_grid_is_full_plus_every_method_at_256(compose_cfg):
    cfg = compose_cfg(*TINY)
    assert list(cfg.grid.methods) == ["full", "snapkv", "quest", "sparq", "topk", "rocketkv"]
    assert list(cfg.grid.budgets) == [256]
    assert list(compose_cfg(*TINY, "grid.methods=[full,rocketkv]").grid.methods) == ["full", "rocketkv"]
    assert list(compose_cfg("model=tiny-random").grid.methods) == []  # other tasks keep the empty grid


def test_ignore_eos_decodes_every_token():
    from rocketkv.core import compress
    from rocketkv.harness.generation import prefill
    from conftest import peaky_model

    model, tok = copy.deepcopy(peaky_model()), tiny_tokenizer()  # its greedy tokens vary; a copy: EOS changes below
    rows = [list(range(10, 40))]

    def greedy(**kwargs):
        with compress(model, "full", max_new_tokens=7) as session:
            cache = session.new_cache(7)
            logits, _ = prefill(model, rows, cache, split_last=False)
            return decode(model, tok, logits, cache, 7, **kwargs)

    every = greedy(ignore_eos=True)
    assert len(every.tokens[0]) == 7 and every.steps == 6  # the first token comes from the prefill's logits
    tokens = every.tokens[0]
    first_new = next(i for i in range(1, 7) if tokens[i] not in tokens[:i])
    model.generation_config.eos_token_id = tokens[first_new]  # a token first chosen at step first_new: now EOS
    assert greedy().tokens[0] == tokens[:first_new]
    assert greedy(ignore_eos=True).tokens == every.tokens


def test_run_decodes_every_token_and_rocketkv_stores_and_reads_less(compose_cfg, tmp_path, capsys):
    results = run(compose_cfg(*TINY, f"output_dir={tmp_path}", "task.lengths=[600]", "grid.budgets=[128]"))
    by_method = {m["run"]["method"]: m for m in results}
    assert sorted(by_method) == ["full", "quest", "rocketkv", "snapkv", "sparq", "topk"]
    for metrics in results:
        preds = [json.loads(line) for line in
                 (Path(metrics["run"]["results_dir"]) / "predictions.jsonl").read_text().splitlines()]
        assert [p["id"] for p in preds] == ["warmup_len600", "len600_rep0"]
        assert all(p["new_tokens"] == 50 and p["prompt_tokens"] == 600 for p in preds), metrics["run"]["method"]
        assert preds[0]["score"] is None and preds[1]["score"] > 0  # the warm-up is left out
        assert metrics["n_warmup"] == 1 and metrics["subtasks"]["len=600"]["n"] == 1
        e = metrics["efficiency"]["600"]
        assert e["new_tokens"] == 50 and e["ms_per_step"] > 0
        # run-level timing and stats leave the warm-up out too (the leaderboard reads them)
        assert metrics["timing"]["decode_s_mean"] == pytest.approx(preds[1]["time_decode_s"])
        assert metrics["stats"]["bytes_read_per_step"] == pytest.approx(preds[1]["stats"]["bytes_read_per_step"])
        assert e["decode_tokens_per_s"] == pytest.approx(1e3 / e["ms_per_step"])
    full, rocket = by_method["full"]["efficiency"]["600"], by_method["rocketkv"]["efficiency"]["600"]
    assert by_method["full"]["run"]["reference"] and not by_method["rocketkv"]["run"]["reference"]
    assert rocket["stored_kv_bytes"] < 0.8 * full["stored_kv_bytes"]
    assert rocket["bytes_read_per_step"] < 0.6 * full["bytes_read_per_step"]

    out = capsys.readouterr().out
    assert "efficiency/tiny-random/rocketkv@128: decode tok/s" in out
    rows = {line.split()[2]: line.split() for line in out.splitlines() if line.strip().startswith("600 ")}
    assert sorted(rows) == ["full@full", "quest@128", "rocketkv@128", "snapkv@128", "sparq@128", "topk@128"]
    assert rows["full@full"][7] == "1.00x" and rows["full@full"][11] == "1.000x" and rows["full@full"][13] == "1.000x"
    read_ratio, stored_ratio = (float(rows["rocketkv@128"][i].rstrip("x")) for i in (11, 13))
    assert read_ratio < 0.6 and stored_ratio < 0.8
    context = by_method["full"]["context"]  # the floor: weights + K/V read at the bandwidth measured in the run
    assert context["weight_bytes"] > 0 and context["copy_bytes_per_s"] > 1e8
    floor = 1e3 * (context["weight_bytes"] + full["bytes_read_per_step"]) / context["copy_bytes_per_s"]
    assert float(rows["full@full"][5]) == pytest.approx(floor, abs=0.006)
    assert float(rows["full@full"][6].rstrip("x")) == pytest.approx(full["ms_per_step"] / floor, abs=0.006)
    assert "GB/s read+write, measured in this run" in out
    assert (tmp_path / "leaderboard.csv").is_file()  # the report handles the task


def test_a_batch_decodes_every_row_and_counts_its_tokens(compose_cfg, tmp_path):
    results = run(compose_cfg(*TINY, f"output_dir={tmp_path}", "task.lengths=[300]", "task.batch_size=3",
                              "task.max_new_tokens=6", "task.warmup=false", "grid.methods=[full,rocketkv]",
                              "grid.budgets=[64]"))
    graphed = torch.cuda.is_available()  # the tiny model then decodes on the GPU: 2 warm-up steps, 1 capture
    setup = 3 if graphed else 0
    for metrics in results:
        [record] = [json.loads(line) for line in
                    (Path(metrics["run"]["results_dir"]) / "predictions.jsonl").read_text().splitlines()]
        decoded = record["decode"]
        assert (decoded["batch"], decoded["steps"], decoded["setup_steps"]) == (3, 5, setup)
        assert (decoded["setup_s"] > 0) == graphed
        e = metrics["efficiency"]["300"]
        assert e["batch"] == 3 and e["decode_tokens_per_s"] == pytest.approx(3 * 1e3 / e["ms_per_step"])
        steady = decoded["step_ms"][setup:]  # each step timed; the score is the median steady step's
        assert len(decoded["step_ms"]) == 5 and sum(decoded["step_ms"]) <= 1e3 * record["time_decode_s"]
        assert record["score"] == pytest.approx(3e3 / statistics.median(steady))
        assert e["ms_per_step"] == pytest.approx(statistics.median(steady))
        mean_ms = 1e3 * (record["time_decode_s"] - decoded["setup_s"]) / (5 - setup)
        assert e["ms_per_step_mean"] == pytest.approx(mean_ms)
    assert results[0]["run"]["protocol"]["batch_size"] == 3


def test_batch_rows_are_different_prompts_of_one_length():
    tok = tiny_tokenizer()
    [sample] = EfficiencyTask({"lengths": [100], "batch_size": 4, "warmup": False}).samples(tok, 4096)
    assert len(sample.prompt_ids) == 4 and {len(r) for r in sample.prompt_ids} == {100}
    assert len({tuple(r) for r in sample.prompt_ids}) == 4
    [single] = EfficiencyTask({"lengths": [100], "warmup": False}).samples(tok, 4096)
    assert isinstance(single.prompt_ids[0], int)


def test_table_without_full_kv_shows_no_ratios():
    metrics = {"run": {"method": "rocketkv", "budget": 256, "model": "m", "reference": False},
               "efficiency": {"1024": {"new_tokens": 50, "decode_tokens_per_s": 20.0, "ms_per_step": 50.0,
                                       "decode_peak_mem_bytes": None, "peak_mem_source": None,
                                       "bytes_read_per_step": 2**20, "stored_kv_bytes": 2**21,
                                       "metadata_bytes": 0.0}}}
    table = efficiency_table([metrics])
    row = [line for line in table.splitlines() if line.strip().startswith("1024")][0].split()
    assert row[1:] == ["1", "rocketkv@256", "20.0", "50.00", "-", "-", "-", "-", "-", "1.000", "-", "2.000", "-",
                       "0.000"]
    assert "not measured" in table and efficiency_table([{"score": 1.0}]) is None


def test_kernels_per_step_come_from_the_records_and_show_only_when_counted():
    record = {"meta": {"length": 64}, "new_tokens": 5, "time_decode_s": 1.0, "stats": {},
              "decode": {"batch": 1, "steps": 4, "setup_steps": 3, "setup_s": 0.5, "kernels_per_step": 1712}}
    numbers = EfficiencyTask({"lengths": [64]}).aggregate([record, {**record, "decode": {"batch": 1, "steps": 4}}])
    assert numbers["efficiency"]["64"]["kernels_per_step"] == 1712 and numbers["efficiency"]["64"]["ms_per_step"] == 300
    metrics = {"run": {"method": "full", "budget": None, "model": "m", "reference": True},
               "efficiency": {"64": numbers["efficiency"]["64"]}}
    header, row = [line.split() for line in efficiency_table([metrics]).splitlines()[-3::2]]
    assert header[-1] == "kernels/step" and row[-1] == "1712"
    del metrics["efficiency"]["64"]["kernels_per_step"]  # CPU: nothing captured, no column
    assert "kernels/step" not in efficiency_table([metrics])


def test_shared_prefill_keeps_only_the_window_queries():
    from rocketkv.harness.models import build_tiny_random
    from rocketkv.harness.generation import forward
    from rocketkv.core.session import compress

    model, _ = build_tiny_random()
    ids = list(range(3, 203))
    with compress(model, method="full", budget=None, max_new_tokens=4) as base:
        shared = base.new_cache(4, prompt_len=len(ids), capture_window=32)
        with torch.inference_mode():
            forward(model, [ids[:-1]], shared)
    layer = shared.layers[0]
    q = layer.captured_q
    assert q.shape[-2] == 32 and q.untyped_storage().nbytes() == q.numel() * q.element_size()
    kv = sum(l.kv_bytes() for l in shared.layers)
    assert kv < held_bytes(shared) < kv * 2  # beside K/V: positions, room for the decode steps, the window queries


def test_gpu_check_script_parses_and_fails_fast_without_cuda(tmp_path):
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run for minutes")
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_ALLOW_CPU"}
    env.update(GPU_CHECK_OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT)
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_fits_eight_minutes_in_the_worst_case():
    """Every step's limit, the install's and the summary's add up to under 8 minutes (a GPU loan is 15 minutes,
    machine start included)."""
    import re

    text = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    limits = [int(n) for n in re.findall(r'^\s*(?:step|efficiency) "[^"]+" (\d+)', text, re.M)]
    limits += [int(re.search(r"timeout --kill-after=(\d+)", text).group(1))] * len(limits)  # a step's grace
    limits += [int(n) for n in re.findall(r"^\s*timeout (\d+) ", text, re.M)]
    limits += [int(re.search(r"^INSTALL_LIMIT=(\d+)", text, re.M).group(1))]
    assert len(limits) >= 13  # 5 steps and their grace, the imports, the summary, the install
    assert sum(limits) < 480, limits


def test_gpu_check_summary_is_one_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check_summary", REPO / "benchmarks" / "gpu_check_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    (tmp_path / "tests.log").write_text("....\n40 passed, 2 skipped in 30.1s\n")
    (tmp_path / "steps.tsv").write_text(
        f"kernel tests (CUDA)\tok\t31\t{tmp_path / 'tests.log'}\n"
        "kernel bench 32k / budget 256\tok\t20\t\n"
        "efficiency (m)\ttimeout after 210s\t210\t\n")
    (tmp_path / "kb.json").write_text(json.dumps([{
        "kernel": "dense_decode_attention", "dtype": "bfloat16", "device": "cuda", "context": 32768, "batch": 8,
        "budget": 256, "floor_bytes": 4_000_000, "floor_us": 0.9, "peak_gbps": 4800.0, "torch_us": 90.0,
        "triton_us": 9.0, "max_err": 1e-3, "torch_over_triton": 10.0}, {
        "kernel": "hsa_page_probs", "dtype": "bfloat16", "device": "cuda", "context": 32768, "batch": 1,
        "budget": 256, "floor_bytes": None, "torch_us": 12.0, "triton_us": 4.0, "max_err": 0.0,
        "torch_over_triton": 3.0}]))
    assert summary.main(["--steps", str(tmp_path / "steps.tsv"), "--kernels", str(tmp_path / "kb.json"),
                         "--results", str(tmp_path / "none")]) == 1
    out = capsys.readouterr().out
    assert "2/3 steps ok, 261 s" in out and "40 passed, 2 skipped" in out
    assert "dense_decode_attention bfloat16 (32k, batch 8)" in out
    assert "triton 9.0 us = 10.0x floor (0.9 us); torch 90.0 us = 10.00x triton" in out
    assert "hsa_page_probs bfloat16 (32k/256)" in out and "triton 4.0 us per call; torch 12.0 us = 3.00x" in out
    assert "no efficiency metrics" in out and "FAILED: efficiency (m)" in out


def test_gpu_check_summary_checks_the_targets(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check_summary", REPO / "benchmarks" / "gpu_check_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    context = {"weight_bytes": 16e9, "copy_bytes_per_s": 4e12}

    def cell(method, budget, cells):
        return {"run": {"method": method, "budget": budget, "model": "m", "reference": method == "full"},
                "context": context,
                "efficiency": {str(n): {"batch": b, "decode_tokens_per_s": tps, "ms_per_step": 1e3 * b / tps,
                                        "bytes_read_per_step": read, "decode_peak_mem_bytes": peak}
                               for n, b, tps, read, peak in cells}}

    metrics = [cell("full", None, [(32768, 1, 200.0, 4e9, 22e9), (98304, 1, 100.0, 12e9, 30e9)]),
               cell("full", None, [(32768, 8, 400.0, 4e9, 60e9)]),  # a batch-8 run: a results folder of its own
               cell("rocketkv", 256, [(98304, 1, 180.0, 1e8, 17e9)]),
               cell("rocketkv", 256, [(32768, 8, 800.0, 1e8, 17e9)])]
    rows = {r[0].strip(): (r[1], r[3]) for r in summary.target_rows(metrics)}
    # full at 32k: 5 ms/step against (16e9 + 4e9) / 4e12 = 5 ms: 1.00x its floor; at 96k 10 ms against 7 ms
    assert rows["full KV ms/step / floor, 32k batch 1"] == ("met", "1.00 (<= 1.3)")
    assert rows["full KV ms/step / floor, 96k batch 1"] == ("NOT met", "1.43 (<= 1.3)")
    assert rows["rocketkv@256 tok/s / full's, 96k batch 1"] == ("met", "1.80 (>= 1.6)")
    assert rows["rocketkv@256 tok/s / full's, 32k batch 8"] == ("NOT met", "2.00 (>= 2.5)")
    assert rows["rocketkv@256 peak memory below full's, 96k batch 1"] == ("met", "0.43 (>= 0.40)")
    assert len(rows) == 5
    assert {r[1] for r in summary.target_rows([])} == {"missing"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
def test_cuda_floor_inputs_and_peak_memory():
    from evals.efficiency.floor import copy_bandwidth
    from rocketkv.harness.memory import PeakMemory

    device = torch.device("cuda")
    assert copy_bandwidth(device) > 1e11  # any data-centre GPU moves well over 100 GB/s
    mem = PeakMemory(device)
    mem.reset()
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    assert mem.source == "cuda_max_allocated" and mem.read() >= block.numel()


def test_ms_per_step_is_the_median_step_so_a_burst_does_not_move_it():
    """Steps timed one by one: a burst of another process (two slow steps of seven) leaves ms/step at the median of
    the steady steps, over every repeat; the mean is kept beside it; records without step times use the mean."""
    def record(rep, step_ms, setup=0):
        return {"meta": {"length": 64, "repeat": rep}, "new_tokens": len(step_ms) + 1,
                "time_decode_s": sum(step_ms) / 1e3, "stats": {},
                "decode": {"batch": 2, "steps": len(step_ms), "setup_steps": setup,
                           "setup_s": sum(step_ms[:setup]) / 1e3, "step_ms": step_ms}}
    task = EfficiencyTask({"lengths": [64]})
    a, b = record(0, [900.0, 10.0, 11.0, 50.0, 12.0], setup=1), record(1, [10.0, 13.0, 60.0])
    assert task.score_record(SimpleNamespace(meta={}), a) == pytest.approx(2e3 / 11.5)  # median of 10, 11, 50, 12
    e = task.aggregate([a, b])["efficiency"]["64"]
    assert e["ms_per_step"] == 12.0 and e["decode_tokens_per_s"] == pytest.approx(2e3 / 12.0)
    assert e["ms_per_step_mean"] == pytest.approx((83 + 83) / 7)
    del a["decode"]["step_ms"]
    assert task.score_record(SimpleNamespace(meta={}), a) == pytest.approx(2 * 4 / 0.083)
