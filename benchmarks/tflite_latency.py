"""Dense vs sparse TFLite: file size, single-example and batch latency, agreement.

    python benchmarks/tflite_latency.py [--density=0.055] [--repeats=300]

For LeNet-300-100 (MNIST shape) and Conv-2 (CIFAR shape): global magnitude
masks at --density on the initial weights (latency and size do not depend on
training), converted with preprocessing (uint8 input) as lth_tf.export does,
into the dense, sparse and sparse+int8 TFLite formats. Latency is the median
of --repeats invokes on one thread, single example and a batch of 128,
measured interleaved (dense, sparse, sparse_int8, dense, ...) so machine noise
hits all kinds alike. Agreement is the fraction of 1,000 real MNIST / random
CIFAR-shaped inputs on which the TFLite model's class equals the Keras model's.
Targets (issue 15): sparse file <= 15% of the dense file at 5.5% density.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from common import write  # noqa: E402

from lth_tf import data, masks, models, sparsity, tflite  # noqa: E402
from lth_tf.keras import tf  # noqa: E402

NETWORKS = (("lenet_300_100", (28, 28, 1)), ("conv2", (32, 32, 3)))


def sparse_model(arch, shape, density):
    model = models.build_model(arch, shape, 10, seed=0)
    prunable = {layer.name: layer for layer in model.layers if sparsity.is_prunable(layer)}
    kernels = {n: layer.kernel.numpy() for n, layer in prunable.items()}
    mask = masks.prune(kernels, masks.ones_like(kernels), 1.0 - density)
    for n, layer in prunable.items():
        layer.kernel.assign(kernels[n] * mask[n])
    return model, masks.density(mask)


def serving(model, shape):
    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None, *shape], tf.uint8)])
        def serve(self, images):
            x = tf.cast(images, tf.float32) / 255.0
            return tf.nn.softmax(self.model(x, training=False), axis=-1)

    module = Serving()
    return module, module.serve.get_concrete_function()


def inputs(arch, shape, n=1000):
    if arch == "lenet_300_100":
        arrays = data.load_npz(data.bundled_mnist_path())
        return arrays.x_test[:n].reshape(n, *shape)
    return np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--density", type=float, default=0.055)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    result = {
        "density_target": args.density,
        "repeats": args.repeats,
        "interpreter": tflite.runtime().name,
        "networks": {},
    }
    for arch, shape in NETWORKS:
        model, density = sparse_model(arch, shape, args.density)
        module, fn = serving(model, shape)
        x = inputs(arch, shape)
        keras_classes = module.serve(tf.constant(x)).numpy().argmax(-1)
        flat = {kind: tflite.convert(fn, module, kind) for kind in tflite.TFLITE_KINDS}
        row = {"density": density, "kinds": {}}
        for kind, fb in flat.items():
            it, _ = tflite.interpreter(fb)
            agree = float(np.mean(tflite._run(it, x).argmax(-1) == keras_classes))
            row["kinds"][kind] = {"bytes": len(fb), "agreement_with_keras": agree}
        for label, batch in (("single", x[:1]), ("batch128", x[:128])):
            times = {kind: [] for kind in flat}
            for _ in range(5):  # interleaved blocks
                for kind, fb in flat.items():
                    n = max(args.repeats // 5, 10)
                    times[kind].append(tflite.latency(fb, batch, repeats=n))
            for kind in flat:
                row["kinds"][kind][f"{label}_median_s"] = float(
                    np.median([t["median_s"] for t in times[kind]])
                )
                row["kinds"][kind]["resolver"] = times[kind][0]["resolver"]
        dense = row["kinds"]["dense"]
        for kind in ("sparse", "sparse_int8"):
            k = row["kinds"][kind]
            k["size_ratio_vs_dense"] = k["bytes"] / dense["bytes"]
            k["single_speedup_vs_dense"] = dense["single_median_s"] / k["single_median_s"]
            k["batch128_speedup_vs_dense"] = dense["batch128_median_s"] / k["batch128_median_s"]
        result["networks"][arch] = row
        print(f"{arch} (density {density:.4f}):")
        for kind, k in row["kinds"].items():
            print(
                f"  {kind:12s} {k['bytes']:>9,} B  single {1e6 * k['single_median_s']:8.1f} us  "
                f"batch128 {1e3 * k['batch128_median_s']:7.2f} ms  agree {k['agreement_with_keras']:.3f}"
                f"  ({k['resolver']})"
            )
    lenet = result["networks"]["lenet_300_100"]["kinds"]["sparse"]
    result["target_sparse_size_ratio"] = 0.15
    result["target_met"] = lenet["size_ratio_vs_dense"] <= 0.15
    write("tflite_latency", result)


if __name__ == "__main__":
    main()
