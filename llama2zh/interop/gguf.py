"""GGUF export (llama.cpp's format) and the Ollama Modelfile beside it.

A run directory becomes one GGUF file of architecture "llama" that llama.cpp and Ollama load with
no conversion step: the weights under llama.cpp's tensor names, the SentencePiece vocabulary
(pieces, scores, types) for llama.cpp's own "llama" tokenizer, and for chat runs the ChatML
template, written as chat.JINJA_TEMPLATE, with <|im_end|> as the end-of-turn token (chat.run_chat_ids
says which runs are chat runs).

No rotary permutation: llama.cpp's llama architecture rotates interleaved pairs (x[2i], x[2i+1]),
as llama2.c and Meta's original weights do. convert_hf_to_gguf permutes q and k only to undo the
half-split layout of Hugging Face's conversion; llama2.c's weights never had it.

llama.cpp's tokenizer splits text at special pieces and encodes each stretch with its own dummy
prefix, which is chat.py's rule. It merges by score, as SentencePiece's BPE does; it does not
apply a normalizer table (NFKC) nor collapse spaces (remove_extra_whitespaces), and merges a unigram
model's pieces instead of searching it, so such tokenizers can tokenize some text differently (the
project's own BPE ones, identity-normalized, agree).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from llama2zh import chat
from llama2zh.checkpoint import load_checkpoint
from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output
from llama2zh.model import ROPE_THETA
from llama2zh.vocab.export import load_sentencepiece

Q = gguf.GGMLQuantizationType
QTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
          "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)}
# our parameter name -> llama.cpp's, per layer
LAYER_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
               "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
               "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
MODELFILE = "Modelfile"
# ChatML as an Ollama (Go) template: chat.render's rule, the reply prompt after a non-assistant last message
OLLAMA_TEMPLATE = (
    "{{- range $i, $_ := .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    '{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}'
    "{{- end }}"
)


def tensor_names(state: dict, shared: bool) -> dict[str, str]:
    """llama.cpp's name for each of our parameters; no output.weight when it is the embedding
    (llama.cpp then ties the classifier to token_embd itself)."""
    names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not shared:
        names["output.weight"] = "output.weight"
    for key in state:
        parts = key.split(".")
        if parts[0] == "layers":
            names[key] = f"blk.{parts[1]}.{LAYER_NAMES['.'.join(parts[2:-1])]}.weight"
    return names


def _encoded(array: np.ndarray, qtype: str) -> tuple[np.ndarray, Q]:
    """The tensor in qtype; norms (1-D) stay float32, and rows that q8_0's or q4_0's blocks (of 32)
    cannot cover fall back to float16, as llama.cpp's converter does."""
    kind = QTYPES[qtype][0]
    if array.ndim == 1 or kind == Q.F32:
        return array.astype(np.float32), Q.F32
    if kind in (Q.Q8_0, Q.Q4_0) and array.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0] == 0:
        return gguf.quants.quantize(array.astype(np.float32), kind), kind
    return array.astype(np.float16), Q.F16


def export_gguf(run_dir: Path, out_file: Path, qtype: str = "f32") -> Path:
    """Writes run_dir's model and tokenizer as a GGUF file, and an Ollama Modelfile beside it."""
    run_dir, out_file = Path(run_dir), Path(out_file)
    if qtype not in QTYPES:
        raise UserError(f"unknown GGUF type {qtype!r}: choose {', '.join(QTYPES)}")
    model, state = load_checkpoint(run_dir / "ckpt.pt")
    sp, proto = load_sentencepiece(run_dir / "tokenizer.model")
    if len(proto.pieces) != model.args.vocab_size:
        raise UserError(f"{run_dir}: tokenizer.model has {len(proto.pieces)} pieces, "
                        f"the model {model.args.vocab_size} ids")
    chat_ids = chat.run_chat_ids(sp, state)
    write_gguf(model, sp, proto, out_file, qtype, run_dir.resolve().name, chat_ids)
    write_modelfile(out_file, model.args.max_seq_len, chat=chat_ids is not None)
    return out_file


def write_gguf(model, sp, proto, out_file: Path, qtype: str, name: str, chat_ids=None) -> Path:
    """model (a Transformer) with its SentencePiece vocabulary (processor and ModelProto) as a GGUF
    file; chat_ids (chat.run_chat_ids) adds the chat template."""
    args = model.args
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_file) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(name)
        writer.add_file_type(QTYPES[qtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(args.vocab_size)
        writer.add_context_length(args.max_seq_len)
        writer.add_embedding_length(args.dim)
        writer.add_block_count(args.n_layers)
        writer.add_feed_forward_length(args.hidden_dim)
        writer.add_head_count(args.n_heads)
        writer.add_head_count_kv(args.n_kv_heads)
        writer.add_rope_dimension_count(args.head_dim)
        writer.add_rope_freq_base(ROPE_THETA)
        writer.add_layer_norm_rms_eps(args.norm_eps)

        writer.add_tokenizer_model("llama")
        writer.add_token_list([p.piece for p in proto.pieces])
        writer.add_token_scores([p.score for p in proto.pieces])
        writer.add_token_types([p.type for p in proto.pieces])  # SentencePiece's numbering is gguf's
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
        writer.add_unk_token_id(sp.unk_id())
        if sp.pad_id() >= 0:
            writer.add_pad_token_id(sp.pad_id())
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
        if chat_ids:
            writer.add_chat_template(chat.JINJA_TEMPLATE)
            writer.add_eot_token_id(chat_ids[1])  # llama.cpp ends a reply at <|im_end|>

        state = model.state_dict()
        # q4_0 keeps the classifier (the embedding, when tied) in q8_0, as llama-quantize keeps it above 4 bits:
        # the demo model's top-1 agreement with f32 is 91.7% with it in q4_0, 95.8% so (llama-quantize's too)
        classifier = "token_embd.weight" if args.shared_classifier else "output.weight"
        for key, tensor_name in tensor_names(state, args.shared_classifier).items():
            tensor_qtype = "q8_0" if qtype == "q4_0" and tensor_name == classifier else qtype
            data, kind = _encoded(state[key].float().numpy(), tensor_qtype)
            writer.add_tensor(tensor_name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_file


def write_modelfile(gguf_file: Path, num_ctx: int, chat: bool) -> Path:
    """Ollama's Modelfile beside gguf_file: `ollama create NAME -f Modelfile` in that directory."""
    lines = [f"FROM ./{gguf_file.name}",
             'TEMPLATE """' + (OLLAMA_TEMPLATE if chat else "{{ .Prompt }}") + '"""']
    if chat:
        lines.append('PARAMETER stop "<|im_end|>"')
    # the defaults of `llama2zh chat` (0.8) and `llama2zh sample` (1.0)
    lines += [f"PARAMETER temperature {0.8 if chat else 1.0}", "PARAMETER top_p 0.9", f"PARAMETER num_ctx {num_ctx}"]
    path = gguf_file.parent / MODELFILE
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata: key -> value, tensors: name -> float32 array in PyTorch's shape) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
               .astype(np.float32) for t in reader.tensors}
    return fields, tensors
