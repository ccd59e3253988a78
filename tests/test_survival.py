"""Survival models on a synthetic cohort embedded by the real pipeline.

The cohort (slide_clip.survival.demo, the README's example): 60 patients, 20 of them with two
slides (80 small slides written with slide_clip.synthetic). Each slide is a rectangle of tissue in which a second, dense texture
covers a random share of the area; a patient's hazard is 0.1 * exp(10 * f), f = the dense
share of its tissue area (from the scenes' geometry, not from the pipeline). The slides are
embedded with the tiny open_clip architecture loaded from a checkpoint file, scored
zero-shot, and everything downstream reads the stores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from slide_clip.errors import ConfigError
from slide_clip.survival.demo import MPP, TILE, write_demo_cohort

N_PATIENTS, N_TWO_SLIDES = 60, 20


@pytest.fixture(scope="session")
def surv(tmp_path_factory, tiny_registry):
    """The synthetic cohort, embedded and zero-shot scored once per test session."""
    from slide_clip.config import load_config
    from slide_clip.manifest import CohortSlide, record_patients
    from slide_clip.pipeline import embed_slides
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import find_stores, zeroshot

    base = tmp_path_factory.mktemp("survival")
    demo = write_demo_cohort(base, N_PATIENTS, N_TWO_SLIDES, seed=11, model=False)
    slides = [CohortSlide(path, patient_id=pid) for path, pid in demo["slides"].values()]
    scenes = demo["scenes"]
    patient_of = {sid: pid for sid, (_, pid) in demo["slides"].items()}
    clinical = demo["clinical"]
    table = pd.read_csv(clinical, dtype={"patient_id": str})
    pids, time, event = table["patient_id"].tolist(), table["os_months"].to_numpy(), table["dead"].to_numpy()
    f = np.array([demo["dense_share"][p] for p in pids])

    cfg = load_config().with_overrides(
        tiling={"target_mpp": MPP, "tile_size": TILE},
        encode={"model": "tiny", "registries": (str(tiny_registry),), "batch_size": 128, "device": "cpu"})
    out = base / "out"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's batches are too small to share out between threads
    try:
        results = embed_slides([s.path for s in slides], out, cfg, progress=False)
        assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"]
        zeroshot(find_stores([out]), load_prompts("tumour"), cfg)
    finally:
        torch.set_num_threads(threads)
    record_patients(out, slides)
    return SimpleNamespace(out=out, clinical=clinical, pids=pids, f=dict(zip(pids, f)), time=time, event=event,
                           scenes=scenes, patient_of=patient_of, slides=slides, cfg=cfg, base=base)


def _fast(**kw):
    from slide_clip.survival import SurvivalSettings

    # one torch thread: the toy model's tensors are too small to share out, and on a busy
    # machine a second thread only waits
    return SurvivalSettings(**{"n_boot": 100, "abmil": {"epochs": 30, "cpu_threads": 1}, **kw})


# ----------------------------------------------------------------------------- inputs
def test_tiny_model_embeddings_separate_the_two_textures(surv):
    """Tiles wholly of one texture: a nearest-centroid rule fitted on half the slides labels
    the other half's tiles (geometry decides the truth)."""
    from slide_clip.store import SlideStore

    X, y, half = [], [], []
    for i, (sid, sc) in enumerate(sorted(surv.scenes.items())):
        st = SlideStore.open(surv.out / f"{sid}.zarr")
        xy, feats = st.coords(), st.embeddings("tiny")
        dense = [r for r in sc.regions if r.texture == "dense"]
        for (x, yy), v in zip(xy, feats):
            box = (x, yy, x + TILE, yy + TILE)
            inside_d = bool(dense) and box[0] >= dense[0].box[0] and box[2] <= dense[0].box[2]
            outside_d = not dense or box[2] <= dense[0].box[0] or box[0] >= dense[0].box[2]
            inside_t = box[0] >= 32 and box[1] >= 32 and box[2] <= 608 and box[3] <= 480
            if inside_t and (inside_d or outside_d):
                X.append(v)
                y.append(int(inside_d))
                half.append(i % 2)
    X, y, half = np.array(X), np.array(y), np.array(half)
    assert (y == 1).sum() > 200 and (y == 0).sum() > 200
    tr, te = half == 0, half == 1
    c0, c1 = X[tr & (y == 0)].mean(0), X[tr & (y == 1)].mean(0)
    pred = (np.linalg.norm(X[te] - c1, axis=1) < np.linalg.norm(X[te] - c0, axis=1)).astype(int)
    assert (pred == y[te]).mean() >= 0.95


