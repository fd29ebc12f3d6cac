"""The commands README.md and BUILD.md give run as written.

Every command of their ``` blocks (continuations joined, `#` comments dropped, split
at `&&`, `;`, `|`), the `python ...`, `pip install ...` and `lth-...` spans of their
prose, and the command a Python block's first comment names ("# mymodels.py, then:
lth-imp ...") is classified: an lth_tf entry point (`python -m lth_tf.X`, `lth-X`),
an install (pip, venv), a benchmark (`python benchmarks/X.py`), `python -c`, or
another tool (pytest, ruff, tensorboard, sh). A command of no known kind fails.

What "run as written" means here, the dry run of each kind:
- every lth_tf command: each flag it names is one of that entry point's own flags
  (a flag renamed or removed, or one only another entry point defines, fails); for
  the spans of prose and the export synopsis (`[--round=N] ...`), that is all;
- lth_tf.imp (blocks): parsed with exactly its flags (validators included) and its
  config resolved with --print_config, which prints the run directory and the
  config and reads no data and trains nothing; the cifar10 command also runs
  without --print_config on a data_dir where cifar10 is not prepared: it must stop
  at once with the `tfds build` command, writing no run directory;
- report, export (with --tflite too) and branch (lr_rewind, oneshot): executed on
  tiny finished runs (LeNet-300-100 on 8x8 random images, 40 steps a round);
- stability and branch with the docs' durations (500it, 2ep): parsed only (their
  durations exceed the tiny run's 40 steps, and a stability point trains 2 copies
  per k and repeat); the skip says so;
- the user modules the Python blocks write (mymodels.py, mydata.py,
  my_pkg/scores.py) are written as given and imported as the command naming them
  would (the working directory is on the path for `python -m` and PYTHONPATH=.,
  not for a console script); the model is built, the dataset loaded, the
  criterion called;
- benchmarks: the script exists and declares (argparse) every flag passed;
- pip installs: the extras exist in setup.py, every package named is one setup.py
  installs (or a TensorFlow build standing in for `tensorflow`), and the installed
  version of each satisfies the docs' range;
- pytest, ruff, tensorboard: setup.py installs them (install_requires or [test]);
- `python -c`: compiled; the CPU one executed, the TPU one (needs a TPU) skipped;
- every shell block passes `bash -n`.
Placeholders: RUN and runs/lenet_300_100_mnist_XXXXXXXX are the tiny 13-round
run, ..._replicates a tiny group of 2 replicates, runs/A and runs/B its replicates;
gs://... and gs://BUCKET, /data and /shared are directories of the sandbox (no
network); /path/to/images.npz a small npz; ~ is the sandbox's HOME;
$SLURM_ARRAY_TASK_ID is 1; `<...>` is a word.
"""

import ast
import contextlib
import dataclasses
import importlib
import io
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from importlib import metadata

import conftest
import numpy as np
import pytest
from absl import flags
from entry_points import ENTRY_POINTS, call
from packaging.requirements import Requirement

from lth_tf import data, flagdefs, plugins

FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ("README.md", "BUILD.md")
FENCE = re.compile(r"^( *)```(\S*)\s*$")
ANGLE_PLACEHOLDER = re.compile(r"<[^<>`\n]+>")  # <libtpu wheel index>, <group>
MODULE_HEADER = re.compile(r"^# ([\w/]+\.py)(?:, then: (.+))?$")
OPERATORS = {"&&", "||", ";", "|"}
ABSL_FLAGS = {"flagfile", "help", "helpshort", "helpfull", "helpxml", "undefok"}
OTHER_PROGRAMS = {"pytest", "ruff", "tensorboard", "sh"}
# Each command adds its own --rounds (the last value of a flag wins).
TINY = conftest.tiny_flags(controls="", checkpoint_seconds=0)


