"""Bad input: every broken or unusual file is converted correctly or skipped with its reason."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, run_cli
from PIL import Image
from test_views import smooth_image

from featurestore.common.options import ConfigError, from_dict
from featurestore.pipeline.config import BuildConfig
from featurestore.pipeline.sources import DatasetError, decode, discover, squash
from featurestore.store.reader import StoreReader


def _jpeg_bytes(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def make_corpus(root: Path) -> dict[str, str]:
    """Two classes of files; returns {relative path: expected reason or conversion}."""
    good, other = root / "a_good", root / "b_other"
    good.mkdir(parents=True)
    other.mkdir(parents=True)
    base = smooth_image(80, 120, seed=7)
    expect = {}
    for j in range(3):
        Image.fromarray(smooth_image(90, 100, seed=j)).save(good / f"ok_{j}.jpg")
        Image.fromarray(smooth_image(70, 60, seed=10 + j)).save(other / f"ok_{j}.png")
    (good / "truncated.jpg").write_bytes(_jpeg_bytes(base)[:800])
    expect["a_good/truncated.jpg"] = "truncated or corrupt"
    (good / "empty.jpg").write_bytes(b"")
    expect["a_good/empty.jpg"] = "empty file"
    (good / "text.jpg").write_text("this is not an image")
    expect["a_good/text.jpg"] = "not an image"
    (good / "notes.txt").write_text("a stray file")
    expect["a_good/notes.txt"] = "not an image file extension"
    Image.fromarray(base).convert("CMYK").save(good / "cmyk.jpg", quality=95)
    expect["a_good/cmyk.jpg"] = "cmyk"
    pal = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(good / "palette.png")
    expect["a_good/palette.png"] = "palette"
    gray16 = (np.linspace(0, 65535, 80 * 120).reshape(80, 120)).astype(np.uint16)
    Image.fromarray(gray16).save(other / "gray16.png")
    expect["b_other/gray16.png"] = "16bit"
    rgba = np.dstack([base, np.full(base.shape[:2], 255, np.uint8)])
    rgba[:40, :, 3] = 0                                      # top half fully transparent
    Image.fromarray(rgba, "RGBA").save(other / "alpha.png")
    expect["b_other/alpha.png"] = "alpha"
    exif = Image.Exif()
    exif[0x0112] = 6                                         # rotate 90 degrees clockwise to display
    (other / "exif.jpg").write_bytes(_jpeg_bytes(base, exif=exif.tobytes()))
    expect["b_other/exif.jpg"] = "exif"
    Image.fromarray(smooth_image(5, 5)).save(other / "tiny.png")
    expect["b_other/tiny.png"] = "too small"
    Image.new("RGB", (3000, 2000), (10, 20, 30)).save(other / "huge.png")
    expect["b_other/huge.png"] = "too large"
    return expect


def test_decode_conversions(tmp_path):
    make_corpus(tmp_path)
    base = smooth_image(80, 120, seed=7).astype(int)
    cmyk = decode(str(tmp_path / "a_good/cmyk.jpg"))
    assert cmyk.notes == ("cmyk",) and np.abs(cmyk.rgb.astype(int) - base).mean() < 6
    g16 = decode(str(tmp_path / "b_other/gray16.png"))
    assert g16.notes == ("16bit",) and g16.rgb[0, 0, 0] == 0 and g16.rgb[-1, -1, 0] == 255
    assert abs(int(g16.rgb[40, 60, 1]) - 128) <= 2
    alpha = decode(str(tmp_path / "b_other/alpha.png"))
    assert (alpha.rgb[:40] == 255).all() and np.array_equal(alpha.rgb[40:], base[40:])
    ex = decode(str(tmp_path / "b_other/exif.jpg"))
    assert ex.notes == ("exif",) and ex.rgb.shape == (120, 80, 3)              # displayed upright
    assert np.abs(ex.rgb.astype(int) - np.rot90(base, -1)).mean() < 4
    pal = decode(str(tmp_path / "a_good/palette.png"))
    assert pal.notes == ("palette",) and np.abs(pal.rgb.astype(int) - base).mean() < 8
    big = decode(str(tmp_path / "b_other/huge.png"), max_side=500)
    assert max(big.rgb.shape[:2]) == 500 and "downscaled" in big.notes


def test_build_skips_bad_files_and_reports_each(tmp_path, capsys):
    expect = make_corpus(tmp_path / "imgs")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("max_pixels: 5000000\n")
    out = tmp_path / "s.zarr"
    assert run_cli("build", "--config", cfg, "--images", tmp_path / "imgs", "--out", out, *SMALL) == 0
    with StoreReader.open(out) as s:
        report = s.attrs["report"]
        skipped = {r["id"]: r["reason"] for r in report["skipped"]}
        for rel, what in expect.items():
            if what in ("cmyk", "palette", "16bit", "alpha", "exif"):
                assert rel in s.ids(), rel
            else:
                assert skipped[rel].startswith(what), (rel, skipped.get(rel))
        assert report["files_found"] == s.num_images + len(skipped) == 17
        for note in ("cmyk", "palette", "16bit", "alpha", "exif"):
            assert report["converted"].get(note, 0) >= 1, note
        i = s.ids().index("b_other/exif.jpg")
        expected = squash(decode(str(tmp_path / "imgs/b_other/exif.jpg"), max_side=256).rgb, 64)
        np.testing.assert_array_equal(s.read("images", i, i + 1)[0], expected)
    assert run_cli("inspect", out) == 0
    text = capsys.readouterr().out
    assert "6 skipped" in text and "too small: 1" in text
    assert "a_good/empty.jpg: empty file (0 bytes)" in text and "b_other/tiny.png: too small" in text   # named


def test_extreme_aspect_ratios_are_noted_in_the_report(tmp_path, capsys):
    root = tmp_path / "imgs"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(smooth_image(60, 70, seed=j)).save(root / name / f"ok_{j}.png")
    Image.fromarray(np.full((10, 1000, 3), 128, np.uint8)).save(root / "a" / "strip.png")     # 100:1
    out = tmp_path / "s.zarr"
    assert run_cli("build", "--images", root, "--out", out, *SMALL) == 0
    with StoreReader.open(out) as s:
        notes = s.attrs["report"]["notes"]
        assert notes == [{"id": "a/strip.png", "note": "extreme aspect 1000x10 squashed to a square"}]
        assert s.attrs["report"]["converted"]["extreme aspect"] == 1
    assert run_cli("inspect", out) == 0
    assert "note       a/strip.png: extreme aspect 1000x10 squashed to a square" in capsys.readouterr().out


def test_on_bad_image_fail_stops_before_teacher_work(tmp_path, capsys):
    make_corpus(tmp_path / "imgs")
    out = tmp_path / "s.zarr"
    assert run_cli("build", "--images", tmp_path / "imgs", "--out", out, *SMALL, "--on-bad-image", "fail") == 2
    err = capsys.readouterr().err
    assert "a_good/truncated.jpg: truncated or corrupt" in err and "a_good/empty.jpg: empty file" in err
    assert not out.exists()


def test_dataset_errors_come_first(tmp_path):
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.fromarray(smooth_image(20, 20)).save(root / "cat" / "x.png")
    with pytest.raises(DatasetError, match=r"class folder .*dog holds no image files"):
        discover(str(root))
    with pytest.raises(DatasetError, match="image folder not found"):
        discover(str(tmp_path / "missing"))
    Image.fromarray(smooth_image(20, 20)).save(root / "dog" / "y.png")
    (tmp_path / "classes.txt").write_text("cat\nbird\n")
    with pytest.raises(DatasetError, match=r"no folder for \['bird'\], no class for folders \['dog'\]"):
        discover(str(root), classes_file=str(tmp_path / "classes.txt"))
    (tmp_path / "m.csv").write_text("path,label\ncat/x.png,cat\ndog/y.png,horse\n")
    (tmp_path / "classes2.txt").write_text("cat\ndog\n")
    with pytest.raises(DatasetError, match=r"m.csv:3: unknown label 'horse'"):
        discover(str(root), str(tmp_path / "m.csv"), str(tmp_path / "classes2.txt"))
    (tmp_path / "bad.csv").write_text("file,class\nx,y\n")
    with pytest.raises(DatasetError, match="columns path,label"):
        discover(str(root), str(tmp_path / "bad.csv"))


def test_dataset_error_through_cli(tmp_path, capsys):
    (tmp_path / "imgs" / "empty_class").mkdir(parents=True)
    assert run_cli("build", "--images", tmp_path / "imgs", "--out", tmp_path / "s.zarr", *SMALL) == 2
    assert "holds no image files" in capsys.readouterr().err


def test_config_rejects_unknown_and_misspelt_keys(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown key 'views.veiws'.*did you mean 'views'"):
        from_dict(BuildConfig, {"views": {"veiws": 3}})
    with pytest.raises(ConfigError, match="views.scale must be a list of 2"):
        from_dict(BuildConfig, {"views": {"scale": 0.5}})
    with pytest.raises(ConfigError, match="workers expects int"):
        from_dict(BuildConfig, {"workers": "many"})
    (tmp_path / "c.yaml").write_text("teacher:\n  idd: random:tiny\n")
    assert run_cli("build", "--config", tmp_path / "c.yaml", "--images", tmp_path, "--out", tmp_path / "s.zarr") == 2
    assert "unknown key 'teacher.idd'" in capsys.readouterr().err
