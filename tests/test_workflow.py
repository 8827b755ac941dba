"""Where users work: device and dtype choice for each capability set (each branch run on the CPU),
`plan` before a build, `slim` for the laptop, the Python API."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, run_cli

from featurestore.common import devices
from featurestore.common.devices import Caps
from featurestore.store.reader import StoreReader
from trainer import cli as tcli

FIT = ["--student", "shufflenet_v2_x0_5", "--image-size", "32", "--batch-size", "16", "--cpu", "--epochs", "1"]


@pytest.mark.parametrize("caps,dtype,mp", [
    (Caps("cuda", (7, 5)), torch.float16, "fp16"),          # T4
    (Caps("cuda", (7, 0)), torch.float16, "fp16"),          # V100
    (Caps("cuda", (6, 0)), torch.float16, "fp16"),          # P100
    (Caps("cuda", (8, 0)), torch.bfloat16, "bf16"),         # A100
    (Caps("cuda", (8, 9)), torch.bfloat16, "bf16"),         # L4
    (Caps("cuda", (9, 0)), torch.bfloat16, "bf16"),         # H100
    (Caps("mps"), torch.float16, "fp16"),
    (Caps("cpu"), torch.float32, "no"),
])
def test_auto_dtype_and_mixed_precision_follow_the_capabilities(caps, dtype, mp):
    assert devices.teacher_dtype("auto", caps) == dtype
    assert devices.mixed_precision("auto", caps) == mp
    assert devices.teacher_dtype("float32", caps) == torch.float32 and devices.mixed_precision("no", caps) == "no"
    assert caps.batched_kernels == (caps.type != "cpu")


def test_auto_device_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.pick_device("auto", {"cuda": True, "gpus": 2, "mps": True}) == torch.device("cuda", 1)
    # more ranks than GPUs (two ranks on one GPU): ranks share the GPUs round-robin
    assert devices.pick_device("auto", {"cuda": True, "gpus": 1, "mps": False}) == torch.device("cuda", 0)
    assert devices.pick_device("auto", {"cuda": False, "mps": True}) == torch.device("mps")
    assert devices.pick_device("auto", {"cuda": False, "mps": False}) == torch.device("cpu")
    assert devices.pick_device("cuda:3", {}) == torch.device("cuda", 3)


def test_the_gpu_loader_branch_gives_the_cpu_branch_batches(small_store):
    """Sources stacked and moved as one tensor, the geometry and the colour batched (the GPU branch),
    run on the CPU, give the batches of the per-view CPU branch: the same targets, pixels within the
    one uint8 level the CPU's fixed-point resize rounds to."""
    from trainer.data import StoreData
    from trainer.loader import Loader, LoaderConfig
    data = StoreData(str(small_store), "probe", True, True)
    idx = np.flatnonzero(data.split != -1)
    cpu = Loader(data, idx, 3, torch.device("cpu"), LoaderConfig(8, 40))
    gpu = Loader(data, idx, 3, torch.device("cpu"), LoaderConfig(8, 40), caps=Caps("cuda", (8, 0)))
    level = 1 / 255 / min(cpu.cfg.std)                          # one uint8 level, normalised
    batches = 0
    for a, b in zip(cpu.epoch(1), gpu.epoch(1)):
        gap = (a.pixels - b.pixels).abs()
        assert gap.max() <= 4 * level and gap.mean() < 0.3 * level, (gap.max() / level, gap.mean() / level)
        torch.testing.assert_close(a.targets, b.targets, rtol=0, atol=0)
        batches += 1
    assert batches == len(cpu) > 0


def test_float16_overflow_in_the_teacher_is_reported(tiny_siglip_dir):
    from featurestore.teachers import TeacherError, load_teacher
    t = load_teacher(str(tiny_siglip_dir), device="cpu", dtype="float16")
    x = torch.rand(2, 3, 56, 56)
    pooled, _ = t.encode(x)
    assert torch.isfinite(pooled).all()
    with torch.no_grad():
        t.vision.post_layernorm.weight.mul_(1e6)                      # activations beyond float16's range
    with pytest.raises(TeacherError, match="overflow float16 on cpu.*--dtype float32"):
        t.encode(x)


