"""`make bench`, decode part: the C engine's decode and prefill speed, fp32, int8 and int4, against
PyTorch and llama.cpp, measured in the same run.

Random models of llama2.c's 15M, 42M and 110M shapes with the 32000- and 55296-piece vocabs,
written as model.bin v1 (float32), v2 (int8, Q8_0 groups) and v3 (int4: the default, groups of 16
with the embedding and the first layer int8, and the smallest, groups of 32 with the embedding int4
too). For each, at 1 and 2 threads:

  decode   `./run -t 0 -n 256` from BOS: the achieved tok/s it reports (best of C_ROUNDS runs,
           after one untimed run, and taking turns with the other weights, so that a
           burst of load from elsewhere, or a file paged out meanwhile, hits none alone);
  prefill  a 128-token prompt through l2_model_prefill (the binding), tokens / second (best
           of PREFILL_RUNS, or of those done in PREFILL_SECONDS: one takes milliseconds,
           which a moment of load elsewhere spoils);
  PyTorch  generate() of 256 tokens (KV-cached) and one forward pass over the prompt;
  llama.cpp  the same model exported by our GGUF exporter as F32, Q8_0 and Q4_0, run by llama-bench
           (tg256 and pp128, one repetition after its own warm-up) in each round, taking turns
           with ./run's runs, best of rounds. llama.cpp is the pinned copy of
           llama2zh.interop.llamacpp, built for this CPU (-march=native, AMX off); where it cannot
           be built, or with --no-llamacpp, those rows are left out.

"fp32 plain" is the C engine's portable kernel (the C loops, as the compiler vectorises them
for this CPU: the engine's fp32 path before the SIMD kernels); the other C rows use the
kernels this CPU runs best. The embeddings of <unk>, BOS and EOS are shrunk so that greedy
decoding does not stop early. This machine is shared and noisy: trust the ratios, which
compare runs made minutes apart, more than the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2

from llama2zh.engine import CModel, run_binary
from llama2zh.export import write_model_bin
from llama2zh.interop import llamacpp
from llama2zh.interop.gguf import write_gguf
from llama2zh.model import ModelArgs, Transformer
from llama2zh.paths import ROOT
from llama2zh.vocab.export import write_tokenizer_bin

SHAPES = {  # llama2.c's, with PyTorch's repeats here: the big ones are slow to run
    "15M": (dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768, max_seq_len=256), 3),
    "42M": (dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, hidden_dim=1376, max_seq_len=1024), 2),
    "110M": (dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048, max_seq_len=1024), 1),
}
VOCABS = (32000, 55296)
STEPS = 256
PROMPT = 128
C_ROUNDS = 3  # decode rounds of the C engine, every shape: a single 110M run was at the noise's mercy
PREFILL_RUNS, PREFILL_SECONDS = 20, 2.0
THREADS = (1, 2)
MODEL_BINS = {  # the model.bin files of each model: write_model_bin's arguments
    "v1": dict(version=1),
    "v2": dict(version=2),
    "v3": dict(version=3),  # the default: groups of 16, the embedding and the first layer int8
    "v3 g32": dict(version=3, group_size=32, embedding_bits=4),  # the smallest: groups of 32, all int4 but layer 0
}
C_VARIANTS = (  # row label, model.bin, kernel (None: the best this CPU runs)
    ("fp32 plain", "v1", "portable"),
    ("fp32", "v1", None),
    ("int8 v2", "v2", None),
    ("int4 v3", "v3", None),
    ("int4 v3 g32 int4-embedding", "v3 g32", None),
)
GGUF_TYPES = ("f32", "q8_0", "q4_0")  # written by our exporter, run by llama-bench


@dataclass
class Row:
    shape: str
    vocab: int
    weights: str  # what runs: "fp32 plain", "fp32 avx512", "int8 v2 avx512", "PyTorch fp32", "llama.cpp Q8_0"
    megabytes: float
    threads: int
    decode: float
    prefill: float


def id_tokenizer(vocab_size: int, path: Path) -> Path:
    """A tokenizer.bin whose pieces print their own ids, "[0]".."[n-1]" (no trailer)."""
    pieces = [f"[{i}]".encode() for i in range(vocab_size)]
    data = {"max_token_length": max(map(len, pieces)), "pieces": pieces, "scores": [0.0] * vocab_size,
            "trailer": None}
    return write_tokenizer_bin(data, path)


def id_gguf(model: Transformer, path: Path, qtype: str) -> Path:
    """model as a GGUF file whose vocabulary is id_tokenizer's pieces, "[0]".."[n-1]", as a
    SentencePiece model (llama-bench tokenizes nothing: it needs a loadable vocab of the right size)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    proto.trainer_spec.unk_piece, proto.trainer_spec.bos_piece, proto.trainer_spec.eos_piece = "[0]", "[1]", "[2]"
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    for i in range(model.args.vocab_size):
        proto.pieces.add(piece=f"[{i}]", type=kinds.UNKNOWN if i == 0 else kinds.CONTROL if i < 3 else kinds.NORMAL)
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return write_gguf(model, sp, proto, path, qtype, path.stem)


