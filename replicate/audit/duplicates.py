"""Near-duplicate photos from their fingerprints: candidate pairs, confirmed pairs, groups.

    python benchmarks/audit_bench.py     # the search on a million fingerprints, recall on copies

Finding near-duplicates takes three steps:

1. search: pairs where the whole content of one photo is within `threshold` bits (the audit's
   `THRESHOLD`) of the whole or of a crop of the other (a resized, recompressed or re-saved copy
   differs by 0-2 bits, a copy cropped to 90% or 80% matches a crop of the original). The search
   is an exact multi-index search (`hamming`), not a comparison of every pair: a million photos
   take 37-43 s on 2 cores.
2. confirm: a second, independent signal, the correlation of the two photos' matched crops
   aligned at 16 x 16 px in colour, must be at least `SIMILAR` (on the Houses rooms photos copies
   measure 0.9988 or more, and 1,646 pairs of different photos within 16 bits 0.85 or less;
   README, "Auditing the data"). Byte-identical photos need no confirmation.
3. group: every member of a group is a confirmed near-duplicate of every other member; A~B and
   B~C with A far from C make no group of three.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .. import runtime
from . import hamming
from .fingerprints import CROPS, centre_crop, hashable, open_upright, pool_map, scaled_box

# The confirmation: crops compared at 16 x 16, correlation at least 0.9.
ALIGNED_SIDE, SIMILAR = 16, 0.9
PAIR_COLUMNS = ["i", "j", "distance", "crop_i", "crop_j"]


def hash_matrix(phashes: list[str]) -> np.ndarray:
    """(n, crops) uint64 from the space-separated hex hashes."""
    values = [[int(h, 16) for h in p.split()] for p in phashes]
    return np.array(values, dtype=np.uint64).reshape(len(phashes), len(CROPS))


def near_pairs(hashes: np.ndarray, threshold: int) -> pd.DataFrame:
    """Pairs (i < j) where the whole content of one is within `threshold` bits of a crop of the
    other (whole with whole included), with the least distance and the crops it was found at
    (PAIR_COLUMNS). An exact multi-index search (`hamming.within`): 1,000,000 photos in 37-43 s
    on 2 cores (benchmarks/audit_bench.py); it used to compare every pair of crops.

    Only pairs that include a whole content are compared: a copy cropped to 90% matches the
    original's 90% crop with its whole, and the pairs of two crops would only give two different
    photos more chances to fall under the threshold."""
    n, k = hashes.shape
    if n < 2:
        return pd.DataFrame({c: np.empty(0, int) for c in PAIR_COLUMNS})
    q, flat, distance = hamming.within(
        hashes[:, 0], hashes.ravel(), threshold, threads=runtime.cores()
    )
    other, crop = flat // k, flat % k
    pairs = pd.DataFrame({"q": q, "other": other, "distance": distance.astype(int), "crop": crop})
    pairs = pairs[pairs.q != pairs.other]
    swap = pairs.q > pairs.other  # the whole of the larger index against a crop of the smaller one
    pairs = pd.DataFrame(
        {
            "i": np.where(swap, pairs.other, pairs.q),
            "j": np.where(swap, pairs.q, pairs.other),
            "distance": pairs.distance,
            "crop_i": np.where(swap, pairs.crop, 0),
            "crop_j": np.where(swap, 0, pairs.crop),
        }
    )
    pairs = pairs.sort_values(["i", "j", "distance", "crop_i", "crop_j"]).drop_duplicates(
        ["i", "j"]
    )
    return pairs.reset_index(drop=True)[PAIR_COLUMNS]


def aligned(job: tuple) -> list[np.ndarray]:
    """For (photo: file or bytes, box: "left top right bottom", shares): each centre crop of the
    content, ALIGNED_SIDE px square in RGB, as floats of mean 0 and std 1 (a brightness or contrast change does
    not move it)."""
    source, box, shares = job
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    image, (width, height) = open_upright(data, "RGB")
    box = scaled_box(
        tuple(int(v) for v in box.split()), (image.width / width, image.height / height)
    )
    out = []
    for share in shares:
        pixels = np.asarray(
            centre_crop(image, box, share).resize(
                (ALIGNED_SIDE, ALIGNED_SIDE), Image.Resampling.BOX
            ),
            dtype=np.float32,
        )
        out.append((pixels - pixels.mean()) / max(float(pixels.std()), 1.0))
    return out


def confirm(frame: pd.DataFrame, sources: list, pairs: pd.DataFrame) -> pd.DataFrame:
    """`pairs` with `similarity` and `confirmed` (similarity >= SIMILAR): the correlation of the two
    photos' matched crops, aligned and reduced to ALIGNED_SIDE px in colour (the pHash keeps only
    the signs of a grey image's low frequencies). Only the photos in `pairs` are read again."""
    needed: dict[int, set] = {}
    for row, crop in [*zip(pairs.i, pairs.crop_i), *zip(pairs.j, pairs.crop_j)]:
        needed.setdefault(int(row), set()).add(int(crop))
    rows = sorted(needed)
    jobs = [(sources[r], frame.box.iat[r], [CROPS[c] for c in sorted(needed[r])]) for r in rows]
    thumbs = {
        (r, c): t
        for r, ts in zip(rows, pool_map(aligned, jobs, chunksize=4))
        for c, t in zip(sorted(needed[r]), ts)
    }
    similarity = np.array(
        [
            float((thumbs[int(p.i), int(p.crop_i)] * thumbs[int(p.j), int(p.crop_j)]).mean())
            for p in pairs.itertuples()
        ],
        dtype=float,
    )
    return pairs.assign(similarity=similarity, confirmed=similarity >= SIMILAR)


