"""Step-for-step cross-check of lth_tf against open_lth, the authors' PyTorch framework.

    pip install torch      # optional, for this script only: never a dependency of lth_tf
    python benchmarks/cross_check_open_lth.py --open_lth=/path/to/open_lth

open_lth (github.com/facebookresearch/open_lth) is not part of lth_tf: pass the
directory holding its source; its modules are imported from there. Not run in CI.
open_lth dates from 2020; three shims let its code import and run unchanged on
today's torch and numpy, none of them in the code paths compared: torchvision
(imported by its dataset modules only) may be absent, its DistributedDataParallel
subclass is built over a plain Module, and np.product is np.prod.

LeNet-300-100 on the bundled MNIST. Both frameworks get identical float32 batches:
lth_tf's training pipeline (data seed 0, batch 128, images normalised with its
channel statistics), turned into arrays once and fed to both.

  sgd               open_lth's LeNet (its model class and initialiser: Kaiming-normal
                    kernels, PyTorch's default biases) is copied into lth_tf's
                    build_model('lenet_300_100') (kernels transposed); both train 200
                    steps of plain SGD at lr 0.1 (open_lth's LeNet recipe) and record
                    W_k at k = 50.
  sgd_float64       the same in float64 (lth_tf's output layer stays float32).
  momentum          the same start, 200 steps of SGD with momentum 0.9 at a constant
                    lr 0.01.
  momentum_lr_drop  the same with the rate multiplied by 0.1 at step 100, where the two
                    momentum forms part.
  prune             20% global magnitude pruning of the sgd phase's final weights,
                    output layer dense: open_lth's sparse_global Strategy.prune against
                    lth_tf.masks.prune (global scope, output_rate 0), also told
                    open_lth's count.
  rewind            both rewound to their W_k under one mask (the one both rules give
                    at open_lth's count), trained from step k to 200 again with plain
                    SGD; rewind_own_masks: each side under its own mask.

Along every run: max |dw| at a few steps, and the ReLUs (example, unit) that are on
in one framework and off in the other at each step: where rounding differences
stop being rounding differences. In each phase a control steps open_lth's model in
torch with lth_tf's update arithmetic (v = -g * lr + v * m; w += v), which
separates the update's form from the forward and backward passes' rounding.

open_lth's side runs its own code: models.registry.get (mnist_lenet_300_100),
training.train.train (its loop, its optimizer from training/optimizers.get_optimizer
and its LambdaLR schedule) fed by a loader of the shared batches, PrunedModel and
sparse_global.Strategy.prune. lth_tf's side: models.build_model, sparsity.wrap,
set_masks and set_weights, train.compile_model (MaskedSGD), train_on_batch,
train.reset_optimizer, masks.prune, train.evaluate.

Writes benchmarks/results/cross_check_open_lth.json: per-layer max |dw| after each
phase (and along the way), the ReLU disagreements, the first step's gradient
difference, mask agreement, both test accuracies, the controls, and findings in
words with their figures. Takes a few minutes on two cores.
"""

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from common import write  # noqa: E402

from lth_tf import config as config_lib  # noqa: E402
from lth_tf import data as data_lib  # noqa: E402
from lth_tf import masks as masks_lib  # noqa: E402
from lth_tf import models, sparsity, train  # noqa: E402
from lth_tf.keras import keras, tf, tfmot  # noqa: E402

BATCH = 128
STEPS = 200
K = 50  # the rewind step
SGD_LR = 0.1  # open_lth's LeNet recipe: plain SGD at 0.1, batch 128
MOMENTUM = 0.9
MOMENTUM_LR = 0.01  # the same effective step, lr / (1 - momentum), as plain SGD at 0.1
DROP_AT = 100  # the lr-drop phase's milestone
GAMMA = 0.1
PRUNE_FRACTION = 0.2
# The steps after which both sides' weights are compared along the way.
TRAJECTORY = (1, 10, 50, 100, 150, 200)
# lth_tf layer name -> open_lth module name.
LAYERS = (("fc1", "fc_layers.0"), ("fc2", "fc_layers.1"), ("output", "fc"))
HIDDEN = ("fc1", "fc2")
# open_lth files whose code runs here (their hashes go into the results).
OPEN_LTH_FILES = (
    "models/mnist_lenet.py",
    "models/initializers.py",
    "training/train.py",
    "training/optimizers.py",
    "pruning/sparse_global.py",
    "pruning/pruned_model.py",
)


class Seen(dict):
    """{step: weights} along a run (at TRAJECTORY steps), and per step of the run:
    `relu`, which ReLUs the step's batch turns on; `flat`, lth_tf's weights as one
    vector (kept for lth_tf's runs only); `dw`, max |dw| against lth_tf's run."""

    def __init__(self, *args):
        super().__init__(*args)
        self.relu, self.flat, self.dw = {}, {}, {}

    def see(self, step, weights, x=None, against=None):
        if step in TRAJECTORY:
            self[step] = weights
        if x is not None:
            self.relu[step] = relu_on(weights, x)
        if against is None:
            self.flat[step] = flat(weights)
        elif step in against.flat:
            self.dw[step] = float(np.max(np.abs(flat(weights) - against.flat[step])))


