"""benchmarks/grid_floor.py: the oracle forward it times feeds every cell its own exact tokens, so each fed position
chooses the token fed after it, as the cell decoded alone does (else the bound it prints would not be one)."""
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

from conftest import peaky_model
from rocketkv.methods import make_method
from test_generation_equivalence import MAX_NEW, SMALL, prompt, shared_prefill
from test_row_decode import alone

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as when run as a script: grid_floor imports the grid from grid_cost
spec = importlib.util.spec_from_file_location("grid_floor", BENCHMARKS / "grid_floor.py")
grid_floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grid_floor)


def test_oracle_feed():
    assert grid_floor.oracle_feed(7, [1, 2, 3], max_new=3) == [7, 1, 2]  # a full decode: its last token is only chosen
    assert grid_floor.oracle_feed(7, [1, 2], max_new=3) == [7, 1, 2]  # ended early: its end is chosen after the last


def test_oracle_rows_choose_each_cells_own_tokens():
    model = peaky_model("llama")
    model.generation_config.eos_token_id = None
    ids = prompt(seed=8)
    shared = shared_prefill(model, ids, capture_window=32)
    cells = SMALL[1:]
    feeds = [grid_floor.oracle_feed(int(ids[0, -1]), alone(model, shared, ids, cell)[0], MAX_NEW) for cell in cells]
    assert len({tuple(f) for f in feeds}) > 2  # the cells decode differently: each row needs its own tokens
    methods = [make_method(name, budget=budget, **options) for name, budget, options in cells]
    t_fork, t_forward, agree = grid_floor.verify_once(
        model, SimpleNamespace(max_len=None), SimpleNamespace(max_new_tokens=MAX_NEW), SimpleNamespace(cache=shared),
        methods, feeds)
    assert t_fork > 0 and t_forward > 0
    assert agree >= sum(len(f) - 1 for f in feeds) - 2  # a near tie on the tiny model may flip under batching
