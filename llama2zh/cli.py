"""The `llama2zh` command: one subcommand per pipeline stage.

This is the only module that knows every stage; each subcommand parses its flags and
calls one stage's public functions. A user's mistake becomes one line on stderr and exit
status 1 (2 for bad usage), never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from llama2zh.config import ConfigError, load_config
from llama2zh.errors import UserError

EXPORT_VERSIONS = (0, 1, 2, 3)
ROUNDINGS = ("mse", "llama2c")  # llama2zh.export's, named here so that --help needs no torch
TRANSLATE_BACKENDS = ("google", "mymemory")  # corpus.client.BACKENDS; named here to spare deep-translator's import


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cmd_init(args, overrides: list[str]) -> int:
    import torch

    from llama2zh.model import Transformer
    from llama2zh.rundir import write_run_dir
    from llama2zh.vocab.export import load_sentencepiece

    config = load_config(args.config, overrides)
    tokenizer_model = args.tokenizer / "tokenizer.model" if args.tokenizer.is_dir() else args.tokenizer
    sp, _ = load_sentencepiece(tokenizer_model)
    model = Transformer(config.model_args(sp.vocab_size()))
    model.init_weights(torch.Generator().manual_seed(config.seed))
    run_dir = write_run_dir(args.run_dir, model, tokenizer_model, config, {"stage": "init"}, force=args.force)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"initialised {run_dir}: {n_params / 1e6:.2f}M parameters, vocab {sp.vocab_size()}, "
          f"ckpt.pt + model.bin (v1) + tokenizer.bin")
    return 0


def cmd_export(args, overrides: list[str]) -> int:
    if args.format != "bin":
        return export_elsewhere(args)
    from llama2zh.checkpoint import load_checkpoint
    from llama2zh.export import (
        V3_EMBEDDING_BITS,
        default_group_size,
        divides_inner_dims,
        read_model_bin,
        v3_group_size,
        v3_int8_layers,
        write_model_bin,
    )

    args.version = 1 if args.version is None else args.version
    for flag, value, versions in (("--group-size", args.group_size, (2, 3)), ("--rounding", args.rounding, (2,)),
                                  ("--embedding-bits", args.embedding_bits, (3,)),
                                  ("--int8-layers", args.int8_layers, (3,)),
                                  ("--calibration", args.calibration, (3,))):
        if value is not None and args.version not in versions:
            raise ConfigError(f"{flag} applies to --version {' and '.join(map(str, versions))} only")
    for flag, value in (("--dtype", args.dtype), ("--type", args.type)):
        if value is not None:
            raise ConfigError(f"{flag} applies to --format {'hf' if flag == '--dtype' else 'gguf'} only")

    int8_layers = parse_layers(args.int8_layers) if args.int8_layers is not None else None
    source: Path = args.source
    state = None
    if source.is_dir():
        model, state = load_checkpoint(source / "ckpt.pt")
        out = args.out or source / "model.bin"
    else:
        if args.out is None:
            raise ConfigError("converting a .bin needs --out OUT.bin")
        if args.calibration not in (None, "none"):
            raise ConfigError("--calibration needs a run directory (out/RUN): a .bin has no tokenizer to check "
                              "the data against")
        model = read_model_bin(source)
        out = args.out
    group_size = args.group_size
    if group_size is None and args.version in (2, 3):
        group_size = (default_group_size if args.version == 2 else v3_group_size)(model.args)
    embedding_bits = args.embedding_bits or V3_EMBEDDING_BITS
    hessians, detail = None, f", group size {group_size}" if args.version in (2, 3) else ""
    if args.version == 3:
        int8_layers = v3_int8_layers(model.args) if int8_layers is None else int8_layers
        from llama2zh.calibrate import export_hessians

        hessians, rounding = export_hessians(model, state, args.calibration)
        detail += (f", embedding {'int8' if embedding_bits == 8 else 'int4'}, int8 layers "
                   f"{','.join(map(str, int8_layers)) or 'none'}, {rounding}")
    write_model_bin(model, out, version=args.version, group_size=group_size, rounding=args.rounding or "mse",
                    embedding_bits=embedding_bits, int8_layers=int8_layers, hessians=hessians)
    print(f"wrote {out} (version {args.version}{detail}, {out.stat().st_size:,} bytes)")
    if args.version == 2 and not divides_inner_dims(model.args, group_size):
        print(f"warning: group size {group_size} does not divide both dim {model.args.dim} and hidden_dim "
              f"{model.args.hidden_dim}: ./run runs the matrices whose rows straddle groups in float32 (exact, 4x "
              f"their int8 size), and llama2.c's runq misreads them (it drops the end of each row)", file=sys.stderr)
    return 0


def parse_layers(text: str) -> tuple[int, ...]:
    """--int8-layers: "none" or a comma list of layer numbers."""
    if text.strip() == "none":
        return ()
    try:
        layers = tuple(int(item) for item in text.split(","))
    except ValueError:
        raise ConfigError(f"--int8-layers must be 'none' or a comma list of layer numbers, got '{text}'") from None
    if any(layer < 0 for layer in layers):
        raise ConfigError(f"--int8-layers: layer numbers start at 0, got '{text}'")
    return layers


def export_elsewhere(args) -> int:
    """--format hf (a transformers directory) or gguf (llama.cpp, with an Ollama Modelfile)."""
    for flag, value in (("--version", args.version), ("--group-size", args.group_size), ("--rounding", args.rounding),
                        ("--embedding-bits", args.embedding_bits), ("--int8-layers", args.int8_layers),
                        ("--calibration", args.calibration)):
        if value is not None:
            raise ConfigError(f"{flag} applies to --format bin only")
    wrong = ("--type", args.type) if args.format == "hf" else ("--dtype", args.dtype)
    if wrong[1] is not None:
        raise ConfigError(f"{wrong[0]} applies to --format {'gguf' if args.format == 'hf' else 'hf'} only")
    run_dir: Path = args.source
    if not (run_dir / "ckpt.pt").is_file():
        raise UserError(f"{run_dir}: not a run directory (no ckpt.pt); --format {args.format} exports a run")
    if args.format == "hf":
        from llama2zh.interop.hf import export_hf

        out = export_hf(run_dir, args.out or run_dir / "hf", args.dtype or "float32")
        print(f"wrote {out}: a LlamaForCausalLM directory for transformers ({args.dtype or 'float32'})")
        return 0
    from llama2zh.interop.gguf import export_gguf

    qtype = args.type or "f32"
    out = export_gguf(run_dir, args.out or run_dir / "gguf" / f"model-{qtype}.gguf", qtype)
    print(f"wrote {out} ({qtype}, {out.stat().st_size:,} bytes) and {out.parent / 'Modelfile'} for Ollama")
    return 0


def cmd_import(args, overrides: list[str]) -> int:
    """A run directory from a Hugging Face Llama (directory or hub repo id) or a llama2.c model.bin."""
    source = str(args.source)
    path = Path(source)
    if path.is_file():
        if args.tokenizer is None:
            raise ConfigError(f"importing {source} (a model.bin) needs --tokenizer DIR, the directory of its "
                              "tokenizer.model")
        from llama2zh.interop.llama2c import import_llama2c

        out = import_llama2c(path, args.tokenizer, args.out, args.force)
    elif path.is_dir() or re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        from llama2zh.interop.hf import import_hf

        out = import_hf(path if path.is_dir() else source, args.out, args.tokenizer, args.force)
    else:
        raise UserError(f"{source}: no such file or directory, and not a hub repo id (owner/name)")
    print(f"imported {source} into {out}: ckpt.pt, model.bin, config.toml, tokenizer.model, tokenizer.bin "
          f"(next: llama2zh verify {out})")
    return 0


def cmd_serve(args, overrides: list[str]) -> int:
    if args.slots < 1 or not 0 <= args.port <= 65535:
        raise ConfigError("--slots must be at least 1 and --port in 0..65535")
    try:
        from llama2zh.serve.server import serve
    except ImportError as e:
        raise UserError(f"llama2zh serve needs the serve extra: pip install -e '.[serve]' ({e})") from None
    return serve(args.target, args.tokenizer, args.host, args.port, args.slots, args.api_key)


def cmd_verify(args, overrides: list[str]) -> int:
    from llama2zh.verify import run_verify

    return run_verify(args.target, args.tokenizer)


def cmd_vocab_export(args, overrides: list[str]) -> int:
    from llama2zh.vocab.export import export_tokenizer

    out = args.out or args.model.with_suffix(".bin")
    export_tokenizer(args.model, out)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return 0


def cmd_vocab_train(args, overrides: list[str]) -> int:
    from llama2zh.vocab.train import train_tokenizer

    meta = train_tokenizer(args.input, args.vocab_size, args.out, lang=args.lang, model_type=args.model_type)
    print(f"wrote {args.out}: tokenizer.model, tokenizer.bin, meta.json ({meta['model_type']}, "
          f"vocab {meta['vocab_size']:,}, trained on {meta['lines']:,} lines)")
    return 0


def cmd_vocab_extend(args, overrides: list[str]) -> int:
    from llama2zh.vocab.extend import extend_tokenizer

    r = extend_tokenizer(args.base, args.corpus, args.add, args.out, heldout=args.heldout)
    where = "held-out text" if r["heldout"] else "the corpus (no --heldout)"
    print(f"added {r['added']:,} Chinese pieces (asked {r['requested']:,}; {r['dropped_unreachable']} dropped as "
          f"unreachable, {r['already_in_base']:,} already in the base): vocab {r['base_vocab_size']:,} -> "
          f"{r['vocab_size']:,}")
    print(f"tokens per Chinese character on {where}: {r['tokens_per_zh_char']['base']:.3f} -> "
          f"{r['tokens_per_zh_char']['extended']:.3f}")
    print(f"wrote {args.out}: tokenizer.model, tokenizer.bin, meta.json")
    return 0


def cmd_vocab_stats(args, overrides: list[str]) -> int:
    from llama2zh.vocab.stats import stats_table

    print(stats_table(args.models, args.text or []))
    return 0


def cmd_download(args, overrides: list[str]) -> int:
    from llama2zh.corpus import download

    if args.list and args.what not in ("model", "corpus"):
        raise ConfigError("--list applies to download model and download corpus only")
    if args.limit is not None and args.what != "corpus":
        raise ConfigError("--limit applies to download corpus only")
    if args.what == "corpus":
        from llama2zh.corpus import registry as corpora

        if args.list:
            print(corpora.format_registry())
            return 0
        if not args.name:
            raise ConfigError("download corpus needs a NAME (see llama2zh download corpus --list)")
        if args.from_path:
            raise ConfigError("--from applies to datasets and tokenizers, not to download corpus")
        corpora.download_corpus(args.name, args.dest or Path("data"), args.limit)
        return 0
    if args.what == "model":
        if not (args.name or args.list):
            raise ConfigError("download model needs a NAME (see llama2zh download model --list)")
        from llama2zh.interop import registry

        if args.list:
            print(registry.format_registry())
            return 0
        if args.from_path:
            raise ConfigError("--from applies to datasets and tokenizers, not to download model")
        registry.download_model(args.name, args.dest or registry.DEFAULT_DEST)
        return 0
    if args.what == "tokenizer":
        if not args.name:
            raise ConfigError("download tokenizer needs a NAME, e.g. llama2enzh")
        download.download_tokenizer(args.name, args.dest or Path("tokenizers"), args.from_path)
        return 0
    if args.name:
        raise ConfigError(f"download {args.what} takes no NAME (got '{args.name}')")
    dest = args.dest or Path("data")
    if args.what == "sample-sft":
        from llama2zh.corpus.sample_sft import write_sample_sft

        stats = write_sample_sft(dest / "sample-sft")
        train, val = stats["train"], stats["val"]
        print(f"wrote {dest / 'sample-sft'}: train.jsonl ({train['conversations']:,} conversations: "
              f"{', '.join(f'{task} {n}' for task, n in train['tasks'].items())}; {train['with_system']:,} with a "
              f"system prompt) and val.jsonl ({val['conversations']:,}, on held-out character/place/task combinations)")
        return 0
    if args.what == "sample-dpo":
        from llama2zh.corpus.sample_dpo import write_sample_dpo

        stats = write_sample_dpo(dest / "sample-dpo")
        train, val = stats["train"], stats["val"]
        print(f"wrote {dest / 'sample-dpo'}: train.jsonl ({train['pairs']:,} pairs, rejected replies: "
              f"{', '.join(f'{kind} {n}' for kind, n in train['kinds'].items())}) and val.jsonl ({val['pairs']:,}, "
              "on prompts train never has)")
        return 0
    if args.what == "sample":
        from llama2zh.corpus.sample import write_sample

        stats = write_sample(dest / "sample")
        print(f"wrote {dest / 'sample'}: {stats['stories']} parallel stories in {stats['shards']} shards "
              f"({stats['bytes'] / 1e6:.1f} MB; {stats['words_en']:,} English words, {stats['chars_zh']:,} Chinese "
              f"characters); distinct sentences: English {stats['distinct_sentence_ratio_en']:.1%}, "
              f"Chinese {stats['distinct_sentence_ratio_zh']:.1%}")
        return 0
    download.download_dataset(args.what, dest, args.from_path)
    return 0


def shard_part(text: str) -> tuple[int, int]:
    """--shard i/n: part i (1..n) of n."""
    try:
        index, count = map(int, text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not i/n, e.g. 2/4") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"'{text}': i/n needs 1 <= i <= n")
    return index, count


def cmd_translate(args, overrides: list[str]) -> int:
    from llama2zh.corpus.translate import Options, translate_corpus

    if args.workers < 1 or args.rate < 0 or args.timeout <= 0 or (args.limit is not None and args.limit < 0):
        raise ConfigError("--workers and --timeout must be positive, --rate and --limit not negative")
    options = Options(args.backend, args.endpoint, args.workers, args.rate, args.timeout, args.limit, args.shard,
                      args.retry_rejects)
    report = translate_corpus(args.src, args.dest, options)
    print("\n".join(report.lines()))
    if report.failed:
        raise UserError(f"{report.failed} stories failed after retries (service errors); rerun to retry them")
    return 0


def cmd_train(args, overrides: list[str]) -> int:
    from llama2zh.train import train

    run_dir = train(load_config(args.config, overrides), resume=not args.no_resume)
    print(f"trained {run_dir}: ckpt.pt, model.bin, tokenizer.bin, metrics.jsonl")
    return 0


def cmd_sft(args, overrides: list[str]) -> int:
    from llama2zh.sft import sft

    run_dir = sft(load_config(args.config, overrides), resume=not args.no_resume, strict=args.strict)
    print(f"chat-tuned {run_dir}: ckpt.pt, model.bin, tokenizer.bin (with the chat template), metrics.jsonl")
    return 0


def cmd_dpo(args, overrides: list[str]) -> int:
    from llama2zh.dpo import dpo

    run_dir = dpo(load_config(args.config, overrides), resume=not args.no_resume, strict=args.strict)
    print(f"preference-tuned {run_dir}: ckpt.pt, model.bin, tokenizer.bin (with the chat template), metrics.jsonl")
    return 0


def cmd_chat(args, overrides: list[str]) -> int:
    if args.render:
        import json

        from llama2zh.chat import render_ids
        from llama2zh.vocab.export import load_sentencepiece

        sp, _ = load_sentencepiece(args.run_dir / "tokenizer.model")
        try:
            messages = json.loads(args.render.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{args.render}: not a JSON list of messages ({e})".splitlines()[0]) from None
        print(json.dumps(render_ids(sp, messages)))
        return 0
    from llama2zh.chat_session import chat

    if args.steps < 0 or args.temperature < 0 or not 0 <= args.top_p <= 1:
        raise ConfigError("-n must be >= 0, -t >= 0 and -p in [0, 1]")
    return chat(args.run_dir, args.system, args.prompt, args.temperature, args.top_p, args.seed, args.steps,
                penalties(args))


def cmd_eval(args, overrides: list[str]) -> int:
    import json

    from llama2zh.checkpoint import load_checkpoint
    from llama2zh.evaluate import evaluate, format_report
    from llama2zh.evaluate_chat import evaluate_chat, format_chat_report, is_chat_run

    if not (args.run_dir / "ckpt.pt").exists():
        raise UserError(f"{args.run_dir}: no ckpt.pt (train first)")
    model, state = load_checkpoint(args.run_dir / "ckpt.pt")
    if is_chat_run(state):
        report, text = evaluate_chat(args.run_dir, state, model), format_chat_report
    else:
        report, text = evaluate(args.run_dir, args.documents, (model, state)), format_report
    print(json.dumps(report, ensure_ascii=False) if args.json else text(report))
    return 0


def penalties(args) -> tuple[float, float]:
    """--presence-penalty and --frequency-penalty, in OpenAI's range."""
    for flag, value in (("--presence-penalty", args.presence_penalty), ("--frequency-penalty", args.frequency_penalty)):
        if not -2.0 <= value <= 2.0:
            raise ConfigError(f"{flag} must be in [-2, 2], got {value}")
    return args.presence_penalty, args.frequency_penalty


