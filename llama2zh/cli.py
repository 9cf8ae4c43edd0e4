"""The `llama2zh` command: one subcommand per pipeline stage.

This is the only module that knows every stage; each subcommand parses its flags and
calls one stage's public functions. A user's mistake becomes one line on stderr and exit
status 1 (2 for bad usage), never a traceback.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from llama2zh.config import ConfigError, load_config
from llama2zh.errors import UserError

EXPORT_VERSIONS = (0, 1)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cmd_init(args, overrides: list[str]) -> int:
    import torch

    from llama2zh.checkpoint import save_checkpoint
    from llama2zh.export import write_model_bin
    from llama2zh.fileio import atomic_output, sha256_file
    from llama2zh.model import Transformer
    from llama2zh.vocab.export import export_tokenizer, load_sentencepiece

    config = load_config(args.config, overrides)
    tokenizer_model = args.tokenizer / "tokenizer.model" if args.tokenizer.is_dir() else args.tokenizer
    sp, _ = load_sentencepiece(tokenizer_model)
    run_dir: Path = args.run_dir
    if (run_dir / "ckpt.pt").exists() and not args.force:
        raise UserError(f"{run_dir} already holds a checkpoint (use --force to overwrite it)")
    run_dir.mkdir(parents=True, exist_ok=True)

    model = Transformer(config.model_args(sp.vocab_size()))
    model.init_weights(torch.Generator().manual_seed(config.seed))
    with atomic_output(run_dir / "tokenizer.model") as tmp:
        shutil.copyfile(tokenizer_model, tmp)
    export_tokenizer(run_dir / "tokenizer.model", run_dir / "tokenizer.bin")
    with atomic_output(run_dir / "config.toml") as tmp:
        tmp.write_text(config.to_toml(), encoding="utf-8")
    save_checkpoint(run_dir / "ckpt.pt", model, config=asdict(config),
                    tokenizer_sha256=sha256_file(run_dir / "tokenizer.model"))
    write_model_bin(model, run_dir / "model.bin", version=1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"initialised {run_dir}: {n_params / 1e6:.2f}M parameters, vocab {sp.vocab_size()}, "
          f"ckpt.pt + model.bin (v1) + tokenizer.bin")
    return 0


def cmd_export(args, overrides: list[str]) -> int:
    from llama2zh.checkpoint import load_checkpoint
    from llama2zh.export import read_model_bin, write_model_bin

    source: Path = args.source
    if source.is_dir():
        model, _ = load_checkpoint(source / "ckpt.pt")
        out = args.out or source / "model.bin"
    else:
        if args.out is None:
            raise ConfigError("converting a .bin needs --out OUT.bin")
        model = read_model_bin(source)
        out = args.out
    write_model_bin(model, out, version=args.version)
    print(f"wrote {out} (version {args.version}, {out.stat().st_size:,} bytes)")
    return 0


def cmd_verify(args, overrides: list[str]) -> int:
    from llama2zh.verify import run_verify

    return run_verify(args.target, args.tokenizer)


def cmd_vocab_export(args, overrides: list[str]) -> int:
    from llama2zh.vocab.export import export_tokenizer

    out = args.out or args.model.with_suffix(".bin")
    export_tokenizer(args.model, out)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="llama2zh", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("init", help="write a randomly initialised run directory",
                            description="Write out/RUN with ckpt.pt, model.bin, config.toml and the tokenizer; "
                            "config fields can be overridden with --key=value.")
    p.add_argument("run_dir", type=Path, metavar="out/RUN")
    p.add_argument("--config", type=Path, required=True, help="a TOML file in configs/")
    p.add_argument("--tokenizer", type=Path, required=True, help="a directory with tokenizer.model (or the file)")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    p.set_defaults(func=cmd_init, takes_overrides=True)

    p = commands.add_parser("export", help="write model.bin from a run, or convert a .bin between versions")
    p.add_argument("source", type=Path, metavar="out/RUN|IN.bin")
    p.add_argument("--version", type=int, choices=EXPORT_VERSIONS, default=1)
    p.add_argument("--out", type=Path, help="output file (default out/RUN/model.bin)")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("verify", help="check that PyTorch and the C engine agree")
    p.add_argument("target", type=Path, metavar="out/RUN|model.bin")
    p.add_argument("--tokenizer", type=Path, help="directory with tokenizer.model, for a bare model.bin")
    p.set_defaults(func=cmd_verify)

    vocab = commands.add_parser("vocab", help="tokenizer tools").add_subparsers(dest="vocab_command", required=True,
                                                                                 metavar="COMMAND")
    p = vocab.add_parser("export", help="write tokenizer.bin (llama2.c layout + trailer) from tokenizer.model")
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument("--out", type=Path, help="output file (default: MODEL with .bin)")
    p.set_defaults(func=cmd_vocab_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except ConfigError as e:
        print(f"llama2zh: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"llama2zh: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llama2zh: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