def flat(weights: dict) -> np.ndarray:
    return np.concatenate([weights[k].ravel() for k in sorted(weights)])


def relu_on(weights: dict, x: np.ndarray) -> np.ndarray:
    """Whether each hidden unit's pre-activation is > 0, for each example of batch `x`."""
    h1 = x.reshape(len(x), -1) @ weights["fc1/kernel"] + weights["fc1/bias"]
    h2 = np.maximum(h1, 0) @ weights["fc2/kernel"] + weights["fc2/bias"]
    return np.concatenate([(h1 > 0).ravel(), (h2 > 0).ravel()])


def relu_disagreements(a: Seen, b: Seen) -> dict:
    """(example, unit) pairs of each step's batch whose ReLU is on in one run, off in the other.

    With b.dw (b's max |dw| against a at every step): the largest difference up to
    the first step with a disagreement, whose update is the first to differ by more
    than rounding.
    """
    by_step = {s: int(np.sum(a.relu[s] != b.relu[s])) for s in sorted(set(a.relu) & set(b.relu))}
    hits = {s: n for s, n in by_step.items() if n}
    first = min(hits) if hits else None
    row = {
        "first_step": first,
        "steps_with_any": len(hits),
        "by_step": {str(s): n for s, n in hits.items()},
    }
    if b.dw:
        last = first if first is not None else max(b.dw)
        row["max_abs_dw_up_to_first_step"] = max(d for s, d in b.dw.items() if s <= last)
    return row


# ---- open_lth ------------------------------------------------------------------------------


class _Absent(types.ModuleType):
    """A module whose every attribute is an empty class or another such module."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {}) if name[:1].isupper() else _Absent(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


def _torchvision_or_stand_in() -> str:
    """open_lth's dataset modules import torchvision when they are imported.

    This check uses none of them (it feeds lth_tf's arrays), so when torchvision
    is missing or does not load (a wheel built for another torch), an empty
    stand-in takes its place for the import. Returns which one is used.
    """
    try:
        import torchvision

        return f"torchvision {torchvision.__version__}"
    except Exception:  # ImportError, or RuntimeError from a build for CUDA torch
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    sys.modules["torchvision"] = _Absent("torchvision")
    return "stand-in (open_lth's dataset modules are imported, never used)"


def load_open_lth(path: str) -> types.SimpleNamespace:
    """Imports open_lth's modules from the source directory `path`."""
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "pruning", "sparse_global.py")):
        raise SystemExit(
            f"--open_lth={path} is not open_lth's source directory (no pruning/sparse_global.py)."
        )
    clashes = [
        m for m in ("models", "training", "pruning", "foundations", "datasets") if m in sys.modules
    ]
    if clashes:
        raise SystemExit(f"Modules {clashes} are already imported; open_lth needs these names.")
    torchvision = _torchvision_or_stand_in()
    sys.path.insert(0, path)
    import torch

    # open_lth's models/base.py subclasses (Model, DistributedDataParallel); Model's
    # bases are (ABC, Module) and DistributedDataParallel's have been (Module, Joinable),
    # Joinable an ABC, since torch 1.10, so the class cannot be built on a newer torch.
    # Nothing here distributes: for the import, DistributedDataParallel is a Module.
    real_ddp = torch.nn.parallel.DistributedDataParallel
    torch.nn.parallel.DistributedDataParallel = type(
        "DistributedDataParallel", (torch.nn.Module,), {}
    )
    try:
        import models.registry as registry
        import platforms.local
        import platforms.platform
        from foundations import hparams
        from foundations.step import Step
        from pruning import sparse_global
        from pruning.pruned_model import PrunedModel
        from training import train as open_train
    finally:
        torch.nn.parallel.DistributedDataParallel = real_ddp

    platforms.platform._PLATFORM = platforms.local.Platform()
    # open_lth's lr schedule multiplies its factors with np.product, which numpy 2
    # removed; np.prod is the same function under its current name.
    if not hasattr(np, "product"):
        np.product = np.prod
    hashes = {}
    for name in OPEN_LTH_FILES:
        with open(os.path.join(path, name), "rb") as f:
            hashes[name] = hashlib.sha256(f.read()).hexdigest()
    return types.SimpleNamespace(
        registry=registry,
        hparams=hparams,
        Step=Step,
        sparse_global=sparse_global,
        PrunedModel=PrunedModel,
        train=open_train,
        torchvision=torchvision,
        file_sha256=hashes,
    )


class Batches:
    """open_lth's DataLoader interface over fixed batches: epoch 0 is these, in order.

    open_lth's loop skips the first batches itself when it starts at step k, as
    with its own loader, so the rewind phase gets batches k.. from this too.
    """

    def __init__(self, batches, iterations_per_epoch: int):
        import torch

        self._batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
        self.iterations_per_epoch = iterations_per_epoch

    def shuffle(self, seed):
        pass  # the order is lth_tf's, fixed

    def __iter__(self):
        return iter(self._batches)