def random_model(shape: dict, vocab_size: int) -> Transformer:
    model = Transformer(ModelArgs(vocab_size=vocab_size, **shape))
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # a random tied model repeats its input: keep it from repeating BOS
        model.tok_embeddings.weight[0:3] *= 0.1
    return model


def c_decode(model_bin: Path, tokenizer_bin: Path, kernel: str | None, threads: int) -> float:
    """The achieved tok/s of one `./run -t 0 -n 256`; checks that all 256 came out."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMA2ZH_KERNEL"}
    env.update(OMP_NUM_THREADS=str(threads), **({"LLAMA2ZH_KERNEL": kernel} if kernel else {}))
    result = subprocess.run([str(run_binary()), str(model_bin), "-k", str(tokenizer_bin), "-t", "0",
                             "-n", str(STEPS), "-i", ""], capture_output=True, text=True, env=env, check=True)
    if result.stdout.count("[") != STEPS:
        raise RuntimeError(f"{model_bin}: greedy decoding stopped after {result.stdout.count('[')} tokens")
    return float(re.search(r"achieved tok/s: ([\d.]+)", result.stderr).group(1))


def llama_bench(bin_dir: Path, gguf_file: Path, threads: int) -> tuple[float, float]:
    """llama.cpp's decode tok/s (tg256) and prefill tok/s (pp128), one repetition of each."""
    result = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf_file), "-p", str(PROMPT), "-n", str(STEPS),
                             "-t", str(threads), "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    rates = {(test["n_prompt"], test["n_gen"]): test["avg_ts"] for test in json.loads(result.stdout)}
    return rates[(0, STEPS)], rates[(PROMPT, 0)]


def open_with_kernel(model_bin: Path, kernel: str | None) -> CModel:
    """The model in this process, with LLAMA2ZH_KERNEL set to kernel (None: the best) while it opens."""
    saved = os.environ.pop("LLAMA2ZH_KERNEL", None)
    if kernel:
        os.environ["LLAMA2ZH_KERNEL"] = kernel
    try:
        return CModel(model_bin)
    finally:
        os.environ.pop("LLAMA2ZH_KERNEL", None)
        if saved is not None:
            os.environ["LLAMA2ZH_KERNEL"] = saved


def c_prefill(model_bin: Path, kernel: str | None, threads: int) -> tuple[float, str]:
    """Best tok/s over 128-token prefills, and the kernel set that ran them."""
    model = open_with_kernel(model_bin, kernel)
    model.set_threads(threads)
    best, began = float("inf"), time.perf_counter()
    for run in range(PREFILL_RUNS + 1):  # the first also warms the caches
        start = time.perf_counter()
        model.prefill(prompt_ids(model.vocab_size), all_logits=False)
        best = min(best, time.perf_counter() - start)
        if run >= 3 and time.perf_counter() - began > PREFILL_SECONDS:
            break
    return PROMPT / best, model.kernel


def prompt_ids(vocab_size: int) -> list[int]:
    """BOS, then PROMPT - 1 ids spread over the vocab."""
    return [1] + [3 + (i * 7919) % (vocab_size - 3) for i in range(PROMPT - 1)]


def torch_rates(model: Transformer, threads: int, repeats: int) -> tuple[float, float]:
    """PyTorch's decode tok/s (generate, 256 tokens) and prefill tok/s (one forward pass)."""
    torch.set_num_threads(threads)
    prompt = torch.tensor([prompt_ids(model.args.vocab_size)])
    decode, prefill = 0.0, 0.0
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            n = len(model.generate([1], STEPS, temperature=0.0))
            decode = max(decode, n / (time.perf_counter() - start))
            start = time.perf_counter()
            model(prompt)
            prefill = max(prefill, PROMPT / (time.perf_counter() - start))
    return decode, prefill