@pytest.mark.slow(7)
def test_bf16_mixed_precision_trains_on_the_cpu(tmp_path, small_store, monkeypatch):
    """... and --compile hands its mode to torch.compile (the compiler itself is replaced here: a CPU
    compile of the student takes minutes)."""
    # a full-precision run first: the second run in one process must still get its own precision
    assert tcli.main([str(a) for a in ("fit", "--store", small_store, "--out", tmp_path / "fp32", *FIT,
                                       "--mixed-precision", "no")]) == 0
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: modes.append(mode) or model)
    assert tcli.main([str(a) for a in ("fit", "--store", small_store, "--out", tmp_path / "r", *FIT,
                                       "--mixed-precision", "bf16", "--compile", "--compile-mode",
                                       "reduce-overhead")]) == 0
    assert modes == ["reduce-overhead"]
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    from accelerate.state import AcceleratorState
    assert str(AcceleratorState().mixed_precision) == "bf16"


def _disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_plan_predicts_the_store_that_the_same_flags_build(tmp_path, demo_images, unlabeled_images, suffix, capsys):
    out = tmp_path / f"s{suffix}"
    flags = ["--images", demo_images, "--unlabeled", unlabeled_images, "--out", out, *SMALL, "--views", "6"]
    assert run_cli("plan", *flags, "--json") == 0
    p = json.loads(capsys.readouterr().out)
    assert run_cli("build", *flags) == 0
    assert p["num_images"] == 80 and p["unlabeled"] == 20 and p["views"] == 480 and p["views_per_image"] == 6
    actual = _disk(out)
    assert abs(p["store_bytes"] - actual) / actual < 0.05, (p["store_bytes"], actual)
    with StoreReader.open(out) as s:
        for name in ("images", "teachers/siglip/pooled", "teachers/siglip/patches"):
            assert abs(p["fields"][name] - s.stored_bytes(name)) / s.stored_bytes(name) < 0.05, name
        per_view = sum(s.stored_bytes(f.name) for f in s.fields() if f.per_view) / (80 * 6)
    assert abs(p["bytes_per_view"] - per_view) / per_view < 0.05
    assert set(p["gpu_estimates"]) >= {"T4", "V100", "A100", "L4", "H100 SXM"} and p["this_machine"]["views_per_s"] > 0
    t4, h100 = p["gpu_estimates"]["T4"]["seconds"], p["gpu_estimates"]["H100 SXM"]["seconds"]
    assert t4 > h100 > 0
    assert run_cli("plan", *flags) == 0
    out = capsys.readouterr().out
    assert "whole store" in out
    # how many views are enough, next to the store size: 30 passes over 6 views show each 5 times
    assert "views     K = 6: `trainer fit`'s 30 passes show each stored view 5.0 time(s)" in out
    assert out.index("whole store") < out.index("views     K = 6") < out.index("teacher pass, estimated")


