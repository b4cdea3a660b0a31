"""Time one training step of a config's model, and the parts of its set abstraction.

Builds the model from a training config's ``model:`` section (the ModelNet10 recipe by
default) and times, on random point sets of the config's batch size and point count:

* ``farthest_point_sampling``: choosing the set abstraction's centres (on CUDA also the
  PyTorch loop that the Triton kernel replaces there);
* ``knn_indices``: the ``group_size`` points nearest each centre;
* ``set abstraction fwd+bwd``: the whole embedding, forward and backward;
* ``training step``: forward, cross-entropy, backward and an AdamW step (lr 1e-3) of the
  whole model: nearly what an epoch repeats (data loading and validation excluded), without
  the config's label smoothing, gradient clipping and optimizer settings (what they add is
  not measured here);
* with ``--per-sample-gradients``: the gradient of each sample's loss, by ``torch.func``
  (``vmap`` of ``grad`` over ``functional_call``, dropout drawn per sample) and by one
  backward pass per sample; both in float32 whatever the config's precision, because
  ``vmap`` of ``grad`` through a LayerNorm under autocast fails in PyTorch up to 2.13 at
  least ("expected scalar type BFloat16 but found Float", pytorch/pytorch#184890).

Under the config's precision (``bf16-mixed`` runs the model under CPU/CUDA bf16 autocast).
Each line reports the minimum and the median over ``--repeats`` runs after ``--warmup``; on
a shared or virtual machine the minimum is the steadier number. With ``--device cuda`` the
runs are synchronized, and each part is profiled once: how many kernels (and copies) it
launches and how long the GPU is busy in it. Far less busy time than wall time means the
part waits on the host (launches, Python), not on the GPU.

Example (the setting of the CPU training runs: one intra-op thread per run)::

    python benchmarks/train_step.py --config configs/modelnet10.yaml --threads 1
    python benchmarks/train_step.py --config configs/modelnet10.yaml --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F  # noqa: N812
import yaml

from pointsink.data import DatasetLayoutError
from pointsink.embedding import SetAbstraction, farthest_point_sampling, knn_indices
from pointsink.module import SinkformerClassifier


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timings(
    run: Callable[[], object], warmup: int, repeats: int, device: torch.device
) -> tuple[float, float]:
    """(minimum, median) seconds of ``run()`` over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return min(seconds), statistics.median(seconds)


