"""Execute every notebook (or the ones named) with its defaults and keep only the outputs of the cells
marked NBVAL_CHECK_OUTPUT: run after changing a notebook, the sample data or a preset, then commit.

    python notebooks/refresh_outputs.py [01_preprocess.ipynb ...]
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NB = Path(__file__).resolve().parent
# Like `make test`: defaults run in a fresh work directory, so stale data/ or outputs/ cannot leak into the
# stored outputs (the kernels inherit this).
os.environ["INSTRUCTBLIP_PEFT_WORKDIR"] = tempfile.mkdtemp(prefix="instructblip-peft-notebooks-")
for path in sorted(NB.glob("*.ipynb")) if len(sys.argv) == 1 else [NB / a for a in sys.argv[1:]]:
    nb = nbformat.read(path, as_version=4)
    t = time.monotonic()
    NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(NB)}}, timeout=600,
                   extra_arguments=["--IPKernelApp.log_level=CRITICAL"]).execute()
    took = time.monotonic() - t
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        if "NBVAL_CHECK_OUTPUT" in c.source:
            c.outputs = [o for o in c.outputs if o.get("output_type") in ("stream", "execute_result")]
        else:
            c.outputs = []
            c.execution_count = None
        c.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    print(f"{path.name}: {took:.1f} s, {path.stat().st_size} bytes")