def test_plan_counts_the_flops_torch_counts(tiny_siglip_dir):
    """FLOPs per view from the config on the meta device equal FlopCounterMode on the real model (attention
    as matrix products, so that it is counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import SiglipVisionModel

    from featurestore.teachers import SiglipTeacher, describe, eager, flops_per_view, random_config
    for spec in (str(tiny_siglip_dir), "random:tiny"):
        family, config = describe(spec)
        vcfg = family.vision_config(config)
        model = SiglipVisionModel(eager(vcfg)).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(pixel_values=torch.rand(1, 3, vcfg.image_size, vcfg.image_size))
        assert flops_per_view(family, config) == counter.get_total_flops() > 0
    big = flops_per_view(SiglipTeacher, random_config("medsiglip-448"))
    assert 0.95e12 < big < 1.0e12                                        # about 0.98 TFLOP per 448 px view


def test_slim_keeps_what_it_is_told_verifies_and_trains(tmp_path, small_store, capsys):
    dst = tmp_path / "slim.zarr"
    keep = "images,views/params,teachers/siglip/pooled,teachers/siglip/logits/probe"
    assert run_cli("slim", small_store, dst, "--fields", keep) == 0
    assert "verified" in capsys.readouterr().err
    with StoreReader.open(small_store) as s, StoreReader.open(dst) as d:
        assert {f.name for f in d.fields()} == set(keep.split(",")) | {"labels", "split", "ids", "sha256"}
        assert sorted(d.attrs["dropped"]) == ["teachers/siglip/logits/zeroshot", "teachers/siglip/patches"]
        assert d.heads() == ["probe"] and d.small_keys() == s.small_keys()
        for f in d.fields():
            if f.name != "ids":
                np.testing.assert_array_equal(d.read(f.name), s.read(f.name))
        dropped = s.stored_bytes("teachers/siglip/patches") + s.stored_bytes("teachers/siglip/logits/zeroshot")
        full, slim = sum(s.stored_bytes(f.name) for f in s.fields()), sum(d.stored_bytes(f.name) for f in d.fields())
        assert full - slim == pytest.approx(dropped, rel=0.01)
    assert _disk(dst) < _disk(small_store) - 0.9 * dropped
    assert run_cli("verify", dst) == 0
    run = tmp_path / "run"
    assert tcli.main([str(a) for a in ("fit", "--store", dst, "--out", run, *FIT, "--w-patches", "0")]) == 0
    assert (run / "student.pt").is_file()
    assert tcli.main([str(a) for a in ("fit", "--store", dst, "--out", tmp_path / "r2", *FIT,
                                       "--w-patches", "0.5")]) == 2
    assert "holds no teachers/siglip/patches (slimmed away)" in capsys.readouterr().err
    assert run_cli("slim", small_store, tmp_path / "x.zarr", "--fields", "images,teacher/nope") == 2
    assert "has no arrays ['teacher/nope']" in capsys.readouterr().err


def test_slim_to_hdf5_for_a_single_file(tmp_path, small_store):
    dst = tmp_path / "slim.h5"
    assert run_cli("slim", small_store, dst, "--fields", "images,views/params,teachers/siglip/logits/probe") == 0
    with StoreReader.open(dst) as d:
        assert d.backend.kind == "hdf5" and "teachers/siglip/pooled" in d.attrs["dropped"]


def test_python_api_build_inspect_verify_slim(tmp_path, demo_images):
    import featurestore
    store = featurestore.build(images=str(demo_images), out=str(tmp_path / "api.zarr"), teacher="random:tiny",
                               views=2, image_size=48, chunk_size=16, workers=0, folds=2)
    assert store.complete and store.views_per_image == 2
    store.close()
    assert featurestore.inspect(str(tmp_path / "api.zarr"))["num_images"] == 60
    assert featurestore.verify(str(tmp_path / "api.zarr")) == []
    slim = featurestore.slim(str(tmp_path / "api.zarr"), str(tmp_path / "api-slim.zarr"), ["images", "views/params"])
    assert "teachers/siglip/pooled" in slim.attrs["dropped"]
    from featurestore.common.options import ConfigError
    with pytest.raises(ConfigError, match="unknown keyword 'patchgrid'.*did you mean 'patch_grid'"):
        featurestore.build(images=str(demo_images), out=str(tmp_path / "x.zarr"), patchgrid=2)


@pytest.mark.slow(20)
def test_notebooks_run_on_the_demo_data(tmp_path):
    """examples/*.ipynb, executed top to bottom (nbclient) on small demo data with a random teacher: one
    kernel, its namespace cleared between the notebooks, so each must import and define what it uses."""
    import nbformat
    from nbclient import NotebookClient
    repo = Path(__file__).resolve().parents[1]
    env = {"KDSTORE_WORKDIR": str(tmp_path), "KDSTORE_TEACHER": "random:tiny", "KDSTORE_SMALL": "1"}
    os.environ.update(env)
    try:
        build, train = (nbformat.read(repo / "examples" / name, as_version=4)
                        for name in ("build_on_a_gpu_box.ipynb", "train_on_a_laptop.ipynb"))
        forget = ("for _name in [n for n in globals() if not n.startswith('_') and n not in IPYTHON]:\n"
                  "    del globals()[_name]").replace("IPYTHON", repr(("In", "Out", "get_ipython", "exit", "quit")))
        forget += "\nassert 'featurestore' not in globals()"
        build.cells += [nbformat.v4.new_code_cell(forget), *train.cells]
        NotebookClient(build, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for key in env:
            os.environ.pop(key, None)
    assert (tmp_path / "demo.zarr").is_dir() and (tmp_path / "run" / "student.pt").is_file()
    shutil.rmtree(tmp_path / "demo.zarr")


@pytest.mark.slow(7)
def test_the_demo_teacher_is_the_same_on_a_free_and_a_busy_machine(tmp_path):
    """A fixed number of seeded steps, not a time budget: the same weights whatever else the machine does."""
    import subprocess
    import sys

    from featurestore.demo.teacher import train_demo_teacher
    train_demo_teacher(tmp_path / "free", images=100, steps=5, seed=3)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])]     # and the suite's other worker
    try:
        train_demo_teacher(tmp_path / "busy", images=100, steps=5, seed=3)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("free", "busy")]
    assert weights[0] == weights[1]
    assert json.loads((tmp_path / "busy" / "demo_teacher.json").read_text())["steps"] == 5
