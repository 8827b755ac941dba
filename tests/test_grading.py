"""The score users are judged by: the grader's number is the trainer's number. A student trained at any
resolution is graded as it was trained; held-out images are scored the way the grader scores the exported
file; the imbalance-aware terms, the logit bias, TTA and ensembles do what they say."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import made_once, run_cli, write_easy_data
from test_trainer import learn_store, trained_run  # noqa: F401 - shared fixtures

from trainer import cli as tcli

FIT = ["--student", "shufflenet_v2_x0_5", "--batch-size", "16", "--cpu"]


def run_trainer(*args) -> int:
    return tcli.main([str(a) for a in args])


@pytest.fixture(scope="session")
def fresh_easy(tmp_path_factory) -> Path:
    """Images no run saw, of the easy classes the learn store holds."""
    return made_once(tmp_path_factory, "fresh-easy", lambda p: write_easy_data(p, per_class=20, seed=11))


def test_a_student_trained_at_64_px_is_graded_at_224_as_at_64(trained_run, fresh_easy, capsys):  # noqa: F811
    """The grader feeds 224 px; a student trained at 64 px resizes it inside the exported file, so its
    grade is what it scores at the size it learnt (an earlier export scored 0.025 at 224 and 0.779 at 64)."""
    scores = {}
    for size in (224, 64):
        assert run_trainer("eval", "--model", trained_run / "student.pt", "--images", fresh_easy, "--json",
                           "--workers", "0", "--image-size", size) == 0
        scores[size] = json.loads(capsys.readouterr().out)["macro_f1"]
    assert scores[64] > 0.6, scores                       # learnt: the comparison below means something
    assert abs(scores[224] - scores[64]) <= 0.03, scores


def test_the_held_out_figure_is_the_exported_files_score(trained_run, learn_store):  # noqa: F811
    from trainer.data import StoreData
    from trainer.evaluate import evaluate_held_out, load_model
    summary = json.loads((trained_run / "summary.json").read_text())
    data = StoreData(str(learn_store), None, False, False)
    try:
        held = np.flatnonzero(data.split == -1)
        m = evaluate_held_out(load_model(trained_run / "student.pt"), data, held, 224)
    finally:
        data.close()
    assert summary["val_scored"] == "student.pt at 224 px" and summary["val_images"] == len(held) == 60
    assert summary["val_macro_f1"] == m["macro_f1"] and summary["val_meaningful"]
    assert json.loads((trained_run / "held_out.json").read_text())["macro_f1"] == m["macro_f1"]


def test_too_few_held_out_images_export_the_last_epoch_and_say_so(tmp_path, small_store, capsys):
    out = tmp_path / "run"
    assert run_trainer("fit", "--store", small_store, "--out", out, *FIT, "--image-size", "32", "--epochs", "2",
                       "--calibrate", "bias") == 0
    err = capsys.readouterr().err
    assert "the held-out split has 10 images (1 of the rarest class, under 5): too few to choose an epoch" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] == 2 and summary["selection"].startswith("the held-out split has 10 images")
    assert summary["calibration"]["applied"] is False and not summary["val_meaningful"]
    assert run_trainer("report", out) == 0
    assert "too few images to mean much" in capsys.readouterr().out


# ---- the logit bias -----------------------------------------------------------------------------
def biased_logits(n: int, seed: int, shift: float):
    """Logits of a 4-class problem whose class 3 is under-predicted by `shift`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    logits = rng.normal(0, 1, (n, 4)) + 2.5 * np.eye(4)[labels]
    logits[:, 3] -= shift
    return logits.astype(np.float32), labels


def test_the_logit_bias_raises_macro_f1_where_a_class_is_under_predicted_and_is_left_out_where_not():
    from sklearn.metrics import f1_score

    from trainer.calibration import choose_bias, fit_bias, macro_f1
    logits, labels = biased_logits(400, 0, shift=2.0)
    bias = fit_bias(logits, labels)
    before = f1_score(labels, logits.argmax(1), average="macro")
    after = f1_score(labels, (logits + bias).argmax(1), average="macro")          # scikit-learn as the oracle
    assert after == pytest.approx(macro_f1(labels, (logits + bias).argmax(1), 4)) and after > before + 0.05
    assert bias[3] - bias[:3].mean() > 1.0                                         # it lifts the starved class
    choice = choose_bias(logits, labels)
    assert choice.applied and choice.f1_with > choice.f1_without
    fresh, fresh_labels = biased_logits(400, 1, shift=2.0)                          # and on images it never saw
    assert f1_score(fresh_labels, (fresh + choice.bias).argmax(1), average="macro") > \
        f1_score(fresh_labels, fresh.argmax(1), average="macro") + 0.05
    fair, fair_labels = biased_logits(60, 2, shift=0.0)
    none = choose_bias(fair, fair_labels)
    assert none.applied == (none.f1_with > none.f1_without)
    assert none.applied or not none.bias.any()


def test_logit_adjusted_cross_entropy_is_the_cross_entropy_of_the_adjusted_logits():
    from trainer.calibration import class_prior
    from trainer.terms import LossWeights, total_loss
    g = torch.Generator().manual_seed(0)
    s, labels = torch.randn(8, 3, generator=g), torch.tensor([0, 1, 2, 0, 0, 0, 1, 0])
    prior = class_prior(labels.numpy(), 3)
    log_prior = torch.from_numpy(np.log(prior)).float()
    w = LossWeights(kd=0, pooled=0, label_smoothing=0.0, logit_adjust=1.5)
    targets = torch.nn.functional.one_hot(labels, 3).float()
    loss, parts = total_loss(w, s, targets, torch.ones(8, dtype=torch.bool), None, log_prior=log_prior)
    want = torch.nn.functional.cross_entropy(s + 1.5 * log_prior, labels)           # Menon et al. 2021, eq. 11
    torch.testing.assert_close(parts["ce"], want)
    plain, _ = total_loss(LossWeights(kd=0, pooled=0, label_smoothing=0.0), s, targets, torch.ones(8, dtype=torch.bool),
                          None, log_prior=log_prior)
    torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(s, labels))


