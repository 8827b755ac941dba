"""The teacher against transformers as the oracle: preprocessing, pooled output, zero-shot logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LAYOUT, REPO, run_cli
from PIL import Image
from test_views import smooth_image

from featurestore import views
from featurestore.pipeline.scan import decode_side
from featurestore.pipeline.sources import decode
from featurestore.store.reader import StoreReader
from featurestore.teachers import TeacherError, _access_message, load_teacher, random_config


def _normalise(x, pre):
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("size,hw", [(448, (570, 650)), (224, (300, 200)), (448, (1000, 1000))])
def test_canonical_view_matches_siglip_image_processor(tmp_path, size, hw):
    from transformers import SiglipImageProcessor
    proc = SiglipImageProcessor(size={"height": size, "width": size}, resample=3,
                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    path = tmp_path / "photo.jpg"
    Image.fromarray(smooth_image(*hw, seed=5)).save(path, quality=92)
    oracle = proc(images=Image.open(path), return_tensors="pt")["pixel_values"]          # (1, 3, S, S)
    rgb = torch.from_numpy(decode(str(path), max_side=2 * size).rgb).permute(2, 0, 1).contiguous()
    ours = views.render([rgb], torch.tensor([0]), torch.from_numpy(views.canonical_params())[None], size, "bicubic")
    from featurestore.teachers import Preprocess
    ours = _normalise(ours, Preprocess(size, (0.5,) * 3, (0.5,) * 3, "bicubic"))
    diff = (ours - oracle).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())


def test_preprocessing_comes_from_the_checkpoint(tiny_siglip_dir):
    t = load_teacher(str(tiny_siglip_dir), device="cpu")
    assert (t.pre.size, t.pre.resample, t.pre.mean) == (56, "bicubic", (0.5, 0.5, 0.5))
    assert t.info.weights == "pretrained" and t.info.has_text and t.info.embed_dim == 32


@pytest.fixture(scope="module")
def hf_store(tmp_path_factory, demo_images, tiny_siglip_dir):
    out = tmp_path_factory.mktemp("hf_store") / "s.zarr"
    assert run_cli("build", "--images", demo_images, "--out", out, *LAYOUT, "--teacher", tiny_siglip_dir,
                   "--prompt-template", "a photo of {name}") == 0
    return out


def test_zeroshot_logits_equal_siglip_logits_per_image(hf_store, demo_images, tiny_siglip_dir):
    from transformers import AutoTokenizer, SiglipModel
    model = SiglipModel.from_pretrained(tiny_siglip_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_siglip_dir)
    teacher = load_teacher(str(tiny_siglip_dir), device="cpu")
    with StoreReader.open(hf_store) as s:
        prompts = [group[0] for group in s.teacher().attrs["prompts"]]          # one prompt per class here
        assert prompts[1] == "a photo of Warts Molluscum and other Viral Infections"
        ids, n = s.ids()[:6], 6
        params = torch.from_numpy(s.read("views/params", 0, n)).reshape(n * 3, -1)
        stored_logits = s.read("teachers/siglip/logits/zeroshot", 0, n).reshape(n * 3, -1)
        stored_pooled = s.read("teachers/siglip/pooled", 0, n).reshape(n * 3, -1)
        chunk_partner = params[:, views.COL["mix_partner"]].long()
    side = decode_side(teacher.pre.size, 64)                      # as the build decoded them
    sources = [torch.from_numpy(decode(str(demo_images / i), max_side=side).rgb).permute(2, 0, 1).contiguous()
               for i in ids]
    # view 0 of each image: canonical, never mixed
    index = torch.arange(n) * 3
    pix = teacher.render(sources, torch.arange(n), params[index], torch.full((n,), -1))
    pix = _normalise(pix, teacher.pre)
    text = tok(prompts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], pixel_values=pix)
        pooled = model.vision_model(pixel_values=pix).pooler_output
        text_embeds = model.text_model(input_ids=text["input_ids"]).pooler_output      # what SiglipModel scores
    np.testing.assert_allclose(stored_pooled[index.numpy()], pooled.numpy(), atol=3e-3)
    # SiglipModel's own logits of the same views; the store scores its float16 embeddings (so that every
    # rank and thread count gives the same bits), whose rounding moves a logit by a few thousandths
    np.testing.assert_allclose(stored_logits[index.numpy()], out.logits_per_image.numpy(), atol=2e-2)
    # and exactly SiglipModel's formula (exp(logit_scale) cos + logit_bias) on the stored embeddings
    img = torch.nn.functional.normalize(torch.from_numpy(stored_pooled).float(), dim=-1)
    txt = torch.nn.functional.normalize(text_embeds, dim=-1)
    formula = (img @ txt.T * model.logit_scale.exp() + model.logit_bias).detach()
    np.testing.assert_allclose(stored_logits, formula.numpy(), atol=1e-5, rtol=1e-5)
    assert (chunk_partner[index] == -1).all()


def test_prompt_files_average_normalised_text_embeddings(tmp_path, demo_images, tiny_siglip_dir):
    """--prompts: a class's prompts are embedded by the text tower, normalised, averaged and normalised
    again; classes without prompts use the template; logits as SiglipModel computes them."""
    from transformers import AutoTokenizer, SiglipModel
    names = sorted(p.name for p in demo_images.iterdir())
    (tmp_path / "prompts.yaml").write_text(
        f"'{names[0]}': [a red itchy rash, dry scaly skin]\n"
        "Melanoma: [a dark irregular mole, an asymmetric pigmented lesion, a black spot]\n")
    out = tmp_path / "p.zarr"
    assert run_cli("build", "--images", demo_images, "--out", out, *LAYOUT, "--teacher", tiny_siglip_dir,
                   "--prompts", tmp_path / "prompts.yaml") == 0
    model = SiglipModel.from_pretrained(tiny_siglip_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_siglip_dir)
    with StoreReader.open(out) as s:
        prompts, heads = s.teacher().attrs["prompts"], s.head_arrays("zeroshot")
        pooled = s.read("teachers/siglip/pooled", 0, 4)[:, 0]
        logits = s.read("teachers/siglip/logits/zeroshot", 0, 4)[:, 0]
    assert prompts[0] == ["a red itchy rash", "dry scaly skin"] and len(prompts[2]) == 3
    assert prompts[1] == ["Warts Molluscum and other Viral Infections"]
    with torch.no_grad():
        def embed(texts):
            ids = tok(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")["input_ids"]
            e = model.get_text_features(input_ids=ids)
            e = getattr(e, "pooler_output", e)
            return torch.nn.functional.normalize(e, dim=-1)
        expected = torch.stack([torch.nn.functional.normalize(embed(g).mean(0), dim=-1) for g in prompts])
    np.testing.assert_allclose(heads["text_embeds"], expected.numpy(), atol=1e-5)
    cos = torch.nn.functional.normalize(torch.from_numpy(pooled).float(), dim=-1) @ expected.T
    ref = cos * model.logit_scale.exp() + model.logit_bias
    np.testing.assert_allclose(logits, ref.detach().numpy(), atol=2e-3)
    (tmp_path / "bad.yaml").write_text("Dragons: [a dragon]\n")
    assert run_cli("build", "--images", demo_images, "--out", tmp_path / "q.zarr", *LAYOUT, "--teacher",
                   tiny_siglip_dir, "--prompts", tmp_path / "bad.yaml") == 2


def test_class_names_are_cleaned_for_prompts():
    from featurestore.demo import REFERENCE_CLASSES
    from featurestore.pipeline.sources import class_display_name
    assert [class_display_name(c) for c in REFERENCE_CLASSES] == [
        "Eczema", "Melanoma", "Atopic Dermatitis", "Basal Cell Carcinoma (BCC)", "Melanocytic Nevi (NV)",
        "Benign Keratosis-like Lesions (BKL)", "Psoriasis pictures Lichen Planus and related diseases",
        "Seborrheic Keratoses and other Benign Tumors", "Tinea Ringworm Candidiasis and other Fungal Infections",
        "Warts Molluscum and other Viral Infections"]
    assert class_display_name("1. Eczema 1677") == "Eczema"
    assert class_display_name("5. Melanocytic Nevi (NV) - 7970") == "Melanocytic Nevi (NV)"
    assert class_display_name("2. Melanoma 15.75k") == "Melanoma"
    assert class_display_name("10. Warts Molluscum and other Viral Infections - 2103") == \
        "Warts Molluscum and other Viral Infections"


def test_reference_config_ships_prompts_for_the_ten_classes():
    from featurestore.common.options import from_dict
    from featurestore.common.untrusted import load_yaml
    from featurestore.demo import REFERENCE_CLASSES
    from featurestore.pipeline.config import BuildConfig
    from featurestore.pipeline.sources import class_display_name
    cfg = from_dict(BuildConfig, load_yaml(REPO / "configs" / "medsiglip-448.yaml") | {"images": "x", "out": "y"})
    cfg.validate()
    cleaned = {class_display_name(c) for c in REFERENCE_CLASSES}
    assert set(cfg.teacher.prompts) == cleaned or set(cfg.teacher.prompts) == set(REFERENCE_CLASSES)
    assert all(len(v) >= 2 for v in cfg.teacher.prompts.values())


def test_vision_only_checkpoint_gives_probe_head_alone(tmp_path, demo_images, tiny_vision_dir):
    out = tmp_path / "v.zarr"
    assert run_cli("build", "--images", demo_images, "--out", out, *LAYOUT, "--teacher", tiny_vision_dir) == 0
    with StoreReader.open(out) as s:
        assert s.heads() == ["probe"] and "teachers/siglip/logits/zeroshot" not in s
        assert s.teacher().info["has_text"] is False


def test_random_medsiglip_448_has_the_published_shape():
    from transformers import SiglipModel
    cfg = random_config("medsiglip-448")
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size,
            v.image_size) == (1152, 27, 16, 4304, 14, 448)
    assert (v.image_size // v.patch_size) ** 2 == 1024
    assert (t.hidden_size, t.vocab_size, t.max_position_embeddings) == (1152, 32000, 64)
    with torch.device("meta"):
        model = SiglipModel(cfg)
    vision = sum(p.numel() for p in model.vision_model.parameters())
    assert 420e6 < vision < 440e6, vision


def test_teacher_load_errors_are_clear(tmp_path):
    with pytest.raises(TeacherError, match="teacher directory not found"):
        load_teacher(str(tmp_path / "missing-dir"), device="cpu")
    with pytest.raises(TeacherError, match="unknown random architecture 'huge'"):
        load_teacher("random:huge", device="cpu")
    with pytest.raises(TeacherError, match="Offline\\?|could not provide"):
        load_teacher("google/medsiglip-448", device="cpu")
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                         vocab_size=10)).save_pretrained(tmp_path / "bert")
    with pytest.raises(TeacherError, match="not a vision model; kdstore teachers are SigLIP, CLIP, DINOv2 or "
                                           "transformers vision backbones"):
        load_teacher(str(tmp_path / "bert"), device="cpu")
    msg = _access_message("google/medsiglip-448", OSError("401 Client Error: gated repo"))
    assert "HF_TOKEN" in msg and "Accept its terms" in msg