def _gpu_profile(run: Callable[[], object], device: torch.device) -> tuple[int, float, float]:
    """(GPU operations, GPU-busy ms, wall ms) of one profiled ``run()`` on CUDA.

    GPU operations are the kernels, copies and fills the profiler saw; GPU-busy time is the
    sum of their own times (one stream: they do not overlap), at most the wall time.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        wall = time.perf_counter() - start
    kernels, busy_us = 0, 0.0
    for event in prof.key_averages():
        us = event.self_device_time_total
        if us > 0:
            kernels += event.count
            busy_us += us
    return kernels, busy_us / 1e3, wall * 1e3


def _num_classes(data: dict) -> int:
    """The class count of a config's ``data:`` section, from the data module it names (ModelNet
    without a ``class_path``), built with its arguments as the CLI builds it: the class
    names are known then, and no shapes are read.

    Raises:
        ValueError: The data module refuses its arguments, e.g. a shape-folder config
            without class names whose root holds no class folders.
    """
    module_name, _, class_name = data.get(
        "class_path", "pointsink.data.ModelNetDataModule"
    ).rpartition(".")
    data_module = getattr(importlib.import_module(module_name), class_name)
    data_args = data.get("init_args", data)
    try:
        return data_module(**data_args).num_classes
    except DatasetLayoutError as error:
        raise ValueError(
            f"Cannot tell the class count of {data_module.__name__} at root "
            f"{data_args.get('root')!r}: give data.init_args.class_names in the config ({error})"
        ) from error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/modelnet10.yaml")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--per-sample-gradients",
        action="store_true",
        help="also time per-sample gradients: torch.func against one backward per sample",
    )
    parser.add_argument(
        "--padded-fraction",
        type=float,
        default=None,
        help="pad this fraction of each set's points and pass a mask (e.g. 0.25: 768 real "
        "points of 1024); default: no mask",
    )
    args = parser.parse_args(argv)
    if args.padded_fraction is not None and not 0.0 <= args.padded_fraction < 1.0:
        parser.error("--padded-fraction must be in [0, 1)")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1; got {args.repeats}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with open(args.config) as file:
        config = yaml.safe_load(file)
    model_args = dict(config["model"])
    data_args = config["data"].get("init_args", config["data"])
    batch_size, num_points = int(data_args["batch_size"]), int(data_args["num_points"])
    bf16 = "bf16" in str(config.get("trainer", {}).get("precision", ""))
    num_classes = _num_classes(config["data"])
    module = SinkformerClassifier(num_classes=num_classes, **model_args).to(device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    # Configs without grouping (num_groups: 0) have no set abstraction: time the step only.
    embedding = next((m for m in module.modules() if isinstance(m, SetAbstraction)), None)

    points = F.normalize(torch.randn(batch_size, num_points, 3), dim=-1).to(device)
    labels = torch.randint(num_classes, (batch_size,)).to(device)
    mask = None
    if args.padded_fraction is not None:
        # Rounded down, as benchmarks/attention.py does: a set keeps at least one real point.
        real = num_points - int(args.padded_fraction * num_points)
        mask = (torch.arange(num_points) < real).expand(batch_size, -1).to(device)

    @contextlib.contextmanager
    def precision() -> Iterator[None]:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            yield

    def embedding_step() -> None:
        with precision():
            tokens = embedding(points, mask)
        tokens.float().sum().backward()

    def training_step() -> None:
        with precision():
            loss = F.cross_entropy(module(points, mask), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    parts: list[tuple[str, Callable[[], object]]] = []
    if embedding is not None:
        centers, group_size = embedding.num_groups, embedding.group_size
        parts += [
            (f"farthest_point_sampling ({centers} of {num_points})",
             lambda: farthest_point_sampling(points, centers, mask=mask)),
            *([("farthest_point_sampling, PyTorch loop (not used on CUDA)",
                lambda: farthest_point_sampling(points, centers, backend="loop", mask=mask))]
              if device.type == "cuda" else []),
            (f"knn_indices ({group_size} per centre)",
             lambda: knn_indices(points, group_size, queries=points[:, :centers], mask=mask)),
            ("set abstraction fwd+bwd", embedding_step),
        ]  # fmt: skip
    parts.append(("training step (fwd, loss, bwd, AdamW)", training_step))
    if args.per_sample_gradients:
        parameters = dict(module.named_parameters())

        def sample_loss(params: dict, points: torch.Tensor, mask, label: torch.Tensor):
            inputs = (points[None], None if mask is None else mask[None])
            logits = torch.func.functional_call(module, params, inputs)  # float32 (see above)
            return F.cross_entropy(logits, label[None])

        per_sample = torch.func.vmap(
            torch.func.grad(sample_loss),
            in_dims=(None, 0, None if mask is None else 0, 0),
            randomness="different",
        )

        def one_backward_per_sample() -> None:
            for i in range(batch_size):
                sample_mask = None if mask is None else mask[i]
                loss = sample_loss(parameters, points[i], sample_mask, labels[i])
                torch.autograd.grad(loss, list(parameters.values()))

        detached = {name: p.detach() for name, p in parameters.items()}
        parts += [
            ("per-sample gradients (fp32), torch.func vmap(grad)",
             lambda: per_sample(detached, points, mask, labels)),
            ("per-sample gradients (fp32), one backward per sample", one_backward_per_sample),
        ]  # fmt: skip
    module.train()
    print(
        f"config {args.config}, batch {batch_size} x {num_points} points, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, {device.type}, {args.threads} thread(s), "
        f"{'no mask' if mask is None else f'padded fraction {args.padded_fraction}'}, "
        f"min / median of {args.repeats} after {args.warmup} warm-up"
    )
    print("| part | min (ms) | median (ms) |")
    print("|---|---|---|")
    for name, run in parts:
        fastest, median = _timings(run, args.warmup, args.repeats, device)
        print(f"| {name} | {fastest * 1e3:.1f} | {median * 1e3:.1f} |")
    if device.type == "cuda":
        print("\n| profiled once | GPU operations | GPU busy (ms) | wall (ms) |")
        print("|---|---|---|---|")
        for name, run in parts:
            kernels, busy, wall = _gpu_profile(run, device)
            print(f"| {name} | {kernels} | {busy:.1f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
