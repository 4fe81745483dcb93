"""Test-wide set-up: every default path (params/paths.yaml) points into a temporary work directory, so the
suite never reads or overwrites a user's data/ or outputs/."""
import os
import tempfile

# Set at import, before any test module resolves a path; subprocesses inherit it.
if not os.environ.get("INSTRUCTBLIP_PEFT_WORKDIR"):
    os.environ["INSTRUCTBLIP_PEFT_WORKDIR"] = tempfile.mkdtemp(prefix="instructblip-peft-tests-")