def add_penalty_flags(p) -> None:
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="X",
                   help="lowers the logit of every token already generated by X (OpenAI's; -2..2, default 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X",
                   help="lowers each token's logit by X per time it was generated (OpenAI's; -2..2, default 0)")


def cmd_sample(args, overrides: list[str]) -> int:
    import torch

    from llama2zh.checkpoint import load_checkpoint
    from llama2zh.vocab.export import load_sentencepiece

    model, _ = load_checkpoint(args.run_dir / "ckpt.pt")
    sp, _ = load_sentencepiece(args.run_dir / "tokenizer.model")
    prompt = [sp.bos_id()] + sp.encode(args.prompt)
    if len(prompt) >= model.args.max_seq_len:
        raise UserError(f"the prompt takes {len(prompt)} positions; the model's seq_len is {model.args.max_seq_len}")
    generator = torch.Generator().manual_seed(args.seed)
    presence, frequency = penalties(args)
    out = model.generate(prompt, args.steps, temperature=args.temperature, top_p=args.top_p,
                         stop_ids=(sp.bos_id(), sp.eos_id()), generator=generator, presence_penalty=presence,
                         frequency_penalty=frequency)
    print(sp.decode(prompt + out))
    return 0


def cmd_pretokenize(args, overrides: list[str]) -> int:
    from llama2zh.corpus.pretokenize import SHARD_TOKENS, pretokenize, pretokenize_records
    from llama2zh.corpus.shards import is_story_folder
    from llama2zh.corpus.sources import source_files

    for flag, value, least in (("--workers", args.workers, 1), ("--shard-tokens", args.shard_tokens, 1),
                               ("--val-permille", args.val_permille, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be at least {least}")
    if args.val_permille > 1000:
        raise ConfigError("--val-permille must be at most 1000")
    one = Path(args.sources[0]) if len(args.sources) == 1 else None
    if one and args.text_field is None and is_story_folder(one):  # story shards, read as before
        if args.shard_tokens is not None:
            raise ConfigError("--shard-tokens applies to sources other than story shards (one output per input shard)")
        out = pretokenize(one, args.tokenizer, lang=args.lang or "enzh", workers=args.workers,
                          val_permille=args.val_permille, force=args.force, out_dir=args.out)
    else:
        if args.lang is not None:
            raise ConfigError("--lang applies to story shards only (a folder of {\"story\": ...} records)")
        files = source_files(args.sources)
        if args.out is None and not (one and one.is_dir()):
            raise ConfigError("--out DIR is needed unless SOURCE is one folder")
        out = pretokenize_records(files, args.tokenizer, args.out or one / args.tokenizer.name,
                                  text_field=args.text_field or "text", workers=args.workers,
                                  val_permille=args.val_permille, shard_tokens=args.shard_tokens or SHARD_TOKENS,
                                  force=args.force)
    print(f"wrote {out}")
    return 0


def cmd_clean(args, overrides: list[str]) -> int:
    from llama2zh.corpus.clean import BOILERPLATE, Rules, clean

    rules = Rules(lang=args.lang, min_chars=args.min_chars, max_chars=args.max_chars,
                  near_threshold=args.near_threshold, boilerplate=BOILERPLATE + tuple(args.boilerplate))
    report = clean(args.src, args.out, text_field=args.text_field, rules=rules, workers=args.workers,
                   shard_docs=args.shard_docs, force=args.force)
    dropped = ", ".join(f"{reason} {n:,}" for reason, n in report["dropped"].items()) or "none"
    print(f"wrote {args.out}: kept {report['kept']:,} of {report['read']:,} documents in {len(report['shards'])} "
          f"shards (dropped: {dropped}; {report['boilerplate_lines']:,} boilerplate lines removed); see report.json")
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

    p = commands.add_parser("export", help="write model.bin from a run, convert a .bin between versions, or "
                            "export a run for transformers (hf) or llama.cpp and Ollama (gguf)")
    p.add_argument("source", type=Path, metavar="out/RUN|IN.bin")
    p.add_argument("--format", choices=("bin", "hf", "gguf"), default="bin",
                   help="bin: model.bin for ./run (default); hf: a LlamaForCausalLM directory (default "
                   "out/RUN/hf); gguf: a GGUF file and an Ollama Modelfile beside it (default out/RUN/gguf/)")
    p.add_argument("--version", type=int, choices=EXPORT_VERSIONS, help="bin: 0, 1 (default), 2 (int8) or 3 (int4)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="hf: weight type (default float32)")
    p.add_argument("--type", choices=("f32", "f16", "q8_0", "q4_0"), help="gguf: tensor type (default f32)")
    p.add_argument("--group-size", type=int, metavar="N",
                   help="v2: values per int8 group (default 64, halved until it divides dim and hidden_dim); "
                   "each group's scale is the one of max|w|/127 (llama2.c's) and up to 1%% smaller that "
                   "rounds it with the least squared error; v3: values per 4-bit group (default 16, halved "
                   "until it divides dim and hidden_dim)")
    p.add_argument("--embedding-bits", type=int, choices=(4, 8),
                   help="v3: 8 (default) keeps the embedding and the classifier int8, 4 makes them int4 too "
                   "(smaller and faster, less close to float32)")
    p.add_argument("--int8-layers", metavar="L,L,...|none",
                   help="v3: the layers kept int8 (default 0: the first layer, which 4 bits harm most)")
    p.add_argument("--calibration", metavar="DATASET|none",
                   help="v3: a pretokenized dataset folder (as a config's dataset) whose tokens calibrate the 4-bit "
                   "rounding (GPTQ); default: the run's own training data, rounding to nearest where there is "
                   "none (and for a .bin); none: round to nearest")
    p.add_argument("--rounding", choices=ROUNDINGS,
                   help="v2: how each group's scale is picked: mse (the default, as above) or llama2c "
                   "(max|w|/127 alone: the bytes llama2.c's export.py writes)")
    p.add_argument("--out", type=Path, help="output file (default out/RUN/model.bin)")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("import", help="a run directory from a Hugging Face Llama or a llama2.c model.bin",
                            description="Write out/RUN (ckpt.pt, model.bin, config.toml, tokenizer files) from a "
                            "LlamaForCausalLM directory, a hub repo id (owner/name; HF_ENDPOINT honoured) or a "
                            "llama2.c / llama2.c-zh model.bin (v0, v1, v2) with --tokenizer.")
    p.add_argument("source", metavar="SOURCE", help="a directory, a hub repo id, or a model.bin")
    p.add_argument("--out", type=Path, required=True, metavar="out/RUN")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="the directory of the model's tokenizer.model "
                   "(needed for a model.bin; for a Hugging Face model, when it has none)")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in out/RUN")
    p.set_defaults(func=cmd_import)

    p = commands.add_parser("serve", help="an OpenAI-compatible server over the C engine, batching requests",
                            description="GET /v1/models, POST /v1/completions and /v1/chat/completions (streaming "
                            "or not), GET /health. Requests share the engine's decode steps, up to --slots at once.")
    p.add_argument("target", type=Path, metavar="out/RUN|model.bin")
    p.add_argument("--tokenizer", type=Path, metavar="FILE", help="tokenizer.bin, for a bare model.bin")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: no key)")
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("verify", help="check that PyTorch and the C engine agree")
    p.add_argument("target", type=Path, metavar="out/RUN|model.bin")
    p.add_argument("--tokenizer", type=Path, help="directory with tokenizer.model, for a bare model.bin")
    p.set_defaults(func=cmd_verify)

    p = commands.add_parser("download", help="the built-in samples, TinyStories (en, zh), a corpus from the hub, "
                            "a tokenizer or a published model")
    p.add_argument("what", choices=("sample", "sample-sft", "sample-dpo", "tinystories", "tinystories-zh", "tokenizer",
                                    "model", "corpus"))
    p.add_argument("name", nargs="?", help="the tokenizer's name (tokenizers/registry.json), the model's "
                   "(download model --list) or the corpus's (download corpus --list)")
    p.add_argument("--list", action="store_true", help="download model, download corpus: the ones it knows")
    p.add_argument("--dest", type=Path, help="destination (default data/; tokenizers/ for a tokenizer, models/ "
                   "for a model)")
    p.add_argument("--limit", type=int, help="download corpus: the first N records only")
    p.add_argument("--from", dest="from_path", type=Path, help="ingest a copy you already have (archive or folder)")
    p.set_defaults(func=cmd_download)

    p = commands.add_parser("translate", help="TinyStories shards, English -> Simplified Chinese (resumable)",
                            description="Translate story shards through deep-translator; rerun to resume.")
    p.add_argument("src", type=Path, metavar="SRC", help="a directory of shards (*.json arrays, *.jsonl)")
    p.add_argument("dest", type=Path, metavar="DEST", help="output shards, plus DEST/translate/ (journal, cache)")
    p.add_argument("--backend", choices=TRANSLATE_BACKENDS, default="google")
    p.add_argument("--endpoint", metavar="URL", help="the backend's base URL (a self-hosted service)")
    p.add_argument("--workers", type=int, default=16, help="concurrent requests (default 16)")
    p.add_argument("--rate", type=float, default=10.0, help="requests per second, 0 = no limit (default 10)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    p.add_argument("--limit", type=int, help="only the first N stories")
    p.add_argument("--shard", type=shard_part, default=(1, 1), metavar="i/n",
                   help="translate part i of n (stories split by id), for n machines")
    p.add_argument("--retry-rejects", action="store_true", help="translate stories that failed quality checks again")
    p.set_defaults(func=cmd_translate)

    p = commands.add_parser("train", help="train a model (resumes out_dir's checkpoint if there is one)",
                            description="Train with a TOML config; any field can be overridden with --key=value. "
                            "Under torchrun, each process trains its share of every batch (DDP).")
    p.add_argument("--config", type=Path, required=True, help="a TOML file in configs/")
    p.add_argument("--no-resume", action="store_true", help="start over even if out_dir holds a checkpoint")
    p.set_defaults(func=cmd_train, takes_overrides=True)

    for name, func, data, what in (("sft", cmd_sft, "conversations (.jsonl: native, ShareGPT or Alpaca)",
                                     "the loss on the assistant's replies only"),
                                    ("dpo", cmd_dpo, "preference pairs (.jsonl: minimind's chosen/rejected "
                                     "conversations, TRL's prompt/chosen/rejected)", "Direct Preference "
                                     "Optimization, init_from the frozen reference too (dpo_beta in the config)")):
        p = commands.add_parser(name, help="instruction-tune a pretrained run into a chat model" if name == "sft"
                                else "preference-tune a chat run (DPO) on chosen/rejected reply pairs",
                                description=f"Train on {data} from init_from's weights: {what}; lora_rank > 0 "
                                "trains LoRA adapters only. Any config field can be overridden with --key=value. "
                                "Resumes out_dir's checkpoint if there is one.")
        p.add_argument("--config", type=Path, required=True, help=f"a TOML file in configs/, e.g. "
                       f"configs/sample_{name}.toml")
        p.add_argument("--no-resume", action="store_true", help="start over even if out_dir holds a checkpoint")
        p.add_argument("--strict", action="store_true", help="stop at the first malformed record (default: skip them)")
        p.set_defaults(func=func, takes_overrides=True)

    p = commands.add_parser("chat", help="talk with a chat-tuned run (PyTorch), one line a turn",
                            description="Each line on standard input is a user turn; replies go to standard "
                            "output, one line each. --render prints the ids of a conversation instead.")
    p.add_argument("run_dir", type=Path, metavar="out/RUN")
    p.add_argument("-y", "--system", help="a system message before the first turn")
    p.add_argument("-i", "--prompt", help="the first user message (then standard input's lines)")
    p.add_argument("-n", "--steps", type=int, default=256, help="tokens per reply at most (0: the context's room)")
    p.add_argument("-t", "--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("-p", "--top-p", type=float, default=0.9)
    p.add_argument("-s", "--seed", type=int, default=1234)
    add_penalty_flags(p)
    p.add_argument("--render", type=Path, metavar="FILE",
                   help="print the token ids of the conversation in FILE (a JSON list of messages) as JSON")
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser("eval", help="pretrained run: loss, bits/char and bits/byte per language; chat-tuned "
                            "run (sft, dpo): loss on replies, generation checks (language, character, repetition, "
                            "ends; dpo: reward accuracy and margin), beside its base run")
    p.add_argument("run_dir", type=Path, metavar="out/RUN")
    p.add_argument("--documents", type=int, default=200, help="validation documents per language (default 200)")
    p.add_argument("--json", action="store_true", help="every figure as one JSON object (keys: see the README)")
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser("sample", help="generate text with the PyTorch model of a run")
    p.add_argument("run_dir", type=Path, metavar="out/RUN")
    p.add_argument("-i", "--prompt", default="", help="the prompt (default: empty)")
    p.add_argument("-n", "--steps", type=int, default=256, help="tokens to generate")
    p.add_argument("-t", "--temperature", type=float, default=0.8)
    p.add_argument("-p", "--top-p", type=float, default=0.9)
    p.add_argument("-s", "--seed", type=int, default=1234)
    add_penalty_flags(p)
    p.set_defaults(func=cmd_sample)

    p = commands.add_parser("pretokenize", help="text -> token shards (uint16/uint32) + manifest.json",
                            description="Encode text into train_NNNN.bin/val_NNNN.bin token shards and manifest.json. "
                            "One folder of story shards ({\"story\", \"story_en\"} records, TinyStories' layout) gives "
                            "one output pair per shard in SOURCE/<tokenizer>; any other files or folders (.jsonl, "
                            ".json, .parquet, .csv, .txt) or hub datasets (owner/name, hf://datasets/owner/name/...) "
                            "stream into pairs of about --shard-tokens tokens. "
                            "Rerun to resume.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a folder of story shards, or files, folders or hub datasets of records")
    p.add_argument("--tokenizer", type=Path, required=True, help="directory with tokenizer.model")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default: SOURCE/<tokenizer name>; needed for files or several sources)")
    p.add_argument("--text-field", metavar="F",
                   help="the records' text field (default: text); reads even a story folder as plain records")
    p.add_argument("--lang", choices=("en", "zh", "enzh"), help="story shards: the language(s) to keep (default enzh)")
    p.add_argument("--workers", type=int, default=2, help="encoding processes (default 2)")
    p.add_argument("--val-permille", type=int, default=10, metavar="N",
                   help="documents per 1000 that go to val, chosen by a hash (default 10)")
    p.add_argument("--shard-tokens", type=int, metavar="N",
                   help=f"tokens per output pair for sources other than story shards (default {1 << 26:,})")
    p.add_argument("--force", action="store_true", help="redo shards made with another tokenizer, input or setting")
    p.set_defaults(func=cmd_pretokenize)

    p = commands.add_parser("clean", help="normalise, filter and deduplicate text files into .jsonl shards",
                            description="Stream .jsonl/.json/.parquet/.csv/.txt files or folders through "
                            "normalisation, boilerplate-line removal, length/language/repetition filters and exact "
                            "and near-duplicate removal (MinHash LSH) into DIR/part-*.jsonl and DIR/report.json. "
                            "Rerun to resume.")
    p.add_argument("src", type=Path, nargs="+", metavar="SRC", help="files or folders (.txt: a document per line)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--text-field", default="text", help="the records' text field (default text)")
    p.add_argument("--lang", choices=("zh", "en", "any"), default="any",
                   help="keep documents whose letters are at least 70%% CJK (zh) or Latin (en); default any")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--shard-docs", type=int, default=10_000, metavar="N", help="documents per shard (default 10000)")
    p.add_argument("--min-chars", type=int, default=50, metavar="N", help="after cleaning (default 50)")
    p.add_argument("--max-chars", type=int, default=100_000, metavar="N", help="default 100000")
    p.add_argument("--near-threshold", type=float, default=0.8, metavar="J",
                   help="Jaccard similarity of 5-character shingles above which a document is a near-duplicate of "
                   "an earlier one (default 0.8)")
    p.add_argument("--boilerplate", action="append", default=[], metavar="REGEX",
                   help="also remove lines matching REGEX (repeatable; URLs, 本章未完, 请收藏, ... always)")
    p.add_argument("--force", action="store_true", help="redo DIR made from other inputs or settings")
    p.set_defaults(func=cmd_clean)

    vocab = commands.add_parser("vocab", help="tokenizer tools").add_subparsers(dest="vocab_command", required=True,
                                                                                 metavar="COMMAND")
    p = vocab.add_parser("export", help="write tokenizer.bin (llama2.c layout + trailer) from tokenizer.model")
    p.add_argument("model", type=Path, metavar="MODEL")
    p.add_argument("--out", type=Path, help="output file (default: MODEL with .bin)")
    p.set_defaults(func=cmd_vocab_export)

    p = vocab.add_parser("train", help="train a SentencePiece tokenizer (byte fallback, CJK coverage)",
                         description="Train tokenizer.model on .jsonl/.json/.txt documents; writes it with "
                         "tokenizer.bin and meta.json into --out.")
    p.add_argument("--input", type=Path, nargs="+", required=True, metavar="PATH")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N")
    p.add_argument("--out", type=Path, required=True, metavar="tokenizers/NAME")
    p.add_argument("--lang", choices=("en", "zh", "enzh"), default="enzh", help="documents to train on")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.set_defaults(func=cmd_vocab_train)

    p = vocab.add_parser("extend", help="append Chinese pieces to a BPE tokenizer, keeping every base id",
                         description="Train Chinese pieces on --corpus and append up to --add of them to --base.")
    p.add_argument("--base", type=Path, required=True, metavar="BASE.model")
    p.add_argument("--corpus", type=Path, nargs="+", required=True, metavar="PATH")
    p.add_argument("--add", type=int, required=True, metavar="N", help="pieces to add")
    p.add_argument("--out", type=Path, required=True, metavar="tokenizers/NAME")
    p.add_argument("--heldout", type=Path, nargs="+", metavar="PATH", help="Chinese text to measure on")
    p.set_defaults(func=cmd_vocab_extend)

    p = vocab.add_parser("stats", help="compare tokenizers on texts (markdown table)")
    p.add_argument("models", type=Path, nargs="+", metavar="MODEL", help="tokenizer.model or its directory")
    p.add_argument("--text", type=Path, nargs="+", metavar="PATH", help="texts to measure on (.jsonl/.json/.txt)")
    p.set_defaults(func=cmd_vocab_stats)
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
