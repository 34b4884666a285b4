"""``python -m onestage`` (and ``torchrun -m onestage``) is the ``onestage`` command."""

import sys

from onestage.cli import main

sys.exit(main())
