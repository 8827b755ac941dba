"""Shared fixtures: synthetic images on disk, tiny real SigLIP models saved like hub checkpoints."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from featurestore import cli
from featurestore.demo import write_demo_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# small everywhere: 10 classes x 6 images, 3 views, chunks of 8 (a partial last chunk)
LAYOUT = ["--views", "3", "--image-size", "64", "--chunk-size", "8", "--patch-grid", "2", "--workers", "0",
          "--folds", "2", "--mix-prob", "0.5"]
SMALL = ["--teacher", "random:tiny", *LAYOUT]          # --teacher again would add a second teacher: see LAYOUT


def pytest_collection_modifyitems(items):
    """The slow tests first, longest first: the workers then end together on short tests, where a long
    test collected last would leave one of them idle."""
    def seconds(item) -> float:
        mark = item.get_closest_marker("slow")
        return -mark.args[0] if mark else 0.0
    items.sort(key=seconds)


def run_cli(*args: str) -> int:
    return cli.main([str(a) for a in args])


@contextlib.contextmanager
def build_lock_held(store: Path):
    """Another process holding `store`'s build lock for as long as the block runs; yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from featurestore.common.lock import FileLock\n"
        "with FileLock(sys.argv[1], 'build'):\n print('locked', flush=True); time.sleep(60)"), str(store)],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 300,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


PALETTE = [(220, 40, 40), (40, 180, 40), (40, 60, 220), (230, 200, 30), (200, 40, 200), (30, 200, 210),
           (250, 130, 20), (120, 60, 20), (250, 250, 250), (20, 20, 20)]


def write_easy_data(root: Path, per_class: int, seed: int, flat: bool = False) -> Path:
    """An ImageFolder (the demo's class names) whose classes a small CNN tells apart in a few epochs: a
    disc of one colour per class, at a random place and size, on noisy gray; for tests that check the
    pipeline learns, far from any bar."""
    import numpy as np
    from PIL import Image, ImageDraw

    from featurestore.demo import REFERENCE_CLASSES
    rng = np.random.default_rng(seed)
    for c, name in enumerate(REFERENCE_CLASSES):
        folder = root if flat else root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            side = int(rng.integers(64, 129))
            base = np.clip(128 + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(base)
            r = side * rng.uniform(0.25, 0.4)
            cx, cy = side * rng.uniform(0.35, 0.65, size=2)
            ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=PALETTE[c])
            img.save(folder / f"{'u' if flat else 'img'}_{c}_{j}.{'png' if j % 2 else 'jpg'}")
    return root


