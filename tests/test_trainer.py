"""Trainer: loader replays the teacher's views, resume, export, grader eval, end to end, bad input."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from conftest import REPO, run_cli, run_module
from featurestore import views
from featurestore.demo import write_demo_data
from featurestore.store import Store
from trainer import cli as tcli
from trainer.loader import IMAGENET_MEAN, IMAGENET_STD, Loader, StoreData

FAST = ["--student", "shufflenet_v2_x0_5", "--image-size", "64", "--batch-size", "16", "--cpu"]


def run_trainer(*args) -> int:
    return tcli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def learn_store(tmp_path_factory) -> Path:
    """300 demo images, 4 views, mixing on: enough to learn from in seconds."""
    root = tmp_path_factory.mktemp("learn")
    images = write_demo_data(root / "images", per_class=30, seed=3)
    out = root / "s.zarr"
    assert run_cli("build", "--images", images, "--out", out, "--teacher", "random:tiny", "--views", "4",
                   "--image-size", "96", "--chunk-size", "16", "--patch-grid", "2", "--workers", "0",
                   "--mix-prob", "0.3", "--val-fraction", "0.2") == 0
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, learn_store) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert run_trainer("fit", "--store", learn_store, "--out", out, "--student", "shufflenet_v2_x0_5",
                       "--image-size", "96", "--batch-size", "16", "--epochs", "14", "--lr", "3e-3", "--cpu",
                       "--w-kd", "0.3", "--w-pooled", "0.1", "--w-patches", "0.1", "--ema", "0.9") == 0
    return out


def test_batches_render_exactly_the_views_the_teacher_scored(learn_store):
    data = StoreData(str(learn_store), "probe", need_pooled=True, need_patches=True)
    loader = Loader(data, np.flatnonzero(data.split >= 0), 8, 48, seed=5, device=torch.device("cpu"), train=True)
    with Store.open(learn_store) as s:
        images, params, logits = s.read("images"), s.read("views/params"), s.read("teacher/logits/probe")
        pooled, patches, labels = s.read("teacher/pooled"), s.read("teacher/patches"), s.read("labels")
    mixed_seen = 0
    for batch in list(loader.epoch(2))[:6]:
        i, k = batch.index.numpy(), batch.view.numpy()
        np.testing.assert_array_equal(batch.logits.numpy(), logits[i, k])
        np.testing.assert_array_equal(batch.pooled.numpy(), pooled[i, k].astype(np.float32))
        np.testing.assert_array_equal(batch.patches.numpy(), patches[i, k].astype(np.float32))
        np.testing.assert_array_equal(batch.labels.numpy(), labels[i])
        for b in range(len(i)):                           # render each view again, independently
            p = params[i[b], k[b]]
            partner = int(p[views.COL["mix_partner"]])
            srcs = [torch.from_numpy(images[i[b]]).permute(2, 0, 1)]
            if partner >= 0:
                srcs.append(torch.from_numpy(images[partner]).permute(2, 0, 1))
                mixed_seen += 1
                lam = p[views.COL["mix_lambda"]]
                assert batch.targets[b, labels[i[b]]] >= lam - 1e-6
                assert batch.targets[b].sum().item() == pytest.approx(1.0)
            ref = views.render(srcs, torch.tensor([0]), torch.from_numpy(p[None]), 48,
                               partner_index=torch.tensor([1 if partner >= 0 else -1]))
            ref = (ref - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            torch.testing.assert_close(batch.pixels[b:b + 1], ref)
    assert mixed_seen > 0


def test_order_is_a_function_of_seed_and_epoch(learn_store):
    data = StoreData(str(learn_store), None, False, False)
    idx = np.flatnonzero(data.split >= 0)
    a = Loader(data, idx, 8, 48, 1, torch.device("cpu"), True)
    b = Loader(data, idx, 8, 48, 1, torch.device("cpu"), True)
    for e in (0, 3):
        pa, pb = a.plan(e), b.plan(e)
        assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(pa, pb))
    assert not np.array_equal(np.concatenate([p[0] for p in a.plan(0)]), np.concatenate([p[0] for p in a.plan(1)]))
    views_used = np.concatenate([p[1] for p in a.plan(0)])
    assert len(np.unique(views_used)) > 1                   # not always the canonical view


def test_streaming_mode_gives_the_same_samples(learn_store):
    """Images not in RAM: chunk-buffered order, same per-sample content as in-memory rendering."""
    mem = StoreData(str(learn_store), "probe", False, False)
    disk = StoreData(str(learn_store), "probe", False, False, ram_budget_gb=0)
    assert mem.in_memory and not disk.in_memory
    idx = np.flatnonzero(mem.split >= 0)
    lm = Loader(mem, idx, 8, 48, 0, torch.device("cpu"), True)
    ld = Loader(disk, idx, 8, 48, 0, torch.device("cpu"), True, buffer_chunks=2)
    plan = ld.plan(0)
    got = np.concatenate([p[0] for p in plan])
    assert len(set(got)) == len(got) and set(got) <= set(idx)
    batch_d = ld.make_batch(*plan[0])
    batch_m = lm.make_batch(*plan[0])
    torch.testing.assert_close(batch_d.pixels, batch_m.pixels)
    # each window of the order draws from at most buffer_chunks chunks
    assert len(np.unique(got[:16] // disk.chunk_size)) <= 2 + 1


def test_resume_equals_uninterrupted(tmp_path, learn_store):
    args = ["--store", learn_store, *FAST, "--epochs", "4", "--ema", "0.9", "--w-dist", "0.5", "--channels-last"]
    ref = tmp_path / "ref"
    assert run_trainer("fit", "--out", ref, *args) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "trainer", "fit", "--out", str(out), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(metrics.read_text().splitlines())
    assert 1 <= done < 4
    assert run_trainer("fit", "--out", out, *args, "--resume") == 0
    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    for key in a["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=0, atol=0, msg=key)
    assert "train_dist" in a["history"][0]

    def strip(h):
        return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "samples_per_s")} for r in h]
    assert strip(a["history"]) == strip(b["history"])


def test_end_to_end_learns_well_above_chance(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    # chance is 0.1 with 10 classes; the random teacher adds little, the labels and views do the work
    assert summary["val_macro_f1"] > 0.25, summary
    assert summary["size_mb"] < 25
    for name in ("curves.png", "confusion.png", "per_class_f1.png", "metrics.jsonl", "config.yaml", "student.json"):
        assert (trained_run / name).is_file(), name
    rows = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 14 and {"train_ce", "train_kd", "train_pooled", "train_patches"} <= set(rows[0])


def test_export_loads_in_a_fresh_process_and_matches(trained_run, tmp_path):
    from trainer.students import create_student
    sidecar = json.loads((trained_run / "student.json").read_text())
    assert sidecar["classes"][1].startswith("10. Warts") and sidecar["input_size"] == [3, 96, 96]
    assert sidecar["mean"] == pytest.approx(list(IMAGENET_MEAN)) and sidecar["std"] == pytest.approx(list(IMAGENET_STD))
    student = create_student("shufflenet_v2_x0_5", 10)
    student.load_state_dict(torch.load(trained_run / "checkpoints" / "best.pt", weights_only=False)["student"])
    student.eval()
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); x = torch.load(sys.argv[2]); "
            "torch.save((m(x), m(torch.zeros(2, 3, 160, 160))), sys.argv[3])")
    r = subprocess.run([sys.executable, "-c", code, str(trained_run / "student.pt"), str(tmp_path / "x.pt"),
                        str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    y, y160 = torch.load(tmp_path / "y.pt")
    assert y.shape == (3, 10) and y160.shape == (2, 10)
    with torch.no_grad():
        torch.testing.assert_close(y, student(x), atol=1e-4, rtol=1e-4)


def test_onnx_export_matches_onnxruntime(trained_run):
    import onnxruntime as ort
    assert run_trainer("export", "--run", trained_run, "--format", "onnx") == 0
    session = ort.InferenceSession(str(trained_run / "student.onnx"), providers=["CPUExecutionProvider"])
    m = torch.jit.load(str(trained_run / "student.pt"))
    x = torch.randn(5, 3, 96, 96)
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, m(x).detach().numpy(), atol=1e-4, rtol=1e-3)


def test_export_refuses_over_budget(trained_run, capsys):
    assert run_trainer("export", "--run", trained_run, "--max-mb", "0.5") == 2
    err = capsys.readouterr().err
    assert "student.pt would be 1." in err and "over the budget of 0.5 MB" in err
    assert (trained_run / "student.pt").is_file()          # the previous export is kept


def test_eval_matches_sklearn_on_the_grader_pipeline(trained_run, tmp_path):
    from PIL import Image
    from torchvision import transforms
    images = write_demo_data(tmp_path / "val", per_class=3, seed=9)
    r = run_module("trainer", "eval", "--model", trained_run / "student.pt", "--images", images, "--json",
                   "--workers", "0")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    # the oracle: the grader's own steps, written out, then scikit-learn
    classes = sorted(p.name for p in images.iterdir())
    tf = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    model = torch.jit.load(str(trained_run / "student.pt"))
    y, pred = [], []
    for c, name in enumerate(classes):
        for f in sorted((images / name).iterdir()):
            with torch.no_grad():
                pred.append(int(model(tf(Image.open(f).convert("RGB"))[None]).argmax()))
            y.append(c)
    assert got["num_images"] == 30
    assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=list(range(10)), zero_division=0))
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert len(got["per_class"]) == 10 and np.array(got["confusion"]).sum() == 30


def test_bad_inputs_fail_clearly(tmp_path, learn_store, trained_run, capsys, monkeypatch):
    assert run_trainer("fit", "--store", tmp_path / "missing.zarr", "--out", tmp_path / "r1", *FAST) == 2
    assert "store not found" in capsys.readouterr().err
    assert run_trainer("fit", "--store", learn_store, "--out", tmp_path / "r2", *FAST, "--student", "resnet9000") == 2
    assert "unknown student 'resnet9000'" in capsys.readouterr().err
    assert run_trainer("fit", "--store", learn_store, "--out", tmp_path / "r2b", *FAST, "--student", "timm:nonet") == 2
    assert "unknown timm model 'nonet'" in capsys.readouterr().err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    assert run_trainer("fit", "--store", learn_store, "--out", tmp_path / "r2c", *FAST, "--pretrained") == 2
    assert "ImageNet weights for shufflenet_v2_x0_5 are not available locally" in capsys.readouterr().err
    import shutil
    old = tmp_path / "old.zarr"
    shutil.copytree(learn_store, old)
    import zarr
    zarr.open_group(old, mode="r+").attrs["format_version"] = 0
    assert run_trainer("fit", "--store", old, "--out", tmp_path / "r3", *FAST) == 2
    assert "format_version 0" in capsys.readouterr().err
    zarr.open_group(old, mode="r+").attrs.update({"format_version": 1, "complete": False})
    assert run_trainer("fit", "--store", old, "--out", tmp_path / "r4", *FAST) == 2
    assert "is not complete" in capsys.readouterr().err
    # eval folder whose classes differ from the model's
    wrong = tmp_path / "wrong"
    for name in ("cats", "dogs"):
        (wrong / name).mkdir(parents=True)
        from PIL import Image
        Image.new("RGB", (30, 30)).save(wrong / name / "a.png")
    assert run_trainer("eval", "--model", trained_run / "student.pt", "--images", wrong, "--workers", "0") == 2
    assert "classes of student.pt and of" in capsys.readouterr().err
    assert run_trainer("fit", "--store", learn_store, "--out", trained_run, *FAST) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err


def test_trainer_never_imports_transformers():
    code = ("import sys, trainer.cli, trainer.fit, trainer.loader, trainer.evaluate, trainer.export, trainer.export_run; "
            "bad = [m for m in ('transformers', 'featurestore.teacher', 'featurestore.build') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
