"""The C tokenizer against SentencePiece: encode and decode parity on eight tokenizers
(the three shared ones, one trained and one extended by llama2zh, three unigram models),
streaming decode, tokenizer.bin round trips, upstream llama2.c files and bad files."""

from __future__ import annotations

import io
import json
import random
import struct
import time
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from llama2zh.engine import CTokenizer, EngineError, ffi, lib
from llama2zh.errors import UserError
from llama2zh.vocab.export import export_tokenizer, read_tokenizer_bin, write_tokenizer_bin

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_TOKENIZERS = ("llama2en", "llama2enzh", "baichuan")
PROJECT_TOKENIZERS = ("trained", "extended")  # made by llama2zh.vocab.train / .extend
UNIGRAMS = ("unigram", "unigram_nobf", "unigram_identity")
TOKENIZERS = SHARED_TOKENIZERS + PROJECT_TOKENIZERS + UNIGRAMS
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
LITERATURE, EN_STORIES = "data/zh_literature.jsonl", "data/tinystories_en_sample.jsonl"

EDGE_TEXTS = [
    "", " ", "   ", "\t", "\n", "\n\n\n", " \t \n ", "a  b\t\tc\n\nd   ", "  leading and trailing  ",
    "Once upon a time, 小明和他的 dog 去公园玩。He said: “你好! Let's go.”",
    "（全角括号）１２３ＡＢＣ，。！？：；“”‘’【】《》　全角空格",
    "emoji 😀👍🏽🇨🇳 👨‍👩‍👧 ☕", "CJK Extension B: 𠀀𠮷𪚥", "\u2581", "\u2581\u2581x \u2581 y\u2581",
    "e\u0301 A\u030a \u1100\u1161\u11a8 ﬁ ㎏ ① ½", "\ufffd \u00a0 \u200b \u2028", "\x00\x01\x1f\x7f",
    "<s></s><unk><0x41>", "<SEP><br>x</p><reserved_7>", "0123456789 ０１２ 3.14 1,000", "a" * 300,
    "小明说<br>①②  双空格  小明", "1234567890123",
]


def shared_path(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not beside the project)")
    return path


def jsonl(relative: str, key: str) -> list[str]:
    return [json.loads(line)[key] for line in shared_path(relative).read_text(encoding="utf-8").splitlines()]


# ---- the tokenizers under test ----

UNIGRAM_SETTINGS = {
    "unigram": {"vocab_size": 3000, "byte_fallback": True},  # nmt_nfkc, extra whitespace removed
    "unigram_nobf": {"vocab_size": 2000, "byte_fallback": False},
    "unigram_identity": {"vocab_size": 3000, "byte_fallback": True, "normalization_rule_name": "identity",
                         "remove_extra_whitespaces": False, "split_digits": True,
                         "user_defined_symbols": ["<br>", "①", "\u2581\u2581", "小明"]},
}


def build(name: str, out: Path) -> tuple[Path, Path]:
    """(tokenizer.model, tokenizer.bin) of a tokenizer under test, made in out."""
    if name in SHARED_TOKENIZERS:
        model = shared_path(f"tokenizers/{name}/tokenizer.model")
        return model, export_tokenizer(model, out / "tokenizer.bin")
    if name == "trained":  # a small enzh BPE tokenizer, with the tokenizer.bin `vocab train` writes
        train = pytest.importorskip("llama2zh.vocab.train", reason="llama2zh.vocab.train is not written yet")
        train.train_tokenizer([shared_path(LITERATURE), shared_path(EN_STORIES)], 4000, out, lang="enzh",
                              model_type="bpe")
    elif name == "extended":  # llama2en plus 2,000 Chinese pieces, as `vocab extend` writes it
        extend = pytest.importorskip("llama2zh.vocab.extend", reason="llama2zh.vocab.extend is not written yet")
        extend.extend_tokenizer(shared_path("tokenizers/llama2en/tokenizer.model"), [shared_path(LITERATURE)],
                                2000, out)
    else:  # SentencePiece's unigram trainer on 300 Chinese paragraphs and 150 English stories
        lines = jsonl(LITERATURE, "text")[:300] + jsonl(EN_STORIES, "story")[:150]
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="unigram",
                                       num_threads=1, minloglevel=2, **UNIGRAM_SETTINGS[name])
        (out / "tokenizer.model").write_bytes(model.getvalue())
        export_tokenizer(out / "tokenizer.model", out / "tokenizer.bin")
    return out / "tokenizer.model", out / "tokenizer.bin"


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """name -> (SentencePieceProcessor, tokenizer.bin path), each built on first use."""
    cache = {}

    def get(name: str) -> tuple[spm.SentencePieceProcessor, Path]:
        if name not in cache:
            model, path = build(name, tmp_path_factory.mktemp(name))
            cache[name] = (spm.SentencePieceProcessor(model_file=str(model)), path)
        return cache[name]

    return get


