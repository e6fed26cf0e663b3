"""Helpers shared by benchmark scripts: machine description and JSON result writing."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    from rescompress.system import cpu_features, library_versions

    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu_features": cpu_features(),
        "libraries": library_versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **_cuda_device(),
    }


def _cuda_device() -> dict:
    import torch

    return {"cuda_device": torch.cuda.get_device_name(0)} if torch.cuda.is_available() else {}


def write_result(name: str, payload: dict) -> Path:
    from rescompress.fileio import write_text_atomic

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), **payload}
    write_text_atomic(out, json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return out
