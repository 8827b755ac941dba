"""Trainer: loader replays the teacher's views, resume, export, grader eval, end to end, bad input."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, made_once, run_cli, write_easy_data
from sklearn.metrics import accuracy_score, f1_score

from featurestore import views
from featurestore.demo import write_demo_data
from featurestore.store.reader import StoreReader
from featurestore.store.writer import StoreWriter
from trainer import cli as tcli
from trainer.data import StoreData
from trainer.loader import Loader, LoaderConfig
from trainer.students import IMAGENET_MEAN, IMAGENET_STD

FAST = ["--student", "shufflenet_v2_x0_5", "--image-size", "64", "--batch-size", "16", "--cpu"]
TINY = ["--student", "shufflenet_v2_x0_5", "--image-size", "32", "--batch-size", "16", "--cpu"]   # on small_store


def run_trainer(*args) -> int:
    return tcli.main([str(a) for a in args])


@pytest.fixture(scope="session")
def learn_store(tmp_path_factory) -> Path:
    """300 easy images and 40 unlabelled ones, 4 views, mixing on: learnt far above chance in seconds."""
    def build(root: Path) -> None:
        images = write_easy_data(root / "images", per_class=30, seed=3)
        more = write_easy_data(root / "more", per_class=4, seed=4, flat=True)
        assert run_cli("build", "--images", images, "--unlabeled", more, "--out", root / "s.zarr", "--teacher",
                       "random:tiny", "--views", "4", "--image-size", "96", "--chunk-size", "16", "--patch-grid", "2",
                       "--workers", "0", "--mix-prob", "0.3", "--val-fraction", "0.2") == 0
    return made_once(tmp_path_factory, "learn", build) / "s.zarr"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, learn_store) -> Path:
    def fit(out: Path) -> None:
        assert run_trainer("fit", "--store", learn_store, "--out", out, "--student", "shufflenet_v2_x0_5",
                           "--image-size", "64", "--batch-size", "16", "--epochs", "8", "--lr", "3e-3", "--cpu",
                           "--w-kd", "0.3", "--w-pooled", "0.1", "--w-patches", "0.1", "--ema", "0.9",
                           "--no-unlabeled") == 0
    return made_once(tmp_path_factory, "trained-run", fit)


def _loader(store, ram_gb=8.0, **kw):
    data = StoreData(str(store), "probe", need_pooled=True, need_patches=True, ram_budget_gb=ram_gb)
    idx = np.flatnonzero(data.split >= 0) if kw.pop("labelled_only", False) else np.flatnonzero(data.split != -1)
    seed = kw.pop("seed", 5)
    return data, Loader(data, idx, seed, torch.device("cpu"), LoaderConfig(kw.pop("batch", 8), 48, **kw))


def test_batches_render_exactly_the_views_the_teacher_scored(learn_store):
    data, loader = _loader(learn_store)
    with StoreReader.open(learn_store) as s:
        images, params, logits = s.read("images"), s.read("views/params"), s.read("teachers/siglip/logits/probe")
        pooled, patches, labels = s.read("teachers/siglip/pooled"), s.read("teachers/siglip/patches"), s.read("labels")
    mixed_seen = unlabelled_seen = 0
    for batch in list(loader.epoch(2))[:8]:
        i, k = batch.index.numpy(), batch.view.numpy()
        np.testing.assert_array_equal(batch.logits.numpy(), logits[i, k])
        np.testing.assert_array_equal(batch.pooled["siglip"].numpy(), pooled[i, k].astype(np.float32))
        np.testing.assert_array_equal(batch.patches["siglip"].numpy(), patches[i, k].astype(np.float32))
        np.testing.assert_array_equal(batch.labels.numpy(), labels[i])
        for b in range(len(i)):                           # render each view again, independently
            p = params[i[b], k[b]]
            partner = int(p[views.COL["mix_partner"]])
            srcs = [torch.from_numpy(images[i[b]]).permute(2, 0, 1)]
            if labels[i[b]] < 0:
                unlabelled_seen += 1
                assert batch.targets[b].abs().sum() == 0            # no label, mixed or not
            if partner >= 0:
                srcs.append(torch.from_numpy(images[partner]).permute(2, 0, 1))
                mixed_seen += 1
                assert (labels[partner] < 0) == (labels[i[b]] < 0)   # labelled views mix with labelled ones
                if labels[i[b]] >= 0:
                    lam = p[views.COL["mix_lambda"]]
                    assert batch.targets[b, labels[i[b]]] >= lam - 1e-6
                    assert batch.targets[b].sum().item() == pytest.approx(1.0)
            ref = views.render(srcs, torch.tensor([0]), torch.from_numpy(p[None]), 48,
                               partner_index=torch.tensor([1 if partner >= 0 else -1]))
            ref = (ref - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            torch.testing.assert_close(batch.pixels[b:b + 1], ref)
    assert mixed_seen > 0 and unlabelled_seen > 0


def test_plan_is_a_function_of_seed_and_epoch_with_one_view_per_chunk(learn_store):
    data, a = _loader(learn_store, seed=1)
    _, b = _loader(learn_store, seed=1)
    for e in (0, 3):
        pa, pb = a.plan(e), b.plan(e)
        assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(pa.batches, pb.batches))
    first = np.concatenate([x[0] for x in a.plan(0).batches])
    assert not np.array_equal(first, np.concatenate([x[0] for x in a.plan(1).batches]))
    assert len(set(first)) == len(first)                                  # each image at most once an epoch
    for idx, vw in a.plan(0).batches:                                      # one view index per chunk
        np.testing.assert_array_equal(vw, a.plan(0).chunk_view[idx // data.chunk_size])
    views_used = np.concatenate([p[1] for p in a.plan(0).batches])
    assert len(np.unique(views_used)) > 1                                  # not always the canonical view


def test_streamed_and_in_ram_batches_are_identical(learn_store):
    """The in-RAM fast path and chunk streaming give the same batches for the same (seed, epoch)."""
    ram, lm = _loader(learn_store, ram_gb=8.0, buffer_chunks=2)
    disk, ld = _loader(learn_store, ram_gb=0.0, buffer_chunks=2)
    assert ram.in_memory and not disk.in_memory
    for epoch in (0, 1):
        got = list(zip(lm.epoch(epoch), ld.epoch(epoch)))
        assert len(got) == len(lm) > 10
        for bm, bd in got:
            for name in ("pixels", "labels", "targets", "logits", "pooled", "patches", "index", "view"):
                torch.testing.assert_close(getattr(bm, name), getattr(bd, name), rtol=0, atol=0, msg=name)
    # each window of the order draws from at most buffer_chunks chunks
    order = np.concatenate([p[0] for p in ld.plan(0).batches])
    assert len(np.unique(order[:20] // disk.chunk_size)) <= 2


def test_batch_tensors_are_reused_only_once_released(learn_store):
    """Batches kept by the caller are never written again; batches the caller releases are rendered
    into the same memory next time, and still equal fresh renders."""
    _, loader = _loader(learn_store, ram_gb=0.0, buffer_chunks=2, threads=2)
    kept = list(loader.epoch(0))
    snapshot = [b.pixels.clone() for b in kept]
    assert len({b.pixels.data_ptr() for b in kept}) == len(kept)
    _, fresh = _loader(learn_store, ram_gb=0.0, buffer_chunks=2, threads=2)
    memory = set()
    for b, f in zip(loader.epoch(1), fresh.epoch(1), strict=True):
        memory.add(b.pixels.data_ptr())
        assert torch.equal(b.pixels, f.pixels)
        b.release()
        assert b.pixels is None
    for a, s in zip(kept, snapshot):                            # never released: never written
        assert torch.equal(a.pixels, s)
    assert not memory & {b.pixels.data_ptr() for b in kept}
    assert len(memory) <= loader.depth + 1 < len(loader)      # reused, not one per batch


@pytest.mark.parametrize("ahead", [False, True])
def test_an_epoch_reads_each_chunk_once_and_one_view_of_it(learn_store, monkeypatch, ahead):
    """Count the reads: images once per chunk, each per-view array once per chunk at its planned view.
    ahead: the epoch before read the first window already (read_ahead); the epoch reads only the rest,
    and its batches are those of a loader that never read ahead."""
    data, loader = _loader(learn_store, ram_gb=0.0, buffer_chunks=3)
    if ahead:
        list(loader.epoch(3))                                                # reads epoch 4's first window
        assert loader._ahead is not None and loader._ahead.epoch == 4
        loader._ahead.thread.join()
    reads: list[tuple] = []
    store = data.store
    real_view, real_chunk = store.read_view, store.read_chunk

    def read_view(name, c, k):
        reads.append((name, c, k))
        return real_view(name, c, k)

    def read_chunk(name, c, out=None):
        reads.append((name, c, None))
        return real_chunk(name, c, out)
    monkeypatch.setattr(store, "read_view", read_view)
    monkeypatch.setattr(store, "read_chunk", read_chunk)
    monkeypatch.setattr(store, "read", None)                            # nothing else reads
    batches = list(loader.epoch(4, ahead=False))
    plan = loader.plan(4)
    used = sorted({int(c) for idx, _ in plan.batches for c in np.unique(idx // data.chunk_size)})
    if ahead:
        first = list(dict.fromkeys(int(c) for idx, _ in plan.batches for c in np.unique(idx // data.chunk_size)))[:3]
        used = sorted(set(used) - set(first))
        _, plain = _loader(learn_store, ram_gb=0.0, buffer_chunks=3)
        for a, b in zip(batches, plain.epoch(4, ahead=False), strict=True):
            assert torch.equal(a.pixels, b.pixels) and torch.equal(a.patches["siglip"], b.patches["siglip"])
    for name in ("teachers/siglip/logits/probe", "teachers/siglip/pooled", "teachers/siglip/patches"):
        got = sorted((c, k) for n, c, k in reads if n == name)
        assert got == [(c, int(plan.chunk_view[c])) for c in used], name
    image_reads = sorted(r[1] for r in reads if r[0] == "images")
    assert image_reads == used
    assert len(reads) == len(set(reads)) == 4 * len(used)                # nothing read twice, nothing else read
    assert sum(len(b.index) for b in batches) == len(loader.indices) == plan.images      # every image, once


@pytest.mark.slow(9)
def test_worker_processes_render_the_same_batches(learn_store):
    """Views rendered in worker processes equal those rendered in the loop, batch for batch, streamed,
    across epochs that read ahead; the workers stay up between epochs (streamed equals in RAM: above)."""
    _, threads = _loader(learn_store, ram_gb=0.0, buffer_chunks=2)
    data, procs = _loader(learn_store, ram_gb=0.0, buffer_chunks=2, workers=2)
    assert procs.workers == 2 and not data.in_memory
    try:
        pids = None
        for epoch in (0, 1, 2):
            got = list(zip(threads.epoch(epoch), procs.epoch(epoch), strict=True))
            assert len(got) == len(threads)
            for bt, bp in got:
                assert bp.pixels.is_shared()
                for name in ("pixels", "labels", "targets", "logits", "pooled", "patches", "index", "view"):
                    torch.testing.assert_close(getattr(bt, name), getattr(bp, name), rtol=0, atol=0, msg=name)
            now = [p.pid for p in procs._renderer.pool.procs]
            assert pids in (None, now)
            pids = now
        left = procs.epoch(3)                                      # an epoch left early waits for its jobs
        next(left)
        left.close()
        first = next(iter(procs.epoch(4)))
        torch.testing.assert_close(first.pixels, next(iter(threads.epoch(4))).pixels, rtol=0, atol=0)
    finally:
        procs.close()
    assert procs._renderer is None


def test_render_worker_failures_stop_the_epoch_with_their_error():
    from trainer.render_pool import RenderPool, RenderWorkerError
    pool = RenderPool(1, 16, IMAGENET_MEAN, IMAGENET_STD)
    try:
        out = torch.empty(1, 3, 16, 16).share_memory_()
        images = {0: torch.zeros(2, 20, 20, 3, dtype=torch.uint8).share_memory_()}
        params = torch.from_numpy(views.canonical_params()[None])
        job = pool.submit(images, [(0, 1)], torch.tensor([0]), params, torch.tensor([-1]), out)
        pool.wait(job)
        assert torch.isfinite(out).all()
        bad = pool.submit(images, [(7, 0)], torch.tensor([0]), params, torch.tensor([-1]), out)   # no chunk 7
        with pytest.raises(RenderWorkerError, match="KeyError"):
            pool.wait(bad)
        pool.procs[0].kill()
        pool.procs[0].join()
        late = pool.submit(images, [(0, 1)], torch.tensor([0]), params, torch.tensor([-1]), out)
        with pytest.raises(RenderWorkerError, match="died"):
            pool.wait(late)
    finally:
        pool.close()


def test_worker_processes_fall_back_to_threads_without_shared_memory(learn_store, monkeypatch, capsys):
    import trainer.loader as tl
    from featurestore.common import log
    log.enable()
    monkeypatch.setattr(tl, "_shared_memory_fits", lambda nbytes: False)
    _, loader = _loader(learn_store, workers=2)
    assert "rendering on threads instead of worker processes" in capsys.readouterr().err
    assert loader.workers == 0
    _, threads = _loader(learn_store)
    assert torch.equal(next(iter(loader.epoch(0))).pixels, next(iter(threads.epoch(0))).pixels)


def test_ranks_share_every_image_once_and_take_the_same_number_of_steps(learn_store):
    data, _ = _loader(learn_store)
    idx = np.flatnonzero(data.split >= 0)
    for world in (2, 3):
        ranks = [Loader(data, idx, 0, torch.device("cpu"), LoaderConfig(8, 48), rank=r, world=world)
                 for r in range(world)]
        plans = [r.plan(1) for r in ranks]
        seen = np.concatenate([b[0] for p in plans for b in p.batches])
        np.testing.assert_array_equal(np.sort(seen), idx)                     # every image once, none dropped
        assert len({len(p.batches) for p in plans}) == 1                      # the same steps on every rank
        sizes = [len(b[0]) for p in plans for b in p.batches]
        assert max(sizes) <= 8 and max(sizes) - min(sizes) <= 1


@pytest.mark.slow(20)
def test_resume_equals_uninterrupted(tmp_path, small_store):
    """Killed during a streamed epoch (unlabelled images in the mix), resumed: equal to never stopping.
    The killed run renders in a worker process, which exits with it; the other two render in the loop."""
    import psutil
    args = ["--store", small_store, *TINY, "--epochs", "3", "--ema", "0.9", "--w-dist", "0.5", "--channels-last",
            "--ram-budget-gb", "0", "--buffer-chunks", "2"]
    ref = tmp_path / "ref"
    assert run_trainer("fit", "--out", ref, *args) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "trainer", "fit", "--out", str(out), *map(str, args), "--loader-workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.02)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if "render_pool" in " ".join(c.cmdline()) or "spawn_main" in " ".join(c.cmdline())]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert workers, "no render worker process was running"
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "render workers outlived the killed run"
    done = len(metrics.read_text().splitlines())
    assert 1 <= done < 3
    assert run_trainer("fit", "--out", out, *args, "--resume") == 0
    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
    for key in a["ema"]["module"]:
        torch.testing.assert_close(a["ema"]["module"][key], b["ema"]["module"][key], rtol=0, atol=0, msg=key)
    assert "train_dist" in a["history"][0]

    def strip(h):
        return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "samples_per_s")} for r in h]
    assert strip(a["history"]) == strip(b["history"])


def test_steps_fix_the_length_of_a_run_whatever_its_images(tmp_path, small_store):
    """--steps N: N optimizer steps in all, the last pass cut short, the schedule decayed to 0 at the end."""
    out = tmp_path / "steps"
    assert run_trainer("fit", "--store", small_store, "--out", out, *TINY, "--steps", "7", "--no-unlabeled",
                       "--w-kd", "0", "--w-pooled", "0", "--w-patches", "0") == 0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_pass = history[0]["steps"]
    assert per_pass < 7 and sum(h["steps"] for h in history) == 7
    assert [h["steps"] for h in history] == [per_pass] * (len(history) - 1) + [7 - per_pass * (len(history) - 1)]
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert json.loads((out / "summary.json").read_text())["steps"] == 7


def test_resume_refusal_names_old_and_new_values(tmp_path, learn_store, capsys):
    out = tmp_path / "r"
    args = ["--store", learn_store, *FAST, "--epochs", "1", "--no-unlabeled"]
    assert run_trainer("fit", "--out", out, *args) == 0
    capsys.readouterr()
    assert run_trainer("fit", "--out", out, *args, "--epochs", "2", "--resume", "--lr", "0.01", "--w-kd", "0.5") == 2
    err = capsys.readouterr().err
    assert "loss.kd: stored 1.0, now 0.5" in err and "optim.lr: stored 0.002, now 0.01" in err
    assert "optim.epochs: stored 1, now 2" in err and err.count("\n") == 1


@pytest.mark.slow(17)
def test_end_to_end_learns_well_above_chance(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    # chance is 0.1 with 10 classes; the classes differ by colour, which a student learns in a few epochs
    # (0.95 here on 2 cores): a wiring fault (labels, views or targets misaligned) falls to chance
    assert summary["val_macro_f1"] > 0.6, summary
    assert summary["size_mb"] < 25
    for name in ("curves.png", "confusion.png", "per_class_f1.png", "metrics.jsonl", "config.yaml", "student.json"):
        assert (trained_run / name).is_file(), name
    rows = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"train_ce", "train_kd", "train_pooled", "train_patches"} <= set(rows[0])


def test_export_loads_in_a_fresh_process_and_matches(trained_run, tmp_path):
    from trainer.students import create_student
    sidecar = json.loads((trained_run / "student.json").read_text())
    assert sidecar["classes"][1].startswith("10. Warts") and sidecar["input_size"] == [3, 64, 64]
    assert sidecar["mean"] == pytest.approx(list(IMAGENET_MEAN)) and sidecar["std"] == pytest.approx(list(IMAGENET_STD))
    student = create_student("shufflenet_v2_x0_5", 10)
    student.load_state_dict(torch.load(trained_run / "checkpoints" / "best.pt", weights_only=False)["student"])
    student.eval()
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); x = torch.load(sys.argv[2]); "
            "torch.save((m(x), m(x[:, :, ::2, ::2]), m(torch.zeros(2, 3, 160, 160))), sys.argv[3])")
    r = subprocess.run([sys.executable, "-c", code, str(trained_run / "student.pt"), str(tmp_path / "x.pt"),
                        str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    y, y112, y160 = torch.load(tmp_path / "y.pt")
    assert y.shape == (3, 10) and y112.shape == (3, 10) and y160.shape == (2, 10)
    assert sidecar["resizes_to"] == 64 and sidecar["accepts_any_size"] and sidecar["tta"] == "none"
    with torch.no_grad():                              # the grader's 224 px, resized inside the file to 64 px
        for got, inp in ((y, x), (y112, x[:, :, ::2, ::2])):
            want = student(torch.nn.functional.interpolate(inp, size=[64, 64], mode="bilinear", antialias=True))
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_onnx_export_matches_onnxruntime(trained_run, tmp_path):
    import onnxruntime as ort
    run = shutil.copytree(trained_run, tmp_path / "run")          # the shared run is only read
    assert run_trainer("export", "--run", run, "--format", "onnx") == 0
    session = ort.InferenceSession(str(run / "student.onnx"), providers=["CPUExecutionProvider"])
    m = torch.jit.load(str(run / "student.pt"))
    x = torch.randn(5, 3, 224, 224)                       # the grader's input: resized inside, as student.pt does
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, m(x).detach().numpy(), atol=1e-4, rtol=1e-3)


def test_export_refuses_over_budget(trained_run, tmp_path, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run")
    assert run_trainer("export", "--run", run, "--max-mb", "0.5") == 2
    err = capsys.readouterr().err
    assert "student.pt would be 1." in err and "over the budget of 0.5 MB" in err
    assert (run / "student.pt").read_bytes() == (trained_run / "student.pt").read_bytes()   # the previous export kept


def test_eval_matches_sklearn_on_the_grader_pipeline(trained_run, tmp_path, capsys):
    from PIL import Image
    from torchvision import transforms
    images = write_demo_data(tmp_path / "val", per_class=3, seed=9)
    assert run_trainer("eval", "--model", trained_run / "student.pt", "--images", images, "--json",
                       "--workers", "0") == 0
    got = json.loads(capsys.readouterr().out)
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
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")           # no network: the download is refused at once
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    assert run_trainer("fit", "--store", learn_store, "--out", tmp_path / "r2c", *FAST, "--pretrained") == 2
    err = capsys.readouterr().err
    assert "ImageNet weights for shufflenet_v2_x0_5 are not in the local cache" in err and err.count("\n") == 1
    import shutil
    old = tmp_path / "old.zarr"
    shutil.copytree(learn_store, old)
    import zarr
    zarr.open_group(old, mode="r+").attrs["format_version"] = 1
    assert run_trainer("fit", "--store", old, "--out", tmp_path / "r3", *FAST) == 2
    assert "format_version 1; this kdstore reads versions 2, 3" in capsys.readouterr().err
    zarr.open_group(old, mode="r+").attrs.update({"format_version": 3, "complete": False})
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


def test_pretrained_weights_come_from_the_local_cache(tmp_path, monkeypatch):
    """--pretrained as torchvision does it: a weights file in $TORCH_HOME/hub/checkpoints is used offline."""
    import torchvision

    from trainer.students import create_student
    weights = torchvision.models.get_model_weights("shufflenet_v2_x0_5").DEFAULT
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    ref = torchvision.models.shufflenet_v2_x0_5()
    with torch.no_grad():
        ref.conv1[0].weight.fill_(0.125)                                   # a marker no random init gives
    torch.save(ref.state_dict(), cache / Path(weights.url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    student = create_student("shufflenet_v2_x0_5", 10, pretrained=True)
    assert (student.features[0][0].weight == 0.125).all()
    assert student.head.out_features == 10
    (cache / Path(weights.url).name).write_bytes(b"not a checkpoint")
    from trainer.students import StudentError
    with pytest.raises(StudentError, match="are damaged"):
        create_student("shufflenet_v2_x0_5", 10, pretrained=True)


def test_non_finite_targets_stop_the_run_and_mark_it_failed(tmp_path, learn_store, capsys):
    import shutil
    bad = tmp_path / "nan.zarr"
    shutil.copytree(learn_store, bad)
    with StoreWriter.open(bad) as s:
        a, b = s.reader.chunk_range(2)
        block = s.reader.read("teachers/siglip/logits/probe", a, b)
        block[3, :, 1] = np.nan                                            # every view of store image a + 3
        s.write("teachers/siglip/logits/probe", a, block)
    out = tmp_path / "r"
    args = ["--store", bad, "--out", out, *FAST, "--epochs", "2", "--ram-budget-gb", "0"]
    assert run_trainer("fit", *args) == 2
    err = capsys.readouterr().err
    assert f"teachers/siglip/logits/probe holds non-finite values for store images [{a + 3}]" in err
    assert (out / "FAILED").is_file() and not (out / "student.pt").exists()
    assert run_trainer("fit", *args, "--resume") == 2
    assert "failed and cannot be resumed" in capsys.readouterr().err


def test_export_refuses_non_finite_weights(tmp_path):
    from trainer.exporter import ExportError, export_torchscript
    from trainer.students import create_student
    student = create_student("shufflenet_v2_x0_5", 10)
    with torch.no_grad():
        student.head.weight[0, 0] = float("nan")
    with pytest.raises(ExportError, match="non-finite weights"):
        export_torchscript(student, tmp_path / "s.pt", {"input_size": [3, 64, 64], "classes": list("abcdefghij")})
    assert not (tmp_path / "s.pt").exists()


def test_eval_skips_and_names_unreadable_files(trained_run, tmp_path, capsys):
    images = write_demo_data(tmp_path / "val", per_class=2, seed=11)
    cls = sorted(p.name for p in images.iterdir())[3]
    good = sorted((images / cls).iterdir())[0].read_bytes()
    (images / cls / "truncated.jpg").write_bytes(good[: len(good) // 3] if good[:2] == b"\xff\xd8" else good[:300])
    (images / cls / "notes.jpg").write_text("not an image")
    assert run_trainer("eval", "--model", trained_run / "student.pt", "--images", images, "--workers", "0",
                       "--json") == 0
    m = json.loads(capsys.readouterr().out)
    assert m["num_images"] == 20 and {s["file"] for s in m["skipped"]} == {f"{cls}/truncated.jpg", f"{cls}/notes.jpg"}
    assert run_trainer("eval", "--model", trained_run / "student.pt", "--images", images, "--workers", "2",
                       "--on-bad-image", "fail") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err and ("truncated.jpg" in err or "notes.jpg" in err)


@pytest.mark.slow(16)
def test_sweep_compares_recipes_and_keeps_the_best_run(tmp_path, small_store):
    out = tmp_path / "sweep"
    assert run_trainer("sweep", "--store", small_store, "--out", out, *TINY, "--epochs", "1",
                       "--recipes", "labels,kd+features:labelled,kd-only", "--seeds", "2") == 0
    s = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in s["recipes"]] == ["labels", "kd+features:labelled", "kd-only"]
    for r in s["recipes"]:
        assert set(r) >= {"name", "val_macro_f1_mean", "val_macro_f1_std", "seeds", "seconds"}
        assert r["seeds"] == [0, 1] and r["val_macro_f1_mean"] == pytest.approx(np.mean(r["val_macro_f1"]))
    labels, feats, kd_only = s["recipes"]
    assert labels["loss"]["kd"] == 0 and labels["loss"]["pooled"] == 0 and not labels["unlabeled"]
    assert feats["loss"]["patches"] > 0 and not feats["unlabeled"]
    assert kd_only["loss"]["ce"] == 0 and kd_only["unlabeled"]
    assert s["best"] in {r["name"] for r in s["recipes"]} and 0 <= s["teacher_probe_val_macro_f1"] <= 1
    # every recipe learns equally long: the steps of one pass of the recipe with the most images (kd-only)
    steps = {r["name"]: [json.loads((Path(run) / "summary.json").read_text())["steps"] for run in r["runs"]]
             for r in s["recipes"]}
    most = [h["steps"] for h in map(json.loads, (Path(kd_only["runs"][0]) / "metrics.jsonl").read_text().splitlines())]
    assert len(most) == 1 and all(v == [most[0]] * 2 for v in steps.values()), steps
    assert labels["steps"] == most[0]
    best = max(s["recipes"], key=lambda r: r["val_macro_f1_mean"])
    assert s["best"] == best["name"] and Path(s["best_run"]).parent == out / "runs"
    assert (out / "student.pt").read_bytes() == (Path(s["best_run"]) / "student.pt").read_bytes()
    assert (out / "sweep.png").is_file() and "(best)" in (out / "sweep.md").read_text()
    mtime = (out / "runs" / "labels-s0" / "student.pt").stat().st_mtime
    assert run_trainer("sweep", "--store", small_store, "--out", out, *TINY, "--epochs", "1",   # finished runs reused
                       "--recipes", "labels", "--seeds", "1") == 0
    assert (out / "runs" / "labels-s0" / "student.pt").stat().st_mtime == mtime


@pytest.mark.slow(13)
def test_sweep_search_tunes_with_optuna_and_adds_the_best_trial(tmp_path, small_store):
    out = tmp_path / "search"
    assert run_trainer("sweep", "--store", small_store, "--out", out, *TINY, "--epochs", "1", "--recipes", "labels",
                       "--seeds", "1", "--search", "2") == 0
    s = json.loads((out / "sweep.json").read_text())
    search = next(r for r in s["recipes"] if r["name"] == "search")
    import optuna
    study = optuna.load_study(study_name="kdstore", storage=f"sqlite:///{out / 'search.db'}")
    assert len(study.trials) == 2 and len(list((out / "search").iterdir())) == 2
    assert search["loss"]["temperature"] == pytest.approx(study.best_params["temperature"])
    assert search["optim"]["lr"] == pytest.approx(study.best_params["lr"])


def test_python_api_matches_the_cli(tmp_path, learn_store):
    import trainer
    run = trainer.fit(store=str(learn_store), out=str(tmp_path / "api"), student="shufflenet_v2_x0_5", image_size=64,
                      batch_size=16, cpu=True, epochs=1, progress=False)
    assert run.student.is_file() and 0 <= run.summary["val_macro_f1"] <= 1
    from featurestore.common.options import ConfigError
    with pytest.raises(ConfigError, match="unknown keyword 'epoch'.*did you mean 'epochs'"):
        trainer.fit(store=str(learn_store), out=str(tmp_path / "x"), epoch=3)


@pytest.mark.slow(10)
def test_trainer_fit_never_loads_a_teacher(small_store, tmp_path):
    """A whole `trainer fit` run, not only its imports: no teacher, no transformers, no benchmark code, and
    no scikit-learn (its metrics are computed without it)."""
    code = ("import sys\n"
            "from trainer.cli import main\n"
            f"rc = main(['fit', '--store', {str(small_store)!r}, '--out', {str(tmp_path / 'run')!r}, '--cpu',\n"
            "           '--student', 'shufflenet_v2_x0_5', '--image-size', '32', '--batch-size', '16',\n"
            "           '--steps', '3'])\n"
            "import trainer.evaluate, trainer.exporter, trainer.sweeper\n"
            "loaded = [m for m in ('transformers', 'featurestore.teachers', 'featurestore.pipeline.builder',\n"
            "                    'benchmarks', 'sklearn')\n"
            "          if m in sys.modules]\n"
            "print('RC', rc, 'LOADED', loaded)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "RC 0 LOADED []" in r.stdout, r.stdout + r.stderr
