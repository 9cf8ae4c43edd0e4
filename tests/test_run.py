"""The `run` command line, driven through subprocess: llama2.c's reference outputs, the
arguments, and bad input (one line on stderr, exit 1 for a bad file, 2 for bad usage).

Most tests use a tiny random model and an id tokenizer (piece i is the text "[i]") that
they write themselves, checked against a NumPy forward pass; the llama2.c reference
checks use ../shared and skip when it is absent.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
HANG = 120  # seconds: only catches a hang, never a speed requirement

# tiny GQA model: 4 query heads share 2 kv heads
CFG = dict(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=24)
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
BOS, EOS = 1, 2


@pytest.fixture(scope="session")
def run_bin() -> Path:
    if os.environ.get("LLAMA2ZH_RUN"):  # another build of it (make test-asan)
        return Path(os.environ["LLAMA2ZH_RUN"]).resolve()
    build = subprocess.run(["make", "run"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if build.returncode != 0:
        pytest.fail(f"make run failed:\n{build.stdout}{build.stderr}")
    return ROOT / "run"


def run(run_bin, *args, check=True):
    result = subprocess.run([str(run_bin), *map(str, args)], capture_output=True, timeout=HANG)
    if check:
        assert result.returncode == 0, result.stderr.decode()
    return result


def ids_of(stdout: bytes) -> list[int]:
    """The ids an id tokenizer's text shows: "[461][461][401]...\n"."""
    text = stdout.decode()
    assert text.endswith("\n")
    assert re.fullmatch(r"(\[\d+\])*", text[:-1]), text[:200]
    return [int(i) for i in re.findall(r"\[(\d+)\]", text)]


def shared_file(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"reference file {path} is absent (../shared is not beside the project)")
    return path


# ---- writing model.bin and tokenizer.bin ----


