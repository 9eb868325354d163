"""Backbones by name: `Backbone` (the picklable `arch` fastai builds a network from), and what
`replicate archs` says of each (`describe`, `list_archs`).

    python -m replicate.models.backbones        # describes the study's five and today's picks
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import archs

# Module-level: an exported learner pickles it by name (replicate.models.backbones.Backbone).


@dataclass(frozen=True)
class Backbone:
    """A picklable, hashable `arch` for fastai: `Backbone("resnet18")(pretrained=True)` -> the network.

    fastai's `vision_learner` calls `arch(pretrained=...)` and looks up how to cut it in
    `fastai.vision.learner.model_meta` (it does not pass its own `cut` argument on for
    torchvision models), so each Backbone is registered there with its registry entry's cut.
    """

    name: str
    aux_logits: bool = True  # Inception v3 only
    recipe: str = "paper"  # which cut fastai applies: the study's (last Linear) or fastai's
    size: int | None = None  # timm ViTs: the input size (None: the pretrained one)
    weights: Path | None = None  # the file `archs.resolve` found (pretrained=True needs one)

    def __call__(self, pretrained: bool = False) -> nn.Module:
        arch = archs.get_arch(self.name)
        loadable = None
        if pretrained:  # the file a run resolved; else (a Backbone made by hand) the arch's own
            loadable = self.weights or arch.weights.loadable(arch.name)
        if arch.source == "timm":
            import timm

            kwargs = archs.timm_kwargs(arch, self.size or arch.input_size, loadable)
            return timm.create_model(arch.name, pretrained=pretrained, **kwargs)
        kwargs = {}
        if arch.aux_features:
            # transform_input: the ImageNet weights expect torchvision's own input rescaling.
            kwargs = dict(
                aux_logits=self.aux_logits, init_weights=not pretrained, transform_input=pretrained
            )
        model = arch.constructor(weights=None, **kwargs)
        if pretrained:
            state = torch.load(loadable, map_location="cpu", weights_only=True)
            if not self.aux_logits:
                state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
            model.load_state_dict(state)
        return model


def describe(name: str) -> dict:
    """An arch's source, input size, parameters and GFLOPs per image at that size, computed from
    the network built on the meta device (shapes only, no memory); weights: the cached file or ''.

    FLOPs are torch's FlopCounterMode count of one forward pass (a multiply-add counts 2)."""
    arch = archs.get_arch(name)
    with torch.device("meta"):
        model = Backbone(arch.name, aux_logits=False)(pretrained=False).eval()
        x = torch.empty(1, 3, arch.input_size, arch.input_size)
        with FlopCounterMode(display=False) as flops:
            model(x)
    cached = archs.cached_weights(arch)
    return {
        "arch": name,
        "source": arch.source,
        "input_px": arch.input_size,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "GFLOPs": flops.get_total_flops() / 1e9,
        "weights_from": arch.weights.where() if arch.weights else "none",
        "weights": str(cached) if cached else "",
    }


def list_archs(names: list[str] | None = None, log=print) -> pd.DataFrame:
    """`replicate archs`: `describe` of each backbone (default: the study's five, today's picks and
    those a pip package ships weights for), as a table said in the log; returns it."""
    rows = []
    for name in names or [*archs.ARCHS, *archs.MODERN, *archs.FROM_PIP]:
        d = describe(name)
        rows.append(
            {
                "arch": name,
                "from": "study (torchvision)" if name in archs.ARCHS else "timm",
                "input": f"{d['input_px']}px",
                "params": f"{d['params_M']:.1f}M",
                "GFLOPs": f"{d['GFLOPs']:.2f}",
                "weights from": d["weights_from"],
                "weights": d["weights"] or "not here",
            }
        )
    table = pd.DataFrame(rows)
    log(table.to_string(index=False))
    log(
        "\nGFLOPs: one image at the input size, a multiply-add counted as 2. "
        "Fetch weights ahead of time: replicate weights ARCH..."
    )
    return table


if __name__ == "__main__":
    for name in sys.argv[1:] or (*archs.ARCHS, *archs.MODERN):
        print(describe(name))
