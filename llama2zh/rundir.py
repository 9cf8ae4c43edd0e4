"""A new run directory from a model and a tokenizer: what `init` and `import` write.

ckpt.pt, config.toml, tokenizer.model, tokenizer.bin and model.bin (v1), each written
atomically, so that train (init_from), sft, eval, export, verify and ./run accept it.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path

from llama2zh.config import Config
from llama2zh.errors import UserError
from llama2zh.model import Transformer


def config_for(model: Transformer, base: Config | None = None, **fields) -> Config:
    """base (default: the defaults) with the model's shape, and fields set."""
    a = model.args
    return replace(base or Config(), dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                   hidden_dim=a.hidden_dim, max_seq_len=a.max_seq_len, shared_classifier=a.shared_classifier,
                   norm_eps=a.norm_eps, **fields)


def write_run_dir(run_dir: Path, model: Transformer, tokenizer_model: Path, config: Config,
                  run_info: dict | None = None, force: bool = False) -> Path:
    """run_dir with the model's ckpt.pt (step 0) and model.bin, config and tokenizer files.
    An existing checkpoint there is kept unless force."""
    from llama2zh.checkpoint import save_checkpoint
    from llama2zh.export import write_model_bin
    from llama2zh.fileio import atomic_output, sha256_file
    from llama2zh.vocab.export import export_tokenizer, load_sentencepiece

    run_dir = Path(run_dir)
    if (run_dir / "ckpt.pt").exists() and not force:
        raise UserError(f"{run_dir} already holds a checkpoint (use --force to overwrite it)")
    sp, _ = load_sentencepiece(tokenizer_model)
    if sp.vocab_size() != model.args.vocab_size:
        raise UserError(f"{tokenizer_model}: {sp.vocab_size()} pieces, but the model has vocab_size "
                        f"{model.args.vocab_size}: not the model's tokenizer")
    run_dir.mkdir(parents=True, exist_ok=True)
    if Path(tokenizer_model).resolve() != (run_dir / "tokenizer.model").resolve():
        with atomic_output(run_dir / "tokenizer.model") as tmp:
            shutil.copyfile(tokenizer_model, tmp)
    export_tokenizer(run_dir / "tokenizer.model", run_dir / "tokenizer.bin")
    with atomic_output(run_dir / "config.toml") as tmp:
        tmp.write_text(config.to_toml(), encoding="utf-8")
    save_checkpoint(run_dir / "ckpt.pt", model, config=asdict(config),
                    tokenizer_sha256=sha256_file(run_dir / "tokenizer.model"), run_info=run_info)
    write_model_bin(model, run_dir / "model.bin", version=1)
    return run_dir
