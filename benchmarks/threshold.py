"""Global magnitude threshold over ResNet-50's prunable weights (target: < 1 s).

    python benchmarks/threshold.py

Times one round of global pruning (`lth_tf.masks.prune`, a partition, not a
sort) on random weights with ResNet-50's conv and dense kernel shapes, from a
dense mask and from a mask already at 20% density.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from common import median, write  # noqa: E402

from lth_tf import masks, models, sparsity  # noqa: E402


def main():
    model = models.build_model("resnet50", (224, 224, 3), 1000, seed=0)
    shapes = {
        layer.name: tuple(layer.kernel.shape)
        for layer in model.layers
        if sparsity.is_prunable(layer)
    }
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    total = sum(w.size for w in weights.values())
    dense = masks.ones_like(weights)
    sparse = masks.prune(weights, dense, 0.8)
    rows = {}
    for label, start in (("from_dense", dense), ("from_20pct", sparse)):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            new = masks.prune(weights, start, 0.2)
            times.append(time.perf_counter() - t)
        rows[label] = {"seconds": median(times), "density_after": masks.density(new)}
        print(
            f"global threshold over {total:,} weights ({label}): {median(times):.3f} s "
            f"(density {masks.density(start):.3f} -> {masks.density(new):.3f})"
        )
    write("threshold", {"prunable_weights": total, "target_seconds": 1.0, **rows})


if __name__ == "__main__":
    main()
