"""rescompress: prune, fold, INT8-quantize and benchmark torchvision-style ResNets.

The pipeline stages live in their own modules (``loading``, ``data``, ``folding``, ``export``,
``calibration``, ``quantization``, ``pruning``, ``measure``, ``engine``); each has a pure-function entry
point and passes small dataclasses to the next. The Typer CLI in ``rescompress.cli`` only parses, calls
and renders.
"""

__version__ = "0.1.0"
