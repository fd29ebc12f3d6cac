"""Masked vs dense training step: steps per second of the same model, batch and data.

    python benchmarks/step_overhead.py [--repeats=15] [--cached] [--models=lenet_300_100,resnet20]

Pipeline mode (the default): LeNet-300-100 at batch 128 trained as lth_tf
trains it, `data.train` (bundled MNIST) into `model.fit` for one evaluation
period (429 steps) per timing, compiled by `train.compile_model` (SGD:
`sparsity.MaskedSGD`). Settings, one row each: lth_tf's defaults (the automatic
steps per execution, `train.execution_steps`, no XLA), which the targets are
checked on; one step per execution; and `--jit_compile`. The dense model and the masked one
(MaskedLayer wrappers, 20% density) are timed in alternating order, so that the
drifts of a shared machine fall on both; the figure is the median over repeats
of the paired ratio masked/dense with a bootstrap 95% confidence interval.
Targets: masked >= 300 steps/s, masked/dense <= 1.05 (and >= 1.0x dense speed
means a ratio <= 1.0 within its interval).

`--cached`: the older comparison on one cached batch, with tfmot's stock
PruneLowMagnitude wrapper too.
"""

import argparse
import os
import random
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from common import median, write  # noqa: E402

from lth_tf import config as config_lib  # noqa: E402
from lth_tf import data, masks, models, sparsity, train  # noqa: E402
from lth_tf.keras import keras, tf, tfmot  # noqa: E402

SETTINGS = {"lenet_300_100": ((28, 28, 1), 60), "resnet20": ((32, 32, 3), 128)}


def build(arch, kind, jit, shape):
    dense = models.build_model(arch, shape, 10, seed=0)
    if kind == "dense":
        model = dense
    else:
        wrapper = sparsity.MaskedLayer if kind == "masked" else sparsity._PruneLowMagnitude
        model = sparsity.wrap(dense, output_rate=1.0, wrapper=wrapper)
        weights = sparsity.get_weights(model)
        names = sorted(sparsity.wrappers(model))
        ones = masks.ones_like({n: weights[f"{n}/kernel"] for n in names})
        kernels = {n: weights[f"{n}/kernel"] for n in names}
        sparsity.set_masks(model, masks.prune(kernels, ones, 0.8))
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
        steps_per_execution=10,
    )
    return model


def time_steps(model, ds, steps, stock):
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep()] if stock else []
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=callbacks)
    return (time.perf_counter() - start) / steps


PLAN = {  # arch: (steps per timing, repeats); LeNet steps are short, so it gets many repeats
    "lenet_300_100": (500, 15),
    "resnet20": (20, 3),
}


def bootstrap_ci(values, n=5000, seed=0):
    """Percentile bootstrap 95% interval of the median of `values`."""
    rng = random.Random(seed)
    medians = sorted(median(rng.choices(values, k=len(values))) for _ in range(n))
    return [medians[int(0.025 * n)], medians[int(0.975 * n) - 1]]


def masked_copy(model):
    """`model` wrapped in MaskedLayer with masks of 20% density (the output layer too)."""
    wrapped = sparsity.wrap(model, output_rate=1.0)
    weights = sparsity.get_weights(wrapped)
    kernels = {n: weights[f"{n}/kernel"] for n in sorted(sparsity.wrappers(wrapped))}
    sparsity.set_masks(wrapped, masks.prune(kernels, masks.ones_like(kernels), 0.8))
    return wrapped


def _fit_period(model, ds, batch_size, offsets, kind, n):
    """Seconds of one `fit` over the next n steps of the real training pipeline."""
    pipeline = ds.train(batch_size, 0, start_step=offsets[kind])
    start, cpu = time.perf_counter(), time.process_time()
    model.fit(pipeline, steps_per_epoch=n, epochs=1, verbose=0)
    offsets[kind] += n
    return time.perf_counter() - start, time.process_time() - cpu


