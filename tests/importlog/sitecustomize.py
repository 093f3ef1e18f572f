"""Imported by every Python process with this folder on PYTHONPATH and PIPELINE_IMPORT_LOG set (the demo test's
`dvc repro`): at exit, the process writes which project modules it imported, with its argv and the DVC stage
that started it (DVC_STAGE, which DVC sets for every command and its children inherit), to a JSON file in
that folder. The test then checks each stage's deps cover what its processes really imported."""

import atexit
import json
import os
import sys


def _record() -> None:
    folder = os.environ.get("PIPELINE_IMPORT_LOG")
    if not folder:
        return
    names = sorted(n for n in list(sys.modules) if n.split(".")[0] in ("pipeline", "stages"))
    entry = {"stage": os.environ.get("DVC_STAGE"), "argv": sys.argv, "modules": names}
    with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
        json.dump(entry, f)


if os.environ.get("PIPELINE_IMPORT_LOG"):
    atexit.register(_record)
