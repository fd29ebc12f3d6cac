"""Every file and directory name of a run. Nothing else in lth_tf spells a path.

    <root_dir>/<arch>_<dataset>_<hash8>/        a run (hash of the config's identity)
      config.json
      round_00/                                 the dense network
        masks.npz  sparsity.json
        checkpoints/start.npz  rewind.npz  final.npz   (rewind.npz: W_k, round 0 only;
                                                none when k = 0: W_0 is start.npz)
        checkpoints/rewind_step_0000100.npz     W_k of other k (imp --rewind_steps)
        ckpt/                                   mid-round TF checkpoint (resume)
        metrics.jsonl  tb/  summary.json        (summary.json last: the round is done)
      round_01/ ...
      branches/<control>/round_NN/ ...          random_reinit, random_prune
      branches/<branch>/branch.json round_NN/   lth_tf.branch: rewind_100it, lr_rewind_20it,
                                                finetune_lr0.0001_200it, oneshot_20it_d20.0000, ...
      stability/[<series>/]round_NN/k_XXXXXXX/  lth_tf.stability (series: a branch, a control)
      report.md  report.json  accuracy_vs_density.png
      lock.json                                 while a command writes the run (lth_tf/runlock.py)
    <group>/replicate_1/ replicate_2/ ...       a replicate group: each one a run as above
      report.md  report.json  accuracy_vs_density.png   (aggregated over the replicates)
All paths go through tf.io.gfile, so a root_dir may be a gs:// bucket.
"""

import os
import re

ROUND_RE = re.compile(r"^round_(\d{2,})$")
# A replicate group: <group>/replicate_1/, replicate_2/, ... each a complete run directory.
REPLICATE_RE = re.compile(r"^replicate_(\d+)$")


def check_name(value, flag: str, instead: str) -> str:
    """Returns `value` if it is a name (one directory entry), else raises.

    Run names, branch names and stability series are names, not paths: they
    stay under their run or root. Refused: '', '.', '..', anything with a path
    separator ('/', '\\') or a control character (an absolute path contains '/').

    Args:
      value: what was received.
      flag: how the user gave it, e.g. '--run_name'.
      instead: what to pass instead, e.g. 'a directory name under --root_dir such as my_run'.

    Raises:
      ValueError: saying what was received and what to pass instead.
    """
    bad = (
        not isinstance(value, str)
        or value in ("", ".", "..")
        or any(c in value for c in "/\\")
        or any(ord(c) < 32 for c in value)
    )
    if bad:
        raise ValueError(
            f"{flag}={value!r} is not a name: it must be one directory name (no '/', '\\', "
            f"'..' or absolute path), so that nothing is written outside its directory. "
            f"Pass {instead}."
        )
    return value


def expand(path):
    """A local path with '~' and environment variables ($HOME, ${VAR}) expanded.

    The shell leaves '~' unexpanded after '--flag=', and neither tfds nor
    tf.io.gfile expands it; every path flag goes through this. URLs (gs://...,
    anything with '://') and None are returned unchanged.
    """
    if not path or "://" in path:
        return path
    return os.path.expandvars(os.path.expanduser(path))


def join(*parts) -> str:
    # os.path.join keeps 'gs://bucket/...' intact.
    return os.path.join(*[str(p) for p in parts])


def run_prefix(config) -> str:
    """<arch>_<dataset>_: what the default names of a config's runs start with."""
    dataset = re.sub(r"[^A-Za-z0-9]+", "-", config.dataset.split("/")[-1]).strip("-")
    arch = re.sub(r"[^A-Za-z0-9_]+", "-", config.arch)  # 'pkg.mod:build' -> 'pkg-mod-build'
    return f"{arch}_{dataset}_"


def run_name(config) -> str:
    return f"{run_prefix(config)}{config.hash8()}"


def group_name(config) -> str:
    """Default directory name of a replicate group: its first replicate's run name."""
    return f"{run_name(config)}_replicates"


def config_file(run_dir):
    return join(run_dir, "config.json")


LOCK_FILE = "lock.json"


def lock_file(run_dir):
    """Held by the one command writing the run (lth_tf/runlock.py); gone once it ends."""
    return join(run_dir, LOCK_FILE)


def round_dir(run_dir, round_index: int, branch: str | None = None):
    name = f"round_{round_index:02d}"
    return join(branch_dir(run_dir, branch), name) if branch else join(run_dir, name)