def test_balanced_sampling_draws_each_class_equally_often_at_the_same_steps():
    from trainer.plan import plan_epoch
    from trainer.training import balanced_weights
    labels = np.array([0] * 80 + [1] * 15 + [2] * 5 + [-1] * 20)                  # 16x imbalance and unlabelled
    idx = np.arange(len(labels))
    prior = np.bincount(labels[labels >= 0], minlength=3) / (labels >= 0).sum()
    weights = balanced_weights(labels, idx, prior)
    drawn = np.concatenate([np.concatenate([b for b, _ in plan_epoch(idx, 8, len(labels), 2, 0, e, 10, 4,
                                                                     weights=weights).batches]) for e in range(20)])
    counts = np.bincount(labels[drawn][labels[drawn] >= 0], minlength=3)
    assert counts.min() / counts.max() > 0.8, counts
    uniform = plan_epoch(idx, 8, len(labels), 2, 0, 0, 10, 4)
    again = plan_epoch(idx, 8, len(labels), 2, 0, 0, 10, 4, weights=weights)
    assert len(uniform.batches) == len(again.batches) == 12                        # the epoch keeps its length
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(again.batches, plan_epoch(
        idx, 8, len(labels), 2, 0, 0, 10, 4, weights=weights).batches))           # a pure function of the seed


@pytest.mark.slow(8)
def test_tta_bias_and_an_ensemble_are_in_the_file_the_grader_loads(tmp_path, learn_store, trained_run,  # noqa: F811
                                                                   capsys):
    out = tmp_path / "tta"
    assert run_trainer("fit", "--store", learn_store, "--out", out, *FIT, "--image-size", "48", "--epochs", "2",
                       "--tta", "flip", "--calibrate", "bias", "--no-unlabeled", "--seed", "1") == 0
    side = json.loads((out / "student.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert side["tta"] == "flip" and side["resizes_to"] == 48 and summary["calibration"]["applied"] in (True, False)
    assert side["logit_bias"] == pytest.approx(summary["calibration"]["bias"])
    from trainer.exporter import run_module
    module, _ = run_module(out)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    m = torch.jit.load(str(out / "student.pt"))
    with torch.no_grad():
        small = torch.nn.functional.interpolate(x, size=[48, 48], mode="bilinear", antialias=True)
        small = small * module.scale + module.shift
        want = (module.student(small) + module.student(small.flip(-1))) / 2 + torch.tensor(side["logit_bias"])
        torch.testing.assert_close(m(x), want, atol=1e-4, rtol=1e-4)
    ensemble = tmp_path / "ensemble.pt"
    assert run_trainer("export", "--ensemble", trained_run, out, "--out", ensemble) == 0
    e = torch.jit.load(str(ensemble))
    with torch.no_grad():
        members = torch.jit.load(str(trained_run / "student.pt"))(x), m(x)
        torch.testing.assert_close(e(x), (members[0] + members[1]) / 2, atol=1e-4, rtol=1e-4)
    assert json.loads(ensemble.with_suffix(".json").read_text())["ensemble"] == [str(trained_run), str(out)]
    assert run_trainer("export", "--ensemble", trained_run, out, "--out", tmp_path / "big.pt", "--max-mb", "2") == 2
    assert "over the budget of 2.0 MB (--max-mb); choose a smaller student or fewer members" in capsys.readouterr().err
    assert not (tmp_path / "big.pt").exists()


def test_eval_names_the_size_the_weakest_classes_and_a_file_that_does_not_resize(tmp_path, trained_run,  # noqa: F811
                                                                                fresh_easy, capsys):
    assert run_trainer("eval", "--model", trained_run / "student.pt", "--images", fresh_easy, "--workers", "0") == 0
    out = capsys.readouterr()
    assert "model 1." in out.out and " MB   at 224 px" in out.out and "\nweakest    " in out.out
    assert "does not resize its input" not in out.err
    old = shutil.copytree(trained_run, tmp_path / "old")                         # a file from before the resize
    side = json.loads((old / "student.json").read_text())
    for key in ("accepts_any_size", "resizes_to"):
        side.pop(key)
    (old / "student.json").write_text(json.dumps(side))
    assert run_trainer("eval", "--model", old / "student.pt", "--images", fresh_easy, "--workers", "0") == 0
    assert "was trained at 64 px and does not resize its input; fed 224 px" in capsys.readouterr().err


def test_demo_data_with_the_reference_imbalance(tmp_path):
    from featurestore.demo import REFERENCE_CLASSES, REFERENCE_COUNTS
    assert run_cli("demo-data", tmp_path / "d", "--per-class", "20", "--class-counts", "reference") == 0
    counts = [len(list((tmp_path / "d" / c).iterdir())) for c in REFERENCE_CLASSES]
    assert sum(counts) == pytest.approx(200, abs=5)
    assert counts == [round(20 * n * len(counts) / sum(REFERENCE_COUNTS)) for n in REFERENCE_COUNTS]
    assert max(counts) / min(counts) == pytest.approx(max(REFERENCE_COUNTS) / min(REFERENCE_COUNTS), rel=0.1)
    assert run_cli("demo-data", tmp_path / "e", "--class-counts", "3,4") == 2
