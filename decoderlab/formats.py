"""Text as a reader sees it, written one way everywhere: a token's visible label, escapes for markup and
terminals, and numbers (probabilities, ranks, byte counts) with '–' where a source recorded nothing.

At the bottom of the house beside `errors`: a trace's repr, the recording's warnings, the CLI and every view
write these the same way. Standard library only.
"""
from __future__ import annotations

import html
import math
import unicodedata
from functools import lru_cache
from typing import Any

__all__ = ["is_invisible", "char_escape", "visible_text", "token_label", "format_prob", "is_missing", "format_rank",
           "format_number", "format_bytes", "escape", "short_processor"]


# ---- token text -------------------------------------------------------------------------------------
_VISIBLE = {"\n": "↵", "\t": "⇥"}
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co"}  # control, format, separators, surrogates, private
_KEEP_FORMAT = {"\u200d"}  # zero-width joiner: part of emoji sequences, shown as itself


def is_invisible(ch: str) -> bool:
    """Whether character `ch` draws as nothing (or as a box) and must be written as its escape to be seen."""
    return ch not in _KEEP_FORMAT and unicodedata.category(ch) in _INVISIBLE_CATEGORIES


def char_escape(ch: str) -> str:
    """`ch` written as Python writes it in a string literal: '\\x1b', '\\u200b', '\\U000e0001'."""
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible_text(text: str) -> str:
    """Generated text as a terminal should print it: newlines and tabs as they are, every other control or
    invisible character (an escape sequence's ESC, a bidi override) written as its escape, so model output
    can neither drive the terminal nor reorder what is shown."""
    return "".join(char_escape(ch) if ch not in "\n\t" and is_invisible(ch) else ch for ch in text)


@lru_cache(maxsize=65536)  # a view labels the same few thousand tokens click after click
def token_label(text: str, max_len: int = 16) -> str:
    """A token as a short, visible label: '␣' for leading/trailing spaces, '↵' newline, '⇥' tab,
    `\\xNN`/`\\uNNNN` for other control and invisible characters (and spaces other than ' '), '∅' for
    the empty token; cut to `max_len` with '…', never inside an escape."""
    if text == "":
        return "∅"
    pieces: list[str] = []
    n = len(text)
    lead = n - len(text.lstrip(" "))
    trail = n - len(text.rstrip(" ")) if lead < n else 0
    for i, ch in enumerate(text):
        if ch == " " and (i < lead or i >= n - trail):
            pieces.append("␣")
        elif ch in _VISIBLE:
            pieces.append(_VISIBLE[ch])
        elif is_invisible(ch) or (ch != " " and unicodedata.category(ch) == "Zs"):
            pieces.append(char_escape(ch))  # a label must tell a no-break space from a space
        else:
            pieces.append(ch)
    if sum(len(p) for p in pieces) <= max_len:
        return "".join(pieces)
    out, used = [], 0
    for piece in pieces:  # cut between pieces, so an escape is never split
        if used + len(piece) > max_len - 1:
            break
        out.append(piece)
        used += len(piece)
    out.append("…")
    return "".join(out)


# ---- numbers and markup -----------------------------------------------------------------------------------
def format_prob(p: float | None) -> str:
    """A probability in a few characters: '0.731', '0.000', '3.2e-05' below 0.001; '–' when missing (None, NaN)."""
    if is_missing(p):
        return "–"
    return f"{p:.3f}" if p >= 0.001 or p == 0 else f"{p:.1e}"


def is_missing(x: Any) -> bool:
    """None, NaN, or pandas' NA (a number a source did not record)."""
    if x is None or type(x).__name__ == "NAType":
        return True
    try:
        return not math.isfinite(float(x))
    except (TypeError, ValueError):
        return True


def format_rank(r: Any) -> str:
    """A 0-based rank as text; '–' when a source did not record it (NA, or -1)."""
    return "–" if is_missing(r) or int(r) < 0 else str(int(r))


def format_number(x: Any, digits: int = 2) -> str:
    """A number such as an entropy with `digits` decimals; '–' when missing."""
    return "–" if is_missing(x) else f"{float(x):.{digits}f}"


def format_bytes(n: int) -> str:
    """A byte count as a reader says it: '1 GiB', '1.5 MiB', '800 B' (a memory budget, what it holds)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


def escape(value: Any) -> str:
    """`value` as text safe inside HTML, attribute values included: every string from the model, the
    tokenizer or the user goes through this before it reaches markup."""
    return html.escape(str(value), quote=True)


def short_processor(name: str) -> str:
    """A logits processor's class name without its 'LogitsWarper'/'LogitsProcessor'/... suffix: 'TopK'."""
    for suffix in ("LogitsWarper", "LogitsProcessor", "Processor", "Warper"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name
