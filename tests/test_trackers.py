"""`trainer fit --logger`: one run logged to CSV, TensorBoard, MLflow (a real SQLite tracking database)
and W&B (offline), each read back with the tracker's own reader; a resumed run continues the same
tracker runs; a tracker that is not installed or unknown is one line before any work."""
from __future__ import annotations

import csv
import glob
import json
import struct
from pathlib import Path

import pytest
from conftest import SMALL, made_once, run_cli

from trainer import cli as tcli

FIT = ["--student", "shufflenet_v2_x0_5", "--image-size", "32", "--batch-size", "16", "--cpu", "--epochs", "2",
       "--log-every", "2", "--no-unlabeled"]


def run_trainer(*args) -> int:
    return tcli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, demo_images, monkeypatch_module):
    root = tmp_path_factory.mktemp("tracked")
    store = made_once(tmp_path_factory, "tracked.zarr", lambda p: run_cli(
        "build", "--images", demo_images, "--out", p, *SMALL))
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch_module.setenv("WANDB_MODE", "offline")
    monkeypatch_module.setenv("WANDB_SILENT", "true")
    monkeypatch_module.chdir(root)
    run = root / "run"
    assert run_trainer("fit", "--store", store, "--out", run, *FIT, "--logger", "csv,tensorboard,mlflow,wandb",
                       "--tracker-project", "derm", "--run-name", "first") == 0
    return run, store, root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


def _history(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_csv_holds_every_epoch_row_and_the_final_score(tracked):
    run, _, _ = tracked
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    history = _history(run)
    for h in history:
        epoch_rows = {r["name"]: float(r["value"]) for r in rows if r["epoch"] == str(h["epoch"])}
        assert epoch_rows["train_loss"] == pytest.approx(h["train_loss"])
        assert epoch_rows["val_macro_f1"] == pytest.approx(h["val_macro_f1"])
    final = {r["name"]: float(r["value"]) for r in rows if r["step"] == "-1"}
    summary = json.loads((run / "summary.json").read_text())
    assert final["final/val_macro_f1"] == pytest.approx(summary["val_macro_f1"])
    assert final["final/size_mb"] == pytest.approx(summary["size_mb"])
    assert any(r["name"] == "step/loss" for r in rows)


def test_tensorboard_events_read_back_with_tensorboards_reader(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _, _ = tracked
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    history = _history(run)
    f1 = [e.value for e in acc.Scalars("val_macro_f1")]
    assert f1 == pytest.approx([h["val_macro_f1"] for h in history])
    assert len(acc.Scalars("step/loss")) >= 2 and "train_kd" in tags["scalars"]
    assert {"curves", "confusion", "per_class_f1"} <= set(tags["images"])
    assert "config/text_summary" in tags["tensors"]


def test_mlflow_run_in_a_sqlite_database_reads_back_with_search_runs(tracked):
    import mlflow
    run, _, root = tracked
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=["derm"], output_format="list")
    assert len(found) == 1
    r = found[0]
    summary = json.loads((run / "summary.json").read_text())
    assert r.info.run_name == "first" and r.info.status == "FINISHED"
    assert r.data.metrics["final/val_macro_f1"] == pytest.approx(summary["val_macro_f1"])
    assert r.data.params["optim.batch_size"] == "16" and r.data.params["student"] == "shufflenet_v2_x0_5"
    assert r.data.tags["seed"] == "0"
    history = mlflow.MlflowClient().get_metric_history(r.info.run_id, "val_macro_f1")
    assert [m.value for m in history] == pytest.approx([h["val_macro_f1"] for h in _history(run)])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)}
    assert {"curves.png", "confusion.png", "summary.json"} <= artifacts


def _wandb_records(run_dir):
    """The records of an offline W&B run file (LevelDB-style log blocks of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))[0]).read_bytes()
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if n == 0 and kind == 0:
            pos += left - 7
            continue
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):                                 # a whole record, or the last piece of one
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_history_and_the_summary(tracked):
    run, _, _ = tracked
    records = _wandb_records(run)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    f1 = [h["val_macro_f1"] for h in history if "val_macro_f1" in h]
    assert f1 == pytest.approx([h["val_macro_f1"] for h in _history(run)])
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary |= {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update}
    assert summary["final/val_macro_f1"] == pytest.approx(json.loads((run / "summary.json").read_text())
                                                          ["val_macro_f1"])
    config = next(r.run.config for r in records if r.WhichOneof("record_type") == "run")
    keys = {u.key for u in config.update}
    assert {"optim.lr", "student", "loss.kd"} <= keys


def test_a_resumed_run_continues_the_same_tracker_run(tracked, tmp_path, monkeypatch):
    import mlflow
    _, store, _ = tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")          # over what an earlier test set in-process
    out = tmp_path / "r"
    assert run_trainer("fit", "--store", store, "--out", out, *FIT, "--logger", "mlflow,csv") == 0
    first = json.loads((out / "trackers.json").read_text())["mlflow"]
    (out / "student.pt").unlink()                                   # as if killed while exporting
    assert run_trainer("fit", "--store", store, "--out", out, *FIT, "--logger", "mlflow,csv", "--resume") == 0
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == first
    found = mlflow.search_runs(experiment_names=["kdstore"], output_format="list")
    assert [r.info.run_id for r in found] == [first] and found[0].info.status == "FINISHED"
    assert len(mlflow.MlflowClient().get_metric_history(first, "val_macro_f1")) == 2


def test_an_unknown_or_missing_tracker_is_one_line_before_any_work(small_store, tmp_path, capsys, monkeypatch):
    assert run_trainer("fit", "--store", small_store, "--out", tmp_path / "a", *FIT, "--logger", "neptune") == 2
    assert "unknown logger 'neptune'" in capsys.readouterr().err
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert run_trainer("fit", "--store", small_store, "--out", tmp_path / "b", *FIT, "--logger", "wandb") == 2
    assert "pip install 'kdstore[track]'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