def made_once(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """A read-only artefact of the whole run at <run's temp folder>/shared/<name>: the first test process
    to ask makes it (make(path)), the others wait for it and share it (pytest-xdist's workers have one
    parent temp folder). Tests read it and never change it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "shared" / name
    path.parent.mkdir(exist_ok=True)
    done = path.with_name(name + ".done")
    # a lock file of its own, never deleted, so every process locks the same file (a store's build takes
    # and deletes <store>.lock)
    with open(path.with_name(name + ".making"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                       # released when the file closes
        if not done.exists():
            if path.is_dir():                             # left by a process that died making it
                shutil.rmtree(path)
            path.unlink(missing_ok=True)
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory) -> Path:
    return made_once(tmp_path_factory, "demo", lambda p: write_demo_data(p / "images", per_class=6, seed=0)) / "images"


@pytest.fixture(scope="session")
def unlabeled_images(tmp_path_factory) -> Path:
    return made_once(tmp_path_factory, "unlabeled-images",
                     lambda p: write_demo_data(p, per_class=2, seed=7, flat=True))


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, demo_images, unlabeled_images) -> Path:
    """60 labelled and 20 unlabelled images, 3 views, chunks of 8."""
    def build(out: Path) -> None:
        assert run_cli("build", "--images", demo_images, "--unlabeled", unlabeled_images, "--out", out, *SMALL) == 0
    return made_once(tmp_path_factory, "small.zarr", build)


# 15 chunks of 4 images, 8 views: a build slow enough to be stopped part way
SLOW = [*SMALL, "--views", "8", "--chunk-size", "4"]


@pytest.fixture(scope="session")
def slow_reference(tmp_path_factory, demo_images):
    """suffix -> an uninterrupted build with the SLOW flags, made once (the number of decoding workers
    changes nothing in a store)."""
    def build(out: Path) -> None:
        assert run_cli("build", "--images", demo_images, "--out", out, *SLOW, "--workers", "0") == 0

    return lambda suffix: made_once(tmp_path_factory, f"slow-ref{suffix}", build)


# moto's S3 server in a process of its own (requests are served outside the test's GIL, as a real server
# serves them), which stops when the test process ends, however it ends
MOTO = """
import logging, os, time
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
parent = os.getppid()
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("%s:%d" % server.get_host_and_port(), flush=True)
while os.getppid() == parent:
    time.sleep(0.2)
server.stop()
"""


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """An S3 server on the loopback (moto), its bucket, and the environment that points every client at
    it (this process and the commands it starts); stopped at the end."""
    server = subprocess.Popen([sys.executable, "-c", MOTO], stdout=subprocess.PIPE, text=True, cwd=REPO)
    address = server.stdout.readline().strip()
    assert address.startswith("127.0.0.1:"), f"moto's server did not start: {address!r}"
    env = {"AWS_ENDPOINT_URL": f"http://{address}", "AWS_ACCESS_KEY_ID": "kdstore",
           "AWS_SECRET_ACCESS_KEY": "kdstore", "AWS_DEFAULT_REGION": "us-east-1",
           "KDSTORE_CACHE": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("kdstore-test")
    try:
        yield {"bucket": "s3://kdstore-test", "fs": fs, "env": env}
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        s3fs.S3FileSystem.clear_instance_cache()


def tiny_siglip_config():
    from transformers import SiglipConfig
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return SiglipConfig(vision_config=dict(tower, image_size=56, patch_size=14),
                        text_config=dict(tower, vocab_size=128, max_position_embeddings=16,
                                         pad_token_id=0, bos_token_id=2, eos_token_id=2))


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> Path:
    """A real SiglipModel with a tiny config, tokenizer and processor, saved by save_pretrained."""
    import torch
    from transformers import SiglipImageProcessor, SiglipModel

    from featurestore.teachers import char_tokenizer
    out = tmp_path_factory.mktemp("hf") / "tiny-siglip"
    torch.manual_seed(1)
    model = SiglipModel(tiny_siglip_config())
    with torch.no_grad():                   # non-trivial scale and bias, as a trained model has
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.5)
    model.save_pretrained(out)
    char_tokenizer(128).save_pretrained(out)
    SiglipImageProcessor(size={"height": 56, "width": 56}, resample=3, image_mean=[0.5, 0.5, 0.5],
                         image_std=[0.5, 0.5, 0.5]).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_vision_dir(tmp_path_factory) -> Path:
    """A SiglipVisionModel alone (no text tower), as some checkpoints ship."""
    import torch
    from transformers import SiglipImageProcessor, SiglipVisionModel
    out = tmp_path_factory.mktemp("hf") / "tiny-siglip-vision"
    torch.manual_seed(2)
    SiglipVisionModel(tiny_siglip_config().vision_config).save_pretrained(out)
    SiglipImageProcessor(size={"height": 56, "width": 56}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    """A real Dinov2Model with a tiny config and its processor (BitImageProcessor: resize, crop 56),
    saved by save_pretrained: a teacher of another family, with a CLS token and no text tower."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    out = tmp_path_factory.mktemp("hf") / "tiny-dinov2"
    torch.manual_seed(3)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                             image_size=56, patch_size=14)).save_pretrained(out)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, do_center_crop=True,
                      resample=3, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A real CLIPModel with a tiny config (projection 24 wide, hidden 32), its processor and an offline
    tokenizer, saved by save_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from featurestore.teachers import char_tokenizer
    out = tmp_path_factory.mktemp("hf") / "tiny-clip"
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    torch.manual_seed(4)
    model = CLIPModel(CLIPConfig(text_config=dict(tower, vocab_size=128, max_position_embeddings=16, pad_token_id=0,
                                                  bos_token_id=1, eos_token_id=2),
                                 vision_config=dict(tower, image_size=56, patch_size=14), projection_dim=24))
    model.save_pretrained(out)
    char_tokenizer(128).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, resample=3,
                       image_mean=[0.481, 0.458, 0.408], image_std=[0.269, 0.261, 0.276]).save_pretrained(out)
    return out
