"""Any install works: a wheel carries params/ and notebooks/, and runs the CLI and its notebooks from any
folder; `init` makes a folder with its own copies, which the package then uses; the notebooks' set-up cell
installs the package from the project's URL, or says in one line what to set."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from instructblip_peft import cli, config

from train_fixtures import SINGLE_THREAD_ENV, curves

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ENV_SETTINGS = (config.PARAMS_ENV, config.WORKDIR_ENV)


def cell(notebook: Path, index: int) -> str:
    return "".join(json.loads(notebook.read_text())["cells"][index]["source"])


def parameter(notebook: Path, name: str):
    tree = ast.parse(cell(notebook, 1))
    return next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and n.targets[0].id == name)


# ---------------------------------------------------------------- init, and which params/ are used

def test_init_makes_a_folder_whose_params_and_notebooks_are_used(tmp_path, monkeypatch):
    for name in ENV_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert config.params_dir() == ROOT / "params"          # outside any project folder: the clone's
    assert cli.main(["init", "proj"]) == 0
    proj = tmp_path / "proj"
    assert sorted(p.name for p in (proj / "notebooks").iterdir()) == [p.name for p in NOTEBOOKS]
    assert (proj / "params" / "train.yaml").read_text() == (ROOT / "params" / "train.yaml").read_text()
    assert (proj / "params" / "architectures").is_dir()

    train_yaml = proj / "params" / "train.yaml"
    train_yaml.write_text(re.sub(r"^seed: 42", "seed: 7", train_yaml.read_text(), flags=re.M))
    monkeypatch.chdir(proj / "notebooks")                   # in the folder or below it (a kernel's cwd)
    assert config.params_dir() == proj / "params" and config.notebooks_dir() == proj / "notebooks"
    assert config.default_settings()["seed"] == 7
    assert config.path_setting("outputs_dir") == proj / "outputs"
    monkeypatch.setenv(config.PARAMS_ENV, str(ROOT / "params"))   # the variable wins
    assert config.default_settings()["seed"] == 42

    monkeypatch.chdir(tmp_path)
    assert cli.main(["init", "proj"]) == 2                  # never overwrites
    assert (proj / "params" / "train.yaml").read_text() == train_yaml.read_text()


def test_the_notebook_kernels_use_the_params_and_folder_the_command_resolved(tmp_path, monkeypatch):
    """A kernel starts in the work folder and gets the params/ the CLI resolved, wherever its notebook lies."""
    import nbformat

    from instructblip_peft import runner

    for name in ENV_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init", "proj"]) == 0
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os\nfrom instructblip_peft import config\n"
                                          "print(config.params_dir(), config.work_dir(), os.getcwd())")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    elsewhere = tmp_path / "nb"
    elsewhere.mkdir()
    nbformat.write(nb, elsewhere / "where.ipynb")
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", elsewhere)
    monkeypatch.setattr(runner, "runner_settings", lambda: {"kernel_name": "python3", "notebooks": {"w": "where.ipynb"}})
    monkeypatch.chdir(tmp_path / "proj" / "notebooks")
    out = runner.execute("w", tmp_path / "out.ipynb", {}, progress=False)
    printed = "".join(json.loads(out.read_text())["cells"][0]["outputs"][0]["text"]).split()
    proj = tmp_path / "proj"
    assert printed == [str(proj / "params"), str(proj), str(proj)]


def test_init_into_an_unwritable_place_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(["init", str(tmp_path / "file" / "proj")]) == 2
    err = capsys.readouterr().err
    assert "cannot create a project folder in" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- the set-up cell (Colab)

def test_every_notebook_installs_from_the_project_url():
    url = config.repository_url()
    assert url and url.startswith("https://")
    for notebook in NOTEBOOKS:
        assert parameter(notebook, "package_source") == f"git+{url}", notebook.name
        assert cell(notebook, 2) == cell(NOTEBOOKS[0], 2), f"{notebook.name}: the set-up cell differs"


def test_the_set_up_cell_says_what_to_set_when_it_cannot_install(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)   # as on a fresh Colab runtime
    source = str(tmp_path / "no-such-wheel.whl")
    with pytest.raises(SystemExit) as e:
        exec(cell(NOTEBOOKS[0], 2), {"package_source": source})
    message = str(e.value)
    assert f"cannot install instructblip-peft from {source!r}" in message
    assert "set package_source in the first cell" in message and "\n" not in message


# ---------------------------------------------------------------- a wheel in a fresh environment

def run(argv, cwd, env, timeout=600) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow  # builds a wheel and a fresh environment: about 2 minutes (make test-slow)
def test_a_wheel_in_a_fresh_environment_runs_cli_and_notebooks_from_any_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (*ENV_SETTINGS, "PYTHONPATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
        tmp_path, env)
    wheel = next((tmp_path / "dist").glob("instructblip_peft-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    env = {**env, **SINGLE_THREAD_ENV, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    # torch first, pinned (pip would otherwise pick a build on its own); then the notebooks' set-up cell,
    # as on Colab, installs the package (and its dependencies) from package_source.
    run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path, env)
    run([str(python), "-c", f"package_source = {str(wheel)!r}\n" + cell(NOTEBOOKS[0], 2)], tmp_path, env)

    elsewhere = tmp_path / "elsewhere"   # no clone, no params/ here
    elsewhere.mkdir()
    ipeft = str(bin_dir / "instructblip-peft")
    version = run([ipeft, "--version"], elsewhere, env)
    assert config.repository_url() in version                       # from the installed metadata
    assert f"params:    {venv}" in version and "instructblip_peft/params" in version
    assert "3,728,128" in run([ipeft, "params", "28"], elsewhere, env)
    run([ipeft, "preprocess", "scienceqa"], elsewhere, env)
    assert (elsewhere / "data" / "processed" / "scienceqa" / "01_preprocess.ipynb").is_file()
    run([ipeft, "run", "scienceqa", "27", "--preset", "tiny", "-p", "max_steps", "2", "-p", "max_eval_samples", "8",
         "-p", "log_every_steps", "1"], elsewhere, env)
    run_dir = elsewhere / "outputs" / "scienceqa" / "27"
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"
    assert (run_dir / "03_results.ipynb").is_file()
    assert [s for s, _ in curves(run_dir)["train/loss"]] == [1, 2]

    # init: an editable copy, used from the folder and below it.
    run([ipeft, "init", "proj"], elsewhere, env)
    assert f"params:    {elsewhere / 'proj' / 'params'}" in run([ipeft, "--version"], elsewhere / "proj" / "notebooks", env)
