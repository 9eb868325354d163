"""Exact Hamming-radius search over 64-bit hashes with multi-index hashing, in numpy.

    python benchmarks/audit_bench.py --search-only

Norouzi, Punjani and Fleet, "Fast search in Hamming space with multi-index hashing" (CVPR 2012):
cut each 64-bit hash into m chunks; if two hashes differ in at most r bits, at least one chunk
differs in at most r // m bits (pigeonhole). So each query probes, in every chunk's table, the
values within r // m bits of its own chunk, and only the hashes found there are compared in full.
Nothing within r bits is missed: the search is exact, not approximate.

Why written here rather than taken from faiss: faiss's `IndexBinaryMultiHash` is the same
algorithm, but it keeps a C++ hash map per chunk and a hash set per query: 300,000 photos (their
whole hashes against all 900,000 crop hashes) took it 26-28 s on 2 cores where this takes 6-7 s
(`benchmarks/audit_bench.py --faiss`), and a million would take minutes; this takes 37-43 s.
Here each chunk's table is a sorted array with direct offsets (chunks are at most 22 bits), and
one probe pattern is applied to all queries at once.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from math import comb

import numpy as np

MAX_CHUNK_BITS = 22  # a chunk's table is an offsets array of 2**bits entries: 32 MB at 22 bits


def flips(bits: int, radius: int) -> np.ndarray:
    """Every mask of at most `radius` set bits among `bits`: the probes around a chunk's value."""
    masks = [0] + [
        sum(1 << b for b in c)
        for k in range(1, radius + 1)
        for c in itertools.combinations(range(bits), k)
    ]
    return np.array(masks, dtype=np.uint64)


def chunking(n_queries: int, n_hashes: int, radius: int) -> list[tuple[int, int]]:
    """(first bit, bits) of each chunk, for the number of chunks whose estimated work is least:
    probes, plus the hashes each probe finds by chance (as if hashes were uniform), plus building
    the tables. A few thousand photos get many narrow chunks; a million get three of 21-22 bits."""
    best, best_cost = [], float("inf")
    fewest = -(-64 // MAX_CHUNK_BITS)
    # with radius + 1 chunks, one matches exactly
    for m in range(fewest, max(fewest, radius + 1) + 1):
        edges = np.linspace(0, 64, m + 1).astype(int)
        probes = [sum(comb(int(b), k) for k in range(radius // m + 1)) for b in np.diff(edges)]
        cost = sum(
            n_queries * p * (1 + n_hashes / 2.0**b) + 2**b for p, b in zip(probes, np.diff(edges))
        )
        if cost < best_cost:
            best, best_cost = list(zip(edges[:-1].tolist(), np.diff(edges).tolist())), cost
    return best


def within(
    queries: np.ndarray, hashes: np.ndarray, radius: int, threads: int = 1
) -> tuple[np.ndarray, ...]:
    """(query index, hash index, distance) of every pair with at most `radius` differing bits; a
    pair found through several chunks is listed once per chunk (callers reduce them).

    queries, hashes: 1-d uint64. `threads`: chunks searched at once (numpy releases the GIL)."""
    queries, hashes = (
        np.ascontiguousarray(queries, np.uint64),
        np.ascontiguousarray(hashes, np.uint64),
    )
    chunks = chunking(len(queries), len(hashes), radius)
    m = len(chunks)
    work = [(queries, hashes, chunk, radius, radius // m) for chunk in chunks]
    if threads > 1 and len(queries) * len(hashes) > 10**8:
        with ThreadPoolExecutor(min(threads, m)) as pool:
            parts = list(pool.map(lambda w: _search_chunk(*w), work))
    else:
        parts = [_search_chunk(*w) for w in work]
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


def _search_chunk(
    queries, hashes, chunk: tuple[int, int], radius: int, chunk_radius: int
) -> tuple[np.ndarray, ...]:
    """`within` through one chunk's table: probe every value within `chunk_radius` bits of each
    query's chunk, for all queries at once, and keep the hashes found within `radius` bits."""
    lo, bits = chunk
    mask = np.uint64((1 << bits) - 1)
    values = ((hashes >> np.uint64(lo)) & mask).astype(np.int64)
    order = np.argsort(values, kind="stable")
    offsets = np.zeros((1 << bits) + 1, np.int64)
    np.cumsum(np.bincount(values, minlength=1 << bits), out=offsets[1:])
    own = (queries >> np.uint64(lo)) & mask
    found = ([], [], [])
    for flip in flips(bits, chunk_radius):
        probe = (own ^ flip).astype(np.int64)
        start = offsets[probe]
        count = offsets[probe + 1] - start
        hits = np.flatnonzero(count)
        if len(hits) == 0:
            continue
        count = count[hits]
        qi = np.repeat(hits, count)
        first = np.repeat(np.cumsum(count) - count, count)
        hi = order[np.repeat(start[hits], count) + np.arange(len(qi)) - first]
        distance = np.bitwise_count(queries[qi] ^ hashes[hi])
        keep = distance <= radius
        for out, kept in zip(found, (qi[keep], hi[keep], distance[keep])):
            out.append(kept)
    if not found[0]:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint8)
    return tuple(np.concatenate(f) for f in found)
