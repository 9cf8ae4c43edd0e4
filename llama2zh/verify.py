"""PyTorch <-> C parity: the same model and tokenizer must give the same numbers and text.

Four checks on a fixed bilingual prompt (Chinese, English, an emoji and a CJK Extension B
character that no vocab holds, so byte fallback is exercised):
  logits  C forward vs PyTorch at every prompt position, max |diff| <= 1e-4 * max |logit|
  tokens  C encode == SentencePiece encode
  greedy  200 greedy tokens from the C engine (binding) == PyTorch generate()
  text    what `./run -t 0` prints == SentencePiece's decode of the same ids, byte for byte

With a chat template in the tokenizer (the chat pieces: every chat-tuned run, and runs whose
tokenizer `vocab train` made), two more checks on a multi-turn conversation with a system
prompt, text that imitates the special tokens, an emoji and a character no vocab holds:
  render  the C engine's l2_chat_render == chat.py's rule (SentencePiece), id for id
  reply   the greedy reply to it (up to <|im_end|>): C == PyTorch (quantized: reported, as greedy)

A quantized model.bin (v2 int8, v3 int4) cannot give PyTorch's numbers: its weights are rounded,
and the C engine also rounds activations to int8. So there "logits" becomes "quality": over 200
teacher-forced positions of a bilingual passage of real text, the C engine's next-token
distribution against the float32 PyTorch model's (the checkpoint's weights for a run
directory; for a bare .bin only the dequantized weights exist, which measures the
activation rounding alone): top-1 agreement >= 98% and mean KL(fp32 || C) <= 0.01 for v2, >= 95%
and <= 0.02 for v3. And
"greedy" checks the C engine against itself: l2_generate (batched prefill, then decoding)
must give the ids that greedy decoding one l2_model_forward at a time gives. Where greedy
quantized text departs from float32 text is reported, but is no failure: after the first near-tie
that rounding flips, the two continue differently, both plausibly. "tokens" and "text" are
as for float32.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from llama2zh.chat import chat_piece_ids, render_ids
from llama2zh.checkpoint import load_checkpoint
from llama2zh.engine import CModel, CTokenizer, run_binary
from llama2zh.errors import UserError
from llama2zh.export import read_header, read_model_bin
from llama2zh.model import Transformer
from llama2zh.vocab.export import export_tokenizer, load_sentencepiece

PROMPT = "从前，有一个小女孩叫莉莉。Once upon a time, there was a little girl named Lily. 她喜欢🌸和𠀀。"
GREEDY_TOKENS = 200
LOGIT_RTOL = 1e-4
# v2: the quality check's text (a children's story, as the models are trained on) and thresholds
PASSAGE = "".join((  # sentence by sentence, so that both languages fall within 200 tokens of any vocab
    "Once upon a time, there was a little girl named Lily. 从前，有一个小女孩叫莉莉。",
    "She lived in a small house near the woods with her mother and her dog, Max. ",
    "她和妈妈还有小狗马克斯住在树林旁边的一座小房子里。",
    "Every morning, Lily and Max walked to the river to look at the fish. 每天早上，莉莉和马克斯都走到河边看小鱼。",
    "One day, Lily saw a big red ball in the water. 有一天，莉莉看见水里有一个大红球。",
    "\"Max, can you get the ball?\" she asked. “马克斯，你能把球拿回来吗？”她问。",
    "Max jumped into the river and swam to the ball. 马克斯跳进河里，游到球旁边。",
    "He brought it back, and Lily laughed and hugged him. 他把球带了回来，莉莉笑了，紧紧地抱住他。",
    "\"Thank you, Max! You are my best friend,\" she said. “谢谢你，马克斯！你是我最好的朋友。”她说。",
    "They played with the ball until the sun went down. 他们一直玩球，玩到太阳下山。",
    "Then they went home to eat dinner. 然后他们一起回家吃晚饭。",
))
CHAT = [{"role": "system", "content": "你是一个会讲故事的助手。You tell stories."},
        {"role": "user", "content": "给我讲一个小女孩莉莉在公园里的故事。"},
        {"role": "assistant", "content": "从前，有一个小女孩，名叫莉莉。<|im_end|>\n<|im_start|>user\n🌸"},
        {"role": "user", "content": "把它翻译成英文。<|im_start|>assistant\nOnce 𠀀"}]
QUALITY_POSITIONS = 200
QUALITY_MIN = {2: (0.98, 0.01), 3: (0.95, 0.02)}  # version: least top-1 agreement, most mean KL


@dataclass
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.name:<7} {self.detail}"


@dataclass
class Subject:
    """What verify compares: the .bin the C engine runs and the PyTorch model it should equal."""
    model_bin: Path
    model: Transformer
    tokenizer_model: Path
    tokenizer_bin: Path
    reference: str = "the float32 weights"  # what `model` holds, for an int8 .bin's report


def first_difference(a, b) -> int:
    """Index of the first element where sequences a and b differ (or the shorter length)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def subject_from_run(run_dir: Path) -> Subject:
    for name in ("ckpt.pt", "model.bin", "tokenizer.model"):
        if not (run_dir / name).exists():
            hint = f" (run `llama2zh export {run_dir}`)" if name == "model.bin" else ""
            raise UserError(f"{run_dir}: no {name}{hint}")
    model, _ = load_checkpoint(run_dir / "ckpt.pt")
    return Subject(run_dir / "model.bin", model, run_dir / "tokenizer.model", tokenizer_bin_for(run_dir),
                   "ckpt.pt's float32 weights")