@pytest.fixture(params=TOKENIZERS)
def tok(request, built):
    sp, path = built(request.param)
    return request.param, sp, CTokenizer(path), path


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """All zh TinyStories, 40 en ones, 300 zh_literature paragraphs, and edge cases."""
    rng = random.Random(7)
    literature = jsonl(LITERATURE, "text")
    return (jsonl("data/tinystories_zh_sample.jsonl", "story") + jsonl(EN_STORIES, "story")[:40]
            + rng.sample(literature, 300) + EDGE_TEXTS)


def random_text(rng: random.Random) -> str:
    """Short strings mixing ASCII, CJK, full-width forms, combining marks, jamo, emoji,
    controls, private use, whitespace runs and U+2581."""
    ranges = [(0x20, 0x7E)] * 6 + [(0x4E00, 0x9FFF)] * 4 + [
        (0x3000, 0x303F), (0xFF00, 0xFFEF), (0x0300, 0x036F), (0x1100, 0x11FF), (0xAC00, 0xD7A3),
        (0x00A0, 0x024F), (0x2000, 0x206F), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF), (0x00, 0x1F),
        (0x2580, 0x2582), (0xE000, 0xE0FF), (0xFFF0, 0xFFFD)]
    specials = [" ", "  ", "\t", "\n", "\u2581", "\u3000", "<br>", "１", "e\u0301"]
    chars = []
    for _ in range(rng.randint(0, 40)):
        if rng.random() < 0.25:
            chars.append(rng.choice(specials))
        else:
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def encode_bytes(ct: CTokenizer, data: bytes) -> list[int]:
    """l2_encode on raw bytes (CTokenizer.encode takes str, always valid UTF-8)."""
    err = ffi.new("char[]", lib().L2_ERR_SIZE)
    capacity = 4 * len(data) + 8
    ids = ffi.new("int[]", capacity)
    n = lib().l2_encode(ct._handle, data, len(data), 0, 0, ids, capacity, err)
    assert 0 <= n <= capacity, ffi.string(err)
    return list(ids[0:n])


def stream_decode(ct: CTokenizer, ids: list[int]) -> list[bytes]:
    """The chunks l2_decode_step / l2_decode_finish write, one per id plus the flush."""
    bound = lib().l2_decode_bound(ct._handle)
    out, err = ffi.new("char[]", bound), ffi.new("char[]", lib().L2_ERR_SIZE)
    decoder = ffi.new("L2Decoder *")
    lib().l2_decoder_init(decoder)
    chunks = []
    for i in ids:
        n = lib().l2_decode_step(ct._handle, decoder, i, out, err)
        assert 0 <= n <= bound, ffi.string(err)
        chunks.append(ffi.buffer(out, n)[:])
    chunks.append(ffi.buffer(out, lib().l2_decode_finish(ct._handle, decoder, out))[:])
    return chunks


