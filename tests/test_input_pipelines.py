"""Contracts of the per-worker input pipelines (`train(..., input_context=...)`).

Each input pipeline reads only its share of every global batch; together the
pipelines read exactly the one-device batch of each step, so the data a run
sees does not depend on how many workers or replicas it has. Labels here are
example ids (label = index of the training example), so what a pipeline read
can be checked example by example.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lth_tf import train
from lth_tf.data import arrays, base
from lth_tf.keras import tf

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
NUM_TRAIN = 60
BATCH = 8  # 7 steps per epoch, 4 examples dropped


def id_arrays(num_train=NUM_TRAIN, num_val=7, shape=(6, 6, 3)):
    """Random images whose label is the example's index in its split."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(num_train + num_val, *shape), dtype=np.uint8)
    return arrays.Arrays(
        x[:num_train],
        np.arange(num_train, dtype=np.int64),
        x[num_train:],
        np.arange(num_val, dtype=np.int64),
        x[num_train:],
        np.arange(num_val, dtype=np.int64),
        num_classes=num_train,
    )


def _context(pipelines, pipeline, replicas):
    return tf.distribute.InputContext(
        num_input_pipelines=pipelines, input_pipeline_id=pipeline, num_replicas_in_sync=replicas
    )


def _take(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def test_one_device_batches_are_unchanged():
    # The digest of these batches before per-pipeline input existed: the default
    # path must stay bit-identical (same masks and accuracies for the same seeds).
    a = arrays.synthetic_arrays((8, 8, 3), 4, num_train=100, num_test=20, seed=1)
    h = hashlib.sha256()
    for augment in (False, True):
        d = arrays.ArrayData("synthetic", a, augment=augment)
        for start in (0, 7):
            for x, y in d.train(16, 3, start_step=start).take(6):
                h.update(x.numpy().tobytes())
                h.update(y.numpy().tobytes())
        for x, y in d.eval("validation", 4):
            h.update(x.numpy().tobytes())
            h.update(y.numpy().tobytes())
    assert h.hexdigest() == "1904dc8359caf7a1771ada7169e76f331930c7b4ae5ee4f229c60074296e0c48"


@pytest.mark.parametrize("pipelines,replicas", [(2, 2), (2, 4), (1, 2), (4, 4)])
@pytest.mark.parametrize("start_step", [0, 5])
def test_pipeline_shares_make_up_the_global_batch(pipelines, replicas, start_step):
    data = arrays.ArrayData("ids", id_arrays(), augment=True)
    steps = 9  # crosses an epoch boundary (7 steps per epoch)
    full = _take(data.train(BATCH, 3, start_step=start_step), steps)
    per_replica = BATCH // replicas
    local = replicas // pipelines
    shares = []
    for i in range(pipelines):
        batches = _take(
            data.train(BATCH, 3, start_step, _context(pipelines, i, replicas)), steps * local
        )
        assert all(len(y) == per_replica for _, y in batches)
        shares.append(batches)
    for s, (x, y) in enumerate(full):
        # Pipeline order, then each pipeline's replicas in turn: the global batch.
        parts = [shares[i][s * local + j] for i in range(pipelines) for j in range(local)]
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
        # The same augmentation too: an image's crop and flip do not depend on P or N.
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)