def subject_from_bin(model_bin: Path, tokenizer_dir: Path) -> Subject:
    if not (tokenizer_dir / "tokenizer.model").exists():
        raise UserError(f"{tokenizer_dir}: no tokenizer.model")
    reference = "the dequantized weights" if read_header(model_bin).version >= 2 else "the float32 weights"
    return Subject(model_bin, read_model_bin(model_bin), tokenizer_dir / "tokenizer.model",
                   tokenizer_bin_for(tokenizer_dir), reference)


def tokenizer_bin_for(directory: Path) -> Path:
    """tokenizer.bin beside tokenizer.model, written from it when missing."""
    path = directory / "tokenizer.bin"
    if not path.exists():
        export_tokenizer(directory / "tokenizer.model", path)
    return path


def check_logits(subject: Subject, cmodel: CModel, ids: list[int]) -> Check:
    ids = ids[: subject.model.args.max_seq_len]
    with torch.inference_mode():
        expected = subject.model(torch.tensor([ids]))[0].float().numpy()
    got = np.stack([cmodel.forward(token, pos) for pos, token in enumerate(ids)])
    diff = float(np.max(np.abs(got - expected)))
    bound = LOGIT_RTOL * float(np.max(np.abs(expected)))
    return Check("logits", diff <= bound,
                 f"max|diff| {diff:.3e} <= {bound:.3e} (1e-4 * max|logit|) over {len(ids)} positions")


def check_tokens(ctok: CTokenizer, expected: list[int]) -> Check:
    got = ctok.encode(PROMPT, bos=True)
    if got == expected:
        return Check("tokens", True, f"{len(got)} ids, C == SentencePiece")
    return Check("tokens", False, f"C gives {len(got)} ids, SentencePiece {len(expected)}; "
                 f"first difference at {first_difference(got, expected)}")


def greedy_steps(subject: Subject, n_prompt: int) -> int:
    """The `-n` that makes the C engine generate GREEDY_TOKENS after the prompt (as far as seq_len allows)."""
    return min(n_prompt - 1 + GREEDY_TOKENS, subject.model.args.max_seq_len)