def id_sampler(sp: spm.SentencePieceProcessor):
    """A function of an rng giving id sequences: any ids, weighted towards control, unknown
    and byte pieces and runs of byte pieces (random bytes, or whole and cut-off UTF-8)."""
    n = sp.get_piece_size()
    byte_id = {int(sp.id_to_piece(i)[3:5], 16): i for i in range(n) if sp.is_byte(i)}
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)] + [sp.piece_to_id("\u2581")]

    def sample(rng: random.Random) -> list[int]:
        ids = []
        for _ in range(rng.randint(0, 12)):
            r = rng.random()
            if r < 0.3:
                ids.append(rng.randrange(n))
            elif r < 0.5:
                ids.append(rng.choice(special))
            elif r < 0.75:
                ids += byte_ids(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            else:
                data = random_text(rng)[:2].encode("utf-8")
                ids += byte_ids(data[:rng.randint(1, len(data))]) if data else []
        return ids

    def byte_ids(values) -> list[int]:  # none for a model without byte pieces
        return [byte_id[b] for b in values if b in byte_id]

    return sample


# ---- parity with SentencePiece ----

def test_encode_matches_sentencepiece(tok, corpus):
    name, sp, ct, _ = tok
    wrong = [text[:60] for text in corpus if ct.encode(text, bos=False) != sp.encode(text)]
    assert not wrong, f"{name}: {len(wrong)} texts encode differently, e.g. {wrong[:3]}"
    text = corpus[0]
    assert ct.encode(text, bos=True, eos=True) == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    assert ct.encode("", bos=True) == [sp.bos_id()] and ct.encode("", bos=False) == []


def test_encode_random_text_and_invalid_utf8(tok):
    name, sp, ct, _ = tok
    rng = random.Random(11)
    for _ in range(400):
        text = random_text(rng)
        assert ct.encode(text, bos=False) == sp.encode(text), (name, text)
    # Bytes that are not UTF-8: SentencePiece's normalizer makes each one U+FFFD.
    pieces = [b"\xff", b"\xe4\xbd", b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80", b"\xf0\x9f\x98",
              b"\xef\xbf\xbd", b"\xe2\x96\x81", b"\x80", "你好 a".encode()]
    for _ in range(300):
        data = b"".join(rng.choice(pieces) if rng.random() < 0.6 else bytes([rng.randrange(256)])
                        for _ in range(rng.randint(0, 8)))
        assert encode_bytes(ct, data) == sp.encode(data), (name, data)


def test_long_prompt_is_fast_and_exact(tok, corpus):
    name, sp, ct, _ = tok
    text = "  ".join(corpus)[:10_000]
    assert len(text) == 10_000
    assert ct.encode(text, bos=False) == sp.encode(text)
    start = time.perf_counter()
    ids = ct.encode("a" * 100_000, bos=False)  # quadratic BPE would take minutes
    assert time.perf_counter() - start < 2.0
    assert ids == sp.encode("a" * 100_000)


def test_decode_matches_sentencepiece(tok):
    name, sp, ct, _ = tok
    rng, random_ids = random.Random(1234), id_sampler(sp)
    for _ in range(1500):
        ids = random_ids(rng)
        assert ct.decode_bytes(ids) == sp.decode(ids).encode("utf-8"), (name, ids)
    with pytest.raises(EngineError, match="out of range"):
        ct.decode([sp.get_piece_size()])


def test_streaming_decode_equals_whole_decode(tok):
    name, sp, ct, _ = tok
    rng, random_ids = random.Random(99), id_sampler(sp)
    for _ in range(500):
        ids = random_ids(rng)
        chunks = stream_decode(ct, ids)
        assert b"".join(chunks) == ct.decode_bytes(ids), (name, ids)
        for chunk in chunks:  # whole characters only: every piece text is UTF-8
            chunk.decode("utf-8")


# ---- unigram: hand-made models where the Viterbi's choices are close ----

ALPHABET = ["a", "b", "c", "\u2581", "你", "好", "😀"]


def random_model(rng: random.Random, model_type: int) -> bytes:
    """A hand-made model over a few characters: random pieces (some user-defined, some unused),
    scores that often tie and sometimes are positive, random whitespace settings and fallback."""
    m = pb.ModelProto()
    m.trainer_spec.model_type = model_type
    m.trainer_spec.byte_fallback = rng.random() < 0.5
    m.trainer_spec.treat_whitespace_as_suffix = rng.random() < 0.2
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = rng.random() < 0.7
    m.normalizer_spec.remove_extra_whitespaces = rng.random() < 0.5
    for piece, kind in (("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)):
        m.pieces.add(piece=piece, score=0, type=kind)
    seen = set()
    for _ in range(rng.randint(1, 40)):
        piece = "".join(rng.choices(ALPHABET, k=rng.randint(1, 4)))
        if piece not in seen:
            seen.add(piece)
            r = rng.random()
            score = rng.choice([-0.5, -1.0, -2.0]) if rng.random() < 0.4 else rng.uniform(-12, 3)
            m.pieces.add(piece=piece, score=score, type=NORMAL if r < 0.8 else USER_DEFINED if r < 0.9 else UNUSED)
    if m.trainer_spec.byte_fallback:
        for b in range(256):
            m.pieces.add(piece=f"<0x{b:02X}>", score=0, type=BYTE)
    return m.SerializeToString()


def alphabet_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choices(ALPHABET + [" ", "  ", "x"], k=length))


def model_pair(tmp_path: Path, model: bytes) -> tuple[spm.SentencePieceProcessor, CTokenizer]:
    (tmp_path / "m.model").write_bytes(model)
    return (spm.SentencePieceProcessor(model_proto=model),
            CTokenizer(export_tokenizer(tmp_path / "m.model", tmp_path / "m.bin")))


def small_unigram(*pieces: tuple[str, float, int]) -> bytes:
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    m.pieces.add(piece="<unk>", score=0, type=UNKNOWN)
    for piece, score, kind in pieces:
        m.pieces.add(piece=piece, score=score, type=kind)
    return m.SerializeToString()


@pytest.mark.parametrize("text, pieces, expected", [
    # a tie: the path whose last piece starts first wins
    ("ab", [("a", -1.0, NORMAL), ("b", -1.0, NORMAL), ("ab", -2.0, NORMAL)], ["ab"]),
    ("aab", [("a", -1.0, NORMAL), ("b", -1.0, NORMAL), ("aa", -2.0, NORMAL), ("ab", -2.0, NORMAL)], ["a", "ab"]),
    # float sums: -1 + 1e-9 rounds to -1, a tie; in double "a b" would win
    ("ab", [("a", -1.0, NORMAL), ("b", 1e-9, NORMAL), ("ab", -1.0, NORMAL)], ["ab"]),
    # -0.5 + (-0.5 + 2**-24) is above -1 in float, and "c" keeps that path
    ("abc", [("ab", -1.0, NORMAL), ("a", -0.5, NORMAL), ("b", -0.5 + 2**-24, NORMAL), ("c", -1000.0, NORMAL)],
     ["a", "b", "c"]),
    # a user-defined piece scores 0.1 per byte after its first: 你 (3 bytes) 0.2, under 你y's 0.3
    ("你y", [("你", 0, USER_DEFINED), ("y", 0.0, NORMAL), ("你y", 0.3, NORMAL)], ["你y"]),
    ("你y", [("你", 0, USER_DEFINED), ("y", 0.0, NORMAL), ("你y", 0.1, NORMAL)], ["你", "y"]),
    # an unused piece is no node: its character is unknown (min score - 10)
    ("ab", [("a", -1.0, UNUSED), ("b", -1.0, NORMAL), ("ab", -30.0, NORMAL)], ["ab"]),
    ("ab", [("a", -1.0, UNUSED), ("b", -1.0, NORMAL)], ["<unk>", "b"]),
])
def test_unigram_ties_float_sums_and_piece_kinds(tmp_path, text, pieces, expected):
    sp, ct = model_pair(tmp_path, small_unigram(*pieces))
    assert ct.encode(text, bos=False) == sp.encode(text)
    assert [sp.id_to_piece(i) for i in sp.encode(text)] == expected  # the case tests what it says


@pytest.mark.parametrize("model_type", [pb.TrainerSpec.UNIGRAM, pb.TrainerSpec.BPE])
def test_random_small_models(tmp_path, model_type):
    rng = random.Random(17)
    for _ in range(60):
        sp, ct = model_pair(tmp_path, random_model(rng, model_type))
        for _ in range(25):
            text = alphabet_text(rng, rng.randint(0, 12))
            assert ct.encode(text, bos=False) == sp.encode(text), text


@pytest.mark.parametrize("seed", [12, 26])
def test_unigram_long_paths_rebase_their_scores_as_sentencepiece(tmp_path, seed):
    """Past a path score of 1e5 SentencePiece subtracts it from the scores ahead, which rounds
    them differently: with these seeds, C without that rebase differs from SentencePiece."""
    rng = random.Random(seed)
    for _ in range(2):
        sp, ct = model_pair(tmp_path, random_model(rng, pb.TrainerSpec.UNIGRAM))
        text = alphabet_text(rng, 30_000)
        assert ct.encode(text, bos=False) == sp.encode(text)


# ---- the normalizer's longest match, and BPE word by word ----

RULES = {"a": "x", "ab": "Y", "abc": "Z", "abcd": "W", "pq": "P", "pqrs": "S",  # no "pqr": a walk past a key
         "\u3041": "\u3042", "\u3041\u3043": "\u3044", "\u3041\u3043\u3045": "(\u3046)", "\u2460\u2461": "12"}
RULE_FRAGMENTS = ["a", "b", "c", "d", "p", "q", "r", "s", "x", " ", "  ", "\u3041", "\u3043", "\u3045", "\u3046",
                  "\u2460", "\u2461", "<b", "<br>", "<br/>", "r>", "/"]


@pytest.fixture(scope="module")
def rules_pair(tmp_path_factory):
    """A tokenizer trained with replacement rules whose keys prefix each other (ASCII, kana,
    circled digits) and user-defined symbols that do too."""
    tmp = tmp_path_factory.mktemp("rules")
    tsv = "".join(" ".join(f"{ord(c):X}" for c in key) + "\t" + " ".join(f"{ord(c):X}" for c in value) + "\n"
                  for key, value in RULES.items())
    (tmp / "rules.tsv").write_text(tsv, encoding="utf-8")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["abcd abc ab pqrs pq xyz", "\u3041\u3043\u3045 \u3046",
                                                           "\u2460\u2461 \u2460 12 <br>"] * 50),
                                   model_writer=model, model_type="bpe", vocab_size=290, byte_fallback=True,
                                   normalization_rule_tsv=str(tmp / "rules.tsv"),
                                   user_defined_symbols=["<b", "<br>", "<br/>"], num_threads=1, minloglevel=2)
    return model_pair(tmp, model.getvalue())


