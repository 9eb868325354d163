"""How many labels `replicate label`'s rules spend against random order, simulated on the Houses
rooms photos with their labels hidden from the ranking (revealed one batch at a time).

    .venv/bin/python benchmarks/label_sim.py     # features once (about a minute), then seconds a seed

1. rare: the pool is the rooms photos (train and valid) with kitchens thinned to 5%; "is it a
   kitchen?" (yes/no): labels spent until 30 kitchens are labelled.
2. classes: the pool is the training photos, three classes; validation accuracy of the head
   against labels spent, and the labels each order needs to come within 1 point of the head
   trained on every training label.

Batches of 10; each seed draws its own thinned pool, first batch and random order. Rows are
appended to benchmarks/results.csv (bench=label_sim); the curves go to benchmarks/label_sim.png.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import results  # benchmarks/results.py, beside this script

from replicate import runtime
from replicate.labelling import active
from replicate.training import dataloaders

BATCH = 10


def rare(x: np.ndarray, classes: np.ndarray, seed: int, strategy: str, want: int = 30) -> int:
    """Labels spent until `want` kitchens are labelled, in a pool where kitchens are 5%."""
    rng = np.random.default_rng(seed)
    kitchens, others = np.flatnonzero(classes == "kitchen"), np.flatnonzero(classes != "kitchen")
    keep = rng.choice(kitchens, size=round(len(others) * 5 / 95), replace=False)
    pool = np.sort(np.concatenate([others, keep]))
    truth = np.where(classes[pool] == "kitchen", "yes", "no")
    order = rng.permutation(len(pool))
    labelled = pd.Series(dtype=object)
    while (labelled == "yes").sum() < want:
        if strategy == "random":
            batch = order[len(labelled) : len(labelled) + BATCH]
        else:
            batch = active.next_batch(x[pool], labelled, BATCH, positive="yes", seed=seed)
        labelled = pd.concat([labelled, pd.Series(truth[batch], index=batch)])
    return len(labelled)


def curve(
    x: np.ndarray, classes: np.ndarray, valid: np.ndarray, seed: int, strategy: str, budget: int
) -> list[tuple[int, float]]:
    """(labels spent, validation accuracy of the head) after each batch, up to `budget` labels."""
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(~valid)
    order = rng.permutation(len(train))
    labelled, points = pd.Series(dtype=object), []
    while len(labelled) < budget:
        if strategy == "random":
            batch = order[len(labelled) : len(labelled) + BATCH]
        else:
            batch = active.next_batch(x[train], labelled, BATCH, seed=seed)
        labelled = pd.concat([labelled, pd.Series(classes[train][batch], index=batch)])
        if labelled.nunique() > 1:
            head = active.fit_head(x[train][labelled.index.to_numpy(int)], labelled.tolist())
            points.append((len(labelled), float((head.predict(x[valid]) == classes[valid]).mean())))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--budget", type=int, default=300, help="labels per seed on the three classes"
    )
    args = parser.parse_args()
    task = args.data_dir / "rooms"
    images = dataloaders.scan_task(task)
    files = sorted(images.files)
    x = active.pool_features(files, cache=task / "_label" / f"{active.ARCH}.npz")
    classes = np.array([f.parent.name for f in files])
    valid = np.array([f.parent.parent.name == "valid" for f in files])

    rows, spent = [], {"random": [], "tool": []}
    for strategy in spent:
        for seed in range(args.seeds):
            spent[strategy].append(rare(x, classes, seed, strategy))
        print(
            f"rare kitchens (5%), labels until 30 found, {strategy}: {spent[strategy]} "
            f"(median {np.median(spent[strategy]):.0f})"
        )
    all_head = active.fit_head(x[~valid], classes[~valid].tolist())
    ceiling = float((all_head.predict(x[valid]) == classes[valid]).mean())
    curves = {
        s: [curve(x, classes, valid, seed, s, args.budget) for seed in range(args.seeds)]
        for s in spent
    }
    reach = {
        s: [next((n for n, acc in c if acc >= ceiling - 0.01), None) for c in curves[s]]
        for s in curves
    }
    print(
        f"three classes: all {int((~valid).sum())} labels give {ceiling:.2%}; labels to come within 1 point: "
        + "; ".join(f"{s} {reach[s]}" for s in reach)
    )
    for s in spent:
        rows.append(
            {
                "bench": "label_sim",
                "engine": s,
                "photos": len(files),
                "seeds": args.seeds,
                "rare_labels_median": float(np.median(spent[s])),
                "rare_labels_max": int(np.max(spent[s])),
                "classes_ceiling_acc": round(ceiling, 4),
                "classes_labels_to_ceiling": ";".join(str(r) for r in reach[s]),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": platform.node(),
                "device": f"cpu ({runtime.cores()} cores)",
            }
        )
    results.append(rows)
    plot(spent, curves, ceiling, Path(__file__).with_name("label_sim.png"))


def plot(spent: dict, curves: dict, ceiling: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.boxplot([spent[s] for s in spent], tick_labels=list(spent))
    left.set(title="rare attribute (kitchens 5%): labels to find 30", ylabel="labels spent")
    for k, s in enumerate(curves):
        for c in curves[s]:
            n, acc = zip(*c)
            right.plot(n, acc, color=f"C{k}", alpha=0.6, label=s if c is curves[s][0] else None)
    right.axhline(ceiling, color="grey", linestyle=":", label=f"all labels {ceiling:.1%}")
    right.axhline(
        ceiling - 0.01, color="grey", linestyle="--", linewidth=0.8, label="within 1 point"
    )
    right.set(
        title="three classes: validation accuracy",
        xlabel="labels spent",
        ylabel="accuracy",
        ylim=(0.8, 1.0),
    )
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
