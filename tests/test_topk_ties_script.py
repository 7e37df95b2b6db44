"""benchmarks/topk_ties.py: what ``torch.topk`` keeps of tied values at its cut (run by gpu_check.sh on CUDA), and
the switch to the highest tied slots its smoke-score measurement uses."""
import importlib.util
import subprocess
import sys

import torch

from conftest import REPO
from rocketkv.core.methods import ops

SCRIPT = REPO / "benchmarks" / "topk_ties.py"


def load_script():
    spec = importlib.util.spec_from_file_location("topk_ties", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_verdict_names_which_tied_indices_came_back():
    ties = load_script()
    tied = torch.tensor([3, 4, 5, 6])
    assert ties.verdict(torch.tensor([3, 4]), tied, 2) == "lowest"
    assert ties.verdict(torch.tensor([5, 6]), tied, 2) == "highest"
    assert ties.verdict(torch.tensor([3, 6]), tied, 2) == "mixed"
    scores, k, tied = ties.tie_case(1024, "page", torch.float32, "cpu")
    top = scores[0].topk(k).values
    # the cut falls inside the tied block: the winners, then some of the ties
    assert (top[: k - len(tied) // 2] > 0.75).all() and (top[-(len(tied) // 2):] == 0.75).all()


def test_the_script_prints_one_summary_line_per_device_on_cpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("cpu: topk ties -> ") and last.split(" -> ")[1].split()[0] in ("lowest", "highest", "mixed")
    assert "of 240 rows" in last


def test_the_highest_ties_switch_against_a_reference():
    ties = load_script()
    highest, calls = ties.highest_ties(ops.topk_slots)
    scores = torch.tensor([[0.5, 2.0, 1.0, 1.0, 1.0, 1.0, float("-inf"), 0.1]])
    # k = 3: slot 1 wins, two of the four tied slots 2..5 follow
    assert ops.topk_slots(scores, 3).tolist() == [[1, 2, 3]]  # ours: the lowest tied slots
    assert highest(scores, 3).tolist() == [[1, 4, 5]]
    assert highest(scores, 8).tolist() == [[0, 1, 2, 3, 4, 5, 7, -1]]  # -inf never counts, -1 pads the end
    assert calls[0] == 2


def test_the_switch_reaches_the_methods_and_is_undone():
    import rocketkv.core.methods.hsa as hsa

    ties = load_script()
    original, monkey = ops.topk_slots, []
    ties.patch_ties(monkey)
    try:
        assert hsa in [module for module, _ in monkey], "HSA's decode no longer uses topk_slots: update patch_ties"
        assert all(module.topk_slots is not original for module, _ in monkey)
    finally:
        ties.unpatch(monkey)
    assert not monkey and hsa.topk_slots is original and ops.topk_slots is original
