"""Masked vs dense training step: time per step of the same model, batch and data.

    python benchmarks/step_overhead.py [--models=lenet_300_100,resnet20] [--repeats=5]

For each model and XLA setting it times, interleaved to share the machine's
noise: the plain dense model, lth_tf's MaskedLayer wrapper (masks at 20%
density) and tfmot's stock PruneLowMagnitude wrapper with a never-firing
schedule and UpdatePruningStep. Figures: median seconds per step and the
ratios masked/dense and stock/dense (target: masked <= 1.05x).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from common import median, write  # noqa: E402

from lth_tf import data, masks, models, sparsity  # noqa: E402
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lenet_300_100,resnet20")
    parser.add_argument("--repeats", type=int, default=0, help="timings per kind (0: per model)")
    parser.add_argument("--steps", type=int, default=0, help="steps per timing (0: per model)")
    args = parser.parse_args()
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
    write("step_overhead", {"target_masked_over_dense": 1.05, "results": results})


if __name__ == "__main__":
    main()