def test_one_epoch_is_split_disjointly_between_two_pipelines():
    data = arrays.ArrayData("ids", id_arrays())
    spe = data.steps_per_epoch(BATCH)
    seen = [
        np.concatenate([y for _, y in _take(data.train(BATCH, 1, 0, _context(2, i, 2)), spe)])
        for i in (0, 1)
    ]
    epoch = np.concatenate([y for _, y in _take(data.train(BATCH, 1), spe)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == sorted(epoch)
    assert len(epoch) == len(set(epoch)) == spe * BATCH


@pytest.mark.parametrize(
    "pipelines,replicas,batch", [(2, 2, 4), (2, 4, 4), (2, 2, 500), (3, 3, 4), (1, 2, 3)]
)
def test_eval_shares_cover_the_split_once_in_the_same_number_of_steps(pipelines, replicas, batch):
    data = arrays.ArrayData("ids", id_arrays())
    steps = base.eval_steps(7, batch, replicas)
    seen, sizes = [], []
    for i in range(pipelines):
        context = _context(pipelines, i, replicas)
        batches = [y.numpy() for _, y in data.eval("validation", batch, context)]
        # Every worker runs the same steps, one batch per replica each; only when the
        # last step has fewer examples than replicas can a pipeline have no share of
        # it (TF's partial-batch handling then feeds its replicas empty batches).
        g = -(-batch // replicas) * replicas
        last = 7 - (steps - 1) * g
        has_last = (i + 1) * last // pipelines > i * last // pipelines
        assert len(batches) == (steps - 1 + has_last) * (replicas // pipelines)
        seen.append(np.concatenate(batches))
        sizes.append([len(b) for b in batches])
    assert sorted(np.concatenate(seen)) == list(range(7))  # the split, once
    assert not set(seen[0]) & set(seen[-1]) or pipelines == 1
    # Each step's examples are spread evenly over the replicas.
    for s in range(steps):
        step = [
            n
            for share in sizes
            for n in share[s * (replicas // pipelines) :][: replicas // pipelines]
        ]
        assert max(step) - min(step) <= 1


def test_a_batch_that_does_not_split_over_the_replicas_is_refused():
    data = arrays.ArrayData("ids", id_arrays())
    with pytest.raises(ValueError, match="--batch_size=10 is not divisible by the 4 replicas"):
        data.train(10, 0, 0, _context(2, 0, 4))

    class FourReplicas:
        num_replicas_in_sync = 4

    with pytest.raises(ValueError, match="--batch_size=10 is not divisible by the 4 replicas"):
        train.check_global_batch(10, FourReplicas())


def test_imagenet_pipeline_shares_make_up_the_global_batch(imagenet_dir):
    from lth_tf.data.imagenet import ImageNetData

    data = ImageNetData(imagenet_dir, image_size=16)
    batch, steps, start = 6, 5, 2  # 4 steps per epoch: crosses an epoch boundary
    full = _take(data.train(batch, 7, start_step=start), steps)
    shares = [_take(data.train(batch, 7, start, _context(2, i, 2)), steps) for i in (0, 1)]
    for s, (x, y) in enumerate(full):
        np.testing.assert_array_equal(np.concatenate([shares[0][s][1], shares[1][s][1]]), y)
        np.testing.assert_array_equal(np.concatenate([shares[0][s][0], shares[1][s][0]]), x)
    evals = [[len(y) for _, y in data.eval("validation", 4, _context(2, i, 2))] for i in (0, 1)]
    assert evals == [[2, 1], [2, 1]]  # 6 examples: steps of 4 and 2, spread evenly


# One worker of a 2-worker MultiWorkerMirroredStrategy run on 127.0.0.1: records
# the example ids its pipeline feeds to its replica, then evaluates a tiny model
# through train.evaluate (per-pipeline shares, Keras' reduction) and on one device.
WORKER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[2])
    from test_input_pipelines import id_arrays, BATCH
    from lth_tf import distribute, train
    from lth_tf.data import arrays, base
    from lth_tf.keras import keras, tf
    strategy = distribute.get_strategy("multi_worker")
    data = arrays.ArrayData("ids", id_arrays(), augment=True)

    def ids(start, steps):
        ds = train.train_data(_Model, data, BATCH, 1, start)
        it = iter(ds)
        out = []
        for _ in range(steps):
            _, y = next(it)
            out.append([int(v) for r in strategy.experimental_local_results(y) for v in r.numpy()])
        return out

    class _Model:
        distribute_strategy = strategy

    spe = data.steps_per_epoch(BATCH)
    result = {"epoch": ids(0, spe), "resumed": ids(3, 2), "replicas": strategy.num_replicas_in_sync}
    keras.utils.set_random_seed(0)
    with strategy.scope():
        inputs = keras.Input((6, 6, 3))
        model = keras.Model(inputs, keras.layers.Dense(60)(keras.layers.Flatten()(inputs)))
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    validation, validation_steps = train.eval_data(model, data, "validation", 4)
    history = model.fit(train.train_data(model, data, BATCH, 1, 0), steps_per_epoch=2, epochs=2,
                        validation_data=validation, validation_steps=validation_steps, verbose=0)
    result["val_loss"] = history.history["val_loss"]
    result["distributed"] = train.evaluate(model, data, "train", 16)
    plain = keras.models.clone_model(model)
    plain.set_weights(model.get_weights())
    plain.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    result["one_device"] = train.evaluate(plain, data, "train", 16)
    print(json.dumps(result))
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_read_disjoint_shares_whose_union_is_the_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cluster = {"worker": [f"127.0.0.1:{_free_port()}" for _ in range(2)]}
    procs = []
    for index in (0, 1):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = {**ENV, "TF_CONFIG": json.dumps(tf_config), "CUDA_VISIBLE_DEVICES": ""}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(index), os.path.dirname(__file__)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    workers = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [w["replicas"] for w in workers] == [2, 2]

    data = arrays.ArrayData("ids", id_arrays(), augment=True)
    spe = data.steps_per_epoch(BATCH)
    single = [list(y) for _, y in _take(data.train(BATCH, 1), spe + 2)]
    a, b = ([i for step in w["epoch"] for i in step] for w in workers)
    assert not set(a) & set(b)  # disjoint
    assert sorted(a + b) == sorted(i for step in single[:spe] for i in step)  # the epoch
    for s in range(spe):  # each step: the union is the one-device batch of that step
        assert sorted(workers[0]["epoch"][s] + workers[1]["epoch"][s]) == sorted(single[s])
    for s in range(2):  # resumed at step 3: the batches of steps 3 and 4
        assert sorted(workers[0]["resumed"][s] + workers[1]["resumed"][s]) == sorted(single[3 + s])
    # Evaluation per pipeline, reduced by Keras, equals evaluation on one device.
    for w in workers:
        for key in ("loss", "accuracy"):
            assert w["distributed"][key] == pytest.approx(w["one_device"][key], rel=1e-5)
