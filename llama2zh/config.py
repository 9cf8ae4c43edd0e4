"""Run configuration: a flat dataclass, loaded from TOML, overridden by `--key=value`.

Every field is typed; an override is parsed to the field's type, and an unknown key or a
value of the wrong type is a usage error that lists what is valid.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llama2zh.model import ModelArgs

# the projections LoRA can adapt (lora.py): attention, then feed-forward. Named here, not imported from
# lora.py, because that imports torch, and every command reads this module (clean, download need no torch).
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class ConfigError(Exception):
    """A bad config file or override: a usage error (exit status 2)."""


CHOICES = {"dtype": ("float32", "bfloat16", "float16"), "device": ("auto", "cpu", "cuda"), "lang": ("en", "zh", "enzh")}


@dataclass
class Config:
    # model shape
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 0  # 0: as many as n_heads (plain multi-head attention)
    hidden_dim: int = 0  # 0: llama2.c's rule, 2/3 of 4*dim rounded up to multiple_of
    multiple_of: int = 32
    max_seq_len: int = 256
    shared_classifier: bool = True
    norm_eps: float = 1e-5
    # data: DATASET's story shards pretokenized by TOKENIZER (a directory with tokenizer.model)
    dataset: str = "data/sample"
    tokenizer: str = "tokenizers/sample"
    # pretraining on several datasets: "PATH=WEIGHT, PATH=WEIGHT, ..." (then dataset is not read); each
    # batch draws its rows in these proportions (weights are relative: they need not sum to 1)
    mix: str = ""
    lang: str = "enzh"  # the mix pretokenize was run with: en, zh, or enzh (both sides of parallel stories)
    # sft (and continued pretraining): the run directory whose weights training starts from
    init_from: str = ""
    # LoRA (on init_from): train only low-rank adapters on the frozen base; 0: train every weight
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # on the adapters' input, in training
    lora_targets: str = ",".join(LORA_TARGETS)  # the projections adapted (attention and feed-forward)
    # dpo: the rewards' scale; higher keeps the policy nearer its reference (init_from)
    dpo_beta: float = 0.1
    dpo_nll_weight: float = 0.0  # the chosen replies' cross-entropy, times this, added to the loss (RPO)
    # training
    out_dir: str = "out/sample"
    batch_size: int = 32  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000
    learning_rate: float = 5e-4
    min_lr: float = 5e-5  # where the cosine schedule ends
    warmup_iters: int = 100
    weight_decay: float = 0.1  # on 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    dtype: str = "float32"  # float32 | bfloat16 | float16 (float16 uses a gradient scaler)
    compile: bool = True  # torch.compile the model on CUDA (CPU runs stay eager: compiling costs more than it saves)
    device: str = "auto"  # auto | cpu | cuda
    eval_interval: int = 200
    eval_iters: int = 20  # val batches per loss estimate
    log_interval: int = 10
    # reproducibility
    seed: int = 1337

    def __post_init__(self):
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got '{getattr(self, key)}'")
        for key in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        self._check_lora()
        self._check_mix()
        if self.dpo_beta <= 0:
            raise ConfigError(f"dpo_beta must be positive, got {self.dpo_beta}")
        if self.dpo_nll_weight < 0:
            raise ConfigError(f"dpo_nll_weight must be 0 or positive, got {self.dpo_nll_weight}")

    def _check_lora(self):
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be 0 (off) or positive, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        targets = self.lora_target_list
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ConfigError(f"lora_targets must be a comma list of distinct names among {','.join(LORA_TARGETS)}, "
                              f"got '{self.lora_targets}'")
        if self.lora_rank and not self.init_from:
            raise ConfigError("lora_rank > 0 trains adapters on a frozen base: set init_from to the run to start from")

    def _check_mix(self):
        names = [Path(path).name for path, _ in self.datasets]
        if len(set(names)) != len(names):
            raise ConfigError(f"mix: two datasets share a folder name ({', '.join(names)}); each needs its own")

    @property
    def datasets(self) -> list[tuple[str, float]]:
        """(path, weight) of each dataset pretraining draws from: the mix, or dataset alone."""
        if not self.mix.strip():
            return [(self.dataset, 1.0)]
        datasets = []
        for item in self.mix.split(","):
            path, sep, weight = item.strip().rpartition("=")
            try:
                value = float(weight)
            except ValueError:
                value = 0.0
            if not (sep and path.strip() and 0 < value < math.inf):
                raise ConfigError(f"mix must be a comma list of PATH=WEIGHT with positive weights, "
                                  f"got '{item.strip()}' in '{self.mix}'")
            datasets.append((path.strip(), value))
        return datasets

    @property
    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def model_args(self, vocab_size: int) -> ModelArgs:
        from llama2zh.model import ModelArgs, llama_hidden_dim

        try:
            return ModelArgs(
                dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                n_kv_heads=self.n_kv_heads or self.n_heads, vocab_size=vocab_size,
                hidden_dim=self.hidden_dim or llama_hidden_dim(self.dim, self.multiple_of),
                max_seq_len=self.max_seq_len, shared_classifier=self.shared_classifier,
                norm_eps=self.norm_eps,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def to_toml(self) -> str:
        lines = []
        for key, value in asdict(self).items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value!r}")
        return "\n".join(lines) + "\n"


FIELD_TYPES = {f.name: f.type for f in fields(Config)}


def _typed(key: str, value, from_text: bool):
    """value checked against the type of field key; command-line text is parsed to it first."""
    if key not in FIELD_TYPES:
        raise ConfigError(f"unknown config key '{key}'; valid keys: {', '.join(FIELD_TYPES)}")
    kind = FIELD_TYPES[key]
    if from_text and kind != "str":
        text = value.strip().lower()
        if kind == "bool":
            if text not in ("true", "false", "1", "0"):
                raise ConfigError(f"{key} must be true or false, got '{value}'")
            return text in ("true", "1")
        try:
            return int(text) if kind == "int" else float(text)
        except ValueError:
            raise ConfigError(f"{key} must be an {kind}, got '{value}'") from None
    ok = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}[kind]
    if not isinstance(value, ok) or (kind != "bool" and isinstance(value, bool)):
        raise ConfigError(f"{key} must be a {kind}, got {value!r}")
    return float(value) if kind == "float" else value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Config from a TOML file (None: defaults) with `key=value` overrides applied."""
    values, from_text = {}, set()
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' is not of the form --key=value")
        key = key.replace("-", "_")
        values[key] = value
        from_text.add(key)
    return Config(**{key: _typed(key, value, key in from_text) for key, value in values.items()})