def test_normalizer_takes_the_longest_of_keys_that_prefix_each_other(rules_pair):
    sp, ct = rules_pair
    cases = {"abcde": "\u2581We", "abx": "\u2581Yx", "pqr": "\u2581Pr", "pqrs": "\u2581S",  # the rules apply
             "\u3041\u3043\u3045\u3041\u3043": "\u2581(\u3046)\u3044", "\u2460\u2461\u2460": "\u258112\u2460"}
    for text, normalized in cases.items():
        assert sp.normalize(text) == normalized
        assert ct.encode(text, bos=False) == sp.encode(text), text
    rng = random.Random(5)
    for _ in range(500):
        text = "".join(rng.choices(RULE_FRAGMENTS, k=rng.randint(0, 12)))
        assert ct.encode(text, bos=False) == sp.encode(text), text
        data = text.encode()  # cut anywhere: mid-key, mid-character
        data = data[:rng.randint(0, len(data))]
        assert encode_bytes(ct, data) == sp.encode(data), data


def word_model(rng: random.Random) -> bytes:
    """A BPE model whose pieces never hold a space after a non-space, so merges stay within words
    (as llama2en's): pieces over a few letters, some unused, scores that often tie."""
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.remove_extra_whitespaces = False
    for piece, kind in (("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)):
        m.pieces.add(piece=piece, score=0, type=kind)
    pieces = {"a", "b", "c", "d", "\u2581", "\u2581\u2581"}  # a space after a space does not start a word
    for piece in sorted(pieces):
        m.pieces.add(piece=piece, score=-50 * len(piece), type=NORMAL)
    for _ in range(rng.randint(5, 30)):
        piece = rng.choice(["", "\u2581", "\u2581\u2581"]) + "".join(rng.choices("abcd", k=rng.randint(1, 5)))
        if piece not in pieces:
            pieces.add(piece)
            score = rng.choice([-1.0, -2.0, -3.0]) if rng.random() < 0.3 else rng.uniform(-10, 0)
            m.pieces.add(piece=piece, score=score, type=UNUSED if rng.random() < 0.4 else NORMAL)
    return m.SerializeToString()


def test_bpe_word_by_word_merges_as_sentencepiece_does_the_whole_text(tmp_path):
    """Such models are merged a word at a time: the same ids, unused pieces split back included."""
    rng = random.Random(23)
    for _ in range(100):
        sp, ct = model_pair(tmp_path, word_model(rng))
        for _ in range(20):
            text = " ".join("".join(rng.choices("abcd ", k=rng.randint(1, 8))) for _ in range(rng.randint(1, 6)))
            assert ct.encode(text, bos=False) == sp.encode(text), text


# ---- tokenizer.bin ----

def test_written_file_reads_back_and_rewrites_identically(tok, tmp_path):
    name, sp, ct, path = tok
    data = read_tokenizer_bin(path)
    assert write_tokenizer_bin(data, tmp_path / "again.bin").read_bytes() == path.read_bytes()
    n = sp.get_piece_size()
    assert len(data["pieces"]) == ct.vocab_size == n
    assert data["pieces"] == [sp.id_to_piece(i).replace("\u2581", " ").encode() for i in range(n)]
    trailer = data["trailer"]
    assert (trailer["unk_id"], trailer["bos_id"], trailer["eos_id"]) == (sp.unk_id(), sp.bos_id(), sp.eos_id())
    byte_pieces = {sp.id_to_piece(i): i for i in range(n) if sp.is_byte(i)}
    assert trailer["byte_ids"] == [byte_pieces.get(f"<0x{b:02X}>", -1) for b in range(256)]
    assert [t == BYTE for t in trailer["types"]] == [sp.is_byte(i) for i in range(n)]
    assert [t == CONTROL for t in trailer["types"]] == [sp.is_control(i) for i in range(n)]
    proto = pb.ModelProto.FromString(sp.serialized_model_proto())
    assert trailer["model_type"] == ("unigram" if name in UNIGRAMS else "bpe")
    assert trailer["model_type"] == pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()
    rules = dict(trailer["rules"])
    if proto.normalizer_spec.precompiled_charsmap:  # NFKC: full-width forms fold, decomposed sequences compose
        assert rules["（".encode()] == b"(" and rules["e\u0301".encode()] == "é".encode()
    else:
        assert rules == {}
    if name == "baichuan":
        assert trailer["byte_ids"][0] != 3


def test_upstream_llama2c_file_without_trailer(tmp_path):
    path = shared_path("reference/idtok512.bin")
    ct = CTokenizer(path, 512)
    assert (ct.vocab_size, ct.bos_id, ct.eos_id) == (512, 1, 2)
    assert ct.decode([1, 5, 300, 2, 7]) == "[5][300][7]"
    assert ct.encode("", bos=True) == [1]
    assert ct.encode("xy", bos=False) == [0]  # no byte pieces: a run of unknowns is one <unk>
    data = read_tokenizer_bin(path)
    assert data["trailer"] is None and data["pieces"][511] == b"[511]"
    assert write_tokenizer_bin(data, tmp_path / "copy.bin").read_bytes() == path.read_bytes()


def test_stripped_trailer_falls_back_to_llama_defaults(built, tmp_path, corpus):
    sp, path = built("llama2en")
    data = read_tokenizer_bin(path)
    data["trailer"] = None
    ct = CTokenizer(write_tokenizer_bin(data, tmp_path / "upstream.bin"), 32000)
    for text in corpus[:100] + EDGE_TEXTS:
        assert ct.encode(text, bos=False) == sp.encode(text), text
    rng, random_ids = random.Random(5), id_sampler(sp)
    for _ in range(200):
        ids = random_ids(rng)
        assert ct.decode_bytes(ids) == sp.decode(ids).encode("utf-8"), ids


# ---- the July-2023 format: byte pieces written as the bytes themselves, no trailer ----

def july_2023_bin(model: Path) -> bytes:
    """tokenizer.bin as llama2.c's tokenizer.py wrote it from July 2023 (3bfa566 to c02865d), and
    llama2.c-zh's: <s> and </s> framed by newlines, each byte piece as chr(byte) in UTF-8."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    pieces, scores = [], []
    for i in range(sp.get_piece_size()):
        text = sp.id_to_piece(i)
        if i in (sp.bos_id(), sp.eos_id()):
            text = f"\n{text}\n"
        elif sp.is_byte(i):
            text = chr(int(text[3:5], 16))
        pieces.append(text.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    body = b"".join(struct.pack("<fI", score, len(piece)) + piece for piece, score in zip(pieces, scores, strict=True))
    return struct.pack("<I", max(map(len, pieces))) + body


@pytest.mark.parametrize("name", SHARED_TOKENIZERS)
def test_july_2023_files_read_their_byte_pieces_as_bytes(name, corpus, tmp_path):
    model = shared_path(f"tokenizers/{name}/tokenizer.model")
    shipped = shared_path(f"thirdparty/llama2c_zh/{name}.bin")
    assert july_2023_bin(model) == shipped.read_bytes()  # the format, understood
    sp, ct = spm.SentencePieceProcessor(model_file=str(model)), CTokenizer(shipped, 0)
    assert (ct.vocab_size, ct.bos_id, ct.eos_id) == (sp.get_piece_size(), sp.bos_id(), sp.eos_id())
    # decoding: byte pieces are bytes (no Latin-1 mojibake), every other piece as SentencePiece
    rng, random_ids = random.Random(11), id_sampler(sp)
    for _ in range(300):
        ids = random_ids(rng)
        assert ct.decode_bytes(ids) == sp.decode(ids).encode("utf-8"), ids
    # encoding: as SentencePiece wherever the file can tell, so not baichuan's normalizer (given its
    # normalized text instead) nor its user-defined pieces (<SEP>, <reserved_7>, ...)
    def as_file_knows(text: str) -> str:
        return sp.normalize(text).replace("\u2581", " ").removeprefix(" ") if name == "baichuan" else text

    texts = [t for t in corpus if name != "baichuan" or "<" not in t]
    wrong = [t[:40] for t in texts if ct.encode(as_file_knows(t), bos=False) != sp.encode(t)]
    assert not wrong and len(texts) > 300, wrong[:3]
    data = read_tokenizer_bin(shipped)
    assert data["trailer"] is None
    assert write_tokenizer_bin(data, tmp_path / "copy.bin").read_bytes() == shipped.read_bytes()


def test_a_trailerless_unigram_file_is_refused_not_read_as_bpe(built, tmp_path):
    _, path = built("unigram")
    data = read_tokenizer_bin(path)
    data["trailer"] = None
    with pytest.raises(EngineError, match=r"has no trailer and piece \d+'s score -?[\d.]+ is not a BPE rank"):
        CTokenizer(write_tokenizer_bin(data, tmp_path / "unigram.bin"), 0)


# ---- models with other settings, made from llama2en's and a unigram one ----

def _without_bytes(m):
    m.trainer_spec.byte_fallback = False
    kept = [p for p in m.pieces if p.type != BYTE]
    del m.pieces[:]
    m.pieces.extend(kept)


def _some_unused(m):
    """BPE undoes merges into an unused piece, and an unused character is unknown; unigram
    never uses them."""
    rng = random.Random(3)
    for p in m.pieces:
        if p.type == NORMAL and rng.random() < (0.3 if len(p.piece) > 1 else 0.05):
            p.type = UNUSED


VARIANTS = {
    "remove_extra_whitespaces": lambda m: setattr(m.normalizer_spec, "remove_extra_whitespaces", True),
    "no_dummy_prefix": lambda m: setattr(m.normalizer_spec, "add_dummy_prefix", False),
    "whitespace_as_suffix": lambda m: setattr(m.trainer_spec, "treat_whitespace_as_suffix", True),
    "no_byte_fallback": _without_bytes,
    "unused_pieces": _some_unused,
}


@pytest.mark.parametrize("base", ["llama2en", "unigram"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_other_sentencepiece_settings(built, variant, base, tmp_path):
    m = pb.ModelProto.FromString(built(base)[0].serialized_model_proto())
    VARIANTS[variant](m)
    (tmp_path / "v.model").write_bytes(m.SerializeToString())
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "v.model"))
    ct = CTokenizer(export_tokenizer(tmp_path / "v.model", tmp_path / "v.bin"))
    rng = random.Random(21)
    for text in EDGE_TEXTS + [random_text(rng) for _ in range(300)]:
        assert ct.encode(text, bos=False) == sp.encode(text), text
    special = [0, 1, 2, sp.piece_to_id("\u2581")]
    for _ in range(300):
        ids = [rng.randrange(sp.get_piece_size()) if rng.random() < 0.5 else rng.choice(special)
               for _ in range(rng.randint(0, 8))]
        assert ct.decode_bytes(ids) == sp.decode(ids).encode("utf-8"), ids


# ---- bad files ----

def tiny_model(path: Path, **changes) -> Path:
    """A hand-made BPE tokenizer.model: byte pieces last (not at 3..258), a user-defined piece."""
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.normalizer_spec.name = "identity"
    m.pieces.add(piece="<unk>", score=0, type=UNKNOWN)
    m.pieces.add(piece="<s>", score=0, type=CONTROL)
    m.pieces.add(piece="</s>", score=0, type=CONTROL)
    for i, piece in enumerate(["\u2581", "a", "b", "你", "好", "\u2581a", "ab", "\u2581ab", "你好"]):
        m.pieces.add(piece=piece, score=-i, type=NORMAL)
    m.pieces.add(piece="<br>", score=0, type=USER_DEFINED)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", score=0, type=BYTE)
    for field, value in changes.items():
        changes_to = m.trainer_spec if hasattr(m.trainer_spec, field) else m.normalizer_spec
        setattr(changes_to, field, value)
    path.write_bytes(m.SerializeToString())
    return path


def test_tiny_model_matches_sentencepiece(tmp_path):
    model = tiny_model(tmp_path / "tiny.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ct = CTokenizer(export_tokenizer(model, tmp_path / "tiny.bin"))
    for text in ["ab a 你好 你们", "<br>ab<br>", "zz 😀", "", "  a"]:
        assert ct.encode(text, bos=False) == sp.encode(text), text
    rng = random.Random(8)
    for _ in range(200):
        ids = [rng.randrange(sp.get_piece_size()) for _ in range(rng.randint(0, 6))]
        assert ct.decode_bytes(ids) == sp.decode(ids).encode("utf-8"), ids


@pytest.fixture
def tiny_bin(tmp_path) -> bytes:
    return export_tokenizer(tiny_model(tmp_path / "tiny.model"), tmp_path / "tiny.bin").read_bytes()


@pytest.mark.parametrize("case, message", [
    ("missing", "cannot open"),
    ("empty", "too short to be a tokenizer.bin"),
    ("cut_in_pieces", "piece 9 runs past the end of the file"),
    ("cut_in_trailer", "trailer after piece 268 is truncated or damaged"),
    ("vocab_size", "has 269 pieces, the model's vocab_size is 270"),
    ("text_file", "not a tokenizer.bin"),
    ("bad_type", "piece 0 has invalid type 9"),
    ("trailer_count", "trailer says 268 pieces, the file has 269"),
    ("unknown_flag", "invalid ids or flags"),
])
def test_bad_files_raise_the_c_message(tiny_bin, tmp_path, case, message):
    trailer_at = tiny_bin.rindex(b"L2ZT")
    data = {
        "empty": b"",
        "cut_in_pieces": tiny_bin[:100],
        "cut_in_trailer": tiny_bin[:-3],
        "vocab_size": tiny_bin,
        "text_file": b"hello, this is not a tokenizer\n",
        "bad_type": tiny_bin[:trailer_at + 12 + 4 + 20 + 1024] + b"\x09" + tiny_bin[trailer_at + 12 + 4 + 20 + 1025:],
        "trailer_count": tiny_bin[:trailer_at + 12] + (268).to_bytes(4, "little") + tiny_bin[trailer_at + 16:],
        "unknown_flag": tiny_bin[:trailer_at + 32] + (64 | 4).to_bytes(4, "little") + tiny_bin[trailer_at + 36:],
    }.get(case)
    path = tmp_path / "tokenizer.bin"
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(EngineError, match=message):
        CTokenizer(path, 270 if case == "vocab_size" else 0)
    if case not in ("missing", "vocab_size"):
        with pytest.raises(UserError):
            read_tokenizer_bin(path)


def test_export_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        export_tokenizer(tmp_path / "absent.model", tmp_path / "out.bin")
    (tmp_path / "junk.model").write_bytes(b"\xff" * 100)
    with pytest.raises(UserError, match="not a SentencePiece model"):
        export_tokenizer(tmp_path / "junk.model", tmp_path / "out.bin")
    for kind in (pb.TrainerSpec.WORD, pb.TrainerSpec.CHAR):
        with pytest.raises(UserError, match="encodes BPE and unigram models only"):
            export_tokenizer(tiny_model(tmp_path / "word.model", model_type=kind), tmp_path / "out.bin")
    m = pb.ModelProto.FromString(tiny_model(tmp_path / "tiny.model").read_bytes())
    m.pieces[0].type = NORMAL  # with byte fallback SentencePiece needs no <unk>; tokenizer.bin does
    (tmp_path / "no_unk.model").write_bytes(m.SerializeToString())
    with pytest.raises(UserError, match="has no unknown piece"):
        export_tokenizer(tmp_path / "no_unk.model", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()


def test_unknown_trailer_flag_is_one_python_message(tiny_bin, tmp_path):
    trailer_at = tiny_bin.rindex(b"L2ZT")
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(tiny_bin[:trailer_at + 32] + (64 | 4).to_bytes(4, "little") + tiny_bin[trailer_at + 36:])
    with pytest.raises(UserError, match="flags 0x44 have bits this reader does not know"):
        read_tokenizer_bin(path)


def test_null_piece_of_a_byte_fallback_model_is_unused(tmp_path):
    """SentencePiece loads a "\\0" piece (from some converters) as unused when <0x00> exists."""
    for model_type in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM):
        m = pb.ModelProto.FromString(tiny_model(tmp_path / "tiny.model", model_type=model_type).read_bytes())
        m.pieces.add(piece="\0", score=-1, type=NORMAL)
        sp, ct = model_pair(tmp_path, m.SerializeToString())
        for text in ["a\0b", "\0", "\0\0a"]:
            assert ct.encode(text, bos=False) == sp.encode(text), text
        assert read_tokenizer_bin(tmp_path / "m.bin")["trailer"]["types"][-1] == UNUSED