def masks_file(rdir):
    return join(rdir, "masks.npz")


def sparsity_file(rdir):
    return join(rdir, "sparsity.json")


def checkpoint_file(rdir, which: str):
    """which: 'start', 'rewind' (W_k) or 'final'."""
    return join(rdir, "checkpoints", f"{which}.npz")


def rewind_file(rdir, step: int):
    """W_k at another step k than the run's own (whose file stays checkpoint_file(rdir, 'rewind'))."""
    return join(rdir, "checkpoints", f"rewind_step_{step:07d}.npz")


def branch_dir(run_dir, branch: str):
    """A branch of a run: a control, or one of lth_tf.branch (its rounds are round_dir's)."""
    return join(run_dir, "branches", check_name(branch, "branch", "a branch name"))


def branch_file(run_dir, branch: str):
    """branch.json: what a branch of lth_tf.branch is (its kind and parameters)."""
    return join(branch_dir(run_dir, branch), "branch.json")


def resume_dir(rdir):
    return join(rdir, "ckpt")


def metrics_file(rdir):
    return join(rdir, "metrics.jsonl")


def tensorboard_dir(rdir):
    return join(rdir, "tb")


def summary_file(rdir):
    return join(rdir, "summary.json")


def report_file(run_dir):
    return join(run_dir, "report.md")


def plot_file(run_dir):
    return join(run_dir, "accuracy_vs_density.png")


def report_json_file(run_dir):
    """The report's numbers (aggregates over replicates) as JSON, next to report.md."""
    return join(run_dir, "report.json")


def replicate_dir(group_dir, replicate: int):
    """Replicate n (1-based) of a replicate group."""
    return join(group_dir, f"replicate_{replicate}")


def export_dir(run_dir, round_index: int):
    return join(run_dir, "export", f"round_{round_index:02d}")


def saved_model_dir(run_dir, round_index: int):
    return join(export_dir(run_dir, round_index), "saved_model")


def tflite_file(run_dir, round_index: int, kind: str = "sparse"):
    """model_<kind>.tflite, kind one of lth_tf.tflite.TFLITE_KINDS (dense, sparse, sparse_int8)."""
    return join(export_dir(run_dir, round_index), f"model_{kind}.tflite")


def dense_saved_model_dir(run_dir, round_index: int):
    """The round-0 (dense) network exported beside the ticket, for size comparison."""
    return join(export_dir(run_dir, round_index), "dense_saved_model")


def export_report_file(run_dir, round_index: int):
    return join(export_dir(run_dir, round_index), "export.json")


def stability_dir(run_dir, round_index: int, series: str | None = None):
    """stability/round_NN of the run's IMP subnetworks; stability/<series>/round_NN of others."""
    name = f"round_{round_index:02d}"
    if series:
        return join(run_dir, "stability", check_name(series, "series", "a series name"), name)
    return join(run_dir, "stability", name)


def stability_point_dir(run_dir, round_index: int, step: int, series: str | None = None):
    return join(stability_dir(run_dir, round_index, series), f"k_{step:07d}")


def stability_copy_dir(
    run_dir, round_index: int, step: int, repeat: int, copy: int, series: str | None = None
):
    point = stability_point_dir(run_dir, round_index, step, series)
    return join(point, f"repeat_{repeat}", f"copy_{copy}")


def stability_inputs_file(point_dir):
    """What a stability point's trained copies were trained from (a point dir's inputs.json)."""
    return join(point_dir, "inputs.json")


def interpolation_file(point_dir):
    """A stability point's result: the error along the path, the barrier, the distances."""
    return join(point_dir, "interpolation.json")


def interpolation_plot_file(point_dir):
    return join(point_dir, "path.png")


def sweep_file(stability_round_dir, shared_mask: bool = False):
    """A sweep over k of one round (stability_dir): sweep.json, or sweep_shared_mask.json."""
    return join(stability_round_dir, "sweep_shared_mask.json" if shared_mask else "sweep.json")


def barrier_plot_file(stability_round_dir, shared_mask: bool = False):
    name = "barrier_vs_k_shared_mask.png" if shared_mask else "barrier_vs_k.png"
    return join(stability_round_dir, name)


def rewind_point_file(run_dir, step: int):
    """Dense weights at `step` trained from round 0's init with the run's data order."""
    return join(run_dir, "stability", "rewind_points", f"step_{step:07d}.npz")
