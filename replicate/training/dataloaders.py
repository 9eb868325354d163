"""A task folder -> fastai DataLoaders: its images checked, decoded, cropped and normalised.

    replicate run rooms --arch resnet18   # scan_task checks data/rooms, dataloaders feeds the run

A task is a folder `data/TASK/{train,valid}/<class>/*.jpg` (`sources` writes one, from the Houses
Dataset or a user's own photos). `scan_task` checks it before any training; `dataloaders` builds
the DataLoaders a run trains on, with the decode and the crops prediction uses too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.transforms import GrandparentSplitter, IntToFloatTensor, Normalize, parent_label
from fastai.vision.augment import FlipItem, RandomResizedCrop, Resize, aug_transforms
from fastai.vision.core import PILImage
from fastai.vision.utils import verify_images
from fasttransform import Transform  # fastai's Transform base (fastai.imports re-exports it)
from PIL import Image

from .. import photos, runtime
from ..errors import ReplicateError
from ..folders import SPLITS, task_files
from ..photos import RESAMPLING, Preprocess, largest_crop, valid_crop


@dataclass(frozen=True)
class TaskImages:
    """The checked contents of a task folder."""

    files: list[Path]
    classes: list[str]
    counts: pd.DataFrame  # rows: classes; columns: train, valid
    skipped: list[Path]  # files that failed to decode


def scan_task(task_dir: Path) -> TaskImages:
    """Check a task folder's layout and images; ReplicateError with what to fix when it is wrong.

    Undecodable images are caught here, before training, and listed in `skipped` for the
    caller to report: a broken file must not kill a 30-epoch run in its 17th epoch.
    """
    files, classes = task_files(task_dir)
    everything = [f for fs in files.values() for f in fs]
    bad = set(verify_images(everything))
    counts = pd.DataFrame(
        {s: {c: len([f for f in files[s, c] if f not in bad]) for c in classes} for s in SPLITS}
    )
    if (counts == 0).any().any():
        raise ReplicateError(
            f"a class of {task_dir} has no readable images left: {counts.to_dict()}"
        )
    return TaskImages([f for f in everything if f not in bad], classes, counts, sorted(bad))


# Module-level transforms: an exported learner pickles them by name.
class OpenImage(Transform):
    """File -> fastai's image type through `photos.open_photo`: the decode the ONNX engine does
    (EXIF upright, RGB, the same draft-mode decision for the model's `largest` crop). fastai's own
    PILImage.create ignores EXIF orientation and always decodes in full, so served photos would
    differ. An image already in memory (PIL, array, bytes) goes to PILImage.create, as in fastai."""

    # What fastai's test_dl / learn.predict accept as this step's input (it reads `input_types`).
    input_types = (str, os.PathLike, Image.Image, np.ndarray, bytes)

    def __init__(self, largest: int | None = None):
        super().__init__()
        self.largest = largest

    def encodes(self, item):
        if isinstance(item, (str, os.PathLike)):
            return PILImage.create(photos.open_photo(Path(item), self.largest))
        return PILImage.create(item)


class TrainCrop(RandomResizedCrop):
    """The study's train crop (torchvision RandomResizedCrop: scale 0.08-1, ratio 3/4-4/3); train only."""

    split_idx = 0


class ValidCrop(Resize):
    """Aspect-preserving resize and centre crop, for validation and prediction only.

    The crop is the centre `crop_pct` of the short side's square (1.0, the study's; timm models
    their pretrained config's, e.g. 0.875: torchvision's Resize(size / crop_pct) + CenterCrop(size)),
    resized to the input size. (fastai's RandomResizedCrop squishes the whole image on validation,
    which the study did not.)
    """

    split_idx = 1
    crop_pct = 1.0  # the class default, for exports pickled before crop_pct existed

    def __init__(self, size, crop_pct: float = 1.0, **kwargs):
        super().__init__(size, method="crop", **kwargs)
        self.crop_pct = crop_pct

    def encodes(self, x: Image.Image):
        # The arithmetic lives in photos.valid_crop, which the ONNX engine runs without fastai:
        # one definition, so training's validation input and predict's cannot drift apart.
        return valid_crop(x, self.size[0], self.crop_pct, self.resamples[0])


def dataloaders(images: TaskImages, cfg, prep: Preprocess, device):
    """fastai DataLoaders for `cfg.recipe`, preprocessed as `prep` says (`archs.resolve`:
    input size, validation crop, resampling and normalisation of the arch's pretrained weights).

    paper: the study's random resized crop + horizontal flip. fastai: a milder crop
    (min_scale 0.35) and fastai's `aug_transforms` (flip, rotation, zoom, warp, lighting) on batches.
    """
    size, resamples = prep.size, (RESAMPLING[prep.interpolation], Image.Resampling.NEAREST)
    valid = ValidCrop(size, crop_pct=prep.crop_pct, resamples=resamples)
    normalize = Normalize.from_stats(list(prep.mean), list(prep.std))
    if cfg.recipe == "fastai":
        item_tfms = [TrainCrop(size, min_scale=0.35, resamples=resamples), valid]
        batch_tfms = [*aug_transforms(), normalize]
    else:
        item_tfms = [TrainCrop(size, resamples=resamples), valid, FlipItem(0.5)]
        batch_tfms = [normalize]
    opener = OpenImage(largest_crop(size, prep.crop_pct))
    block = DataBlock(
        blocks=(
            TransformBlock(type_tfms=opener, batch_tfms=IntToFloatTensor),
            CategoryBlock(vocab=images.classes),
        ),
        splitter=GrandparentSplitter(train_name="train", valid_name="valid"),
        get_y=parent_label,
        item_tfms=item_tfms,
        batch_tfms=batch_tfms,
    )
    n_train = int(images.counts["train"].sum())
    # Keep the last partial batch (the study's DataLoader did) unless it would hold one image:
    # BatchNorm cannot train on a batch of one.
    return block.dataloaders(
        images.files,
        bs=cfg.bs,
        device=device,
        num_workers=runtime.workers(cfg.workers),
        drop_last=n_train % cfg.bs == 1,
    )
