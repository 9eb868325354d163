"""The study's protocol mechanics, for the study's five backbones and three timm families.

    python -m pytest tests/test_models.py

Frozen: exactly the new layer(s) change after a training step. Unfrozen: every parameter does.
Optimizer: SGD, momentum 0.9, no weight decay, constant learning rate.
"""

from __future__ import annotations

import copy
import dataclasses

import fastai.callback.core
import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
import numpy as np
import pytest
import timm
import torch
from fastai.data.transforms import Normalize
from fastai.optimizer import SGD
from fastai.vision.core import PILImage
from fastai.vision.learner import TimmBody
from torch import nn

from replicate.cli import app
from replicate.config import STUDY_ARCHS, RunConfig
from replicate.errors import ReplicateError
from replicate.models import archs, backbones, downloads, weights
from replicate.models import learner as learners
from replicate.training import dataloaders

# Small but valid sizes; Inception at 299, the smallest size its auxiliary classifier accepts.
SIZES = {"resnet18": 32, "alexnet": 64, "vgg11_bn": 32, "densenet121": 32, "inception_v3": 299}
# timm, one small model per family: a CNN with BatchNorm, a ConvNeXt (LayerNorm), a ViT (LayerNorm,
# position embeddings resampled to the input size).
TIMM = {"efficientnet_b0": 32, "convnext_atto": 32, "vit_tiny_patch16_224": 32}
ALL = [*archs.ARCHS, *TIMM]
SIZES.update(TIMM)


def learner(tiny_task, arch: str, unfreeze: bool, **kw):
    cfg = RunConfig(
        "toy",
        arch,
        unfreeze=unfreeze,
        size=SIZES[arch],
        pretrained=False,
        bs=8,
        workers=0,
        data_dir=tiny_task,
        **kw,
    )
    dls = dataloaders.dataloaders(
        dataloaders.scan_task(cfg.task_dir), cfg, archs.resolve(cfg).preprocess, torch.device("cpu")
    )
    return learners.create_learner(dls, cfg, archs.resolve(cfg))


