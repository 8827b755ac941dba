"""`featurestore show`: a picture of what the teacher saw.

One row per image: the stored image with each view's crop box drawn on it (view k in colour k), then
the views themselves, rendered from the stored image by the renderer the trainer replays them with
(the same crops, flips, rotations, colour and mixing, bilinear, at --size), and under each view its
flips and mixing and the teacher's top classes with their probabilities (the softmax of the stored
logits of one head). Drawn pixel for pixel with PIL, so every cell of the picture holds exactly what
`layout` says it holds.
"""
from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from featurestore import views
from featurestore.common.errors import KdstoreError
from featurestore.store.reader import StoreReader

PAD, LINE = 8, 12                     # pixels between cells; the height of a line of text
BACKGROUND, INK, RIGHT, WRONG = (255, 255, 255), (20, 20, 20), (0, 110, 40), (190, 20, 20)


def box_colour(k: int) -> tuple[int, int, int]:
    """View k's colour: evenly spaced hues, saturated (never the background, never the ink)."""
    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.9, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


@dataclass(frozen=True)
class Layout:
    """Where each cell lies in the picture: row i holds image i's original at `original(i)` and its views
    at `view(i, k)`, each a square of `cell` pixels (top-left corner, x then y)."""
    rows: int
    views: int
    cell: int
    top: int                          # lines of text under each view

    @property
    def header(self) -> int:
        return LINE + 4

    @property
    def row_height(self) -> int:
        return self.header + self.cell + (self.top + 1) * LINE + PAD

    @property
    def size(self) -> tuple[int, int]:
        return PAD + (self.views + 1) * (self.cell + PAD), PAD + self.rows * self.row_height

    def original(self, i: int) -> tuple[int, int]:
        return PAD, PAD + i * self.row_height + self.header

    def view(self, i: int, k: int) -> tuple[int, int]:
        return PAD + (k + 1) * (self.cell + PAD), PAD + i * self.row_height + self.header


def render_views(store: StoreReader, i: int, size: int, ks: list[int]) -> np.ndarray:
    """Views ks of store image i as the trainer renders them (bilinear, from the stored image, the mix
    partner from the same store): uint8 (len(ks), size, size, 3)."""
    params = torch.from_numpy(store.read("views/params", i, i + 1)[0][ks])          # (V, P)
    partner = params[:, views.COL["mix_partner"]].long()
    rows = [i] + sorted({int(p) for p in partner.tolist() if p >= 0})
    images = store.read_rows("images", np.asarray(rows))
    sources = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    where = {r: j for j, r in enumerate(rows)}
    index = torch.zeros(len(ks), dtype=torch.long)
    partner_index = torch.tensor([where.get(int(p), -1) if p >= 0 else -1 for p in partner.tolist()])
    x = views.render(sources, index, params, size, "bilinear", partner_index)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def short_name(name: str) -> str:
    """A class name without a leading number or a trailing image count (`2. Melanoma 15.75k` -> `Melanoma`)."""
    name = re.sub(r"^\s*\d+[.)]\s*", "", name)
    return re.sub(r"\s+[\d.]+k?\s*$", "", name).strip() or name


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def _what(p: np.ndarray) -> str:
    c = views.COL
    parts = []
    if p[c["hflip"]]:
        parts.append("hflip")
    if p[c["vflip"]]:
        parts.append("vflip")
    if p[c["rot90"]]:
        parts.append(f"rot{int(p[c['rot90']]) * 90}")
    mode = int(p[c["mix_mode"]])
    if mode:
        parts.append(f"{'mixup' if mode == views.MIX_MIXUP else 'cutmix'} {p[c['mix_lambda']]:.2f}")
    return " ".join(parts)


def show(path: str, images: list[int], out: str | Path, teacher: str | None = None, head: str | None = None,
         size: int = 128, top: int = 3, max_views: int = 16, storage_options: dict | None = None) -> dict:
    """Write the picture of `images` (store indices) to `out` (PNG); returns what it shows: the layout and,
    per image, its id, label and each shown view's teacher probabilities."""
    if not images:
        raise KdstoreError("give the store images to show, e.g. --images 0,5,9")
    with StoreReader.open(path, storage_options) as s:
        bad = [i for i in images if not 0 <= i < s.num_images]
        if bad:
            raise KdstoreError(f"{path} holds images 0..{s.num_images - 1}; there is no image {bad[0]}")
        t = s.teacher(teacher)
        head = head or ("probe" if "probe" in t.heads else t.heads[0])
        if head not in t.heads:
            raise KdstoreError(f"{path}: teacher {t.name} has no {head!r} head; it has {', '.join(t.heads)}")
        present = {f.name for f in s.fields()}
        for name in ("images", "views/params", t.logits(head)):
            if name not in present:
                raise KdstoreError(f"{path} holds no {name} (slimmed away): show needs the images, the view "
                                   "params and the teacher's logits")
        ks = list(range(min(s.views_per_image, max_views)))
        lay = Layout(len(images), len(ks), size, top)
        canvas = Image.new("RGB", lay.size, BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        classes, labels, ids = s.classes, s.read("labels"), s.ids()
        record = {"store": str(path), "teacher": t.name, "head": head, "views": ks, "cell": size,
                  "size": list(lay.size), "images": []}
        for row, i in enumerate(images):
            stored = s.read_rows("images", np.asarray([i]))[0]
            params = s.read("views/params", i, i + 1)[0][ks]
            logits = torch.from_numpy(s.read(t.logits(head), i, i + 1)[0][ks].astype(np.float32))
            probs = torch.softmax(logits, -1).numpy()
            label = classes[labels[i]] if labels[i] >= 0 else "unlabelled"
            x0, y0 = lay.original(row)
            draw.text((x0, y0 - lay.header), _fit(draw, f"#{i} {ids[i]}  ({short_name(label)})", font,
                                                 lay.size[0] - 2 * PAD), fill=INK, font=font)
            canvas.paste(Image.fromarray(stored).resize((size, size), Image.BILINEAR), (x0, y0))
            for k in ks:
                y_a, x_a, y_b, x_b = (float(v) for v in params[k, [views.COL[n] for n in ("y0", "x0", "y1", "x1")]])
                box = [x0 + x_a * (size - 1), y0 + y_a * (size - 1), x0 + x_b * (size - 1), y0 + y_b * (size - 1)]
                draw.rectangle(box, outline=box_colour(k), width=2 if k else 1)
            rendered = render_views(s, i, size, ks)
            shown = []
            for j, k in enumerate(ks):
                x, y = lay.view(row, k)
                canvas.paste(Image.fromarray(rendered[j]), (x, y))
                draw.rectangle([x, y + size, x + size - 1, y + size + 2], fill=box_colour(k))
                draw.text((x, y + size + 3), _fit(draw, f"{k} {_what(params[j])}", font, size), fill=INK, font=font)
                best = np.argsort(-probs[j])[:top]
                for n, c in enumerate(best):                         # the label's class: green; another first: red
                    ink = RIGHT if c == labels[i] else WRONG if n == 0 and labels[i] >= 0 else INK
                    draw.text((x, y + size + 3 + (n + 1) * LINE),
                              _fit(draw, f"{probs[j, c]:.2f} {short_name(classes[c])}", font, size), fill=ink,
                              font=font)
                shown.append({"view": k, "top": [[classes[c], float(probs[j, c])] for c in best]})
            record["images"].append({"index": i, "id": ids[i], "label": label, "views": shown})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return record