@dataclasses.dataclass(frozen=True)
class Command:
    where: str  # file:line
    argv: tuple
    env: tuple = ()  # leading VAR=value assignments
    inline: bool = False  # a span of prose: flag names are checked, nothing runs

    @property
    def kind(self) -> str:
        a = self.argv
        if a[0] in ("python", "python3") and a[1:2] == ("-m",):
            if a[2].startswith("lth_tf."):
                return "lth_tf"
            if a[2] == "venv":
                return "install"
        if a[0].startswith("lth-"):
            return "lth_tf"
        if a[0] == "pip" or a[0] == ".":
            return "install"
        if a[0] in ("python", "python3") and a[1].startswith("benchmarks/"):
            return "benchmark"
        if a[0] in ("python", "python3") and a[1] == "-c":
            return "python -c"
        if a[0] in OTHER_PROGRAMS:
            return "other"
        raise AssertionError(f"{self}: a command of no known kind; classify it in this test")

    @property
    def entry(self) -> str:
        """imp, report, ... of an lth_tf command."""
        if self.argv[0].startswith("python"):
            return self.argv[2].removeprefix("lth_tf.")
        return self.argv[0].removeprefix("lth-")

    @property
    def args(self) -> list:
        """The arguments after the program (and after `-m module`)."""
        return list(self.argv[3:] if self.argv[0].startswith("python") else self.argv[1:])

    def __str__(self):
        return f"{self.where}: {shlex.join(self.argv)}"


def blocks(name: str) -> list:
    """[(first line number, language, text)] of a doc's ``` blocks (indented ones too)."""
    lines = (ROOT / name).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent = len(m.group(1))
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        out.append((i + 2, m.group(2), "\n".join(x[indent:] for x in lines[i + 1 : end])))
        i = end + 1
    return out


def is_listing(text: str) -> bool:
    """A directory tree (README's "A run on disk"), not commands."""
    return text.splitlines()[0].rstrip().endswith("/")


def shell_blocks() -> list:
    out = []
    for name in DOCS:
        for line, lang, text in blocks(name):
            assert lang in ("", "python"), f"{name}:{line}: a ```{lang} block; classify it here"
            if lang == "" and not is_listing(text):
                out.append((f"{name}:{line}", text))
    return out


def split_commands(where: str, text: str, inline: bool = False) -> list:
    """The Commands of shell text: one per logical line and per &&, ;, ||, | part."""
    file, first = where.rsplit(":", 1)
    physical = ANGLE_PLACEHOLDER.sub("PLACEHOLDER", text).split("\n")
    out, i = [], 0
    while i < len(physical):
        start, line = i, physical[i]
        while line.endswith("\\") and i + 1 < len(physical):  # a continuation
            i += 1
            line = line[:-1] + " " + physical[i]
        i += 1
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        parts = [[]]
        for token in lexer:
            if token in OPERATORS:
                parts.append([])
            else:
                parts[-1].append(token)
        for part in parts:
            env = []
            while part and re.match(r"^[A-Z_]+=", part[0]):
                env.append(tuple(part.pop(0).split("=", 1)))
            if part:
                out.append(Command(f"{file}:{int(first) + start}", tuple(part), tuple(env), inline))
    return out


def python_modules() -> list:
    """[(where, path, source, command or None)] of the Python blocks that name their file."""
    out = []
    for name in DOCS:
        for line, lang, text in blocks(name):
            m = MODULE_HEADER.match(text.splitlines()[0]) if lang == "python" else None
            if m:
                out.append((f"{name}:{line}", m.group(1), text, m.group(2)))
    return out


def prose(name: str) -> str:
    """A doc's text with the lines of its ``` blocks (fences included) blank."""
    lines, inside = (ROOT / name).read_text().splitlines(), False
    out = []
    for line in lines:
        fence = bool(FENCE.match(line))
        out.append("" if inside or fence else line)
        inside = inside != fence
    return "\n".join(out)


