"""Where the time and memory of one short IMP job go, phase by phase.

    python benchmarks/overhead.py [--repeats=1] [--extra=--jit_compile --out=overhead_xla]

Runs the issue's LeNet-300-100 job (batch 128, 2 epochs per round, rewind to
100 it, global 20%, no controls; `--rounds=1`: 2 trainings) in a fresh process
and a fresh --root_dir, as a user runs it, and reports separately: interpreter
start, imports (TensorFlow, tf_keras, tfmot, lth_tf), data load, model build
and compile, the first fit call up to its first executed step (pipeline start
and tracing), training, evaluation (validation inside fit and the test
evaluations), per-round transitions (masks, weights, files), report and plot,
the total wall time and the peak RSS of the process (getrusage maxrss), with
the RSS after each phase and the number of times the train step was traced.
Target: 2-training job < 12 s, 4 trainings < 17 s, peak RSS <= 800 MB.

The child process times the phases by wrapping lth_tf's functions (the job
itself runs unchanged through `lth_tf.imp`); `--child` is that process.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

JOB = [
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
    "--verbose=2",
    "--training_steps=2ep",
    "--eval_every=1ep",
]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(argv) -> None:
    """Runs `python -m lth_tf.imp argv` in this process with phase timers; prints JSON."""
    t_start = time.perf_counter()
    phases = {}  # name -> seconds
    rss = {}  # phase end -> MB
    counts = {
        "train_step_python_calls": 0,  # a trace may run the body more than once (loops)
        "test_step_python_calls": 0,
        "models_built": 0,
        "fit_calls": 0,
    }
    functions = {}  # id -> the models' compiled train/test tf.functions

    def add(name, seconds):
        phases[name] = phases.get(name, 0.0) + seconds

    def timed_import(name, stmt):
        t = time.perf_counter()
        exec(stmt, {})
        add(name, time.perf_counter() - t)
        rss[f"after_{name}"] = _rss_mb()

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    timed_import("import_tensorflow", "import tensorflow")
    timed_import("import_tf_keras", "import tf_keras")
    timed_import("import_tfmot", "import lth_tf.keras")  # tfmot, through lth_tf's one import
    timed_import("import_lth_tf", "import lth_tf.imp")

    from lth_tf import data, imp, models, reporting, rounds, sparsity, train
    from lth_tf.keras import keras

    def wrap(owner, attr, phase, count=None, after=None):
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            if count:
                counts[count] += 1
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                add(phase, time.perf_counter() - t)
                if after:
                    rss[after] = _rss_mb()

        setattr(owner, attr, wrapper)

    wrap(data, "load", "data_load", after="after_data_load")
    wrap(models, "build_model", "model_build", count="models_built")
    wrap(sparsity, "wrap", "model_build")
    wrap(train, "compile_model", "model_build", after="after_model_build")
    wrap(train, "evaluate", "test_evaluation")
    wrap(reporting, "write_report", "report_and_plot", after="after_report")
    wrap(rounds.Experiment, "_train_round", "round_total")
    wrap(rounds.Experiment, "imp_masks", "round_transition")

    # Python runs a tf.function's body only when tracing: these count the traces.
    train_step, test_step = keras.Model.train_step, keras.Model.test_step

    def counting_train_step(self, data):
        counts["train_step_python_calls"] += 1
        return train_step(self, data)

    def counting_test_step(self, data):
        counts["test_step_python_calls"] += 1
        return test_step(self, data)

    keras.Model.train_step, keras.Model.test_step = counting_train_step, counting_test_step

    class Marks(keras.callbacks.Callback):
        """The first executed step of the process, and the validation passes inside fit."""

        first_step_done = False

        def on_train_begin(self, logs=None):
            self.t_fit = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if not Marks.first_step_done:
                Marks.first_step_done = True
                add("first_fit_to_first_step", time.perf_counter() - self.t_fit)
                rss["after_first_step"] = _rss_mb()

        def on_test_begin(self, logs=None):
            self.t_test = time.perf_counter()

        def on_test_end(self, logs=None):
            add("validation", time.perf_counter() - self.t_test)

    fit = keras.Model.fit

    def timed_fit(self, *args, callbacks=None, **kwargs):
        counts["fit_calls"] += 1
        t = time.perf_counter()
        try:
            return fit(self, *args, callbacks=[*(callbacks or []), Marks()], **kwargs)
        finally:
            add("fit", time.perf_counter() - t)
            rss["after_last_fit"] = _rss_mb()
            for kind in ("train", "test"):
                function = getattr(self, f"{kind}_function", None)
                if function is not None:
                    functions[id(function)] = (kind, function)

    keras.Model.fit = timed_fit

    t_main = time.perf_counter()
    sys.argv = ["lth_tf.imp", *argv]
    code = 0
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            imp.run()
        except SystemExit as e:
            code = e.code or 0
        finally:
            sys.stdout = stdout
    t_end = time.perf_counter()
    add("run", t_end - t_main)

    # Concrete traces of the compiled functions (1 each: no retracing between rounds).
    for kind in ("train", "test"):
        counts[f"{kind}_function_traces"] = sum(
            f.experimental_get_tracing_count() for k, f in functions.values() if k == kind
        )
        counts[f"{kind}_functions"] = sum(k == kind for k, _ in functions.values())

    # Derived phases: what each wrapper's time holds besides the others.
    training = phases["fit"] - phases["first_fit_to_first_step"] - phases.get("validation", 0.0)
    in_rounds = phases["fit"] + phases.get("test_evaluation", 0.0)
    result = {
        "exit_code": code,
        "seconds": {
            "import_tensorflow": phases["import_tensorflow"],
            "import_tf_keras": phases["import_tf_keras"],
            "import_tfmot": phases["import_tfmot"],
            "import_lth_tf": phases["import_lth_tf"],
            "data_load": phases.get("data_load", 0.0),
            "model_build_and_compile": phases.get("model_build", 0.0),
            "first_fit_to_first_step": phases["first_fit_to_first_step"],
            "training": training,
            "validation_in_fit": phases.get("validation", 0.0),
            "test_evaluation": phases.get("test_evaluation", 0.0),
            "round_transitions": phases.get("round_transition", 0.0)
            + phases.get("round_total", 0.0)
            - in_rounds,
            "report_and_plot": phases.get("report_and_plot", 0.0),
            "in_process_total": t_end - t_start,
        },
        "rss_mb_after": rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "counts": counts,
    }
    accounted = sum(v for k, v in result["seconds"].items() if k != "in_process_total")
    result["seconds"]["other"] = result["seconds"]["in_process_total"] - accounted
    print("OVERHEAD_JSON " + json.dumps(result))


def _spawn(cmd, env=None, cwd=None) -> tuple:
    """Runs cmd; returns (exit code, stdout, stderr, wall seconds, peak RSS MB, CPU seconds).

    The peak RSS and CPU time are the child's own (os.wait4), not the largest of all
    children so far as RUSAGE_CHILDREN would give.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        cpu = usage.ru_utime + usage.ru_stime
        return proc.returncode, out.read(), err.read(), wall, usage.ru_maxrss / 1024, cpu


