"""onestage: one-stage object detectors (SSD family, YOLO family) through one pipeline."""

import os as _os

# albumentations looks for a newer release on the network at import; the project's
# machines (and many users' clusters) have no network, so the check only costs a timeout.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"


def __getattr__(name: str):
    """``from onestage import load_detector``, imported on first use: ``import onestage`` alone
    stays light (no torch), for tools that only run exported models."""
    if name in ("load_detector", "LoadedDetector", "Prediction"):
        from onestage import api

        return getattr(api, name)
    raise AttributeError(f"module 'onestage' has no attribute {name!r}")