def bench_model(name: str, vocab: int, work: Path, threads_list, repeats_scale: float,
                llamacpp_bin: Path | None) -> list[Row]:
    shape, repeats = SHAPES[name]
    repeats, rounds = (max(1, round(n * repeats_scale)) for n in (repeats, C_ROUNDS))
    model = random_model(shape, vocab)
    files = {key: write_model_bin(model, work / f"{name}_{vocab}_{key.replace(' ', '_')}.bin", **MODEL_BINS[key])
             for key in dict.fromkeys(key for _, key, _ in C_VARIANTS)}
    variants = [(label, files[key], kernel) for label, key, kernel in C_VARIANTS]
    tokenizer = id_tokenizer(vocab, work / f"ids{vocab}.bin")
    ggufs = [(f"llama.cpp {qtype.upper()}", id_gguf(model, work / f"{name}_{vocab}_{qtype}.gguf", qtype))
             for qtype in (GGUF_TYPES if llamacpp_bin else ())]
    rows = []
    for threads in threads_list:
        decode_runs, llamacpp_runs = [], []
        for _ in range(rounds + 1):  # turns, round by round; the first round warms the files
            decode_runs.append([c_decode(path, tokenizer, kernel, threads) for _, path, kernel in variants])
            llamacpp_runs.append([llama_bench(llamacpp_bin, path, threads) for _, path in ggufs])
        for (label, path, kernel), decode in zip(variants, map(max, zip(*decode_runs[1:], strict=True)), strict=True):
            prefill, used = c_prefill(path, kernel, threads)
            label = label if kernel else f"{label} {used}"
            rows.append(Row(name, vocab, label, path.stat().st_size / 1e6, threads, decode, prefill))
        for (label, path), runs in zip(ggufs, zip(*llamacpp_runs[1:], strict=True), strict=True):
            decode, prefill = (max(rates) for rates in zip(*runs, strict=True))
            rows.append(Row(name, vocab, label, path.stat().st_size / 1e6, threads, decode, prefill))
        decode, prefill = torch_rates(model, threads, repeats)
        rows.append(Row(name, vocab, "PyTorch fp32", files["v1"].stat().st_size / 1e6, threads, decode, prefill))
        print(f"  {name} vocab {vocab}, {threads} thread(s): done", flush=True)
    return rows


def table(rows: list[Row]) -> str:
    plain = {(r.shape, r.vocab, r.threads): r.decode for r in rows if r.weights == "fp32 plain"}
    lines = ["| shape | vocab | weights | file MB | threads | decode tok/s | decode vs fp32 plain "
             "| prefill tok/s | prefill / decode |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.decode / plain[(r.shape, r.vocab, r.threads)]
        lines.append(f"| {r.shape} | {r.vocab} | {r.weights} | {r.megabytes:.0f} | {r.threads} | {r.decode:.0f} "
                     f"| {ratio:.2f}x | {r.prefill:.0f} | {r.prefill / r.decode:.1f}x |")
    return "\n".join(lines)


def machine() -> str:
    """The CPU's model name and count, for the line above the table."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return f"{found.group(1) if found else platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--vocabs", nargs="+", type=int, default=list(VOCABS))
    parser.add_argument("--threads", nargs="+", type=int, default=list(THREADS))
    parser.add_argument("--repeats", type=float, default=1.0,
                        help="scales the number of timed runs (the C rounds and each shape's PyTorch repeats)")
    parser.add_argument("--no-llamacpp", action="store_true", help="leave out the llama.cpp rows")
    args = parser.parse_args()
    llamacpp_bin, about_llamacpp = None, ""
    if not args.no_llamacpp:
        try:
            llamacpp_bin = llamacpp.build("native")
            about_llamacpp = (f"; llama.cpp {llamacpp.VERSION} (llama-cpp-python's vendored copy), "
                              "built -march=native with AMX off")
        except RuntimeError as e:
            print(f"bench.decode: no llama.cpp rows, it cannot be built here: {e}", flush=True)
    work = ROOT / "build" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.shapes:
        for vocab in args.vocabs:
            rows += bench_model(name, vocab, work, args.threads, args.repeats, llamacpp_bin)
    print(f"\nmachine: {machine()}{about_llamacpp}")
    print(f"decode: {STEPS} greedy steps from BOS (`./run`, best of a few); prefill: a {PROMPT}-token prompt; "
          "random weights")
    print(table(rows))


if __name__ == "__main__":
    main()
