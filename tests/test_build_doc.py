"""BUILD.md's install commands name everything setup.py installs."""

import pathlib
import re

import conftest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=~!\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _tpu_install_block() -> str:
    text = (ROOT / "BUILD.md").read_text()
    start = text.index("pip install 'tensorflow-tpu")
    return text[start : text.index("```", start)]


def test_tpu_install_names_every_dependency_and_the_tpu_extra():
    """`--no-deps` installs nothing on its own: the explicit list must be complete."""
    kwargs = conftest.setup_kwargs()
    wanted = {_name(r) for r in kwargs["install_requires"]} - {"tensorflow"}
    wanted |= {_name(r) for r in kwargs["extras_require"]["tpu"]}
    block = _tpu_install_block()
    named = {_name(tok.strip("'\"")) for tok in block.split() if not tok.startswith("-")}
    missing = sorted(wanted - named)
    assert not missing, f"BUILD.md's TPU install leaves out {missing}"
    assert "--no-deps -e ." in block
    assert ".[tpu]" not in block, "extras are not installed under --no-deps"
