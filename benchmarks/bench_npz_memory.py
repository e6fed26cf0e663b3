"""Peak memory of opening a 16-bit ``.npz`` data file: chunked conversion to 8 bits vs the whole array at once.

A 16-bit (or float) ``x`` is converted to uint8 pixels when the file is opened. Converting the whole array
through float64 temporaries took about 12x the file's size in memory; ``data._normalize_array_images``
now converts 64 images at a time. Each variant runs in its own fresh Python process (peak RSS is per
process), alternating, ``--rounds`` times; the JSON has every peak and the medians.

* ``chunked``: ``rescompress.data.describe_source(file)``, what every command does;
* ``whole_array``: ``np.load`` then ``data._grey_to_uint8(x, "I;16")`` on the whole array (the conversion
  as it was done before, kept in the library as the per-chunk step).

Run: ``.venv/bin/python benchmarks/bench_npz_memory.py`` (about 1 minute; writes a ~300 MB file to a
temporary folder). Writes ``benchmarks/results/npz_memory.json``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

PROBE = {
    "chunked": "from rescompress.data import describe_source; describe_source(PATH)",
    "whole_array": "import numpy as np; from rescompress.data import _grey_to_uint8; "
                   "_grey_to_uint8(np.load(PATH)['x'], 'I;16')",
}


def peak_rss_mb(code: str, path: Path) -> float:
    script = (f"PATH = {str(path)!r}\n{code}\nimport resource\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "u16.npz"
        rng = np.random.default_rng(0)
        x = (rng.random((args.images, 3, args.size, args.size)) * 65535).astype(np.uint16)
        np.savez(path, x=x, y=rng.integers(0, 10, args.images))
        file_mb = path.stat().st_size / 2**20
        del x
        baseline = peak_rss_mb("import rescompress.data", path)  # the interpreter and imports alone
        peaks: dict[str, list[float]] = {k: [] for k in PROBE}
        for _ in range(args.rounds):
            for name, code in PROBE.items():
                peaks[name].append(peak_rss_mb(code, path))
    medians = {k: statistics.median(v) for k, v in peaks.items()}
    out = write_result("npz_memory", {
        "command": "python benchmarks/bench_npz_memory.py",
        "file": f"{args.images} x 3 x {args.size} x {args.size} uint16, {file_mb:.0f} MB npz",
        "imports_only_peak_rss_mb": baseline,
        "peak_rss_mb": peaks,
        "median_peak_rss_mb": medians,
        "ratio_whole_over_chunked": medians["whole_array"] / medians["chunked"],
    })
    print(f"{out}: median peak RSS chunked {medians['chunked']:.0f} MB, whole array {medians['whole_array']:.0f} MB "
          f"(imports alone {baseline:.0f} MB, file {file_mb:.0f} MB)")


if __name__ == "__main__":
    main()
