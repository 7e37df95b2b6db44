"""Bad input on the command line ends with one line ``error: <message>`` and exit code 2, before any model is
loaded; the message names the bad value and what would be valid.  ``ROCKETKV_DEBUG=1`` shows the traceback."""
import subprocess
import sys

import pytest

from conftest import REPO
from rocketkv.harness import cli

BASE = ["model=tiny-random", "update_leaderboard=false", "progress=false"]
TINY = [*BASE, "task.lengths=[300]", "task.depths=[0.5]"]

# (overrides, fragments the one error line must contain: the bad value, and what is valid)
BAD_INPUTS = [
    (["method=nope"], ["unknown method 'nope'", "rocketkv", "snapkv"]),
    (["task=nope"], ["unknown task 'nope'", "needle", "longbench"]),
    (["model=nope"], ["unknown model 'nope'", "smollm2-135m", "tiny-random"]),
    (["+experiment=nope"], ["unknown experiment 'nope'", "paper_grid"]),
    (["budget=0"], ["budget=0", "minimum of 16"]),
    (["budget=abc"], ["budget='abc'", "positive integer"]),
    (["budget=8"], ["budget=8", "minimum of 16"]),
    (["limit=-1"], ["limit=-1", "positive integer", "null"]),
    (["limit=0"], ["limit=0", "positive integer"]),
    (["limit=abc"], ["limit='abc'", "positive integer"]),
    (["shard=3/2"], ["shard='3/2'", "0 <= i < n"]),
    (["threads=0"], ["threads=0", "positive integer"]),
    (["seed=abc"], ["seed='abc'", "integer"]),
    (["method.window=0"], ["window=0", "integer >= 1"]),
    (["+method.kernels=cuda"], ["kernels='cuda'", "auto, torch or triton"]),
    (["method=snapkv", "method.selection=row"], ["selection='row'", "head or group"]),
    (["method.kernel_size=abc"], ["kernel_size='abc'", "odd integer >= 1", "auto"]),
    (["method.kernel_size=64"], ["kernel_size=64", "odd integer >= 1"]),
    (["method=snapkv", "method.kernel_size=-1"], ["kernel_size=-1", "odd integer >= 1"]),
    (["method.adaptive_kernel_sizes=[[100,63]]"], ["adaptive_kernel_sizes=[[100, 63]]", "rising from 0"]),
    (["method.adaptive_kernel_sizes=[[0,63],[49152,512]]"], ["[49152, 512]", "odd kernels"]),
    (["method.split_ratio=1.5"], ["split_ratio=1.5", "0 < split_ratio < 1"]),
    (["method=quest", "method.page_size=0"], ["page_size=0", "from 1 to the budget"]),
    (["method.nonexistent=1"], ["unknown option 'method.nonexistent'", "kernel_size", "window"]),
    (["foo=1"], ["unknown option 'foo'", "budget", "limit"]),
    (["grid.methods=[full,nope]"], ["unknown method 'nope'", "rocketkv"]),
    (["grid.skip_invalid=maybe"], ["grid.skip_invalid='maybe'", "true or false"]),
    (["model.dtype=fp8"], ["model.dtype='fp8'", "float32", "bfloat16"]),
    (["model.device=gpu0"], ["model.device='gpu0'", "cuda:<index>"]),
    (["task.lengths=[9000]"], ["[9000]", "max length 8192", "use lengths <= 8176"]),
    (["task.lengths=[abc]"], ["task.lengths=['abc']", "integers >= 64"]),
    (["task.depths=[1.5]"], ["task.depths=[1.5]", "between 0 and 1"]),
    (["task.haystack=poems"], ["haystack='poems'", "noise", "prose"]),
    (["task.repeats=0"], ["task.repeats=0", "integer >= 1"]),
    (["task=efficiency", "task.max_new_tokens=1"], ["max_new_tokens=1", "integer >= 2"]),
    (["task=longbench", "task.subsets=[nope]"], ["nope", "narrativeqa"]),
    (["task=longbench", "task.data_dir=/no/such/folder"], ["/no/such/folder", "no such folder"]),
    (["task=ruler", "task.tasks=[nope]"], ["nope", "niah_single_1"]),
    (["task=ruler", "task.max_seq_length=[-5]"], ["max_seq_length", "positive"]),
    (["budget"], ["budget", "missing EQUAL"]),
    (["model.prompt_format=chatml"], ["model.prompt_format='chatml'", "chat_template, llama3, vicuna, raw"]),
    (["model.add_bos=maybe"], ["model.add_bos='maybe'", "auto, true or false"]),
    (["model.max_prompt_len=0"], ["model.max_prompt_len=0", "positive number of tokens", "null"]),
    (["model.max_prompt_len=-5"], ["model.max_prompt_len=-5", "positive number of tokens"]),
    (["model.max_prompt_len=9000"], ["model.max_prompt_len=9000 exceeds model.max_len=8192", "<= 8192"]),
    (["model.cuda_dtype=fp8"], ["model.cuda_dtype='fp8'", "float16", "bfloat16"]),
    (["skip_layers=-1"], ["skip_layers=-1", "integer >= 0", "null"]),
    (["protocol=nope"], ["unknown protocol 'nope'", "none", "paper"]),
    (["task.haystack=file"], ["task.haystack=file needs haystack_file=", "Paul Graham"]),
    (["+experiment=paper_protocol"], ["task.haystack=file needs haystack_file="]),
    (["task.haystack=file", "task.haystack_file=/no/such/essays"], ["task.haystack_file='/no/such/essays' does "
                                                                    "not exist", "text file"]),
    (["task.length_unit=chars"], ["task.length_unit='chars'", "tokens", "words"]),
    (["task=ruler", "task.max_new_tokens=0"], ["task.max_new_tokens=0", "integer >= 1"]),
]


