"""Distillation with the teacher in the loop: the baseline the fidelity benchmark holds the store
against. Only benchmarks/fidelity.py uses it; `trainer fit` never loads a teacher.

`OnlineLoader` is the trainer's Loader with other targets. It keeps the plan (which images each step
trains on, in which batch, over how many steps), but every view is a fresh draw from the store's own
view policy (its crop, flip, rotation, colour and mixing distributions, mixing partners from the same
chunk and group, exactly as a build draws them; never a view the store holds), rendered for the
teacher from the decoded original file at the teacher's size as a build renders it, and for the
student from the stored image as the trainer renders it. The teacher scores each batch in the loop:
pooled embedding, patch grid (projected on the store's basis) and logits from the store's own head,
so that labelled training images are scored by the cross-fitted probe that never saw their label.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch

from featurestore import views
from featurestore.common.options import from_dict
from featurestore.pipeline.config import BuildConfig
from featurestore.pipeline.heads import Probes, zeroshot_from_pooled
from featurestore.pipeline.scan import decode_side
from featurestore.pipeline.sources import decode, discover
from featurestore.pipeline.teacher_pass import load_basis
from featurestore.teachers import Teacher, load_teacher
from trainer.batches import Batch, mixed_targets
from trainer.loader import Loader

FRESH = 1 << 20              # view numbers beyond any store's K (at most 1,024): draws no store holds


def fresh_params(policy, idx: np.ndarray, epoch: int, seed: int, mates: list[np.ndarray]) -> np.ndarray:
    """(B, P) a fresh view of each image in `idx`, a function of (policy, image, seed, epoch)."""
    k = FRESH * (1 + seed) + epoch
    return np.stack([views.sample_view(policy, int(i), k, mates[int(i)]) for i in idx])


def sources_of(idx: np.ndarray, params: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """The images a batch of views reads (each view's image and its mixing partner, once each), and
    each view's slot in them and its partner's (-1: none), as views.render takes them."""
    partner = params[:, views.COL["mix_partner"]].astype(np.int64)
    needed = np.unique(np.concatenate([idx, partner[partner >= 0]]))
    slot = {int(i): j for j, i in enumerate(needed)}
    return (needed, torch.tensor([slot[int(i)] for i in idx]),
            torch.tensor([slot[int(p)] if p >= 0 else -1 for p in partner]))


class OnlineTeacher:
    """The first teacher of a store, run again on any views of its images, with the store's heads."""

    def __init__(self, store, device: torch.device | str = "cpu", teacher: Teacher | None = None):
        a, t = store.attrs, store.teacher()
        self.name = t.name
        self.cfg = from_dict(BuildConfig, a["config"])
        self.teacher = teacher or load_teacher(t.info["id"], t.info.get("revision"), str(device),
                                               self.cfg.teacher.dtype)
        self.grid = a["patch_grid"]
        self.basis = load_basis(store) if t.patch_dim != t.token_dim else None
        self.heads = {}
        if "probe" in store.heads():
            h = store.head_arrays("probe")
            self.heads["probe"] = Probes(h["fold_weight"], h["fold_bias"], h["weight"], h["bias"])
        if "zeroshot" in store.heads():
            self.heads["zeroshot"] = store.head_arrays("zeroshot")
        listing = discover(self.cfg.images, self.cfg.manifest, self.cfg.classes_file, self.cfg.unlabeled,
                           allow_outside_paths=True)
        by_id = {s.rel: s.path for s in listing.sources}
        self.paths = [by_id[i] for i in store.ids()]
        self.side = decode_side(self.teacher.pre.size, a["image_size"])
        self.split = store.read("split")
        self.mates = [m for a0 in range(0, store.num_images, store.chunk_size)
                      for m in views.partners(views.mixing_groups(self.split[a0:a0 + store.chunk_size]), a0)]

    @functools.lru_cache(maxsize=8192)                 # noqa: B019 - one teacher per benchmark run
    def original(self, i: int) -> torch.Tensor:
        """Store image i decoded from its file as a build decodes it: uint8 (3, H, W)."""
        d = decode(self.paths[i], self.cfg.min_side, self.cfg.max_pixels, self.side)
        return torch.from_numpy(d.rgb).permute(2, 0, 1).contiguous()

    def targets(self, idx: np.ndarray, params: np.ndarray, head: str | None, need_pooled: bool,
                need_patches: bool) -> dict[str, torch.Tensor | None]:
        """The teacher's outputs on the views `params` (B, P) of images `idx`: logits (of `head`),
        pooled, patches, as a build would store them for those views (in float32)."""
        needed, index, partner_index = sources_of(idx, params)
        sources = [self.original(int(i)).to(self.teacher.device) for i in needed]
        pix = self.teacher.render(sources, index, torch.from_numpy(params), partner_index)
        pooled, patches = self.teacher.encode(pix, self.grid if need_patches else 0)
        if patches is not None and self.basis is not None:
            patches = self.basis.project(patches)
        logits = None
        if head == "probe":
            logits = torch.from_numpy(self.heads["probe"].score(pooled.cpu().numpy()[:, None], self.split[idx])[:, 0])
        elif head == "zeroshot":
            logits = torch.from_numpy(zeroshot_from_pooled(pooled.cpu().numpy(), self.heads["zeroshot"]))
        return {"logits": logits, "pooled": pooled if need_pooled else None, "patches": patches}


class OnlineLoader(Loader):
    """The trainer's batches with fresh views scored by the teacher in the loop (see the module)."""

    def __init__(self, *args, teacher: OnlineTeacher, **kw):
        super().__init__(*args, **kw)
        self.teacher = teacher
        self.views_scored = 0                   # teacher forward passes, one per view

    def read_ahead(self, epoch: int) -> None:
        pass                                    # every batch is made when it is asked for

    def epoch(self, epoch: int, ahead: bool = True) -> Iterator[Batch]:
        d, c, t = self.data, self.cfg, self.teacher
        kd = [k for k in d.names if k.startswith("logits:")]
        head = d.names[kd[0]].rsplit("/", 1)[-1] if kd else None
        for idx, _ in self.plan(epoch).batches:
            params = fresh_params(t.cfg.views, idx, epoch, self.seed, t.mates)
            out = t.targets(idx, params, head, f"pooled:{t.name}" in d.names, f"patches:{t.name}" in d.names)
            self.views_scored += len(idx)
            needed, index, partner_index = sources_of(idx, params)
            src = [torch.from_numpy(im).permute(2, 0, 1) for im in d.rows(needed)]
            pixels = views.render(src, index, torch.from_numpy(params), c.size, "bilinear", partner_index,
                                  c.mean, c.std, self.caps.batched_kernels).to(self.device)
            partner = params[:, views.COL["mix_partner"]].astype(np.int64)
            labels = torch.from_numpy(d.labels[idx])
            targets = mixed_targets(labels, d.labels, partner, params[:, views.COL["mix_lambda"]], len(d.classes))

            def dev(x, by_teacher=True):
                if x is None:
                    return None
                return {t.name: x.float().to(self.device)} if by_teacher else x.float().to(self.device)
            yield Batch(pixels, labels.to(self.device), targets.to(self.device), dev(out["logits"], False),
                        dev(out["pooled"]), dev(out["patches"]), torch.from_numpy(idx),
                        torch.full((len(idx),), -1))