def test_clinical_table_errors_name_the_file(tmp_path, surv):
    from slide_clip.survival import join_cohort, read_clinical

    def check(text, match, **kw):
        p = tmp_path / "c.csv"
        p.write_text(text)
        with pytest.raises(ConfigError, match=match) as e:
            read_clinical(p, kw.get("time", "t"), kw.get("event", "e"))
        assert str(p) in str(e.value) and "\n" not in str(e.value)

    check("patient_id,t,e\nA,1,1\n", "no time column 'months'", time="months")
    check("patient_id,t\nA,1\n", "no event column 'e'")
    check("patient_id,t,e\nA,1,1\nA,2,0\n", "patient 'A' has 2 rows")
    check("patient_id,t,e\nA,-1,1\n", "patient 'A': time 't' is -1")
    check("patient_id,t,e\nA,,1\nB,2,0\n", "patient 'A': time 't'")
    check("patient_id,t,e\nA,1,2\n", "event 'e' is 2")
    check("patient_id,t,e\nA,1,yes please\n", "events must be 0/1")
    check("patient_id,t,e\nA,1,0\n", "no patient has an event")
    ok = tmp_path / "ok.csv"
    ok.write_text("patient_id,t,e\nA,1,true\nB,2.5,False\nC,3,1\n")
    c = read_clinical(ok, "t", "e")
    assert c.table["event"].tolist() == [1, 0, 1] and c.table["time"].tolist() == [1.0, 2.5, 3.0]
    with pytest.raises(ConfigError, match="slide 's2' .patient 'D'. have no patient row|have no patient row"):
        join_cohort(c, {"s1": "A", "s2": "D", "s3": "B", "s4": "C"})
    with pytest.raises(ConfigError, match="patient.s. have no slide .* 'C'"):
        join_cohort(c, {"s1": "A", "s3": "B"})
    assert join_cohort(c, {"s1": "A", "s2": "A", "s3": "B", "s4": "C"}) == {"A": ["s1", "s2"], "B": ["s3"],
                                                                           "C": ["s4"]}


def test_patients_come_from_the_recorded_manifest(surv, tmp_path):
    from slide_clip.survival import open_cohort

    cohort = open_cohort(surv.out)
    assert cohort.model == "tiny" and len(cohort.stores) == len(surv.scenes)
    assert {sid: cohort.patient_of(sid) for sid in cohort.stores} == surv.patient_of
    assert sum(len(v) == 2 for v in cohort.patients.values()) == N_TWO_SLIDES
    # a manifest given explicitly wins; slides it does not name keep the recorded patient
    m = tmp_path / "m.csv"
    m.write_text(f"path,patient_id\n{surv.slides[0].path},Z9\n")
    assert open_cohort(surv.out, manifest=m).patient_of(surv.slides[0].slide_id) == "Z9"


# ----------------------------------------------------------------------------- bags and tables
def test_patient_bags_and_hdf5_export_hold_every_tile(surv, tmp_path):
    import h5py
    import torch

    from slide_clip.store import SlideStore
    from slide_clip.survival import BagDataset, export_h5, open_cohort

    cohort = open_cohort(surv.out)
    ds = BagDataset(cohort, "patient")
    pid = "P03"  # two slides
    bag = ds[ds.ids.index(pid)]
    stores = [SlideStore.open(surv.out / f"{s}.zarr") for s in ("s03_0", "s03_1")]
    assert bag["slide_ids"] == ["s03_0", "s03_1"] and isinstance(bag["features"], torch.Tensor)
    np.testing.assert_array_equal(bag["features"].numpy(), np.concatenate([s.embeddings("tiny") for s in stores]))
    np.testing.assert_array_equal(bag["coords"].numpy(), np.concatenate([s.coords() for s in stores]))
    assert bag["slide_index"].tolist() == [0] * stores[0].n_tiles + [1] * stores[1].n_tiles

    files = export_h5(cohort, tmp_path / "h5", level="slide")
    assert len(files) == len(surv.scenes)
    with h5py.File(tmp_path / "h5" / "s03_1.h5") as f:
        np.testing.assert_array_equal(f["features"][:], stores[1].embeddings("tiny"))
        np.testing.assert_array_equal(f["coords"][:], stores[1].coords())
        assert f["coords"].attrs["patch_size_level0"] == TILE and f.attrs["patch_size_level0"] == TILE
    export_h5(cohort.restrict({pid: cohort.patients[pid]}), tmp_path / "h5p", level="patient")
    with h5py.File(tmp_path / "h5p" / f"{pid}.h5") as f:
        np.testing.assert_array_equal(f["features"][:], bag["features"].numpy())
        assert [s.decode() if isinstance(s, bytes) else s for s in f.attrs["slide_ids"]] == ["s03_0", "s03_1"]


