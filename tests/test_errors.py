"""Bad input on the command line ends with one line ``error: <message>`` and exit code 2, before any model is
loaded; the message names the bad value and what would be valid.  ``ROCKETKV_DEBUG=1`` shows the traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SUBPROCESS_TIMEOUT
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
    (["+method.kernels=cuda"], ["kernels='cuda'", "auto, torch, triton or numba"]),
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


def one_error_line(code, err) -> str:
    """The one ``error:`` line a refused run prints, with exit code 2."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("overrides,fragments", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_with_exit_code_2(run_cli, overrides, fragments):
    line = one_error_line(*run_cli(*overrides))
    for fragment in fragments:
        assert fragment in line, (fragment, line)


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
                         cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert out.returncode == 0  # --cfg job only prints the config: limit is checked when a run starts
    out = subprocess.run([sys.executable, "run_eval.py", "method=nope"], cwd=REPO, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT, env=env)
    assert out.returncode != 0 and "Traceback" in out.stderr and "method/nope" in out.stderr
    out = subprocess.run([sys.executable, "run_eval.py", "method=nope"], cwd=REPO, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT)
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: unknown method 'nope'; valid: adakv, duoattention, full, hsa, pyramidkv, quest, rocketkv, "
        "rocketkv_mt, snapkv, sparq, streamingllm, topk")


# ---------------------------------------------------------------- what a new user hit (issue 31)
# Each case fails before any model is loaded (the run_cli fixture fails the test otherwise).
NEW_USER_INPUTS = [
    (["task=efficiency", "model=llama3.1-8b-random", "model.device=cpu", "model.parameters=4000000000000"],
     ["model=llama3.1-8b-random needs 14901.2 GiB", "float32 alone", "GiB available"]),
    (["threads=abc"], ["threads='abc'", "positive integer", "auto", "null"]),
    (["task=longbench", "task.max_new_tokens=0"], ["task.max_new_tokens=0", "integer >= 1"]),
    (["task=longbench", "task.subsets=[trec]"], ["LongBench data is not available", "task.data_dir=",
                                                   "docs/tasks.md, LongBench: 'Data on an offline cluster'"]),
]


def test_the_longbench_hub_error_points_at_a_section_that_exists():
    from evals.longbench.data import OFFLINE_DATA_DOC

    doc, _, section = OFFLINE_DATA_DOC.partition(", ")
    text = (REPO / doc).read_text()
    heading, _, name = section.partition(": ")
    assert f"## {heading} (`task=longbench`)" in text
    assert f"**{name.strip(chr(39))}**" in text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("overrides,fragments", NEW_USER_INPUTS, ids=[" ".join(o) for o, _ in NEW_USER_INPUTS])
def test_new_user_input_is_one_error_line(run_cli, overrides, fragments):
    test_bad_input_is_one_error_line_with_exit_code_2(run_cli, overrides, fragments)


