"""`llama2zh chat out/RUN`: a conversation with the PyTorch model, turn by turn.

The same conventions as `./run -m chat`: each line of standard input is a user turn; the reply
streams to standard output and ends with a newline; prompts go to standard error, and only when
standard input is a terminal. The KV cache is kept across turns, so each turn runs only its
new ids: the previous reply's closing (<|im_end|> "\\n"), the user's message and the generation
prompt (chat.py's rule, the same as the C engine's).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from llama2zh.chat import close_reply_ids, render_ids, require_chat_ids
from llama2zh.checkpoint import load_checkpoint
from llama2zh.model import KVCache, Transformer
from llama2zh.vocab.export import load_sentencepiece


class ChatSession:
    """One conversation: the model's KV cache and where it ends."""

    def __init__(self, model: Transformer, sp, system: str | None = None, temperature: float = 0.0,
                 top_p: float = 0.9, seed: int = 1234, max_reply: int = 256, penalties: tuple[float, float] = (0, 0)):
        self.model, self.sp = model, sp
        self.penalties = penalties  # presence, frequency
        self.im_end = require_chat_ids(sp, "tokenizer.model")[1]
        self.system, self.temperature, self.top_p, self.max_reply = system, temperature, top_p, max_reply
        self.generator = torch.Generator().manual_seed(seed)
        self.cache = KVCache(model.args, batch=1)
        self.pos = 0  # positions the cache holds
        self.pending: list[int] = []  # ids still to feed before the next user message

    @property
    def seq_len(self) -> int:
        return self.model.args.max_seq_len

    def turn_ids(self, user: str) -> list[int]:
        """The ids a user message adds: the previous reply's end, the message, the generation prompt."""
        if self.pos == 0:
            messages = ([{"role": "system", "content": self.system}] if self.system else [])
            return render_ids(self.sp, messages + [{"role": "user", "content": user}])
        return self.pending + render_ids(self.sp, [{"role": "user", "content": user}], bos=False)

    def reply(self, user: str, on_text=None) -> list[int] | None:
        """The reply's ids (on_text gets its text as it grows); None when the turn does not fit."""
        new = self.turn_ids(user)
        if self.pos + len(new) > self.seq_len:
            return None
        limit = self.seq_len - (self.pos + len(new)) + 1
        if self.max_reply:
            limit = min(limit, self.max_reply)
        out = _Streamer(self.sp, on_text)
        ids = self.model.generate(new, limit, self.temperature, self.top_p,
                                  stop_ids=(self.im_end, self.sp.eos_id(), self.sp.bos_id()),
                                  generator=self.generator, cache=self.cache, start_pos=self.pos,
                                  on_token=out.add, presence_penalty=self.penalties[0],
                                  frequency_penalty=self.penalties[1])
        out.finish(ids)
        stopped = len(ids) < limit
        self.pos += len(new) + len(ids) - (0 if stopped else 1)
        self.pending = ([] if stopped else ids[-1:]) + close_reply_ids(self.sp)
        return ids

    def full(self) -> bool:
        """The context is full: no room for another turn (as ./run -m chat decides)."""
        return self.pos >= self.seq_len


class _Streamer:
    """Writes a reply's text as its ids come, holding back an incomplete UTF-8 character."""

    def __init__(self, sp, on_text):
        self.sp, self.on_text, self.ids, self.shown = sp, on_text, [], ""

    def _show(self, final: bool) -> None:
        text = self.sp.decode(self.ids)
        if self.on_text and (final or not text.endswith("\ufffd")) and text.startswith(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text

    def add(self, token: int) -> None:
        self.ids.append(token)
        self._show(final=False)

    def finish(self, ids: list[int]) -> None:
        self.ids = list(ids)
        self._show(final=True)


def chat(run_dir: Path, system: str | None, first: str | None, temperature: float, top_p: float, seed: int,
         max_reply: int, penalties: tuple[float, float] = (0, 0)) -> int:
    model, _ = load_checkpoint(run_dir / "ckpt.pt")
    sp, _ = load_sentencepiece(run_dir / "tokenizer.model")
    session = ChatSession(model.eval(), sp, system, temperature, top_p, seed, max_reply, penalties)
    interactive = sys.stdin.isatty()

    def show(stream, text: str) -> None:
        stream.write(text)
        stream.flush()

    def prompt(text: str) -> None:
        if interactive:
            show(sys.stderr, text)

    def user_turns() -> Iterable[str]:
        """-i's message, then each non-empty line of standard input."""
        if first:
            prompt(f"User: {first}\n")
            yield first
        while True:
            prompt("User: ")
            line = sys.stdin.readline()
            if not line:
                return
            line = line.rstrip("\n").rstrip("\r")
            if line:
                yield line

    for user in user_turns():
        prompt("Assistant: ")
        fitted = session.reply(user, lambda text: show(sys.stdout, text)) is not None
        if fitted:
            show(sys.stdout, "\n")
        if not fitted or session.full():
            print(f"llama2zh: the conversation no longer fits in the model's context (seq_len {session.seq_len})",
                  file=sys.stderr)
            return 0
    return 0