def one_step(learn) -> set[str]:
    """Names of the parameters that changed in one epoch of one batch (8 train images, bs 8)."""
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    learn.fit(1)
    return {n for n, p in learn.model.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_registry_holds_the_five_study_backbones():
    assert list(archs.ARCHS) == ["resnet18", "alexnet", "vgg11_bn", "densenet121", "inception_v3"]
    assert (
        tuple(archs.ARCHS) == STUDY_ARCHS
    )  # the names the command line shows without loading PyTorch


@pytest.mark.parametrize("arch", ALL)
def test_frozen_trains_exactly_the_new_classifier(tiny_task, arch):
    learn = learner(tiny_task, arch, unfreeze=False, lr=0.5)
    with learn.no_bar(), learn.no_logging():
        changed = one_step(learn)
    new = {n for n, _ in learn.model[1].named_parameters()}
    assert changed == {f"1.{n}" for n in new}
    # ...and the new layers are fresh Linear layers with one output per class, nothing else.
    linears = [m for m in learn.model[1].modules() if isinstance(m, nn.Linear)]
    assert all(m.out_features == 2 for m in linears)
    assert len(linears) == (2 if arch == "inception_v3" else 1)  # Inception: main + auxiliary
    assert len(new) == 2 * len(linears)


class GradientsSeen(fastai.callback.core.Callback):
    """Names of the parameters that got a nonzero gradient in the last backward pass."""

    def after_backward(self):
        self.names = {
            n
            for n, p in self.learn.model.named_parameters()
            if p.grad is not None and bool(p.grad.abs().sum() > 0)
        }


@pytest.mark.parametrize("arch", ALL)
def test_unfrozen_trains_every_parameter(tiny_task, arch):
    # A large LR so that every update shows in float32 (at 1e-3 a tiny gradient on a
    # BatchNorm weight of 1.0 rounds away); which parameters move does not depend on the LR.
    learn = learner(tiny_task, arch, unfreeze=True, lr=0.5)
    seen = GradientsSeen()
    with learn.no_bar(), learn.no_logging(), learn.added_cbs(seen):
        changed = one_step(learn)
    every = {n for n, _ in learn.model.named_parameters()}
    in_optimizer = {id(p) for group in learn.opt.param_lists for p in group}
    assert seen.names == every and all(id(p) in in_optimizer for p in learn.model.parameters())
    if arch in archs.ARCHS:
        assert changed == every
    else:
        # A fresh ConvNeXt scales each block by 1e-6 (layer scale), so some norm weights' updates
        # round away at 1.0 in float32 even at this LR; every one of them got its gradient above.
        assert len(changed) > 0.9 * len(every)


@pytest.mark.parametrize("arch", ALL)
def test_body_is_the_whole_pretrained_network_minus_its_last_linear(arch):
    """Same forward as the network whose last Linear is the new one (timm: its `get_classifier()`)."""
    spec = archs.get_arch(arch)
    reference = backbones.Backbone(arch, size=SIZES[arch])(pretrained=False).eval()
    last = {
        "resnet18": "fc",
        "alexnet": "classifier.6",
        "vgg11_bn": "classifier.6",
        "densenet121": "classifier",
        "inception_v3": "fc",
    }.get(arch)
    classifier = reference.get_submodule(last) if last else reference.get_classifier()
    classifier = copy.deepcopy(classifier)
    body = spec.cut(copy.deepcopy(reference))  # same weights
    x = torch.randn(2, 3, SIZES[arch], SIZES[arch])
    with torch.no_grad():
        features = body(x)
        expected = reference(x)
        got = classifier(features)
    assert features.shape[1] == spec.n_features and isinstance(classifier, nn.Linear)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(
    "arch, norm",
    [
        ("efficientnet_b0", nn.BatchNorm2d),
        ("convnext_atto", nn.LayerNorm),
        ("vit_tiny_patch16_224", nn.LayerNorm),
    ],
)
def test_timm_families_have_the_normalisation_the_frozen_test_covers(tiny_task, arch, norm):
    learn = learner(tiny_task, arch, unfreeze=False)
    assert any(isinstance(m, norm) for m in learn.model[0].modules())
    assert not any(p.requires_grad for p in learn.model[0].parameters())  # frozen: the norms too


def test_timm_input_comes_from_the_pretrained_config(tiny_task):
    from timm.data import resolve_model_data_config

    for name in ("vit_small_patch16_224.augreg_in21k_ft_in1k", "resnet10t", "convnext_tiny"):
        expected = resolve_model_data_config(timm.create_model(name, pretrained=False))
        spec = archs.get_arch(name)
        assert (
            spec.input_size == expected["input_size"][-1] and spec.crop_pct == expected["crop_pct"]
        )
        assert spec.mean == tuple(expected["mean"]) and spec.std == tuple(expected["std"])
        assert spec.interpolation == expected["interpolation"]
    assert (
        archs.resolve(RunConfig("toy", "resnet10t"), fetch=False).size == 176
    )  # timm's own, not 224
    learn = learner(tiny_task, "vit_tiny_patch16_224", unfreeze=False)
    norm = next(t for t in learn.dls.after_batch.fs if isinstance(t, Normalize))
    assert norm.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # this ViT's statistics, not ImageNet's
    crop = next(t for t in learn.dls.valid.after_item.fs if isinstance(t, dataloaders.ValidCrop))
    assert crop.crop_pct == 0.9


def test_valid_crop_takes_the_centre_share_of_the_short_side():
    image = PILImage.create(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3)))
    full, centre = (
        np.array(dataloaders.ValidCrop(50, crop_pct=p)(image, split_idx=1)) for p in (1.0, 0.5)
    )
    assert full.shape == centre.shape == (50, 50, 3)
    assert (
        abs(int(full[0, 0, 0]) - 50) <= 2 and abs(int(full[0, -1, 0]) - 149) <= 2
    )  # columns 50..149
    assert (
        abs(int(centre[0, 0, 0]) - 75) <= 2 and abs(int(centre[0, -1, 0]) - 124) <= 2
    )  # columns 75..124


def test_optimizer_is_sgd_momentum_constant_lr_no_weight_decay(tiny_task):
    learn = learner(tiny_task, "resnet18", unfreeze=True, lr=0.01)
    with learn.no_bar(), learn.no_logging():
        learn.fit(3)
    assert learn.opt_func.func is SGD
    hypers = learn.opt.hypers
    assert all(h["lr"] == 0.01 and h["mom"] == 0.9 and h["wd"] == 0 for h in hypers)
    assert learn.recorder.lrs == [0.01] * 3  # one step per epoch, same LR each time


