"""Cost of moving between IMP rounds, and retracing (target: < 2% of a round, 0 retraces).

    python benchmarks/round_transition.py [--epochs=2] [--rounds=3]

Runs LeNet-300-100 IMP on the bundled MNIST with `--epochs` per round and
measures, per round, the wall time of training (`fit_segment`) and everything
else the round does (global threshold, mask assignment, rewinding, optimizer
reset, checkpoint files, test evaluation, summary). It counts how often the
Keras train step was traced after round 0 (target: never).
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write  # noqa: E402

from lth_tf import config, rounds, rundir, train  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps_per_execution", type=int, default=100)
    args = parser.parse_args()
    cfg = config.make_config(
        "lenet_300_100",
        training_steps=f"{args.epochs}ep",
        eval_every="1ep",
        rounds=args.rounds,
        verbose=0,
        steps_per_execution=args.steps_per_execution,
    )
    fit_seconds, fit_starts = [], []
    real_fit = train.fit_segment

    def timed_fit(*a, **k):
        fit_starts.append(time.perf_counter())
        real_fit(*a, **k)
        fit_seconds.append(time.perf_counter() - fit_starts[-1])

    train.fit_segment = timed_fit
    with tempfile.TemporaryDirectory() as tmp:
        rundir.open_run_dir(cfg, tmp)
        e = rounds.Experiment(cfg, tmp, log=lambda *a: None)
        rows = []
        traces_after_round0 = None
        for r in range(0, args.rounds + 1):
            t = time.perf_counter()
            if r == 0:
                e.dense_round()
            else:
                e.imp_round(r, e.imp_masks(r))
            total = time.perf_counter() - t
            # Before training: threshold, masks, rewinding, optimizer reset (+ their files).
            transition = fit_starts[-1] - t
            traces = e.model.train_function.experimental_get_tracing_count()
            if r == 0:
                traces_after_round0 = traces
            rows.append(
                {
                    "round": r,
                    "round_seconds": total,
                    "fit_seconds": fit_seconds[-1],
                    "overhead_seconds": total - fit_seconds[-1],
                    "overhead_fraction": (total - fit_seconds[-1]) / fit_seconds[-1],
                    "transition_seconds": transition,
                    "transition_fraction": transition / fit_seconds[-1],
                    "train_step_traces_so_far": traces,
                }
            )
            print(
                f"round {r}: {total:.2f} s, training {fit_seconds[-1]:.2f} s, transition "
                f"{transition:.3f} s ({100 * rows[-1]['transition_fraction']:.2f}%), all other "
                f"{total - fit_seconds[-1]:.3f} s ({100 * rows[-1]['overhead_fraction']:.2f}%, "
                f"incl. test evaluation), train-step traces so far: {traces}"
            )
    later = rows[1:]
    result = {
        "epochs_per_round": args.epochs,
        "rounds": rows,
        "mean_overhead_fraction_rounds_1_plus": sum(r["overhead_fraction"] for r in later)
        / len(later),
        "mean_transition_fraction_rounds_1_plus": sum(r["transition_fraction"] for r in later)
        / len(later),
        "retraces_after_round_0": rows[-1]["train_step_traces_so_far"] - traces_after_round0,
        "target_overhead_fraction": 0.02,
    }
    print(
        f"\nrounds >= 1: transition {100 * result['mean_transition_fraction_rounds_1_plus']:.2f}% "
        f"of training (target < 2%), all non-training work "
        f"{100 * result['mean_overhead_fraction_rounds_1_plus']:.2f}%; "
        f"retraces after round 0: {result['retraces_after_round_0']}"
    )
    write("round_transition", result)


if __name__ == "__main__":
    main()
