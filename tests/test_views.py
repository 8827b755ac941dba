"""The view contract: deterministic params, one renderer, resolution-independent boxes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featurestore import views
from featurestore.pipeline.config import ViewPolicy
from featurestore.pipeline.sources import squash
from featurestore.views import COL, MIX_CUTMIX, MIX_MIXUP, batch_render
from featurestore.views.resize import resize


def policy(**kw):
    return ViewPolicy(**({"views": 6, "mix_prob": 0.5} | kw))


def params_for(p, n, chunk, groups=None, start=0, stop=None):
    """Params of images [start, stop) of a store of n images in chunks of `chunk`, as the builder draws them."""
    groups = np.zeros(n, np.int64) if groups is None else groups
    stop = n if stop is None else stop
    out = [views.sample_params(p, a, min(a + chunk, n), groups[a:a + chunk]) for a in range(0, n, chunk)]
    return np.concatenate(out)[start:stop]


def smooth_image(h, w, seed=0) -> np.ndarray:
    """A photo-like image: low-frequency colour fields plus a few blobs (no pixel-level noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 6, 3)).astype(np.float32)
    t = torch.from_numpy(small).permute(2, 0, 1)[None]
    big = F.interpolate(t, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    yy, xx = np.mgrid[:h, :w]
    for _ in range(4):
        cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.05, 0.15) * min(h, w)
        big[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    return np.clip(big, 0, 255).astype(np.uint8)


def test_params_are_a_function_of_seed_image_view():
    p = policy()
    a = params_for(p, 20, 8)
    b = params_for(p, 20, 8)
    np.testing.assert_array_equal(a, b)
    # independent of K and of which chunk a process draws
    more = views.sample_params(policy(views=9), 8, 16, np.zeros(8))
    np.testing.assert_array_equal(more[:, :6], a[8:16])
    other = params_for(policy(seed=1), 20, 8)
    assert not np.array_equal(other[:, 1:], a[:, 1:])


def test_view_zero_is_canonical_and_others_vary():
    a = params_for(policy(), 30, 10)
    np.testing.assert_array_equal(a[:, 0], np.broadcast_to(views.canonical_params(), a[:, 0].shape))
    rest = a[:, 1:]
    box = rest[..., :4]
    assert (box >= 0).all() and (box <= 1).all()
    area = (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])
    assert area.min() >= 0.35 - 1e-5 and area.max() <= 1 + 1e-6
    assert 0.2 < rest[..., COL["hflip"]].mean() < 0.8 and set(np.unique(rest[..., COL["rot90"]])) <= {0, 1, 2, 3}
    assert np.abs(rest[..., COL["brightness"]] - 1).max() <= 0.2 + 1e-6


def test_mix_partners_stay_in_chunk_and_group_and_cutmix_lambda_is_exact():
    """Partners come from the same chunk and group: training, held-out and unlabelled never mix."""
    n, chunk = 30, 8
    groups = np.random.default_rng(0).choice([0, -1, -2], size=n, p=[0.6, 0.2, 0.2])
    a = params_for(policy(views=12), n, chunk, groups)
    modes = a[..., COL["mix_mode"]]
    assert (modes == MIX_MIXUP).any() and (modes == MIX_CUTMIX).any()
    for i in range(n):
        c0 = i // chunk * chunk
        for k in range(12):
            p = a[i, k]
            if p[COL["mix_mode"]] == 0:
                assert p[COL["mix_partner"]] == -1 and p[COL["mix_lambda"]] == 1
                continue
            j = p[COL["mix_partner"]]
            assert j != i and c0 <= j < min(c0 + chunk, n) and groups[int(j)] == groups[i]
            if p[COL["mix_mode"]] == MIX_CUTMIX:
                y0, x0, y1, x1 = (p[COL[c]] for c in ("mix_y0", "mix_x0", "mix_y1", "mix_x1"))
                assert p[COL["mix_lambda"]] == pytest.approx(1 - (y1 - y0) * (x1 - x0), abs=1e-6)


def test_canonical_render_is_plain_resize():
    img = torch.from_numpy(smooth_image(50, 70)).permute(2, 0, 1).contiguous()
    p = torch.from_numpy(views.canonical_params())[None]
    out = views.render([img], torch.tensor([0]), p, 32)
    from torchvision.transforms.v2 import functional as TF
    ref = TF.resize(img, [32, 32], antialias=True).float() / 255
    torch.testing.assert_close(out[0], ref)