def test_pooled_tables_match_the_stores_and_the_slide_summaries(surv):
    from slide_clip.store import SlideStore
    from slide_clip.survival import open_cohort, pooled_tables

    slides, patients = pooled_tables(open_cohort(surv.out), with_max=True)
    slides, patients = slides.set_index("slide_id"), patients.set_index("patient_id")
    assert len(slides) == len(surv.scenes) and len(patients) == N_PATIENTS
    a, b = SlideStore.open(surv.out / "s05_0.zarr"), SlideStore.open(surv.out / "s05_1.zarr")
    both = np.concatenate([a.embeddings("tiny"), b.embeddings("tiny")]).astype(np.float64)
    mean_cols = [f"emb_mean_{j}" for j in range(both.shape[1])]
    np.testing.assert_allclose(patients.loc["P05", mean_cols].to_numpy(float), both.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(patients.loc["P05", [f"emb_max_{j}" for j in range(both.shape[1])]].to_numpy(float),
                               both.max(0), rtol=1e-6)
    assert patients.loc["P05", "n_tiles"] == len(both) and patients.loc["P05", "slide_ids"] == "s05_0;s05_1"
    area = a.group["tissue"].attrs["tissue_area_mm2"] + b.group["tissue"].attrs["tissue_area_mm2"]
    assert patients.loc["P05", "tissue_area_mm2"] == pytest.approx(area)
    # per slide, the zero-shot columns equal the scoring stage's own summary
    summary = json.loads((surv.out / "summaries" / "tiny" / "tumour" / "s05_1.json").read_text())
    for metric in ("slide_prob", "mean_prob", "area_fraction"):
        for cls, v in summary[metric].items():
            assert slides.loc["s05_1", f"tumour:{metric}:{cls}"] == pytest.approx(v, rel=1e-6)


# ----------------------------------------------------------------------------- pieces of the models
def test_folds_are_reproducible_stratified_and_keep_patients_whole(surv):
    from slide_clip.survival import open_cohort, patient_folds
    from slide_clip.survival.folds import slide_folds

    pids, ev = surv.pids, surv.event
    a = patient_folds(pids, ev, 5, seed=3)
    assert a == patient_folds(list(reversed(pids)), ev[::-1], 5, seed=3)  # order-independent, seeded
    assert a != patient_folds(pids, ev, 5, seed=4)
    sizes = np.bincount(list(a.values()))
    events = np.bincount([a[p] for p, e in zip(pids, ev) if e], minlength=5)
    assert sizes.max() - sizes.min() <= 1 and events.max() - events.min() <= 1
    cohort = open_cohort(surv.out)
    sf = slide_folds(a, cohort.patients)
    for pid, sids in cohort.patients.items():
        assert {sf[s] for s in sids} == {a[pid]}
    with pytest.raises(ConfigError):
        patient_folds(pids[:3], [1, 0, 1], 5)


def test_cox_loss_equals_a_direct_computation():
    import torch

    from slide_clip.survival.abmil import cox_loss

    r = np.array([0.3, -1.2, 2.0, 0.0, 0.7, -0.4, 1.1])
    t = np.array([5.0, 3.0, 3.0, 8.0, 1.0, 3.0, 6.0])  # ties at 3
    e = np.array([1, 1, 0, 1, 1, 1, 0])
    direct = 0.0
    for i in range(len(t)):
        if e[i]:
            direct -= r[i] - math.log(sum(math.exp(r[j]) for j in range(len(t)) if t[j] >= t[i]))
    direct /= e.sum()
    got = cox_loss(torch.tensor(r, requires_grad=True), torch.tensor(t), torch.tensor(e))
    assert got.item() == pytest.approx(direct, rel=1e-12)
    got.backward()  # differentiable


def _uno_numpy(tt, te, t, e, r, tau):
    """Uno's C by its definition, with a Kaplan-Meier of the training censoring times."""
    order = np.argsort(tt)
    G_t, G = [], 1.0
    for i in order:  # no tied times in this test
        if not te[i]:
            G *= 1 - 1 / np.sum(tt >= tt[i])
        G_t.append((tt[i], G))
    times, vals = np.array([x for x, _ in G_t]), np.array([g for _, g in G_t])

    def G_before(x):  # G(x-): the censoring survival just before x
        k = np.searchsorted(times, x, side="left") - 1
        return 1.0 if k < 0 else vals[k]

    num = den = 0.0
    for i in range(len(t)):
        if not e[i] or t[i] >= tau:
            continue
        w = 1 / G_before(t[i]) ** 2
        for j in range(len(t)):
            if t[i] < t[j]:
                den += w
                num += w * (1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0)
    return num / den


def test_c_index_equals_lifelines_and_the_definition():
    from lifelines.utils import concordance_index

    from slide_clip.survival.metrics import harrell_c, uno_c

    rng = np.random.default_rng(5)
    n = 80
    t = rng.permutation(np.arange(1, n + 1)).astype(float) + rng.uniform(0, 0.5, n)
    e = (rng.uniform(size=n) < 0.7).astype(int)
    r = -t / 10 + rng.normal(0, 2, n)
    assert harrell_c(t, e, r) == pytest.approx(concordance_index(t, -r, e), abs=1e-12)
    tau = float(np.sort(t)[-2])
    assert uno_c(t, e, t, e, r, tau=tau) == pytest.approx(_uno_numpy(t, e, t, e, r, tau), abs=1e-9)


# ----------------------------------------------------------------------------- the baselines, end to end
@pytest.fixture(scope="session")
def real_run(surv):
    from slide_clip.survival import run_survival

    return run_survival(surv.out, surv.clinical, "os_months", "dead", settings=_fast(name="real", heatmaps="gallery"),
                        log=lambda m: None)


def test_both_baselines_find_the_hazard_of_the_dense_area(surv, real_run):
    from lifelines.utils import concordance_index

    from slide_clip.survival import patient_folds

    folds = patient_folds(surv.pids, surv.event, 5, seed=0)
    truth = pd.DataFrame({"time": surv.time, "event": surv.event}, index=surv.pids)
    for b in ("coxnet", "abmil"):
        rep = real_run[b]
        d = surv.out / "survival" / b / "real"
        assert rep["overall"]["harrell"] >= 0.75, (b, rep["overall"])
        assert rep["overall"]["uno"] >= 0.7, (b, rep["overall"])
        risk = pd.read_csv(d / "risk.csv", dtype={"patient_id": str}).set_index("patient_id")
        assert sorted(risk.index) == surv.pids and risk["risk"].notna().all()
        np.testing.assert_array_equal(risk.loc[surv.pids, ["time", "event"]].to_numpy(),
                                      truth[["time", "event"]].to_numpy())
        assert risk["fold"].to_dict() == folds
        # the report's c-index is the c-index of risk.csv (an independent implementation)
        assert rep["overall"]["harrell"] == pytest.approx(
            concordance_index(risk["time"], -risk["risk"], risk["event"]), abs=1e-12)
        lo, hi = rep["overall"]["harrell_ci"]["low"], rep["overall"]["harrell_ci"]["high"]
        assert lo < rep["overall"]["harrell"] < hi
        # groups: split at each fold's training median
        for f in rep["folds"]:
            part = risk[risk["fold"] == f["fold"]]
            assert ((part["risk"] > f["train_median_risk"]) == (part["group"] == "high")).all()
        assert rep["km"]["logrank_p"] < 0.05
        on_disk = json.loads((d / "report.json").read_text())
        assert on_disk["data"]["data_hash"] == rep["data"]["data_hash"] and len(on_disk["folds"]) == 5
        assert {"scikit-survival", "torch"} <= set(on_disk["versions"])
        assert (d / "km.png").stat().st_size > 1000
        assert sorted(p.name for p in (d / "models").iterdir()) == [
            f"fold{k}.{'pkl' if b == 'coxnet' else 'pt'}" for k in range(5)]
    assert (surv.out / "tables" / "tiny" / "patients.parquet").is_file()


def test_abmil_heatmaps_and_gallery(surv, real_run):
    from PIL import Image

    d = surv.out / "survival" / "abmil" / "real"
    pics = real_run["abmil"]["abmil"]["pictures"]
    risk = pd.read_csv(d / "risk.csv", dtype={"patient_id": str}).sort_values("risk")
    extremes = [*risk["patient_id"][:3], *risk["patient_id"][-3:]]  # the gallery's patients
    slides = sorted(s for s, p in surv.patient_of.items() if p in extremes)
    assert sorted(pics["heatmaps"]) == sorted(str(d / "heatmaps" / f"{s}_{k}.png") for s in slides
                                              for k in ("attention", "tile_risk"))
    assert "gallery_error" not in pics
    img = np.asarray(Image.open(d / "heatmaps" / f"{slides[0]}_attention.png").convert("RGB"))
    assert img.shape[0] > 100 and img.std() > 5
    g = Image.open(d / "top_tiles.png")
    assert g.size[0] > 400 and g.size[1] > 400
    # the fold model of a patient explains its risk: attention sums to one over its bag
    import torch

    from slide_clip.survival import BagDataset, open_cohort
    from slide_clip.survival.abmil import ABMILModel, ABMILSettings, _build

    risk = risk.set_index("patient_id")
    state = torch.load(d / "models" / f"fold{int(risk.loc['P07', 'fold'])}.pt", weights_only=False)
    s = ABMILSettings(**state["settings"])
    net = _build(len(state["mean"]), s)
    net.load_state_dict(state["state_dict"])
    m = ABMILModel(net, state["mean"], state["scale"], s, "cpu")
    ds = BagDataset(open_cohort(surv.out), "patient", ids=["P07"], as_torch=False)
    r, a, _ = m.predict_bag(ds[0]["features"])
    assert a.sum() == pytest.approx(1.0, abs=1e-5) and r == pytest.approx(risk.loc["P07", "risk"], abs=1e-5)


def test_permuted_times_give_chance_concordance(surv):
    from slide_clip.survival import run_survival

    rng = np.random.default_rng(2024)
    perm = surv.base / "clinical_permuted.csv"
    df = pd.read_csv(surv.clinical, dtype={"patient_id": str})
    p = rng.permutation(len(df))
    df[["os_months", "dead"]] = df[["os_months", "dead"]].to_numpy()[p]
    df.to_csv(perm, index=False)
    reps = run_survival(surv.out, perm, "os_months", "dead",
                        settings=_fast(name="permuted", heatmaps="none", gallery_patients=0), log=lambda m: None)
    for b, rep in reps.items():
        assert abs(rep["overall"]["harrell"] - 0.5) <= 0.1, (b, rep["overall"])


# ----------------------------------------------------------------------------- command line and flows
def test_cli_survival_and_bags(surv, tmp_path):
    from typer.testing import CliRunner

    from slide_clip.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["survival", str(surv.out), "--clinical", str(surv.clinical), "--time", "os_months",
                            "--event", "dead", "--baseline", "coxnet", "--folds", "3", "--bootstrap", "20",
                            "--name", "cli", "--covariate", "age"])
    assert r.exit_code == 0, r.output
    rep = json.loads((surv.out / "survival" / "coxnet" / "cli" / "report.json").read_text())
    assert rep["settings"]["folds"] == 3 and rep["settings"]["covariates"] == ["age"]
    assert "age" in rep["coxnet"]["features"] or rep["coxnet"]["n_features"] > 32
    r = runner.invoke(app, ["survival", str(surv.out), "--clinical", str(surv.clinical), "--time", "months",
                            "--event", "dead"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "no time column 'months'" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["bags", str(surv.out), "--h5", str(tmp_path / "bags"), "--level", "patient"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "bags").glob("*.h5"))) == N_PATIENTS


