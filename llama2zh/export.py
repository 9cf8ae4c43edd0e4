"""model.bin writers and readers, in llama2.c's layouts.

v0 "legacy": seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
    seq_len; a negative vocab_size means an unshared classifier), then float32 tensors in
    llama2.c's run.c order, including the RoPE tables that run.c skips.
v1: a 256-byte header (uint32 magic "ak42", int32 version 1, the same seven int32 with a
    positive vocab_size, uint8 shared_classifier, zero padding), then float32 tensors in
    llama2.c's export.py order.
v2: the v1 header with version 2 and, right after the shared_classifier byte (offset 37,
    unaligned, as llama2.c packs it), int32 group_size; then the norms in float32, then each
    weight matrix (embedding, each kind of layer matrix for all layers, the classifier when
    unshared) as int8 values followed by their float32 scales, one per group of group_size
    consecutive values of the flattened matrix: Q8_0, symmetric. llama2.c's export.py
    (version2_export) takes scale = max|w| / 127; ours by default takes, per group, whichever
    of that scale and a few slightly smaller ones gives the least squared error (rounding
    "mse"; "llama2c" writes llama2.c's bytes). Same layout either way. A group size that
    divides each matrix's size but not its rows (llama2.c's export picks 64 for stories260K,
    whose hidden_dim is 172) makes groups straddle rows: readers take the groups over the
    flattened matrix, and ./run dequantizes such matrices at load (see default_group_size).
v3 (ours): the v1 header with version 3 and, from offset 37 (unaligned), int32 group_size G,
    uint8 embedding_bits (4 or 8), int32 int8_group_size EG, then 128 bytes int8_layers (bit
    l % 8 of byte l / 8 set: layer l is int8); then the norms in float32 as v2, then v2's
    matrices. A 4-bit matrix of N values is N/2 bytes of unsigned values 0..15 (value 2i in
    byte i's low nibble, 2i+1 in its high one), then N/G float16 scales, then N/G float16
    minimums: w = scale * q + min (asymmetric). The int8 matrices, written as v2 writes them
    (Q8_0, group size EG; EG is 0 when there are none): the embedding and an unshared
    classifier with embedding_bits 8 (the embedding is the classifier of a tied model, and its
    4-bit rounding costs the most quality), and the seven matrices of each int8 layer (by
    default the first, the layer 4 bits harm most). G divides dim and hidden_dim, so no group
    straddles a row; so does EG when a layer is int8. Upstream llama2.c (runq reads version 2
    only) refuses it.

Each writer has a reader, so a .bin loads back into the PyTorch model; write -> read ->
write gives the same bytes (for v2 too: the reader dequantizes, and re-quantizing gives back
the same values and scales: the largest value is always +-127, 127 * scale / 127 rounds back
to scale, and that scale reproduces the dequantized weights exactly; for v3, every group's
smallest value is stored as 0 and its largest as 15 (see quantize_q4), so the dequantized minimum
is the minimum and its range gives back the scale). Writes are atomic.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llama2zh.errors import UserError
from llama2zh.fileio import atomic_write_bytes
from llama2zh.model import ModelArgs, Transformer

MAGIC = 0x616B3432  # "ak42", llama2.c's
V1_HEADER_SIZE = 256
V0_HEADER = struct.Struct("<7i")
V1_HEADER = struct.Struct("<Ii7iB")
V2_GROUP = struct.Struct("<i")  # at offset V1_HEADER.size, unaligned
V3_FIELDS = struct.Struct("<iBi")  # group_size, embedding_bits, int8_group_size, likewise
V3_INT8_LAYER_BYTES = 128  # then the int8 layers, a bit each: up to 1024 layers (the C engine's limit)
VERSIONS = (0, 1, 2, 3)
DEFAULT_GROUP_SIZE = 64
ROUNDINGS = ("mse", "llama2c")  # v2 rounding: quantize_q80
# "mse" tries max|w| / 127 shrunk by k * MSE_STEP, k = 0..MSE_STEPS. Shrinking by x clips the
# largest value by 127 * x steps; on trained and random weights the best shrink stays under
# 0.8% (the rest of the group's error shrinks only in proportion to the scale).
MSE_STEP, MSE_STEPS = 0.001, 10
_BLOCK_GROUPS = 4096
# v3: 16 values a group (G = 32 loses twice the top-1 agreement with float32 on the demo model:
# README), the embedding in int8, and the first layer in int8 (of the layers, 4 bits harm it most:
# quantized alone it costs the demo model half the KL of all four). quantize_q4 tries clipping
# either end of each group's range by k * CLIP_STEP of it, k = 0..CLIP_STEPS, and keeps the least
# squared error.
V3_GROUP_SIZE, V3_EMBEDDING_BITS, V3_INT8_LAYERS = 16, 8, (0,)
CLIP_STEP, CLIP_STEPS = 0.02, 4
LEAST_SQUARES_STEPS = 2  # then refits of each group's scale and minimum to its values (see _refine_q4)
# GPTQ: the hessian's diagonal is raised by this much of its mean (the paper's 1%; it keeps the
# inverse stable), and the columns' errors are applied to the rest GPTQ_BLOCK columns at a time
GPTQ_DAMPING, GPTQ_BLOCK = 0.01, 128


@dataclass
class BinHeader:
    version: int
    args: ModelArgs
    offset: int  # where the tensors start
    group_size: int = 0  # v2, v3
    embedding_bits: int = 0  # v3: 4 or 8
    int8_group_size: int = 0  # v3 with an int8 embedding or int8 layers
    int8_layers: tuple[int, ...] = ()  # v3


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


def _v2_norms(model: Transformer) -> list[torch.Tensor]:
    """The norm weights, which every version after v0 writes first, in fp32."""
    return _per_layer(model, "attention_norm.weight", "ffn_norm.weight") + [model.norm.weight]


def _v2_matrices(model: Transformer) -> list[torch.Tensor]:
    """The matrices in llama2.c export.py's order (quantized in v2, fp32 in v1)."""
    tensors = [model.tok_embeddings.weight]
    tensors += _per_layer(model, "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                          "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                          "feed_forward.w3.weight")
    if not model.args.shared_classifier:
        tensors.append(model.output.weight)
    return tensors