def test_flips_and_rotation_follow_the_contract():
    img = torch.from_numpy(smooth_image(32, 32)).permute(2, 0, 1).contiguous()
    base = views.canonical_params()
    rows = []
    for hf, vf, rot in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 3)]:
        p = base.copy()
        p[[COL["hflip"], COL["vflip"], COL["rot90"]]] = (hf, vf, rot)
        rows.append(p)
    out = views.render([img], torch.zeros(4, dtype=torch.long), torch.from_numpy(np.stack(rows)), 32)
    x = img.float() / 255
    torch.testing.assert_close(out[0], x.flip(-1))
    torch.testing.assert_close(out[1], x.flip(-2))
    torch.testing.assert_close(out[2], torch.rot90(x, 1, dims=(-2, -1)))
    torch.testing.assert_close(out[3], torch.rot90(x.flip(-1), 3, dims=(-2, -1)))


def test_colour_identity_and_direction():
    x = torch.rand(3, 3, 8, 8)
    one, zero = torch.ones(3), torch.zeros(3)
    torch.testing.assert_close(views.adjust_colour(x, one, one, one, zero), x)
    darker = views.adjust_colour(x, one * 0.5, one, one, zero)
    torch.testing.assert_close(darker, x * 0.5)
    gray = views.adjust_colour(x, one, one, zero, zero)
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-6) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-6)
    hued = views.adjust_colour(x * 0.5 + 0.25, one, one, one, torch.full((3,), 0.25))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close((hued * luma).sum(1), ((x * 0.5 + 0.25) * luma).sum(1), atol=1e-5, rtol=0)
    assert (hued - (x * 0.5 + 0.25)).abs().max() > 0.01


def test_mixup_and_cutmix_render():
    a = torch.from_numpy(smooth_image(40, 40, 1)).permute(2, 0, 1).contiguous()
    b = torch.from_numpy(smooth_image(40, 40, 2)).permute(2, 0, 1).contiguous()
    mix, cut = views.canonical_params(), views.canonical_params()
    mix[[COL["mix_partner"], COL["mix_lambda"], COL["mix_mode"]]] = (1, 0.3, MIX_MIXUP)
    cut[[COL["mix_partner"], COL["mix_lambda"], COL["mix_mode"]]] = (1, 0.75, MIX_CUTMIX)
    cut[[COL["mix_y0"], COL["mix_x0"], COL["mix_y1"], COL["mix_x1"]]] = (0.0, 0.5, 0.5, 1.0)
    out = views.render([a, b], torch.tensor([0, 0]), torch.from_numpy(np.stack([mix, cut])), 40,
                       partner_index=torch.tensor([1, 1]))
    fa, fb = a.float() / 255, b.float() / 255
    torch.testing.assert_close(out[0], 0.3 * fa + 0.7 * fb)
    torch.testing.assert_close(out[1][:, :20, 20:], fb[:, :20, 20:])
    torch.testing.assert_close(out[1][:, 20:, :], fa[:, 20:, :])
    with pytest.raises(ValueError, match="partner_index"):
        views.render([a, b], torch.tensor([0]), torch.from_numpy(mix[None]), 40)


def test_teacher_and_student_see_the_same_region():
    """The same params at 448 from the original and at 224 from the stored S x S image agree."""
    original = smooth_image(560, 650, seed=3)                      # H x W of a typical reference photo
    partner = smooth_image(480, 720, seed=4)
    stored = [squash(original, 256), squash(partner, 256)]
    p = views.sample_params(policy(views=16, mix_prob=0.5), 0, 2, np.zeros(2))[0]     # 16 views of image 0
    params = torch.from_numpy(p)
    idx, partner_idx = torch.zeros(16, dtype=torch.long), torch.ones(16, dtype=torch.long)

    def as_t(x):
        return torch.from_numpy(x).permute(2, 0, 1).contiguous()
    teacher = views.render([as_t(original), as_t(partner)], idx, params, 448, "bicubic", partner_idx)
    student = views.render([as_t(s) for s in stored], idx, params, 224, "bilinear", partner_idx)
    teacher_at_224 = F.interpolate(teacher, size=224, mode="bilinear", antialias=True, align_corners=False)
    diff = (teacher_at_224 - student).abs()
    assert diff.mean() < 0.008, diff.mean()
    # a wrong region would differ by far more: shifting the box by 10% breaks the agreement
    shifted = params.clone()
    shifted[1:, [COL["x0"], COL["x1"]]] = (shifted[1:, [COL["x0"], COL["x1"]]] + 0.1).clamp(max=1)
    wrong = views.render([as_t(s) for s in stored], idx, shifted, 224, "bilinear", partner_idx)
    assert (teacher_at_224[1:] - wrong[1:]).abs().mean() > 3 * diff[1:].mean()


