import pytest

from evals.needle.task import NeedleTask
from rocketkv.harness.models import tiny_tokenizer
from evals.prompting import prompt_token_ids


def make(**over):
    cfg = {"lengths": [400, 800], "depths": [0.0, 0.5, 1.0], "seed": 3, **over}
    return NeedleTask(cfg)


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_holds_needle_and_hits_length(chat):
    tok = tiny_tokenizer()
    task = make(chat_template=chat)
    samples = task.samples(tok, 8192)
    assert len(samples) == 6 and len({s.references[0] for s in samples}) == 6
    for s in samples:
        key = s.references[0]
        assert f"The pass key is {key}. Remember it. {key} is the pass key." in s.prompt
        ids = prompt_token_ids(tok, s, model_chat=True, model_max_len=8192)
        text = tok.decode(ids)
        assert text.rstrip().endswith("What is the pass key?" + ("\n<s>assistant: The pass key is" if chat
                                                                   else " The pass key is"))
        assert ("user:" in text) == chat
        assert 0.9 * s.meta["length"] <= len(ids) <= s.meta["length"] + 2


def test_needle_depth_places_the_needle():
    tok = tiny_tokenizer()
    first, middle, last = make(lengths=[800]).samples(tok, 8192)
    pos = [s.prompt.index("The pass key is") / len(s.prompt) for s in (first, middle, last)]
    assert pos[0] < 0.15 and 0.4 < pos[1] < 0.6 and pos[2] > 0.85


def test_score_and_protocol():
    task = make()
    [s] = task.samples(tiny_tokenizer(), 8192)[:1]
    key = s.references[0]
    assert task.score(s, f" {key}. Remember it.") == 100.0
    assert task.score(s, f" {key[:-1]}0.") == 0.0
    assert task.protocol()["chat_template"] is False and make(chat_template=True).protocol()["chat_template"]


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="task.haystack='essays'"):
        make(haystack="essays")
    with pytest.raises(ValueError, match=r"task.depths=\[1.5\]"):
        make(depths=[1.5])


def test_length_that_does_not_fit_the_model_is_rejected():
    with pytest.raises(ValueError, match=r"task.lengths \[8190\] plus 16 new tokens .* 8192; use lengths <= 8176"):
        make(lengths=[4000, 8190]).validate(8192)
    make(lengths=[4000, 8176]).validate(8192)


# ---------------------------------------------------------------- the official passkey prompts, lengths in words
def essay_file(tmp_path, n_words=700):
    """A small generated haystack: numbered words, so any cut is known in advance."""
    path = tmp_path / "essays.txt"
    lines = [" ".join(f"w{i}" for i in range(start, min(start + 10, n_words))) for start in range(0, n_words, 10)]
    path.write_text("\n".join(lines) + "\n")
    return path


def words_task(tmp_path, **over):
    return make(**{"length_unit": "words", "haystack": "file", "haystack_file": str(essay_file(tmp_path)),
                   "lengths": [100, 1000], "depths": [0.0, 0.5, 1.0], "repeats": 2, "max_new_tokens": 128,
                   "seed": 42, **over})


def test_words_prompt_is_the_official_layout(tmp_path):
    samples = words_task(tmp_path).samples(tiny_tokenizer(), 8192)
    assert len(samples) == 2 * 3 * 2
    by_id = {s.id: s for s in samples}
    s = by_id["len100_depth0.50_rep1"]
    key = s.references[0]
    hay = [f"w{i}" for i in range(100)]
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    # official: instruction + " ".join([before, needle, after, ""]) + question; words keep their whitespace
    before = " ".join(hay[:10]) + "\n" + " ".join(hay[10:20]) + "\n" + " ".join(hay[20:30]) + "\n" \
        + " ".join(hay[30:40]) + "\n" + " ".join(hay[40:50])
    after = "\n".join(" ".join(hay[i:i + 10]) for i in range(50, 100, 10))
    assert s.prompt == ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                        "I will quiz you about the important information there.\n" + before + " " + needle + " "
                        + after + " " + "\nWhat is the pass key? The pass key is ")
    assert s.chat_template is False and s.answer_prefix == "" and s.stop == [] and s.max_new_tokens == 128
    first = by_id["len100_depth0.00_rep0"].prompt
    assert "there.\n The pass key is" in first  # depth 0: an empty chunk before the needle
    last = by_id["len100_depth1.00_rep0"].prompt
    assert last.endswith("w99 " + f"The pass key is {by_id['len100_depth1.00_rep0'].references[0]}. Remember it. "
                         f"{by_id['len100_depth1.00_rep0'].references[0]} is the pass key.  \nWhat is the pass key? "
                         "The pass key is ")


