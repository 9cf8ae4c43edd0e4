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
        chat = ffi.new("int[2]")
        # (<|im_start|>, <|im_end|>) when tokenizer.bin carries a chat template, else None
        self.chat_ids = (chat[0], chat[1]) if lib().l2_tokenizer_chat_ids(handle, chat, chat + 1) else None
        self._ids, self._err = ffi.new("int[]", 4096), _err_buffer()  # reused: one tokenizer, one thread

    def _call_ids(self, call) -> np.ndarray:
        """The ids call(ids, capacity, err) writes, retried with a buffer as big as the count it
        returns when that exceeds the capacity (the C functions count what did not fit)."""
        while True:
            capacity = len(self._ids)
            n = call(self._ids, capacity, self._err)
            if n < 0:
                _raise(self._err)
            if n <= capacity:
                return np.frombuffer(ffi.buffer(self._ids, 4 * n), dtype=np.int32).copy()
            self._ids = ffi.new("int[]", 2 * n)  # grown once, reused by every later call

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self.encode_array(text, bos, eos).tolist()

    def encode_array(self, text: str, bos: bool = True, eos: bool = False) -> np.ndarray:
        """The ids as an int32 array: no Python int per token, for bulk encoding."""
        data = text.encode("utf-8")
        return self._call_ids(lambda ids, capacity, err: lib().l2_encode(
            self._handle, data, len(data), int(bos), int(eos), ids, capacity, err))

    def render_chat(self, messages: list[dict], bos: bool = True,
                    add_generation_prompt: bool | None = None) -> list[int]:
        """The ChatML ids of messages ({"role", "content"} dicts), by l2_chat_render.
        add_generation_prompt (default: when the last message is not the assistant's) appends
        <|im_start|>assistant\\n."""
        if add_generation_prompt is None:
            add_generation_prompt = not messages or messages[-1]["role"] != "assistant"
        strings = []  # the C strings, alive until the call returns
        c_messages = ffi.new("L2Message[]", len(messages))
        for c_message, message in zip(c_messages, messages, strict=True):
            for field in ("role", "content"):
                text = message[field].encode("utf-8")
                if b"\0" in text:
                    raise EngineError(f"a message's {field} holds a NUL character")
                strings.append(ffi.new("char[]", text))
                setattr(c_message, field, strings[-1])
        return self._call_ids(lambda ids, capacity, err: lib().l2_chat_render(
            self._handle, c_messages, len(messages), int(bos), int(add_generation_prompt), ids, capacity,
            err)).tolist()

    def close_reply(self) -> list[int]:
        """<|im_end|> encode("\\n"): what closes a reply the model generated."""
        return self._call_ids(lambda ids, capacity, err: lib().l2_chat_close_reply(
            self._handle, ids, capacity, err)).tolist()

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
        self.config = {}
        for name, _ in ffi.typeof(config).item.fields:
            value = getattr(config, name)
            self.config[name] = bytes(ffi.buffer(value)) if isinstance(value, ffi.CData) else value  # int8_layers

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

    def generate_ids(self, ids: list[int], pos: int = 0, max_pos: int = 0, max_new: int = 0,
                     stop: tuple[int, ...] = (), sampler: CSampler | None = None, temperature: float = 0.0,
                     topp: float = 0.9, seed: int = 1234) -> tuple[list[int], int]:
        """l2_generate: feeds ids at positions pos.. (the KV cache must hold 0..pos-1), then
        samples up to max_new tokens (0: no limit), stopping before a stop id or once a token
        lands at position max_pos (0: seq_len). Returns (the generated ids, the positions the KV
        cache now holds: all but the last generated id when no stop id ended it). The sampler
        (one for a whole conversation keeps one random stream) defaults to a fresh one from the
        settings."""
        sampler = sampler or CSampler(self.vocab_size, temperature, topp, seed)
        err, end_pos = _err_buffer(), ffi.new("int *")
        capacity = self.config["seq_len"] + 1
        out = ffi.new("int[]", capacity)
        n = lib().l2_generate(self._handle, sampler._handle, ffi.new("int[]", list(map(int, ids))), len(ids), pos,
                              max_pos, max_new, ffi.new("int[]", list(stop)), len(stop), out, capacity, ffi.NULL,
                              ffi.NULL, end_pos, err)
        if n < 0:
            _raise(err)
        return list(out[0:n]), end_pos[0]

    def generate(self, tokenizer: CTokenizer, prompt: str, steps: int, temperature: float = 0.0,
                 topp: float = 0.9, seed: int = 1234) -> list[int]:
        """The ids `./run -n steps` generates after the prompt (prompt and stop token excluded)."""
        return self.generate_ids(tokenizer.encode(prompt, bos=True), max_pos=steps,
                                 stop=(tokenizer.bos_id, tokenizer.eos_id), temperature=temperature, topp=topp,
                                 seed=seed)[0]


