"""Figure 1 of the paper from the CSV logs of one or more runs.

    python -m lightning_kfac_swa.plot runs/paper/csv/version_0/metrics.csv \\
        runs/paper/csv/version_1/metrics.csv --labels K-FAC K-FAC-SWA --swa-start 75 -o figure1.png

Three panels per epoch: the L2 norm of the weights (current and averaged), train / validation
loss and train / validation accuracy (the averaged model's validation as dotted lines), with
a dashed vertical line where SWA starts.
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from typing import Optional

PANELS = (
    ("weight L2 norm", ("weight_norm/current", "train/weight_norm"), ("weight_norm/swa",)),
    ("loss", ("train/loss_epoch", "val/loss"), ("swa/val/loss",)),
    ("accuracy", ("train/acc", "val/acc"), ("swa/val/acc",)),
)


def read_epoch_metrics(path: str) -> dict[str, dict[int, float]]:
    """``{metric: {epoch: value}}`` from a Lightning CSVLogger ``metrics.csv`` (last value per epoch)."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for k, v in row.items():
                if k not in ("epoch", "step") and v not in ("", None):
                    out[k][epoch] = float(v)
    return out


def plot(paths: list[str], labels: Optional[list[str]], swa_start: Optional[int], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"labels must name every run: {len(paths)} CSV files, got {len(labels)} labels")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, path in enumerate(paths):
        metrics = read_epoch_metrics(path)
        label = labels[i] if labels else path
        color = f"C{i}"
        for ax, (title, solid, dotted) in zip(axes, PANELS):
            for keys, style in ((solid, "-"), (dotted, ":")):
                for j, key in enumerate(k for k in keys if k in metrics):
                    xs = sorted(metrics[key])
                    ax.plot(xs, [metrics[key][x] for x in xs], style, color=color, alpha=1.0 if j else 0.6,
                            label=f"{label}: {key}")
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if title == "loss":
                ax.set_yscale("log")
    if swa_start is not None:
        for ax in axes:
            ax.axvline(swa_start, linestyle="--", color="gray", label="SWA start")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="CSVLogger metrics.csv files, one per run")
    parser.add_argument("--labels", nargs="+", default=None)
    parser.add_argument("--swa-start", type=int, default=None, help="0-based epoch where SWA starts")
    parser.add_argument("-o", "--out", default="figure1.png")
    args = parser.parse_args(argv)
    plot(args.metrics, args.labels, args.swa_start, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
