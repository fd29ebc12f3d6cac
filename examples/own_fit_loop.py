"""A lottery ticket found in your own `model.fit` loop, with lth_tf as a library.

No driver, no run directory: your model, your data, your `fit` calls. lth_tf
supplies the four pieces of iterative magnitude pruning with rewinding:

  sparsity.wrap           wraps the model's Dense/Conv2D layers: a pruned weight
                          stays exactly 0 through every optimizer step;
  callbacks.RecordWeights saves W_k, the weights after step k of the dense run;
  criteria + masks        score the trained weights (magnitude by default) and
                          prune a fraction of the survivors (masks.prune_scores);
  sparsity.set_masks / set_weights
                          the rewind: the new masks on W_k, then train again.

    python examples/own_fit_loop.py        (a few seconds on a CPU)

tests/test_examples.py runs `find_ticket` and checks what it promises.
"""

import numpy as np

from lth_tf import callbacks, criteria, masks, sparsity
from lth_tf.keras import keras, tf


def make_data(n=2048, dim=64, classes=4, seed=0):
    """A learnable toy task: labels from a fixed random linear map of the inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((dim, classes)), axis=1).astype(np.int32)
    return x, y


def build_model(dim=64, classes=4, seed=0):
    """Your own functional Keras model; its last layer is named "output"."""
    init = keras.initializers.GlorotNormal(seed=seed)
    inputs = keras.Input((dim,))
    h = keras.layers.Dense(128, activation="relu", kernel_initializer=init, name="fc1")(inputs)
    h = keras.layers.Dense(64, activation="relu", kernel_initializer=init, name="fc2")(h)
    outputs = keras.layers.Dense(classes, kernel_initializer=init, name="output")(h)
    return keras.Model(inputs, outputs)


def _compile(model, lr):
    # A fresh optimizer each round: every round trains like the first from its start.
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def find_ticket(
    x,
    y,
    *,
    rounds=3,
    fraction=0.2,
    rewind_step=20,
    epochs=4,
    batch_size=64,
    lr=0.05,
    criterion="magnitude",
    seed=0,
):
    """IMP with rewinding to step `rewind_step`, in plain `model.fit` calls.

    Returns:
      A list of one dict per round (0: dense): its masks, density, test accuracy,
      its start weights and its final weights; and W_k as recorded.
    """
    keras.utils.set_random_seed(seed)
    x_test, y_test = x[: len(x) // 4], y[: len(y) // 4]
    x_train, y_train = x[len(x) // 4 :], y[len(y) // 4 :]
    steps_per_epoch = len(x_train) // batch_size
    total = epochs * steps_per_epoch  # T
    # One fixed order of batches: a round rewound to k replays it from batch k.
    batches = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    batches = batches.batch(batch_size, drop_remainder=True).repeat()
    # 1. Wrap: the output layer stays dense (output_rate=0), as the authors' framework does.
    model = sparsity.wrap(build_model(x.shape[1], int(y.max()) + 1, seed), output_rate=0.0)
    current = masks.ones_like(
        {n: w.layer.kernel.numpy() for n, w in sparsity.wrappers(model).items()}
    )

    # 2. Round 0: train the dense network; the recorder saves W_k on the way.
    w_k = {}
    recorder = callbacks.RecordWeights(
        rewind_step, lambda step: w_k.update(sparsity.get_weights(model))
    )
    recorder.start_fit(0, steps_per_epoch)  # global step 0; `steps_per_epoch` steps per epoch
    _compile(model, lr)
    start = sparsity.get_weights(model)
    model.fit(
        batches, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=[recorder], verbose=0
    )
    history = [_round_result(model, current, start, x_test, y_test)]

    rewind = {n: w_k[f"{n}/kernel"] for n in current}
    for r in range(1, rounds + 1):
        # 3. Prune: score the trained kernels, remove `fraction` of the survivors.
        final = sparsity.get_weights(model)
        kernels = {n: final[f"{n}/kernel"] for n in current}
        scores = criteria.scores(criterion, kernels, rewind, current, seed=seed * 1000 + r)
        current = masks.prune_scores(scores, current, fraction, "global")
        # 4. Rewind: the new masks on W_k; train the rest of the schedule, k..T.
        sparsity.set_masks(model, current)
        sparsity.set_weights(model, w_k)
        start = sparsity.get_weights(model)
        _compile(model, lr)
        # The first k steps were the dense run's: a round rewound to k trains k..T.
        model.fit(
            batches.skip(rewind_step), epochs=1, steps_per_epoch=total - rewind_step, verbose=0
        )
        history.append(_round_result(model, current, start, x_test, y_test))
    return history, w_k


def _round_result(model, current, start, x_test, y_test) -> dict:
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return {
        "masks": {n: m.copy() for n, m in current.items()},
        "density": masks.density(current),
        "test_accuracy": float(accuracy),
        "start": start,
        "final": sparsity.get_weights(model),
    }


if __name__ == "__main__":
    x, y = make_data()
    history, _ = find_ticket(x, y)
    for r, h in enumerate(history):
        print(f"round {r}: density {h['density']:.3f}, test accuracy {h['test_accuracy']:.3f}")
