"""Fonts for figures: token text drawn in any script. A family list with CJK and (monochrome) emoji fallbacks
where installed, a character no installed font has written as `[U+XXXX]` rather than drawn as an empty box,
right-to-left runs put in visual order, and '$' kept from starting mathtext.
"""
from __future__ import annotations

import os
import unicodedata
from functools import lru_cache

from matplotlib.figure import Figure
from matplotlib.text import Text

from .display import token_label

# Sans-serif first, then CJK, then monochrome emoji/symbol fonts; matplotlib (>=3.6) falls back glyph
# by glyph along the list. Colour bitmap emoji fonts (Noto Color Emoji, Apple Color Emoji) are left out
# on purpose: FreeType cannot scale their CBDT/sbix bitmaps for Agg, and drawing them raises.
FONT_FAMILIES = (
    "DejaVu Sans",
    "Noto Sans CJK JP", "Noto Sans CJK SC", "Source Han Sans", "WenQuanYi Zen Hei", "Droid Sans Fallback",
    "Hiragino Sans", "PingFang SC", "Microsoft YaHei", "Arial Unicode MS",
    "Noto Sans", "Noto Sans Hebrew", "Noto Sans Arabic",
    "Symbola", "Noto Emoji", "Segoe UI Emoji", "Segoe UI Symbol", "Noto Sans Symbols 2", "Noto Sans Symbols",
)
MONO_FAMILIES = ("DejaVu Sans Mono",)


# -----------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _font_paths() -> dict[str, str]:
    """Installed families of FONT_FAMILIES -> their file, one family per file, in preference order."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    found: dict[str, str] = {}
    files: set[str] = set()
    for family in FONT_FAMILIES:
        if family not in installed:
            continue
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        except ValueError:
            continue
        file = os.path.realpath(path)  # CJK collections hold several families in one file
        if file not in files:
            files.add(file)
            found[family] = path
    return found


def font_families() -> list[str]:
    """The font family list figures use: installed members of FONT_FAMILIES, best first."""
    return list(_font_paths()) or ["DejaVu Sans"]


@lru_cache(maxsize=1)
def _coverage() -> frozenset[int]:
    """Every code point some font of `font_families()` can draw."""
    from matplotlib.ft2font import FT2Font

    points: set[int] = set()
    for path in _font_paths().values():
        try:
            points.update(FT2Font(path).get_charmap())
        except (OSError, RuntimeError, ValueError):
            continue
    return frozenset(points)


def _drawable(text: str) -> str:
    """`text` with characters no installed font has written as [U+XXXX] (variation selectors dropped)."""
    covered = _coverage()
    if not covered:
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if code in covered or ch in " \t":
            out.append(ch)
        elif 0xFE00 <= code <= 0xFE0F or ch == "\u200d":
            continue  # presentation hints and the zero-width joiner: nothing to draw without them
        else:
            out.append(f"[U+{code:04X}]")
    return "".join(out)


def _visual_order(text: str) -> str:
    """Right-to-left runs (Hebrew, Arabic) reversed for display, as matplotlib lays text out left to
    right; combining marks stay on their letter. (No Arabic joining: letters show in isolated forms.)"""
    if not any(unicodedata.bidirectional(ch) in ("R", "AL") for ch in text):
        return text
    out: list[str] = []
    run: list[list[str]] = []  # clusters: a letter and its combining marks
    pending: list[str] = []  # neutrals after an RTL letter: inside the run only if more RTL follows

    def flush() -> None:
        out.extend(ch for cluster in reversed(run) for ch in cluster)
        out.extend(pending)
        run.clear()
        pending.clear()

    for ch in text:
        kind = unicodedata.bidirectional(ch)
        if kind in ("R", "AL"):
            if pending:
                run.append(list(pending))
                pending.clear()
            run.append([ch])
        elif kind == "NSM" and run and not pending:
            run[-1].append(ch)
        elif run and kind in ("WS", "ON", "CS"):
            pending.append(ch)
        else:
            flush()
            out.append(ch)
    flush()
    return "".join(out)


def label(text: str, max_len: int = 16) -> str:
    """token_label, made drawable by matplotlib: glyphs some font has, right-to-left runs in visual
    order, and '$' never starting mathtext."""
    return _visual_order(_drawable(token_label(text, max_len))).replace("$", r"\$")


def finish(fig: Figure) -> Figure:
    """Give every text the fallback font list (so CJK and emoji draw) and keep TeX off token text."""
    sans, mono = font_families(), [*MONO_FAMILIES, *font_families()]
    for text in fig.findobj(Text):
        family = text.get_fontfamily()
        text.set_fontfamily(mono if family and family[0] in MONO_FAMILIES else sans)
        text.set_usetex(False)
    return fig
