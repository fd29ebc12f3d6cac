"""Every file and directory name of a run. Nothing else in lth_tf spells a path.

    <root_dir>/<arch>_<dataset>_<hash8>/        a run (hash of the config's identity)
      config.json
      round_00/                                 the dense network
        masks.npz  sparsity.json
        checkpoints/start.npz  rewind.npz  final.npz   (rewind.npz: W_k, round 0 only)
        ckpt/                                   mid-round TF checkpoint (resume)
        metrics.jsonl  tb/  summary.json        (summary.json last: the round is done)
      round_01/ ...
      branches/<control>/round_NN/ ...          random_reinit, random_prune
      report.md  accuracy_vs_density.png
All paths go through tf.io.gfile, so a root_dir may be a gs:// bucket.
"""

import os
import re

ROUND_RE = re.compile(r"^round_(\d{2,})$")


def join(*parts) -> str:
    # os.path.join keeps 'gs://bucket/...' intact.
    return os.path.join(*[str(p) for p in parts])


def run_name(config) -> str:
    dataset = re.sub(r"[^A-Za-z0-9]+", "-", config.dataset.split("/")[-1]).strip("-")
    return f"{config.arch}_{dataset}_{config.hash8()}"


def config_file(run_dir):
    return join(run_dir, "config.json")


def round_dir(run_dir, round_index: int, branch: str | None = None):
    name = f"round_{round_index:02d}"
    return join(run_dir, "branches", branch, name) if branch else join(run_dir, name)


def masks_file(rdir):
    return join(rdir, "masks.npz")


def sparsity_file(rdir):
    return join(rdir, "sparsity.json")


def checkpoint_file(rdir, which: str):
    """which: 'start', 'rewind' (W_k) or 'final'."""
    return join(rdir, "checkpoints", f"{which}.npz")


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


def export_dir(run_dir, round_index: int):
    return join(run_dir, "export", f"round_{round_index:02d}")


def saved_model_dir(run_dir, round_index: int):
    return join(export_dir(run_dir, round_index), "saved_model")


def tflite_file(run_dir, round_index: int, kind: str = "sparse"):
    """model_<kind>.tflite, kind one of lth_tf.tflite.KINDS (dense, sparse, sparse_int8)."""
    return join(export_dir(run_dir, round_index), f"model_{kind}.tflite")


def dense_saved_model_dir(run_dir, round_index: int):
    """The round-0 (dense) network exported beside the ticket, for size comparison."""
    return join(export_dir(run_dir, round_index), "dense_saved_model")


def export_report_file(run_dir, round_index: int):
    return join(export_dir(run_dir, round_index), "export.json")


def stability_dir(run_dir, round_index: int):
    return join(run_dir, "stability", f"round_{round_index:02d}")


def stability_point_dir(run_dir, round_index: int, step: int):
    return join(stability_dir(run_dir, round_index), f"k_{step:07d}")


def stability_copy_dir(run_dir, round_index: int, step: int, repeat: int, copy: int):
    return join(stability_point_dir(run_dir, round_index, step), f"repeat_{repeat}", f"copy_{copy}")


def rewind_point_file(run_dir, step: int):
    """Dense weights at `step` trained from round 0's init with the run's data order."""
    return join(run_dir, "stability", "rewind_points", f"step_{step:07d}.npz")
