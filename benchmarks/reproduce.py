"""Reproduce the Sinkformers paper's comparison: softmax vs Sinkhorn attention.

Trains every variant (softmax, Sinkhorn with each ``n_iter``) for every seed with the same
config and budget, evaluates the best-validation checkpoint on the test split, and writes

* ``OUT/results.csv``: one row per run,
* ``OUT/summary.md``: mean ± std of test overall / mean per-class accuracy and time per epoch,
* ``OUT/learning_curves.png``: validation accuracy per epoch, mean over seeds.

Example (the paper's setup on real ModelNet10)::

    python benchmarks/reproduce.py --config configs/modelnet10-paper.yaml \
        --data-root ../shared/data/ModelNet10 --seeds 0 1 2 --n-iter 1 3 5 9

Extra arguments after ``--`` go to every ``train.py fit`` call (e.g.
``-- --trainer.max_epochs 10 --data.num_points 512``).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

from pointsink.cli import main as cli_main


def _variants(n_iters: list[int]) -> list[tuple[str, str, int]]:
    variants = [("softmax", "softmax", 1)]
    variants += [(f"sinkhorn-{k}", "sinkhorn", k) for k in n_iters]
    return variants


def _parse_variant(name: str) -> tuple[str, str, int]:
    if name == "softmax":
        return ("softmax", "softmax", 1)
    kind, _, n_iter = name.partition("-")
    if kind != "sinkhorn" or not n_iter.isdigit():
        raise SystemExit(f"unknown variant {name!r}: use softmax or sinkhorn-K")
    return (name, "sinkhorn", int(n_iter))


def _read_curve(run_dir: Path) -> list[tuple[int, float]]:
    # The fit and the later test write separate logger versions; only the fit has val/oa.
    curve = []
    for metrics in sorted(run_dir.rglob("metrics.csv")):
        with metrics.open() as handle:
            for row in csv.DictReader(handle):
                if row.get("val/oa"):
                    curve.append((int(row["epoch"]), float(row["val/oa"])))
    return curve


def run_one(
    config: str,
    data_root: str | None,
    out: Path,
    name: str,
    attention: str,
    n_iter: int,
    seed: int,
    extra: list[str],
) -> dict:
    """Fits one variant with one seed, then tests its best checkpoint."""
    run_dir = out / "runs" / f"{name}-seed{seed}"
    common = ["--config", config, "--seed_everything", str(seed),
              "--trainer.default_root_dir", str(run_dir),
              "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(run_dir),
              "--trainer.enable_progress_bar", "false"]  # fmt: skip
    if data_root:
        common += ["--data.root", data_root]
    model = ["--model.attention", attention, "--model.n_iter", str(n_iter)]
    start = time.perf_counter()
    fit = cli_main(["fit", *common, *model, *extra])
    seconds = time.perf_counter() - start
    epochs = max(1, fit.trainer.current_epoch)
    best = fit.trainer.checkpoint_callback.best_model_path
    test = cli_main(["test", *common, *model, *extra, "--ckpt_path", best])
    metrics = test.trainer.callback_metrics
    return {
        "variant": name,
        "attention": attention,
        "n_iter": n_iter,
        "seed": seed,
        "epochs": epochs,
        "seconds_per_epoch": seconds / epochs,
        "test_oa": float(metrics["test/oa"]),
        "test_macc": float(metrics["test/macc"]),
        "best_checkpoint": best,
        "run_dir": str(run_dir),
    }


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def summarize(rows: list[dict], out: Path) -> str:
    """Writes the CSV, the markdown summary and the learning-curve plot."""
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| variant | seeds | test OA (%) | test mAcc (%) | s / epoch |",
        "|---|---|---|---|---|",
    ]
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    for name in dict.fromkeys(row["variant"] for row in rows):
        group = [row for row in rows if row["variant"] == name]
        lines.append(
            f"| {name} | {len(group)} | {_mean_std([r['test_oa'] for r in group])} | "
            f"{_mean_std([r['test_macc'] for r in group])} | "
            f"{statistics.mean(r['seconds_per_epoch'] for r in group):.1f} |"
        )
        curves[name] = [_read_curve(Path(r["run_dir"])) for r in group]
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, runs in curves.items():
        length = min(len(run) for run in runs)
        epochs = [epoch for epoch, _ in runs[0][:length]]
        mean = [statistics.mean(run[i][1] for run in runs) for i in range(length)]
        axis.plot(epochs, mean, label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation overall accuracy (mean over seeds)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "learning_curves.png", dpi=120)
    plt.close(figure)
    return table


def main(argv: list[str] | None = None) -> str:
    """Parses arguments, runs the grid and prints the summary table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/modelnet10-paper.yaml")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-iter", type=int, nargs="+", default=[1, 3, 5, 9])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="run only these, e.g. softmax sinkhorn-5 (default: softmax and every --n-iter)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/reproduce"))
    args, extra = parser.parse_known_args(argv)
    extra = [arg for arg in extra if arg != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    variants = _variants(args.n_iter)
    if args.variants:
        variants = [_parse_variant(name) for name in args.variants]
    for name, attention, n_iter in variants:
        for seed in args.seeds:
            row = run_one(
                args.config, args.data_root, args.out, name, attention, n_iter, seed, extra
            )
            rows.append(row)
            summarize(rows, args.out)  # partial results survive an interrupted grid
    table = summarize(rows, args.out)
    print(table)
    return table


if __name__ == "__main__":
    main()
