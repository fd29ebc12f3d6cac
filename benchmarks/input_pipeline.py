"""Is the input pipeline the bottleneck? Steps/s with real data vs data already in memory.

    python benchmarks/input_pipeline.py [--steps=2000]

For LeNet-300-100 on the bundled MNIST (batch 60) and, on synthetic CIFAR-shaped
arrays with augmentation, ResNet-20 (batch 128): training steps/s fed by the
lth_tf pipeline vs by one cached batch repeated from memory, and the pipeline's
own batches/s with no model.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write  # noqa: E402

from lth_tf import data, models  # noqa: E402
from lth_tf.keras import keras, tf  # noqa: E402


def steps_per_second(model, ds, steps):
    model.fit(ds, steps_per_epoch=min(50, steps), epochs=1, verbose=0)  # trace, warm up
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps / (time.perf_counter() - start)


def pipeline_batches_per_second(ds, steps):
    iterator = iter(ds)
    for _ in range(20):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    cases = [
        ("lenet_300_100", data.load("mnist"), 60, args.steps, 100),
        ("resnet20", data.load("synthetic:32x32x3:10", augment=True), 128, args.steps // 20, 10),
    ]
    rows = []
    for arch, dataset, batch, steps, spe in cases:
        model = models.build_model(arch, dataset.input_shape, dataset.num_classes, seed=0)
        model.compile(
            keras.optimizers.SGD(0.01),
            keras.losses.SparseCategoricalCrossentropy(True),
            steps_per_execution=spe,
        )
        real = dataset.train(batch, data_seed=0)
        x, y = next(iter(real))
        cached = tf.data.Dataset.from_tensors((x, y)).repeat().with_options(data.no_autotune())
        row = {
            "model": arch,
            "dataset": dataset.name,
            "batch": batch,
            "pipeline_only_batches_per_s": pipeline_batches_per_second(real, steps),
            "train_steps_per_s_real_data": steps_per_second(model, real, steps),
            "train_steps_per_s_in_memory": steps_per_second(model, cached, steps),
        }
        row["real_over_in_memory"] = (
            row["train_steps_per_s_real_data"] / row["train_steps_per_s_in_memory"]
        )
        rows.append(row)
        print(
            f"{arch:14s} {dataset.name:22s} pipeline alone {row['pipeline_only_batches_per_s']:8.1f} "
            f"batches/s; training {row['train_steps_per_s_real_data']:7.1f} steps/s real data, "
            f"{row['train_steps_per_s_in_memory']:7.1f} in memory "
            f"(ratio {row['real_over_in_memory']:.3f})"
        )
    write("input_pipeline", {"results": rows})


if __name__ == "__main__":
    main()
