"""Patient-level cross-validation folds, stratified by event, reproducible from a seed.

Folds are assigned to patients, never to slides: all of a patient's slides are in the same
fold by construction.
"""

from __future__ import annotations

import warnings

import numpy as np

from slide_clip.errors import ConfigError
from slide_clip.text import plural


def patient_folds(patients: list[str], events, k: int = 5, seed: int = 0) -> dict[str, int]:
    """Patient id -> fold (0..k-1), stratified by event (scikit-learn ``StratifiedKFold``).

    Parameters
    ----------
    patients : list of str
        Patient ids (each once).
    events : array of 0/1
        Event indicator per patient, in the same order.
    k : int
        Number of folds, at least 2 and at most the number of patients.
    seed : int
        Shuffling seed: the same patients, events and seed give the same folds.
    """
    from sklearn.model_selection import StratifiedKFold

    ids = list(patients)
    ev = np.asarray(events, dtype=int)
    if len(set(ids)) != len(ids):
        raise ValueError("patient ids must be unique")
    if k < 2 or k > len(ids):
        raise ConfigError(f"cannot make {k} folds of {len(ids)} patients", hint="Choose 2 <= --folds <= patients.")
    if int(ev.sum()) < k:
        raise ConfigError(f"only {plural(int(ev.sum()), 'patient')} {'has' if int(ev.sum()) == 1 else 'have'} an event: "
                          f"fewer than the {k} folds",
                          hint="Use fewer --folds.")
    order = np.argsort(ids, kind="stable")  # independent of the order patients were given in
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" with few censored patients
        for f, (_, test) in enumerate(skf.split(np.zeros(len(ids)), ev[order])):
            for i in test:
                fold[ids[order[i]]] = f
    return {p: fold[p] for p in ids}


def slide_folds(patient_fold: dict[str, int], patients: dict[str, list[str]]) -> dict[str, int]:
    """Slide id -> the fold of its patient."""
    return {sid: patient_fold[pid] for pid, sids in patients.items() for sid in sids}
