"""A task folder in, its checked contents out: the checks `run` makes on a task before training
(writing task folders is tests/test_sources.py).

    python -m pytest tests/test_data.py
"""

from __future__ import annotations

import pytest
from conftest import make_image

from replicate.errors import ReplicateError
from replicate.training import dataloaders

# --- checking a task folder ------------------------------------------------------------------------


def test_scan_task_counts_a_good_task(tiny_task):
    images = dataloaders.scan_task(tiny_task / "toy")
    assert images.classes == ["blue", "red"]
    assert images.counts.to_dict() == {
        "train": {"blue": 4, "red": 4},
        "valid": {"blue": 2, "red": 2},
    }
    assert len(images.files) == 12 and images.skipped == []


@pytest.mark.parametrize(
    "breakage, message",
    [
        (
            lambda t: t.rename(t.with_name("elsewhere")),
            "task folder .* not found: expected TASK/train/<class>",
        ),
        (lambda t: (t / "valid").rename(t / "validation"), r"valid is missing"),
        (
            lambda t: [p.unlink() for p in (t / "train" / "red").iterdir()],
            r"no images .* train/red",
        ),
        (
            lambda t: (t / "valid" / "red").rename(t / "valid" / "green"),
            r"different classes.*\['red'\].*\['green'\]",
        ),
        (
            lambda t: (
                [d.rename(t / "train" / f".{d.name}") for d in list((t / "train").iterdir())]
                + [d.rename(t / "valid" / f".{d.name}") for d in list((t / "valid").iterdir())]
            ),
            "no class folders",
        ),
    ],
)
def test_scan_task_says_what_is_wrong(tiny_task, breakage, message):
    breakage(tiny_task / "toy")
    with pytest.raises(ReplicateError, match=message):
        dataloaders.scan_task(tiny_task / "toy")


def test_unreadable_images_are_set_aside_up_front(tiny_task):
    bad = tiny_task / "toy" / "train" / "red" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = dataloaders.scan_task(tiny_task / "toy")
    assert (
        images.skipped == [bad]
        and bad not in images.files
        and images.counts.loc["red", "train"] == 4
    )


def test_all_tasks_are_the_folders_with_a_train_split(tiny_task):
    from replicate.training.compare import tasks

    (tiny_task / "notes").mkdir()
    make_image(tiny_task / "other" / "train" / "a" / "x.jpg")
    assert tasks(tiny_task, "all") == ["other", "toy"]
    assert tasks(tiny_task, "toy") == ["toy"]


def test_image_extensions_are_fastais():
    """folders lists images without importing fastai; it must take the same files fastai would."""
    from fastai.data.transforms import image_extensions

    from replicate.photos import IMAGE_EXTENSIONS

    assert IMAGE_EXTENSIONS == set(image_extensions)
