"""Hugging Face interop: a run directory to a stock LlamaForCausalLM directory, and back.

transformers (and vLLM, and llama.cpp's converter) load the export with no remote code: the
weights in safetensors under HF's names, a config.json, a generation_config.json and the
tokenizer. Two things differ between the projects and are translated here:

- rotary layout: llama2.c rotates interleaved pairs (x[2i], x[2i+1]) of each head, HF rotates
  its two halves (x[i], x[i + head_dim/2]); the rows of wq and wk are permuted per head so that
  both compute the same attention (HF's convert_llama_weights permute, and its inverse);
- the tokenizer: transformers 5 has no SentencePiece-backed Llama tokenizer (AutoTokenizer ignores
  use_fast), and its LlamaTokenizer, built from tokenizer.model, drops SentencePiece's settings:
  the dummy prefix of text that starts with a space and of text after a special token, the
  normalizer. So tokenizer.json is written here from the SentencePiece model itself, under the
  class PreTrainedTokenizerFast, which loads it as written: the same ids as SentencePiece's
  encode, and the dummy prefix on each stretch of text between special pieces that chat.py's
  rule wants. Two limits of the `tokenizers` library remain: text a user types that spells
  "<|im_start|>" becomes the special token (chat.py keeps it text), and a BPE merge order cannot
  break ties between equal piece scores by position as SentencePiece does (llama2enzh's added
  Chinese pieces all score 0). tokenizer.model is copied too, for tools that read SentencePiece.

The import takes a LlamaForCausalLM directory (or a hub repo id) whose shape the C engine runs
(rope theta 10000, RMSNorm eps 1e-5, no biases, no rope scaling) and refuses anything else in
one line that says what it found.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch

from llama2zh.checkpoint import load_checkpoint
from llama2zh.errors import UserError
from llama2zh.model import ROPE_THETA, ModelArgs, Transformer
from llama2zh.vocab.export import MODEL_TYPES, load_sentencepiece

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NORM_EPS = 1e-5  # csrc/model.c's RMSNorm; model.bin does not carry it
# ours -> HF, per layer
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# SentencePiece piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
PRIVATE_USE = 0xF0000  # plane 15: no tokenizer's text is expected to hold these
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model"]


def _to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved pairs to HF's halves, per head."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of _to_halves."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under HF's names and rotary layout; no lm_head when it is the embedding."""
    a, state = model.args, model.state_dict()
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if not a.shared_classifier:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(a.n_layers):
        for ours, theirs in LAYER_NAMES.items():
            out[f"model.layers.{i}.{theirs}"] = state[f"layers.{i}.{ours}"]
        q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
        out[q], out[k] = _to_halves(out[q], a.n_heads), _to_halves(out[k], a.n_kv_heads)
    return out


def hf_config(args: ModelArgs, sp, dtype: str) -> dict:
    ids = {"bos_token_id": _id(sp.bos_id()), "eos_token_id": _id(sp.eos_id())}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps, "rope_theta": ROPE_THETA, "rope_scaling": None, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": args.shared_classifier,
        "initializer_range": 0.02, "use_cache": True, "pad_token_id": None, **ids,
        "torch_dtype": dtype, "dtype": dtype,  # transformers 4 reads the first, 5 the second
    }


def _id(i: int) -> int | None:
    return i if i >= 0 else None


