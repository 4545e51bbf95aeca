"""Near-duplicate grouping at scale: the k-means cell index of `curation.dedup` on synthetic signatures, side by side
with an exhaustive comparison of a subset, reporting seconds, peak memory, recall of planted copies and false merges.

    OMP_NUM_THREADS=2 python benchmarks/dedup.py [--items 100000] [--kind clip|phash|both] [--exact 20000]

Signatures (written to a scratch file and read through the same memory map the run step uses):
  - clip:  768-d unit float16 vectors, the width of ViT-L/14's image embedding: 1000 topic centres, items spread
           around them (cosine to one another ~0.3-0.6, as different clips of a topic), and 10 % of the items
           near-copies of another item (cosine ~0.985), grouped at `dedup.clip_min_cosine` 0.95;
  - phash: 192-bit hashes, 1000 centre patterns with 30 % of the bits flipped per item (different clips differ in
           ~80 bits), 10 % near-copies with 5 % of the bits flipped (~10 bits), grouped at 28 bits (the default).
Recall: planted copies that end in their original's group. False merges: items in a group with an item of another
family (neither a copy of the other), which at these distances means the index linked what it must not.
The exhaustive side compares every pair of the first `--exact` items (O(n^2)) and the ratio of per-item costs
shows what the index saves; its time for a million is extrapolated (x (10^6 / exact)^2), not run.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curation.dedup import auto_cell_size, group_vectors, signature_reader  # noqa: E402
from curation.phash import cosine_for_bits  # noqa: E402

CENTRES = 1000
COPY_SHARE = 0.1
CHUNK = 50_000


def write_clip_like(path: Path, items: int, rng: np.random.Generator) -> np.ndarray:
    """768-d unit float16 vectors to `path`; returns each item's family (the item it copies, or itself)."""
    dim = 768
    centres = rng.normal(size=(CENTRES, dim)).astype(np.float32)
    originals = items - int(items * COPY_SHARE)
    family = np.arange(items)
    family[originals:] = rng.integers(0, originals, items - originals)
    data = np.memmap(path, dtype="<f2", mode="w+", shape=(items, dim))
    topic = rng.integers(0, CENTRES, originals)
    for start in range(0, originals, CHUNK):
        stop = min(originals, start + CHUNK)
        block = centres[topic[start:stop]] + 1.2 * rng.normal(size=(stop - start, dim)).astype(np.float32)
        data[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    for start in range(originals, items, CHUNK):
        stop = min(items, start + CHUNK)
        block = data[family[start:stop]].astype(np.float32) + 0.006 * rng.normal(size=(stop - start, dim))
        data[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    data.flush()
    return family


def write_phash_like(path: Path, items: int, rng: np.random.Generator) -> np.ndarray:
    """192-bit hashes (24 bytes each) to `path`; returns each item's family."""
    bits = 192
    centres = rng.random((CENTRES, bits)) < 0.5
    originals = items - int(items * COPY_SHARE)
    family = np.arange(items)
    family[originals:] = rng.integers(0, originals, items - originals)
    codes = np.empty((items, bits), dtype=bool)
    codes[:originals] = centres[rng.integers(0, CENTRES, originals)] ^ (rng.random((originals, bits)) < 0.3)
    codes[originals:] = codes[family[originals:]] ^ (rng.random((items - originals, bits)) < 0.05)
    np.packbits(codes, axis=1).tofile(path)
    return family


def score(roots: np.ndarray, family: np.ndarray) -> tuple[float, int]:
    """(recall of planted copies, items merged with another family)."""
    copies = np.flatnonzero(family != np.arange(len(family)))
    recall = float(np.mean(roots[copies] == roots[family[copies]])) if copies.size else 1.0
    group_family = np.full(len(roots), -1)
    np.maximum.at(group_family, roots, family)
    lowest = np.full(len(roots), len(roots))
    np.minimum.at(lowest, roots, family)
    mixed = group_family[roots] != lowest[roots]
    return recall, int(mixed.sum())


def run(kind: str, items: int, exact: int, probes: int, scratch: Path) -> None:
    rng = np.random.default_rng(0)
    path = scratch / f"{kind}.bin"
    started = time.perf_counter()
    family = (write_clip_like if kind == "clip" else write_phash_like)(path, items, rng)
    made = time.perf_counter() - started
    method = "clip" if kind == "clip" else "phash"
    count, read = signature_reader(path, method, 768 if kind == "clip" else 192)
    min_cosine = 0.95 if kind == "clip" else cosine_for_bits(28)
    started, cpu = time.perf_counter(), time.process_time()
    roots, stats = group_vectors(count, read, min_cosine, None, probes)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    recall, mixed = score(roots, family)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    subset = min(exact, items)
    vectors = read(np.arange(subset))
    started = time.perf_counter()
    _, exhaustive = group_vectors(subset, lambda rows: vectors[rows], min_cosine, cell_size=subset, probes=1)
    exact_s = time.perf_counter() - started
    exact_per_million = exact_s * (1e6 / subset) ** 2
    print(f"\n{kind}: {items:,} items ({made:.0f} s to generate), cell size {auto_cell_size(items, probes)}, "
          f"{probes} probes")
    phases = ", ".join(f"{name} {value:.1f}" for name, value in stats.seconds.items())
    print(f"  index:      {seconds:8.1f} s wall, {cpu:.1f} s CPU ({phases}); "
          f"{stats.cells} cells, largest {stats.largest_cell}; {stats.compared_pairs:.3g} pairs compared "
          f"({stats.compared_pairs / (items * (items - 1) / 2):.2%} of all)")
    print(f"  recall {recall:.4f} of planted copies, {mixed} items merged across families; peak RSS {peak_mib:.0f} MiB "
          f"(signatures on disk: {path.stat().st_size / 2**20:.0f} MiB)")
    print(f"  exhaustive: {exact_s:8.1f} s for {subset:,} items ({exhaustive.compared_pairs:.3g} pairs)")
    # the auto cell size grows as sqrt(n), so the index's work grows as n^1.5
    scale = 1e6 / items * math.sqrt(1e6 / items)
    print(f"  per million items: index ~{seconds * scale / 60:.1f} min wall, ~{cpu * scale / 60:.1f} CPU-min "
          f"(n^1.5 from this run), exhaustive ~{exact_per_million / 3600:.1f} h wall (n^2 from its subset); "
          f"exhaustive / index per item {exact_per_million / (seconds * scale):.0f}x")
    path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--kind", choices=("clip", "phash", "both"), default="both")
    parser.add_argument("--exact", type=int, default=20_000, help="items compared exhaustively for the ratio")
    parser.add_argument("--probes", type=int, default=None,
                        help="cells per item (dedup.probes; default as in a run: 2 for clip, 4 for phash)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lvd-dedup-bench-") as scratch:
        for kind in ("clip", "phash") if args.kind == "both" else (args.kind,):
            run(kind, args.items, args.exact, args.probes or (2 if kind == "clip" else 4), Path(scratch))


if __name__ == "__main__":
    main()