def pipeline_main(args):
    config = config_lib.make_config(
        "lenet_300_100",
        batch_size=128,
        optimizer="sgd",
        lr=0.1,
        momentum=0.0,
        training_steps="2ep",
        eval_every="1ep",
        rewind_step="100it",
    )
    ds = data.load("mnist")
    schedule = train.resolve(config, ds.steps_per_epoch(config.batch_size))
    period = schedule.eval_every
    rows = []
    for setting, jit, auto in SETTINGS_PIPELINE:
        cfg = config_lib.make_config("lenet_300_100", **{**_overrides(config), "jit_compile": jit})
        built = {}
        for kind in ("dense", "masked"):
            model = models.build_model("lenet_300_100", ds.input_shape, 10, seed=0)
            if kind == "masked":
                model = masked_copy(model)
            steps = train.execution_steps(model, cfg, schedule) if auto else 1
            train.compile_model(model, cfg, schedule, steps_per_execution=steps)
            built[kind] = model
        offsets = {k: 0 for k in built}
        for kind in built:  # warm-up: trace and compile
            _fit_period(built[kind], ds, cfg.batch_size, offsets, kind, period)
        seconds = {k: [] for k in built}
        cpu = {k: [] for k in built}
        for i in range(args.repeats):
            # Alternate the order so that drifts of this shared machine cancel.
            order = list(built) if i % 2 == 0 else list(reversed(built))
            for kind in order:
                wall, used = _fit_period(built[kind], ds, cfg.batch_size, offsets, kind, period)
                seconds[kind].append(wall)
                cpu[kind].append(used)
        ratios = [m / d for m, d in zip(seconds["masked"], seconds["dense"], strict=True)]
        cpu_ratios = [m / d for m, d in zip(cpu["masked"], cpu["dense"], strict=True)]
        row = {
            "setting": setting,
            "model": "lenet_300_100",
            "batch": cfg.batch_size,
            "pipeline": "data.train(bundled MNIST) -> model.fit, one period per timing",
            "steps_per_timing": period,
            "steps_per_execution": int(built["masked"]._steps_per_execution.numpy()),
            "jit_compile": jit,
            "repeats": args.repeats,
            "dense_steps_per_s": period / median(seconds["dense"]),
            "masked_steps_per_s": period / median(seconds["masked"]),
            "dense_seconds": seconds["dense"],
            "masked_seconds": seconds["masked"],
            "masked_over_dense": median(ratios),
            "masked_over_dense_ci95": bootstrap_ci(ratios),
            # CPU seconds of this process (all its threads): less sensitive than wall
            # time to other processes on a shared machine.
            "dense_cpu_seconds": cpu["dense"],
            "masked_cpu_seconds": cpu["masked"],
            "masked_over_dense_cpu": median(cpu_ratios),
            "masked_over_dense_cpu_ci95": bootstrap_ci(cpu_ratios),
        }
        row["meets_targets"] = row["masked_steps_per_s"] >= 300 and row["masked_over_dense"] <= 1.05
        rows.append(row)
        lo, hi = row["masked_over_dense_ci95"]
        print(
            f"{setting:26s} spe={row['steps_per_execution']:3d} dense "
            f"{row['dense_steps_per_s']:6.0f} steps/s  masked {row['masked_steps_per_s']:6.0f}"
            f" steps/s  masked/dense {row['masked_over_dense']:.3f} [{lo:.3f}, {hi:.3f}]"
            f" (CPU time {row['masked_over_dense_cpu']:.3f})",
            flush=True,
        )
    write(
        args.out,
        {
            "mode": "pipeline",
            "target_masked_steps_per_s": 300,
            "target_masked_over_dense": 1.05,
            "targets_checked_on": SETTINGS_PIPELINE[0][0],
            "meets_targets": rows[0]["meets_targets"],
            "load_average_at_end": os.getloadavg(),
            "results": rows,
        },
    )


# (name, jit_compile, automatic steps per execution); targets are checked on the first.
SETTINGS_PIPELINE = (
    ("defaults (auto spe, no XLA)", False, True),
    ("1 step per call, no XLA", False, False),
    ("--jit_compile", True, True),
)


def _overrides(config):
    keys = ("batch_size", "optimizer", "lr", "momentum", "training_steps", "eval_every")
    return {k: getattr(config, k) for k in (*keys, "rewind_step")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cached", action="store_true", help="the cached-batch comparison")
    parser.add_argument("--models", default="lenet_300_100,resnet20")
    parser.add_argument("--repeats", type=int, default=0, help="timings per kind (0: per mode)")
    parser.add_argument("--steps", type=int, default=0, help="steps per timing (0: per model)")
    parser.add_argument("--out", default="step_overhead", help="results/<out>.json")
    args = parser.parse_args()
    if not args.cached:
        args.repeats = args.repeats or 15
        pipeline_main(args)
        return
    results = []
    for arch in args.models.split(","):
        shape, batch = SETTINGS[arch]
        steps = args.steps or PLAN[arch][0]
        repeats = args.repeats or PLAN[arch][1]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        y = rng.integers(0, 10, batch)
        ds = tf.data.Dataset.from_tensors((x, y)).repeat().with_options(data.no_autotune())
        for jit in (False, True):
            built = {k: build(arch, k, jit, shape) for k in ("dense", "masked", "stock")}
            for kind, model in built.items():  # warm-up: trace and compile
                time_steps(model, ds, 20, kind == "stock")
            times = {k: [] for k in built}
            for i in range(repeats):
                # Alternate the order so that drifts of this shared machine cancel.
                order = list(built) if i % 2 == 0 else list(reversed(built))
                for kind in order:
                    times[kind].append(time_steps(built[kind], ds, steps, kind == "stock"))
            ratio = {
                k: median([a / b for a, b in zip(times[k], times["dense"], strict=True)])
                for k in ("masked", "stock")
            }
            row = {
                "model": arch,
                "batch": batch,
                "jit_compile": jit,
                "steps_per_timing": steps,
                "repeats": repeats,
                **{f"{k}_s_per_step": median(v) for k, v in times.items()},
                "masked_over_dense": ratio["masked"],
                "stock_over_dense": ratio["stock"],
            }
            results.append(row)
            print(
                f"{arch:14s} batch {batch:4d} xla={jit!s:5s} dense "
                f"{1e3 * row['dense_s_per_step']:.2f} ms  masked {1e3 * row['masked_s_per_step']:.2f}"
                f" ms ({row['masked_over_dense']:.3f}x)  tfmot stock "
                f"{1e3 * row['stock_s_per_step']:.2f} ms ({row['stock_over_dense']:.3f}x)"
                "  [ratios: median over interleaved repeats]"
            )
    write("step_overhead_cached", {"target_masked_over_dense": 1.05, "results": results})


if __name__ == "__main__":
    main()
