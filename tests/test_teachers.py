"""Teachers of other families, each against transformers as the oracle: DINOv2 (CLS token, no text) and
CLIP (projected embedding, zero-shot without bias) built into stores from tiny checkpoints the tests save;
any other vision backbone through AutoModel; and the registry that finds a family by model_type."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LAYOUT, run_cli

from featurestore.pipeline.scan import decode_side
from featurestore.pipeline.sources import decode
from featurestore.store.reader import StoreReader


def _oracle_inputs(store, demo_images, teacher, n=6):
    """The canonical views of the first n store images, rendered and normalised as the build did."""
    with StoreReader.open(store) as s:
        ids = s.ids()[:n]
        params = torch.from_numpy(s.read("views/params", 0, n)[:, 0])
        t = s.teacher()
        pooled = s.read(t.pooled, 0, n)[:, 0]
        logits = {h: s.read(t.logits(h), 0, n)[:, 0] for h in s.heads()}
    side = decode_side(teacher.pre.size, 64)
    sources = [torch.from_numpy(decode(str(demo_images / i), max_side=side).rgb).permute(2, 0, 1).contiguous()
               for i in ids]
    pix = teacher.render(sources, torch.arange(n), params, torch.full((n,), -1))
    mean, std = torch.tensor(teacher.pre.mean).view(1, 3, 1, 1), torch.tensor(teacher.pre.std).view(1, 3, 1, 1)
    return (pix - mean) / std, pooled, logits


@pytest.mark.parametrize("family", ["dinov2", "clip"])
def test_a_store_builds_from_a_saved_checkpoint_of_another_family(tmp_path, demo_images, family, request):
    from transformers import CLIPModel, Dinov2Model

    from featurestore.teachers import load_teacher
    folder = request.getfixturevalue(f"tiny_{family}_dir")
    store = tmp_path / "s.zarr"
    assert run_cli("build", "--images", demo_images, "--out", store, *LAYOUT, "--teacher", folder) == 0
    assert run_cli("verify", store) == 0
    teacher = load_teacher(str(folder), device="cpu")
    assert (teacher.pre.size, teacher.info.family) == (56, family)
    pix, pooled, logits = _oracle_inputs(store, demo_images, teacher)
    with StoreReader.open(store) as s:
        assert s.teacher().info["family"] == family and s.teacher().name == family
        assert s.heads() == (["probe", "zeroshot"] if family == "clip" else ["probe"])
        patches = s.read(s.teacher().patches, 0, 6)[:, 0]                  # (6, 2, 2, D')
    with torch.no_grad():
        if family == "dinov2":
            out = Dinov2Model.from_pretrained(folder).eval()(pixel_values=pix)
            want_pooled, tokens = out.pooler_output, out.last_hidden_state[:, 1:]        # CLS, then 4 x 4 patches
        else:
            model = CLIPModel.from_pretrained(folder).eval()
            vision = model.vision_model(pixel_values=pix)
            want_pooled, tokens = model.visual_projection(vision.pooler_output), vision.last_hidden_state[:, 1:]
    np.testing.assert_allclose(pooled, want_pooled.numpy(), atol=3e-3)
    grid = torch.nn.functional.adaptive_avg_pool2d(tokens.transpose(1, 2).reshape(6, -1, 4, 4), 2).permute(0, 2, 3, 1)
    np.testing.assert_allclose(patches, grid.numpy(), atol=3e-3)
    if family == "clip":                                               # CLIP's own logits_per_image
        with StoreReader.open(store) as s:
            prompts = [g[0] for g in s.teacher().attrs["prompts"]]
        from transformers import AutoTokenizer
        text = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, truncation=True, max_length=16,
                                                     return_tensors="pt")
        with torch.no_grad():
            ref = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                        pixel_values=pix).logits_per_image
        np.testing.assert_allclose(logits["zeroshot"], ref.numpy(), atol=2e-2)


def test_any_vision_backbone_loads_through_automodel(tmp_path, demo_images):
    """A ViT (CLS + patches) and a ConvNeXt (a feature map) through AutoModel, each checked by one view."""
    from transformers import ConvNextConfig, ConvNextModel, ViTConfig, ViTImageProcessor, ViTModel

    from featurestore.teachers import AutoTeacher, load_teacher
    vit, conv = tmp_path / "vit", tmp_path / "convnext"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56,
                       patch_size=14), add_pooling_layer=False).save_pretrained(vit)
    ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                 image_size=64)).save_pretrained(conv)
    for folder, side in ((vit, 56), (conv, 64)):
        ViTImageProcessor(size={"height": side, "width": side}).save_pretrained(folder)
        t = load_teacher(str(folder), device="cpu")
        assert isinstance(t, AutoTeacher) and t.info.embed_dim == 32
        pooled, patches = t.encode(torch.rand(2, 3, side, side), patch_grid=2)
        assert pooled.shape == (2, 32) and patches.shape == (2, 2, 2, 32)
    store = tmp_path / "vit.zarr"
    assert run_cli("build", "--images", demo_images, "--out", store, *LAYOUT, "--teacher", vit) == 0
    with StoreReader.open(store) as s:
        assert s.teacher().info["family"] == "auto" and s.heads() == ["probe"]


def test_a_family_is_found_by_model_type_and_a_new_one_registers_in_one_place():
    from featurestore import teachers
    assert teachers.FAMILIES["siglip"] is teachers.SiglipTeacher
    assert teachers.FAMILIES["dinov2_with_registers"] is teachers.Dinov2Teacher
    assert teachers.FAMILIES["clip_vision_model"] is teachers.ClipTeacher

    class Mine(teachers.Teacher):
        family, model_types = "mine", ("my_model",)
    try:
        teachers.register(Mine)
        assert teachers.family_of(type("C", (), {"model_type": "my_model"})()) is Mine
    finally:
        teachers.FAMILIES.pop("my_model")


def test_demo_teacher_of_another_family_loads_as_that_family(tmp_path):
    from featurestore.demo.teacher import train_demo_teacher
    from featurestore.teachers import load_teacher
    out = tmp_path / "dino"
    assert "dinov2 demo teacher" in train_demo_teacher(out, images=40, steps=2, family="dinov2")
    t = load_teacher(str(out), device="cpu")
    assert (t.info.family, t.pre.size, t.info.num_patches) == ("dinov2", 64, 64)
    assert t.pre.mean == pytest.approx([0.485, 0.456, 0.406])
    with pytest.raises(SystemExit) as e:
        run_cli("demo-teacher", tmp_path / "x", "--family", "sam")
    assert e.value.code == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", ["test_vit", "test_resnet"])
def test_a_store_builds_from_a_timm_folder_and_holds_timms_own_outputs(tmp_path, demo_images, arch):
    import timm
    from timm.models import save_for_hf

    from featurestore.teachers import load_teacher
    torch.manual_seed(5)
    model = timm.create_model(arch, pretrained=False).eval()
    folder = tmp_path / arch
    save_for_hf(model, str(folder), safe_serialization=True)
    store = tmp_path / "s.zarr"
    assert run_cli("build", "--images", demo_images, "--out", store, *LAYOUT, "--teacher", f"timm:{folder}") == 0
    assert run_cli("verify", store) == 0
    teacher = load_teacher(f"timm:{folder}", device="cpu")
    assert (teacher.info.family, teacher.pre.size) == ("timm", 160)
    pix, pooled, _ = _oracle_inputs(store, demo_images, teacher)
    with StoreReader.open(store) as s:
        assert s.teacher().name == "timm" and s.heads() == ["probe"]
        patches = s.read(s.teacher().patches, 0, 6)[:, 0]
    with torch.no_grad():
        feats = model.forward_features(pix)
        want = model.forward_head(feats, pre_logits=True)
    np.testing.assert_allclose(pooled, want.numpy(), atol=3e-3, rtol=2e-3)
    if feats.dim() == 3:                                               # a ViT: the tokens after the CLS token
        side = 10
        feats = feats[:, model.num_prefix_tokens:].transpose(1, 2).reshape(6, -1, side, side)
    grid = torch.nn.functional.adaptive_avg_pool2d(feats, 2).permute(0, 2, 3, 1)
    np.testing.assert_allclose(patches, grid.numpy(), atol=3e-3, rtol=2e-3)


def test_a_timm_folder_with_pickled_weights_or_an_unknown_name_is_refused(tmp_path, demo_images):
    import timm
    from timm.models import save_for_hf
    folder = tmp_path / "pickled"
    save_for_hf(timm.create_model("test_vit", pretrained=False), str(folder), safe_serialization=False)
    for spec in (f"timm:{folder}", "timm:no_such_net_v9", "timm:"):
        assert run_cli("build", "--images", demo_images, "--out", tmp_path / "s.zarr", *LAYOUT, "--teacher", spec) == 2
    assert not (tmp_path / "s.zarr").exists()