def test_batched_and_per_view_colour_paths_agree():
    """The GPU path (one batched kernel) and the CPU path (per view) compute the same map."""
    g = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(5)]
    m, t = torch.rand(5, 3, 3, generator=g) / 100, torch.rand(5, 3, generator=g) - 0.5
    lo, hi = [-1.0, -0.5, 0.0], [1.0, 0.5, 0.8]
    a = views.apply_colour(crops, m, t, lo, hi, per_view=True)
    b = views.apply_colour(crops, m, t, lo, hi, per_view=False)
    torch.testing.assert_close(a, b)
    assert a[:, 2].min() >= 0 and a[:, 1].max() <= 0.5
    # the whole renderer, each branch forced on the CPU: the GPU branch gives what the CPU branch gives
    imgs = [torch.from_numpy(smooth_image(40 + 7 * i, 50, seed=i)).permute(2, 0, 1).contiguous() for i in range(4)]
    params = torch.from_numpy(params_for(policy(views=5), 4, 4)[:, 1:].reshape(16, -1))
    index = torch.arange(4).repeat_interleave(4)
    partner = params[:, COL["mix_partner"]].long()
    norm = {"mean": (0.5,) * 3, "std": (0.2,) * 3}
    per_view = views.render(imgs, index, params, 24, partner_index=partner, batched=False, **norm)
    batched = views.render(imgs, index, params, 24, partner_index=partner, batched=True, **norm)
    torch.testing.assert_close(per_view, batched)


def test_float_sums_of_crops_are_exact_up_to_256_px():
    """The CPU renderer sums each crop in float32 where it already is (no integer copy): exact while
    every partial sum stays below 2**24, i.e. 255 * size**2 < 2**24, up to 256 px."""
    worst = torch.full((2, 3, 256, 256), 255.0)
    assert worst.sum(dim=(2, 3)).eq(255 * 256 * 256).all()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 3, 256, 256), generator=g, dtype=torch.uint8)
    assert torch.equal(x.float().sum(dim=(2, 3)), x.sum(dim=(2, 3), dtype=torch.int64).float())
    # the renderer's two CPU routes (in place at 224 px; integer sums at 288 px) agree with the GPU route
    imgs = [torch.from_numpy(smooth_image(300, 320, seed=i)).permute(2, 0, 1).contiguous() for i in range(2)]
    params = torch.from_numpy(params_for(policy(views=4), 2, 2)[:, 1:].reshape(6, -1))
    index, partner = torch.arange(2).repeat_interleave(3), params[:, COL["mix_partner"]].long()
    for size in (224, 288):
        cpu = views.render(imgs, index, params, size, partner_index=partner, batched=False)
        gpu = views.render(imgs, index, params, size, partner_index=partner, batched=True)
        torch.testing.assert_close(cpu, gpu)


def test_colour_jitter_calls_no_linear_algebra_at_render_time(monkeypatch):
    """Render threads must not call torch.linalg: on CUDA its library loads lazily, and a first call
    from two threads at once fails ("lazy wrapper should be called at most once", pytorch#90613)."""
    def refuse(*a, **k):
        raise AssertionError("torch.linalg called while rendering")
    for name in ("inv", "solve", "pinv"):
        monkeypatch.setattr(torch.linalg, name, refuse)
    monkeypatch.setattr(torch, "inverse", refuse)
    x = torch.rand(3, 3, 8, 8)
    f = torch.tensor([0.8, 1.0, 1.2])
    out = views.adjust_colour(x, f, f.flip(0), f, torch.tensor([-0.05, 0.0, 0.05]))
    assert out.shape == x.shape and torch.allclose(out[1], x[1], atol=1e-6)    # the identity view is unchanged