def inline_commands() -> list:
    """Commands written in `spans` of the prose (outside every block)."""
    out = []
    for name in DOCS:
        text = prose(name)
        for m in re.finditer(r"`([^`]+)`", text):
            span = " ".join(m.group(1).split())
            if span.startswith("sh -c '"):  # a Kubernetes pod's command: the one inside
                span = shlex.split(span)[2]
            if re.match(r"^(python3? (-m \S|-c |benchmarks/)|pip install |lth-\w+ )", span):
                line = text[: m.start()].count("\n") + 1
                out += split_commands(f"{name}:{line}", span, inline=True)
    return out


def all_commands() -> list:
    out = [c for where, text in shell_blocks() for c in split_commands(where, text)]
    for where, _, _, command in python_modules():
        if command:
            out += split_commands(where, command)
    return out + inline_commands()


COMMANDS = all_commands()


def _select(kind, entry=None, inline=None) -> list:
    return [
        c
        for c in COMMANDS
        if c.kind == kind
        and (entry is None or c.entry == entry)
        and (inline is None or c.inline == inline)
    ]


def _ids(commands) -> list:
    return [str(c)[:110] for c in commands]


def test_the_docs_have_commands_of_every_kind():
    """The extraction finds what the docs hold (a broken extractor tests nothing)."""
    kinds = {}
    for c in COMMANDS:
        kinds.setdefault(c.kind, []).append(c)
    assert set(kinds) == {"lth_tf", "install", "benchmark", "python -c", "other"}
    entries = {c.entry for c in kinds["lth_tf"] if not c.inline}
    assert entries == set(ENTRY_POINTS), entries
    assert len(_select("lth_tf", "imp", inline=False)) >= 12
    assert len(kinds["benchmark"]) >= 8


# ---- shell syntax -------------------------------------------------------------------------


@pytest.mark.parametrize("where, text", shell_blocks(), ids=[w for w, _ in shell_blocks()])
def test_every_shell_block_is_valid_bash(where, text):
    """`<...>` placeholders are words here: the reader replaces them."""
    result = subprocess.run(
        ["bash", "-n"],
        input=ANGLE_PLACEHOLDER.sub("PLACEHOLDER", text),
        text=True,
        capture_output=True,
    )
    assert result.returncode == 0, f"{where}: {result.stderr}"


# ---- lth_tf entry points -------------------------------------------------------------------


@pytest.fixture(scope="module")
def defined():
    """Every entry point's flags defined; {entry point: the names it takes}."""
    for module in ENTRY_POINTS.values():
        module.define_flags()
    return {
        name: flagdefs.flag_names(getattr(flagdefs, f"define_{name}_flags")) | ABSL_FLAGS
        for name in ENTRY_POINTS
    }


def flag_names(command) -> list:
    out = []
    for token in command.args:
        token = token.strip("[]")
        if token.startswith("--"):
            out.append(token[2:].split("=", 1)[0])
    return out


LTH = _select("lth_tf")


@pytest.mark.parametrize("command", LTH, ids=_ids(LTH))
def test_every_flag_is_one_of_its_entry_points_own(command, defined):
    own = defined[command.entry]
    unknown = [
        n for n in flag_names(command) if n not in own and not (n[:2] == "no" and n[2:] in own)
    ]
    assert not unknown, f"{command}: {command.entry} has no flag {unknown}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, defined):
    """A working directory like the repository's root, and tiny finished runs.

    cwd/flags links to the repository's flags/; the Python blocks that name a file
    are written there; made/r is a finished 13-round run (RUN), made/g a group of
    2 one-round replicates.
    """
    base = tmp_path_factory.mktemp("docs")
    cwd = base / "cwd"
    cwd.mkdir()
    (cwd / "flags").symlink_to(ROOT / "flags")
    images = base / "images.npz"  # what mydata.py's /path/to/images.npz stands for
    rng = np.random.default_rng(0)
    np.savez(
        images,
        x_train=rng.integers(0, 256, (50, 32, 32, 3), np.uint8),
        y_train=np.arange(50) % 10,
        x_test=rng.integers(0, 256, (10, 32, 32, 3), np.uint8),
        y_test=np.arange(10),
    )
    for _, path, source, _ in python_modules():
        (cwd / path).parent.mkdir(parents=True, exist_ok=True)
        (cwd / path).write_text(source.replace("/path/to/images.npz", str(images)))
    (base / "home").mkdir()
    made = base / "made"
    code, err = call("imp", *TINY, "--rounds=13", f"--root_dir={made}", "--run_name=r")
    assert code == 0, err[-3000:]
    code, err = call(
        "imp", *TINY, "--rounds=1", "--replicates=2", f"--root_dir={made}", "--run_name=g"
    )
    assert code == 0, err[-3000:]
    return base


