"""Import a llama2.c (or llama2.c-zh) model.bin into a run directory.

Versions 0, 1 and 2 (export.read_model_bin reads each); version 2's int8 weights are
dequantized, so the run holds exactly the weights the file gives, in float32. A model.bin
does not carry its tokenizer: the tokenizer.model it was trained with comes beside it, or,
where its authors published only a llama2.c tokenizer.bin, one rebuilt from that
(vocab/rebuild.py: what ./run reads from the file, as a SentencePiece model).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from llama2zh import rundir
from llama2zh.errors import UserError
from llama2zh.export import read_header, read_model_bin
from llama2zh.vocab.rebuild import rebuild_model


def import_llama2c(model_bin: Path, tokenizer_dir: Path, out_dir: Path, force: bool = False) -> Path:
    """out_dir, a run directory of model_bin's weights and tokenizer_dir's tokenizer.model."""
    tokenizer_model, tokenizer_bin = Path(tokenizer_dir) / "tokenizer.model", Path(tokenizer_dir) / "tokenizer.bin"
    if not tokenizer_model.is_file() and not tokenizer_bin.is_file():
        raise UserError(f"{tokenizer_dir}: no tokenizer.model nor tokenizer.bin (a model.bin needs the tokenizer "
                        "it was trained with)")
    if not tokenizer_model.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            rebuilt = Path(tmp) / "tokenizer.model"
            rebuilt.write_bytes(rebuild_model(tokenizer_bin))
            print(f"{tokenizer_dir}: no tokenizer.model; rebuilt one from tokenizer.bin")
            return _import(model_bin, tokenizer_dir, rebuilt, out_dir, force)
    return _import(model_bin, tokenizer_dir, tokenizer_model, out_dir, force)


def _import(model_bin: Path, tokenizer_dir: Path, tokenizer_model: Path, out_dir: Path, force: bool) -> Path:
    # refuses truncated files and versions other than llama2.c's 0, 1 and 2 and our 3, saying what it found
    header = read_header(model_bin)
    model = read_model_bin(model_bin)
    form = f"llama2.c model.bin v{header.version}"
    if header.version >= 2:
        bits = "int8" if header.version == 2 else "int4"
        form += f", {bits} in groups of {header.group_size} dequantized to float32"
        print(f"{model_bin}: {bits} weights (group size {header.group_size}) dequantized to float32; "
              f"`llama2zh export {out_dir} --version {header.version}` quantizes them again")
    # write_run_dir refuses a tokenizer whose piece count is not the model's vocab_size
    config = rundir.config_for(model, out_dir=str(out_dir), tokenizer=str(tokenizer_dir))
    return rundir.write_run_dir(out_dir, model, tokenizer_model, config,
                                run_info={"imported_from": str(model_bin), "format": form}, force=force)
