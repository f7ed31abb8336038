"""PNG plots and image grids, and markdown that shows them inline (Dagster UI, reports)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on workers
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


def line_plot(
    series: Mapping[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    smooth: int = 0,
) -> bytes:
    """PNG of one line per series; a series is ``ys`` or ``(xs, ys)``."""
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    for name, values in series.items():
        xs, ys = values if isinstance(values, tuple) else (range(1, len(values) + 1), values)
        xs, ys = list(xs), list(ys)
        ax.plot(
            xs, ys, label=name, alpha=0.35 if smooth else 1.0, marker="o" if len(ys) < 20 else None
        )
        if smooth and len(ys) > smooth:
            kernel = [
                sum(ys[max(0, i - smooth + 1) : i + 1]) / len(ys[max(0, i - smooth + 1) : i + 1])
                for i in range(len(ys))
            ]
            ax.plot(xs, kernel, label=f"{name} (mean of {smooth})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def image_grid(
    images: Sequence[Image.Image], *, columns: int = 8, cell: int = 64, labels: Sequence[str] = ()
) -> bytes:
    """PNG of images on a grid, each upscaled to ``cell`` px (nearest, to keep pixels crisp)."""
    rows = max(1, -(-len(images) // columns))
    label_height = 12 if labels else 0
    grid = Image.new("RGB", (columns * cell, rows * (cell + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_height)
        grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        if labels:
            draw.text((x + 2, y + cell), labels[i][: cell // 6], fill="black")
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()


def png_of(image: Image.Image, size: int | None = None) -> bytes:
    if size:
        image = image.resize((size, size), Image.NEAREST)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def thumbnail_png(image: Image.Image, size: int = 128) -> bytes:
    """PNG of ``image`` fitted into ``size`` px, aspect kept: photos shrink smoothly, tiny
    images (the miniworld's) grow with nearest-neighbour pixels."""
    image = image.convert("RGB")
    scale = size / max(image.size)
    shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(shape, Image.LANCZOS if scale < 1 else Image.NEAREST)
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")
    return buffer.getvalue()


def markdown_image(png: bytes, alt: str = "") -> str:
    """Markdown that embeds ``png`` inline (the Dagster UI renders data-URI images)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