@pytest.mark.usefixtures("prefect_harness")
def test_cohort_flow_runs_the_survival_flow_with_a_clinical_table(surv, tmp_path):
    """The cohort flow on 12 patients' slides (stores copied in: nothing is re-encoded), then
    the survival flow it starts, with its metrics artifact."""
    import shutil

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from slide_clip_flows.process_cohort import process_cohort

    out = tmp_path / "out"
    keep = [s for s in surv.slides if s.patient_id in set(surv.pids[:12])]
    for s in keep:  # every product of embedding (store and QC picture): nothing left to do
        shutil.copytree(surv.out / f"{s.slide_id}.zarr", out / f"{s.slide_id}.zarr")
        shutil.copy(surv.out / f"{s.slide_id}_qc.png", out / f"{s.slide_id}_qc.png")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,patient_id\n" + "".join(f"{s.path},{s.patient_id}\n" for s in keep))
    clinical = tmp_path / "clinical.csv"
    df = pd.read_csv(surv.clinical, dtype={"patient_id": str})
    df[df["patient_id"].isin(surv.pids[:12])].to_csv(clinical, index=False)
    r = process_cohort(slides=[str(manifest)], out=str(out), config=surv.cfg, prompts=[], max_concurrency=2,
                       survival={"clinical": str(clinical), "time": "os_months", "event": "dead",
                                 "baselines": ["coxnet"], "folds": 3, "settings": {"n_boot": 20}})
    assert r["failed"] == 0 and {s["status"] for s in r["slides"]} == {"skipped"}
    assert (out / "patients.csv").is_file()
    rep = json.loads(Path(r["survival"]["coxnet"]["report"]).read_text())
    assert rep["data"]["n_patients"] == 12 and rep["data"]["n_slides"] == len(keep)
    assert r["survival"]["coxnet"]["overall"] == rep["overall"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["survival-metrics"])))
    assert arts and "Harrell" in arts[-1].data and "coxnet" in arts[-1].data