def test_inception_adds_the_auxiliary_loss(tiny_task):
    learn = learner(tiny_task, "inception_v3", unfreeze=False)
    assert any(isinstance(cb, learners.AuxLossCallback) for cb in learn.cbs)
    xb, yb = learn.dls.one_batch()
    learn.model.train()
    with torch.no_grad():
        main, aux = learn.model(xb)
    expected = learn.loss_func(main, yb) + 0.4 * learn.loss_func(aux, yb)
    learn.xb, learn.yb, learn.pred = (xb,), (yb,), (main, aux)
    learn.training = True
    cb = next(cb for cb in learn.cbs if isinstance(cb, learners.AuxLossCallback))
    cb.after_pred()
    learn.loss_grad = learn.loss_func(learn.pred, yb)
    cb.after_loss()
    assert torch.allclose(learn.loss, expected)
    learn.model.eval()
    with torch.no_grad():
        assert learn.model(xb).shape == (len(xb), 2)  # predictions come from the main output only


def test_inception_below_299px_trains_without_the_auxiliary_branch(tiny_task):
    assert archs.uses_aux(archs.get_arch("inception_v3"), 299)
    assert not archs.uses_aux(archs.get_arch("inception_v3"), 160)
    cfg = RunConfig(
        "toy", "inception_v3", size=160, pretrained=False, bs=8, workers=0, data_dir=tiny_task
    )
    dls = dataloaders.dataloaders(
        dataloaders.scan_task(cfg.task_dir), cfg, archs.resolve(cfg).preprocess, torch.device("cpu")
    )
    small = learners.create_learner(dls, cfg, archs.resolve(cfg))
    assert small.model[0].AuxLogits is None and small.model[1].aux_fc is None
    assert not any(isinstance(cb, learners.AuxLossCallback) for cb in small.cbs)
    with small.no_bar(), small.no_logging():
        small.fit(1)


def test_size_below_the_minimum_and_unknown_arch_are_user_errors():
    with pytest.raises(ReplicateError, match="at least 63"):
        archs.resolve(RunConfig("t", "alexnet", size=32), fetch=False)
    with pytest.raises(
        ReplicateError, match="unknown arch 'resnet19': not one of the study's five"
    ) as err:
        archs.get_arch("resnet19")
    assert "did you mean resnet18" in str(err.value)
    with pytest.raises(ReplicateError, match="did you mean convnext_tiny"):
        archs.get_arch("convnext_tni")
    with pytest.raises(
        ReplicateError, match="no weights tagged 'nope' for resnet50 .*resnet50.a1_in1k"
    ):
        archs.get_arch("resnet50.nope")


def test_any_timm_name_is_an_arch_and_the_study_names_stay_torchvision():
    assert archs.get_arch("resnet18").source == "torchvision"
    tagged = archs.get_arch("resnet50.a1_in1k")
    assert tagged.source == "timm" and tagged.weights == weights.HubFile("timm/resnet50.a1_in1k")
    assert tagged.n_features == 2048


def test_archs_are_described_from_the_network(runner):
    resnet = backbones.describe("resnet18")
    params = sum(p.numel() for p in backbones.Backbone("resnet18")(pretrained=False).parameters())
    assert resnet["params_M"] == pytest.approx(params / 1e6)
    assert resnet["GFLOPs"] == pytest.approx(
        3.64, abs=0.05
    )  # 1.82 GMACs, as torchvision's model card says
    vit = backbones.describe("vit_small_patch16_224")
    assert vit["input_px"] == 224 and vit["params_M"] == pytest.approx(22.05, abs=0.01)
    result = runner.invoke(app, ["archs"])
    assert result.exit_code == 0
    for name in (*archs.ARCHS, *archs.MODERN):
        assert name in result.output


def test_missing_weights_offline_name_the_file_and_the_cache(offline):
    with pytest.raises(ReplicateError) as err:
        archs.ensure_weights(archs.get_arch("densenet121"))
    message = str(err.value)
    assert "densenet121-a639ec97.pth" in message and str(offline / "hub" / "checkpoints") in message
    assert "--no-pretrained" in message and "\n" not in message


