"""`+experiment=paper_protocol`: RocketKV's official evaluation protocol, composed per model and task.

The prompts of the three paper models are checked token for token on the LongBench fixture with offline stand-in
tokenizers (tests/standin_tokenizers.py) against the official rules, written out here: the template text, the
BOS (twice for Llama-3.1, never for Mistral on the chat subsets), and the middle truncation to the cap.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, SUBPROCESS_TIMEOUT
from evals.base import stable_hash
from rocketkv.harness.cells import config_hash, grid_configs, make_cell
from rocketkv.harness.models import ModelSpec, resolve_dtype
from rocketkv.harness.runner import build_prompts, build_task, run
from standin_tokenizers import byte_ids, standin_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "longbench"
LLAMA, MISTRAL, LONGCHAT = "llama3.1-8b-instruct", "mistral-7b-instruct-v0.2", "longchat-7b-v1.5-32k"
NO_CHAT = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}  # official get_pred: no template on these
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions. USER: {} ASSISTANT:")
DEPTHS = [i / 9 for i in range(10)]
WORDS_LLAMA = [2048, 10922, 19797, 28672, 37546, 46421, 55296, 64170, 73045, 81920]
WORDS_32K = [512, 2730, 4949, 7168, 9386, 11605, 13824, 16042, 18261, 20480]

# the official values (NVlabs/RocketKV config/ and scripts/), written out independently of conf/
OFFICIAL = {
    (LLAMA, "longbench"): {"model.prompt_format": "chat_template", "model.add_bos": True,
                           "model.max_prompt_len": 127500, "skip_layers": None},
    (MISTRAL, "longbench"): {"model.prompt_format": "raw", "model.add_bos": False, "model.chat_template": True,
                             "model.max_prompt_len": 31500, "skip_layers": None},
    (LONGCHAT, "longbench"): {"model.prompt_format": "vicuna", "model.add_bos": True, "model.chat_template": True,
                              "model.max_prompt_len": 31500, "skip_layers": 2},
    (LLAMA, "ruler"): {"model.prompt_format": "llama3", "model.add_bos": True, "model.max_prompt_len": None,
                       "task.max_seq_length": [16000, 32000, 64000, 96000], "skip_layers": None},
    (MISTRAL, "ruler"): {"model.prompt_format": "raw", "model.add_bos": True, "model.max_prompt_len": None,
                         "task.max_seq_length": [8000, 16000, 24000, 32000], "skip_layers": None},
    (LONGCHAT, "ruler"): {"model.prompt_format": "vicuna", "model.add_bos": True, "model.max_prompt_len": None,
                          "task.max_seq_length": [8000, 16000, 24000, 32000], "skip_layers": 2},
    (LLAMA, "needle"): {"task.lengths": WORDS_LLAMA, "skip_layers": None},
    (MISTRAL, "needle"): {"task.lengths": WORDS_32K, "skip_layers": None},
    (LONGCHAT, "needle"): {"task.lengths": WORDS_32K, "skip_layers": 2},
}
EVERY_TASK = {"ruler": {"task.max_new_tokens": None, "task.num_samples": 50, "task.tasks": "all"},
              "needle": {"task.length_unit": "words", "task.haystack": "file", "task.depths": DEPTHS,
                         "task.repeats": 3, "task.key_digits": 7, "task.max_new_tokens": 128,
                         "task.chat_template": False, "task.seed": 42, "model.max_prompt_len": None},
              "longbench": {}}


def value(cfg, dotted):
    return OmegaConf.select(cfg, dotted)


@pytest.mark.parametrize("model,task", sorted(OFFICIAL))
def test_the_preset_sets_every_official_value(compose_cfg, model, task):
    cfg = compose_cfg("+experiment=paper_protocol", f"model={model}", f"task={task}")
    expected = {"model.cuda_dtype": "float16", **EVERY_TASK[task], **OFFICIAL[(model, task)]}
    assert {k: value(cfg, k) for k in expected} == expected


def test_without_the_preset_nothing_changes(compose_cfg):
    cfg = compose_cfg(f"model={MISTRAL}", "task=longbench")
    assert OmegaConf.to_container(cfg.model) == {
        "cuda_dtype": "bfloat16", "prompt_format": "chat_template", "add_bos": "auto", "max_prompt_len": None,
        "plan_len_cap": None, "special_tokens": "skip",
        **OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{MISTRAL}.yaml"))}
    assert cfg.skip_layers is None and "protocol" not in cfg
    assert cfg.window is None and cfg.decode_last_prompt_token is None


def test_cfg_job_prints_the_official_values_for_mistral_on_longbench():
    out = subprocess.run([sys.executable, "run_eval.py", "+experiment=paper_protocol", f"model={MISTRAL}",
                          "task=longbench", "--cfg", "job"], cwd=REPO, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert {k: cfg["model"][k] for k in ("cuda_dtype", "prompt_format", "add_bos", "max_prompt_len",
                                         "chat_template")} == \
        {"cuda_dtype": "float16", "prompt_format": "raw", "add_bos": False, "max_prompt_len": 31500,
         "chat_template": True}


def test_it_composes_with_the_paper_grid_and_equals_protocol_paper(compose_cfg):
    both = compose_cfg("+experiment=[paper_grid,paper_protocol]", f"model={LONGCHAT}", "task=ruler")
    assert list(both.grid.budgets) == [256, 512, 1024, 2048, 4096] and both.update_leaderboard is False
    assert both.skip_layers == 2 and both.model.prompt_format == "vicuna" and both.model.cuda_dtype == "float16"
    alone = compose_cfg("protocol=paper", f"model={LONGCHAT}", "task=ruler")
    assert OmegaConf.to_container(alone.model) == OmegaConf.to_container(both.model)
    assert OmegaConf.to_container(alone.task) == OmegaConf.to_container(both.task)


def test_a_model_without_official_values_gets_the_common_items(compose_cfg):
    cfg = compose_cfg("+experiment=paper_protocol", "model=tiny-random", "task=longbench")
    assert cfg.model.cuda_dtype == "float16" and cfg.model.prompt_format == "chat_template"
    assert cfg.model.max_prompt_len is None and cfg.skip_layers is None


def test_fp16_on_cuda_fp32_on_cpu(compose_cfg):
    spec = ModelSpec.from_cfg(OmegaConf.to_container(compose_cfg("+experiment=paper_protocol", f"model={LLAMA}").model))
    import torch

    assert resolve_dtype(spec.dtype, torch.device("cuda"), spec.cuda_dtype) == torch.float16
    assert resolve_dtype(spec.dtype, torch.device("cpu"), spec.cuda_dtype) == torch.float32
    default = ModelSpec.from_cfg(OmegaConf.to_container(compose_cfg(f"model={LLAMA}").model))
    assert resolve_dtype(default.dtype, torch.device("cuda"), default.cuda_dtype) == torch.bfloat16


# ---------------------------------------------------------------- prompts, token for token
def longbench_prompts(compose_cfg, model, *overrides):
    cfg = compose_cfg("+experiment=paper_protocol", f"model={model}", "task=longbench", f"task.data_dir={FIXTURES}",
                      f"task.cache_dir={REPO / 'results' / 'cache' / 'test_datasets'}", *overrides)
    spec = ModelSpec.from_cfg(OmegaConf.to_container(cfg.model, resolve=True))
    task = build_task(cfg.task)
    samples = task.samples(None, spec.max_len)
    tok = standin_tokenizer(model)
    return tok, samples, {sid: rows[0] for sid, rows in build_prompts(tok, spec, samples, task).items()}


def llama_chat_ids(tok, prompt):
    """Llama-3.1's chat template as text, tokenised with add_special_tokens=True: the template's BOS + another."""
    bos, sh, eh, eot = (tok.convert_tokens_to_ids(t) for t in
                        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    b = lambda text: byte_ids(tok, text)  # noqa: E731
    return ([bos, bos, sh] + b("system") + [eh] + b("\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul "
                                                   "2024\n\n") + [eot, sh] + b("user") + [eh] + b("\n\n" + prompt)
            + [eot, sh] + b("assistant") + [eh] + b("\n\n"))


def expected_ids(model, tok, sample):
    bos = tok.bos_token_id
    if sample.subtask in NO_CHAT:  # every model: the raw prompt with the tokenizer's BOS
        return [bos] + byte_ids(tok, sample.prompt)
    if model == LLAMA:
        return llama_chat_ids(tok, sample.prompt)
    if model == MISTRAL:
        return byte_ids(tok, sample.prompt)
    return [bos] + byte_ids(tok, VICUNA.format(sample.prompt))


@pytest.mark.parametrize("model", [LLAMA, MISTRAL, LONGCHAT])
def test_longbench_prompts_follow_the_official_rules(compose_cfg, model):
    tok, samples, prompts = longbench_prompts(compose_cfg, model)
    assert {s.subtask for s in samples} >= NO_CHAT | {"narrativeqa", "multi_news"}
    bos = tok.bos_token_id
    for s in samples:
        ids = prompts[s.id]
        assert ids == expected_ids(model, tok, s), s.id
        n_bos = 1 if s.subtask in NO_CHAT else {LLAMA: 2, MISTRAL: 0, LONGCHAT: 1}[model]
        assert ids.count(bos) == n_bos and ids[:n_bos] == [bos] * n_bos, s.id
    if model == MISTRAL:  # Mistral's own [INST] template is never used
        assert not any("[INST]" in tok.decode(ids) for ids in prompts.values())


@pytest.mark.parametrize("model", [LLAMA, MISTRAL, LONGCHAT])
def test_prompts_over_the_cap_keep_its_first_and_last_halves(compose_cfg, model):
    cap = 160
    tok, samples, full = longbench_prompts(compose_cfg, model)
    _, _, cut = longbench_prompts(compose_cfg, model, f"model.max_prompt_len={cap}")
    specials = set(tok.get_added_vocab().values())  # BOS, EOS, the header tokens
    checked = 0
    for s in samples:
        ids = full[s.id]
        if len(ids) <= cap:
            assert cut[s.id] == ids
            continue
        checked += 1
        head, tail = ids[:cap // 2], ids[-(cap // 2):]
        if model == LLAMA and s.subtask not in NO_CHAT:
            # the official code decodes both halves without special tokens and tokenises the text again with
            # BOS: one <|begin_of_text|> left, the header tokens gone
            expected = [tok.bos_token_id] + [i for i in head + tail if i not in specials]
            assert cut[s.id] == expected and cut[s.id].count(tok.bos_token_id) == 1
        else:
            assert cut[s.id] == head + tail and len(cut[s.id]) == cap
    assert checked >= 10


def test_a_cap_that_leaves_no_room_for_the_answer_is_refused(compose_cfg):
    # narrativeqa, the first subset, generates 128 tokens
    with pytest.raises(ValueError, match=r"max_prompt_len=32700 plus 128 new tokens .* use max_prompt_len <= 32640"):
        longbench_prompts(compose_cfg, MISTRAL, "model.max_prompt_len=32700")


# ---------------------------------------------------------------- budgets planned for S capped by the cap
def test_the_sequence_length_for_budgets_is_capped_by_the_cap(compose_cfg):
    for model, cap, official_max in ((LLAMA, 127500, 128000), (MISTRAL, 31500, 32000), (LONGCHAT, 31500, 32000)):
        cfg = compose_cfg("+experiment=paper_protocol", f"model={model}", "task=longbench")
        assert ModelSpec.from_cfg(OmegaConf.to_container(cfg.model)).plan_max_len == cap
        # RULER: the official model_max_len (128,000 / 32,000), not the model's 131,072 / 32,768
        ruler = compose_cfg("+experiment=paper_protocol", f"model={model}", "task=ruler")
        assert ModelSpec.from_cfg(OmegaConf.to_container(ruler.model)).plan_max_len == official_max


def test_a_run_plans_its_budgets_for_the_capped_length(compose_cfg, tmp_path):
    import rocketkv

    [metrics] = run(compose_cfg("model=tiny-random", "task=needle", "task.lengths=[300]", "task.depths=[0.5]",
                                "model.max_prompt_len=200", "method=rocketkv", "budget=32", f"output_dir={tmp_path}",
                                "update_leaderboard=false", "progress=false"))
    [pred] = [json.loads(line) for line in (Path(metrics["run"]["results_dir"]) / "predictions.jsonl").open()]
    n = pred["prompt_tokens"]
    assert 190 <= n <= 200  # the prompt of about 300 tokens, cut to the cap (re-tokenised at the join)
    plan = rocketkv.resolve_budget("rocketkv", 32, prompt_len=n, max_new_tokens=16, head_dim=32, model_max_len=200)
    uncapped = rocketkv.resolve_budget("rocketkv", 32, prompt_len=n, max_new_tokens=16, head_dim=32)
    assert plan != uncapped
    assert {k: pred["budget_params"][k] for k in plan if k != "dense"} == {k: v for k, v in plan.items()
                                                                          if k != "dense"}


# ---------------------------------------------------------------- results folders
def test_new_options_at_their_defaults_keep_the_old_folders(compose_cfg):
    cfg = compose_cfg("model=tiny-random", "task=needle")
    old = OmegaConf.to_container(cfg, resolve=True)
    for key in ("cuda_dtype", "prompt_format", "add_bos", "max_prompt_len", "plan_len_cap", "special_tokens"):
        del old["model"][key]
    for key in ("haystack_file", "length_unit", "key_digits", "query_aware"):
        del old["task"][key]
    model = {k: v for k, v in old["model"].items() if k not in ("device", "path")}
    method = {k: v for k, v in old["method"].items() if k not in ("cuda_graphs", "compile")}
    assert config_hash(cfg, True) == stable_hash({"model": model, "task": old["task"], "method": method,
                                                  "budget": old["budget"], "seed": old["seed"]})


@pytest.mark.parametrize("override", ["model.cuda_dtype=float16", "model.prompt_format=raw", "model.add_bos=true",
                                      "model.max_prompt_len=4000", "task.length_unit=words", "task.key_digits=6",
                                      "model.plan_len_cap=4000", "model.special_tokens=keep",
                                      "protocol=paper", "haystack_file=/data/essays"])
def test_every_protocol_item_changes_the_folder(compose_cfg, override):
    base = compose_cfg("model=tiny-random", "task=needle")
    other = compose_cfg("model=tiny-random", "task=needle", override)
    assert config_hash(other, True) != config_hash(base, True)


def test_the_haystack_file_leaves_other_tasks_alone(compose_cfg):
    base = compose_cfg("model=tiny-random", "task=longbench")
    assert config_hash(compose_cfg("model=tiny-random", "task=longbench", "haystack_file=/data/essays"), True) \
        == config_hash(base, True)


def test_skip_layers_reaches_every_compressed_cell_of_a_grid(compose_cfg):
    cfg = compose_cfg("model=tiny-random", "skip_layers=2", "grid.methods=[full,snapkv,rocketkv]",
                      "grid.budgets=[64]")
    cells = [make_cell(c, "tiny-random", None) for c in grid_configs(cfg)]
    assert {c.name: c.method.skip_layers for c in cells} == {"full": 0, "snapkv": 2, "rocketkv": 2}
    alone = make_cell(compose_cfg("model=tiny-random", "method=snapkv", "budget=64", "skip_layers=2"), "tiny-random",
                      None)
    plain = make_cell(compose_cfg("model=tiny-random", "method=snapkv", "budget=64"), "tiny-random", None)
    snap = next(c for c in cells if c.name == "snapkv")
    assert alone.config_hash == snap.config_hash != plain.config_hash
    assert alone.cfg.method.skip_layers == 2  # config.yaml of the cell says so


def test_the_protocol_hash_holds_the_model_rules_but_not_skip_layers(compose_cfg):
    from rocketkv.harness.cells import run_protocol

    def protocol(*overrides):
        cfg = compose_cfg(f"model={LONGCHAT}", "task=longbench", *overrides)
        return run_protocol({"task": "longbench"}, ModelSpec.from_cfg(OmegaConf.to_container(cfg.model)))

    assert protocol() == {"task": "longbench"}  # neutral rules: the hash runs had before
    paper = protocol("+experiment=paper_protocol")
    assert paper["model_rules"] == {"cuda_dtype": "float16", "prompt_format": "vicuna", "add_bos": True,
                                    "max_prompt_len": 31500, "plan_len_cap": None, "special_tokens": "keep",
                                    "chat_template": True}
    assert stable_hash(paper) != stable_hash(protocol())
    assert stable_hash(protocol("model.cuda_dtype=float16")) != stable_hash(protocol())
    assert protocol("+experiment=paper_protocol", "skip_layers=0") == paper  # full KV and methods stay comparable


def test_the_paper_grid_under_the_protocol_gives_each_job_its_model_s_values(compose_cfg):
    """The jobs of `-m '+experiment=[paper_grid,paper_protocol]'` (one per model x task x method): each composes
    its own model's and task's official values; no folder is shared with the grid without the protocol."""
    seen, plain = {}, set()
    for model in (LLAMA, MISTRAL, LONGCHAT):
        for task in ("longbench", "ruler", "needle"):
            for method in ("full", "snapkv", "rocketkv"):
                job = [f"model={model}", f"task={task}", f"method={method}"]
                cfg = compose_cfg("+experiment=[paper_grid,paper_protocol]", *job)
                cells = [make_cell(c, model, None) for c in grid_configs(cfg)]
                for cell in cells:
                    skip = 2 if model == LONGCHAT and method != "full" else 0
                    assert cell.method.skip_layers == skip and cell.cfg.model.cuda_dtype == "float16"
                    assert cell.cfg.model.max_prompt_len == (OFFICIAL[(model, task)].get("model.max_prompt_len"))
                    seen[cell.out_dir] = (model, task, method, cell.budget)
                plain |= {make_cell(c, model, None).out_dir
                          for c in grid_configs(compose_cfg("+experiment=paper_grid", *job))}
    assert len(seen) == 3 * 3 * (1 + 2 * 5) and not set(seen) & plain


REAL_LONGBENCH = REPO.parent / "shared" / "data" / "longbench"


@pytest.mark.skipif(not (REAL_LONGBENCH / "multi_news.jsonl").is_file(), reason="no real LongBench rows here")
def test_real_multi_news_rows_are_cut_to_mistral_s_official_cap(compose_cfg):
    """Real rows with Mistral's official cap (31500 tokens of the byte-level stand-in): the longer prompts keep their
    first and last 15750 tokens (a character split at the cut may be re-encoded differently, as with any
    tokenizer); the shorter ones are untouched."""
    tok, samples, prompts = longbench_prompts(compose_cfg, MISTRAL, f"task.data_dir={REAL_LONGBENCH}",
                                              "task.subsets=[multi_news]")
    cut = 0
    for s in samples:
        full = tok(s.prompt, add_special_tokens=False).input_ids  # a chat subset: raw, no BOS
        ids = prompts[s.id]
        if len(full) <= 31500:
            assert ids == full
            continue
        cut += 1
        assert abs(len(ids) - 31500) <= 6 and tok.bos_token_id not in ids
        assert ids[:15700] == full[:15700] and ids[-15700:] == full[-15700:]
    assert cut >= 5
