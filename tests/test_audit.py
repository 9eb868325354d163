"""`replicate audit`: duplicates, leaks across the split, conflicting labels, quality; padded photos,
chains and the exact index; splits that cannot leak; the audit before every run; its decisions
through `clean` and back.

    python -m pytest tests/test_audit.py
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import imagehash
import numpy as np
import pandas as pd
import pytest
from conftest import HOUSES_ZIP, TINY_RUN, folders_args, requires_houses, synthetic_photo
from PIL import Image

from replicate import folders
from replicate.audit import checks, duplicates, fingerprints, hamming
from replicate.cli import app
from replicate.data import sources


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
    return {
        "q50": ("jpg", jpeg(image, 50)),
        "half": ("jpg", jpeg(image.resize((w // 2, h // 2)))),
        "crop90": ("jpg", jpeg(crop)),
        "png": ("png", png.getvalue()),
    }


def tree(folder) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "_audit" not in p.parts
    }


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
    result = runner.invoke(
        app,
        [
            "audit",
            "rooms",
            *folders_args(data_dir, data_dir.parent / "exports"),
            *args,
        ],
    )
    assert result.exit_code == 0, result.output
    return result, data_dir.parent / "exports" / "rooms" / "audit"


# --- the finder ------------------------------------------------------------------------------------


def test_made_up_copies_are_found_and_distinct_photos_are_not(tmp_path):
    photos, owners = [], []
    for seed in range(20):
        original = synthetic_photo(seed)
        photos.append(jpeg(original))
        owners.append(seed)
        for _name, (_, data_) in made_up_copies(original).items():
            photos.append(data_)
            owners.append(seed)
    frame = pd.DataFrame(fingerprints.fingerprint_many(photos))
    groups, pairs = duplicates.linked(frame, checks.THRESHOLD, photos)
    # each original and its four copies form one group, and nothing else joins it
    assert len(set(groups)) == 20
    for seed in range(20):
        assert len({g for g, o in zip(groups, owners) if o == seed}) == 1
    assert pairs.distance.max() <= checks.THRESHOLD


def test_two_hundred_distinct_photos_give_no_false_pair():
    frame = pd.DataFrame(
        fingerprints.fingerprint_many([jpeg(synthetic_photo(1000 + s)) for s in range(200)])
    )
    assert duplicates.near_pairs(
        duplicates.hash_matrix(frame.phash.tolist()), checks.THRESHOLD
    ).empty


# --- padded photos, chains, the index -------------------------------------------------------------


def padded(data_: bytes, canvas: tuple[int, int], colour, frame: int = 0) -> bytes:
    """The photo fitted into `canvas` and centred on `colour` (letterbox or pillarbox padding), or
    inside a flat frame `frame` px wide; JPEG quality 90."""
    image = Image.open(io.BytesIO(data_)).convert("RGB")
    if frame:
        canvas = (image.width + 2 * frame, image.height + 2 * frame)
    else:
        image.thumbnail(canvas)
    out = Image.new("RGB", canvas, colour)
    out.paste(image, ((canvas[0] - image.width) // 2, (canvas[1] - image.height) // 2))
    return jpeg(out, 90)


@pytest.mark.parametrize(
    "canvas,colour,frame,where",
    [
        ((416, 416), "white", 0, (8, 75, 408, 341)),  # letterbox: a 400x266 photo in a white square
        ((640, 266), "black", 0, (120, 0, 520, 266)),  # pillarbox, black
        (None, (114, 114, 114), 20, (20, 20, 420, 286)),  # a flat grey frame on all four sides
    ],
)
def test_uniform_borders_are_trimmed_to_the_photo(canvas, colour, frame, where):
    photo = jpeg(synthetic_photo(7, size=(400, 266)))
    row = fingerprints.fingerprint(padded(photo, canvas, colour, frame))
    box = np.array(row["box"].split(), dtype=int)
    assert np.abs(box - where).max() <= 8  # JPEG ringing keeps a few px of padding beside the photo
    assert (
        fingerprints.fingerprint(photo)["box"] == "0 0 400 266"
    )  # a photo without borders keeps all of itself


def test_a_photo_with_its_own_white_bands_pillarboxed_in_black_loses_both_borders():
    photo = Image.new(
        "RGB", (400, 300), "white"
    )  # a listing photo with white bands above and below
    photo.paste(synthetic_photo(8, size=(400, 268)), (0, 16))
    framed = padded(jpeg(photo), (640, 300), "black")
    box = np.array(fingerprints.fingerprint(framed)["box"].split(), dtype=int)
    assert np.abs(box - (120, 16, 520, 284)).max() <= 8
    both = [jpeg(photo), framed]
    _, pairs = duplicates.linked(
        pd.DataFrame(fingerprints.fingerprint_many(both)), checks.THRESHOLD, both
    )
    assert pairs.confirmed.tolist() == [
        True
    ]  # the framed copy is found as the banded photo's duplicate


@requires_houses
def test_padded_houses_photos_pair_only_with_their_copies():
    """600 real room photos letterboxed white into 416 x 416 squares (38% or more padding); 30 of them
    also as the original, pillarboxed in black and in a grey frame. Expected pairs: the copies of one
    photo, and the Houses' own duplicates (the pairs the audit confirms on the unpadded originals)."""
    with zipfile.ZipFile(HOUSES_ZIP) as zf:
        names = sorted(
            n
            for n in zf.namelist()
            if n.endswith(("_bathroom.jpg", "_bedroom.jpg", "_kitchen.jpg"))
        )[:600]
        originals = [zf.read(n) for n in names]
    photos = [padded(d, (416, 416), "white") for d in originals]
    origin = list(range(len(names)))
    for k in range(0, 600, 20):
        photos += [
            originals[k],
            padded(originals[k], (720, 300), "black"),
            padded(originals[k], None, (114, 114, 114), 24),
        ]
        origin += [k, k, k]
    plain = pd.DataFrame(fingerprints.fingerprint_many(originals))
    _, own = duplicates.linked(plain, checks.THRESHOLD, originals)
    twins = {frozenset(p) for p in zip(own.i[own.confirmed], own.j[own.confirmed])}
    assert {frozenset(names[i].split("/")[-1] for i in t) for t in twins} >= {
        frozenset({"199_bathroom.jpg", "214_bathroom.jpg"}),
        frozenset({"227_bedroom.jpg", "227_kitchen.jpg"}),
    }

    frame = pd.DataFrame(fingerprints.fingerprint_many(photos))
    groups, pairs = duplicates.linked(frame, checks.THRESHOLD, photos)
    found = {
        frozenset((int(i), int(j)))
        for i, j in zip(pairs.i[pairs.confirmed], pairs.j[pairs.confirmed])
    }
    expected = {
        frozenset((a, b))
        for a in range(len(photos))
        for b in range(a + 1, len(photos))
        if origin[a] == origin[b] or frozenset((origin[a], origin[b])) in twins
    }
    assert found <= expected  # no pair of different photos
    assert all(
        groups[a] == groups[b] for a, b in expected
    )  # and every copy, twins included, in one group
    assert len(set(groups)) == len({frozenset({origin[m]}) for m in range(len(photos))}) - len(
        twins
    )
    # The hazard is in these photos: hashed whole, padding and all, different photos pair up.
    whole = np.array(
        [
            int(str(imagehash.phash(Image.open(io.BytesIO(d)).convert("L"))), 16)
            for d in photos[:600]
        ],
        dtype=np.uint64,
    )
    close = np.argwhere(
        np.triu(np.bitwise_count(whole[:, None] ^ whole[None, :]) <= checks.THRESHOLD, 1)
    )
    assert any(frozenset(p) not in twins for p in map(tuple, close.tolist()))