def test_a_hub_model_without_the_hub_says_how_to_use_a_local_copy(monkeypatch, capsys, tmp_path):
    """No stub: the real loader meets the unreachable hub (HF_HUB_OFFLINE, as on this machine)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")
    monkeypatch.setattr(sys, "argv", ["run_eval.py", *BASE[1:], "model=llama3.1-8b-instruct", f"output_dir={tmp_path}"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    line = one_error_line(done.value.code, capsys.readouterr().err)
    assert "model=llama3.1-8b-instruct" in line and "'meta-llama/Llama-3.1-8B-Instruct'" in line
    assert "hub is unreachable" in line and "model.path=<folder>" in line


def cell_folder(compose_cfg, *overrides) -> Path:
    """The results folder ``python run_eval.py <overrides>`` writes its (single) cell to."""
    from rocketkv.harness.cells import grid_configs, make_cell

    cfg = compose_cfg(*BASE, *overrides)
    return make_cell(grid_configs(cfg)[0], cfg.model.name, None).out_dir


def test_a_prediction_row_without_an_id_names_the_file_and_line(run_cli, compose_cfg, tmp_path):
    folder = cell_folder(compose_cfg, f"output_dir={tmp_path}")
    folder.mkdir(parents=True)
    (folder / "predictions.jsonl").write_text('{"id": "a", "score": 1}\n{"prediction": "no id here"}\n')
    line = one_error_line(*run_cli())
    assert f"{folder / 'predictions.jsonl'}: line 2 is not a prediction row" in line and "'id'" in line


def test_a_busy_cell_stops_before_the_model_loads(run_cli, compose_cfg, tmp_path):
    from filelock import FileLock

    folder = cell_folder(compose_cfg, f"output_dir={tmp_path}")
    folder.mkdir(parents=True)
    with FileLock(folder / ".predictions.lock"):  # another job is running the cell
        line = one_error_line(*run_cli())
    assert "another job is already running needle/tiny-random/rocketkv@256" in line


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/sys is Linux's")
def test_an_unwritable_output_dir_is_named_before_the_model_loads(run_cli):
    line = one_error_line(*run_cli("output_dir=/sys/rocketkv-results"))  # not writable, not even for root
    assert "output_dir='/sys/rocketkv-results' is not writable" in line


def test_a_read_only_results_folder_is_one_line(run_cli, read_only_tree):
    """A results folder with an earlier, unfinished run, made read-only (and the test run unprivileged)."""
    root, user = read_only_tree
    with user():
        line = one_error_line(*run_cli(f"output_dir={root}", "hydra.run.dir=."))  # the default: nothing written
    assert f"output_dir='{root}' is not writable (permission denied" in line


@pytest.fixture
def read_only_tree(tmp_path_factory):
    """(a read-only results root holding one run folder, a context manager that drops root's privileges)."""
    import contextlib
    import os
    import stat
    import tempfile

    # under the system temp folder, which any user may enter (pytest's own tmp folders are owner-only)
    root = Path(tempfile.mkdtemp(prefix="rocketkv-ro-")) / "results"
    folder = root / "runs" / "needle" / "tiny-random" / "full" / "none" / "abc"
    folder.mkdir(parents=True)
    (folder / "predictions.jsonl").write_text(json.dumps({"id": "a", "subtask": "", "score": 50.0}) + "\n")
    for path in [root.parent, *sorted(root.rglob("*")), root]:
        path.chmod(0o555 if path.is_dir() else 0o444)

    @contextlib.contextmanager
    def unprivileged():
        if os.geteuid() != 0:
            yield
            return
        os.seteuid(65534)  # nobody: root would write anyway; the saved uid lets us come back
        try:
            yield
        finally:
            os.seteuid(0)

    yield root, unprivileged
    for path in [root.parent, *root.rglob("*")]:
        path.chmod(stat.S_IRWXU)
    import shutil
    shutil.rmtree(root.parent)


def test_rocketkv_report_errors_are_one_line(capsys, read_only_tree, tmp_path):
    from rocketkv.harness.report.cli import main as report

    assert report(["--status", str(tmp_path / "no-grid.yaml")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --status {tmp_path / 'no-grid.yaml'}: no such file; give a "
                                               "grid spec YAML (tasks, models, methods, budgets)")
    root, user = read_only_tree
    with user():
        assert report(["--root", str(root), "--no-plots"]) == 2
    line = one_error_line(2, capsys.readouterr().err)
    assert "permission denied" in line and str(root) in line and f"--root {root}" in line


# ---------------------------------------------------------------------- issue 31: the lm-eval bridge's refusals
LM_EVAL_FIXTURES = REPO / "tests" / "fixtures" / "lm_eval"
LM_EVAL = ["task=lm_eval", "task.names=[rocketkv_copy2]", f"task.include_path={LM_EVAL_FIXTURES}",
           "task.include_defaults=false"]
LM_EVAL_BAD_INPUTS = [
    ([*LM_EVAL, "task.metric=acc"], ["task.metric='acc'", "rocketkv_copy2", "valid: exact,none, contains,none"]),
    ([*LM_EVAL, "+task.gen_kwargs.do_sample=true"], ["'rocketkv_copy2' asks for sampling", "greedily"]),
    ([*LM_EVAL, "+task.gen_kwargs.num_beams=4"], ["['num_beams']", "supported: until, max_gen_toks"]),
]


@pytest.mark.parametrize("overrides,fragments", LM_EVAL_BAD_INPUTS,
                         ids=[" ".join(o[4:]) for o, _ in LM_EVAL_BAD_INPUTS])
def test_lm_eval_task_bad_input_is_one_error_line(run_cli, overrides, fragments):
    pytest.importorskip("lm_eval")
    test_bad_input_is_one_error_line_with_exit_code_2(run_cli, overrides, fragments)


@pytest.mark.parametrize("args,fragments", [
    (["--model_args", "pretrained=unused,methd=full"], ["unknown --model_args key(s) 'methd'",
                                                        "did you mean 'method'", "budget"]),
    (["--model_args", "pretrained=unused,method=full", "--batch_size", "4"], ["batch_size=4 is not supported",
                                                                             "one request at a time"]),
    (["--model_args", "pretrained=unused,method=snap"], ["unknown method 'snap'", "rocketkv"]),
])
def test_rocketkv_lm_eval_bad_model_args_are_one_error_line(monkeypatch, capsys, args, fragments):
    pytest.importorskip("lm_eval")
    from rocketkv.harness import lm_eval_cli

    monkeypatch.delenv("ROCKETKV_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["rocketkv-lm-eval", "--model", "rocketkv", *args, "--tasks", "rocketkv_copy",
                                      "--include_path", str(LM_EVAL_FIXTURES), "--device", "cpu"])
    with pytest.raises(SystemExit) as done:
        lm_eval_cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[-1].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[-1], (fragment, err[-1])
