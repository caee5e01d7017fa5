"""CLIP's byte-level BPE tokenizer (the one OpenCLIP's text towers were trained with).

Our own small implementation of the published algorithm; the merges file
`bpe_simple_vocab_16e6.txt.gz` is vendored beside this module (MIT, see VOCAB_LICENSE.txt).
Any merges file of the same format works (tests use a tiny synthetic one): the vocabulary is
256 byte symbols + the same with `</w>` + one symbol per merge + `<|startoftext|>`, `<|endoftext|>`.
"""
from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path

import regex

from btp.errors import BTPError

DEFAULT_VOCAB = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
CLIP_MAX_MERGES = 49152 - 256 - 2  # what OpenAI CLIP reads from its merges file
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class VocabError(BTPError, FileNotFoundError):
    """The BPE merges file is missing or malformed."""


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable unicode map (avoids whitespace/control chars in BPE symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    """`encode(text) -> ids` (no SOT/EOT), `sot_id`, `eot_id`, `vocab_size`."""

    def __init__(self, vocab_path: str | Path = DEFAULT_VOCAB, max_merges: int = CLIP_MAX_MERGES):
        path = Path(vocab_path)
        if not path.is_file():
            raise VocabError(
                f"CLIP BPE merges file not found: {path}. It ships with btp as "
                f"btp/model/bpe_simple_vocab_16e6.txt.gz (reinstall btp-edge) or pass vocab_path=."
            )
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as fh:
                lines = fh.read().split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise VocabError(f"cannot read CLIP BPE merges file {path}: {exc}") from exc
        merges = [tuple(line.split()) for line in lines[1 : max_merges + 1] if line.strip()]
        if any(len(m) != 2 for m in merges):
            raise VocabError(f"{path}: every merge line must hold two symbols")
        byte_symbols = list(_bytes_to_unicode().values())
        vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self.vocab_size = len(vocab)
        self.path = path
        self._cache: dict[str, str] = {SOT: SOT, EOT: EOT}

    def _bpe(self, token: str) -> str:
        if token in self._cache:
            return self._cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for token in _PATTERN.findall(_clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[sym] for sym in self._bpe(token).split(" "))
        return ids