def cliques(n: int, pairs: pd.DataFrame) -> np.ndarray:
    """A group number per item such that every two members of a group are a pair: near-duplicates
    of each other, not links of a chain (A~B and B~C with A far from C do not make one group).

    Greedy, per connected component (scipy's): the member with most pairs starts a group, its
    partners join closest first while they pair with every member so far; repeat with the rest.
    Hand-written because neither scipy nor networkx partitions a graph into cliques (networkx
    lists maximal cliques, which overlap), and components are small."""
    groups = np.arange(n)
    if len(pairs) == 0:
        return groups
    i, j = pairs.i.to_numpy(int), pairs.j.to_numpy(int)
    graph = coo_matrix((np.ones(len(pairs)), (i, j)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    distance = {}
    for a, b, d in zip(i, j, pairs.distance.to_numpy(int)):
        distance[a, b] = distance[b, a] = d
    partners: dict[int, list[int]] = {}
    for a, b in zip(i, j):
        partners.setdefault(a, []).append(b)
        partners.setdefault(b, []).append(a)
    for members in pd.Series(np.arange(n)).groupby(component).groups.values():
        if len(members) < 2:
            continue
        left = set(members)
        while left:
            seed = max(sorted(left), key=lambda a: sum(b in left for b in partners.get(a, [])))
            group = [seed]
            for b in sorted(
                (b for b in partners.get(seed, []) if b in left),
                key=lambda b: (distance[seed, b], b),
            ):
                if all((b, g) in distance for g in group):
                    group.append(b)
            groups[group] = seed
            left -= set(group)
    return groups


def linked(
    frame: pd.DataFrame, threshold: int, sources: list | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """(group id per row, -1 for rows left out; the candidate pairs as row numbers of `frame`, with
    `similarity` and `confirmed`). Groups are cliques of confirmed pairs. `sources`: the photos
    (files or bytes) for the confirmation; `frame.path` by default.

    Byte-identical photos are one photo to the search and need no confirmation: each copy joins
    its first copy's group, paired with it alone (a site's thousand copies of a placeholder would
    otherwise be half a million pairs)."""
    usable = np.flatnonzero(hashable(frame))
    groups = np.full(len(frame), -1)
    first = (
        pd.Series(usable).groupby(frame.sha256.to_numpy()[usable]).transform("first").to_numpy(int)
    )
    unique = np.unique(first)
    pairs = near_pairs(hash_matrix(frame.phash.iloc[unique].tolist()), threshold)
    pairs = pairs.assign(i=unique[pairs.i.to_numpy(int)], j=unique[pairs.j.to_numpy(int)])
    pairs = confirm(frame, list(frame.path) if sources is None else sources, pairs)
    held = pairs[pairs.confirmed.to_numpy(bool)]
    groups[unique] = unique[
        cliques(
            len(unique),
            held.assign(i=np.searchsorted(unique, held.i), j=np.searchsorted(unique, held.j)),
        )
    ]
    groups[usable] = groups[first]
    copy = usable != first
    identical = pd.DataFrame(
        {
            "i": first[copy],
            "j": usable[copy],
            "distance": 0,
            "crop_i": 0,
            "crop_j": 0,
            "similarity": 1.0,
            "confirmed": True,
        }
    )
    pairs = pd.concat([identical, pairs], ignore_index=True) if len(identical) else pairs
    return groups, pairs.sort_values(["i", "j"]).reset_index(drop=True)