def _v2_matrix_bits(model: Transformer, header: BinHeader) -> list[tuple[torch.Tensor, int, int]]:
    """_v2_matrices, each with the bits a quantized version stores it in and their group size: all
    8 in v2; 4 in v3, except the embedding and an unshared classifier when embedding_bits is 8, and
    the int8 layers' matrices."""
    if header.version == 2:
        return [(t, 8, header.group_size) for t in _v2_matrices(model)]
    eight = {id(model.tok_embeddings.weight), id(model.output.weight)} if header.embedding_bits == 8 else set()
    eight |= {id(p) for layer in header.int8_layers for p in model.layers[layer].parameters() if p.dim() == 2}
    return [(t, 8, header.int8_group_size) if id(t) in eight else (t, 4, header.group_size)
            for t in _v2_matrices(model)]


def _v1_tensors(model: Transformer) -> list[torch.Tensor]:
    """llama2.c export.py's version-1 order: all norms first, then the matrices."""
    return _v2_norms(model) + _v2_matrices(model)


def default_group_size(args: ModelArgs) -> int:
    """64, halved until it divides dim and hidden_dim, the inner dimension of every matrix.

    llama2.c's export halves only until it divides dim. The C engine quantizes activations in
    the weights' groups, row by row, so a matrix whose groups straddle rows runs in float32
    (dequantized at load: 4 times its int8 size); llama2.c's runq misreads it (it drops the
    end of each row). Dividing both keeps every matrix int8.
    """
    group_size = DEFAULT_GROUP_SIZE
    while args.dim % group_size or args.hidden_dim % group_size:
        group_size //= 2
    return group_size


def v3_group_size(args: ModelArgs) -> int:
    """V3_GROUP_SIZE, halved until it divides dim and hidden_dim (a 4-bit group never straddles
    rows); 2 at least, as a byte holds two values."""
    group_size = V3_GROUP_SIZE
    while group_size > 2 and (args.dim % group_size or args.hidden_dim % group_size):
        group_size //= 2
    return group_size


def v3_int8_layers(args: ModelArgs) -> tuple[int, ...]:
    """V3_INT8_LAYERS, those the model has, unless that is every layer (a one-layer model)."""
    layers = tuple(layer for layer in V3_INT8_LAYERS if layer < args.n_layers)
    return layers if len(layers) < args.n_layers else ()


