"""The step benchmark's cases (benchmarks/step.py): the shapes, the models, and for each variant its
strategy, optimizer, data and the step function that is timed.

Every variant the benchmark knows is built here, the replay variants included (``replay_kd``: a
real view store written by ``_strategy``, the replay hook in ``cmkd_step``; ``teacher_views``:
``views_step``), together with the first-loss parity check against the reference code.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch
from _reference import NORM, ReferenceClips, SyntheticClips, reference_models, reference_optimizer, reference_step
from _step_measure import Case
from torch import nn

import cmkd.distill.strategies  # noqa: F401 - registers logit_kd, offline_kd, none
from cmkd.audio.augment import Mixup, SpecAugment
from cmkd.audio.features import Fbank
from cmkd.audio.views import draw_views
from cmkd.device import autocast
from cmkd.distill.losses import BCE
from cmkd.distill.offline import save_teacher_logits
from cmkd.distill.view_store import pack_rows, write_manifest, write_shard
from cmkd.models.classifier import build_classifier
from cmkd.registry import backbones, heads, strategies
from cmkd.train.optim import build_optimizer
from cmkd.train.pipeline import DataWait, compile_models

SHAPES: dict[str, dict[str, Any]] = {
    # The paper's: EfficientNet-B2, AST-base (DeiT-base 768/12/12, stride 10), 10 s → 128 × 1024,
    # AudioSet's 527 classes.
    "paper": dict(n_mels=128, frames=1024, seconds=10.0, cnn="efficientnet_b2", embed_dim=768, depth=12, heads=12,
                  classes=527, freqm=48, timem=192, batch={"cpu": 2, "cuda": {"ast": 12, "cnn": 24}}),
    # Small enough for a loaded laptop CPU: B0, a 4-block 192-wide AST, 2.56 s clips.
    "small": dict(n_mels=64, frames=256, seconds=2.56, cnn="efficientnet_b0", embed_dim=192, depth=4, heads=3,
                  classes=50, freqm=12, timem=48, batch={"cpu": 8, "cuda": {"ast": 32, "cnn": 32}}),
    # For tests and dry runs: timm's 0.1 M-parameter EfficientNet, a 2-block 32-wide AST, 1 s clips.
    "tiny": dict(n_mels=32, frames=100, seconds=1.0, cnn="test_efficientnet", embed_dim=32, depth=2, heads=2,
                 classes=10, freqm=8, timem=20, batch={"cpu": 2, "cuda": {"ast": 2, "cnn": 2}}),
}
LR = {"ast": 5e-5, "cnn": 5e-4}  # gin/models.gin AST_LR / CNN_LR
DIRECTIONS = {"cnn_to_ast": ("cnn", "ast"), "ast_to_cnn": ("ast", "cnn")}
VARIANTS = ("cmkd", "reference", "no_kd", "offline_kd", "replay_kd", "teacher_views", "compiled")


def build_model(kind: str, shape: dict[str, Any], device: torch.device) -> nn.Module:
    """The paper's CNN (efficientnet + mean + linear) or AST (ast + token + LayerNorm/linear), via cmkd's registries."""
    in_shape = (shape["n_mels"], shape["frames"])
    if kind == "cnn":
        bb = backbones.get("efficientnet")(name=shape["cnn"], pretrained=False)
        head = heads.get("linear")(in_dim=bb.out_dim, num_classes=shape["classes"])
        model = build_classifier(shape["classes"], in_shape, backbone=bb, pooler="mean", head=head)
    else:
        bb = backbones.get("ast")(in_shape=in_shape, embed_dim=shape["embed_dim"], depth=shape["depth"],
                                  num_heads=shape["heads"], pretrained=False)
        head = heads.get("linear")(in_dim=bb.out_dim, num_classes=shape["classes"], norm=True)
        model = build_classifier(shape["classes"], in_shape, backbone=bb, pooler="token", head=head)
    return model.to(device)


def loader(dataset: torch.utils.data.Dataset, batch: int, workers: int,
           device: torch.device) -> torch.utils.data.DataLoader:
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9,
                                             generator=torch.Generator().manual_seed(0))
    kwargs: dict[str, Any] = dict(batch_size=batch, sampler=sampler, num_workers=workers,
                                  pin_memory=device.type == "cuda", drop_last=True)
    if workers:
        kwargs["prefetch_factor"] = 2  # cmkd's default (webdataset.prefetch_factor)
    return torch.utils.data.DataLoader(dataset, **kwargs)


def make_cases(shape: dict[str, Any], direction: str, variants: list[str], device: torch.device, batch: int,
               workers: int, tmp: str, n_clips: int) -> list[Case]:
    t_kind, s_kind = DIRECTIONS[direction]
    torch.manual_seed(0)
    teacher0, student0 = build_model(t_kind, shape, device), build_model(s_kind, shape, device)
    clips = SyntheticClips(n_clips, shape["seconds"], shape["classes"])
    cases: list[Case] = []
    lr = LR[s_kind]
    for variant in variants:
        name = f"{direction}/{variant}"
        if variant == "reference":
            student, teacher = reference_models(student0, teacher0)
            teacher.requires_grad_(False)
            opt = reference_optimizer(student.parameters(), lr)
            ds = ReferenceClips(clips, shape["n_mels"], shape["frames"], shape["freqm"], shape["timem"], mixup=0.5)
            data = loader(ds, batch, workers, device)
            holder: dict[str, Any] = {}

            def wrap(fresh: bool, data=data, holder=holder, student=student, teacher=teacher, opt=opt) -> DataWait:
                if fresh or "step" not in holder:
                    holder["waits"] = DataWait()
                    holder["it"] = holder["waits"].wrap(iter(data))
                    holder["step"] = reference_step(student, teacher, opt, holder["it"], device)
                return holder["waits"]

            def step(holder=holder) -> float:
                return holder["step"]()

            cases.append(Case(name, step, wrap, batch, (student, teacher, opt), student, teacher))
            continue
        if variant == "teacher_views":
            teacher = copy.deepcopy(teacher0)
            featurizer = Fbank(n_mels=shape["n_mels"], target_frames=shape["frames"], mean=NORM[0],
                               std=NORM[1]).to(device)
            data, holder = loader(clips, batch, workers, device), {}

            def wrap(fresh: bool, data=data, holder=holder) -> DataWait:
                if fresh or "it" not in holder:
                    holder["waits"] = DataWait()
                    holder["it"] = holder["waits"].wrap(iter(data))
                return holder["waits"]

            step = views_step(teacher, featurizer, SpecAugment(shape["freqm"], shape["timem"]), Mixup(0.5, 10.0),
                              holder, device)
            cases.append(Case(name, step, wrap, batch, (teacher,), teacher, None))
            continue
        student = copy.deepcopy(student0)
        teacher = copy.deepcopy(teacher0) if variant in ("cmkd", "compiled") else None  # others run no teacher
        strat = _strategy(variant, teacher, shape, device, clips, tmp, direction, batch)
        if variant == "compiled":
            compile_models(student, *strat.teachers)
        opt = build_optimizer(student.parameters(), device, name="adam", lr=lr, weight_decay=5e-7, betas=(0.95, 0.999))
        featurizer = Fbank(n_mels=shape["n_mels"], target_frames=shape["frames"], mean=NORM[0], std=NORM[1]).to(device)
        specaug = SpecAugment(shape["freqm"], shape["timem"])
        mix = None if variant == "offline_kd" else Mixup(0.5, 10.0)
        data = loader(clips, batch, workers, device)
        holder = {}

        def wrap(fresh: bool, data=data, holder=holder) -> DataWait:
            if fresh or "it" not in holder:
                holder["waits"] = DataWait()
                holder["it"] = holder["waits"].wrap(iter(data))
            return holder["waits"]

        step = cmkd_step(student, strat, opt, featurizer, specaug, mix, holder, device)
        teachers = list(getattr(strat, "teachers", []))
        first_teacher = teachers[0] if teachers else None
        cases.append(Case(name, step, wrap, batch, (student, *teachers, opt), student, first_teacher))
        cases[-1].bytes_per_clip_view = getattr(strat, "bytes_per_clip_view", None)
    return cases


def _strategy(variant: str, teacher: nn.Module | None, shape: dict[str, Any], device: torch.device,
              clips: SyntheticClips, tmp: str, direction: str, batch: int = 2) -> Any:
    loss = BCE()
    if variant == "no_kd":
        return strategies.get("none")(loss=loss)
    if variant == "offline_kd":
        url = f"{tmp}/{direction}-teacher.npy"
        rng = np.random.default_rng(0)
        logits = rng.standard_normal((len(clips), shape["classes"]), dtype=np.float32)
        save_teacher_logits(url, [clips.key(i) for i in range(len(clips))], logits, {"multilabel": True})
        return strategies.get("offline_kd")(loss=loss, multilabel=True, device=device, logits=url)
    if variant == "replay_kd":
        url = f"{tmp}/{direction}-views"
        keys = [clips.key(i) for i in range(len(clips))]
        per_step = [keys[i:i + batch] for i in range(0, len(keys) - batch + 1, batch)]
        views = [draw_views(k, 0, 0, Mixup(0.5, 10.0), SpecAugment(shape["freqm"], shape["timem"]),
                            (shape["n_mels"], shape["frames"])) for k in per_step]
        logits = [torch.randn(len(k), shape["classes"], generator=torch.Generator().manual_seed(i))
                  for i, k in enumerate(per_step)]
        shard = write_shard(url, 0, 0, pack_rows([k for ks in per_step for k in ks],
                                                 [i for i, ks in enumerate(per_step) for _ in ks], views, logits))
        write_manifest(url, dict(views=1, world_size=1), [shard])
        strat = strategies.get("replay_kd")(loss=loss, multilabel=True, device=device, store=url,
                                            view_settings=dict(epochs=1, world_size=1))
        strat.bytes_per_clip_view = shard["bytes"] / shard["rows"]
        strat.store_steps = len(per_step)
        return strat
    return strategies.get("logit_kd")(loss=loss, multilabel=True, load_teacher=lambda ref: teacher, device=device,
                                      lam=0.5, tau=1.0)


def cmkd_step(student: nn.Module, strat: Any, optimizer: torch.optim.Optimizer, featurizer: nn.Module,
              specaug: SpecAugment, mix: Mixup | None, holder: dict[str, Any],
              device: torch.device) -> Callable[[], float]:
    """The body of cmkd.train.trainer.Trainer.step, as it ships (kept in step with it by tests)."""
    student.train()

    replay = getattr(strat, "replay", None)

    def step() -> float:
        batch = next(holder["it"])
        wave = batch["wave"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        keys = list(batch["key"])
        if replay is not None:  # the store's keys, cycled: the random sampler's order is not known in advance
            n = holder["replayed"] = holder.get("replayed", -1) + 1
            keys = strat.store.batch(0, 0, n % strat.store_steps)[0]
        views = draw_views(keys, 0, 0, mix, specaug, featurizer.out_shape)  # as Trainer.step
        wave, target = views.mix(wave, target)
        if replay is not None:
            replay(0, 0, n % strat.store_steps, keys, views)
        with autocast(device, True):
            x = featurizer(wave, augment=views.mask if specaug is not None else None)
            logits = student(x)
            loss, _ = strat(x, logits.float(), target, keys=batch["key"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())  # the loop reads the loss every step, too

    return step


def views_step(teacher: nn.Module, featurizer: nn.Module, specaug: SpecAugment, mix: Mixup, holder: dict[str, Any],
               device: torch.device) -> Callable[[], float]:
    """One batch of `cmkd teacher-logits --views K` (cmkd.distill.view_store.write_view_store)."""
    teacher.eval()

    def step() -> float:
        batch = next(holder["it"])
        views = draw_views(list(batch["key"]), 0, 0, mix, specaug, featurizer.out_shape)
        wave, _ = views.mix(batch["wave"].to(device), batch["target"].to(device))
        with torch.inference_mode(), autocast(device, True):
            z = teacher(featurizer(wave, augment=views.mask))
        z.float().cpu().numpy().astype(np.float16)
        return 0.0

    return step


def loss_parity(shape: dict[str, Any], direction: str, device: torch.device) -> dict[str, float]:
    """The first loss of cmkd's path vs the reference path on one batch, same weights, augmentation off."""
    t_kind, s_kind = DIRECTIONS[direction]
    torch.manual_seed(0)
    teacher, student = build_model(t_kind, shape, device), build_model(s_kind, shape, device)
    clips = SyntheticClips(4, shape["seconds"], shape["classes"])
    batch = torch.utils.data.default_collate([clips[i] for i in range(2)])
    strat = _strategy("cmkd", teacher, shape, device, clips, "", direction)
    featurizer = Fbank(n_mels=shape["n_mels"], target_frames=shape["frames"], mean=NORM[0], std=NORM[1]).to(device)
    wave, target = batch["wave"].to(device), batch["target"].to(device)
    with torch.no_grad(), autocast(device, True):
        x = featurizer(wave)
        ours = float(strat(x, student(x).float(), target)[0])
    ref_student, ref_teacher = reference_models(student, teacher)
    ref_teacher.float()
    ds = ReferenceClips(clips, shape["n_mels"], shape["frames"], 0, 0, mixup=0.0, augment=False)
    xr = torch.stack([ds[i]["fbank"] for i in range(2)]).to(device)
    with torch.no_grad():
        from _reference import reference_kd_loss

        ref = float(reference_kd_loss(ref_student(xr), ref_teacher(xr), target))
    return dict(cmkd=ours, reference=ref, rel_diff=abs(ours - ref) / abs(ref))
