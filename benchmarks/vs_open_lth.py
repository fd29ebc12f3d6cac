"""The same LeNet IMP job in lth_tf and in the authors' framework (open_lth), side by side.

    pip install torch==2.13.0 torchvision        # optional: never a dependency of lth_tf
    python benchmarks/vs_open_lth.py --open_lth=/path/to/open_lth [--repeats=2]

One job, both frameworks, on this machine, in one run: LeNet-300-100 on MNIST,
batch 128, plain SGD at 0.1, 938 iterations per training (two of open_lth's
60,000-image epochs), an evaluation every 469 iterations, rewind to iteration
100, global magnitude pruning of 20% per round with the output layer dense (open_lth's
`mnist_lenet_300_100` defaults with `--training_steps`, `--rewinding_steps` and
`--levels` set). Each framework runs it with 2 trainings (round/level 0 and 1) and
with 4 (levels 0-3), each in a fresh process and a fresh output directory; the
runs alternate (open_lth, lth_tf, open_lth, lth_tf, ...) so that a slower or
faster moment of the machine falls on both. For every run: wall time, the
child's own CPU time and peak RSS (os.wait4). Reported per framework: medians,
and the marginal cost of one more training, (4-training time - 2-training
time) / 2, which separates the fixed cost (start-up, imports, data loading) from
the cost per training. Ratios are open_lth / lth_tf of medians from this run.

open_lth reads MNIST through torchvision from `$HOME/open_lth_datasets/mnist`:
each open_lth run gets a fresh HOME holding the bundled MNIST written in
torchvision's raw IDX files (the same 60,000 + 10,000 images lth_tf uses; no
download). lth_tf holds out 5,000 training images for validation (its early
stopping) where open_lth trains on all 60,000; both train the same number of
iterations on batches of 128.

open_lth dates from 2020. The open_lth process (`--open_lth_child`) first makes
three adjustments so that its code runs unchanged on today's torch and numpy:
its DistributedDataParallel subclass (never used on one CPU) is built over a plain
Module, np.product is np.prod, and, where torchvision cannot be imported (its
wheel for this torch is built for CUDA), a stand-in provides the four pieces
open_lth's MNIST path uses (`datasets.MNIST` reading the raw IDX files,
`transforms.Compose`, `ToTensor`, `Normalize`), each computing what torchvision's
does, so the per-example PIL conversion of open_lth's loader is kept. The JSON
records which torchvision ran.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ITERATIONS = 938  # two epochs of open_lth's 60,000 training images at batch 128
EVAL_EVERY = 469

LTH_TF_JOB = [
    "--arch=lenet_300_100",
    "--batch_size=128",
    "--rewind_step=100it",
    "--controls=",
    "--optimizer=sgd",
    "--lr=0.1",
    "--momentum=0",
    "--weight_decay=0",
    "--prune_fraction=0.2",
    "--prune_scope=global",
    "--output_rate=0",
    "--verbose=0",
    f"--training_steps={ITERATIONS}it",
    f"--eval_every={EVAL_EVERY}it",
]

OPEN_LTH_JOB = [
    "lottery",
    "--default_hparams=mnist_lenet_300_100",
    f"--training_steps={ITERATIONS}it",
    "--rewinding_steps=100it",
    "--quiet",
]


def _idx(array: np.ndarray) -> bytes:
    """Bytes of an IDX file (the format torchvision's MNIST reads) of a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _bundled_mnist() -> str:
    """lth_tf's bundled MNIST file, found without importing lth_tf.

    This process must not import TensorFlow: a child's peak RSS (os.wait4) starts
    from this process's resident memory at the fork, so every child would report at
    least TensorFlow's ~600 MB.
    """
    import importlib.util

    (package,) = importlib.util.find_spec("lth_tf").submodule_search_locations
    return os.path.join(package, "data_files", "mnist.npz")


def write_open_lth_mnist(home: str) -> None:
    """The bundled MNIST as torchvision's raw files under HOME/open_lth_datasets/mnist."""
    raw = os.path.join(home, "open_lth_datasets", "mnist", "MNIST", "raw")
    os.makedirs(raw)
    with np.load(_bundled_mnist()) as d:
        files = {
            "train-images-idx3-ubyte": d["x_train"].reshape(-1, 28, 28),
            "train-labels-idx1-ubyte": d["y_train"],
            "t10k-images-idx3-ubyte": d["x_test"].reshape(-1, 28, 28),
            "t10k-labels-idx1-ubyte": d["y_test"],
        }
    for name, array in files.items():
        with open(os.path.join(raw, name), "wb") as f:
            f.write(_idx(array))


def _spawn(cmd, env, cwd) -> dict:
    """Runs cmd; wall, the child's own CPU seconds and peak RSS (MB); exits on failure."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        output = out.read()
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{output[-4000:]}")
    versions = [
        line.split(" ", 1)[1] for line in output.splitlines() if line.startswith("TORCHVISION ")
    ]
    return {
        **({"torchvision": versions[0]} if versions else {}),
        "wall_seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def _read_idx(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _torchvision_stand_in():
    """A module `torchvision` with what open_lth's MNIST path uses, computed as torchvision does."""
    import types

    import torch

    class _Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("not provided by the stand-in torchvision of vs_open_lth.py")

    class MNIST:
        def __init__(self, root, train=True, download=False, **_):
            raw = os.path.join(root, "MNIST", "raw")
            prefix = "train" if train else "t10k"
            self.data = torch.from_numpy(_read_idx(f"{raw}/{prefix}-images-idx3-ubyte").copy())
            labels = _read_idx(f"{raw}/{prefix}-labels-idx1-ubyte").astype(np.int64)
            self.targets = torch.from_numpy(labels)

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, x):
            for t in self.transforms:
                x = t(x)
            return x

    class ToTensor:  # torchvision.transforms.functional.to_tensor for a PIL image
        def __call__(self, pic):
            img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
            img = img.view(pic.size[1], pic.size[0], len(pic.getbands()))
            return img.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)

    class Normalize:  # torchvision.transforms.functional.normalize
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, tensor):
            tensor = tensor.clone()
            mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
            return tensor.sub_(mean).div_(std)

    def _other(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__getattr__ = _other  # other datasets, models, transforms
        sys.modules[name] = m
        return m

    resnet = module("torchvision.models.resnet")
    return module(
        "torchvision",
        __version__="stand-in (datasets.MNIST, transforms.Compose/ToTensor/Normalize)",
        datasets=module("torchvision.datasets", MNIST=MNIST),
        transforms=module(
            "torchvision.transforms", Compose=Compose, ToTensor=ToTensor, Normalize=Normalize
        ),
        models=module("torchvision.models", resnet=resnet),
    )


def open_lth_child(open_lth: str, argv: list) -> None:
    """Runs open_lth.py with argv in this process, after the adjustments in the docstring."""
    import runpy

    import torch

    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to load means: use the stand-in
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        _torchvision_stand_in()
    torch.nn.parallel.DistributedDataParallel = type(
        "DistributedDataParallel", (torch.nn.Module,), {}
    )
    if not hasattr(np, "product"):
        np.product = np.prod
    print("TORCHVISION " + sys.modules["torchvision"].__version__, flush=True)
    sys.path.insert(0, open_lth)
    os.chdir(open_lth)
    sys.argv = ["open_lth.py", *argv]
    runpy.run_path("open_lth.py", run_name="__main__")


def run_open_lth(open_lth: str, trainings: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        write_open_lth_mnist(home)
        env = {**os.environ, "HOME": home}
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            f"--open_lth_child={open_lth}",
            "--",
            *OPEN_LTH_JOB,
            f"--levels={trainings - 1}",
        ]
        return _spawn(cmd, env, cwd=open_lth)


def run_lth_tf(trainings: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = [
            sys.executable,
            "-m",
            "lth_tf.imp",
            *LTH_TF_JOB,
            f"--rounds={trainings - 1}",
            f"--root_dir={root}",
        ]
        return _spawn(cmd, env, cwd=None)


_MEASURES = ("wall_seconds", "cpu_seconds", "peak_rss_mb")


def summarise(runs: dict) -> dict:
    """Medians per (framework, trainings), marginal cost of a training, ratios."""
    out = {}
    for framework, by_trainings in runs.items():
        med = {
            n: {key: statistics.median(r[key] for r in rs) for key in _MEASURES}
            for n, rs in by_trainings.items()
        }
        out[framework] = {
            "median": {f"{n}_trainings": m for n, m in med.items()},
            "marginal_training": {
                key: (med[4][key] - med[2][key]) / 2 for key in ("wall_seconds", "cpu_seconds")
            },
        }
        out[framework]["fixed"] = {
            key: med[2][key] - 2 * out[framework]["marginal_training"][key]
            for key in ("wall_seconds", "cpu_seconds")
        }
    a, b = out["open_lth"], out["lth_tf"]
    out["ratio_open_lth_over_lth_tf"] = {
        **{
            f"{n}_trainings_{key}": a["median"][f"{n}_trainings"][key]
            / b["median"][f"{n}_trainings"][key]
            for n in (2, 4)
            for key in ("wall_seconds", "cpu_seconds", "peak_rss_mb")
        },
        **{
            f"marginal_training_{key}": a["marginal_training"][key] / b["marginal_training"][key]
            for key in ("wall_seconds", "cpu_seconds")
        },
    }
    return out


def main():
    if len(sys.argv) > 1 and sys.argv[1].startswith("--open_lth_child="):
        open_lth_child(sys.argv[1].split("=", 1)[1], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--open_lth", required=True, help="a checkout of open_lth's source")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each job per framework")
    parser.add_argument("--out", default="vs_open_lth", help="benchmarks/results/<out>.json")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.open_lth, "open_lth.py")):
        sys.exit(f"--open_lth={args.open_lth} holds no open_lth.py: pass open_lth's checkout.")
    from importlib.metadata import version

    torch_version = version("torch")  # not imported here: see _bundled_mnist
    load_before = os.getloadavg()
    runs = {"open_lth": {2: [], 4: []}, "lth_tf": {2: [], 4: []}}
    order = []
    for i in range(args.repeats):
        for trainings in (2, 4):
            for framework in ("open_lth", "lth_tf") if i % 2 == 0 else ("lth_tf", "open_lth"):
                if framework == "open_lth":
                    r = run_open_lth(args.open_lth, trainings)
                else:
                    r = run_lth_tf(trainings)
                runs[framework][trainings].append(r)
                order.append({"framework": framework, "trainings": trainings, **r})
                print(
                    f"{framework:8s} {trainings} trainings: {r['wall_seconds']:6.1f} s wall, "
                    f"{r['cpu_seconds']:6.1f} s CPU, peak {r['peak_rss_mb']:5.0f} MB",
                    flush=True,
                )
    summary = summarise(runs)
    for key, value in summary["ratio_open_lth_over_lth_tf"].items():
        print(f"open_lth / lth_tf, {key}: {value:.2f}")
    common.write(
        args.out,
        {
            "job": {
                "lth_tf": LTH_TF_JOB,
                "open_lth": OPEN_LTH_JOB,
                "iterations_per_training": ITERATIONS,
                "trainings": [2, 4],
            },
            "torch": torch_version,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "runs_in_order": order,
            **summary,
        },
    )


if __name__ == "__main__":
    main()
