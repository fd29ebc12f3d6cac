"""The 2019 LTH paper's LeNet-300-100 figure, 3 replicates, at a stated shorter protocol.

    python benchmarks/lenet_finding.py [--replicates=3] [--root_dir=/tmp/lenet_finding]

Protocol (Frankle & Carbin 2019, Figures 3-4, shortened): LeNet-300-100 on the
bundled real MNIST (55,000 train / 5,000 validation / 10,000 test), Gaussian
Glorot init, Adam 1.2e-3, batch 60, layer-wise pruning at 20% per round with the
output layer at half rate (10%), k = 0 (reset to init), 15 rounds (3.6% of the
weights), the random-reinitialisation control at every round. Shorter than the
paper: 5 epochs (4,580 iterations) per round instead of 50,000 iterations, and
validation/test evaluated once per epoch instead of every 100 iterations, so
the early-stopping iteration is resolved to an epoch. Each replicate has its own
seed and data order (lth_tf.imp --replicates).

Writes benchmarks/results/lenet_finding.json (the aggregate, the command, wall
time, machine), lenet_finding.md (the report's table) and lenet_finding.png.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS, write  # noqa: E402

FLAGS = [
    "--arch=lenet_300_100",
    "--training_steps=5ep",
    "--eval_every=1ep",
    "--rewind_step=0",
    "--prune_scope=layerwise",
    "--prune_fraction=0.2",
    "--output_rate=0.5",
    "--rounds=15",
    "--controls=random_reinit",
    "--steps_per_execution=100",
    "--verbose=2",
    "--run_name=lenet_finding",
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--root_dir", default="/tmp/lenet_finding")
    args = parser.parse_args()
    command = [
        sys.executable,
        "-m",
        "lth_tf.imp",
        *FLAGS,
        f"--replicates={args.replicates}",
        f"--root_dir={args.root_dir}",
    ]
    print(" ".join(command[1:]), flush=True)
    t0 = time.time()
    subprocess.run(command, check=True)
    wall = time.time() - t0
    group = os.path.join(args.root_dir, "lenet_finding")
    from lth_tf import files, paths

    report = files.read_json(paths.report_json_file(group))
    os.makedirs(RESULTS, exist_ok=True)
    shutil.copyfile(paths.report_file(group), os.path.join(RESULTS, "lenet_finding.md"))
    shutil.copyfile(paths.plot_file(group), os.path.join(RESULTS, "lenet_finding.png"))
    write(
        "lenet_finding",
        {
            "command": "python -m lth_tf.imp " + " ".join(command[3:]),
            "wall_seconds": round(wall, 1),
            "note": "wall time includes resumed work if the group existed before",
            "report": report,
        },
    )


if __name__ == "__main__":
    main()