@pytest.fixture()
def shell(sandbox, monkeypatch):
    """The sandbox as the reader's shell: its cwd, HOME and variables."""
    monkeypatch.chdir(sandbox / "cwd")
    monkeypatch.setenv("HOME", str(sandbox / "home"))
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    return sandbox


def substitute(args: list, base: pathlib.Path) -> list:
    """The command's arguments with the placeholders of the docstring replaced."""
    runs = {
        "RUN": base / "made" / "r",
        "runs/lenet_300_100_mnist_XXXXXXXX": base / "made" / "r",
        "runs/lenet_300_100_mnist_XXXXXXXX_replicates": base / "made" / "g",
        "runs/A": base / "made" / "g" / "replicate_1",
        "runs/B": base / "made" / "g" / "replicate_2",
    }
    out = []
    for arg in args:
        name, eq, value = arg.partition("=")
        value = os.path.expandvars(value)
        if value in runs:
            value = str(runs[value])
        elif value.startswith("gs://"):
            value = str(base / "gcs" / value[len("gs://") :].replace("...", "tfds"))
        elif value.startswith(("/data/", "/shared/")):
            value = str(base / value.lstrip("/"))
        out.append(f"{name}{eq}{value}")
    return out


def configs_printed(out: str) -> list:
    """[(run directory, config dict)] of what --print_config printed."""
    found, decoder = [], json.JSONDecoder()
    for m in re.finditer(r"^Run directory: (.+)$", out, re.M):
        config, _ = decoder.raw_decode(out[m.end() :].lstrip())
        found.append((m.group(1), config))
    return found


IMP = _select("lth_tf", "imp", inline=False)


@pytest.mark.parametrize("command", IMP, ids=_ids(IMP))
def test_imp_command_resolves_its_config(command, shell):
    """Parsed with exactly its flags, then --print_config: no data read, nothing trained."""
    out = io.StringIO()
    code, err = call("imp", *substitute(command.args, shell), "--print_config", out=out)
    assert code == 0, f"{command}\n{err[-3000:]}"
    printed = configs_printed(out.getvalue())
    assert printed, out.getvalue()[-2000:]
    given = dict(a[2:].split("=", 1) for a in command.args if a.startswith("--") and "=" in a)
    for _, config in printed:
        for name in ("arch", "rounds", "prune_criterion"):
            if name in given:
                assert str(config[name]) == given[name], (command, name, config[name])
    for run_dir, _ in printed:
        assert not os.path.exists(run_dir), f"--print_config wrote {run_dir}"


def test_imp_on_cifar10_not_prepared_stops_with_the_tfds_build_command(shell):
    """The README's cifar10 command, as written, where cifar10 is not in --data_dir."""
    (command,) = [c for c in IMP if "--dataset=cifar10" in c.args and "--arch=resnet20" in c.args]
    code, err = call("imp", *substitute(command.args, shell))
    assert code == 2, err[-3000:]
    assert "is not prepared" in err and "tfds build cifar10 --data_dir=" in err, err
    assert "Traceback" not in err
    assert not list((shell / "cwd").glob("runs/resnet20_*")), "a refused run left a directory"


USER_SPECS = ("arch", "dataset", "prune_criterion")