def torch_weights(model) -> dict:
    """{lth_tf key: array} of an open_lth LeNet (or PrunedModel, masks applied)."""
    if hasattr(model, "_apply_mask"):
        # open_lth multiplies the weights by the mask before each forward pass; its
        # optimizer moves pruned weights in between, so read them as a forward would.
        model._apply_mask()
        model = model.model
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    out = {}
    for ours, theirs in LAYERS:
        out[f"{ours}/kernel"] = state[f"{theirs}.weight"].T.copy()
        out[f"{ours}/bias"] = state[f"{theirs}.bias"].copy()
    return out


def load_torch_weights(model, weights: dict) -> None:
    import torch

    state = {}
    for ours, theirs in LAYERS:
        state[f"{theirs}.weight"] = torch.from_numpy(weights[f"{ours}/kernel"].T.copy())
        state[f"{theirs}.bias"] = torch.from_numpy(weights[f"{ours}/bias"].copy())
    model.load_state_dict(state)


def open_lth_model(ol, weights: dict, double: bool = False):
    model = ol.registry.get(
        ol.hparams.ModelHparams("mnist_lenet_300_100", "kaiming_normal", "uniform")
    )
    if double:
        model = model.double()
    load_torch_weights(model, weights)
    return model


def open_lth_train(
    ol, model, batches, lr, momentum, start=0, milestone=None, spy=None, against=None
):
    """Trains `model` with open_lth's loop from step `start` to STEPS; returns {step: weights}.

    `spy(step, model, optimizer)` runs before each step too (open_lth's callbacks
    run before the step they are called at).
    """
    spe = len(batches) + 1  # one epoch holds every step: no reshuffle mid-run
    training_hparams = ol.hparams.TrainingHparams(
        optimizer_name="sgd",
        lr=lr,
        training_steps=f"{STEPS}it",
        momentum=momentum,
        milestone_steps=f"{milestone}it" if milestone else None,
        gamma=GAMMA if milestone else None,
    )
    seen = Seen()

    def record(output_location, step, model, optimizer, logger):
        s = step.iteration
        seen.see(s, torch_weights(model), batches[s][0] if s < STEPS else None, against)
        if spy is not None:
            spy(step.iteration, model, optimizer)

    with tempfile.TemporaryDirectory() as location:
        ol.train.train(
            training_hparams,
            model,
            Batches(batches, spe),
            location,
            callbacks=[record],
            start_step=ol.Step(start, spe),
            end_step=ol.Step(STEPS, spe),
        )
    # The loop ends before calling back at the end.
    seen.see(STEPS, torch_weights(model), against=against)
    return seen


def torch_accuracy(model, x, y) -> tuple[float, np.ndarray]:
    import torch

    model.eval()
    with torch.no_grad():
        predictions = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float(np.mean(predictions == y)), predictions


