"""model.bin writers and readers, in llama2.c's layouts.

v0 "legacy": seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
    seq_len; a negative vocab_size means an unshared classifier), then float32 tensors in
    llama2.c's run.c order, including the RoPE tables that run.c skips.
v1: a 256-byte header (uint32 magic "ak42", int32 version 1, the same seven int32 with a
    positive vocab_size, uint8 shared_classifier, zero padding), then float32 tensors in
    llama2.c's export.py order.

Each writer has a reader, so a .bin loads back into the PyTorch model; write -> read ->
write gives the same bytes. Writes are atomic.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import numpy as np
import torch

from llama2zh.errors import UserError
from llama2zh.fileio import atomic_write_bytes
from llama2zh.model import ModelArgs, Transformer

MAGIC = 0x616B3432  # "ak42", llama2.c's
V1_HEADER_SIZE = 256
V0_HEADER = struct.Struct("<7i")
V1_HEADER = struct.Struct("<Ii7iB")
VERSIONS = (0, 1)


@dataclass
class BinHeader:
    version: int
    args: ModelArgs
    offset: int  # where the tensors start


def _per_layer(model: Transformer, *names: str) -> list[torch.Tensor]:
    """For each name in turn, that weight of every layer."""
    return [attrgetter(name)(layer) for name in names for layer in model.layers]


def _v0_tensors(model: Transformer) -> list[torch.Tensor]:
    """llama2.c run.c's legacy order: embedding, then each kind of weight for all layers."""
    tensors = [model.tok_embeddings.weight]
    tensors += _per_layer(model, "attention_norm.weight", "attention.wq.weight", "attention.wk.weight",
                          "attention.wv.weight", "attention.wo.weight", "ffn_norm.weight",
                          "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")
    tensors += [model.norm.weight, model.freqs_cos, model.freqs_sin]
    if not model.args.shared_classifier:
        tensors.append(model.output.weight)
    return tensors


def _v1_tensors(model: Transformer) -> list[torch.Tensor]:
    """llama2.c export.py's version-1 order: all norms first, then the matrices."""
    tensors = _per_layer(model, "attention_norm.weight", "ffn_norm.weight")
    tensors += [model.norm.weight, model.tok_embeddings.weight]
    tensors += _per_layer(model, "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                          "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                          "feed_forward.w3.weight")
    if not model.args.shared_classifier:
        tensors.append(model.output.weight)
    return tensors


def _header_ints(args: ModelArgs, vocab_size: int) -> tuple[int, ...]:
    return (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads, vocab_size,
            args.max_seq_len)


def encode_header(args: ModelArgs, version: int) -> bytes:
    if version == 0:
        vocab = args.vocab_size if args.shared_classifier else -args.vocab_size
        return V0_HEADER.pack(*_header_ints(args, vocab))
    if version == 1:
        head = V1_HEADER.pack(MAGIC, 1, *_header_ints(args, args.vocab_size), int(args.shared_classifier))
        return head + b"\0" * (V1_HEADER_SIZE - len(head))
    raise UserError(f"cannot write model.bin version {version}: supported versions are {VERSIONS}")


def write_model_bin(model: Transformer, path: str | Path, version: int = 1) -> Path:
    """Writes model as a llama2.c model.bin of the given version."""
    tensors = _v0_tensors(model) if version == 0 else _v1_tensors(model)
    header = encode_header(model.args, version)

    def chunks():
        yield header
        for t in tensors:
            yield t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()

    return atomic_write_bytes(path, chunks())


def _parse_args(ints, shared: bool, what: str) -> ModelArgs:
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = ints
    try:
        return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         vocab_size=vocab_size, hidden_dim=hidden_dim, max_seq_len=seq_len,
                         shared_classifier=shared)
    except ValueError as e:
        raise UserError(f"{what}: bad header: {e}") from None


def read_header(path: str | Path) -> BinHeader:
    """Reads and validates a model.bin header; the file size must match it exactly."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(V1_HEADER_SIZE)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    if len(head) >= 8 and struct.unpack_from("<I", head)[0] == MAGIC:
        version = struct.unpack_from("<i", head, 4)[0]
        if version != 1:
            raise UserError(f"{path}: unsupported model.bin version {version} (this build reads 0 and 1)")
        if len(head) < V1_HEADER_SIZE:
            raise UserError(f"{path}: truncated header")
        fields = V1_HEADER.unpack_from(head)
        args = _parse_args(fields[2:9], bool(fields[9]), str(path))
        header = BinHeader(1, args, V1_HEADER_SIZE)
    else:
        if len(head) < V0_HEADER.size:
            raise UserError(f"{path}: {size} bytes, too short to be a model.bin")
        ints = list(V0_HEADER.unpack_from(head))
        shared = ints[5] > 0
        ints[5] = abs(ints[5])
        header = BinHeader(0, _parse_args(ints, shared, str(path)), V0_HEADER.size)
    expected = header.offset + 4 * sum(_tensor_sizes(header.args, header.version))
    if size != expected:
        raise UserError(f"{path}: {size} bytes, the header implies {expected} (truncated, padded or not a model.bin)")
    return header


def _tensor_sizes(args: ModelArgs, version: int) -> list[int]:
    """Element counts in file order, from the shapes alone (no model built)."""
    with torch.device("meta"):
        model = Transformer(args)
    tensors = _v0_tensors(model) if version == 0 else _v1_tensors(model)
    return [t.numel() for t in tensors]


def read_model_bin(path: str | Path) -> Transformer:
    """Loads a v0 or v1 model.bin (ours or upstream llama2.c's) into the PyTorch model."""
    header = read_header(path)
    model = Transformer(header.args)
    tensors = _v0_tensors(model) if header.version == 0 else _v1_tensors(model)
    data = np.memmap(path, dtype=np.float32, mode="r", offset=header.offset)
    at = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            # the RoPE tables in v0 files are recomputed, as run.c does, not read back
            if t is not model.freqs_cos and t is not model.freqs_sin:
                t.copy_(torch.from_numpy(np.array(data[at : at + n])).view_as(t))
            at += n
    return model


def convert(src: str | Path, dst: str | Path, version: int) -> Path:
    """Rewrites a model.bin in another version."""
    return write_model_bin(read_model_bin(src), dst, version)
