"""Contracts of ImageNet input sharding (`input_shards=V`): each host reads its files only.

On a tfds-built fake ImageNet of 32 training JPEGs in 8 files (4 records each),
with V = 4 virtual shards of 2 files: hosts are input pipelines of
`tf.distribute.InputContext` (what `distribute_datasets_from_function` gives each
worker), H = 1, 2 or 4 of them. The global batch of every step, the union of the
hosts' per-replica batches in host then replica order, must be the one-pipeline
batch of that step, at step 0, at step k and after resuming at step k; a host
must open only its own files, at most 1/H of the records plus one file.
"""

import collections
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from conftest import _add_to_tar, _jpeg

from lth_tf.data import imagenet
from lth_tf.keras import tf

SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361")  # Labels 0-3.
PER_CLASS = 8
NUM_FILES = 8
NUM_TRAIN = len(SYNSETS) * PER_CLASS  # 32
SHARDS = 4
BATCH = 8  # 2 records of each shard per step; 4 steps per epoch
SIZE = 16
SEED = 5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tfds preparation of a fake ImageNet whose training split is 8 files."""
    import tensorflow_datasets as tfds

    root = tmp_path_factory.mktemp("tfds_sharded")
    manual_dir = root / "downloads" / "manual"
    manual_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as outer:
        for synset in SYNSETS:
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i in range(PER_CLASS):
                    height, width = rng.integers(20, 40, size=2)
                    _add_to_tar(inner, f"{synset}_{i}.JPEG", _jpeg(rng, height, width))
            _add_to_tar(outer, f"{synset}.tar", inner_bytes.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as tar:
        for i in range(1, NUM_FILES + 1):  # tfds needs an example per file
            _add_to_tar(tar, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng, 24, 30))
    builder = tfds.builder("imagenet2012", data_dir=os.fspath(root))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, num_shards=NUM_FILES)
    )
    return os.fspath(root)


@pytest.fixture(scope="module")
def data(data_dir):
    return imagenet.ImageNetData(data_dir, image_size=SIZE, input_shards=SHARDS)


def _context(hosts, host, replicas):
    return tf.distribute.InputContext(
        num_input_pipelines=hosts, input_pipeline_id=host, num_replicas_in_sync=replicas
    )


def _take(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


@pytest.fixture(scope="module")
def reference(data):
    """The one-pipeline batches of steps 0-9 (two and a half epochs)."""
    return _take(data.train(BATCH, SEED), 10)


def test_the_fake_imagenet_has_the_layout_the_tests_assume(data):
    assert data.steps_per_epoch(BATCH) == NUM_TRAIN // BATCH == 4
    shards = imagenet.virtual_shards(
        imagenet.require_prepared("imagenet2012", data.data_dir), "train", SHARDS
    )
    assert [[n for _, n in files] for files in shards] == [[4, 4]] * SHARDS


def test_an_epoch_is_every_record_once_and_epochs_differ(data, reference, monkeypatch):
    # Images replaced by a hash of their JPEG bytes (the id of the record read) and
    # by their augmentation seed.
    def record_id(image_bytes, seed, image_size, dtype):
        bucket = tf.cast(tf.strings.to_hash_bucket_fast(image_bytes, 1 << 20), dtype)
        return tf.reshape(
            tf.stack([bucket, tf.cast(seed[0], dtype), tf.cast(seed[1], dtype)]), [1, 1, 3]
        )

    monkeypatch.setattr(imagenet, "decode_and_random_crop", record_id)
    steps = [x[:, 0, 0] for x, _ in _take(data.train(BATCH, SEED), 8)]
    ids = [x[:, 0] for x in steps]
    first, second = np.concatenate(ids[:4]), np.concatenate(ids[4:])
    assert len(set(first)) == NUM_TRAIN  # 4 steps of 8 distinct records: the split
    assert set(first) == set(second) and list(first) != list(second)  # reshuffled
    # Position p of step s is augmented with the seed of global index s * B + p, as
    # in the unsharded pipeline: every example of the run gets its own.
    key = tf.constant([SEED, imagenet._EXAMPLE_STREAM], tf.int64)
    for s, x in enumerate(steps):
        for p in range(BATCH):
            seed = tf.random.experimental.stateless_fold_in(
                key, tf.constant(s * BATCH + p, tf.int64)
            )
            np.testing.assert_array_equal(x[p, 1:], tf.cast(seed, tf.float32).numpy())
    assert not np.array_equal(reference[0][0], reference[4][0])


@pytest.mark.parametrize("hosts,replicas", [(1, 1), (2, 2), (4, 4), (2, 4)])
@pytest.mark.parametrize("start", [0, 3, 6])
def test_global_batches_do_not_depend_on_the_number_of_hosts(
    data, reference, hosts, replicas, start
):
    steps = 3  # from 3: crosses an epoch boundary; from 6: resumed inside epoch 1
    local = replicas // hosts
    shares = [
        _take(data.train(BATCH, SEED, start, _context(hosts, h, replicas)), steps * local)
        for h in range(hosts)
    ]
    for s in range(steps):
        # Host order, then each host's replicas in turn: the global batch.
        parts = [shares[h][s * local + r] for h in range(hosts) for r in range(local)]
        assert all(len(y) == BATCH // replicas for _, y in parts)
        x, y = reference[start + s]
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)


def test_another_data_seed_gives_another_order(data, reference):
    other = _take(data.train(BATCH, SEED + 1), 1)
    assert not np.array_equal(other[0][0], reference[0][0])


@pytest.fixture
def reads(monkeypatch):
    """Counts the records read from each training file by the pipelines built after it."""
    counts = collections.Counter()
    read_file = imagenet.record_file_dataset

    def count(path, record):
        counts[path.decode()] += 1
        return record

    def counting(path):
        return read_file(path).map(
            lambda record: tf.numpy_function(count, [path, record], tf.string, stateful=True)
        )

    monkeypatch.setattr(imagenet, "record_file_dataset", counting)
    return counts


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_each_host_reads_only_its_own_files(data, reads, hosts):
    builder = imagenet.require_prepared("imagenet2012", data.data_dir)
    files = [os.fspath(p) for p in builder.info.splits["train"].filepaths]
    lengths = builder.info.splits["train"].shard_lengths
    epochs = 2
    opened = []
    for h in range(hosts):
        reads.clear()
        ds = data.train(BATCH, SEED, 0, _context(hosts, h, hosts))
        assert len(_take(ds, epochs * data.steps_per_epoch(BATCH))) == 8
        opened.append(set(reads))
        # Its files: 1/H of the records, plus at most one file when H does not
        # divide the number of files (here it does).
        mine = files[h * NUM_FILES // hosts : (h + 1) * NUM_FILES // hosts]
        assert opened[h] == set(mine)
        assert sum(lengths[files.index(f)] for f in mine) <= NUM_TRAIN / hosts + max(lengths)
        # Each epoch reads the host's files once; reading ahead may start the next.
        share = NUM_TRAIN // hosts
        assert epochs * share <= sum(reads.values()) <= (epochs + 1) * share
    # Together the hosts read every file, each file on one host only.
    assert sorted(f for o in opened for f in o) == sorted(files)


def test_resuming_skips_records_without_reading_other_files(data, reads):
    # Resumed at step 6 (epoch 1, step 2) on host 1 of 2: only host 1's files are
    # read, and the skipped records of epoch 1 are read, not decoded.
    _take(data.train(BATCH, SEED, 6, _context(2, 1, 2)), 1)
    builder = imagenet.require_prepared("imagenet2012", data.data_dir)
    files = [os.fspath(p) for p in builder.info.splits["train"].filepaths]
    assert set(reads) <= set(files[4:])


@pytest.mark.parametrize("hosts,replicas,batch", [(2, 2, 4), (4, 4, 4), (2, 4, 4), (4, 4, 16)])
def test_each_host_evaluates_its_own_files_in_the_same_number_of_batches(
    data, reads, hosts, replicas, batch
):
    from lth_tf.data import base

    whole = sorted(x.tobytes() for b, _ in _take(data.eval("validation", batch), 100) for x in b)
    assert len(whole) == NUM_FILES  # 8 validation images, one per file
    builder = imagenet.require_prepared("imagenet2012", data.data_dir)
    files = [os.fspath(p) for p in builder.info.splits["validation"].filepaths]
    batches = base.eval_steps(NUM_FILES, batch, replicas) * (replicas // hosts)
    seen = []
    for h in range(hosts):
        reads.clear()
        share = _take(data.eval("validation", batch, _context(hosts, h, replicas)), 100)
        # As many batches on every host as base.eval_share gives (Keras runs that many
        # steps on every worker); none empty, as each host has enough examples.
        assert len(share) == batches and all(len(y) for _, y in share)
        mine = files[h * NUM_FILES // hosts : (h + 1) * NUM_FILES // hosts]
        assert set(reads) == set(mine) and sum(reads.values()) == len(mine)
        seen += [x.tobytes() for b, _ in share for x in b]
    assert sorted(seen) == whole  # the split, once


def test_evaluation_falls_back_to_reading_every_record_when_files_are_too_few(data, reads):
    # 16 hosts, 8 validation files: base.eval_share's shares, read through tfds
    # (every host reads every record, none through record_file_dataset).
    share = _take(data.eval("validation", 16, _context(16, 3, 16)), 100)
    assert not reads
    assert sum(len(y) for _, y in share) <= 1


@pytest.mark.parametrize(
    "shards,hosts,match",
    [
        (3, 1, "--batch_size=8 is not divisible by --input_shards=3"),
        (4, 3, "cannot be split evenly over 3 hosts"),
        (16, 1, "has 8 files and every virtual shard needs at least one"),
    ],
)
def test_shardings_that_cannot_work_are_refused(data_dir, shards, hosts, match):
    with pytest.raises(ValueError, match=match):
        data = imagenet.ImageNetData(data_dir, image_size=SIZE, input_shards=shards)
        data.train(BATCH if hosts == 1 else 12, SEED, 0, _context(hosts, 0, hosts))


def test_a_sliced_split_is_refused(data_dir):
    with pytest.raises(ValueError, match="needs a whole split"):
        imagenet.imagenet_dataset(
            data_dir, "train[:50%]", batch_size=8, training=True, seed=0, input_shards=4
        )


def test_the_number_of_shards_is_part_of_a_run_and_only_for_imagenet(data_dir):
    from lth_tf import config, data

    resnet50 = config.make_config("resnet50")
    sharded = config.make_config("resnet50", input_shards=SHARDS)
    assert "input_shards" not in resnet50.identity()  # existing run names unchanged
    assert sharded.identity()["input_shards"] == SHARDS
    assert sharded.hash8() != resnet50.hash8()
    with pytest.raises(ValueError, match="input_shards: got 4; expected 0, or with --dataset"):
        config.make_config("resnet20", input_shards=4)
    with pytest.raises(ValueError, match=r"dataset: 'imagenet2012', batch size: 1024\)"):
        config.make_config("resnet50", input_shards=48)
    with pytest.raises(ValueError, match="only imagenet2012 is read in shards"):
        data.load("mnist", input_shards=2)
    loaded = data.load("imagenet2012", data_dir=data_dir, input_shards=SHARDS)
    assert loaded.input_shards == SHARDS and loaded.steps_per_epoch(BATCH) == 4


# One worker of a 2-worker MultiWorkerMirroredStrategy on 127.0.0.1: the per-replica
# batches its pipeline feeds (through train.train_data, as training does) at steps
# 0-2 and resumed at step 6, and the files its pipeline opened; then the validation
# loss and accuracy of a tiny model through train.evaluate, per worker and on one
# device, and the validation files each worker opened.
WORKER = textwrap.dedent(
    """
    import json, sys
    from lth_tf import distribute, train
    from lth_tf.data import imagenet
    from lth_tf.keras import keras, tf
    opened = set()
    read_file = imagenet.record_file_dataset

    def counting(path):
        def note(p, record):
            opened.add(p.decode())
            return record

        return read_file(path).map(
            lambda r: tf.numpy_function(note, [path, r], tf.string, stateful=True)
        )

    imagenet.record_file_dataset = counting
    strategy = distribute.get_strategy("multi_worker")
    data = imagenet.ImageNetData(sys.argv[1], image_size=int(sys.argv[2]), input_shards=4)

    class _Model:
        distribute_strategy = strategy

    def batches(start, steps):
        it = iter(train.train_data(_Model, data, 8, int(sys.argv[3]), start))
        out = []
        for _ in range(steps):
            x, y = next(it)
            out.append([(a.numpy().tolist(), b.numpy().tolist()) for a, b in zip(
                strategy.experimental_local_results(x), strategy.experimental_local_results(y))])
        return out

    result = {"start": batches(0, 3), "resumed": batches(6, 2)}
    result["opened"] = sorted(opened)
    # Evaluation, each worker on its own validation files, reduced by Keras, and on
    # one device.
    opened.clear()
    keras.utils.set_random_seed(0)

    def compiled(model):
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        return model

    with strategy.scope():
        inputs = keras.Input((int(sys.argv[2]), int(sys.argv[2]), 3))
        outputs = keras.layers.Dense(1000)(keras.layers.Flatten()(inputs))
        model = compiled(keras.Model(inputs, outputs))
    result["distributed"] = train.evaluate(model, data, "validation", 4)
    result["eval_opened"] = sorted(opened)
    plain = keras.models.clone_model(model)
    plain.set_weights(model.get_weights())
    result["one_device"] = train.evaluate(compiled(plain), data, "validation", 4)
    print(json.dumps(result))
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_loopback_workers_read_their_files_and_train_on_the_global_batches(
    data_dir, reference, tmp_path
):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), data_dir, str(SIZE), str(SEED)],
            env={
                **env,
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": i}}
                ),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    workers = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    files = [
        os.fspath(p)
        for p in imagenet.require_prepared("imagenet2012", data_dir).info.splits["train"].filepaths
    ]
    assert [w["opened"] for w in workers] == [files[:4], files[4:]]
    validation = [
        os.fspath(p)
        for p in imagenet.require_prepared("imagenet2012", data_dir)
        .info.splits["validation"]
        .filepaths
    ]
    assert [w["eval_opened"] for w in workers] == [validation[:4], validation[4:]]
    for w in workers:
        for key in ("loss", "accuracy"):
            assert w["distributed"][key] == pytest.approx(w["one_device"][key], rel=1e-5)
    for key, first in (("start", 0), ("resumed", 6)):
        for s, step in enumerate(zip(*(w[key] for w in workers), strict=True)):
            # Worker 0's replica, then worker 1's: the one-pipeline batch of the step.
            x, y = reference[first + s]
            np.testing.assert_array_equal(np.concatenate([r[0][0] for r in step]), x)
            np.testing.assert_array_equal(np.concatenate([r[0][1] for r in step]), y)
