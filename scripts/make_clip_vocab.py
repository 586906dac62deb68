"""Builds CLIP's BPE tokenizer files (vocab.json, merges.txt) in the layout Stable Diffusion
repositories ship under tokenizer/, from OpenAI's original BPE merge list
(bpe_simple_vocab_16e6.txt.gz, MIT licensed, distributed inside the open_clip_torch wheel).

Run by hand:  python scripts/make_clip_vocab.py path/to/bpe_simple_vocab_16e6.txt.gz assets/clip-tokenizer
"""
import gzip
import json
import sys
from pathlib import Path


def byte_to_unicode_table():
    """The reversible byte -> printable character table used by GPT-2 style byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    # The first line is a header; CLIP keeps 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(byte_to_unicode_table().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"{len(tokens)} tokens, {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main()
