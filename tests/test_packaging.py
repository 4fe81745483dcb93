"""environment.yml and pyproject.toml agree: the conda file adds only Python and pip, and installs the
package with its dev extras, so the dependency list lives in one place."""
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_installs_the_package_from_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    version = tuple(int(x) for x in python.split("=")[1].split(".")[:2])
    minimum = tuple(int(x) for x in pyproject["project"]["requires-python"].removeprefix(">=").split(".")[:2])
    assert version >= minimum
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert pip == ["-e .[dev]"]
    assert set(pyproject["project"]["optional-dependencies"]["dev"]) >= {"pytest>=8", "nbval>=0.11"}
    assert pyproject["project"]["scripts"]["instructblip-peft"] == "instructblip_peft.cli:main"