def v3_header(args: ModelArgs, group_size: int, embedding_bits: int, int8_layers: tuple[int, ...]) -> BinHeader:
    """A v3 file's layout; its int8 matrices in groups of default_group_size."""
    int8_layers = tuple(sorted(set(int8_layers)))
    int8_group_size = default_group_size(args) if embedding_bits == 8 or int8_layers else 0
    return BinHeader(3, args, V1_HEADER_SIZE, group_size, embedding_bits, int8_group_size, int8_layers)


def _check_v3(h: BinHeader, what: str) -> None:
    args, group_size, int8_group_size = h.args, h.group_size, h.int8_group_size
    if group_size <= 0 or group_size % 2 or args.dim % group_size or args.hidden_dim % group_size:
        raise UserError(f"{what}: 4-bit group size {group_size} must be even and divide dim {args.dim} and "
                        f"hidden_dim {args.hidden_dim}")
    if h.embedding_bits not in (4, 8):
        raise UserError(f"{what}: embedding bits must be 4 or 8, got {h.embedding_bits}")
    beyond = [layer for layer in h.int8_layers if not 0 <= layer < args.n_layers]
    if beyond:
        raise UserError(f"{what}: layer {beyond[0]} is marked int8, but the model has {args.n_layers} layers")
    if h.embedding_bits == 4 and not h.int8_layers and int8_group_size != 0:
        raise UserError(f"{what}: int8 group size {int8_group_size} with no int8 matrix (must be 0)")
    if (h.embedding_bits == 8 or h.int8_layers) and (int8_group_size <= 0 or args.dim % int8_group_size):
        raise UserError(f"{what}: int8 group size {int8_group_size} does not divide dim {args.dim}")
    if h.int8_layers and args.hidden_dim % int8_group_size:
        raise UserError(f"{what}: int8 group size {int8_group_size} does not divide hidden_dim {args.hidden_dim} "
                        "(int8 layers)")


def divides_inner_dims(args: ModelArgs, group_size: int) -> bool:
    """Whether every matrix of a v2 file of this group size runs int8 in the C engine (see
    default_group_size)."""
    return args.dim % group_size == 0 and args.hidden_dim % group_size == 0


def _check_group_size(args: ModelArgs, group_size: int, numels: list[int], what: str) -> None:
    # llama2.c's rule: a group never straddles two tensors
    if group_size <= 0:
        raise UserError(f"{what}: group size must be positive, got {group_size}")
    bad = next((n for n in numels if n % group_size), None)
    if bad is not None:
        raise UserError(f"{what}: group size {group_size} does not divide a weight of {bad} values "
                        f"(dim {args.dim}, hidden_dim {args.hidden_dim})")


def quantize_q80(w: torch.Tensor, group_size: int, rounding: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0: int8 values in [-127, 127] and a float32 scale per group of group_size consecutive
    values, w ~= value * scale. rounding "llama2c" is llama2.c export.py's, scale = max|w| / 127;
    "mse" keeps, per group, whichever of that scale and the ones MSE_STEP, 2 * MSE_STEP, ...
    MSE_STEPS * MSE_STEP smaller (relatively) gives the least squared error: never more than
    llama2c's (ties keep llama2c's scale). An all-zero group gets scale 0 and values 0
    (llama2.c would divide 0 by 0)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    w = w.detach().to("cpu", torch.float32).reshape(-1, group_size)
    steps = MSE_STEPS if rounding == "mse" else 0
    # in blocks of groups, so that the search's temporaries stay in cache (2.5 times faster)
    chunks = [_search_q80(block, steps) for block in w.split(_BLOCK_GROUPS)]
    return torch.cat([v for v, _ in chunks]).to(torch.int8), torch.cat([s for _, s in chunks])


