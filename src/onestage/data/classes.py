"""The classes a dataset holds, said out loud when nobody fixed them, and likely typos.

Without ``data.class_names`` the classes are whatever names the annotations hold, in
sorted order: a misspelled name ("racoon" on 2 of 200 objects) silently becomes a class of
its own. ``note_classes`` records, as notes in the dataset's problem log (printed at the
start of training and listed by ``onestage data check``):
- ``classes_found``: the classes found and their box counts, in label order;
- ``likely_typo``: a class whose name is within a small edit distance of another's and that
  has very few boxes next to it (``likely_typos`` says exactly when).
"""

from __future__ import annotations

import numpy as np

from onestage.data.problems import DatasetSpec

# A rare class is a likely typo of a more frequent one when its (normalized) name is within
# this many edits of the other's (1 for names of 4 or 5 characters, 0 for shorter ones: RBC
# and WBC are two classes) and it has at most RARE_MAX_BOXES boxes and at most RARE_SHARE of
# the other's (or at most RARE_FEW, for small datasets).
MAX_EDITS = 2
RARE_SHARE = 0.1
RARE_FEW = 2
RARE_MAX_BOXES = 20


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), by dynamic programming."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _normalized(name: str) -> str:
    """Case, spaces, '-' and '_' do not make two names different words."""
    return "".join(ch for ch in name.lower() if ch not in " -_")


def likely_typos(names: list[str], box_counts: np.ndarray) -> list[tuple[str, str, int]]:
    """(rare name, frequent name, edit distance) for every likely typo (module constants).

    names: C class names; box_counts: (C,) boxes of each class.
    """
    found = []
    counts = np.asarray(box_counts).reshape(-1)
    for i, rare in enumerate(names):
        best: tuple[str, str, int] | None = None
        for j, common in enumerate(names):
            rare_enough = counts[i] <= max(RARE_FEW, RARE_SHARE * counts[j])
            if i == j or counts[i] >= counts[j] or counts[i] > RARE_MAX_BOXES or not rare_enough:
                continue
            a, b = _normalized(rare), _normalized(common)
            shortest = min(len(a), len(b))
            limit = 0 if shortest <= 3 else 1 if shortest <= 5 else MAX_EDITS
            d = edit_distance(a, b)
            if d <= limit and (best is None or d < best[2]):
                best = (rare, common, d)
        if best is not None:
            found.append(best)
    return found


def note_classes(spec: DatasetSpec, source: str) -> None:
    """Record the classes found in ``spec`` and its likely typos as notes (module docstring).

    source: where the records come from (the dataset folder or file), for the log.
    """
    labels = np.concatenate([r.labels for r in spec.records]) if spec.records else np.zeros(0, np.int64)
    counts = np.bincount(labels, minlength=len(spec.class_names))
    listed = ", ".join(f"{k}: {n} ({c} boxes)" for k, (n, c) in enumerate(zip(spec.class_names, counts)))
    spec.problems.fix(source, "classes_found", f"no data.class_names: {len(spec.class_names)} classes found in "
                      f"the annotations, in label order: {listed}; set data.class_names to fix them", "kept")
    index = {n: k for k, n in enumerate(spec.class_names)}
    for rare, common, d in likely_typos(spec.class_names, counts):
        files = sorted({str(r.path or r.image_id) for r in spec.records if (r.labels == index[rare]).any()})
        spec.problems.fix(source, "likely_typo", f"class {rare!r} ({counts[index[rare]]} boxes) is {d} edit(s) "
                          f"from {common!r} ({counts[index[common]]} boxes): a misspelling? in "
                          f"{', '.join(files[:10])}{' ...' if len(files) > 10 else ''}", "kept")
