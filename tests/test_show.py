"""`featurestore show`: the picture holds, cell for cell, the stored image with one box per view and
each view as the trainer renders it; bad requests are one line."""
from __future__ import annotations

import numpy as np
import torch
from conftest import run_cli
from PIL import Image

from featurestore import views
from featurestore.store.reader import StoreReader
from featurestore.views.show import Layout, box_colour, render_views


def test_the_picture_holds_each_view_as_the_trainer_renders_it_and_a_box_per_view(small_store, tmp_path):
    out = tmp_path / "views.png"
    shown = [0, 5, 9]
    assert run_cli("show", small_store, "--images", ",".join(map(str, shown)), "--out", out, "--size", "48") == 0
    pic = np.asarray(Image.open(out).convert("RGB"))
    with StoreReader.open(small_store) as s:
        k = s.views_per_image
        lay = Layout(len(shown), k, 48, 3)
        assert pic.shape == (lay.size[1], lay.size[0], 3)
        for row, i in enumerate(shown):
            params = torch.from_numpy(s.read("views/params", i, i + 1)[0])
            partners = [int(p) for p in params[:, views.COL["mix_partner"]].tolist()]
            src = torch.from_numpy(s.read("images")).permute(0, 3, 1, 2)          # every store image, by index
            trainer = (views.render(src, torch.full((k,), i), params, 48, "bilinear", torch.tensor(partners))
                       .clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            np.testing.assert_array_equal(render_views(s, i, 48, list(range(k))), trainer)
            for v in range(k):
                x, y = lay.view(row, v)
                np.testing.assert_array_equal(pic[y:y + 48, x:x + 48], trainer[v], err_msg=f"image {i} view {v}")
            x, y = lay.original(row)
            cell = pic[y:y + 48, x:x + 48].reshape(-1, 3)
            for v in range(k):                                  # the box of every view, in its own colour
                assert (cell == box_colour(v)).all(1).any(), f"image {i}: no box of view {v}"


def test_show_refuses_what_it_cannot_draw_in_one_line(small_store, tmp_path, capsys):
    assert run_cli("show", small_store, "--images", "100000", "--out", tmp_path / "a.png") == 2
    assert "there is no image 100000" in capsys.readouterr().err
    assert run_cli("show", small_store, "--images", "0", "--out", tmp_path / "a.png", "--head", "spread") == 2
    assert run_cli("show", small_store, "--images", "0", "--out", tmp_path / "a.png", "--teacher", "dino") == 2
    assert not (tmp_path / "a.png").exists()
