"""From tile embeddings to survival models: patient bags, pooled tables, validated baselines.

Modules, each one concept:

- :mod:`~slide_clip.survival.clinical`: clinical tables (checked) and their join with the slides;
- :mod:`~slide_clip.survival.patients`: the listed slides (manifest, patients.csv) matched to
  stores as the pipeline names them, and their patients;
- :mod:`~slide_clip.survival.bags`: the cohort's stores, lazy bags per slide or patient (a
  torch ``Dataset``), HDF5 export (``features``, ``coords``) for CLAM/TRIDENT-style code;
- :mod:`~slide_clip.survival.pooled`: per-slide and per-patient pooled tables (Parquet);
- :mod:`~slide_clip.survival.folds`: patient-level stratified cross-validation folds;
- :mod:`~slide_clip.survival.coxnet`: the elastic-net Cox baseline on the pooled table;
- :mod:`~slide_clip.survival.abmil`: gated-attention MIL trained with the Cox partial likelihood;
- :mod:`~slide_clip.survival.metrics`: Harrell's / Uno's c-index, KM, log-rank;
- :mod:`~slide_clip.survival.validation`: cross-validated c-index (mean ± SD over folds, pooled
  after standardising, bootstrap within folds), the small-cohort rule, the permutation test;
- :mod:`~slide_clip.survival.pictures`: attention / tile-risk heatmaps, top-tile galleries;
- :mod:`~slide_clip.survival.experiment`: one cross-validated run of the baselines, written to disk;
- :mod:`~slide_clip.survival.rundir`: a run's folder, swapped in only when complete;
- :mod:`~slide_clip.survival.report`: the console lines and the markdown artifact of a run.

Heavy imports (torch, scikit-survival, h5py) happen inside the functions that need them.
"""

from slide_clip.survival.bags import BagDataset, PatientCohort, export_h5, open_cohort, read_slide_bag
from slide_clip.survival.clinical import Clinical, join_cohort, read_clinical
from slide_clip.survival.experiment import BASELINES, SurvivalSettings, run_survival
from slide_clip.survival.folds import patient_folds
from slide_clip.survival.patients import list_slides
from slide_clip.survival.pooled import pooled_tables, write_pooled_tables
from slide_clip.survival.report import metrics_markdown

__all__ = [
    "BASELINES", "BagDataset", "Clinical", "PatientCohort", "SurvivalSettings", "export_h5", "join_cohort",
    "list_slides", "metrics_markdown", "open_cohort", "patient_folds", "pooled_tables", "read_clinical",
    "read_slide_bag", "run_survival", "write_pooled_tables",
]