class CBatch:
    """l2_batch: up to max_seqs independent sequences of one model, each in a slot with its own KV cache,
    advanced together one token each (each weight read once per step for all of them). The model's calls and
    the batch's must not overlap (they share its buffers)."""

    def __init__(self, model: CModel, max_seqs: int):
        err = _err_buffer()
        handle = lib().l2_batch_new(model._handle, max_seqs, err)
        if handle == ffi.NULL:
            _raise(err)
        self.model, self.max_seqs = model, max_seqs  # the model outlives the batch
        self._handle = ffi.gc(handle, lib().l2_batch_free)
        self._err = _err_buffer()

    def prefill(self, slot: int, tokens: list[int], pos: int = 0) -> np.ndarray:
        """tokens at positions pos.. of the sequence in slot (its cache must hold 0..pos-1): a new prompt at
        pos 0, or a chunk of one. Returns the last token's logits (float32, shape (vocab,))."""
        if lib().l2_batch_prefill(self._handle, slot, ffi.new("int[]", list(map(int, tokens))), len(tokens), pos,
                                  self._err) < 0:
            _raise(self._err)
        return self.logits(slot)

    def step(self, slots: list[int], tokens: list[int], positions: list[int]) -> np.ndarray:
        """One token for each of the sequences in slots (distinct), tokens[i] at positions[i] in slots[i].
        Returns their logits (float32, shape (len(slots), vocab)), in the order of slots."""
        if not len(slots) == len(tokens) == len(positions):
            raise EngineError("a step needs as many tokens and positions as slots")
        c_slots = ffi.new("int[]", list(map(int, slots)))
        if lib().l2_batch_step(self._handle, c_slots, ffi.new("int[]", list(map(int, tokens))),
                               ffi.new("int[]", list(map(int, positions))), len(slots), self._err) < 0:
            _raise(self._err)
        return np.stack([self._view(slot) for slot in slots])  # one copy

    def logits(self, slot: int) -> np.ndarray:
        """The logits of the last token run in slot (float32, shape (vocab,))."""
        return self._view(slot).copy()

    def _view(self, slot: int) -> np.ndarray:
        """The slot's logits in C memory, valid until the slot runs again."""
        logits = lib().l2_batch_logits(self._handle, slot)
        if logits == ffi.NULL:
            raise EngineError(f"slot {slot} is out of range ({self.max_seqs} slots)")
        return np.frombuffer(ffi.buffer(logits, 4 * self.model.vocab_size), dtype=np.float32)


class CSampler:
    """l2_sampler: argmax, or seeded temperature / top-p draws, after OpenAI's presence and
    frequency penalties (counted per generate_ids call); one keeps its random stream across
    generate_ids calls."""

    def __init__(self, vocab_size: int, temperature: float = 0.0, topp: float = 0.9, seed: int = 1234,
                 presence: float = 0.0, frequency: float = 0.0):
        handle = lib().l2_sampler_new(vocab_size, temperature, topp, seed)
        if handle == ffi.NULL:
            raise EngineError("cannot allocate the sampler")
        self.vocab_size = vocab_size
        self._handle = ffi.gc(handle, lib().l2_sampler_free)
        if lib().l2_sampler_set_penalties(self._handle, presence, frequency):
            raise EngineError("cannot allocate the sampler's penalty counts")

    def sample(self, logits: np.ndarray) -> int:
        """l2_sample: the next token from one position's logits (counted for the penalties); logits stay as
        they were (l2_sample overwrites a copy)."""
        buffer = np.array(logits, dtype=np.float32)
        if buffer.shape != (self.vocab_size,):
            raise EngineError(f"sample needs {self.vocab_size} logits, not shape {buffer.shape}")
        return lib().l2_sample(self._handle, ffi.cast("float *", ffi.from_buffer(buffer)))


class CDecoder:
    """l2_decode_step: the text of one id at a time as whole UTF-8 characters (a character split across byte
    pieces comes out with its last byte), for streaming; the pieces add up to CTokenizer.decode. Only reads
    the tokenizer, so a decoder may run in another thread than the tokenizer's encode calls."""

    def __init__(self, tokenizer: CTokenizer):
        self.tokenizer = tokenizer
        self._state = ffi.new("L2Decoder *")
        lib().l2_decoder_init(self._state)
        self._out = ffi.new("char[]", lib().l2_decode_bound(tokenizer._handle))
        self._err = _err_buffer()

    def step(self, id: int) -> str:
        n = lib().l2_decode_step(self.tokenizer._handle, self._state, id, self._out, self._err)
        if n < 0:
            _raise(self._err)
        return ffi.buffer(self._out, n)[:].decode("utf-8")

    def finish(self) -> str:
        """What is still pending (bytes that never formed a character, as U+FFFD)."""
        n = lib().l2_decode_finish(self.tokenizer._handle, self._state, self._out)
        return ffi.buffer(self._out, n)[:].decode("utf-8")