def same_arithmetic(model, batches, lr_at, momentum, start=0, against=None):
    """open_lth's model stepped with lth_tf's update arithmetic, from `start` to STEPS.

    lth_tf's MaskedSGD (Keras' form): v = -g * lr + v * m; w += v, each product and
    sum rounded to float32 on its own. torch.optim.SGD keeps b = m * b + g and does
    w -= lr * b with a fused multiply-add (one rounding). Returns {step: weights}.
    """
    import torch

    velocity = {p: torch.zeros_like(p) for p in model.parameters()}
    seen = Seen()
    model.train()
    for step in range(start, STEPS):
        x, y = batches[step]
        seen.see(step, torch_weights(model), x, against)
        model.zero_grad()
        loss = model.loss_criterion(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                velocity[p] = -p.grad * lr_at(step) + velocity[p] * momentum
                p.add_(velocity[p])
    seen.see(STEPS, torch_weights(model), against=against)
    return seen


def control_row(lth_seen, torch_seen, control_seen) -> dict:
    """lth_tf against open_lth's model under lth_tf's update arithmetic, and that against open_lth."""
    vs_lth = max_abs_diff(lth_seen[STEPS], control_seen[STEPS])
    vs_open = max_abs_diff(control_seen[STEPS], torch_seen[STEPS])
    print(
        f"{'':>18}  same update arithmetic: max |dw| vs lth_tf {max(vs_lth.values()):.3g}, "
        f"vs open_lth's optimizer {max(vs_open.values()):.3g}"
    )
    return {
        "what": "open_lth's model and loss stepped in torch with lth_tf's update arithmetic "
        "(v = -g * lr + v * m; w += v) on the same batches",
        "max_abs_dw_vs_lth_tf": vs_lth,
        "max_abs_dw_vs_lth_tf_all_layers": max(vs_lth.values()),
        "max_abs_dw_vs_lth_tf_along_the_way": {
            str(s): max(max_abs_diff(lth_seen[s], control_seen[s]).values())
            for s in sorted(set(lth_seen) & set(control_seen))
        },
        "relu_disagreements_vs_lth_tf": relu_disagreements(lth_seen, control_seen),
        "max_abs_dw_vs_open_lth": vs_open,
        "relu_disagreements_vs_open_lth": relu_disagreements(control_seen, torch_seen),
        "max_abs_dw_vs_open_lth_all_layers": max(vs_open.values()),
    }


# ---- lth_tf ----------------------------------------------------------------------------------


def lth_config(lr: float, momentum: float, drops=()):
    return config_lib.make_config(
        "lenet_300_100",
        optimizer="sgd",
        lr=lr,
        momentum=momentum,
        batch_size=BATCH,
        weight_decay=0.0,
        warmup="0",
        lr_drops=tuple(f"{d}it" for d in drops),
        lr_gamma=GAMMA,
        training_steps=f"{STEPS}it",
        eval_every=f"{K}it",
        rewind_step=f"{K}it",
        prune_fraction=PRUNE_FRACTION,
        prune_scope="global",
        output_rate=0.0,
        steps_per_execution=1,
    )


def lth_model(config, data, weights: dict):
    """lth_tf's LeNet, wrapped as a run wraps it, compiled with the config's optimizer."""
    base = models.build_model("lenet_300_100", data.input_shape, data.num_classes, seed=0)
    model = sparsity.wrap(base, output_rate=config.output_rate)
    schedule = train.resolve(config, data.steps_per_epoch(config.batch_size))
    train.compile_model(model, config, schedule, steps_per_execution=1)
    sparsity.set_weights(model, weights)
    return model


def lth_train(model, batches, start=0) -> dict:
    """train_on_batch over batches start..STEPS-1; returns {step: weights}."""
    seen = Seen()
    for step in range(start, STEPS):
        x, y = batches[step]
        seen.see(step, sparsity.get_weights(model), x)
        model.train_on_batch(x, y)
    seen.see(STEPS, sparsity.get_weights(model))
    return seen


# ---- comparisons -----------------------------------------------------------------------------


def max_abs_diff(a: dict, b: dict) -> dict:
    return {key: float(np.max(np.abs(a[key] - b[key]))) for key in sorted(a)}


def max_abs(weights: dict) -> dict:
    return {key: float(np.max(np.abs(w))) for key, w in sorted(weights.items())}


def compare_phase(name, lth_seen, torch_seen, lth_acc, torch_acc, lth_pred, torch_pred) -> dict:
    final = max_abs_diff(lth_seen[STEPS], torch_seen[STEPS])
    row = {
        "max_abs_dw": final,
        "max_abs_dw_all_layers": max(final.values()),
        "max_abs_w": max_abs(torch_seen[STEPS]),
        "max_abs_dw_along_the_way": {
            str(s): max(max_abs_diff(lth_seen[s], torch_seen[s]).values())
            for s in sorted(set(lth_seen) & set(torch_seen))
        },
        "relu_disagreements": relu_disagreements(lth_seen, torch_seen),
        "test_accuracy": {"lth_tf": lth_acc, "open_lth": torch_acc},
        "test_predictions_differing": int(np.sum(lth_pred != torch_pred)),
    }
    print(
        f"{name:>18}: max |dw| {row['max_abs_dw_all_layers']:.3g} "
        f"({', '.join(f'{k} {v:.2g}' for k, v in final.items())}); "
        f"test accuracy lth_tf {lth_acc:.4f}, open_lth {torch_acc:.4f}"
    )
    return row


def to_lth_masks(open_mask) -> dict:
    """open_lth's Mask over the hidden layers, as lth_tf's {layer: (in, out) array}."""
    return {
        ours: open_mask[f"{theirs}.weight"].numpy().T.astype(np.float32)
        for ours, theirs in LAYERS
        if ours in HIDDEN
    }


def mask_agreement(a: dict, b: dict, weights_a: dict, weights_b: dict) -> dict:
    """Differing entries of two masks, and how far each lies from the thresholds.

    An entry one side keeps and the other prunes is a (near) tie when its magnitude
    on each side is within the two sides' weight difference of that side's
    threshold (the smallest magnitude it keeps).
    """
    differ = {n: np.flatnonzero(a[n].ravel() != b[n].ravel()) for n in a}
    row = {
        "differing_entries": int(sum(d.size for d in differ.values())),
        "differing_by_layer": {n: int(d.size) for n, d in differ.items()},
    }
    if row["differing_entries"]:
        gaps = []
        for n, idx in differ.items():
            for weights, mask in ((weights_a, a), (weights_b, b)):
                magnitude = np.abs(weights[f"{n}/kernel"].ravel())
                kept = magnitude[mask[n].ravel() > 0]
                if idx.size:
                    gaps.append(float(np.max(np.abs(magnitude[idx] - kept.min()))))
        tolerance = max(
            float(np.max(np.abs(weights_a[f"{n}/kernel"] - weights_b[f"{n}/kernel"]))) for n in a
        )
        row["max_distance_to_threshold"] = max(gaps)
        row["max_abs_dw_of_the_kernels"] = tolerance
        row["all_near_ties"] = bool(max(gaps) <= tolerance)
    return row


def ties_at_threshold(weights: dict, mask: dict) -> int:
    """Surviving hidden weights whose magnitude equals the smallest survivor's."""
    kept = np.concatenate([np.abs(weights[f"{n}/kernel"])[mask[n] > 0] for n in HIDDEN])
    return int(np.sum(kept == kept.min()))


# ---- the run ---------------------------------------------------------------------------------


def first_step_gradients(ol, lth, torch_model, batch) -> dict:
    """Loss and per-layer gradients of both frameworks on the first batch at W_0."""
    import torch

    x, y = batch
    variables = sparsity.model_weights(lth)
    with tf.GradientTape() as tape:
        logits = lth(x, training=True)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    grads = dict(zip(variables, tape.gradient(loss, list(variables.values())), strict=True))
    torch_model.zero_grad()
    torch_loss = torch_model.loss_criterion(torch_model(torch.from_numpy(x)), torch.from_numpy(y))
    torch_loss.backward()
    torch_grads = {}
    modules = dict(torch_model.named_parameters())
    for ours, theirs in LAYERS:
        torch_grads[f"{ours}/kernel"] = modules[f"{theirs}.weight"].grad.numpy().T
        torch_grads[f"{ours}/bias"] = modules[f"{theirs}.bias"].grad.numpy()
    torch_model.zero_grad()
    lth_grads = {k: g.numpy() for k, g in grads.items()}
    return {
        "loss": {"lth_tf": float(loss), "open_lth": float(torch_loss.detach())},
        "max_abs_dgrad": max_abs_diff(lth_grads, torch_grads),
        "max_abs_grad": max_abs(torch_grads),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--open_lth", required=True, help="open_lth's source directory")
    parser.add_argument(
        "--open_lth_commit", default=None, help="the open_lth commit checked out (recorded only)"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    ol = load_open_lth(args.open_lth)

    data = data_lib.load("mnist")
    stream = data.train(BATCH, 0, start_step=0).take(STEPS)
    batches = [(x.numpy(), y.numpy().astype(np.int64)) for x, y in stream]
    # lth_tf's pipeline from step k gives the same batches the run from 0 gives at k.
    rewound = [x.numpy() for x, _ in data.train(BATCH, 0, start_step=K).take(STEPS - K)]
    assert all(np.array_equal(a, b[0]) for a, b in zip(rewound, batches[K:], strict=True))
    tests = [(x.numpy(), y.numpy()) for x, y in data.eval("test", 500)]
    x_test = np.concatenate([x for x, _ in tests])
    y_test = np.concatenate([y for _, y in tests])

    # W_0: open_lth's initialisation, copied into lth_tf.
    torch.manual_seed(0)
    w0 = torch_weights(
        ol.registry.get(ol.hparams.ModelHparams("mnist_lenet_300_100", "kaiming_normal", "uniform"))
    )

    def run(config, lr, momentum, milestone=None, spy=None):
        lth = lth_model(config, data, w0)
        assert max(max_abs_diff(sparsity.get_weights(lth), w0).values()) == 0.0
        torch_model = open_lth_model(ol, w0)
        lth_seen = lth_train(lth, batches)
        torch_seen = open_lth_train(
            ol, torch_model, batches, lr, momentum, milestone=milestone, spy=spy, against=lth_seen
        )
        return lth, torch_model, lth_seen, torch_seen

    def accuracies(lth, torch_model, dtype=np.float32):
        lth_acc = train.evaluate(lth, data, "test", 500)["accuracy"]
        lth_pred = np.argmax(lth.predict(x_test, batch_size=500, verbose=0), axis=1)
        torch_acc, torch_pred = torch_accuracy(torch_model, x_test.astype(dtype), y_test)
        return lth_acc, torch_acc, lth_pred, torch_pred

    result = {
        "protocol": {
            "model": "LeNet-300-100 (open_lth mnist_lenet_300_100; lth_tf lenet_300_100)",
            "data": "bundled MNIST, lth_tf's pipeline (data seed 0), the same float32 arrays "
            "fed to both; test accuracy on the 10,000 test images",
            "initial_weights": "open_lth's initialiser (torch seed 0), copied into lth_tf",
            "batch_size": BATCH,
            "steps": STEPS,
            "rewind_step": K,
            "phases": {
                "sgd": f"plain SGD, lr {SGD_LR}",
                "sgd_float64": "the sgd phase with weights and batches in float64 on both "
                "sides (lth_tf's output layer stays float32: its builder fixes the logits' "
                "dtype)",
                "momentum": f"SGD momentum {MOMENTUM}, constant lr {MOMENTUM_LR}",
                "momentum_lr_drop": f"SGD momentum {MOMENTUM}, lr {MOMENTUM_LR} x{GAMMA} "
                f"at step {DROP_AT}",
                "prune": f"{PRUNE_FRACTION:.0%} global magnitude pruning of the sgd phase's "
                "final weights, output layer dense",
                "rewind": f"rewind to W_{K} under the masks, plain SGD lr {SGD_LR} from step "
                f"{K} to {STEPS}",
            },
            "torch_threads": torch.get_num_threads(),
        },
    }
    phases = {}

    # Phase 1: plain SGD, recording W_k.
    config = lth_config(SGD_LR, 0.0)
    lth = lth_model(config, data, w0)
    torch_model = open_lth_model(ol, w0)
    result["first_step"] = first_step_gradients(ol, lth, torch_model, batches[0])
    lth_seen = lth_train(lth, batches)
    torch_seen = open_lth_train(ol, torch_model, batches, SGD_LR, 0.0, against=lth_seen)
    phases["sgd"] = compare_phase("sgd", lth_seen, torch_seen, *accuracies(lth, torch_model))
    phases["sgd"]["rewind_point_max_abs_dw"] = max_abs_diff(lth_seen[K], torch_seen[K])
    control = same_arithmetic(
        open_lth_model(ol, w0), batches, lambda s: SGD_LR, 0.0, against=lth_seen
    )
    phases["sgd"]["same_update_arithmetic"] = control_row(lth_seen, torch_seen, control)
    sgd_lth, sgd_torch, lth_wk, torch_wk = lth, torch_model, lth_seen[K], torch_seen[K]

    # The sgd phase again in float64: rounding 2^29 times finer.
    keras.backend.set_floatx("float64")
    try:
        w0_64 = {k: v.astype(np.float64) for k, v in w0.items()}
        batches_64 = [(x.astype(np.float64), y) for x, y in batches]
        lth = lth_model(config, data, w0_64)
    finally:
        keras.backend.set_floatx("float32")
    torch_model = open_lth_model(ol, w0_64, double=True)
    lth_seen = lth_train(lth, batches_64)
    torch_seen = open_lth_train(ol, torch_model, batches_64, SGD_LR, 0.0, against=lth_seen)
    phases["sgd_float64"] = compare_phase(
        "sgd_float64", lth_seen, torch_seen, *accuracies(lth, torch_model, np.float64)
    )
    phases["sgd_float64"]["dtypes"] = {
        "lth_tf": {v.name: v.dtype.name for v in lth.trainable_variables},
        "open_lth": sorted({str(p.dtype) for p in torch_model.parameters()}),
    }

    # Phase 2: momentum at a constant rate.
    lth, torch_model, lth_seen, torch_seen = run(
        lth_config(MOMENTUM_LR, MOMENTUM), MOMENTUM_LR, MOMENTUM
    )
    phases["momentum"] = compare_phase(
        "momentum", lth_seen, torch_seen, *accuracies(lth, torch_model)
    )
    control = same_arithmetic(
        open_lth_model(ol, w0), batches, lambda s: MOMENTUM_LR, MOMENTUM, against=lth_seen
    )
    phases["momentum"]["same_update_arithmetic"] = control_row(lth_seen, torch_seen, control)

    # Phase 3: momentum with an lr drop; open_lth's momentum buffer at the drop.
    buffers = {}

    def spy(step, model, optimizer):
        if step == DROP_AT:
            names = {id(p): n for n, p in model.named_parameters()}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    buffers[names[id(p)]] = optimizer.state[p]["momentum_buffer"].numpy().copy()

    lth, torch_model, lth_seen, torch_seen = run(
        lth_config(MOMENTUM_LR, MOMENTUM, drops=(DROP_AT,)),
        MOMENTUM_LR,
        MOMENTUM,
        milestone=DROP_AT,
        spy=spy,
    )
    drop = compare_phase("momentum_lr_drop", lth_seen, torch_seen, *accuracies(lth, torch_model))
    # First order (the same gradients on both sides): at the drop Keras' velocity holds
    # -lr_old * b where PyTorch's next steps use -lr_new * b; the gap decays by m per
    # step, so lth_tf - open_lth = -(lr_old - lr_new) * b * sum_{j=1}^{n} m^j.
    n = STEPS - DROP_AT
    factor = (MOMENTUM_LR - MOMENTUM_LR * GAMMA) * MOMENTUM * (1 - MOMENTUM**n) / (1 - MOMENTUM)
    predicted = {}
    for ours, theirs in LAYERS:
        predicted[f"{ours}/kernel"] = -factor * buffers[f"{theirs}.weight"].T
        predicted[f"{ours}/bias"] = -factor * buffers[f"{theirs}.bias"]
    measured = {k: lth_seen[STEPS][k] - torch_seen[STEPS][k] for k in predicted}
    flat_p = np.concatenate([predicted[k].ravel() for k in sorted(predicted)])
    flat_m = np.concatenate([measured[k].ravel() for k in sorted(measured)])
    drop["form_gap_first_order"] = {
        "what": "lth_tf - open_lth predicted from open_lth's momentum buffer b at the drop: "
        f"-(lr_old - lr_new) * b * sum_(j=1..{n}) m^j",
        "predicted_max_abs_dw": {k: float(np.max(np.abs(v))) for k, v in sorted(predicted.items())},
        "cosine_predicted_measured": float(
            flat_p @ flat_m / (np.linalg.norm(flat_p) * np.linalg.norm(flat_m))
        ),
        "norm_ratio_measured_to_predicted": float(np.linalg.norm(flat_m) / np.linalg.norm(flat_p)),
    }
    control = same_arithmetic(
        open_lth_model(ol, w0),
        batches,
        lambda s: MOMENTUM_LR * (GAMMA if s >= DROP_AT else 1.0),
        MOMENTUM,
        against=lth_seen,
    )
    drop["same_update_arithmetic"] = control_row(lth_seen, torch_seen, control)
    phases["momentum_lr_drop"] = drop

    # Pruning: the sgd phase's final weights.
    lth_final, torch_final = sparsity.get_weights(sgd_lth), torch_weights(sgd_torch)
    pruning_hparams = ol.sparse_global.PruningHparams(
        pruning_strategy="sparse_global",
        pruning_fraction=PRUNE_FRACTION,
        pruning_layers_to_ignore="fc.weight",
    )
    open_mask_raw = ol.sparse_global.Strategy.prune(pruning_hparams, sgd_torch)
    assert bool(open_mask_raw["fc.weight"].all()), "open_lth pruned the output layer"
    open_mask = to_lth_masks(open_mask_raw)
    rates = sparsity.layer_rates(sgd_lth, config)
    assert rates == {"fc1": 1.0, "fc2": 1.0}, rates
    dense = masks_lib.ones_like({n: lth_final[f"{n}/kernel"] for n in HIDDEN})
    pool = int(sum(m.size for m in dense.values()))
    open_removed = pool - int(sum(m.sum() for m in open_mask.values()))
    same_weights = {n: torch_final[f"{n}/kernel"] for n in HIDDEN}
    own_weights = {n: lth_final[f"{n}/kernel"] for n in HIDDEN}
    lth_rule = masks_lib.prune(same_weights, dense, PRUNE_FRACTION, "global", rates)
    lth_removed = pool - int(sum(m.sum() for m in lth_rule.values()))
    # lth_tf's ranking told to remove open_lth's count.
    matched = open_removed / pool
    assert int(np.round(matched * pool)) == open_removed
    lth_matched_same = masks_lib.prune(same_weights, dense, matched, "global", rates)
    lth_matched_own = masks_lib.prune(own_weights, dense, matched, "global", rates)
    output_weights = int(open_mask_raw["fc.weight"].numel())
    subset = all(np.all(open_mask[n] <= lth_rule[n]) for n in HIDDEN)
    result["prune"] = {
        "prunable_hidden_weights": pool,
        "output_layer_weights_kept_dense": output_weights,
        "removed": {"open_lth": open_removed, "lth_tf": lth_removed},
        "count_rules": {
            "open_lth": "ceil(fraction * every prunable tensor's surviving entries, the "
            "ignored output layer's included) + 1: the threshold is the sorted magnitude "
            "at that index and only magnitudes above it survive",
            "lth_tf": "round(fraction * surviving entries of the pruned layers); ties at "
            "the threshold dropped in order until exactly that many are gone",
            "open_lth_expected": int(np.ceil(PRUNE_FRACTION * (pool + output_weights))) + 1,
            "lth_tf_expected": int(np.round(PRUNE_FRACTION * pool)),
        },
        "each_rule_same_weights": {
            "what": "open_lth's trained weights pruned by open_lth's and lth_tf's rules",
            **mask_agreement(open_mask, lth_rule, torch_final, torch_final),
            "open_lth_mask_within_lth_tf_mask": bool(subset),
        },
        "same_count_same_weights": {
            "what": "lth_tf's rule told to remove open_lth's count, on open_lth's weights",
            **mask_agreement(open_mask, lth_matched_same, torch_final, torch_final),
        },
        "same_count_own_weights": {
            "what": "each side's rule on its own trained weights (the sgd phase's), lth_tf "
            "at open_lth's count",
            **mask_agreement(open_mask, lth_matched_own, torch_final, lth_final),
        },
        "ties_at_threshold": {
            "open_lth": ties_at_threshold(torch_final, open_mask),
            "lth_tf": ties_at_threshold(lth_final, lth_matched_own),
        },
    }
    print(
        f"{'prune':>18}: removed open_lth {open_removed}, lth_tf {lth_removed}; at the same count "
        f"on the same weights the masks differ in "
        f"{result['prune']['same_count_same_weights']['differing_entries']} entries, on each "
        f"side's own weights in {result['prune']['same_count_own_weights']['differing_entries']}"
    )

    # Rewind to W_k and train k..STEPS again: under one mask (the one both rules give
    # open_lth's weights at open_lth's count), then under each side's own mask.
    def rewind(lth_masks, label):
        sparsity.set_masks(sgd_lth, lth_masks)
        start = dict(lth_wk)
        for n in HIDDEN:
            start[f"{n}/kernel"] = (lth_wk[f"{n}/kernel"] * lth_masks[n]).astype(np.float32)
        sparsity.set_weights(sgd_lth, start)
        train.reset_optimizer(sgd_lth, K)
        assert train.global_step(sgd_lth) == K
        lth_seen = lth_train(sgd_lth, batches, start=K)
        pruned = ol.PrunedModel(open_lth_model(ol, torch_wk), open_mask_raw)
        torch_seen = open_lth_train(ol, pruned, batches, SGD_LR, 0.0, start=K, against=lth_seen)
        row = compare_phase(label, lth_seen, torch_seen, *accuracies(sgd_lth, pruned))
        row["density_of_hidden_layers"] = float(masks_lib.density(lth_masks))
        shared = ol.PrunedModel(open_lth_model(ol, torch_wk), open_mask_raw)
        control = same_arithmetic(shared, batches, lambda s: SGD_LR, 0.0, start=K, against=lth_seen)
        row["same_update_arithmetic"] = control_row(lth_seen, torch_seen, control)
        return row

    phases["rewind"] = rewind(lth_matched_same, "rewind")
    phases["rewind"]["masks"] = "one mask on both sides"
    phases["rewind_own_masks"] = rewind(lth_matched_own, "rewind_own_masks")
    phases["rewind_own_masks"]["masks"] = "each side its own (same_count_own_weights)"
    result["phases"] = phases

    sgd, mom, drop, rew, f64 = (
        phases[n] for n in ("sgd", "momentum", "momentum_lr_drop", "rewind", "sgd_float64")
    )
    prune = result["prune"]
    result["criteria"] = {
        "sgd_max_abs_dw_at_step_200_at_most_1e-4": sgd["max_abs_dw_all_layers"] <= 1e-4,
        "sgd_max_abs_dw_up_to_the_first_relu_disagreement_at_most_1e-4": (
            sgd["relu_disagreements"]["max_abs_dw_up_to_first_step"] <= 1e-4
        ),
        "sgd_float64_max_abs_dw_at_step_200_at_most_1e-4": f64["max_abs_dw_all_layers"] <= 1e-4,
        "masks_identical_at_the_same_count_same_weights": (
            prune["same_count_same_weights"]["differing_entries"] == 0
        ),
        "masks_at_the_same_count_own_weights_differ_only_in_near_ties": prune[
            "same_count_own_weights"
        ].get("all_near_ties", True),
    }

    def first(row):
        r = row["relu_disagreements"]
        return f"step {r['first_step']} (max |dw| up to it {r['max_abs_dw_up_to_first_step']:.2g})"

    result["findings"] = [
        f"First step: losses {result['first_step']['loss']['lth_tf']:.7f} (lth_tf) and "
        f"{result['first_step']['loss']['open_lth']:.7f} (open_lth); gradients differ by at most "
        f"{max(result['first_step']['max_abs_dgrad'].values()):.2g}: float32 summation order.",
        f"Plain SGD: max |dw| {sgd['max_abs_dw_all_layers']:.2g} after {STEPS} steps; the two "
        f"agree to rounding until the first ReLU whose pre-activation falls on different sides "
        f"of zero in the two frameworks, {first(sgd)}; each such kink turns a rounding "
        "difference into a finite gradient difference. open_lth's model stepped with lth_tf's "
        "update arithmetic meets the same kinks at the same steps against lth_tf and none "
        "against open_lth (max |dw| "
        f"{sgd['same_update_arithmetic']['max_abs_dw_vs_open_lth_all_layers']:.2g}): the "
        "forward and backward passes' rounding, not the update, causes the gap. In float64 "
        f"(the output layer float32 in lth_tf) {f64['relu_disagreements']['steps_with_any']} "
        f"steps have a ReLU disagreement and max |dw| is {f64['max_abs_dw_all_layers']:.2g} "
        f"after {STEPS} steps.",
        f"Momentum at a constant rate: max |dw| {mom['max_abs_dw_all_layers']:.2g}; first ReLU "
        f"disagreement {first(mom)}. The two momentum forms are the same steps: PyTorch's form "
        "against Keras' form in one framework differs by "
        f"{mom['same_update_arithmetic']['max_abs_dw_vs_open_lth_all_layers']:.2g}.",
        f"Momentum with the rate x{GAMMA} at step {DROP_AT}: max |dw| "
        f"{drop['max_abs_dw_all_layers']:.2g}, ReLU disagreements from step "
        f"{drop['relu_disagreements']['first_step']}, right after the drop: Keras' velocity "
        "carries the old rate's steps, PyTorch's buffer is rescaled at once. lth_tf against "
        "open_lth's model stepped in Keras' form: "
        f"{drop['same_update_arithmetic']['max_abs_dw_vs_lth_tf_all_layers']:.2g}; the "
        "first-order prediction from open_lth's buffer at the drop points the same way "
        f"(cosine {drop['form_gap_first_order']['cosine_predicted_measured']:.2f}).",
        f"Pruning 20% with the output layer dense: open_lth removes {prune['removed']['open_lth']}"
        f" of {prune['prunable_hidden_weights']} hidden weights, lth_tf "
        f"{prune['removed']['lth_tf']} (open_lth's count includes the output layer's "
        f"{prune['output_layer_weights_kept_dense']} weights, plus one at the threshold); told "
        "open_lth's count, lth_tf's rule gives open_lth's mask exactly "
        f"({prune['same_count_same_weights']['differing_entries']} differing entries); on each "
        f"side's own weights the masks differ in {prune['same_count_own_weights']['differing_entries']}"
        " entries, all within the weights' difference of the threshold.",
        f"Rewind to W_{K} (max |dw| {max(sgd['rewind_point_max_abs_dw'].values()):.2g}) under one "
        f"mask, train to {STEPS}: max |dw| {rew['max_abs_dw_all_layers']:.2g}, first ReLU "
        f"disagreement {first(rew)}; test accuracy lth_tf "
        f"{rew['test_accuracy']['lth_tf']:.4f}, open_lth {rew['test_accuracy']['open_lth']:.4f}.",
    ]
    for line in result["findings"]:
        print("-", line)
    result["versions"] = {
        "torch": torch.__version__,
        "torchvision": ol.torchvision,
        "tf_keras": keras.__version__,
        "tfmot": tfmot.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "open_lth_commit": args.open_lth_commit,
        "open_lth_file_sha256": ol.file_sha256,
    }
    write("cross_check_open_lth", result)


if __name__ == "__main__":
    main()