def test_words_haystack_repeats_the_file_to_the_length(tmp_path):
    [long] = [s for s in words_task(tmp_path, depths=[1.0], repeats=1).samples(tiny_tokenizer(), 8192)
              if s.meta["length"] == 1000]
    words = long.prompt.split("there.\n", 1)[1].split(" The pass key is")[0].split()
    assert len(words) == 1000 and words[699] == "w699" and words[700] == "w0" and words[-1] == "w299"


def test_words_keys_are_seeded_7_digit_strings(tmp_path):
    import random

    samples = words_task(tmp_path).samples(tiny_tokenizer(), 8192)
    rng = random.Random(42)
    assert [s.references[0] for s in samples] == ["".join(rng.choice("0123456789") for _ in range(7))
                                                  for _ in samples]
    six = words_task(tmp_path, key_digits=6).samples(tiny_tokenizer(), 8192)
    assert {len(s.references[0]) for s in six} == {6}


@pytest.mark.parametrize("model", ["llama3.1-8b-instruct", "mistral-7b-instruct-v0.2", "longchat-7b-v1.5-32k"])
def test_words_prompt_is_raw_with_one_bos(tmp_path, model):
    """Official: the passkey prompt is tokenised as it is, with the tokenizer's BOS, whatever the model's chat rules."""
    from evals.prompting import PromptFormat
    from standin_tokenizers import byte_ids, standin_tokenizer

    tok = standin_tokenizer(model)
    rules = {"llama3.1-8b-instruct": PromptFormat("chat_template", "true"),
             "mistral-7b-instruct-v0.2": PromptFormat("raw", "false"),
             "longchat-7b-v1.5-32k": PromptFormat("vicuna", "true")}[model]
    for s in words_task(tmp_path).samples(tok, 32768):
        ids = prompt_token_ids(tok, s, model_chat=True, model_max_len=32768, fmt=rules)
        assert ids == [tok.bos_token_id] + byte_ids(tok, s.prompt)


def test_haystack_file_is_in_the_protocol(tmp_path):
    task = words_task(tmp_path)
    proto = task.protocol()
    assert proto["length_unit"] == "words" and proto["key_digits"] == 7 and len(proto["haystack_sha256"]) == 64
    other = tmp_path / "other"
    other.mkdir()
    longer = make(length_unit="words", haystack="file", haystack_file=str(essay_file(other, n_words=710)))
    assert longer.protocol()["haystack_sha256"] != proto["haystack_sha256"]


def test_haystack_file_in_tokens_mode(tmp_path):
    tok = tiny_tokenizer()
    task = make(haystack="file", haystack_file=str(essay_file(tmp_path)), lengths=[400], depths=[0.5])
    [s] = task.samples(tok, 8192)
    assert "w0 w1 w2" in s.prompt and "The pass key is" in s.prompt


@pytest.mark.parametrize("over,message", [
    ({"haystack": "file"}, "task.haystack=file needs haystack_file="),
    ({"haystack": "file", "haystack_file": "/no/such/essays.txt"}, "task.haystack_file='/no/such/essays.txt' does "
                                                                   "not exist"),
    ({"length_unit": "chars"}, "task.length_unit='chars' is not valid; use one of ('tokens', 'words')"),
    ({"key_digits": 0}, "task.key_digits=0 is not valid"),
    ({"length_unit": "words", "chat_template": True}, "takes no chat template"),
])
def test_bad_words_options_are_named(over, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make(**over)


def test_haystack_folder_reads_its_txt_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("beta gamma\n")
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "notes.md").write_text("ignored\n")
    task = make(length_unit="words", haystack="file", haystack_file=str(tmp_path), lengths=[64], depths=[1.0])
    [s] = task.samples(tiny_tokenizer(), 8192)
    assert s.prompt.split("there.\n", 1)[1].startswith("alpha\nbeta gamma\nalpha\nbeta")


def test_a_length_in_words_that_does_not_fit_the_model_is_rejected(tmp_path):
    task = make(length_unit="words", haystack="file", haystack_file=str(essay_file(tmp_path)), lengths=[100, 3000],
                depths=[0.5], max_new_tokens=128)
    with pytest.raises(ValueError, match=r"task.lengths: 3000 words make a prompt of \d+ tokens, which with 128 new "
                                         r"tokens exceeds the model's max length 4096"):
        task.samples(tiny_tokenizer(), 4096)
