"""The GPU pipeline's parts, run on a CPU: the compiled tower at one padded batch shape, the batch
size flag and its automatic choice, and outputs the store cannot keep (the stage times of a pass:
test_build's done-line test)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL, run_cli

from featurestore.common.options import ConfigError, load_config
from featurestore.pipeline.config import BuildConfig, batch_arg
from featurestore.pipeline.teacher_pass import finite_outputs, pick_batch
from featurestore.teachers import TeacherError, load_teacher
from featurestore.teachers import base as teacher_mod


def test_compiled_tower_padded_to_its_batch_gives_the_eager_outputs(monkeypatch):
    """A compiled tower meets one batch shape: three views padded to eight give what the eager tower
    gives those three (the compiler here is aot_eager: the same tracing, no code generation)."""
    monkeypatch.setattr(teacher_mod, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    eager = load_teacher("random:tiny", device="cpu")
    compiled = load_teacher("random:tiny", device="cpu")
    compiled.prepare(8, compiled=True)
    assert compiled.compiled and compiled.info.extra["compiled"] and not eager.compiled
    x = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    seen = []
    real = compiled.vision.forward
    monkeypatch.setattr(compiled.vision, "forward", lambda **kw: seen.append(kw["pixel_values"].shape) or real(**kw))
    torch._dynamo.reset()
    pooled, patches = compiled.encode(x, 2)
    ref_pooled, ref_patches = eager.encode(x, 2)
    assert seen and all(s[0] == 8 for s in seen)                    # the tower ran at its one shape
    assert pooled.shape == (3, 64) and patches.shape == (3, 2, 2, 64)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(patches, ref_patches, rtol=1e-4, atol=1e-5)


def test_batch_size_takes_a_number_or_auto():
    assert batch_arg("auto") == 0 and batch_arg("AUTO ") == 0 and batch_arg("96") == 96
    with pytest.raises(ConfigError, match="--batch-size takes a number of views or auto, got 'big'"):
        batch_arg("big")
    cfg = load_config(BuildConfig, None, {"batch_size": "auto", "images": "x", "out": "y.zarr"})
    assert cfg.teacher.batch_size == 0
    assert load_config(BuildConfig, None, {"batch_size": "32"}).teacher.batch_size == 32


def test_auto_batch_is_the_largest_power_of_two_in_half_the_free_memory():
    mb = 2 ** 20
    assert pick_batch(30 * mb, 80_000 * mb, 4096) == 256          # an H200 at 448 px: the cap
    assert pick_batch(30 * mb, 4_000 * mb, 4096) == 64            # 2 GB for the forward: 64 x 30 MB
    assert pick_batch(30 * mb, 80_000 * mb, 48) == 32             # never more than a chunk's views
    assert pick_batch(30 * mb, 10 * mb, 4096) == 1


def test_compile_and_batch_size_do_not_change_what_a_store_is():
    """A build resumed with --no-compile or another --batch-size is the same store."""
    a = load_config(BuildConfig, None, {"images": "x", "out": "y.zarr"})
    b = load_config(BuildConfig, None, {"images": "x", "out": "y.zarr", "compile": False, "batch_size": "8"})
    assert a.teacher.compile and not b.teacher.compile
    assert a.identity() == b.identity()


def test_outputs_beyond_float16_fail_the_build_naming_the_chunk(tmp_path, demo_images, monkeypatch):
    """The pass reads nothing back per batch; the writer checks each chunk's stored outputs instead."""
    real = teacher_mod.Teacher.encode

    def overflowing(self, pixels, patch_grid=0, check=True):
        pooled, patches = real(self, pixels, patch_grid, check)
        return pooled * 1e6, patches                                      # beyond 65504 in float16
    monkeypatch.setattr(teacher_mod.Teacher, "encode", overflowing)
    with pytest.raises(TeacherError, match=r"teachers/siglip/pooled of chunk \d+: .*exceed float16's range"):
        run_cli("build", "--images", demo_images, "--out", tmp_path / "s.zarr", *SMALL, "--debug")

    class Half:
        def overflow_message(self):
            return "overflow float16"
    check = finite_outputs(Half())
    check(3, {"teachers/siglip/pooled": np.ones((2, 3), np.float16), "images": np.zeros(2, np.uint8)})
    with pytest.raises(TeacherError, match="teachers/siglip/patches of chunk 3: overflow float16"):
        check(3, {"teachers/siglip/patches": np.array([1, np.inf], np.float16)})


def test_chunks_copied_to_the_device_once_render_the_same_bits(small_store):
    """A GPU loader copies each chunk's images to the device when it reads the chunk, and gathers a
    batch's sources there: the pixels are those of the per-batch transfer, bit for bit."""
    from featurestore.common.devices import Caps
    from trainer.batches import InlineRenderer, parts
    from trainer.data import StoreData
    from trainer.loader import Loader, LoaderConfig
    data = StoreData(str(small_store), "probe", True, True)
    idx = np.flatnonzero(data.split != -1)
    loader = Loader(data, idx, 3, torch.device("cpu"), LoaderConfig(8, 40), caps=Caps("cuda", (8, 0)))
    plan = loader.plan(1)
    read = loader._read(plan)
    b_idx, b_view = plan.batches[0]
    held = {int(c): read(int(c)) for c in np.unique(b_idx // data.chunk_size)}
    from featurestore.views import COL
    partners = {int(p) // data.chunk_size for p in data.params[b_idx, b_view][:, COL["mix_partner"]] if p >= 0}
    held |= {c: read(c) for c in partners if c not in held}
    assert all(ch.on_device is not None for ch in held.values())
    renderer = InlineRenderer(40, (0.5,) * 3, (0.5,) * 3, Caps("cuda", (8, 0)), torch.device("cpu"))
    _, job = parts(data, b_idx, b_view, held, torch.device("cpu"))
    gathered = torch.empty(len(b_idx), 3, 40, 40)
    renderer.render(job, held, gathered)
    for ch in held.values():
        ch.on_device = None                                                # the per-batch transfer
    sent = torch.empty_like(gathered)
    renderer.render(job, held, sent)
    assert torch.equal(gathered, sent)