def run_once(rounds: int, extra=()) -> dict:
    """The job in a fresh process and a fresh root dir; wall time measured from outside."""
    with tempfile.TemporaryDirectory() as root:
        argv = [*JOB, f"--rounds={rounds}", f"--root_dir={root}", *extra]
        code, stdout, stderr, wall, _, _ = _spawn(
            [sys.executable, os.path.abspath(__file__), "--child", *argv]
        )
    lines = [line for line in stdout.splitlines() if line.startswith("OVERHEAD_JSON ")]
    if code != 0 or not lines:
        sys.exit(f"the job failed:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    result = json.loads(lines[-1][len("OVERHEAD_JSON ") :])
    if result["exit_code"]:
        sys.exit(f"lth_tf.imp exited with {result['exit_code']}:\n{stderr[-3000:]}")
    result["seconds"]["wall"] = wall
    result["seconds"]["interpreter_start_and_exit"] = wall - result["seconds"]["in_process_total"]
    return result


def plain_run(rounds: int, tree: str | None = None, extra=()) -> dict:
    """The exact user command, `python -m lth_tf.imp`, timed from outside (no wrappers).

    `tree`: run the lth_tf of another checkout (PYTHONPATH), e.g. the code before a change.
    `extra`: more imp flags.
    """
    # `python -m` puts the working directory first on sys.path: run inside the tree.
    env = {"PYTHONPATH": tree} if tree else None
    with tempfile.TemporaryDirectory() as root:
        argv = [*JOB, *extra, f"--rounds={rounds}", f"--root_dir={root}"]
        code, stdout, stderr, wall, peak, cpu = _spawn(
            [sys.executable, "-m", "lth_tf.imp", *argv], env, cwd=tree
        )
    if code != 0:
        sys.exit(f"lth_tf.imp failed:\n{stderr[-3000:]}")
    return {
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "peak_rss_mb": peak,
        "table": [line for line in stdout.splitlines() if line.startswith("|")],
    }


def compare(baseline: str, repeats: int, write, median) -> None:
    """The 2-training job of `baseline` and of this checkout, alternating, `repeats` each."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {"baseline": [], "this": []}
    for i in range(repeats):
        order = ("baseline", "this") if i % 2 == 0 else ("this", "baseline")
        for name in order:
            runs[name].append(plain_run(1, baseline if name == "baseline" else here))
            r = runs[name][-1]
            print(
                f"{name:8s} wall {r['wall_seconds']:5.1f} s  CPU {r['cpu_seconds']:5.1f} s  "
                f"peak RSS {r['peak_rss_mb']:5.0f} MB",
                flush=True,
            )
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            key: median([r[key] for r in rs])
            for key in ("wall_seconds", "cpu_seconds", "peak_rss_mb")
        }
        summary[name]["runs"] = rs
    summary["this_over_baseline"] = {
        key: summary["this"][key] / summary["baseline"][key]
        for key in ("wall_seconds", "cpu_seconds", "peak_rss_mb")
    }
    print(summary["this_over_baseline"])
    write(
        "overhead_vs_baseline",
        {
            "job": ["python", "-m", "lth_tf.imp", *JOB, "--rounds=1", "--root_dir=<fresh>"],
            "baseline_tree": baseline,
            "repeats": repeats,
            "load_average_at_end": os.getloadavg(),
            **summary,
        },
    )


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import median, write

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="plain runs of each job")
    parser.add_argument("--extra", default="", help="more imp flags, comma separated")
    parser.add_argument("--out", default="overhead", help="results/<out>.json")
    parser.add_argument(
        "--baseline",
        default="",
        help="another lth_tf checkout: its 2-training job alternates with this one's",
    )
    args = parser.parse_args()
    extra = [a for a in args.extra.split(",") if a]
    if args.baseline:
        compare(args.baseline, args.repeats, write, median)
        return

    phased = run_once(1, extra)
    for name, seconds in phased["seconds"].items():
        print(f"{name:28s} {seconds:7.2f} s")
    print(f"peak RSS {phased['peak_rss_mb']:.0f} MB; counts {phased['counts']}")
    plain = {}
    for rounds, trainings in ((1, 2), (3, 4)):
        runs = [plain_run(rounds, extra=extra) for _ in range(args.repeats)]
        walls = [r["wall_seconds"] for r in runs]
        plain[f"{trainings}_trainings"] = {
            "rounds": rounds,
            "wall_seconds": walls,
            "median_wall_seconds": median(walls),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "table": runs[-1]["table"],
        }
        print(
            f"{trainings} trainings (--rounds={rounds}): wall "
            f"{', '.join(f'{w:.1f}' for w in walls)} s, peak RSS "
            f"{plain[f'{trainings}_trainings']['peak_rss_mb']:.0f} MB"
        )
    load = os.getloadavg()
    write(
        args.out,
        {
            "job": ["python", "-m", "lth_tf.imp", *JOB, "--rounds=1|3", "--root_dir=<fresh>"],
            "extra_flags": extra,
            "phases_2_trainings": phased,
            "plain_runs": plain,
            "load_average_at_end": load,
            "targets": {
                "2_trainings_wall_seconds": 12,
                "4_trainings_wall_seconds": 17,
                "peak_rss_mb": 800,
            },
        },
    )


if __name__ == "__main__":
    main()
