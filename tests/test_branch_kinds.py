"""Contracts of lth_tf.branch_kinds: each kind's record, its name and how its rounds start.

On a fake branch (the attributes a start reads), off TensorFlow;
tests/test_branches.py trains every kind for real.
"""

import types

import numpy as np

from lth_tf import branch_kinds
from lth_tf.branch_kinds import KINDS


def _branch(kind, **spec):
    w = {"rewound": 1}
    final = {"final": 2}
    return types.SimpleNamespace(
        spec=types.SimpleNamespace(kind=kind, **spec),
        experiment=types.SimpleNamespace(
            dense_weights_at=lambda k: {**w, "k": k},
            final_weights=lambda rdir: {**final, "rdir": rdir},
        ),
    )


def test_each_kind_names_its_branch_as_before():
    spec = types.SimpleNamespace
    assert KINDS["rewind"].label(spec(rewind_step=500)) == "rewind_500it"
    assert KINDS["lr_rewind"].label(spec(rewind_step=0)) == "lr_rewind_0it"
    finetune = spec(finetune_lr=1e-4, finetune_steps=200)
    assert KINDS["finetune"].label(finetune) == "finetune_lr0.0001_200it"
    oneshot = spec(rewind_step=20, reached=0.2, decimals=4)
    assert KINDS["oneshot"].label(oneshot) == "oneshot_20it_d20.0000"


def test_each_kind_starts_its_rounds_as_its_retraining_mode_says():
    m = {"fc1": np.ones(3)}
    start = KINDS["rewind"].start(_branch("rewind", rewind_step=5), m, "prev")
    assert (start.masks, start.weights, start.step) == (m, {"rewound": 1, "k": 5}, 5)
    start = KINDS["oneshot"].start(_branch("oneshot", rewind_step=0), m, "prev")
    assert (start.weights, start.step) == ({"rewound": 1, "k": 0}, 0)
    start = KINDS["lr_rewind"].start(_branch("lr_rewind", rewind_step=5), m, "prev")
    assert (start.weights, start.step) == ({"final": 2, "rdir": "prev"}, 5)
    start = KINDS["finetune"].start(_branch("finetune", rewind_step=0), m, "prev")
    assert (start.weights, start.step) == ({"final": 2, "rdir": "prev"}, 0)
    assert KINDS["finetune"].own_schedule
    assert not any(k.own_schedule for n, k in KINDS.items() if n != "finetune")


def test_parameters_and_rewind_step_per_kind():
    assert branch_kinds.taking("densities") == ["oneshot"]
    assert branch_kinds.taking("finetune_lr") == ["finetune"]
    assert branch_kinds.taking("rounds") == ["rewind", "lr_rewind", "finetune"]
    assert branch_kinds.taking("rewind_step") == ["rewind", "lr_rewind", "oneshot"]
    assert KINDS["rewind"].rewind_step == branch_kinds.OTHER_K
    assert [n for n, k in KINDS.items() if k.masks == branch_kinds.ONESHOT] == ["oneshot"]
