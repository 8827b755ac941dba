"""`trainer report --html`: one self-contained page of runs side by side, checked as a file and, where a
Chromium is installed, rendered by it (the DOM after its script ran, and a screenshot)."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from io import BytesIO

import numpy as np
import pytest
from conftest import made_once
from PIL import Image

from trainer import cli as tcli

FIT = ["--student", "shufflenet_v2_x0_5", "--image-size", "32", "--batch-size", "16", "--cpu", "--epochs", "2",
       "--no-unlabeled"]


def run_trainer(*args) -> int:
    return tcli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_store):
    def fit(lr):
        def make(out):
            assert run_trainer("fit", "--store", small_store, "--out", out, *FIT, "--lr", lr) == 0
        return make
    return [made_once(tmp_path_factory, f"report-run-lr{lr}", fit(lr)) for lr in ("0.002", "0.02")]


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.images, self.rows, self._table, self._row = [], [], {}, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "link", "iframe") and (a.get("src") or a.get("href")):
            self.links.append(a.get("src") or a.get("href"))
        if tag == "img":
            self.images.append(a["src"])
        if tag == "table":
            self._table = a.get("id")
            self.rows[self._table] = []
        if tag == "tr":
            self._row = []
        if tag == "td" and self._row is not None:
            self._row.append(a.get("data-value") or "")

    def handle_data(self, data):
        if self._row is not None and self._row and not self._row[-1]:
            self._row[-1] = data.strip()

    def handle_endtag(self, tag):
        if tag == "tr" and self._row:
            self.rows[self._table].append(self._row)
        if tag == "tr":
            self._row = None


def test_the_page_is_one_file_with_every_run_and_the_settings_that_differ(runs, tmp_path):
    out = tmp_path / "report.html"
    assert run_trainer("report", *runs, "--html", out) == 0
    text = out.read_text()
    page = Page()
    page.feed(text)
    assert page.links == [] and not re.search(r"(src|href)=\"(https?:)?//", text)      # nothing fetched
    assert len(page.images) == 3 * len(runs) and all(s.startswith("data:image/png;base64,") for s in page.images)
    for src in page.images:
        Image.open(BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert [r[0] for r in page.rows["runs"]] == [r.name for r in runs]
    for row, run in zip(page.rows["runs"], runs):
        summary = json.loads((run / "summary.json").read_text())
        assert float(row[3]) == pytest.approx(summary["val_macro_f1"])
    differ = {r[0]: r[1:] for r in page.rows["settings"]}
    assert set(differ) == {"optim.lr"} and [float(v) for v in differ["optim.lr"]] == [0.002, 0.02]
    assert len(page.rows["per-class"]) == 10


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt install chromium): the page is checked "
                    "as a file by the test above")
def test_chromium_renders_the_page_and_its_script_sorts_the_runs(runs, tmp_path):
    out = tmp_path / "report.html"
    assert run_trainer("report", *runs, "--html", out) == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"]
    url = f"file://{out}#sort=held_out"
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom and 'data-sorted="held_out:desc"' in dom
    page = Page()
    page.feed(dom)
    shown = [(r[0], float(r[3])) for r in page.rows["runs"]]
    assert {name for name, _ in shown} == {r.name for r in runs}
    assert [f1 for _, f1 in shown] == sorted((f1 for _, f1 in shown), reverse=True)
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, "--window-size=1200,1600", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1600, 1200) and pixels.std() > 10                     # a page drawn, not a blank one
