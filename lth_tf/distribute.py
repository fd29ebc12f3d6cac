"""The one place a tf.distribute strategy is built from flags' values.

    default       the default strategy (one device)
    mirrored      MirroredStrategy over --num_gpus GPUs (or the given devices)
    multi_worker  MultiWorkerMirroredStrategy; the cluster comes from TF_CONFIG
    tpu           TPUStrategy on --tpu (a name, grpc:// address, or 'local' on a TPU VM)

Only the chief writes the run directory; other workers write their own copy to
a scratch directory (the Keras multi-worker convention), so every worker runs
the same code, computes the same masks from the same weights, and never reads a
half-written file of another worker.

Input under a strategy is built per input pipeline (`distribute_input`): each
worker's pipeline reads only its share of every global batch (lth_tf.data).
"""

import json
import os

from lth_tf.keras import tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


class StrategyError(ValueError):
    """The requested strategy cannot be built here."""


def get_strategy(
    name: str = "default", *, num_gpus: int | None = None, tpu: str | None = None, devices=None
):
    """Builds the strategy `name`.

    Args:
      name: one of STRATEGIES.
      num_gpus: for 'mirrored': how many GPUs (default: all visible).
      tpu: for 'tpu': the TPU name or address; 'local' on a TPU VM.
      devices: for 'mirrored': explicit device names (e.g. two logical CPUs in tests).
    """
    if name not in STRATEGIES:
        raise StrategyError(
            f"Unknown --strategy={name!r}. Known strategies: {', '.join(STRATEGIES)}."
        )
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if devices is None:
            gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
            if num_gpus is not None:
                if num_gpus > len(gpus):
                    raise StrategyError(
                        f"--num_gpus={num_gpus} but only {len(gpus)} GPU(s) are visible "
                        f"({gpus or 'none'}). Lower --num_gpus or check CUDA_VISIBLE_DEVICES."
                    )
                gpus = gpus[:num_gpus]
            devices = gpus or None  # None: MirroredStrategy falls back to the CPU
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise StrategyError(
                "--strategy=multi_worker needs the cluster in the TF_CONFIG environment variable, "
                'e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                '"task": {"type": "worker", "index": 0}}, set on every worker.'
            )
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as e:
            raise StrategyError(f"TF_CONFIG is not valid JSON ({e}).") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    if not tpu:
        raise StrategyError(
            "--strategy=tpu needs --tpu: the TPU's name or address, or 'local' on a TPU VM."
        )
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError, ImportError) as e:
        raise StrategyError(
            f"Could not reach TPU {tpu!r}: {e}. On a TPU VM use --tpu=local and install the "
            "tensorflow-tpu build (BUILD.md); elsewhere give the TPU's name and install .[tpu]."
        ) from e
    return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy) -> bool:
    """True on the worker that writes results (always true off multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def worker_run_dir(run_dir: str, strategy) -> str:
    """The chief's run_dir, or a per-worker scratch copy for other workers."""
    if is_chief(strategy):
        return run_dir
    # A sibling, not a subdirectory: the chief's directory stays exactly a run.
    resolver = strategy.cluster_resolver
    return f"{run_dir.rstrip('/')}.{resolver.task_type}_{resolver.task_id}"


def is_distributed(strategy) -> bool:
    """True for every strategy but the default one-device strategy.

    The default strategy is the one `tf.distribute.get_strategy()` returns outside
    any scope; its class is private, hence the name check.
    """
    return "DefaultDistributionStrategy" not in type(strategy).__name__


def distribute_input(strategy, make_dataset):
    """A distributed dataset built per input pipeline.

    Args:
      strategy: the model's strategy.
      make_dataset: `make_dataset(input_context) -> tf.data.Dataset` of this
        pipeline's per-replica batches (e.g. `partial(data.train, ...)` of an
        lth_tf.data dataset).

    Returns:
      `strategy.distribute_datasets_from_function(make_dataset)`: no auto-sharding;
      each worker builds and reads only its own pipeline.
    """
    return strategy.distribute_datasets_from_function(make_dataset)