def user_functions(command) -> list:
    """[(flag, package.module:function)] of a command's user functions."""
    out = []
    for arg in command.args:
        name, _, value = arg[2:].partition("=")
        if name in USER_SPECS and re.fullmatch(r"[\w.]+:\w+", value):
            out.append((name, value))
    return out


USER = [c for c in _select("lth_tf", "imp") if user_functions(c)]


@pytest.mark.parametrize("command", USER, ids=_ids(USER))
def test_the_user_functions_the_docs_write_import_and_work(command, shell, monkeypatch):
    """mymodels.py, mydata.py, my_pkg/scores.py as the docs write them, imported as the
    command would: from the working directory only where it is on the path (`python -m`
    puts it there, a console script does not; PYTHONPATH=. does)."""
    cwd = str(shell / "cwd")
    on_path = command.argv[0].startswith("python") or ("PYTHONPATH", ".") in command.env
    monkeypatch.setattr(sys, "path", [cwd] * on_path + [p for p in sys.path if p not in ("", cwd)])
    for name, spec in user_functions(command):
        top = spec.split(".")[0].split(":")[0]
        for module in [m for m in sys.modules if m == top or m.startswith(f"{top}.")]:
            monkeypatch.delitem(sys.modules, module)
        importlib.invalidate_caches()
        if name == "arch":
            model = plugins.import_function(spec, name)((32, 32, 3), 10, 0)
            assert model.output_shape == (None, 10)
        elif name == "dataset":
            dataset = data.load(spec)  # checks the Dataset protocol
            assert (dataset.input_shape, dataset.num_classes) == ((32, 32, 3), 10)
        else:
            w = {"fc": np.array([[1.0, -2.0]])}
            scores = plugins.import_function(spec, name)(w, w, {"fc": np.ones((1, 2))}, 0)
            assert scores["fc"].shape == (1, 2)


def _not_run(command) -> str | None:
    """Why a report/export/branch/stability command is parsed here but not executed."""
    if command.entry == "stability":
        return "stability trains 2 copies per k and repeat, and the docs' k exceed 40 steps"
    durations = ("--rewind_step=", "--finetune_steps=")
    if command.entry == "branch" and any(a.startswith(durations) for a in command.args):
        return "its durations (500it, 2ep) exceed the tiny run's 40 steps"
    return None


def is_synopsis(command) -> bool:
    """`--run_dir=RUN [--round=N] ...`: a command's form, not a command."""
    return any(a.startswith("[") for a in command.args)


OTHERS = [c for c in _select("lth_tf", inline=False) if c.entry != "imp" and not is_synopsis(c)]


@pytest.mark.parametrize("command", OTHERS, ids=_ids(OTHERS))
def test_run_commands_parse(command, shell):
    argv = [command.entry, *substitute(command.args, shell)]
    FLAGS.unparse_flags()
    try:
        flagdefs.parse_flags(argv)  # exits with 2 on an unknown flag or a bad value
    finally:
        FLAGS.unparse_flags()


@pytest.mark.parametrize("command", OTHERS, ids=_ids(OTHERS))
def test_run_commands_run_on_a_finished_run(command, shell):
    reason = _not_run(command)
    if reason:
        pytest.skip(f"parsed only: {reason}")
    code, err = call(command.entry, *substitute(command.args, shell))
    assert code == 0, f"{command}\n{err[-3000:]}"


# ---- console scripts -------------------------------------------------------------------------


def console_scripts() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            kwargs = {k.arg: k.value for k in node.keywords}
            scripts = ast.literal_eval(kwargs["entry_points"])["console_scripts"]
            return dict(s.replace(" ", "").split("=") for s in scripts)
    raise AssertionError("setup.py has no setup(...) call")


