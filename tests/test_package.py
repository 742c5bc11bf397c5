"""The package's public surface: version, curated __all__, typing marker."""

import importlib.resources
import re

import lipnets


def test_version_is_pep440():
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|a\d+|b\d+|rc\d+)?", lipnets.__version__)


def test_all_names_exist_and_are_sorted_groups():
    for module in (lipnets, lipnets.nn, lipnets.functional, lipnets.bounds, lipnets.errors):
        assert module.__all__, module.__name__
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_py_typed_marker_ships():
    assert importlib.resources.files("lipnets").joinpath("py.typed").is_file()


def test_errors_subclass_the_builtins_users_catch():
    assert issubclass(lipnets.UnboundedModuleError, TypeError)
    assert issubclass(lipnets.UntraceableModelError, lipnets.UnboundedModuleError)
    assert issubclass(lipnets.ShapeRequiredError, ValueError)


def test_zoo_is_installed_with_its_checkpoints(tmp_path):
    """`import zoo` works outside the checkout (it is packaged, with the shipped runs), and
    a shipped run is found by name with its card."""
    import subprocess
    import sys

    code = (
        "import zoo.cards as c; names = c.pretrained(); print(sorted(names)); "
        "path, card = c.find_run(names[0]); print(card['checkpoint_sha256'][:8])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "groupsort-mlp-digits" in done.stdout