def test_a_loose_threshold_finds_candidates_the_pixels_reject():
    photos = [jpeg(synthetic_photo(500 + s)) for s in range(60)]
    photos.append(jpeg(synthetic_photo(500), 40))  # one real copy
    frame = pd.DataFrame(fingerprints.fingerprint_many(photos))
    _, pairs = duplicates.linked(frame, 24, photos)
    assert len(pairs) > 10  # 24 of 64 bits pairs many different photos
    assert set(zip(pairs.i[pairs.confirmed], pairs.j[pairs.confirmed])) == {(0, 60)}
    assert (
        pairs.similarity[~pairs.confirmed].max()
        < duplicates.SIMILAR
        <= pairs.similarity[pairs.confirmed].min()
    )


def test_a_thousand_copies_of_a_placeholder_are_one_group_of_pairs_with_the_first():
    placeholder = jpeg(synthetic_photo(900))
    photos = [jpeg(synthetic_photo(901))] + [placeholder] * 1000 + [jpeg(synthetic_photo(902))]
    frame = pd.DataFrame(fingerprints.fingerprint_many(photos[:2] + photos[-1:])).iloc[
        [0, *[1] * 1000, 2]
    ]
    frame = frame.reset_index(
        drop=True
    )  # one fingerprint per distinct file, as the cache would hold
    groups, pairs = duplicates.linked(frame, checks.THRESHOLD, photos)
    assert (groups[1:1001] == groups[1]).all() and groups[0] != groups[1] != groups[1001]
    assert len(pairs) == 999 and set(pairs.i) == {1} and pairs.confirmed.all()  # not 499,500 pairs


