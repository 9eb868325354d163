"""`replicate audit`: duplicates, leaks across the split, conflicting labels, quality; splits that
cannot leak; the audit before every run; its decisions through `clean` and back.

    python -m pytest tests/test_audit.py
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import synthetic_photo
from replicate import audit, data
from replicate.cli import app


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def made_up_copies(image: Image.Image) -> dict[str, tuple[str, bytes]]:
    """The copies a scraper collects: recompressed, resized, cropped, re-saved as PNG."""
    w, h = image.size
    crop = image.crop((w // 20, h // 20, w - w // 20, h - h // 20))  # the central 90%
    png = io.BytesIO()
    image.save(png, "PNG")
    return {"q50": ("jpg", jpeg(image, 50)), "half": ("jpg", jpeg(image.resize((w // 2, h // 2)))),
            "crop90": ("jpg", jpeg(crop)), "png": ("png", png.getvalue())}


def tree(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "_audit" not in p.parts}


@pytest.fixture
def task(tmp_path):
    """data/rooms: 6 distinct photos per class and split, plus a leak, a label conflict and a
    duplicate within train. Returns the data folder."""
    root = tmp_path / "data" / "rooms"
    seed = 100
    for split, n in (("train", 6), ("valid", 3)):
        for label in ("bathroom", "kitchen"):
            for i in range(n):
                seed += 1
                (root / split / label).mkdir(parents=True, exist_ok=True)
                (root / split / label / f"{label}_{i}.jpg").write_bytes(jpeg(synthetic_photo(seed)))
    leaked = synthetic_photo(1)
    (root / "train" / "kitchen" / "leak_a.jpg").write_bytes(jpeg(leaked))
    (root / "valid" / "kitchen" / "leak_b.jpg").write_bytes(jpeg(leaked, 60))  # recompressed copy
    both = jpeg(synthetic_photo(2))
    (root / "train" / "kitchen" / "both.jpg").write_bytes(both)
    (root / "train" / "bathroom" / "both.jpg").write_bytes(both)  # one photo, two labels
    twice = synthetic_photo(3)
    (root / "train" / "bathroom" / "twice_a.jpg").write_bytes(jpeg(twice))
    (root / "train" / "bathroom" / "twice_b.jpg").write_bytes(jpeg(twice.resize((160, 120))))
    return tmp_path / "data"


def run_audit(runner, data_dir, *args):
    result = runner.invoke(app, ["audit", "rooms", "--data-dir", str(data_dir),
                                 "--exports-dir", str(data_dir.parent / "exports"), *args])
    assert result.exit_code == 0, result.output
    return result, data_dir.parent / "exports" / "rooms" / "audit"


# --- the finder ------------------------------------------------------------------------------------

def test_made_up_copies_are_found_and_distinct_photos_are_not(tmp_path):
    photos, owners = [], []
    for seed in range(20):
        original = synthetic_photo(seed)
        photos.append(jpeg(original))
        owners.append(seed)
        for name, (_, data_) in made_up_copies(original).items():
            photos.append(data_)
            owners.append(seed)
    frame = pd.DataFrame(audit.fingerprint_many(photos))
    groups, pairs = audit.linked(frame, photos)
    # each original and its four copies form one group, and nothing else joins it
    assert len(set(groups)) == 20
    for seed in range(20):
        assert len({g for g, o in zip(groups, owners) if o == seed}) == 1
    assert pairs.distance.max() <= audit.THRESHOLD


def test_two_hundred_distinct_photos_give_no_false_pair():
    frame = pd.DataFrame(audit.fingerprint_many([jpeg(synthetic_photo(1000 + s)) for s in range(200)]))
    assert audit.near_pairs(audit.hash_matrix(frame.phash.tolist())).empty


def test_leak_conflict_duplicate_and_quality_findings(task, runner):
    kitchen = task / "rooms" / "train" / "kitchen"
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(kitchen / "tiny_blank.jpg")   # too small and uniform
    blocks = (np.indices((240, 320)).sum(axis=0) // 16 % 2).astype(np.uint8)[..., None].repeat(3, axis=2)
    Image.fromarray(5 + 40 * blocks).save(kitchen / "dark.jpg")  # grey levels 5 and 45: mean 25
    Image.fromarray(210 + 45 * blocks).save(kitchen / "bright.jpg")  # 210 and 255: mean 232
    synthetic_photo(9, size=(900, 200)).save(kitchen / "panorama.jpg")
    (kitchen / "text.jpg").write_text("not a photo")
    result, out = run_audit(runner, task)
    findings = pd.read_csv(out / "audit.csv", keep_default_na=False)
    by = {k: set(g.files) for k, g in findings.groupby("finding")}
    assert by["leak"] == {"train/kitchen/leak_a.jpg;valid/kitchen/leak_b.jpg"}
    assert by["conflict"] == {"train/bathroom/both.jpg;train/kitchen/both.jpg"}
    assert by["duplicate"] == {"train/bathroom/both.jpg;train/kitchen/both.jpg",
                               "train/bathroom/twice_a.jpg;train/bathroom/twice_b.jpg"}
    assert by["too_small"] == by["uniform"] == {"train/kitchen/tiny_blank.jpg"}
    assert by["dark"] == {"train/kitchen/dark.jpg"} and by["bright"] == {"train/kitchen/bright.jpg"}
    assert by["aspect"] == {"train/kitchen/panorama.jpg"} and by["unreadable"] == {"train/kitchen/text.jpg"}
    conflict = findings[findings.finding == "conflict"].iloc[0]
    assert conflict.identical == "True" and conflict.labels == "bathroom;kitchen"
    assert "leak: 1 groups with copies in train and valid (1 valid photos)" in result.output
    page = (out / "audit.html").read_text()
    assert page.count('class="card"') == 2 + 2 + 2 + 5  # 3 groups of 2, then 5 quality cards (not unreadable)
    assert "data:image/jpeg;base64," in page and "leak_b.jpg" in page


def test_a_second_audit_reads_the_cache_and_only_changed_files_are_fingerprinted(task, runner, monkeypatch):
    run_audit(runner, task)
    cache = task / "rooms" / "_audit" / "fingerprints.csv"
    assert cache.is_file()
    real, computed = audit.fingerprint_many, []
    monkeypatch.setattr(audit, "fingerprint_many", lambda sources: computed.extend(sources) or real(sources))
    run_audit(runner, task)
    assert computed == []
    touched = task / "rooms" / "valid" / "kitchen" / "kitchen_0.jpg"
    os.utime(touched, ns=(1, 1))
    result, _ = run_audit(runner, task)
    assert [str(p) for p in computed] == [str(touched)]
    assert "leak: 1 groups" in result.output


def test_suggested_decisions_go_through_clean_and_undo_restores_every_byte(task, runner):
    before = tree(task / "rooms")
    _, out = run_audit(runner, task)
    decisions = pd.read_csv(out / "decisions.csv", keep_default_na=False)
    removed = set(decisions[decisions.action == "remove"].path)
    assert removed == {str((task / "rooms" / p).resolve()) for p in ("valid/kitchen/leak_b.jpg",
                                                                      "train/bathroom/twice_b.jpg")}
    assert set(decisions[decisions.path.str.endswith("both.jpg")].action) == {"keep"}  # a person decides
    applied = runner.invoke(app, ["clean", "rooms", "--data-dir", str(task), "--decisions",
                                  str(out / "decisions.csv"), "--apply"])
    assert applied.exit_code == 0, applied.output
    again, _ = run_audit(runner, task)
    assert "leak: 0 groups" in again.output and "duplicate: 1 groups" in again.output  # only the conflict's
    assert (task / "rooms" / "_removed" / "valid" / "kitchen" / "leak_b.jpg").is_file()
    log = next((task / "rooms" / "_cleaning").glob("*.csv"))
    assert runner.invoke(app, ["clean", "rooms", "--data-dir", str(task), "--undo", str(log)]).exit_code == 0
    after = {k: v for k, v in tree(task / "rooms").items() if not k.startswith("_cleaning/")}
    assert after == before


def test_clean_moves_a_leaked_copy_into_the_other_split(task, runner, tmp_path):
    leaked = (task / "rooms" / "valid" / "kitchen" / "leak_b.jpg").resolve()
    pd.DataFrame({"path": [str(leaked)], "action": ["move"], "new_label": [""]}).to_csv(tmp_path / "d.csv", index=False)
    result = runner.invoke(app, ["clean", "rooms", "--data-dir", str(task), "--decisions", str(tmp_path / "d.csv"),
                                 "--apply"])
    assert result.exit_code == 0, result.output
    assert not leaked.exists() and (task / "rooms" / "train" / "kitchen" / "leak_b.jpg").is_file()


def test_bad_threshold_is_one_line(task, runner):
    result = runner.invoke(app, ["audit", "rooms", "--data-dir", str(task), "--threshold", "99"])
    assert result.exit_code == 2 and result.output.startswith("error: --threshold 99")


# --- every run says whether its validation set was clean ------------------------------------------

def test_run_warns_about_a_leak_and_records_the_counts(task, runner):
    exports = task.parent / "exports"
    args = ["run", "rooms", "--arch", "resnet18", "--epochs", "1", "--size", "32", "--no-pretrained", "--workers", "0",
            "--data-dir", str(task), "--exports-dir", str(exports)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "see: replicate audit rooms" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 1 near-duplicate group(s) span train and valid")
    assert "1 photo(s) under two labels" in warnings[0]
    counts = json.loads((exports / "rooms" / "resnet18-frozen" / "metrics.json").read_text())["audit"]
    assert counts["leak_groups"] == 1 and counts["leaked_valid_photos"] == 1 and counts["conflict_groups"] == 1
    assert runner.invoke(app, ["report", "rooms", "--exports-dir", str(exports)]).exit_code == 0
    table = pd.read_csv(exports / "rooms" / "compare" / "table.csv")
    assert list(table.leaked_valid) == [1] and list(table.conflicts) == [1]

    quiet = runner.invoke(app, args + ["--no-audit"])
    assert quiet.exit_code == 0 and "see: replicate audit" not in quiet.output
    assert json.loads((exports / "rooms" / "resnet18-frozen" / "metrics.json").read_text())["audit"] is None


def test_a_clean_split_gives_no_warning(tiny_task, runner):
    result = runner.invoke(app, ["run", "toy", "--arch", "resnet18", "--epochs", "1", "--size", "32", "--no-pretrained",
                                 "--workers", "0", "--data-dir", str(tiny_task),
                                 "--exports-dir", str(tiny_task.parent / "exports")])
    assert result.exit_code == 0 and "see: replicate audit" not in result.output
    metrics = json.loads((tiny_task.parent / "exports" / "toy" / "resnet18-frozen" / "metrics.json").read_text())
    assert metrics["audit"]["leak_groups"] == 0 and metrics["audit"]["photos"] == 12


# --- splits that cannot leak -----------------------------------------------------------------------

def test_houses_sharing_a_photo_land_in_the_same_split(tmp_path):
    src = tmp_path / "houses.zip"
    shared = jpeg(synthetic_photo(5))
    with zipfile.ZipFile(src, "w") as zf:
        for house in range(1, 21):
            for j, room in enumerate(("bathroom", "bedroom", "kitchen", "frontal")):
                photo = shared if (house in (3, 17) and room == "kitchen") else jpeg(synthetic_photo(house * 10 + j))
                zf.writestr(f"Houses Dataset/{house}_{room}.jpg", photo)
    for seed in range(8):  # whatever the shuffle, 3 and 17 stay together
        tasks = data.import_houses(str(src), tmp_path / f"data{seed}", seed=seed)
        splits = {p.name.split("_")[0]: p.parts[-3] for p in tasks["rooms"].rglob("*_kitchen.jpg")}
        assert splits["3"] == splits["17"]
        assert sum(s == "valid" for s in splits.values()) == 4  # 20 houses x 0.2


def test_split_houses_without_links_is_the_plain_shuffle():
    houses = list(range(1, 101))
    assert data.split_houses(houses, 0.2, 7) == data.split_houses(houses, 0.2, 7, {h: h for h in houses})
    linked = data.split_houses(houses, 0.2, 7, {h: (0 if h <= 5 else h) for h in houses})
    assert len(linked) == 20 and (set(range(1, 6)) <= linked or not set(range(1, 6)) & linked)


def test_prepare_keeps_near_duplicates_in_one_split(tmp_path):
    src = tmp_path / "scraped"
    for label in ("balcony", "indoor"):
        (src / label).mkdir(parents=True)
        for i in range(10):
            synthetic_photo((0 if label == "balcony" else 100) + i).save(src / label / f"{i}.jpg")
    copy = synthetic_photo(42)
    copy.save(src / "balcony" / "dup_a.jpg")
    copy.resize((200, 150)).save(src / "balcony" / "dup_b.png")
    copy.save(src / "indoor" / "dup_c.jpg")  # and under the other label
    for seed in range(6):
        folder, _ = data.prepare_task(src, f"t{seed}", tmp_path / "data", seed=seed)
        sides = {p.parts[-3] for p in folder.rglob("dup_*.jpg")}
        assert len(sides) == 1 and len(list(folder.rglob("dup_*.jpg"))) == 3
        counts = data.image_counts(folder)
        assert counts["valid"].sum() >= 3 and counts.loc["balcony"].sum() == 12


def test_linking_moves_only_the_linked_houses():
    houses = list(range(1, 201))
    plain = data.split_houses(houses, 0.2, 3)
    inside, outside = sorted(plain)[0], sorted(set(houses) - plain)[0]
    linked = data.split_houses(houses, 0.2, 3, {h: (0 if h in (inside, outside) else h) for h in houses})
    assert {inside, outside} <= linked or not {inside, outside} & linked
    assert len(plain ^ linked) <= 2 + 2  # the pair, and at most what makes room for it
