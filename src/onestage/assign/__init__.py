"""Target assignment: which prior/anchor is responsible for which object."""

from onestage.assign.ssd import BACKGROUND, IGNORE, match_ssd

__all__ = ["BACKGROUND", "IGNORE", "match_ssd"]