def test_a_chain_is_not_one_group():
    chain = pd.DataFrame({"i": [0, 1], "j": [1, 2], "distance": [2, 6]})  # A~B, B~C, A far from C
    groups = duplicates.cliques(4, chain)
    assert groups[0] == groups[1] != groups[2]  # B joins its closer partner A; C is left alone
    assert groups[3] not in groups[:3]
    triangle = pd.DataFrame({"i": [0, 0, 1, 3], "j": [1, 2, 2, 4], "distance": [1, 1, 1, 0]})
    groups = duplicates.cliques(5, triangle)
    assert len({groups[0], groups[1], groups[2]}) == 1 and groups[3] == groups[4] != groups[0]
    star = pd.DataFrame(
        {"i": [0, 0, 0, 1], "j": [1, 2, 3, 2], "distance": [3, 1, 2, 0]}
    )  # 3 pairs only with 0
    groups = duplicates.cliques(4, star)
    assert groups[0] == groups[1] == groups[2] != groups[3]


@pytest.mark.parametrize("n,radius", [(300, 0), (3000, 4), (3000, 8), (20000, 8), (3000, 16)])
def test_the_index_finds_exactly_the_pairs_within_the_radius(n, radius):
    rng = np.random.default_rng(n + radius)
    hashes = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    for k in range(
        n // 10
    ):  # planted near-duplicates at every distance up to the radius, and one beyond
        bits = rng.choice(64, int(rng.integers(0, radius + 2)), replace=False)
        hashes[n - 1 - k] = hashes[k] ^ np.uint64(sum(1 << int(b) for b in bits))
    queries = hashes[: n // 2]
    qi, hi, distance = hamming.within(queries, hashes, radius)
    every = np.bitwise_count(queries[:, None] ^ hashes[None, :])
    assert set(zip(qi.tolist(), hi.tolist())) == set(zip(*np.nonzero(every <= radius)))
    assert (distance == every[qi, hi]).all()


def test_pairs_compare_a_whole_photo_with_each_crop_of_the_other():
    hashes = np.array(
        [[0, 0xFF, 0xFFFF], [0xFFFF0000, 0xFFF000, 0xFFFE], [0xFF00000000, 0, 0]], dtype=np.uint64
    )
    pairs = duplicates.near_pairs(hashes, threshold=8)
    # 0's whole is 8 bits from 2's whole and 0 from 2's crops: one pair, at 0 bits. The crops 0xFFFF
    # of 0 and 0xFFFE of 1 are 1 bit apart, but two crops are never compared: 0 and 1 do not pair.
    assert pairs[["i", "j", "distance", "crop_i", "crop_j"]].values.tolist() == [[0, 2, 0, 0, 1]]


def test_leak_conflict_duplicate_and_quality_findings(task, runner):
    kitchen = task / "rooms" / "train" / "kitchen"
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(
        kitchen / "tiny_blank.jpg"
    )  # too small and uniform
    blocks = (
        (np.indices((240, 320)).sum(axis=0) // 16 % 2).astype(np.uint8)[..., None].repeat(3, axis=2)
    )
    Image.fromarray(5 + 40 * blocks).save(kitchen / "dark.jpg")  # grey levels 5 and 45: mean 25
    Image.fromarray(210 + 45 * blocks).save(kitchen / "bright.jpg")  # 210 and 255: mean 232
    synthetic_photo(9, size=(900, 200)).save(kitchen / "panorama.jpg")
    (kitchen / "text.jpg").write_text("not a photo")
    result, out = run_audit(runner, task)
    findings = pd.read_csv(out / "audit.csv", keep_default_na=False)
    by = {k: set(g.files) for k, g in findings.groupby("finding")}
    assert by["leak"] == {"train/kitchen/leak_a.jpg;valid/kitchen/leak_b.jpg"}
    assert by["conflict"] == {"train/bathroom/both.jpg;train/kitchen/both.jpg"}
    assert by["duplicate"] == {
        "train/bathroom/both.jpg;train/kitchen/both.jpg",
        "train/bathroom/twice_a.jpg;train/bathroom/twice_b.jpg",
    }
    assert by["too_small"] == by["uniform"] == {"train/kitchen/tiny_blank.jpg"}
    assert by["dark"] == {"train/kitchen/dark.jpg"} and by["bright"] == {"train/kitchen/bright.jpg"}
    assert by["aspect"] == {"train/kitchen/panorama.jpg"} and by["unreadable"] == {
        "train/kitchen/text.jpg"
    }
    conflict = findings[findings.finding == "conflict"].iloc[0]
    assert conflict.identical == "True" and conflict.labels == "bathroom;kitchen"
    assert "leak: 1 groups with copies in train and valid (1 valid photos)" in result.output
    page = (out / "audit.html").read_text()
    assert (
        page.count('class="card"') == 2 + 2 + 2 + 5
    )  # 3 groups of 2, then 5 quality cards (not unreadable)
    assert "data:image/jpeg;base64," in page and "leak_b.jpg" in page


def test_a_second_audit_reads_the_cache_and_only_changed_files_are_fingerprinted(
    task, runner, monkeypatch
):
    run_audit(runner, task)
    cache = task / "rooms" / "_audit" / "fingerprints.csv"
    assert cache.is_file()
    real, computed = fingerprints.fingerprint_many, []
    monkeypatch.setattr(
        fingerprints, "fingerprint_many", lambda sources: computed.extend(sources) or real(sources)
    )
    run_audit(runner, task)
    assert computed == []
    touched = task / "rooms" / "valid" / "kitchen" / "kitchen_0.jpg"
    os.utime(touched, ns=(1, 1))
    result, _ = run_audit(runner, task)
    assert [str(p) for p in computed] == [str(touched)]
    assert "leak: 1 groups" in result.output


def test_fingerprints_of_an_older_version_are_computed_again(task, runner, monkeypatch):
    run_audit(runner, task)
    cache = task / "rooms" / "_audit" / "fingerprints.csv"
    old = pd.read_csv(cache, keep_default_na=False).assign(
        version=fingerprints.FINGERPRINT_VERSION - 1
    )
    old.to_csv(cache, index=False)
    real, computed = fingerprints.fingerprint_many, []
    monkeypatch.setattr(
        fingerprints, "fingerprint_many", lambda sources: computed.extend(sources) or real(sources)
    )
    run_audit(runner, task)
    assert len(computed) == len(old)
    assert (pd.read_csv(cache).version == fingerprints.FINGERPRINT_VERSION).all()


def test_the_terminal_gets_one_line_per_group_within_its_width(task, runner):
    rooms = task / "rooms" / "train" / "kitchen"
    for k in range(12):  # 12 more duplicate groups, with long names
        photo = jpeg(synthetic_photo(700 + k))
        for copy in "ab":
            (rooms / f"a_rather_long_listing_photo_name_{k}_{copy}.jpg").write_bytes(photo)
    result = runner.invoke(
        app,
        ["audit", "rooms", *folders_args(task, task.parent / "x")],
        env={"COLUMNS": "72"},
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("  #")]
    assert len(lines) == 10 and all(len(line) <= 72 for line in lines)
    assert lines[0].startswith("  #") and "leak" in lines[0]  # leaks first, then conflicts
    assert (
        "conflict" in lines[1]
        and "  ... and 5 more groups (all in audit.html and audit.csv)" in result.output
    )
    assert (
        len(
            pd.read_csv(task.parent / "x" / "rooms" / "audit" / "audit.csv").group.dropna().unique()
        )
        == 15
    )


def test_suggested_decisions_go_through_clean_and_undo_restores_every_byte(task, runner):
    before = tree(task / "rooms")
    _, out = run_audit(runner, task)
    decisions = pd.read_csv(out / "decisions.csv", keep_default_na=False)
    removed = set(decisions[decisions.action == "remove"].path)
    assert removed == {
        str((task / "rooms" / p).resolve())
        for p in ("valid/kitchen/leak_b.jpg", "train/bathroom/twice_b.jpg")
    }
    assert set(decisions[decisions.path.str.endswith("both.jpg")].action) == {
        "keep"
    }  # a person decides
    applied = runner.invoke(
        app,
        [
            "clean",
            "rooms",
            "--data-dir",
            str(task),
            "--decisions",
            str(out / "decisions.csv"),
            "--apply",
        ],
    )
    assert applied.exit_code == 0, applied.output
    again, _ = run_audit(runner, task)
    assert (
        "leak: 0 groups" in again.output and "duplicate: 1 groups" in again.output
    )  # only the conflict's
    assert (task / "rooms" / "_removed" / "valid" / "kitchen" / "leak_b.jpg").is_file()
    log = next((task / "rooms" / "_cleaning").glob("*.csv"))
    assert (
        runner.invoke(
            app, ["clean", "rooms", "--data-dir", str(task), "--undo", str(log)]
        ).exit_code
        == 0
    )
    after = {k: v for k, v in tree(task / "rooms").items() if not k.startswith("_cleaning/")}
    assert after == before


def test_clean_moves_a_leaked_copy_into_the_other_split(task, runner, tmp_path):
    leaked = (task / "rooms" / "valid" / "kitchen" / "leak_b.jpg").resolve()
    pd.DataFrame({"path": [str(leaked)], "action": ["move"], "new_label": [""]}).to_csv(
        tmp_path / "d.csv", index=False
    )
    result = runner.invoke(
        app,
        [
            "clean",
            "rooms",
            "--data-dir",
            str(task),
            "--decisions",
            str(tmp_path / "d.csv"),
            "--apply",
        ],
    )
    assert result.exit_code == 0, result.output
    assert not leaked.exists() and (task / "rooms" / "train" / "kitchen" / "leak_b.jpg").is_file()


def test_bad_threshold_is_one_line(task, runner):
    result = runner.invoke(app, ["audit", "rooms", "--data-dir", str(task), "--max-distance", "99"])
    assert result.exit_code == 2 and result.output.startswith("error: --max-distance 99")


# --- every run says whether its validation set was clean ------------------------------------------


def test_run_warns_about_a_leak_and_records_the_counts(task, runner):
    exports = task.parent / "exports"
    args = [
        "run",
        "rooms",
        "--arch",
        "resnet18",
        *TINY_RUN,
        *folders_args(task, exports),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "see: replicate audit rooms" in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: 1 near-duplicate group(s) span train and valid"
    )
    assert "1 photo(s) under two labels" in warnings[0]
    counts = json.loads((exports / "rooms" / "resnet18-frozen" / "metrics.json").read_text())[
        "audit"
    ]
    assert (
        counts["leak_groups"] == 1
        and counts["leaked_valid_photos"] == 1
        and counts["conflict_groups"] == 1
    )
    assert runner.invoke(app, ["report", "rooms", "--exports-dir", str(exports)]).exit_code == 0
    table = pd.read_csv(exports / "rooms" / "compare" / "table.csv")
    assert list(table.leaked_valid) == [1] and list(table.conflicts) == [1]

    quiet = runner.invoke(app, args + ["--no-audit"])
    assert quiet.exit_code == 0 and "see: replicate audit" not in quiet.output
    assert (
        json.loads((exports / "rooms" / "resnet18-frozen" / "metrics.json").read_text())["audit"]
        is None
    )


def test_a_clean_split_gives_no_warning(tiny_task, runner):
    result = runner.invoke(
        app,
        [
            "run",
            "toy",
            "--arch",
            "resnet18",
            *TINY_RUN,
            *folders_args(tiny_task, tiny_task.parent / "exports"),
        ],
    )
    assert result.exit_code == 0 and "see: replicate audit" not in result.output
    metrics = json.loads(
        (tiny_task.parent / "exports" / "toy" / "resnet18-frozen" / "metrics.json").read_text()
    )
    assert metrics["audit"]["leak_groups"] == 0 and metrics["audit"]["photos"] == 12


# --- splits that cannot leak -----------------------------------------------------------------------


def test_houses_sharing_a_photo_land_in_the_same_split(tmp_path):
    src = tmp_path / "houses.zip"
    shared = jpeg(synthetic_photo(5))
    with zipfile.ZipFile(src, "w") as zf:
        for house in range(1, 21):
            for j, room in enumerate(("bathroom", "bedroom", "kitchen", "frontal")):
                photo = (
                    shared
                    if (house in (3, 17) and room == "kitchen")
                    else jpeg(synthetic_photo(house * 10 + j))
                )
                zf.writestr(f"Houses Dataset/{house}_{room}.jpg", photo)
    for seed in range(8):  # whatever the shuffle, 3 and 17 stay together
        tasks = sources.import_houses(str(src), tmp_path / f"data{seed}", seed=seed)
        splits = {p.name.split("_")[0]: p.parts[-3] for p in tasks["rooms"].rglob("*_kitchen.jpg")}
        assert splits["3"] == splits["17"]
        assert sum(s == "valid" for s in splits.values()) == 4  # 20 houses x 0.2


def test_split_houses_without_links_is_the_plain_shuffle():
    houses = list(range(1, 101))
    assert sources.split_houses(houses, 0.2, 7) == sources.split_houses(
        houses, 0.2, 7, {h: h for h in houses}
    )
    linked = sources.split_houses(houses, 0.2, 7, {h: (0 if h <= 5 else h) for h in houses})
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
        folder, _ = sources.prepare_task(src, f"t{seed}", tmp_path / "data", seed=seed)
        sides = {p.parts[-3] for p in folder.rglob("dup_*.jpg")}
        assert len(sides) == 1 and len(list(folder.rglob("dup_*.jpg"))) == 3
        counts = folders.image_counts(folder)
        assert counts["valid"].sum() >= 3 and counts.loc["balcony"].sum() == 12


def test_linking_moves_only_the_linked_houses():
    houses = list(range(1, 201))
    plain = sources.split_houses(houses, 0.2, 3)
    inside, outside = sorted(plain)[0], sorted(set(houses) - plain)[0]
    linked = sources.split_houses(
        houses, 0.2, 3, {h: (0 if h in (inside, outside) else h) for h in houses}
    )
    assert {inside, outside} <= linked or not {inside, outside} & linked
    assert len(plain ^ linked) <= 2 + 2  # the pair, and at most what makes room for it
