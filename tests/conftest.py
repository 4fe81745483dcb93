"""Test-wide set-up: every default path (params/paths.yaml) points into a temporary work directory, so the
suite never reads or overwrites a user's data/ or outputs/. Also the fixtures several test modules share."""
import os
import tempfile

import pytest

# Set at import, before any test module resolves a path; subprocesses inherit it.
if not os.environ.get("INSTRUCTBLIP_PEFT_WORKDIR"):
    os.environ["INSTRUCTBLIP_PEFT_WORKDIR"] = tempfile.mkdtemp(prefix="instructblip-peft-tests-")


# The package and train_fixtures (which makes the process single-threaded) are imported inside the fixtures,
# so only the tests that use them pay for or are affected by the import.

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small processed colour dataset (train_fixtures.make_colour_dataset), one per test module."""
    from train_fixtures import make_colour_dataset
    return make_colour_dataset(tmp_path_factory.mktemp("processed"))


@pytest.fixture(scope="module")
def sample_scienceqa(tmp_path_factory):
    """The bundled sample's ScienceQA (1000 questions), preprocessed: what the learning checks train on."""
    from instructblip_peft.data.preprocess import preprocess
    from instructblip_peft.data.sample import generate_sample
    root = tmp_path_factory.mktemp("sample")
    raw = generate_sample(root / "raw", seed=0, n_iconqa=10)
    preprocess("scienceqa", raw["scienceqa"], root / "processed", progress=False)
    return root / "processed" / "scienceqa"


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """final_state of a run of EXPERIMENT with SETTINGS never interrupted: what every resumed run must equal."""
    from instructblip_peft.train import train
    from train_fixtures import EXPERIMENT, SETTINGS, final_state
    out = tmp_path_factory.mktemp("uninterrupted")
    train("scienceqa", EXPERIMENT, out, dataset_dir=data, preset="tiny", progress=False, **SETTINGS)
    return final_state(out)