@pytest.fixture
def run_cli(monkeypatch, capsys, tmp_path):
    """``python run_eval.py <overrides>`` in this process: (exit code, stderr).  Loading a model fails the test."""
    import rocketkv.harness.runner as runner

    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the error"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")
    monkeypatch.delenv("ROCKETKV_DEBUG", raising=False)

    def _run(*overrides):
        argv = ["run_eval.py", *BASE, f"output_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra", *overrides]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as done:
            cli.main()
        return done.value.code, capsys.readouterr().err

    return _run


@pytest.mark.parametrize("overrides,fragments", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_with_exit_code_2(run_cli, overrides, fragments):
    code, err = run_cli(*overrides)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_a_budget_below_the_window_names_the_budget_that_works(monkeypatch, capsys, tmp_path):
    """Found once the prompts are tokenised (the tiny model loads in a second), still before any decoding."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")
    monkeypatch.setattr(sys, "argv", ["run_eval.py", *TINY, f"output_dir={tmp_path}", f"hydra.run.dir={tmp_path}/h",
                                      "method=snapkv", "budget=64"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1
    assert "snapkv@64: budget=64" in err and "below the observation window w=32" in err and "budget >= 128" in err
    assert not list(tmp_path.glob("runs/**/predictions.jsonl"))


def test_debug_shows_the_traceback():
    env = {"ROCKETKV_DEBUG": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "run_eval.py", "limit=-1", "model=tiny-random", "--cfg", "job"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0  # --cfg job only prints the config: limit is checked when a run starts
    out = subprocess.run([sys.executable, "run_eval.py", "method=nope"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode != 0 and "Traceback" in out.stderr and "method/nope" in out.stderr
    out = subprocess.run([sys.executable, "run_eval.py", "method=nope"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: unknown method 'nope'; valid: adakv, duoattention, full, hsa, pyramidkv, quest, rocketkv, "
        "rocketkv_mt, snapkv, sparq, streamingllm, topk")
