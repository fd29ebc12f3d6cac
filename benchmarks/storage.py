"""A ResNet-50 round's files against its density (lth_tf.files: sparse, by reference).

    python benchmarks/storage.py

Writes one pruned round's masks.npz, checkpoints/start.npz and checkpoints/final.npz
as lth_tf.rounds writes them, with ResNet-50's weights (the recipe's prunable
layers: every conv and the output layer; BatchNorm stays dense) at 100%, 20%, 5%
and 1% of the prunable weights (one-shot magnitude pruning matched to IMP), and
prints their bytes. start.npz is W_k under the masks and refers to W_k's file
(rewind.npz, written once per run, also printed) for its values; both weight files
refer to masks.npz for where their weights are. The trained weights are W_k plus
noise: random mantissas, which compress no better than trained ones.

Expected: bytes = 4 per weight kept (a little less: compressed) + a fixed part,
the bitmap in masks.npz (at most 1 bit per prunable weight: 3.2 MB; less where
the density is far from 50%) and the arrays that stay dense (BatchNorm's, the
output layer's bias: about 0.2 MB in each weight file).
"""

import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from common import write  # noqa: E402

from lth_tf import files, masks, models, paths, sparsity  # noqa: E402
from lth_tf.config import make_config  # noqa: E402
from lth_tf.data.arrays import SYNTHETIC_SHAPES  # noqa: E402

DENSITIES = (1.0, 0.2, 0.05, 0.01)


def _under(weights: dict, round_masks: dict) -> dict:
    out = dict(weights)
    for name, mask in round_masks.items():
        kernel = weights[f"{name}/kernel"]
        out[f"{name}/kernel"] = np.where(mask != 0, kernel, np.zeros((), kernel.dtype))
    return out


def _timed_write(path: str, arrays: dict, **references) -> dict:
    t = time.perf_counter()
    files.write_npz(path, arrays, **references)
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    files.read_npz(path)
    return {
        "bytes": os.path.getsize(path),
        "write_seconds": round(seconds, 2),
        "read_seconds": round(time.perf_counter() - t, 2),
    }


def main():
    config = make_config("resnet50")
    shape, num_classes = SYNTHETIC_SHAPES[config.dataset]
    model = sparsity.wrap(
        models.build_model(config.arch, shape, num_classes, seed=0),
        output_rate=config.output_rate,
    )
    w_k = sparsity.get_weights(model)
    layers = sorted(sparsity.wrappers(model))
    rates = sparsity.layer_rates(model, config)
    del model
    rng = np.random.default_rng(0)
    trained = {
        k: (v + 0.1 * v.std() * rng.standard_normal(v.shape)).astype(v.dtype)
        for k, v in w_k.items()
    }
    prunable = sum(w_k[f"{n}/kernel"].size for n in layers)
    print(
        f"ResNet-50: {prunable:,} prunable weights ({4 * prunable / 1e6:.1f} MB), "
        f"{sum(v.size for v in w_k.values()):,} in all"
    )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        r0 = paths.round_dir(tmp, 0)
        w_k_path = paths.checkpoint_file(r0, "rewind")
        base = _timed_write(w_k_path, w_k, compress=False)
        print(f"W_k (rewind.npz, once per run): {base['bytes'] / 1e6:.2f} MB")
        ones = masks.ones_like({n: w_k[f"{n}/kernel"] for n in layers})
        kernels = {n: trained[f"{n}/kernel"] for n in layers}
        for density in DENSITIES:
            round_masks = masks.prune_to_density(
                kernels, ones, density, config.prune_fraction, config.prune_scope, rates
            )
            rdir = paths.round_dir(tmp, 1)
            masks_path = paths.masks_file(rdir)
            row = {
                "density": masks.density(round_masks),
                "masks.npz": _timed_write(masks_path, round_masks),
                "start.npz": _timed_write(
                    paths.checkpoint_file(rdir, "start"),
                    _under(w_k, round_masks),
                    base=w_k_path,
                    masks=masks_path,
                ),
                "final.npz": _timed_write(
                    paths.checkpoint_file(rdir, "final"),
                    _under(trained, round_masks),
                    masks=masks_path,
                ),
            }
            kept = int(sum(np.count_nonzero(m) for m in round_masks.values()))
            sizes = {f: row[f]["bytes"] for f in ("masks.npz", "start.npz", "final.npz")}
            row.update(
                kept=kept,
                total_bytes=sum(sizes.values()),
                mask_bits_per_prunable_weight=round(8 * sizes["masks.npz"] / prunable, 3),
                # start.npz holds the dense arrays final.npz holds too, and no values.
                final_bytes_per_kept_weight=round(
                    (sizes["final.npz"] - sizes["start.npz"]) / kept, 3
                ),
            )
            rows[f"{density:g}"] = row
            print(
                f"density {row['density']:.4f}: masks.npz {sizes['masks.npz'] / 1e6:5.2f} MB "
                f"({row['mask_bits_per_prunable_weight']} bit per prunable weight), "
                f"start.npz {sizes['start.npz'] / 1e6:5.3f} MB, final.npz "
                f"{sizes['final.npz'] / 1e6:6.2f} MB ({row['final_bytes_per_kept_weight']} B "
                f"per weight kept beyond start.npz's dense arrays; written in "
                f"{row['final.npz']['write_seconds']} s), total {row['total_bytes'] / 1e6:6.2f} MB"
            )
            files.remove_tree(rdir)
    write(
        "storage_resnet50",
        {
            "prunable_weights": prunable,
            "dense_arrays": sum(v.size for v in w_k.values()) - prunable,
            "w_k": base,
            "rounds": rows,
        },
    )


if __name__ == "__main__":
    main()
