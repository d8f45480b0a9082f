"""trimformer: prune transformer models at every granularity, and measure what each cut cost and bought.

    import trimformer
    model, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    calib = trimformer.data.calibration_windows(tok, n=64, length=512)
    trimformer.prune_(model, trimformer.build("wanda", {"sparsity": 0.5}), calibration=calib)
    report = trimformer.evaluate(model, tok, reference=trimformer.load("smollm2-135m"))  # JSON-able dict
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import data, export
from .api import prune_
from .evaluate import evaluate
from .methods import Recipe, build
from .models import anatomy_of
from .models.load import BUNDLED, load
from .recover import RecoverConfig, recover_

# Public subpackages, imported on first use: `import trimformer; trimformer.kv.press(...)` works as written.
_LAZY = ("calibrate", "config", "io", "kv", "models", "pipeline", "recover", "report", "steps", "structure", "tokens",
         "weights")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'trimformer' has no attribute {name!r}")


__all__ = ["BUNDLED", "Recipe", "RecoverConfig", "anatomy_of", "build", "data", "evaluate", "export", "load", "prune_",
           "recover_", *_LAZY]
