"""Draw the documentation's images from the default model with decoderlab's own plots.

    .venv/bin/python tools/doc_images.py [--out docs/img] [--only beam_tree attention_lens]

Writes:
- `beam_tree.png`: `plots.beam_tree` of the beam search on the "Decoding strategies" page;
- `attention_lens.png`: `plots.attention` (every layer, heads averaged) above `plots.lens`, at one step of the
  answer to "What is the capital of France?".

The figures are sized for the documentation's text column (about 750 pixels wide): each is drawn `WIDTH` inches
wide with its text enlarged by `TEXT_SCALE`, and saved at `DPI` dots per inch (twice what the column shows, so the
image stays sharp on a high-density screen). `explorer.png` is a screenshot of the widget taken by the browser test
(`DECODERLAB_UPDATE_DOCS_IMG=1 .venv/bin/python -m pytest tests/test_browser.py`), not drawn here.
"""
from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

import decoderlab as dl
from decoderlab import plots

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 9.0  # inches: drawn at this width, a figure's text keeps a readable size in a 750-pixel column
TEXT_SCALE = 1.4  # the plots' own sizes (7-10 pt) are set for a notebook; a narrower page needs them larger
DPI = 200
PROMPT = "What is the capital of France?"
STEP = 5  # " Paris": the step the attention and the lens are drawn at


def readable(fig: Figure, width: float = WIDTH, height: float | None = None, scale: float = TEXT_SCALE) -> Figure:
    """Resize `fig` to `width` inches (its height in proportion, or `height`) and enlarge its text by `scale`."""
    w, h = fig.get_size_inches()
    for text in fig.findobj(Text):
        text.set_fontsize(text.get_fontsize() * scale)
    fig.set_size_inches(width, height if height is not None else h * width / w)
    return fig


def png(fig: Figure) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08, facecolor="white")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def stack(images: list[Image.Image], gap: int = 40) -> Image.Image:
    """Images one under the other, left-aligned on white."""
    width = max(im.width for im in images)
    out = Image.new("RGB", (width, sum(im.height for im in images) + gap * (len(images) - 1)), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + gap
    return out


def beam_tree(lm: dl.LM) -> Image.Image:
    trace = lm.generate(PROMPT, chat=True, num_beams=4, num_return_sequences=3, max_new_tokens=8, progress=False)
    return png(readable(plots.beam_tree(trace), height=5.2, scale=1.3))


def attention_lens(lm: dl.LM) -> Image.Image:
    trace = lm.generate(PROMPT, chat=True, max_new_tokens=24, record=dl.Record(attention=True, lens=True),
                        progress=False)
    attention = readable(plots.attention(trace, STEP))
    lens = readable(plots.lens(trace, STEP, max_layers=16))
    return stack([png(attention), png(lens)])


IMAGES = {"beam_tree": beam_tree, "attention_lens": attention_lens}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="folder to write into (default docs/img)")
    ap.add_argument("--only", nargs="*", choices=list(IMAGES), default=list(IMAGES), help="images to draw (default all)")
    args = ap.parse_args(argv)
    lm = dl.load()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        image = IMAGES[name](lm)
        path = args.out / f"{name}.png"
        image.save(path, optimize=True)
        print(f"{path}: {image.width} x {image.height}")


if __name__ == "__main__":
    main()