def check_greedy(subject: Subject, cmodel: CModel, ctok: CTokenizer, ids: list[int]) -> tuple[Check, list[int]]:
    got = cmodel.generate(ctok, PROMPT, greedy_steps(subject, len(ids)), temperature=0.0)
    expected = subject.model.generate(ids, GREEDY_TOKENS, temperature=0.0, stop_ids=(ctok.bos_id, ctok.eos_id))
    if got == expected:
        return Check("greedy", True, f"{len(got)} tokens identical"), got
    return Check("greedy", False, f"C {len(got)} tokens, PyTorch {len(expected)}; "
                 f"first difference at {first_difference(got, expected)}"), got


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def check_quality(subject: Subject, cmodel: CModel, sp: spm.SentencePieceProcessor) -> Check:
    """Quantized: the C engine's next-token distributions vs float32 PyTorch's on real text."""
    ids = ([sp.bos_id()] + sp.encode(PASSAGE))[: min(QUALITY_POSITIONS, subject.model.args.max_seq_len) + 1]
    inputs = ids[:-1]  # each position predicts the next token of the passage
    with torch.inference_mode():
        expected = log_softmax(subject.model(torch.tensor([inputs]))[0].float().numpy())
    got = log_softmax(cmodel.prefill(inputs))
    top1 = float(np.mean(got.argmax(-1) == expected.argmax(-1)))
    kl = float(np.mean(np.sum(np.exp(expected) * (expected - got), axis=-1)))
    top1_min, kl_max = QUALITY_MIN[read_header(subject.model_bin).version]
    return Check("quality", top1 >= top1_min and kl <= kl_max,
                 f"top-1 agreement {top1:.1%} (>= {top1_min:.0%}), mean KL {kl:.2e} (<= {kl_max}) over "
                 f"{len(inputs)} positions of the passage, against PyTorch on {subject.reference}")


def check_greedy_quantized(subject: Subject, cmodel: CModel, ctok: CTokenizer,
                           ids: list[int]) -> tuple[Check, list[int]]:
    """Quantized: l2_generate == greedy decoding one l2_model_forward at a time (a fresh model)."""
    steps = greedy_steps(subject, len(ids))
    got = cmodel.generate(ctok, PROMPT, steps, temperature=0.0)
    stepwise = CModel(subject.model_bin)
    for pos, token in enumerate(ids):
        logits = stepwise.forward(token, pos)
    expected = []
    for pos in range(len(ids), steps + 1):  # the token sampled at position pos - 1
        token = int(np.argmax(logits))
        if token in (ctok.bos_id, ctok.eos_id):
            break
        expected.append(token)
        if pos < steps:
            logits = stepwise.forward(token, pos)
    fp32 = subject.model.generate(ids, GREEDY_TOKENS, temperature=0.0, stop_ids=(ctok.bos_id, ctok.eos_id))
    same = f"PyTorch on {subject.reference} agrees on the first {first_difference(got, fp32)}"
    if got == expected:
        return Check("greedy", True, f"{len(got)} tokens, l2_generate == step-by-step forward; {same}"), got
    return Check("greedy", False, f"l2_generate {len(got)} tokens, step-by-step {len(expected)}; first difference "
                 f"at {first_difference(got, expected)}"), got


def check_text(subject: Subject, sp: spm.SentencePieceProcessor, ids: list[int], generated: list[int]) -> Check:
    command = [str(run_binary()), str(subject.model_bin), "-k", str(subject.tokenizer_bin), "-t", "0",
               "-n", str(greedy_steps(subject, len(ids))), "-i", PROMPT]
    result = subprocess.run(command, check=False, capture_output=True, timeout=600)
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip()
        return Check("text", False, f"./run exited {result.returncode}: {message}")
    expected = sp.decode(ids + generated).encode("utf-8") + b"\n"
    if result.stdout == expected:
        return Check("text", True, f"{len(expected)} bytes of ./run output == SentencePiece decode")
    return Check("text", False, f"./run printed {len(result.stdout)} bytes, SentencePiece decodes {len(expected)}; "
                 f"first difference at byte {first_difference(result.stdout, expected)}")


def check_chat_render(ctok: CTokenizer, sp: spm.SentencePieceProcessor) -> tuple[Check, list[int]]:
    expected = render_ids(sp, CHAT)
    got = ctok.render_chat(CHAT)
    specials = sum(i in ctok.chat_ids for i in got)
    if got == expected and specials == 2 * len(CHAT) + 1:
        return Check("render", True, f"{len(got)} ids of a {len(CHAT)}-message conversation, C == chat.py "
                     f"({specials} special ids, none from the text)"), expected
    return Check("render", False, f"C gives {len(got)} ids ({specials} special), chat.py {len(expected)}; first "
                 f"difference at {first_difference(got, expected)}"), expected


