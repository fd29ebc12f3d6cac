"""Shared fixtures: a tiny LeNet config on random 8x8 images, fast enough for CPU tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ast  # noqa: E402
import io  # noqa: E402
import pathlib  # noqa: E402
import tarfile  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TRAIN_SYNSETS = ("n01440764", "n01443537", "n01484850")  # Labels 0, 1, 2.
TRAIN_PER_CLASS = 8
NUM_TRAIN = len(TRAIN_SYNSETS) * TRAIN_PER_CLASS  # 24
NUM_VALIDATION = 6

TINY = dict(
    dataset="synthetic:8x8x1:4",
    batch_size=32,
    training_steps="40it",
    eval_every="20it",
    rewind_step="20it",
    rounds=3,
    verbose=0,
    # The pruning rule of the authors' framework, which these tests are written for
    # (the lenet_300_100 recipe itself is the 2019 paper's layer-wise rule).
    prune_scope="global",
    output_rate=0.0,
)


def tiny_flags(**overrides) -> list:
    """TINY (with `overrides`; None leaves a flag out) as lth_tf.imp flags, for LeNet-300-100."""
    values = {"arch": "lenet_300_100", **TINY, **overrides}
    return [f"--{k}={v}" for k, v in values.items() if v is not None]


def setup_kwargs() -> dict:
    """setup.py's install_requires and extras_require, read without running it."""
    tree = ast.parse((pathlib.Path(__file__).resolve().parent.parent / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            return {
                k.arg: ast.literal_eval(k.value)
                for k in node.keywords
                if k.arg in ("install_requires", "extras_require")
            }
    raise AssertionError("setup.py has no setup(...) call")


@pytest.fixture()
def parse():
    """parse(*argv) -> RunConfig, with every flag `python -m lth_tf.imp` defines."""
    from absl import flags

    from lth_tf import flagdefs

    flagdefs.define_imp_flags()

    def _parse(*argv):
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["imp", *argv])
        return flagdefs.config_from_flags()

    yield _parse
    flags.FLAGS.unparse_flags()


@pytest.fixture(scope="session")
def tiny_config():
    """A factory: tiny_config(**overrides) -> RunConfig of LeNet-300-100 on 8x8x1 inputs.

    Global pruning with the output layer dense (output_rate=0); pass
    output_rate=1.0 to prune it with the others.
    """
    from lth_tf.config import make_config

    def make(**overrides):
        return make_config("lenet_300_100", **{**TINY, **overrides})

    return make


def write_mock_metadata(data_dir, name, splits):
    """Writes the metadata files that make a mocked dataset count as prepared.

    Without them tfds.testing.mock_data falls back to its USE_CODE policy, where
    `builder.is_prepared()` is False and the split names are unknown.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=split,
                    shard_lengths=[num_examples],
                    num_bytes=0,
                    filename_template=tfds.core.ShardedFileTemplate(
                        data_dir=builder.data_dir,
                        dataset_name=builder.name,
                        split=split,
                        filetype_suffix="tfrecord",
                    ),
                )
                for split, num_examples in splits.items()
            ]
        )
    )
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


def _jpeg(rng, height, width):
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    from lth_tf.keras import tf

    return tf.io.encode_jpeg(pixels).numpy()


def _add_to_tar(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory):
    """A data_dir with a real tfds preparation of a 24 + 6 image fake ImageNet."""
    data_dir = tmp_path_factory.mktemp("tfds")
    manual_dir = data_dir / "downloads" / "manual"
    manual_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as outer:
        for synset in TRAIN_SYNSETS:
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i in range(TRAIN_PER_CLASS):
                    height, width = rng.integers(20, 60, size=2)
                    _add_to_tar(inner, f"{synset}_{i}.JPEG", _jpeg(rng, height, width))
            _add_to_tar(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as tar:
        for i in range(1, NUM_VALIDATION + 1):
            _add_to_tar(tar, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng, 30, 45))
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet2012", data_dir=os.fspath(data_dir))
    # Several files per split, so that the per-epoch file order is exercised.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, num_shards=3)
    )
    return os.fspath(data_dir)


@pytest.fixture(autouse=True)
def _no_stop_request_leaks_between_tests():
    """A test that simulates SIGTERM must not stop every later test's training."""
    yield
    from lth_tf.callbacks import StopRequest

    StopRequest.signal_name = None
