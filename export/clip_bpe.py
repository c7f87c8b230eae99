"""CLIP's byte-level BPE tokenizer in plain Python, reading the same `vocab.json` / `merges.txt`.

The exported pipelines must run text → image without torch or transformers (an app ships neither),
so this is the tokenizer they use; a test holds it to `transformers.CLIPTokenizer` id for id.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import regex

from ..distill.tokenizer import byte_symbols
from ..stockformat import vocab_and_merges

_PATTERN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                         regex.IGNORECASE)


class ClipBPE:
    """`encode(text)` → ids padded to `max_length` exactly as `CLIPTokenizer(padding='max_length', truncation=True)`."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.vocab, merges = vocab_and_merges(folder)
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}

        def token(key: str, default: str) -> int:
            value = config.get(key, default)
            return self.vocab[value["content"] if isinstance(value, dict) else value]

        self.bos, self.eos = token("bos_token", "<|startoftext|>"), token("eos_token", "<|endoftext|>")
        self.pad, self.unk = token("pad_token", "<|endoftext|>"), token("unk_token", "<|endoftext|>")
        self.max_length = int(config.get("model_max_length", 77))
        self.bytes = dict(enumerate(byte_symbols()))
        self._bpe = lru_cache(maxsize=65536)(self._bpe_word)

    def _bpe_word(self, word: str) -> tuple[str, ...]:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.ranks.get(pair, 1 << 62), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 62:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return tuple(parts)

    def tokens(self, text: str) -> list[int]:
        text = " ".join(text.split()).lower()
        ids = []
        for word in _PATTERN.findall(text):
            mapped = "".join(self.bytes[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab.get(part, self.unk) for part in self._bpe(mapped))
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [self.bos, *self.tokens(text)[:self.max_length - 2], self.eos]
        return ids + [self.pad] * (self.max_length - len(ids))
