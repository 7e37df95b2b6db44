"""benchmarks/step_functions.py: every selection function it times is reached inside a real decode step."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_step_functions_times_each_methods_functions_inside_the_step():
    run = subprocess.run([sys.executable, "benchmarks/step_functions.py", "--model", "tiny-random", "--length", "300",
                          "--rounds", "1", "--methods", "full", "rocketkv", "topk", "sparq", "quest",
                          "--kernels", "auto", "torch"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split()[0]: line for line in run.stdout.splitlines() if "ms/step" in line}
    pages = {"numba": {"fold_page_bounds"}, "torch": {"fold_page_bounds", "fold_reference"}}  # the torch fold
    sparq_fold = {"numba": {"fold_sparq_slot"}, "torch": {"fold_sparq_slot", "fold_sparq_reference"}}
    for backend, path in (("auto", "numba"), ("torch", "torch")):
        want = {"full": {"attention"},
                "rocketkv": {"attention", "hsa_page_probs", "select_units", "attend_indices"} | pages[path],
                "topk": {"attention", "slot_scores", "select_units", "attend_indices", "union_reads"},
                "sparq": {"attention", "slot_scores", "select_units", "attend_indices", "union_reads"} | sparq_fold[path],
                "quest": {"attention", "quest_group_scores", "select_units"} | pages[path]}
        for method, functions in want.items():
            row = rows[f"{method}[{backend}]"]
            timed = dict(re.findall(r"(\w+) (\d+)(?:,|$)", row.split("µs/layer:")[1]))
            assert set(timed) == functions and int(timed["attention"]) > 0, row
            ms, ratio = re.search(r"([\d.]+) ms/step\s+([\d.]+)x full", row).groups()
            assert float(ms) > 0 and (row.split()[0] != "full[auto]" or ratio == "1.00")
