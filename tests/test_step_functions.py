"""benchmarks/step_functions.py: every selection function it times is reached inside a real decode step."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_step_functions_times_each_methods_functions_inside_the_step():
    run = subprocess.run([sys.executable, "benchmarks/step_functions.py", "--model", "tiny-random", "--length", "300",
                          "--rounds", "1", "--methods", "full", "rocketkv", "topk", "sparq", "quest"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split()[0]: line for line in run.stdout.splitlines() if "ms/step" in line}
    want = {"full": {"attention"},
            "rocketkv": {"attention", "hsa_page_probs", "select_units", "attend_indices", "fold_page_bounds",
                         "fold_reference"},
            "topk": {"attention", "slot_scores", "select_units", "attend_indices", "union_reads"},
            "sparq": {"attention", "slot_scores", "select_units", "attend_indices", "union_reads"},
            "quest": {"attention", "quest_group_scores", "select_units", "fold_page_bounds", "fold_reference"}}
    for method, functions in want.items():
        timed = dict(re.findall(r"(\w+) (\d+)(?:,|$)", rows[method].split("µs/layer:")[1]))
        assert set(timed) == functions and int(timed["attention"]) > 0, rows[method]
        ms, ratio = re.search(r"([\d.]+) ms/step\s+([\d.]+)x full", rows[method]).groups()
        assert float(ms) > 0 and (method != "full" or ratio == "1.00")
