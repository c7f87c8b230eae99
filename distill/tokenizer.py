"""Build a CLIP byte-level BPE vocabulary from a caption set, saved in CLIP's own file format.

Stock `CLIPTokenizer` (and Apple's Swift BPE tokenizer, which reads the same `vocab.json` and
`merges.txt`) must tokenize our captions, so the vocabulary follows CLIP's conventions: the 256
byte symbols, the same with the end-of-word marker `</w>`, one entry per learned merge, then
`<|startoftext|>` and `<|endoftext|>`. Merges are learned until every caption word is one token,
which keeps sequences short and the embedding table small.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def byte_symbols() -> list[str]:
    """CLIP's reversible byte → printable-character table (the GPT-2 `bytes_to_unicode`)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _learn_merges(words: Counter) -> list[tuple[str, str]]:
    symbols = byte_symbols()
    table = {i: s for i, s in enumerate(symbols)}
    spelled = {}
    for word, count in words.items():
        chars = [table[b] for b in word.encode("utf-8")]
        spelled[tuple(chars[:-1] + [chars[-1] + "</w>"])] = count
    merges = []
    while True:
        pairs: Counter = Counter()
        for parts, count in spelled.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        merged = {}
        for parts, count in spelled.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            merged[tuple(out)] = count
        spelled = merged


def build_clip_tokenizer_files(captions: list[str], folder: Path, max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs that `CLIPTokenizer` loads."""
    words = Counter(w for caption in captions for w in _WORD.findall(caption.lower()))
    merges = _learn_merges(words)
    base = byte_symbols()
    vocab_list = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return folder
