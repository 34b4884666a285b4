"""onestage: one-stage object detectors (SSD family, YOLO family) through one pipeline."""

import os as _os

# albumentations looks for a newer release on the network at import; the project's
# machines (and many users' clusters) have no network, so the check only costs a timeout.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
