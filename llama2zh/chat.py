"""The chat template: messages -> token ids, the Python half of the one rendering rule.

ChatML, as minimind, Qwen and Ollama write it:

    <|im_start|>{role}\\n{content}<|im_end|>\\n      per message (roles system, user, assistant)
    <|im_start|>assistant\\n                        to ask for a reply

The rule in ids: BOS; then the text above is cut at the two markers, each marker is its
special id, and each stretch of text between them is encoded on its own as plain text by the
tokenizer (SentencePiece, dummy prefix and all). So a message is
<|im_start|> encode(role + "\\n" + content) <|im_end|> encode("\\n"). The markers are control
pieces: SentencePiece never makes them from text, so a message that contains the characters
"<|im_start|>" encodes them as ordinary text and cannot forge a turn. csrc/tokenizer.c
implements the same rule (l2_chat_render); tests and `llama2zh verify` check that both agree.

A reply the model generates is kept as the ids it generated; it is closed by
close_reply_ids(): <|im_end|> encode("\\n").
"""

from __future__ import annotations

from sentencepiece import sentencepiece_model_pb2

from llama2zh.errors import UserError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_PIECES = (IM_START, IM_END)
TEMPLATE = "chatml"  # the name tokenizer.bin's trailer records
ROLES = ("system", "user", "assistant")
CONTROL = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
# The same rule as a Jinja chat template (text), for the HF and GGUF exports: their tokenizers cut
# the text at the two special pieces and encode each stretch alone, as render_ids does.
JINJA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_piece_ids(sp) -> tuple[int, int] | None:
    """(<|im_start|>, <|im_end|>) ids of a SentencePieceProcessor, or None when it lacks them."""
    ids = [sp.piece_to_id(piece) for piece in CHAT_PIECES]
    if all(sp.id_to_piece(i) == piece and sp.is_control(i) for i, piece in zip(ids, CHAT_PIECES, strict=True)):
        return ids[0], ids[1]
    return None


def run_chat_ids(sp, checkpoint: dict) -> tuple[int, int] | None:
    """The chat ids of a run that talks in turns: its tokenizer has the chat pieces and its model
    was tuned past pretraining (vocab train reserves the pieces in every tokenizer it makes, so
    a pretrained story model has them too, but has never seen a turn). Exports give such runs
    the chat template."""
    if checkpoint.get("run_info", {}).get("stage") in ("init", "pretrain"):
        return None
    return chat_piece_ids(sp)


def require_chat_ids(sp, what: str = "the tokenizer") -> tuple[int, int]:
    ids = chat_piece_ids(sp)
    if ids is None:
        raise UserError(f"{what} has no chat pieces ({IM_START}, {IM_END}): not a chat-tuned run (llama2zh sft)")
    return ids


def add_chat_pieces(model_bytes: bytes) -> tuple[bytes, int]:
    """tokenizer.model with the chat pieces appended as control pieces (every old id kept), and
    how many were added (0 when it has them already). A piece of that text that is not a
    control piece is refused: text could produce it."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    present = {p.piece: p.type for p in proto.pieces}
    added = 0
    for piece in CHAT_PIECES:
        if piece in present:
            if present[piece] != CONTROL:
                raise UserError(f"the tokenizer has {piece} as a text piece, not a control piece: text could "
                                "forge chat turns; use a tokenizer without it")
            continue
        proto.pieces.add(piece=piece, score=0.0, type=CONTROL)
        added += 1
    return (proto.SerializeToString() if added else model_bytes), added


def check_messages(messages) -> list[dict]:
    """messages as a list of {"role", "content"} dicts with known roles and string contents."""
    if not isinstance(messages, list):
        raise UserError("a conversation is a list of {\"role\", \"content\"} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise UserError(f"message {i}: needs a role ({', '.join(ROLES)}) and a string content")
    return messages


def message_pieces(sp, messages: list[dict], bos: bool = True) -> list[tuple[list[int], list[bool]]]:
    """Per message, its ids (BOS before the first when bos) and per id whether sft trains on it:
    the assistant's content and its <|im_end|>. A conversation is their concatenation."""
    im_start, im_end = require_chat_ids(sp)
    check_messages(messages)
    newline, header = sp.encode("\n"), sp.encode("assistant\n")
    pieces = []
    for i, m in enumerate(messages):
        text = sp.encode(f"{m['role']}\n{m['content']}")
        start = [sp.bos_id()] if bos and i == 0 else []
        ids = [*start, im_start, *text, im_end, *newline]
        if m["role"] == "assistant":  # the reply starts where its encoding departs from the header's
            reply = next((k for k, (a, b) in enumerate(zip(text, header, strict=False)) if a != b),
                         min(len(text), len(header)))
            trained = [False] * (len(start) + 1 + reply) + [True] * (len(text) - reply + 1) + [False] * len(newline)
        else:
            trained = [False] * len(ids)
        pieces.append((ids, trained))
    return pieces


def render(sp, messages: list[dict], add_generation_prompt: bool | None = None,
           bos: bool = True) -> tuple[list[int], list[bool]]:
    """The ids of a conversation, and per id whether it is trained on in sft (message_pieces).
    add_generation_prompt (default: when the last message is not the assistant's) appends
    <|im_start|>assistant\\n."""
    if add_generation_prompt is None:
        add_generation_prompt = not messages or messages[-1]["role"] != "assistant"
    pieces = message_pieces(sp, messages, bos)
    if bos and not messages:
        pieces.append(([sp.bos_id()], [False]))
    if add_generation_prompt:
        prompt = [require_chat_ids(sp)[0], *sp.encode("assistant\n")]
        pieces.append((prompt, [False] * len(prompt)))
    return [i for ids, _ in pieces for i in ids], [t for _, trained in pieces for t in trained]


def render_ids(sp, messages: list[dict], add_generation_prompt: bool | None = None, bos: bool = True) -> list[int]:
    """The ids of a conversation (see render)."""
    return render(sp, messages, add_generation_prompt, bos)[0]


def close_reply_ids(sp) -> list[int]:
    """What follows a generated reply: <|im_end|> encode("\\n")."""
    return [require_chat_ids(sp)[1], *sp.encode("\n")]
