"""Draw a terminal capture (``tmux capture-pane -p`` text) as a PNG, in a monospace font.

    .venv/bin/python docs/terminal_png.py docs/images/run-terminal.txt docs/images/run-terminal.png
"""

import sys
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont

FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansMono.ttf"  # ships with matplotlib


def render(text: str, size: int = 15, pad: int = 14) -> Image.Image:
    lines = text.rstrip("\n").split("\n")
    font = ImageFont.truetype(str(FONT), size)
    cell_w = font.getlength("M")
    cell_h = int(size * 1.35)
    cols = max(len(line) for line in lines)
    img = Image.new("RGB", (int(cols * cell_w) + 2 * pad, len(lines) * cell_h + 2 * pad), (30, 30, 30))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * cell_h), line, font=font, fill=(225, 225, 225))
    return img


if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    render(Path(src).read_text(encoding="utf-8")).save(dst, optimize=True)
