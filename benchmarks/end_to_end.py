"""End-to-end wall time of real runs (each in a fresh process, as a user runs them).

    python benchmarks/end_to_end.py [--skip_main_job]

1. the default main job, `python -m lth_tf.imp` (target: < 10 minutes on 2 cores);
2. LeNet-300-100, 3 IMP rounds of 2 epochs each, no controls.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write  # noqa: E402

RUNS = {
    "main_job": [],
    "lenet_3_rounds_2_epochs": [
        "--arch=lenet_300_100",
        "--training_steps=2ep",
        "--eval_every=1ep",
        "--rounds=3",
        "--steps_per_execution=100",
    ],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip_main_job", action="store_true")
    args = parser.parse_args()
    results = {}
    for name, argv in RUNS.items():
        if name == "main_job" and args.skip_main_job:
            continue
        with tempfile.TemporaryDirectory() as root:
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "lth_tf.imp", *argv, f"--root_dir={root}", "--verbose=0"],
                capture_output=True,
                text=True,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            )
            seconds = time.perf_counter() - start
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        table = [line for line in out.stdout.splitlines() if line.startswith("|")]
        results[name] = {"argv": argv, "wall_seconds": seconds, "table": table}
        print(f"{name}: {seconds:.1f} s wall")
        print("\n".join(table))
    write("end_to_end", {"target_main_job_seconds": 600, "runs": results})


if __name__ == "__main__":
    main()