def test_resample_weights_are_torchs_antialiased_bilinear_resize():
    """One weight matrix per axis reproduces F.interpolate(bilinear, antialias) of the crop, shrinking
    and enlarging, flipped rows included (the oracle: torch itself, on float pixels)."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 50, 60, generator=g, dtype=torch.float64) * 255
    for top, left, h, w, size in [(0, 0, 50, 60, 24), (7, 11, 30, 41, 24), (20, 30, 9, 13, 24), (5, 9, 24, 24, 24)]:
        want = F.interpolate(x[..., top:top + h, left:left + w], size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)[0, 0]
        wy = batch_render.resample_weights(torch.tensor([top]), torch.tensor([h]), 50, size)[0].double()
        wx = batch_render.resample_weights(torch.tensor([left]), torch.tensor([w]), 60, size)[0].double()
        torch.testing.assert_close(wy @ x[0, 0] @ wx.T, want, atol=1e-3, rtol=0)
        assert (wy[:, :top] == 0).all() and (wy[:, top + h:] == 0).all()       # nothing from outside the crop
        flipped = batch_render.resample_weights(torch.tensor([left]), torch.tensor([w]), 60, size,
                                                torch.tensor([True]))[0]
        assert torch.equal(flipped, wx.float().flip(0))


def test_batched_geometry_is_the_per_view_geometry_within_one_level():
    """Crop, resize, flips and rot90 of a whole batch at once (the GPU loader's route) against the
    per-view route: every pixel within one uint8 level, nearly all equal; with mixing and colour."""
    imgs = torch.stack([torch.from_numpy(smooth_image(64, 64, seed=i)).permute(2, 0, 1) for i in range(4)])
    params = torch.from_numpy(params_for(policy(views=9, rot90=0.5, vflip=0.5), 4, 4)[:, 1:].reshape(32, -1))
    assert {0, 1, 2, 3} <= set(params[:, COL["rot90"]].long().tolist())
    assert params[:, COL["hflip"]].any() and params[:, COL["vflip"]].any()
    index = torch.arange(4).repeat_interleave(8)
    batched = batch_render.geometry(imgs, index, params, 24)

    def per_view(source):
        return torch.stack([views._geometry(source(int(s)), params[v], 24, "bilinear")
                            for v, s in enumerate(index.tolist())]).float().round()
    # the per-view route resizes uint8 on a GPU through float, rounding once: the same levels, to the
    # last float rounding; on a CPU, in fixed point rounding after each axis: within one level
    on_gpu, on_cpu = per_view(lambda s: imgs[s].float()), per_view(lambda s: imgs[s])
    assert (batched == on_gpu).float().mean() > 0.995 and (batched - on_gpu).abs().max() <= 1
    diff = (batched - on_cpu).abs()
    assert diff.max() <= 1 and diff.mean() < 0.25, (diff.max(), diff.mean())
    # the whole render, normalised and mixed (mixup and cutmix both present)
    modes = params[:, COL["mix_mode"]].long()
    assert (modes == MIX_MIXUP).any() and (modes == MIX_CUTMIX).any()
    partner = params[:, COL["mix_partner"]].long()
    norm = {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    a = views.render(imgs, index, params, 24, partner_index=partner, batched=True, **norm)
    b = batch_render.render_batch(imgs, index, params, 24, partner, **norm)
    level = 1 / 255 / 0.25
    gap = (a - b).abs()
    assert gap.max() <= 3 * level and gap.mean() < 0.3 * level, (gap.max() / level, gap.mean() / level)


def test_resize_is_torchvisions_resize_bit_for_bit():
    """The renderer's resize against torchvision's v2 `resize` (the oracle): uint8 and float32, bilinear,
    bicubic and nearest, shrinking and enlarging, contiguous, channels-last and cropped inputs."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF
    hwc = smooth_image(70, 90, seed=5)
    inputs = {"contiguous": torch.from_numpy(hwc).permute(2, 0, 1).contiguous(),
              "channels-last": torch.from_numpy(hwc).permute(2, 0, 1),
              "crop": torch.from_numpy(hwc).permute(2, 0, 1)[:, 5:61, 7:80]}
    inputs |= {f"{k}, float": v.float() * 0.7 for k, v in list(inputs.items())}
    modes = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
             "nearest": InterpolationMode.NEAREST}
    for name, img in inputs.items():
        for mode, tv_mode in modes.items():
            for size in (24, 56, 131):
                want = TF.resize(img, [size, size], interpolation=tv_mode, antialias=True)
                got = resize(img, size, mode)
                assert got.dtype == want.dtype and torch.equal(got, want), (name, mode, size)
    assert resize(inputs["crop"], 56, "bilinear").shape == (3, 56, 56)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        views.render([inputs["contiguous"]], torch.zeros(1, dtype=torch.long),
                     torch.from_numpy(views.canonical_params())[None], 24, "lanczos")


def test_building_a_store_does_not_import_torchvision():
    import subprocess
    import sys
    code = "import sys, featurestore.pipeline.builder; print('torchvision' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stdout + r.stderr