def tokenizer_json(proto) -> dict:
    """tokenizer.json for a SentencePiece model: the same ids as SentencePiece's encode, BOS added.

    Mirrors the model's own settings, as transformers 5 does when it converts a tokenizer.model
    with PreTrainedTokenizerFast: normalizer, whitespace escape, a dummy prefix before every
    stretch of text between special pieces (also before text that starts with a space), BPE
    merges ranked by piece score, user-defined pieces kept whole; and, where transformers
    differs from SentencePiece, user-defined pieces left as they are by the normalizer."""
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    pieces = list(proto.pieces)
    specials = [{"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for i, p in enumerate(pieces) if p.type in (UNKNOWN, CONTROL)]
    user_defined = [p.piece for p in pieces if p.type == USER_DEFINED]
    # SentencePiece matches user-defined pieces before it normalizes; tokenizers normalizes first. So the
    # pieces the normalizer would change (baichuan's ，０\n...) hide behind private-use characters meanwhile.
    hidden = sorted(_normalized_pieces(proto), key=len, reverse=True)
    placeholders = [chr(PRIVATE_USE + i) for i in range(len(hidden))]
    normalizers = [_replace({"String": piece}, mark) for piece, mark in zip(hidden, placeholders, strict=True)]
    if spec.precompiled_charsmap:
        normalizers.append({"type": "Precompiled",
                            "precompiled_charsmap": base64.b64encode(spec.precompiled_charsmap).decode()})
    if spec.remove_extra_whitespaces:  # only spaces: SentencePiece leaves newlines alone
        normalizers += [_replace({"Regex": r"\A +| +\z"}, ""), _replace({"Regex": " {2,}"}, " ")]
    if spec.escape_whitespaces:
        normalizers.append(_replace({"String": " "}, "\u2581"))
    normalizers += [_replace({"String": mark}, piece) for piece, mark in zip(hidden, placeholders, strict=True)]
    pre_tokenizers, decoders = [], [_replace({"String": "\u2581"}, " "), {"type": "ByteFallback"}, {"type": "Fuse"}]
    if spec.add_dummy_prefix:
        # Metaspace adds no prefix to text that starts with "▁"; SentencePiece always does
        normalizers.append(_replace({"Regex": "\\A\u2581"}, "\u2581\u2581"))
        pre_tokenizers.append({"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                               "split": False})
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    if user_defined:  # SentencePiece emits them whole
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre_tokenizers.append({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                               "invert": False})
    bos = pieces[trainer.bos_id].piece if trainer.bos_id >= 0 else None
    post = None
    if bos is not None:  # our pipeline prefixes every document with BOS
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [trainer.bos_id], "tokens": [bos]}}}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": specials,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers} if pre_tokenizers else None,
            "post_processor": post, "decoder": {"type": "Sequence", "decoders": decoders}, "model": _model_json(proto)}


def _model_json(proto) -> dict:
    """The BPE (merges ranked by piece score) or unigram model of tokenizer.json."""
    trainer, pieces = proto.trainer_spec, list(proto.pieces)
    kind = MODEL_TYPES.get(trainer.model_type)
    if kind == "unigram":
        return {"type": "Unigram", "unk_id": trainer.unk_id, "byte_fallback": trainer.byte_fallback,
                "vocab": [[p.piece, p.score] for p in pieces]}
    if kind != "bpe":
        raise UserError(f"the tokenizer is a SentencePiece model of type {trainer.model_type}: only BPE and "
                        "unigram models have a tokenizer.json equivalent")
    normal = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
    merges = sorted((normal[piece], piece[:k], piece[k:]) for piece in normal for k in range(1, len(piece))
                    if piece[:k] in normal and piece[k:] in normal)
    return {"type": "BPE", "dropout": None, "unk_token": trainer.unk_piece, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": trainer.byte_fallback,
            "ignore_merges": any(p.type == USER_DEFINED for p in pieces),  # as transformers' converter does
            "vocab": {p.piece: i for i, p in enumerate(pieces)}, "merges": [[a, b] for _, a, b in merges]}


def _normalized_pieces(proto) -> list[str]:
    """The user-defined pieces that the model's normalizer (alone, no whitespace handling) changes."""
    if not proto.normalizer_spec.precompiled_charsmap:
        return []
    spec = type(proto.normalizer_spec)()
    spec.CopyFrom(proto.normalizer_spec)
    spec.add_dummy_prefix = spec.remove_extra_whitespaces = spec.escape_whitespaces = False
    normalizer = spm.SentencePieceNormalizer(normalizer_spec=spec.SerializeToString())
    return [p.piece for p in proto.pieces if p.type == USER_DEFINED and normalizer.normalize(p.piece) != p.piece]


def _replace(pattern: dict, content: str) -> dict:
    return {"type": "Replace", "pattern": pattern, "content": content}


