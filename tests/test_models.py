"""The study's protocol mechanics, for every backbone in the registry.

    python -m pytest tests/test_models.py

Frozen: exactly the new layer(s) change after a training step. Unfrozen: every parameter does.
Optimizer: SGD, momentum 0.9, no weight decay, constant learning rate.
"""
from __future__ import annotations

import copy

import pytest
import torch
import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
from fastai.optimizer import SGD
from torch import nn

from replicate import data, models
from replicate.config import RunConfig
from replicate.errors import ReplicateError

# Small but valid sizes; Inception at 299, the smallest size its auxiliary classifier accepts.
SIZES = {"resnet18": 32, "alexnet": 64, "vgg11_bn": 32, "densenet121": 32, "inception_v3": 299}


def learner(tiny_task, arch: str, unfreeze: bool, **kw):
    cfg = RunConfig("toy", arch, unfreeze=unfreeze, size=SIZES[arch], pretrained=False, bs=8, workers=0,
                    data_dir=tiny_task, **kw)
    dls = data.dataloaders(data.scan_task(cfg.task_dir), cfg, SIZES[arch], torch.device("cpu"))
    return models.create_learner(dls, cfg)


def one_step(learn) -> set[str]:
    """Names of the parameters that changed in one epoch of one batch (8 train images, bs 8)."""
    before = {n: p.detach().clone() for n, p in learn.model.named_parameters()}
    learn.fit(1)
    return {n for n, p in learn.model.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_registry_holds_the_five_study_backbones():
    assert list(models.ARCHS) == ["resnet18", "alexnet", "vgg11_bn", "densenet121", "inception_v3"]


@pytest.mark.parametrize("arch", list(models.ARCHS))
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


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_unfrozen_trains_every_parameter(tiny_task, arch):
    # A large LR so that every update shows in float32 (at 1e-3 a tiny gradient on a
    # BatchNorm weight of 1.0 rounds away); which parameters move does not depend on the LR.
    learn = learner(tiny_task, arch, unfreeze=True, lr=0.5)
    with learn.no_bar(), learn.no_logging():
        changed = one_step(learn)
    assert changed == {n for n, _ in learn.model.named_parameters()}


@pytest.mark.parametrize("arch", list(models.ARCHS))
def test_body_is_the_whole_pretrained_network_minus_its_last_linear(arch):
    """Same forward as the torchvision network whose last Linear is the new one."""
    spec = models.get_arch(arch)
    reference = models.Backbone(arch)(pretrained=False).eval()
    body = spec.cut(copy.deepcopy(reference))  # same weights
    x = torch.randn(2, 3, SIZES[arch], SIZES[arch])
    with torch.no_grad():
        features = body(x)
        last = {"resnet18": "fc", "alexnet": "classifier.6", "vgg11_bn": "classifier.6",
                "densenet121": "classifier", "inception_v3": "fc"}[arch]
        expected = reference(x)
        got = reference.get_submodule(last)(features)
    assert features.shape[1] == spec.n_features
    assert torch.allclose(got, expected, atol=1e-5)


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
    assert any(isinstance(cb, models.AuxLossCallback) for cb in learn.cbs)
    xb, yb = learn.dls.one_batch()
    learn.model.train()
    with torch.no_grad():
        main, aux = learn.model(xb)
    expected = learn.loss_func(main, yb) + 0.4 * learn.loss_func(aux, yb)
    learn.xb, learn.yb, learn.pred = (xb,), (yb,), (main, aux)
    learn.training = True
    cb = next(cb for cb in learn.cbs if isinstance(cb, models.AuxLossCallback))
    cb.after_pred()
    learn.loss_grad = learn.loss_func(learn.pred, yb)
    cb.after_loss()
    assert torch.allclose(learn.loss, expected)
    learn.model.eval()
    with torch.no_grad():
        assert learn.model(xb).shape == (len(xb), 2)  # predictions come from the main output only


def test_inception_below_299px_trains_without_the_auxiliary_branch(tiny_task):
    assert models.uses_aux(models.get_arch("inception_v3"), 299)
    assert not models.uses_aux(models.get_arch("inception_v3"), 160)
    cfg = RunConfig("toy", "inception_v3", size=160, pretrained=False, bs=8, workers=0, data_dir=tiny_task)
    dls = data.dataloaders(data.scan_task(cfg.task_dir), cfg, 160, torch.device("cpu"))
    small = models.create_learner(dls, cfg)
    assert small.model[0].AuxLogits is None and small.model[1].aux_fc is None
    assert not any(isinstance(cb, models.AuxLossCallback) for cb in small.cbs)
    with small.no_bar(), small.no_logging():
        small.fit(1)


def test_size_below_the_minimum_and_unknown_arch_are_user_errors():
    with pytest.raises(ReplicateError, match="at least 63"):
        models.input_size(RunConfig("t", "alexnet", size=32))
    with pytest.raises(ReplicateError, match="unknown arch 'resnet19': choose one of resnet18, alexnet"):
        models.get_arch("resnet19")


def test_missing_weights_offline_name_the_file_and_the_cache(offline):
    with pytest.raises(ReplicateError) as err:
        models.ensure_weights(models.get_arch("densenet121"))
    message = str(err.value)
    assert "densenet121-a639ec97.pth" in message and str(offline / "hub" / "checkpoints") in message
    assert "--no-pretrained" in message and "\n" not in message


def test_cached_weights_are_loaded_without_network(offline):
    arch = models.get_arch("resnet18")
    path, _ = models.weights_path(arch)
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(models.Backbone("resnet18")(pretrained=False).state_dict(), path)
    loaded = models.Backbone("resnet18")(pretrained=True)
    assert torch.equal(loaded.state_dict()["conv1.weight"], torch.load(path)["conv1.weight"])


def test_fastai_recipe_frozen_trains_its_head_and_the_batchnorm_layers(tiny_task):
    learn = learner(tiny_task, "resnet18", unfreeze=False, recipe="fastai", lr=0.5)
    with learn.no_bar(), learn.no_logging():
        changed = one_step(learn)
    body_bn = {n for n, m in learn.model[0].named_modules() if isinstance(m, nn.BatchNorm2d)}
    expected = {f"1.{n}" for n, _ in learn.model[1].named_parameters()}
    expected |= {f"0.{m}.{p}" for m in body_bn for p in ("weight", "bias")}
    assert changed == expected
    assert len([m for m in learn.model[1].modules() if isinstance(m, nn.Linear)]) == 2  # fastai's own head
