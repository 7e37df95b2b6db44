"""benchmarks/topk_ties.py: what ``torch.topk`` keeps of tied values at its cut (run by gpu_check.sh on CUDA), and
the switch to the highest tied slots its smoke-score measurement uses."""
import importlib.util
import subprocess
import sys

import torch

from conftest import REPO
from rocketkv.core import kernels

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
    highest, calls = ties.highest_ties(kernels.select_units)
    # pages of 3 slots, 8 live slots (the last page holds 2): page 1 wins, then pages 0 and 2 tie
    scores = torch.tensor([[1.0, 2.0, 1.0]])
    upto = torch.tensor(8)
    ours, count, _ = kernels.select_units(scores, upto, 3, 5, 5, True, backend="torch")
    assert ours.tolist() == [[0, 1, 3, 4, 5]] and count.tolist() == [5]  # page 1, then page 0's lowest two
    theirs, count, _ = highest(scores, upto, 3, 5, 5, True)
    assert theirs.tolist() == [[1, 2, 3, 4, 5]] and count.tolist() == [5]  # page 0's highest two instead
    # the last page, partly filled, at the cut: its highest live slots are 6 and 7, never the empty 8
    theirs, _, _ = highest(torch.tensor([[1.0, 2.0, 3.0]]), upto, 3, 4, 6, True)
    assert theirs.tolist() == [[4, 5, 6, 7, -1, -1]]
    assert calls[0] == 2


def test_the_switch_reaches_the_methods_and_is_undone():
    from conftest import peaky_model
    from rocketkv.core import compress

    model = peaky_model("llama")
    ids = torch.randint(3, 1000, (1, 300), generator=torch.Generator().manual_seed(0))
    ties = load_script()
    original, monkey = kernels.select_units, []
    calls = ties.patch_ties(monkey)
    try:
        with compress(model, "hsa", 32, max_new_tokens=3) as session, torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        assert not session.plan["dense"] and calls[0] == 3 * model.config.num_hidden_layers  # every decode step
    finally:
        ties.unpatch(monkey)
    assert not monkey and kernels.select_units is original