def test_console_scripts_the_readme_names_are_installed_as_its_table_says():
    text = (ROOT / "README.md").read_text()
    table = dict(re.findall(r"^\| `(lth-\w+)` \| `python -m (lth_tf\.\w+)", text, re.M))
    scripts = console_scripts()
    assert {name: target.split(":")[0] for name, target in scripts.items()} == table
    named = {n for doc in DOCS for n in re.findall(r"\blth-\w+\b", (ROOT / doc).read_text())}
    assert named <= set(scripts), f"named but not installed: {sorted(named - set(scripts))}"
    for target in scripts.values():
        module, function = target.split(":")
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        assert f"\ndef {function}(" in source, target
        assert f'if __name__ == "__main__":\n    {function}()' in source, module


# ---- benchmarks -------------------------------------------------------------------------------


def argparse_options(path: pathlib.Path) -> set:
    """The option strings of a script's add_argument calls."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            out |= {a.value for a in node.args if isinstance(a, ast.Constant)}
    return out


BENCHMARKS = _select("benchmark")


@pytest.mark.parametrize("command", BENCHMARKS, ids=_ids(BENCHMARKS))
def test_benchmark_exists_and_takes_the_flags_given(command):
    path = ROOT / command.argv[1]
    assert path.is_file(), command
    source = path.read_text()
    assert 'if __name__ == "__main__":' in source, command
    given = {a.split("=", 1)[0] for a in command.argv[2:]}
    missing = given - argparse_options(path)
    assert not missing, f"{command}: {path.name} declares no {sorted(missing)}"


# ---- installs and tools ------------------------------------------------------------------------


def _name(requirement: str) -> str:
    return Requirement(requirement).name.lower().replace("_", "-")


# TensorFlow builds that stand in for setup.py's `tensorflow` (BUILD.md's GPU and TPU installs).
STAND_INS = {"tensorflow-tpu": "tensorflow"}

PIPS = [c for c in _select("install") if c.argv[0] == "pip"]


@pytest.mark.parametrize("command", PIPS, ids=_ids(PIPS))
def test_pip_installs_name_setup_py_extras_and_its_pins(command):
    kwargs = conftest.setup_kwargs()
    extras = kwargs["extras_require"]
    pins = {_name(r): Requirement(r) for r in kwargs["install_requires"]}
    pins |= {_name(r): Requirement(r) for rs in extras.values() for r in rs}
    args, i = list(command.argv[2:]), 0
    assert command.argv[1] == "install", command
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-f", "--find-links"):
            i += 1
        elif arg.startswith("-"):
            continue
        elif arg.startswith("."):
            m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", arg)
            assert m, f"{command}: {arg}"
            unknown = set((m.group(1) or "").split(",")) - set(extras) - {""}
            assert not unknown, f"{command}: setup.py has no extra {sorted(unknown)}"
        else:
            requirement = Requirement(arg)
            name = STAND_INS.get(_name(arg), _name(arg))
            assert name in pins, f"{command}: {arg} is not a package setup.py installs"
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue  # e.g. cloud-tpu-client (the tpu extra) is not installed here
            if name in pins and pins[name].specifier.contains(installed, prereleases=True):
                assert requirement.specifier.contains(installed, prereleases=True), (
                    f"{command}: {arg} excludes {name} {installed}, which setup.py's "
                    f"{pins[name]} installs and the tests run with"
                )


def test_tools_the_docs_call_come_with_the_install():
    provided = {_name(r) for r in conftest.setup_kwargs()["install_requires"]}
    provided |= {_name(r) for r in conftest.setup_kwargs()["extras_require"]["test"]}
    for c in _select("other"):
        if c.argv[0] != "sh":  # sh -c: its inner command is the lth_tf one beside it
            assert c.argv[0] in provided, (
                f"{c}: {c.argv[0]} is in neither install_requires nor [test]"
            )


PYTHON_C = _select("python -c")


@pytest.mark.parametrize("command", PYTHON_C, ids=_ids(PYTHON_C))
def test_python_c_code_compiles_and_the_cpu_one_runs(command):
    code = command.argv[2]
    compile(code, str(command), "exec")
    if "'tpu'" in code:
        pytest.skip("needs a TPU: compiled only")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, {})