def tokenizer_files(sp, proto, max_seq_len: int, chat_run: bool) -> dict[str, dict]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json (and the chat template for a chat run)."""
    from llama2zh.chat import CHAT_PIECES, JINJA_TEMPLATE, chat_piece_ids

    special = {name: sp.id_to_piece(i) for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                                                       ("unk_token", sp.unk_id())) if i >= 0}
    pieces = chat_piece_ids(sp) is not None
    special_map = {**special, **({"additional_special_tokens": list(CHAT_PIECES)} if pieces else {})}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_map, "add_bos_token": sp.bos_id() >= 0,
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": max_seq_len, **({"chat_template": JINJA_TEMPLATE} if chat_run else {})}
    return {"tokenizer.json": tokenizer_json(proto), "tokenizer_config.json": config,
            "special_tokens_map.json": special_map}


def export_hf(run_dir: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """out_dir: a LlamaForCausalLM directory of the run's checkpoint and tokenizer, written whole or not at all."""
    from safetensors.torch import save_file

    from llama2zh.chat import run_chat_ids

    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if (out_dir / "ckpt.pt").exists():  # the export replaces out_dir whole
        raise UserError(f"{out_dir} holds a run's checkpoint: give the export another directory")
    model, state = load_checkpoint(run_dir / "ckpt.pt")
    sp, proto = load_sentencepiece(run_dir / "tokenizer.model")
    args = model.args
    if sp.vocab_size() != args.vocab_size:
        raise UserError(f"{run_dir / 'tokenizer.model'}: {sp.vocab_size()} pieces, the checkpoint has vocab_size "
                        f"{args.vocab_size}")
    chat = run_chat_ids(sp, state)
    eos = [i for i in (sp.eos_id(), chat[1] if chat else -1) if i >= 0]  # a chat reply ends at <|im_end|>
    generation = {"bos_token_id": _id(sp.bos_id()), "eos_token_id": eos[0] if len(eos) == 1 else eos}
    files = {"config.json": hf_config(args, sp, dtype), "generation_config.json": generation,
             **tokenizer_files(sp, proto, args.max_seq_len, chat is not None)}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        shutil.copyfile(run_dir / "tokenizer.model", tmp / "tokenizer.model")
        tensors = {name: t.detach().to(DTYPES[dtype]).contiguous() for name, t in hf_tensors(model).items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp makes 0700: the result should look like any new folder
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Renames new to target; an existing target is moved aside first and removed after."""
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} exists and is not a directory")
    old = target.with_name(f".{target.name}.old") if target.exists() else None
    if old:
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    if old:
        shutil.rmtree(old)


def import_hf(source: str | Path, out_dir: Path, tokenizer_dir: Path | None = None, force: bool = False) -> Path:
    """A run directory from a LlamaForCausalLM directory or hub repo id (owner/name)."""
    from llama2zh import rundir

    directory = Path(source)
    if not directory.is_dir():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
            raise UserError(f"{source}: no such directory, and not a hub repo id (owner/name)")
        directory = _download(str(source))
    model = Transformer(_model_args(_read_json(directory / "config.json"), directory))
    tokenizer = (Path(tokenizer_dir) if tokenizer_dir else directory) / "tokenizer.model"
    if not tokenizer.is_file():
        raise UserError(f"{tokenizer}: no such file; {directory} has no SentencePiece tokenizer.model "
                        "(give --tokenizer DIR with the model's tokenizer.model)")
    model.load_state_dict(_our_state(model, _read_tensors(directory), directory))
    run_config = rundir.config_for(model, out_dir=str(out_dir), tokenizer=str(out_dir))
    return rundir.write_run_dir(out_dir, model, tokenizer, run_config, run_info={"imported_from": str(source)},
                                force=force)


def _download(repo: str) -> Path:
    """The repo's config, tokenizer and weights (safetensors, else pytorch_model*.bin) from the hub
    (HF_ENDPOINT, HF_HUB_OFFLINE honoured), in the hub's cache."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry warnings would bury our one-line error
    try:
        path = Path(huggingface_hub.snapshot_download(repo, allow_patterns=HUB_FILES))
        if not any(path.glob("*.safetensors")):
            path = Path(huggingface_hub.snapshot_download(repo, allow_patterns=["pytorch_model*.bin"]))
    except Exception as e:  # the hub client raises many kinds (HTTP, offline, connection); one line says which
        where = "offline mode (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else constants.ENDPOINT
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        raise UserError(f"{repo}: no such directory, and cannot download it from {where}: {reason}. "
                        "Set HF_ENDPOINT to a mirror, or give the path of a copy you already have") from None
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (not a Hugging Face model directory)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _model_args(config: dict, where: Path) -> ModelArgs:
    """ModelArgs of a LlamaForCausalLM config, or UserError when the C engine could not run it."""
    def refuse(what: str):
        raise UserError(f"{where / 'config.json'}: {what}; llama2zh imports Llama-2 models the C engine runs")

    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type") != "llama" or "LlamaForCausalLM" not in archs:
        refuse(f"model_type {config.get('model_type')!r}, architectures {archs}, not llama/LlamaForCausalLM")
    rope = config.get("rope_parameters") or {}  # transformers 5 keeps theta and scaling here
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        refuse(f"rope scaling {scaling}")
    theta = config.get("rope_theta", rope.get("rope_theta", ROPE_THETA))
    if theta != ROPE_THETA:
        refuse(f"rope_theta {theta}, not {ROPE_THETA:g}")
    eps = config.get("rms_norm_eps", NORM_EPS)
    if eps != NORM_EPS:
        refuse(f"rms_norm_eps {eps}, not {NORM_EPS:g} (the C engine's)")
    for bias in ("attention_bias", "mlp_bias"):
        if config.get(bias):
            refuse(f"{bias} is set")
    if config.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {config['hidden_act']!r}, not silu")
    try:
        dim, heads = config["hidden_size"], config["num_attention_heads"]
        head_dim = config.get("head_dim") or dim // heads
        if head_dim * heads != dim:
            refuse(f"{heads} heads of head_dim {head_dim} do not make hidden_size {dim}")
        return ModelArgs(dim=dim, n_layers=config["num_hidden_layers"], n_heads=heads,
                         n_kv_heads=config.get("num_key_value_heads") or heads, vocab_size=config["vocab_size"],
                         hidden_dim=config["intermediate_size"], max_seq_len=config["max_position_embeddings"],
                         shared_classifier=bool(config.get("tie_word_embeddings", False)), norm_eps=eps)
    except KeyError as e:
        refuse(f"no {e.args[0]}")
    except (TypeError, ValueError) as e:
        refuse(str(e))


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model's weight files: (sharded) safetensors, else (sharded) pytorch_model.bin."""
    from safetensors.torch import load_file

    for index, single, load in (("model.safetensors.index.json", "model.safetensors", load_file),
                                ("pytorch_model.bin.index.json", "pytorch_model.bin", _load_bin)):
        if (directory / index).is_file():
            files = sorted(set(_read_json(directory / index).get("weight_map", {}).values()))
        elif (directory / single).is_file():
            files = [single]
        else:
            continue
        tensors = {}
        for name in files:
            try:
                tensors.update(load(str(directory / name)))
            except Exception as e:  # missing shard, corrupt file: one line
                reason = f"{type(e).__name__}: {e}".splitlines()[0]
                raise UserError(f"{directory / name}: cannot read weights ({reason})") from None
        return tensors
    raise UserError(f"{directory}: no model.safetensors or pytorch_model.bin (nor their sharded index)")


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _our_state(model: Transformer, tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """The HF tensors under our names and rotary layout, checked against the model's shapes."""
    a = model.args
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not a.shared_classifier:
        names["output.weight"] = "lm_head.weight"
    names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}"
                  for i in range(a.n_layers) for ours, theirs in LAYER_NAMES.items()})
    missing = [theirs for theirs in names.values() if theirs not in tensors]
    if missing:
        raise UserError(f"{where}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    # lm_head of a tied model is the embedding again; old checkpoints store the rotary frequencies
    extra = [n for n in tensors if n not in names.values() and n != "lm_head.weight"
             and not n.endswith("rotary_emb.inv_freq")]
    if extra:
        raise UserError(f"{where}: unexpected tensors {', '.join(sorted(extra)[:5])}: not a plain Llama model")
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    state = {}
    for ours, theirs in names.items():
        t = tensors[theirs].float()
        if t.shape != shapes[ours]:
            raise UserError(f"{where}: {theirs} has shape {tuple(t.shape)}, config.json implies "
                            f"{tuple(shapes[ours])}")
        if ours.endswith(("wq.weight", "wk.weight")):
            t = _to_pairs(t, a.n_heads if ours.endswith("wq.weight") else a.n_kv_heads)
        state[ours] = t
    if a.shared_classifier:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state