def test_cached_weights_are_loaded_without_network(offline):
    arch = archs.get_arch("resnet18")
    path, _ = downloads.torchvision_source(arch.weights.url)
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(backbones.Backbone("resnet18")(pretrained=False).state_dict(), path)
    loaded = backbones.Backbone("resnet18")(pretrained=True)
    assert torch.equal(loaded.state_dict()["conv1.weight"], torch.load(path)["conv1.weight"])


def test_fastai_recipe_frozen_trains_its_head_and_the_batchnorm_layers(tiny_task):
    learn = learner(tiny_task, "resnet18", unfreeze=False, recipe="fastai", lr=0.5)
    with learn.no_bar(), learn.no_logging():
        changed = one_step(learn)
    body_bn = {n for n, m in learn.model[0].named_modules() if isinstance(m, nn.BatchNorm2d)}
    expected = {f"1.{n}" for n, _ in learn.model[1].named_parameters()}
    expected |= {f"0.{m}.{p}" for m in body_bn for p in ("weight", "bias")}
    assert changed == expected
    assert (
        len([m for m in learn.model[1].modules() if isinstance(m, nn.Linear)]) == 2
    )  # fastai's own head


def test_fastai_recipe_on_timm_uses_fastais_timm_support(tiny_task):
    learn = learner(tiny_task, "convnext_atto", unfreeze=False, recipe="fastai", lr=0.5)
    assert isinstance(learn.model[0], TimmBody)
    assert (
        len([m for m in learn.model[1].modules() if isinstance(m, nn.Linear)]) == 2
    )  # fastai's own head
    with learn.no_bar(), learn.no_logging():
        changed = one_step(learn)
    assert {n for n in changed if n.startswith("1.")} == {
        f"1.{n}" for n, _ in learn.model[1].named_parameters()
    }


def test_fastai_recipe_from_random_init_trains_every_layer_in_one_cycle(tiny_task):
    cfg = RunConfig(
        "toy",
        "resnet18",
        unfreeze=True,
        recipe="fastai",
        size=32,
        pretrained=False,
        bs=2,
        epochs=2,
        workers=0,
        data_dir=tiny_task,
    )
    dls = dataloaders.dataloaders(
        dataloaders.scan_task(cfg.task_dir), cfg, archs.resolve(cfg).preprocess, torch.device("cpu")
    )
    learn = learners.create_learner(dls, cfg, archs.resolve(cfg))
    lr = learners.learning_rate(learn, cfg)
    assert lr == learners.FROM_SCRATCH_LR
    first_epoch = {}

    class AfterFirstEpoch(fastai.callback.core.Callback):
        def after_epoch(self):
            if not first_epoch:
                first_epoch.update(
                    {n: p.detach().clone() for n, p in self.learn.model.named_parameters()}
                )

    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    with learn.no_bar(), learn.no_logging(), learn.added_cbs(AfterFirstEpoch()):
        learners.fit(learn, cfg, lr)
    # No head-only first epoch: the body moved in epoch 1 (fine_tune would have kept it).
    assert all(not torch.equal(first_epoch[n], before[n]) for n in before)
    lrs = learn.recorder.lrs  # one cycle over both epochs (fine_tune: a second fit of 1 epoch)
    assert len(lrs) == 2 * len(dls.train) and max(lrs) == pytest.approx(lr)
    assert (
        lrs[0] == pytest.approx(lr / 25) and lrs[-1] < lr / 10
    )  # warm up from lr/25, anneal towards 0
    assert (
        len({h["lr"] for h in learn.opt.hypers}) == 1
    )  # one rate for every layer, no lr/100 for the body


def test_fastai_recipe_rate_lr_find_from_pretrained_weights_fixed_from_random_init(tiny_task):
    learn = learner(tiny_task, "resnet18", unfreeze=False, recipe="fastai")
    cfg = RunConfig(
        "toy", "resnet18", recipe="fastai", size=32, pretrained=False, data_dir=tiny_task
    )
    assert learners.learning_rate(learn, cfg) == learners.FROM_SCRATCH_LR
    suggested = learners.learning_rate(
        learn, dataclasses.replace(cfg, pretrained=True)
    )  # lr_find's valley
    assert suggested != learners.FROM_SCRATCH_LR and 1e-7 < suggested < 10
    assert learners.learning_rate(learn, dataclasses.replace(cfg, lr=0.02)) == 0.02