def _search_q80(w: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.abs().amax(dim=1)
    scale = amax / 127.0
    values, error = _round_q80(w, scale)
    for k in range(1, steps + 1):
        # write -> read -> write needs the largest value at +-127 (a smaller scale clamps it
        # there) and float32's 127 * scale / 127 == scale, which holds for scale = x / 127 but
        # not for every float (amax * (c / 127) fails about 1 in 130)
        s = (amax * (1.0 - k * MSE_STEP)) / 127.0
        v, e = _round_q80(w, s)
        better = e < error
        scale, error = torch.where(better, s, scale), torch.where(better, e, error)
        values = torch.where(better[:, None], v, values)
    return values, scale


def _round_q80(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values for these scales, and each group's squared error."""
    # w / scale, not w * (1 / scale), which can round differently from llama2.c; 0 / 1 for
    # all-zero groups
    values = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-127, 127)
    # the difference is exact (w is within a factor of 2 of values * scale, or that is 0): the
    # error of the weights that a reader gets back
    return values, (w - values * scale[:, None]).square_().sum(dim=1)


def quantize_q4(w: torch.Tensor, group_size: int, hessian: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v3's 4-bit values (uint8, one per weight, 0..15) and float16 scales and minimums per group
    of group_size consecutive values, w ~= value * scale + min. Per group, the range [lo, hi] is
    clipped at either end by k * CLIP_STEP of it (k = 0..CLIP_STEPS), and the clipping with the
    least squared error wins (ties: the least clipping); then least-squares refits of scale and
    minimum, kept where they lower the error. Whatever the fit, the group's smallest weight is
    stored as 0 and its largest as 15, which makes write -> read -> write exact:
    the dequantized group's minimum is min and its range 15 * scale, so the unclipped candidate
    gives back scale and min with no error (q * scale is exact in float32: 4 bits times 11).
    With the hessian of the matrix's inputs (columns x columns), the values are rounded by GPTQ
    (_gptq_q4) instead of to the nearest."""
    if hessian is not None:
        values, scales, mins = _gptq_q4(w.detach().to("cpu", torch.float32), group_size, hessian)
    else:
        w = w.detach().to("cpu", torch.float32).reshape(-1, group_size)
        chunks = [_search_q4(block) for block in w.split(_BLOCK_GROUPS)]
        values, scales, mins = (torch.cat(parts) for parts in zip(*chunks, strict=True))
    if not (torch.isfinite(scales).all() and torch.isfinite(mins).all()):
        raise UserError("a weight is not finite, or too large for float16 (|w| > 65504): cannot write v3")
    return values.reshape(-1), scales, mins


def _search_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    span = hi - lo
    best = None
    for a in range(CLIP_STEPS + 1):
        for b in range(CLIP_STEPS + 1):
            low, high = lo + (a * CLIP_STEP) * span, hi - (b * CLIP_STEP) * span
            scale, low = ((high - low) / 15).half().float(), low.half().float()
            values, error = _round_q4(w, scale, low)
            if best is None:
                best = [values, scale, low, error]
                continue
            better = error < best[3]
            best = [torch.where(better[:, None], values, best[0]), torch.where(better, scale, best[1]),
                    torch.where(better, low, best[2]), torch.where(better, error, best[3])]
    for _ in range(LEAST_SQUARES_STEPS):
        best = _refine_q4(w, *best)
    values, scale, low, _ = best
    return values.to(torch.uint8), scale.half(), low.half()


def _gptq_q4(w: torch.Tensor, group_size: int, hessian: torch.Tensor,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022): the columns are rounded in order, and each one's rounding
    error is moved onto the columns not yet rounded, in proportion to how the inputs correlate
    (the inverse hessian's Cholesky factor), so that the matrix's outputs on the calibration
    inputs, rather than its weights, stay close. A group's scale and minimum are _search_q4's for
    its weights as they stand when its first column comes. Last, a group whose values no longer
    reach 0 or 15 gets its lowest or highest one moved there (an error left uncompensated, and
    rare), which keeps write -> read -> write exact: on weights that are already 4-bit every
    error is 0, nothing moves, and the same groups come back, with or without a hessian."""
    rows, cols = w.shape
    h = hessian.to(torch.float64).clone()
    h[torch.diag(h) == 0, torch.diag(h) == 0] = 1.0  # inputs never seen: no error to move
    h += GPTQ_DAMPING * torch.diag(h).mean() * torch.eye(cols, dtype=torch.float64)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    w = w.clone()
    values = torch.empty(rows, cols)
    scales, mins = torch.empty(rows, cols // group_size), torch.empty(rows, cols // group_size)
    block = group_size * max(1, GPTQ_BLOCK // group_size)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        errors = torch.empty(rows, b1 - b0)
        for g0 in range(b0, b1, group_size):
            _, scale, low = _search_q4(w[:, g0 : g0 + group_size])
            scale, low = scale.float(), low.float()
            scales[:, g0 // group_size], mins[:, g0 // group_size] = scale, low
            live, divisor = scale > 0, torch.where(scale > 0, scale, 1.0)  # scale 0: a constant group, all 0
            unrounded = torch.empty(rows, group_size)
            for j in range(g0, g0 + group_size):
                unrounded[:, j - g0] = (w[:, j] - low) / divisor
                q = torch.where(live, unrounded[:, j - g0].round().clamp(0, 15), 0.0)
                values[:, j] = q
                error = (w[:, j] - (q * scale + low)) / inverse[j, j]
                w[:, j + 1 : b1] -= error[:, None] * inverse[j, j + 1 : b1][None, :]
                errors[:, j - b0] = error
            _keep_extremes(values[:, g0 : g0 + group_size], unrounded, live)
        w[:, b1:] -= errors @ inverse[b0:b1, b1:]
    return values.reshape(-1).to(torch.uint8), scales.reshape(-1).half(), mins.reshape(-1).half()


def _keep_extremes(values: torch.Tensor, unrounded: torch.Tensor, live: torch.Tensor) -> None:
    """In each live row of values (a group each, its scale not 0), the value of the lowest
    unrounded one becomes 0 and of the highest 15."""
    rows = torch.arange(len(values))
    values[rows[live], unrounded.argmin(1)[live]] = 0.0
    values[rows[live], unrounded.argmax(1)[live]] = 15.0


def _refine_q4(w: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
               error: torch.Tensor) -> list[torch.Tensor]:
    """The least-squares scale and minimum for these values, where rounding with them lowers the
    error and still stores the group's extremes as 0 and 15 (what write -> read -> write needs)."""
    n = w.shape[1]
    sq, sqq, sw, sqw = values.sum(1), values.square().sum(1), w.sum(1), (values * w).sum(1)
    det = n * sqq - sq * sq
    fit = torch.where(det > 0, (n * sqw - sq * sw) / torch.where(det > 0, det, 1.0), 0.0)
    new_scale = fit.half().float()
    new_low = ((sw - fit * sq) / n).half().float()
    new_values, new_error = _round_q4(w, new_scale, new_low)
    better = (new_error < error) & (new_scale > 0) & (new_values.amin(1) == 0) & (new_values.amax(1) == 15)
    return [torch.where(better[:, None], new_values, values), torch.where(better, new_scale, scale),
            torch.where(better, new_low, low), torch.where(better, new_error, error)]


def _round_q4(w: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values 0..15 for these scales and minimums (a zero scale: all 0), and each group's squared error."""
    values = torch.round((w - low[:, None]) / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(0, 15)
    values = torch.where(scale[:, None] > 0, values, 0.0)
    return values, (w - (values * scale[:, None] + low[:, None])).square_().sum(dim=1)


def pack_q4(values: torch.Tensor) -> bytes:
    """Two 4-bit values a byte: value 2i in byte i's low nibble, 2i + 1 in its high one."""
    return (values[0::2] | (values[1::2] << 4)).numpy().tobytes()


def dequantize_q4(packed: np.ndarray, scales: np.ndarray, mins: np.ndarray, group_size: int) -> torch.Tensor:
    """The flat float32 values of a v3 4-bit matrix: scale * q + min per group (q * scale is exact,
    so this is the one rounding every reader and the C engine's FMA agree on)."""
    values = np.empty(2 * len(packed), np.float32)
    values[0::2], values[1::2] = packed & 15, packed >> 4
    grouped = values.reshape(-1, group_size) * scales.astype(np.float32)[:, None] + mins.astype(np.float32)[:, None]
    return torch.from_numpy(grouped.reshape(-1))


def dequantize_q80(values: np.ndarray, scales: np.ndarray, group_size: int) -> torch.Tensor:
    """The flat float32 values * scales of a matrix in groups of its flattened values (so a
    group may straddle rows, as llama2.c's export writes them)."""
    grouped = values.astype(np.float32).reshape(-1, group_size) * scales[:, None]
    return torch.from_numpy(grouped.reshape(-1))


def _header_ints(args: ModelArgs, vocab_size: int) -> tuple[int, ...]:
    return (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads, vocab_size,
            args.max_seq_len)


def encode_header(args: ModelArgs, version: int, group_size: int = 0, v3: BinHeader | None = None) -> bytes:
    """The header of a file of this version (v2: group_size; v3: v3's fields)."""
    if version == 0:
        vocab = args.vocab_size if args.shared_classifier else -args.vocab_size
        return V0_HEADER.pack(*_header_ints(args, vocab))
    if version in (1, 2, 3):
        head = V1_HEADER.pack(MAGIC, version, *_header_ints(args, args.vocab_size), int(args.shared_classifier))
        if version == 2:
            head += V2_GROUP.pack(group_size)
        if version == 3:
            head += V3_FIELDS.pack(v3.group_size, v3.embedding_bits, v3.int8_group_size)
            head += _int8_layer_bits(v3.int8_layers)
        return head + b"\0" * (V1_HEADER_SIZE - len(head))
    raise UserError(f"cannot write model.bin version {version}: supported versions are {VERSIONS}")


def _int8_layer_bits(layers: tuple[int, ...]) -> bytes:
    bits = bytearray(V3_INT8_LAYER_BYTES)
    for layer in layers:
        bits[layer // 8] |= 1 << (layer % 8)
    return bytes(bits)


def write_model_bin(model: Transformer, path: str | Path, version: int = 1, group_size: int | None = None,
                    rounding: str = "mse", embedding_bits: int = V3_EMBEDDING_BITS,
                    int8_layers: tuple[int, ...] | None = None,
                    hessians: dict[int, torch.Tensor] | None = None) -> Path:
    """Writes model as a llama2.c model.bin of the given version.

    group_size (v2): None picks default_group_size; another value must divide every weight's
    size (llama2.c's rule); where it does not divide dim and hidden_dim, the C engine runs the
    matrices whose groups straddle rows in float32. (v3): the 4-bit groups' size, None picks
    v3_group_size; it must be even and divide dim and hidden_dim.
    rounding (v2 only): how quantize_q80 picks the scales; "llama2c" gives llama2.c's bytes.
    embedding_bits (v3 only): 8 keeps the embedding and an unshared classifier in Q8_0 (group
    size default_group_size), 4 quantizes them like the rest.
    int8_layers (v3 only): the layers kept in Q8_0 likewise; None picks v3_int8_layers.
    hessians (v3 only): id(weight) -> its inputs' x x^T summed over calibration tokens (see
    calibrate.py); those 4-bit matrices are rounded by quantize_q4's GPTQ.
    """
    if version == 2:
        return _write_v2(model, path, default_group_size(model.args) if group_size is None else group_size,
                         rounding)
    if version == 3:
        layout = v3_header(model.args, v3_group_size(model.args) if group_size is None else group_size,
                           embedding_bits, v3_int8_layers(model.args) if int8_layers is None else int8_layers)
        return _write_v3(model, path, layout, hessians or {})
    tensors = _v0_tensors(model) if version == 0 else _v1_tensors(model)
    header = encode_header(model.args, version)

    def chunks():
        yield header
        for t in tensors:
            yield t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()

    return atomic_write_bytes(path, chunks())


def _write_v2(model: Transformer, path: str | Path, group_size: int, rounding: str) -> Path:
    matrices = _v2_matrices(model)
    _check_group_size(model.args, group_size, [t.numel() for t in matrices], str(path))
    header = encode_header(model.args, 2, group_size)

    def chunks():
        yield header
        for t in _v2_norms(model):
            yield t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        for t in matrices:
            values, scales = quantize_q80(t, group_size, rounding)
            yield values.numpy().tobytes()
            yield scales.numpy().tobytes()

    return atomic_write_bytes(path, chunks())


def _write_v3(model: Transformer, path: str | Path, layout: BinHeader, hessians: dict[int, torch.Tensor]) -> Path:
    _check_v3(layout, str(path))
    header = encode_header(model.args, 3, v3=layout)

    def chunks():
        yield header
        for t in _v2_norms(model):
            yield t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        # GPTQ on a 110M model takes half a minute: show it
        matrices = tqdm(_v2_matrix_bits(model, layout), desc="writing v3", unit="matrix", leave=False)
        for t, bits, group_size in matrices:
            if bits == 8:
                values, scales = quantize_q80(t, group_size)
                yield values.numpy().tobytes()
                yield scales.numpy().tobytes()
            else:
                values, scales, mins = quantize_q4(t, group_size, hessians.get(id(t)))
                yield pack_q4(values)
                yield scales.numpy().tobytes()
                yield mins.numpy().tobytes()

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
        if version not in (1, 2, 3):
            raise UserError(f"{path}: unsupported model.bin version {version} (this build reads 0, 1, 2 and 3)")
        if len(head) < V1_HEADER_SIZE:
            raise UserError(f"{path}: truncated header")
        fields = V1_HEADER.unpack_from(head)
        if fields[9] > 1:
            raise UserError(f"{path}: bad header: shared_classifier flag is {fields[9]}, not 0 or 1")
        args = _parse_args(fields[2:9], bool(fields[9]), str(path))
        header = BinHeader(version, args, V1_HEADER_SIZE)
        if version == 2:
            header.group_size = V2_GROUP.unpack_from(head, V1_HEADER.size)[0]
            _check_group_size(args, header.group_size, _tensor_sizes(args, 2), f"{path}: bad header")
        if version == 3:
            header.group_size, header.embedding_bits, header.int8_group_size = \
                V3_FIELDS.unpack_from(head, V1_HEADER.size)
            bits = head[V1_HEADER.size + V3_FIELDS.size :][:V3_INT8_LAYER_BYTES]
            header.int8_layers = tuple(i for i in range(8 * len(bits)) if bits[i // 8] >> (i % 8) & 1)
            _check_v3(header, f"{path}: bad header")
    else:
        if len(head) < V0_HEADER.size:
            raise UserError(f"{path}: {size} bytes, too short to be a model.bin")
        ints = list(V0_HEADER.unpack_from(head))
        shared = ints[5] > 0
        ints[5] = abs(ints[5])
        header = BinHeader(0, _parse_args(ints, shared, str(path)), V0_HEADER.size)
    expected = header.offset + _data_bytes(header)
    if size != expected:
        raise UserError(f"{path}: {size} bytes, the header implies {expected} (truncated, padded or not a model.bin)")
    return header


def _meta_model(args: ModelArgs) -> Transformer:
    """The model's shapes, no storage: for the sizes a header implies."""
    with torch.device("meta"):
        return Transformer(args)


def _tensor_sizes(args: ModelArgs, version: int) -> list[int]:
    """Element counts in file order, from the shapes alone; for v2, of the quantized matrices only."""
    tensors = {0: _v0_tensors, 1: _v1_tensors, 2: _v2_matrices}[version](_meta_model(args))
    return [t.numel() for t in tensors]


def _data_bytes(header: BinHeader) -> int:
    if header.version < 2:
        return 4 * sum(_tensor_sizes(header.args, header.version))
    a = header.args
    total = 4 * (2 * a.n_layers + 1) * a.dim  # the norms
    for t, bits, group_size in _v2_matrix_bits(_meta_model(a), header):
        n = t.numel()
        total += n + 4 * (n // group_size) if bits == 8 else n // 2 + 4 * (n // group_size)
    return total


def read_model_bin(path: str | Path) -> Transformer:
    """Loads a model.bin (ours or upstream llama2.c's) into the PyTorch model; v2 and v3 weights
    are dequantized."""
    header = read_header(path)
    model = Transformer(header.args)
    if header.version >= 2:
        _read_quantized(path, header, model)
        return model
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


def _read_quantized(path: str | Path, header: BinHeader, model: Transformer) -> None:
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=header.offset)
    at = 0

    def take(n: int, dtype) -> np.ndarray:
        nonlocal at
        size = n * np.dtype(dtype).itemsize
        chunk = np.array(data[at : at + size]).view(dtype)
        at += size
        return chunk

    with torch.no_grad():
        for t in _v2_norms(model):
            t.copy_(torch.from_numpy(take(t.numel(), np.float32)).view_as(t))
        for t, bits, group_size in _v2_matrix_bits(model, header):
            n = t.numel()
            if bits == 8:
                values = take(n, np.int8)
                t.copy_(dequantize_q80(values, take(n // group_size, np.float32), group_size).view_as(t))
            else:
                packed = take(n // 2, np.uint8)
                scales, mins = take(n // group_size, np.float16), take(n // group_size, np.float16)
                t.copy_(dequantize_q4(packed, scales, mins, group_size).view_as(t))


def convert(src: str | Path, dst: str | Path, version: int, group_size: int | None = None) -> Path:
    """Rewrites a model.bin in another version."""
    return write_model_bin(read_model_bin(src), dst, version, group_size)