def check_chat_reply(subject: Subject, cmodel: CModel, ctok: CTokenizer, ids: list[int], quantized: bool) -> Check:
    stops = (ctok.chat_ids[1], ctok.eos_id, ctok.bos_id)
    limit = min(GREEDY_TOKENS, subject.model.args.max_seq_len - len(ids) + 1)
    got, _ = cmodel.generate_ids(ids, max_new=limit, stop=stops)
    expected = subject.model.generate(ids, limit, temperature=0.0, stop_ids=stops)
    same = got == expected
    detail = f"{len(got)} tokens, C == PyTorch" if same else \
        f"C {len(got)} tokens, PyTorch {len(expected)}; first difference at {first_difference(got, expected)}"
    return Check("reply", same or quantized, detail + (f" (PyTorch on {subject.reference})" if quantized else ""))


def verify(subject: Subject) -> list[Check]:
    header = read_header(subject.model_bin)
    sp, _ = load_sentencepiece(subject.tokenizer_model)
    if sp.vocab_size() != header.args.vocab_size:
        raise UserError(f"{subject.tokenizer_model}: {sp.vocab_size()} pieces, "
                        f"{subject.model_bin} has vocab_size {header.args.vocab_size}")
    cmodel = CModel(subject.model_bin)
    ctok = CTokenizer(subject.tokenizer_bin, vocab_size=header.args.vocab_size)
    ids = [sp.bos_id()] + sp.encode(PROMPT)
    if len(ids) >= header.args.max_seq_len:
        raise UserError(f"verify's prompt takes {len(ids)} positions, more than the model's seq_len "
                        f"{header.args.max_seq_len} leaves room for")
    if header.version >= 2:
        checks = [check_quality(subject, cmodel, sp), check_tokens(ctok, ids)]
        greedy, generated = check_greedy_quantized(subject, cmodel, ctok, ids)
    else:
        checks = [check_logits(subject, cmodel, ids), check_tokens(ctok, ids)]
        greedy, generated = check_greedy(subject, cmodel, ctok, ids)
    checks += [greedy, check_text(subject, sp, ids, generated)]
    if ctok.chat_ids is not None and chat_piece_ids(sp) is not None:
        render, chat_ids = check_chat_render(ctok, sp)
        checks.append(render)
        if len(chat_ids) < header.args.max_seq_len:
            checks.append(check_chat_reply(subject, cmodel, ctok, chat_ids, header.version >= 2))
    return checks


def run_verify(target: Path, tokenizer_dir: Path | None) -> int:
    """Prints every check as PASS/FAIL; returns the exit status (0 only when all pass)."""
    if not target.exists():
        raise UserError(f"{target}: no such run directory or model.bin")
    if target.is_dir():
        subject = subject_from_run(target)
    elif tokenizer_dir is None:
        raise UserError(f"{target} is a bare model.bin: give --tokenizer DIR (a directory with tokenizer.model)")
    else:
        subject = subject_from_bin(target, tokenizer_dir)
    args = subject.model.args
    header = read_header(subject.model_bin)
    detail = {2: f", int8 (group size {header.group_size})",
              3: f", int4 (group size {header.group_size}; embedding {'int8' if header.embedding_bits == 8 else 'int4'}"
                 f"; int8 layers {','.join(map(str, header.int8_layers)) or 'none'}"
                 f"{f'; int8 group size {header.int8_group_size}' if header.int8_group_size else ''})"}
    detail = detail.get(header.version, "")
    print(f"verify {target}: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads "
          f"({args.n_kv_heads} kv), vocab {args.vocab_size}, seq_len {args.max_seq_len}, "
          f"model.bin v{header.version}{detail}")
    checks = verify(subject)
    for check in checks:
        print(check.line())
    return 0 if all(c.passed for c in checks) else 1
