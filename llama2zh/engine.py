"""cffi binding (ABI mode) to the C engine's shared library, build/libllama2zh.so.

The declarations come from csrc/llama2.h itself, so the binding cannot drift from the
C API. In a source checkout the library is (re)built with `make lib` on first use, which
does nothing when it is newer than its sources; LLAMA2ZH_LIB points elsewhere (and
LLAMA2ZH_RUN at another `run` program).
An error inside C comes back as EngineError carrying the C message.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import cffi
import numpy as np

from llama2zh.errors import UserError
from llama2zh.paths import ROOT

HEADER = ROOT / "csrc" / "llama2.h"


class EngineError(UserError):
    """A failure reported by the C engine (bad file, bad token, ...)."""


def _declarations(header: str) -> str:
    """The header without its include guard and #include lines, which cffi cannot parse."""
    keep = []
    for line in header.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#define L2_"):
            continue
        keep.append(line)
    return "\n".join(keep)


def _make(target: str) -> None:
    """Brings a build product of the source checkout up to date (a no-op when it is)."""
    build = subprocess.run(["make", "-s", target], check=False, cwd=ROOT, capture_output=True, text=True)
    if build.returncode != 0:
        last = (build.stderr.strip().splitlines() or [f"make {target} failed"])[-1]
        raise EngineError(f"cannot build the C engine (make {target}): {last}")


def _library_path() -> Path:
    if os.environ.get("LLAMA2ZH_LIB"):
        return Path(os.environ["LLAMA2ZH_LIB"])
    _make("lib")
    return ROOT / "build" / "libllama2zh.so"


def run_binary() -> Path:
    """The `run` command line program (LLAMA2ZH_RUN, or ./run built with `make run`)."""
    if os.environ.get("LLAMA2ZH_RUN"):
        return Path(os.environ["LLAMA2ZH_RUN"])
    _make("run")
    return ROOT / "run"


ffi = cffi.FFI()
ffi.cdef(_declarations(HEADER.read_text()))
_lib = None


def lib():
    """The loaded library, built on first use."""
    global _lib
    if _lib is None:
        _lib = ffi.dlopen(str(_library_path()))
    return _lib


def _err_buffer():
    return ffi.new("char[]", lib().L2_ERR_SIZE)


def _raise(err) -> None:
    raise EngineError(ffi.string(err).decode("utf-8", "replace"))


class CTokenizer:
    """tokenizer.bin, encoded and decoded by the C engine."""

    def __init__(self, path: str | os.PathLike, vocab_size: int = 0):
        err = _err_buffer()
        handle = lib().l2_tokenizer_open(os.fsencode(path), vocab_size, err)
        if handle == ffi.NULL:
            _raise(err)
        self._handle = ffi.gc(handle, lib().l2_tokenizer_close)
        self.vocab_size = lib().l2_tokenizer_vocab_size(handle)
        self.bos_id = lib().l2_tokenizer_bos_id(handle)
        self.eos_id = lib().l2_tokenizer_eos_id(handle)
        self._ids, self._err = ffi.new("int[]", 4096), _err_buffer()  # reused: one tokenizer, one thread

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self.encode_array(text, bos, eos).tolist()

    def encode_array(self, text: str, bos: bool = True, eos: bool = False) -> np.ndarray:
        """The ids as an int32 array: no Python int per token, for bulk encoding."""
        data = text.encode("utf-8")
        while True:
            capacity = len(self._ids)
            n = lib().l2_encode(self._handle, data, len(data), int(bos), int(eos), self._ids, capacity, self._err)
            if n < 0:
                _raise(self._err)
            if n <= capacity:
                return np.frombuffer(ffi.buffer(self._ids, 4 * n), dtype=np.int32).copy()
            self._ids = ffi.new("int[]", 2 * n)  # grown once, reused by every later call

    def decode_bytes(self, ids: list[int]) -> bytes:
        err = _err_buffer()
        ids_c = ffi.new("int[]", list(ids))
        capacity = 16 * len(ids) + 16
        while True:
            out = ffi.new("char[]", capacity)
            n = lib().l2_decode(self._handle, ids_c, len(ids), out, capacity, err)
            if n < 0:
                _raise(err)
            if n <= capacity:
                return ffi.buffer(out, n)[:]
            capacity = n

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8")


class CModel:
    """model.bin (any version), run by the C engine's forward pass."""

    def __init__(self, path: str | os.PathLike):
        err = _err_buffer()
        handle = lib().l2_model_open(os.fsencode(path), err)
        if handle == ffi.NULL:
            _raise(err)
        self._handle = ffi.gc(handle, lib().l2_model_close)
        config = lib().l2_model_config(handle)
        self.config = {name: getattr(config, name) for name, _ in ffi.typeof(config).item.fields}

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def kernel(self) -> str:
        """The matmul kernel set in use ("portable", "avx2", "avx512"; LLAMA2ZH_KERNEL picks one)."""
        return ffi.string(lib().l2_model_kernel(self._handle)).decode()

    def set_threads(self, n: int) -> int:
        """Threads for the forward pass (0: the default); returns the count in use."""
        count = lib().l2_model_set_threads(self._handle, n)
        if count < 0:
            raise EngineError("out of memory for the thread buffers")
        return count

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (float32, shape (vocab,)) for token at pos; positions must come in order."""
        err = _err_buffer()
        logits = lib().l2_model_forward(self._handle, token, pos, err)
        if logits == ffi.NULL:
            _raise(err)
        return np.frombuffer(ffi.buffer(logits, 4 * self.vocab_size), dtype=np.float32).copy()

    def prefill(self, tokens: list[int], pos: int = 0, all_logits: bool = True) -> np.ndarray:
        """tokens run as a batch at positions pos..: the logits of each (float32, shape
        (len(tokens), vocab)), or with all_logits False only the last one's (vocab,)."""
        err = _err_buffer()
        out = np.empty((len(tokens), self.vocab_size), dtype=np.float32) if all_logits else None
        logits = lib().l2_model_prefill(self._handle, ffi.new("int[]", list(map(int, tokens))), len(tokens), pos,
                                        ffi.cast("float *", ffi.from_buffer(out)) if all_logits else ffi.NULL, err)
        if logits == ffi.NULL:
            _raise(err)
        if all_logits:
            return out
        return np.frombuffer(ffi.buffer(logits, 4 * self.vocab_size), dtype=np.float32).copy()

    def generate(self, tokenizer: CTokenizer, prompt: str, steps: int, temperature: float = 0.0,
                 topp: float = 0.9, seed: int = 1234) -> list[int]:
        """The ids `./run -n steps` generates after the prompt (prompt and stop token excluded)."""
        prompt_ids = tokenizer.encode(prompt, bos=True)
        err = _err_buffer()
        sampler = lib().l2_sampler_new(self.vocab_size, temperature, topp, seed)
        if sampler == ffi.NULL:
            raise EngineError("cannot allocate the sampler")
        sampler = ffi.gc(sampler, lib().l2_sampler_free)
        capacity = self.config["seq_len"] + 1
        out = ffi.new("int[]", capacity)
        n = lib().l2_generate(self._handle, sampler, ffi.new("int[]", prompt_ids), len(prompt_ids), steps,
                              tokenizer.bos_id, tokenizer.eos_id, out, capacity, ffi.NULL, ffi.NULL, err)
        if n < 0:
            _raise(err)
        return list(out[0:n])
