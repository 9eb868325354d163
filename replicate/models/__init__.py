"""Backbones by name: `archs` (the registry), `weights` and `downloads` (pretrained weights and
their caches), `backbones` (the network fastai builds, `replicate archs`), `learner` (a resolved
arch -> a fastai Learner, and its fit)."""