def random_weights(seed=0, **cfg):
    c = {**CFG, **cfg}
    rng = np.random.default_rng(seed)
    dim, hidden, layers, vocab = c["dim"], c["hidden_dim"], c["n_layers"], c["vocab_size"]
    kv_dim = dim // c["n_heads"] * c["n_kv_heads"]

    def r(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    w = dict(
        token_embedding=r(vocab, dim, scale=1.0),
        rms_att=1 + r(layers, dim, scale=0.1), rms_ffn=1 + r(layers, dim, scale=0.1),
        rms_final=1 + r(dim, scale=0.1),
        wq=r(layers, dim, dim), wk=r(layers, kv_dim, dim), wv=r(layers, kv_dim, dim),
        wo=r(layers, dim, dim), w1=r(layers, hidden, dim), w2=r(layers, dim, hidden),
        w3=r(layers, hidden, dim), wcls=r(vocab, dim),
    )
    w["wcls"][[BOS, EOS]] = 0  # logit 0: never the argmax, so greedy runs never stop early
    return c, w


def write_model(path, c, w, version=1, shared=False):
    params = [c[f] for f in FIELDS]
    with open(path, "wb") as f:
        if version == 0:
            if not shared:
                params[5] = -params[5]
            f.write(struct.pack("<7i", *params))
            order = ["token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
                     "rms_final"]
        else:
            header = struct.pack("<Ii7iB", 0x616B3432, 1, *params, int(shared))
            f.write(header + bytes(256 - len(header)))
            order = ["rms_att", "rms_ffn", "rms_final", "token_embedding", "wq", "wk", "wv", "wo", "w1",
                     "w2", "w3"]
        for name in order:
            f.write(w[name].tobytes())
        if version == 0:  # freq_cis_real and freq_cis_imag, which run ignores
            f.write(np.zeros(c["seq_len"] * c["dim"] // c["n_heads"], np.float32).tobytes())
        if not shared:
            f.write(w["wcls"].tobytes())
    return path


def write_tokenizer(path, pieces):
    """llama2.c's layout; earlier pieces score higher, as in SentencePiece's BPE."""
    with open(path, "wb") as f:
        f.write(struct.pack("<I", max(map(len, pieces), default=0)))
        for i, p in enumerate(pieces):
            f.write(struct.pack("<fI", -float(i), len(p)) + p)
    return path


def write_id_tokenizer(path, n):
    return write_tokenizer(path, [f"[{i}]".encode() for i in range(n)])


@pytest.fixture()
def tiny(tmp_path):
    """(model.bin, tokenizer.bin, config, weights) of the tiny random model, v1, unshared."""
    c, w = random_weights()
    model = write_model(tmp_path / "model.bin", c, w)
    tok = write_id_tokenizer(tmp_path / "tokenizer.bin", c["vocab_size"])
    return model, tok, c, w


# ---- a NumPy forward pass, in float64, as llama2.c computes it ----


def greedy_reference(c, w, steps, shared=False):
    dim, n_heads, n_kv = c["dim"], c["n_heads"], c["n_kv_heads"]
    hs = dim // n_heads
    w = {k: v.astype(np.float64) for k, v in w.items()}
    wcls = w["token_embedding"] if shared else w["wcls"]
    keys = [[] for _ in range(c["n_layers"])]
    values = [[] for _ in range(c["n_layers"])]

    def rmsnorm(x, g):
        return g * x / np.sqrt(np.mean(x * x) + 1e-5)

    def rope(v, pos):  # rotates the pairs (2i, 2i+1) of every head
        v = v.reshape(-1, hs // 2, 2)
        angle = pos / 10000.0 ** (np.arange(0, hs, 2) / hs)
        cos, sin = np.cos(angle), np.sin(angle)
        return np.stack([v[..., 0] * cos - v[..., 1] * sin, v[..., 0] * sin + v[..., 1] * cos], -1).ravel()

    token, out = BOS, []
    for pos in range(steps):
        x = w["token_embedding"][token].copy()
        for layer in range(c["n_layers"]):
            xb = rmsnorm(x, w["rms_att"][layer])
            q = rope(w["wq"][layer] @ xb, pos).reshape(n_heads, hs)
            keys[layer].append(rope(w["wk"][layer] @ xb, pos).reshape(n_kv, hs))
            values[layer].append((w["wv"][layer] @ xb).reshape(n_kv, hs))
            k, v = np.stack(keys[layer]), np.stack(values[layer])  # (pos+1, n_kv, hs)
            att = np.empty((n_heads, hs))
            for h in range(n_heads):
                kv = h // (n_heads // n_kv)
                score = k[:, kv] @ q[h] / np.sqrt(hs)
                p = np.exp(score - score.max())
                att[h] = (p / p.sum()) @ v[:, kv]
            x = x + w["wo"][layer] @ att.ravel()
            xb = rmsnorm(x, w["rms_ffn"][layer])
            a, b = w["w1"][layer] @ xb, w["w3"][layer] @ xb
            x = x + w["w2"][layer] @ (a / (1 + np.exp(-a)) * b)
        token = int(np.argmax(wcls @ rmsnorm(x, w["rms_final"])))
        if token in (BOS, EOS):
            break
        out.append(token)
    return out


# ---- output ----


def test_greedy_matches_numpy_forward(run_bin, tiny):
    model, tok, c, w = tiny
    result = run(run_bin, model, "-k", tok, "-t", 0, "-n", 20)
    assert ids_of(result.stdout) == greedy_reference(c, w, 20)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("shared", [False, True])
def test_every_format_gives_the_same_tokens(run_bin, tmp_path, version, shared):
    c, w = random_weights(seed=1)
    model = write_model(tmp_path / "model.bin", c, w, version=version, shared=shared)
    tok = write_id_tokenizer(tmp_path / "tokenizer.bin", c["vocab_size"])
    ids = ids_of(run(run_bin, model, "-k", tok, "-t", 0, "-n", 12).stdout)
    assert ids == greedy_reference(c, w, 12, shared=shared)


def test_success_prints_one_line_of_speed_on_stderr(run_bin, tiny):
    model, tok, _, _ = tiny
    result = run(run_bin, model, "-k", tok, "-n", 10, "-s", 1)
    assert re.fullmatch(rb"achieved tok/s: [0-9.]+\n", result.stderr), result.stderr


def test_default_tokenizer_is_tokenizer_bin_in_the_working_directory(run_bin, tiny):
    model, tok, _, _ = tiny
    result = subprocess.run([str(run_bin), model.name, "-t", "0", "-n", "5"], cwd=model.parent,
                            capture_output=True, timeout=HANG)
    assert result.returncode == 0, result.stderr
    assert result.stdout == run(run_bin, model, "-k", tok, "-t", 0, "-n", 5).stdout


@pytest.mark.parametrize("n", [0, 24, 25, 1000])
def test_steps_are_clamped_to_seq_len(run_bin, tiny, n):
    model, tok, c, _ = tiny
    assert len(ids_of(run(run_bin, model, "-k", tok, "-t", 0, "-n", n).stdout)) == c["seq_len"]


def test_steps_count_positions(run_bin, tiny):
    model, tok, _, _ = tiny
    assert len(ids_of(run(run_bin, model, "-k", tok, "-t", 0, "-n", 7).stdout)) == 7


def test_seeded_sampling_is_reproducible(run_bin, tiny):
    model, tok, _, _ = tiny
    for topp in (0.9, 0, 1):
        args = (model, "-k", tok, "-t", 1, "-p", topp, "-n", 24)
        first = run(run_bin, *args, "-s", 42).stdout
        assert run(run_bin, *args, "-s", 42).stdout == first
        assert run(run_bin, *args, "-s", 43).stdout != first


def test_sampling_differs_from_greedy(run_bin, tiny):
    model, tok, _, _ = tiny
    greedy = run(run_bin, model, "-k", tok, "-t", 0, "-n", 24).stdout
    assert run(run_bin, model, "-k", tok, "-t", 1, "-s", 7, "-n", 24).stdout != greedy


def test_the_prompt_is_printed_first(run_bin, tmp_path):
    # SentencePiece-like pieces: control, byte fallback, a few merges (as llama2.c writes
    # them, with a space where SentencePiece has "\u2581")
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % i for i in range(256)]
    pieces += [b"a", b"b", b"ab", b" ", b" a"]
    tok = write_tokenizer(tmp_path / "tokenizer.bin", pieces)
    c, w = random_weights(vocab_size=len(pieces))
    model = write_model(tmp_path / "model.bin", c, w)
    result = run(run_bin, model, "-k", tok, "-t", 0, "-n", 10, "-i", "ab")
    assert result.stdout.startswith(b"ab")
    assert result.stdout.endswith(b"\n")


# ---- llama2.c's reference outputs ----


@pytest.mark.parametrize("model", ["models/stories260K.bin", "reference/stories260K_llama2c_v1.bin"])
def test_stories260k_greedy_matches_llama2c(run_bin, model):
    expected = [int(t) for t in shared_file("reference/stories260K_greedy_ids.txt").read_text().split()]
    tok = shared_file("reference/idtok512.bin")
    result = run(run_bin, shared_file(model), "-z", tok, "-t", 0, "-n", 300, "-i", "")
    assert ids_of(result.stdout) == expected


def test_z_is_k(run_bin):
    model, tok = shared_file("models/stories260K.bin"), shared_file("reference/idtok512.bin")
    z = run(run_bin, model, "-z", tok, "-t", 1, "-s", 5, "-n", 40).stdout
    assert run(run_bin, model, "-k", tok, "-t", 1, "-s", 5, "-n", 40).stdout == z


def test_stories260k_steps_clamped_to_seq_len(run_bin):
    model, tok = shared_file("models/stories260K.bin"), shared_file("reference/idtok512.bin")
    ids = ids_of(run(run_bin, model, "-z", tok, "-t", 0, "-n", 100000).stdout)
    assert len(ids) == 512  # seq_len; greedy never samples BOS or EOS here
    assert ids == ids_of(run(run_bin, model, "-z", tok, "-t", 0, "-n", 0).stdout)


def test_stories260k_seeded_sampling(run_bin):
    model, tok = shared_file("models/stories260K.bin"), shared_file("reference/idtok512.bin")
    args = (model, "-z", tok, "-t", 1, "-n", 100, "-s", 1234)
    first = run(run_bin, *args).stdout
    assert run(run_bin, *args).stdout == first
    assert first != run(run_bin, model, "-z", tok, "-t", 0, "-n", 100).stdout


# ---- bad input: one line on stderr, exit 1 (runtime) or 2 (usage) ----


def assert_fails(result, status, *words):
    err = result.stderr.decode()
    assert result.returncode == status, (result.returncode, err)
    assert err.endswith("\n") and err.count("\n") == 1 and err.strip(), repr(err)
    for word in words:
        assert word in err, err
    if status == 1:
        assert result.stdout == b""


def patched(path, offset, fmt, value):
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


def test_truncated_model(run_bin, tiny):
    model, tok, _, _ = tiny
    data = model.read_bytes()
    model.write_bytes(data[:-3])
    assert_fails(run(run_bin, model, "-k", tok, check=False), 1, str(len(data) - 3), str(len(data)))


def test_padded_model(run_bin, tiny):
    model, tok, _, _ = tiny
    size = model.stat().st_size
    model.write_bytes(model.read_bytes() + b"\0" * 4)
    assert_fails(run(run_bin, model, "-k", tok, check=False), 1, str(size + 4), str(size))


@pytest.mark.parametrize("field, value", [
    ("dim", 0), ("n_layers", -1), ("n_heads", 0), ("vocab_size", 0),
    ("seq_len", 1 << 30), ("dim", 1 << 30), ("hidden_dim", -(1 << 31)), ("vocab_size", 1 << 30),
    ("n_kv_heads", 8), ("n_heads", 5), ("n_heads", 32),
])
@pytest.mark.parametrize("version", [0, 1])
def test_bad_header_field(run_bin, tmp_path, field, value, version):
    c, w = random_weights()
    model = write_model(tmp_path / "model.bin", c, w, version=version)
    tok = write_id_tokenizer(tmp_path / "tokenizer.bin", c["vocab_size"])
    patched(model, (0 if version == 0 else 8) + 4 * FIELDS.index(field), "<i", value)
    assert_fails(run(run_bin, model, "-k", tok, check=False), 1)


def test_unsupported_version(run_bin, tiny):
    model, tok, _, _ = tiny
    patched(model, 4, "<i", 7)
    assert_fails(run(run_bin, model, "-k", tok, check=False), 1, "unsupported model.bin version 7")


@pytest.mark.parametrize("content", [b"", b"hello, I am not a model\n" * 10,
                                     np.random.default_rng(3).bytes(100_000)],
                         ids=["empty", "text", "random"])
def test_not_a_model(run_bin, tiny, content):
    model, tok, _, _ = tiny
    model.write_bytes(content)
    assert_fails(run(run_bin, model, "-k", tok, check=False), 1)


def test_directory_as_model(run_bin, tiny):
    model, tok, _, _ = tiny
    assert_fails(run(run_bin, model.parent, "-k", tok, check=False), 1)


def test_missing_model(run_bin, tiny, tmp_path):
    _, tok, _, _ = tiny
    assert_fails(run(run_bin, tmp_path / "nope.bin", "-k", tok, check=False), 1, "nope.bin")


def test_missing_tokenizer(run_bin, tiny, tmp_path):
    model, _, _, _ = tiny
    assert_fails(run(run_bin, model, "-k", tmp_path / "nope.bin", check=False), 1, "nope.bin")


def test_truncated_tokenizer(run_bin, tiny):
    model, tok, _, _ = tiny
    tok.write_bytes(tok.read_bytes()[:-2])
    assert_fails(run(run_bin, model, "-k", tok, check=False), 1)


def test_tokenizer_of_another_vocab(run_bin, tiny):
    model, tok, c, _ = tiny
    write_id_tokenizer(tok, c["vocab_size"] - 1)
    assert_fails(run(run_bin, model, "-k", tok, check=False), 1)


@pytest.mark.parametrize("args, words", [
    ([], ["usage:"]),
    (["-n", "5"], ["model"]),
    (["MODEL", "-n", "-5"], ["-n"]),
    (["MODEL", "-x", "1"], ["-x"]),
    (["MODEL", "--steps", "1"], ["--steps"]),
    (["MODEL", "stray"], ["stray"]),
    (["MODEL", "-n"], ["-n"]),
    (["MODEL", "-t", "-0.5"], ["-t"]),
    (["MODEL", "-t", "hot"], ["-t"]),
    (["MODEL", "-p", "1.5"], ["-p"]),
    (["MODEL", "-p", "-0.1"], ["-p"]),
    (["MODEL", "-p", "nan"], ["-p"]),
    (["MODEL", "-n", "12abc"], ["-n"]),
    (["MODEL", "-n", "99999999999999"], ["-n"]),
    (["MODEL", "-s", "-3"], ["-s"]),
    (["MODEL", "-y", "be brief"], ["-y", "-m chat"]),
    (["MODEL", "-m", "poem"], ["poem"]),
    (["MODEL", "-P", "2.5"], ["-P", "presence penalty", "[-2, 2]"]),
    (["MODEL", "-F", "often"], ["-F", "frequency penalty"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_usage(run_bin, tiny, args, words):
    model, tok, _, _ = tiny
    args = [str(model) if a == "MODEL" else a for a in args]
    result = run(run_bin, *args, check=False)
    assert_fails(result, 2, *words)
    assert result.stdout == b""


def test_chat_needs_a_tokenizer_with_a_chat_template(run_bin, tiny):
    model, tok, _, _ = tiny  # the id tokenizer has no trailer (tests/test_chat_engine.py runs chats)
    assert_fails(run(run_bin, model, "-k", tok, "-m", "chat", check=False), 1, "no chat template")


def test_help(run_bin):
    result = run(run_bin, "-h")
    assert result.stdout.startswith(b"usage:")


@pytest.mark.parametrize("name, trailer, noted", [
    ("baichuan", False, True),  # llama2.c-zh's file: NFKC is in tokenizer.model, not in the .bin
    ("baichuan", True, False),  # our tokenizer.bin carries the normalizer
    ("llama2en", False, False),  # identity: nothing is missing
])
def test_a_normalizer_a_llama2c_file_cannot_carry_is_noted_once(run_bin, tmp_path, name, trailer, noted):
    from llama2zh.vocab.export import export_tokenizer

    model = shared_file(f"tokenizers/{name}/tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(model.read_bytes())
    tok = tmp_path / "tokenizer.bin"
    if trailer:
        export_tokenizer(tmp_path / "tokenizer.model", tok)
    else:
        tok.write_bytes(shared_file(f"thirdparty/llama2c_zh/{name}.bin").read_bytes())
    c, w = random_weights()
    c = dict(c, vocab_size=spm.SentencePieceProcessor(model_file=str(model)).get_piece_size())
    w["token_embedding"] = np.resize(w["token_embedding"], (c["vocab_size"], c["dim"]))
    w["wcls"] = np.resize(w["wcls"], (c["vocab_size"], c["dim"]))
    result = run(run_bin, write_model(tmp_path / "model.bin", c, w), "-k", tok, "-t", "0", "-n", "4", "-i", "ＡＢＣ")
    notes = [line for line in result.stderr.decode().splitlines() if line.startswith("note:")]
    assert len(notes) == (1 if noted else 0), result.stderr.decode()
    if noted:
        assert "nmt_nfkc" in notes[0] and str(tmp_path / "tokenizer.model") in notes[0]
