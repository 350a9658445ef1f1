"""Token ids to the text a reader should see, exactly: spaces, newlines and partial UTF-8 kept visible."""
from __future__ import annotations

from functools import lru_cache
from typing import Iterable


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: unicode stand-in -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _piece_bytes(piece: str) -> bytes | None:
    """The raw bytes behind a token piece, for byte-level BPE (Ġ, Ċ, ...) or `<0xNN>` byte fallback."""
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    table = _byte_decoder()
    if all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return None


class TokenText:
    """Decodes single tokens with a cache; one per tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._decode(token_id)
        return text

    def many(self, ids: Iterable[int]) -> list[str]:
        return [self(i) for i in ids]

    def _decode(self, token_id: int) -> str:
        tok = self.tokenizer
        text = tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if "\ufffd" in text:
            piece = tok.convert_ids_to_tokens(token_id)
            raw = _piece_bytes(piece) if isinstance(piece, str) else None
            if raw is not None and b"\xef\xbf\xbd" not in raw:
                # Part of a multi-byte character: show its bytes instead of dropping them.
                return raw.decode("utf-8", errors="backslashreplace")
        return text
