"""Every closed set of lth_tf is defined once, as one registry, and every other module reads it.

Read from the source with `ast`, as tests/test_import_graph.py reads the module
graph: a second literal spelling of a set (a copy that may drift from the
registry) fails here, wherever it is. The registries: the controls and
subnetworks (lth_tf.subnetworks), the branch kinds (lth_tf.branch_kinds), the
pruning criteria (lth_tf.criteria).
"""

import ast
import pathlib

from lth_tf import branch_kinds, criteria, subnetworks

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lth_tf"

# Each registry by its definition: the one place its names are spelled.
REGISTRIES = {
    "lth_tf.subnetworks.CONTROLS": set(subnetworks.CONTROL_NAMES),
    "lth_tf.subnetworks.SUBNETWORKS": set(subnetworks.SUBNETWORKS),
    "lth_tf.branch_kinds.KINDS": set(branch_kinds.NAMES),
    "lth_tf.criteria.CRITERIA": set(criteria.CRITERIA),
}


def _module_constants():
    """[(module, name, value node)] of every module-level assignment in lth_tf."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            for target in targets:
                if isinstance(target, ast.Name):
                    out.append((module, target.id, value))
    return out


def _strings(node) -> set | None:
    """The strings of a literal tuple/list/set/frozenset(...)/dict's keys, else None."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
        "frozenset",
        "set",
        "tuple",
    ):
        node = node.args[0] if node.args else None
    if isinstance(node, ast.Dict):
        elements = node.keys
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        elements = node.elts
    else:
        return None
    strings = {
        e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)
    }
    return strings or None


def test_the_parser_sees_literal_sets():
    # Guards the reading: with no sets found every test below would pass.
    found = {(m, n): _strings(v) for m, n, v in _module_constants()}
    assert found[("lth_tf.config", "PRUNE_SCOPES")] == {"global", "layerwise"}
    assert found[("lth_tf.masks", "LAYER_KINDS")] is None  # names, not strings
    assert _strings(ast.parse('frozenset({"a", "b"})').body[0].value) == {"a", "b"}


def test_no_registry_is_spelled_out_anywhere():
    copies = []
    for module, name, value in _module_constants():
        strings = _strings(value) or set()
        for registry, names in REGISTRIES.items():
            if len(strings & names) >= 2 and f"{module}.{name}" != registry:
                copies.append(f"{module}.{name} spells {sorted(strings & names)} of {registry}")
    assert not copies, "read the registry instead of copying it: " + "; ".join(copies)


def test_no_two_literal_sets_are_the_same_set():
    seen, copies = {}, []
    for module, name, value in _module_constants():
        strings = _strings(value)
        if strings and len(strings) >= 2:
            key = frozenset(strings)
            if key in seen:
                copies.append(f"{module}.{name} = {seen[key]}")
            seen.setdefault(key, f"{module}.{name}")
    assert not copies, copies


def test_imp_and_kinds_are_each_defined_once():
    # IMP, the name of the IMP series: one string literal; others alias lth_tf.subnetworks.IMP.
    imp = [
        f"{m}.{n}"
        for m, n, v in _module_constants()
        if isinstance(v, ast.Constant) and v.value == "imp"
    ]
    assert imp == ["lth_tf.subnetworks.IMP"], imp
    # One KINDS in lth_tf (the branch kinds); layer kinds and TFLite kinds have their own names.
    kinds = [m for m, n, v in _module_constants() if n == "KINDS"]
    assert kinds == ["lth_tf.branch_kinds"], kinds


def test_the_registries_agree_with_what_reads_them():
    from lth_tf import config

    assert (subnetworks.IMP, *subnetworks.CONTROLS) == subnetworks.SUBNETWORKS
    for name, control in subnetworks.CONTROLS.items():
        assert control.name == name
        config.make_config("lenet_300_100", controls=(name,))  # a valid --controls
    for name, kind in branch_kinds.KINDS.items():
        assert kind.name == name and kind.masks in (branch_kinds.ITERATIVE, branch_kinds.ONESHOT)
        assert kind.params <= set(branch_kinds.PARAMETERS)
        assert kind.rewind_step in (branch_kinds.OTHER_K, branch_kinds.OPTIONAL, branch_kinds.NONE)
    for name in criteria.CRITERIA:
        assert config.make_config("lenet_300_100", prune_criterion=name).prune_criterion == name
