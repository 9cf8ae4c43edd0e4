"""Pieces added vs tokens per Chinese character: `python -m llama2zh.vocab.curve`.

The Chinese pieces are trained once on --corpus; each size takes its pieces from that one
candidate list the way `vocab extend --add N` does. Tokens per Chinese character are measured
on the Chinese documents of --eval and of --heldout, for the base, each size and each
--reference tokenizer. Writes OUT_DIR/extension_curve.md (a markdown table) and
OUT_DIR/extension_curve.svg (a line chart, written by hand: no plotting library).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import sentencepiece as spm

from llama2zh.errors import UserError
from llama2zh.fileio import atomic_output
from llama2zh.vocab.corpus import read_documents
from llama2zh.vocab.export import load_sentencepiece
from llama2zh.vocab.extend import chinese_candidates, extend_proto
from llama2zh.vocab.stats import model_file, tokens_per_char

SIZES = (1000, 2000, 5000, 10000, 15000, 20000)
COLORS = {"eval": "#1f77b4", "heldout": "#d62728"}


def curve(base: Path, corpus: list[Path], eval_texts: list[Path], heldout: list[Path], references: list[Path],
          sizes=SIZES) -> list[dict]:
    """Rows {name, added (None for a reference), vocab, eval, heldout}: tokens per Chinese character."""
    texts = {"eval": list(read_documents(eval_texts, "zh")), "heldout": list(read_documents(heldout, "zh"))}
    for key, docs in texts.items():
        if not docs:
            raise UserError(f"no Chinese documents in the --{key} texts")

    def row(name, added, sp):
        return {"name": name, "added": added, "vocab": sp.get_piece_size(),
                **{key: tokens_per_char(sp, docs) for key, docs in texts.items()}}

    base_sp, base_proto = load_sentencepiece(base)
    candidates, _ = chinese_candidates(base_proto, corpus, max(sizes))
    rows = [row(model_file(base).parent.name, 0, base_sp)]
    for size in sizes:
        proto, _ = extend_proto(base_proto, candidates, size)
        rows.append(row(f"+{size:,}", size, spm.SentencePieceProcessor(model_proto=proto.SerializeToString())))
    for reference in references:
        rows.append(row(model_file(reference).parent.name, None, load_sentencepiece(model_file(reference))[0]))
    return rows


def markdown(rows: list[dict], eval_name: str, heldout_name: str) -> str:
    lines = [f"| tokenizer | pieces added | vocab | tokens / zh char: {eval_name} | {heldout_name} |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        added = "–" if r["added"] is None else f"{r['added']:,}"
        lines.append(f"| {r['name']} | {added} | {r['vocab']:,} | {r['eval']:.3f} | {r['heldout']:.3f} |")
    return "\n".join(lines) + "\n"


def svg(rows: list[dict], eval_name: str, heldout_name: str) -> str:
    """Tokens per Chinese character against vocab size: the extension as lines, references as squares."""
    width, height, left, right, top, bottom = 720, 420, 60, 230, 20, 50
    x0 = min(r["vocab"] for r in rows) // 10000 * 10000
    x1 = math.ceil(max(r["vocab"] for r in rows) / 10000) * 10000
    y1 = math.ceil(max(r[k] for r in rows for k in COLORS) * 5) / 5

    def px(v):
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def py(v):
        return height - bottom - v / y1 * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>']
    for i in range(round(y1 / 0.2) + 1):
        y = py(i * 0.2)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{px(x1):.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{i * 0.2:.1f}</text>')
    for x in range(x0, x1 + 1, 10000):
        out.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{py(0):.1f}" stroke="#ddd"/>'
                   f'<text x="{px(x):.1f}" y="{py(0) + 16:.1f}" text-anchor="middle">{x:,}</text>')
    out.append(f'<text x="{(left + px(x1)) / 2:.1f}" y="{height - 10}" text-anchor="middle">vocab size</text>'
               f'<text transform="translate(16 {(top + py(0)) / 2:.1f}) rotate(-90)" text-anchor="middle">'
               'tokens per Chinese character</text>')
    extended = [r for r in rows if r["added"] is not None]
    for key, color in COLORS.items():
        points = " ".join(f"{px(r['vocab']):.1f},{py(r[key]):.1f}" for r in extended)
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        out += [f'<circle cx="{px(r["vocab"]):.1f}" cy="{py(r[key]):.1f}" r="3.5" fill="{color}"/>' for r in extended]
    for r in rows:
        if r["added"] is None:
            x = px(r["vocab"])
            out += [f'<rect x="{x - 5:.1f}" y="{py(r[key]) - 5:.1f}" width="10" height="10" fill="none" '
                    f'stroke="{color}" stroke-width="2"/>' for key, color in COLORS.items()]
            out.append(f'<text x="{x:.1f}" y="{min(py(r[key]) for key in COLORS) - 10:.1f}" '
                       f'text-anchor="middle">{r["name"]}</text>')
    legend_x = width - right + 20
    legend = {"eval": f"on {eval_name}", "heldout": f"on {heldout_name} (held out)"}
    for i, (key, where) in enumerate(legend.items()):
        y = top + 20 + 40 * i
        out.append(f'<line x1="{legend_x}" y1="{y}" x2="{legend_x + 20}" y2="{y}" stroke="{COLORS[key]}" '
                   f'stroke-width="2"/><text x="{legend_x + 26}" y="{y + 4}" font-size="11">'
                   f'{extended[0]["name"]} + Chinese pieces<tspan x="{legend_x + 26}" dy="14">{where}</tspan></text>')
    out.append(f'<text x="{legend_x}" y="{top + 110}" font-size="11">squares: other tokenizers</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama2zh.vocab.curve", description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the BPE tokenizer.model to extend")
    parser.add_argument("--corpus", type=Path, nargs="+", required=True, help="Chinese text the pieces come from")
    parser.add_argument("--eval", type=Path, nargs="+", required=True, help="Chinese text to measure on")
    parser.add_argument("--heldout", type=Path, nargs="+", required=True, help="held-out Chinese text")
    parser.add_argument("--reference", type=Path, nargs="*", default=[], help="tokenizers to compare with")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="pieces to add")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        rows = curve(args.base, args.corpus, args.eval, args.heldout, args.reference, args.sizes)
        names = args.eval[0].stem, args.heldout[0].stem
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in (("extension_curve.md", markdown(rows, *names)), ("extension_curve.svg", svg(rows, *names))):
            with atomic_output(args.out_dir / name) as tmp:
                tmp.write_text(text, encoding="utf-8")
    except UserError as e:
        print(f"curve: {e}", file=sys.stderr)
        return 1
    print(markdown(rows, *names), end="")
    print(f"wrote {args.out_dir / 'extension_curve.md'} and {args.out_dir / 'extension_curve.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
