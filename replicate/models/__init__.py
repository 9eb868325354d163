"""Backbones by name: `archs` (the registry), `weights` and `downloads` (pretrained weights and
their caches), `learner` (a resolved arch -> a fastai Learner, and its fit)."""
