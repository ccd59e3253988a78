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
    check("patient_id,t,e\n", "has no rows .only the header: patient_id, t, e.")
    check("", "is empty: no header and no rows")
    check("patient_id;t;e\nA;1;1\n", "is semicolon .;.-separated .* slide-clip reads comma-separated")
    check("patient_id\tt\te\nA\t1\t1\n", "is tab-separated")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("patient_id,t,e,name\nA,1,1,Jos\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text .byte 0xe9.*Save it as UTF-8") as e:
        read_clinical(latin, "t", "e")
    assert str(e.value).startswith(str(latin)) and "\n" not in str(e.value)
    ok = tmp_path / "ok.csv"
    ok.write_text("patient_id,t,e\nA,1,true\nB,2.5,False\nC,3,1\n")
    c = read_clinical(ok, "t", "e")
    assert c.table["event"].tolist() == [1, 0, 1] and c.table["time"].tolist() == [1.0, 2.5, 3.0]
    with pytest.raises(ConfigError, match="slide 's2' .patient 'D'. have no patient row|have no patient row"):
        join_cohort(c, {"s1": "A", "s2": "D", "s3": "B", "s4": "C"})
    with pytest.raises(ConfigError, match="patient.s. have no slide .* 'C'.*--allow-missing"):
        join_cohort(c, {"s1": "A", "s3": "B"})
    assert join_cohort(c, {"s1": "A", "s3": "B"}, allow_missing=True) == ({"A": ["s1"], "B": ["s3"]}, ["C"])
    assert join_cohort(c, {"s1": "A", "s2": "A", "s3": "B", "s4": "C"}) == ({"A": ["s1", "s2"], "B": ["s3"],
                                                                            "C": ["s4"]}, [])


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
            col = f"tumour__{metric}__{cls.replace('-', '_')}"  # letters, digits and _ (FORMAT.md)
            assert slides.loc["s05_1", col] == pytest.approx(v, rel=1e-6)


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


def _saved_model_risks(b: str, d: Path, patients: list[str], bags) -> dict[int, dict[str, float]]:
    """Per fold, the risk of every patient from the fold model loaded from its file (JSON or
    safetensors: no pickle)."""
    out = {}
    for f in range(5):
        if b == "coxnet":
            from slide_clip.survival.coxnet import CoxNetModel

            text = (d / "models" / f"fold{f}.json").read_text()
            assert text.lstrip().startswith("{")  # plain JSON
            table = pd.read_parquet(d / "features.parquet").set_index("patient_id")
            risk = CoxNetModel.load(d / "models" / f"fold{f}.json").risk(table.loc[patients])
        else:
            from slide_clip.survival.abmil import load_abmil

            m = load_abmil(d / "models" / f"fold{f}.safetensors")
            risk = [m.predict_bag(bags[bags.ids.index(p)]["features"])[0] for p in patients]
        out[f] = dict(zip(patients, np.asarray(risk, np.float64)))
    return out


def test_both_baselines_find_the_hazard_of_the_dense_area(surv, real_run):
    """The headline is the mean ± SD of the per-fold c-index; the pooled c-index is over risks
    standardised on each fold's training risks; both recomputed here from risk.csv and from the
    fold models loaded from their files (which give the very risks of risk.csv)."""
    from lifelines.utils import concordance_index

    from slide_clip.survival import patient_folds

    from slide_clip.survival import BagDataset, open_cohort

    folds = patient_folds(surv.pids, surv.event, 5, seed=0)
    truth = pd.DataFrame({"time": surv.time, "event": surv.event}, index=surv.pids)
    bags = BagDataset(open_cohort(surv.out), "patient", as_torch=False, cache_mb=256)
    for b in ("coxnet", "abmil"):
        rep = real_run[b]
        d = surv.out / "survival" / b / "real"
        saved = _saved_model_risks(b, d, surv.pids, bags)
        h = rep["headline"]["harrell"]
        assert h["mean"] >= 0.75 and rep["headline"]["uno"]["mean"] >= 0.7, (b, rep["headline"])
        risk = pd.read_csv(d / "risk.csv", dtype={"patient_id": str}, float_precision="round_trip")
        risk = risk.set_index("patient_id")
        assert sorted(risk.index) == surv.pids and risk["risk"].notna().all()
        np.testing.assert_array_equal(risk.loc[surv.pids, ["time", "event"]].to_numpy(),
                                      truth[["time", "event"]].to_numpy())
        assert risk["fold"].to_dict() == folds
        # headline: each fold's c-index of risk.csv (an independent implementation), their mean and SD
        per_fold, z = [], pd.Series(np.nan, index=risk.index)
        for f in range(5):
            test = risk[risk["fold"] == f]
            train_ids = sorted(risk.index[risk["fold"] != f])
            per_fold.append(concordance_index(test["time"], -test["risk"], test["event"]))
            # the fold model, loaded from its file, gives exactly the risks of risk.csv
            np.testing.assert_array_equal([saved[f][p] for p in test.index], test["risk"].to_numpy())
            train_risk = np.array([saved[f][p] for p in train_ids])
            z[test.index] = (test["risk"] - train_risk.mean()) / train_risk.std()
            fr = rep["folds"][f]
            assert fr["events"] == int(test["event"].sum()) and fr["n"] == len(test)
            assert fr["train_median_risk"] == pytest.approx(np.median(train_risk), abs=1e-9)
            # groups: split at the fold's training median
            assert ((test["risk"] > np.median(train_risk)) == (test["group"] == "high")).all()
        assert h["folds"] == pytest.approx(per_fold, abs=1e-12)
        assert h["mean"] == pytest.approx(np.mean(per_fold), abs=1e-12)
        assert h["sd"] == pytest.approx(np.std(per_fold, ddof=1), abs=1e-12)
        assert h["ci"]["low"] < h["mean"] < h["ci"]["high"] and h["ci"]["n_valid"] > 50
        np.testing.assert_allclose(risk["risk_z"], z, atol=1e-9)
        pooled = rep["pooled"]
        assert pooled["harrell"] == pytest.approx(concordance_index(risk["time"], -z, risk["event"]), abs=1e-12)
        assert pooled["harrell_ci"]["low"] < pooled["harrell"] < pooled["harrell_ci"]["high"]
        assert rep["km"]["logrank_p"] < 0.05
        on_disk = json.loads((d / "report.json").read_text())
        assert on_disk["data"]["data_hash"] == rep["data"]["data_hash"] and len(on_disk["folds"]) == 5
        assert on_disk["data"]["events_per_fold"] == [f["events"] for f in rep["folds"]]
        assert {"scikit-survival", "torch"} <= set(on_disk["versions"])
        assert (d / "km.png").stat().st_size > 1000
        assert sorted(p.name for p in (d / "models").iterdir()) == [
            f"fold{k}.{'json' if b == 'coxnet' else 'safetensors'}" for k in range(5)]
        # 60 patients: too few events for the intervals and p-values to be trusted, and it says so
        assert "small cohort" in rep["small_cohort"]["warning"] and rep["small_cohort"]["events"] == sum(surv.event)
    # coxnet's inputs are exactly what its options name: here the mean embedding only
    feats = real_run["coxnet"]["features"]
    assert feats["columns"] == [f"emb_mean_{j}" for j in range(32)] and feats["score_sets"] == []
    assert list(pd.read_parquet(surv.out / "survival" / "coxnet" / "real" / "features.parquet").columns) == [
        "patient_id", *feats["columns"]]


def test_abmil_heatmaps_and_gallery(surv, real_run):
    from PIL import Image

    d = surv.out / "survival" / "abmil" / "real"
    pics = real_run["abmil"]["abmil"]["pictures"]
    risk = pd.read_csv(d / "risk.csv", dtype={"patient_id": str}).sort_values("risk")
    extremes = [*risk["patient_id"][:3], *risk["patient_id"][-3:]]  # the gallery's patients
    slides = sorted(s for s, p in surv.patient_of.items() if p in extremes)
    # paths relative to the run folder (the folder is written aside and moved into place)
    assert sorted(pics["heatmaps"]) == sorted(f"heatmaps/{s}_{k}.png" for s in slides
                                              for k in ("attention", "tile_risk"))
    assert "gallery_error" not in pics and pics["gallery"] == "top_tiles.png"
    img = np.asarray(Image.open(d / "heatmaps" / f"{slides[0]}_attention.png").convert("RGB"))
    assert img.shape[0] > 100 and img.std() > 5
    g = Image.open(d / "top_tiles.png")
    assert g.size[0] > 400 and g.size[1] > 400
    # the fold model of a patient explains its risk: attention sums to one over its bag
    from slide_clip.survival import BagDataset, open_cohort
    from slide_clip.survival.abmil import load_abmil

    risk = risk.set_index("patient_id")
    m = load_abmil(d / "models" / f"fold{int(risk.loc['P07', 'fold'])}.safetensors")
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
        assert abs(rep["headline"]["harrell"]["mean"] - 0.5) <= 0.1, (b, rep["headline"])
        assert abs(rep["pooled"]["harrell"] - 0.5) <= 0.1, (b, rep["pooled"])


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
    assert rep["run"] == "cli"  # the run's name, not the partial folder it was written in
    assert rep["settings"]["folds"] == 3 and rep["settings"]["covariates"] == ["age"]
    assert rep["features"]["columns"] == [f"emb_mean_{j}" for j in range(32)] + ["age"]
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
    assert r["survival"]["coxnet"]["headline"] == rep["headline"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["survival-metrics"])))
    assert arts and "Harrell" in arts[-1].data and "coxnet" in arts[-1].data


# ----------------------------------------------------------------------------- statistics (issue 19)
def test_headline_and_pooled_c_never_mix_the_scales_of_fold_models():
    """Five fold models that order their own test patients perfectly, on risk scales 20x apart
    and shifted: each fold's C is 1, so the headline is 1 ± 0 and every within-fold bootstrap
    resample gives 1; pooling the raw risks would mix the scales (C well below 1); the pooled
    C is computed on risks standardised by each fold's training risks."""
    from lifelines.utils import concordance_index

    from slide_clip.survival.validation import FoldData, cv_concordance

    rng = np.random.default_rng(0)
    folds, raw = [], []
    for f, (scale, shift) in enumerate([(0.075, 3.0), (1.5, -2.0), (0.3, 0.5), (1.0, 1.0), (0.1, -1.0)]):
        t, tt = rng.uniform(1, 100, 12), rng.uniform(1, 100, 48)
        e, te = (rng.uniform(size=12) < 0.7).astype(int), (rng.uniform(size=48) < 0.7).astype(int)
        e[0] = 1
        folds.append(FoldData(f, t, e, shift - scale * t / 10, tt, te, shift - scale * tt / 10))
        raw.append((t, e, shift - scale * t / 10, (shift - scale * t / 10 - (shift - scale * tt / 10).mean())
                    / (shift - scale * tt / 10).std()))
    m = cv_concordance(folds, n_boot=60, seed=1)
    h = m["headline"]["harrell"]
    assert h["folds"] == [1.0] * 5 and h["mean"] == 1.0 and h["sd"] == 0.0
    assert h["ci"]["low"] == 1.0 and h["ci"]["high"] == 1.0 and h["ci"]["n_valid"] == 60
    t, e, r, z = (np.concatenate(x) for x in zip(*raw))
    pooled_raw = concordance_index(t, -r, e)
    assert m["pooled"]["harrell"] == pytest.approx(concordance_index(t, -z, e), abs=1e-12)
    assert m["pooled"]["harrell"] > 0.95 and pooled_raw < 0.8  # the raw pool mixes the scales
    assert m["pooled"]["harrell_ci"]["low"] <= m["pooled"]["harrell"] <= m["pooled"]["harrell_ci"]["high"]
    assert [f["events"] for f in m["folds"]] == [int(f.event.sum()) for f in folds]


def test_small_cohort_rule_and_p_values_in_scientific_notation(real_run):
    from slide_clip.survival.metrics import format_p
    from slide_clip.survival.report import console_lines, metrics_markdown
    from slide_clip.survival.validation import MIN_EVENTS, MIN_EVENTS_PER_FOLD, small_cohort

    assert small_cohort(400, [MIN_EVENTS_PER_FOLD + 20] * 5)["warning"] is None
    few = small_cohort(400, [MIN_EVENTS_PER_FOLD - 1] + [40] * 4)["warning"]
    assert f"{MIN_EVENTS_PER_FOLD - 1} events in the smallest test fold" in few
    assert f"fewer than {MIN_EVENTS}" in small_cohort(60, [8] * 5)["warning"]
    assert (format_p(1.18e-10), format_p(4e-4), format_p(0.0123), format_p(None)) == ("1.18e-10", "4.00e-04",
                                                                                       "0.012", "n/a")
    rep = {**real_run["coxnet"], "km": {**real_run["coxnet"]["km"], "logrank_p": 1.18e-10}}
    lines = console_lines(rep, "somewhere")
    text = "\n".join(lines) + metrics_markdown({"coxnet": rep})
    assert "log-rank p 1.18e-10" in lines[3] and "p 0.000" not in text
    assert "log-rank p (out-of-fold high vs low risk) 1.18e-10" in metrics_markdown({"coxnet": rep})
    h = rep["headline"]["harrell"]
    assert lines[0].startswith(f"coxnet: Harrell's C {h['mean']:.3f} ± {h['sd']:.3f} (95% CI {h['ci']['low']:.3f}–")
    assert any(line.startswith("coxnet:   warning: small cohort: ") for line in lines)
    assert "**coxnet: warning:** small cohort" in metrics_markdown({"coxnet": rep})


def test_inner_cv_standardises_within_each_inner_fold():
    """The penalty search scores each inner fold with a scaler fitted on that fold's own
    training part (a Pipeline of StandardScaler and the Cox model), recomputed here."""
    from lifelines.utils import concordance_index
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.util import Surv

    from slide_clip.survival import patient_folds
    from slide_clip.survival.coxnet import fit_coxnet

    rng = np.random.default_rng(4)
    n = 45
    X = rng.normal(size=(n, 6))
    X[:4, 1] += 40.0  # a few extreme patients: the scale depends on who is in the fit
    X[:, 2] = np.exp(2 * X[:, 2])
    T = rng.exponential(1 / np.exp(0.8 * X[:, 0] + 0.5 * X[:, 3]))
    C = rng.uniform(0, 3, n)
    t, e = np.minimum(T, C), (T <= C).astype(int)
    cols = [f"x{j}" for j in range(6)]
    m = fit_coxnet(pd.DataFrame(X, columns=cols), t, e, cols, seed=7)
    alphas = m.inner_scores["alphas"]
    k = m.inner_scores["inner_folds"]
    inner = patient_folds([str(i) for i in range(n)], e, k=k, seed=8)
    fold = np.array([inner[str(i)] for i in range(n)])
    scores = np.zeros((k, len(alphas)))
    for f in range(k):
        tr, va = fold != f, fold == f
        pipe = make_pipeline(StandardScaler(), CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=alphas, max_iter=100000))
        pipe.fit(X[tr], Surv.from_arrays(e[tr].astype(bool), t[tr]))
        for j, a in enumerate(alphas):
            scores[f, j] = concordance_index(t[va], -pipe[-1].predict(pipe[0].transform(X[va]), alpha=a), e[va])
    np.testing.assert_allclose(m.inner_scores["inner_c"], scores.mean(0), atol=1e-9)
    # the final model: scaled by all training patients, risk = z . coef - offset
    np.testing.assert_allclose(m.mean, X.mean(0))
    np.testing.assert_allclose(m.scale, X.std(0))


def _subset(surv, dest: Path, n_patients: int = 18) -> SimpleNamespace:
    """Copies of the first ``n_patients`` patients' stores (with out/patients.csv), their
    clinical rows and a manifest of their slides."""
    import shutil

    from slide_clip.manifest import record_patients

    pids = surv.pids[:n_patients]
    keep = [s for s in surv.slides if s.patient_id in set(pids)]
    out = dest / "out"
    for s in keep:
        shutil.copytree(surv.out / f"{s.slide_id}.zarr", out / f"{s.slide_id}.zarr")
    record_patients(out, keep)
    clinical = dest / "clinical.csv"
    df = pd.read_csv(surv.clinical, dtype={"patient_id": str})
    df[df["patient_id"].isin(pids)].to_csv(clinical, index=False)
    manifest = dest / "manifest.csv"
    manifest.write_text("path,patient_id\n" + "".join(f"{s.path},{s.patient_id}\n" for s in keep))
    return SimpleNamespace(out=out, clinical=clinical, manifest=manifest, slides=keep, pids=pids)


def _coxnet(**kw):
    return _fast(**{"baselines": ("coxnet",), "folds": 3, "n_boot": 20, **kw})


def test_permutation_test_reruns_the_whole_cross_validation(surv, tmp_path):
    from slide_clip.survival import run_survival

    sub = _subset(surv, tmp_path)
    lines = []
    rep = run_survival(sub.out, sub.clinical, "os_months", "dead", settings=_coxnet(permutations=6, name="perm"),
                       log=lines.append)["coxnet"]
    perm, obs = rep["permutation"], rep["headline"]["harrell"]["mean"]
    assert perm["n"] == 6 and len(perm["null"]) == 6 and perm["observed"] == obs
    assert perm["p"] == pytest.approx((1 + sum(v >= obs for v in perm["null"])) / 7)
    assert len(set(perm["null"])) == 6 and 0.25 < np.mean(perm["null"]) < 0.75  # refitted: chance, varying
    assert perm["p"] <= 2 / 7  # the signal beats its permutations
    assert any("permutation p " in line for line in lines)


# ----------------------------------------------------------------------------- inputs (issue 20)
def test_manifest_rows_match_stores_by_the_pipelines_ids_not_by_file_name(surv, tmp_path):
    """a/x.tif and b/x.tif are two slides: with only a/x embedded (store x), b/x has no store;
    with both embedded together (a__x, b__x) each row finds its own; a moved folder is
    matched by fingerprint."""
    import shutil

    from slide_clip.pipeline import embed_slides
    from slide_clip.survival import open_cohort

    src = [s.path for s in surv.slides[:2]]
    for d, p in zip("ab", src):
        (tmp_path / d).mkdir()
        shutil.copy(p, tmp_path / d / "x.tif")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,patient_id\n{tmp_path / 'a' / 'x.tif'},P00\n{tmp_path / 'b' / 'x.tif'},P01\n")
    one, both = tmp_path / "one", tmp_path / "both"
    assert [r.status for r in embed_slides([tmp_path / "a" / "x.tif"], one, surv.cfg, progress=False)] == ["ok"]
    assert [r.name for r in embed_slides([tmp_path / "a" / "x.tif", tmp_path / "b" / "x.tif"], both, surv.cfg,
                                         progress=False)] == ["a__x", "b__x"]
    with pytest.raises(ConfigError, match=f"slide {tmp_path / 'b' / 'x.tif'} cannot be used: no store b__x.zarr") as e:
        open_cohort(one, manifest=manifest)
    assert str(e.value).startswith(str(manifest)) and "--allow-missing" in str(e.value)
    c = open_cohort(one, manifest=manifest, allow_missing=True)
    assert c.patients == {"P00": ["x"]}
    assert [(d["slide"], d["slide_id"]) for d in c.dropped] == [(str(tmp_path / "b" / "x.tif"), "b__x")]
    assert open_cohort(both, manifest=manifest).patients == {"P00": ["a__x"], "P01": ["b__x"]}
    # the slides moved to another folder: the stores' recorded paths are gone, fingerprints match
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(tmp_path / "a", moved / "a")
    shutil.move(tmp_path / "b", moved / "b")
    m2 = tmp_path / "m2.csv"
    m2.write_text(f"path,patient_id\n{moved / 'a' / 'x.tif'},P00\n{moved / 'b' / 'x.tif'},P01\n")
    assert open_cohort(both, manifest=m2).patients == {"P00": ["a__x"], "P01": ["b__x"]}
    # the manifest names b's file for a's store's id: another slide, never matched by its name
    shutil.copy(src[1], moved / "x.tif")
    m3 = tmp_path / "m3.csv"
    m3.write_text(f"path,patient_id\n{moved / 'x.tif'},P01\n")
    with pytest.raises(ConfigError, match="store x.zarr holds another slide"):
        open_cohort(one, manifest=m3)


def test_a_listed_slide_without_a_store_stops_the_run_or_is_listed(surv, tmp_path):
    import shutil

    from slide_clip.survival import run_survival

    sub = _subset(surv, tmp_path, 16)
    gone = sub.slides[3]  # a listed slide whose store is missing, e.g. after a failed embed
    shutil.rmtree(sub.out / f"{gone.slide_id}.zarr")
    (sub.out / "status").mkdir()
    (sub.out / "status" / f"{gone.slide_id}.json").write_text(json.dumps(
        {"name": gone.slide_id, "status": "failed", "error": "the disk was full"}))
    for listing in (sub.manifest, None):  # the manifest, or out/patients.csv recorded by the cohort flow
        with pytest.raises(ConfigError) as e:
            run_survival(sub.out, sub.clinical, "os_months", "dead", manifest=listing, settings=_coxnet(),
                         log=lambda m: None)
        text = str(e.value)
        assert f"{gone.path if listing else gone.slide_id} cannot be used: no store: its embedding failed (the disk " \
               "was full)" in text and "--allow-missing" in text and "\n" not in text
        assert text.startswith(str(sub.manifest if listing else sub.out / "patients.csv"))
    lines = []
    rep = run_survival(sub.out, sub.clinical, "os_months", "dead", manifest=sub.manifest,
                       settings=_coxnet(allow_missing=True, name="dropping"), log=lines.append)["coxnet"]
    alone = sum(s.patient_id == gone.patient_id for s in sub.slides) == 1
    assert [d["slide"] for d in rep["data"]["dropped_slides"]] == [gone.path]
    assert rep["data"]["dropped_patients"] == ([gone.patient_id] if alone else [])
    assert rep["data"]["n_slides"] == len(sub.slides) - 1
    assert any(line.startswith(f"left out (--allow-missing): slide {gone.path}: no store") for line in lines)


def test_coxnet_features_are_exactly_what_the_options_name(surv, tmp_path):
    """Clustering the stores adds a score set; the default model's inputs, data hash and risks
    do not change. Named score sets are added, recorded in full and hashed."""
    from slide_clip.errors import StoreError
    from slide_clip.explore.clusters import cluster
    from slide_clip.survival import run_survival

    sub = _subset(surv, tmp_path, 16)

    def run(name, **kw):
        return run_survival(sub.out, sub.clinical, "os_months", "dead", settings=_coxnet(name=name, **kw),
                            log=lambda m: None)["coxnet"]

    before = run("a")
    cluster([sub.out], k=3, maps=False, gallery=False)
    after = run("b")
    emb = [f"emb_mean_{j}" for j in range(32)]
    assert before["features"]["columns"] == after["features"]["columns"] == emb
    assert before["data"]["data_hash"] == after["data"]["data_hash"]
    a = pd.read_csv(sub.out / "survival" / "coxnet" / "a" / "risk.csv")
    b = pd.read_csv(sub.out / "survival" / "coxnet" / "b" / "risk.csv")
    pd.testing.assert_frame_equal(a, b)
    named = run("c", score_sets=("tumour", "clusters-k3"))
    tumour = [f"tumour__{m}__{c}" for m in ("slide_prob", "mean_prob", "area_fraction") for c in ("tumour", "non_tumour")]
    clusters = [f"clusters_k3__{m}__cluster_{i}" for m in ("slide_prob", "mean_prob", "area_fraction") for i in range(3)]
    assert sorted(named["features"]["columns"]) == sorted(emb + tumour + clusters)
    assert named["features"]["score_sets"] == ["tumour", "clusters-k3"]
    assert named["data"]["data_hash"] != before["data"]["data_hash"]
    with pytest.raises(StoreError, match="has no score set 'nosuch'"):
        run("d", score_sets=("nosuch",))


def test_outcomes_without_order_are_one_line_errors(surv, tmp_path):
    from slide_clip.survival import run_survival

    sub = _subset(surv, tmp_path, 12)
    df = pd.read_csv(sub.clinical, dtype={"patient_id": str})
    same = tmp_path / "same.csv"
    df.assign(os_months=7.0).to_csv(same, index=False)
    with pytest.raises(ConfigError, match="every patient of the cohort has the same follow-up time .7 in 'os_months'"):
        run_survival(sub.out, same, "os_months", "dead", settings=_coxnet(), log=lambda m: None)


# ----------------------------------------------------------------------------- faults (issue 20)
# Kept here rather than in test_faults.py: they reuse this module's embedded cohort (copies of
# its stores), which takes minutes to build.
def _cli(*args, timeout=600):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "slide_clip.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _survival_args(sub, *extra):
    return ["survival", sub.out, "--clinical", sub.clinical, "--time", "os_months", "--event", "dead", "-b", "coxnet",
            "--folds", "3", "--bootstrap", "20", *extra]


def _run_files(d: Path) -> dict[str, bytes]:
    """A run folder's files (report.json without its timing fields)."""
    files = {}
    for f in sorted(d.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            if f.name == "report.json":
                r = json.loads(data)
                for k in ("created", "seconds", "run"):
                    r.pop(k)
                r["settings"].pop("name")
                data = json.dumps(r, sort_keys=True).encode()
            files[str(f.relative_to(d))] = data
    return files


def test_kill_9_during_a_rerun_of_the_same_name_never_leaves_a_mixed_folder(surv, tmp_path):
    """`slide-clip survival --name R` killed with SIGKILL while rerunning with other settings
    (after its first fold model, then after its risk table): R is still the previous complete
    run, file for file; the next rerun equals an uninterrupted run of the new settings."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from slide_clip.survival import SurvivalSettings, run_survival

    sub = _subset(surv, tmp_path, 16)

    def in_process(name, seed):  # the settings the command line below makes
        s = SurvivalSettings(baselines=("coxnet",), folds=3, seed=seed, name=name, n_boot=20)
        run_survival(sub.out, sub.clinical, "os_months", "dead", settings=s, log=lambda m: None)

    parent = sub.out / "survival" / "coxnet"
    in_process("R", 0)
    old = _run_files(parent / "R")
    in_process("ref", 1)  # the uninterrupted run of the new settings
    for target in ("models/fold0.json", "risk.csv"):
        proc = subprocess.Popen([sys.executable, "-m", "slide_clip.cli",
                                 *map(str, _survival_args(sub, "--name", "R", "--seed", "1"))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while not list(parent.glob(f".R.partial-*/{target}")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        alive = proc.poll() is None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert alive, f"the run ended before the kill at {target}"
        assert list(parent.glob(".R.partial-*")), "killed before its partial folder was written"
        assert _run_files(parent / "R") == old  # the previous run, whole and alone
    in_process("R", 1)
    assert _run_files(parent / "R") == _run_files(parent / "ref")
    assert sorted(p.name for p in parent.iterdir()) == ["R", "ref"]  # the killed runs' partial folders are gone


def _mounted_tmpfs(where: Path, options: str):
    from test_faults import _mounted_tmpfs as mount

    return mount(where, options)


def test_full_disk_during_survival_is_one_line_and_keeps_the_previous_run(surv, tmp_path):
    import os
    import shutil

    from slide_clip.errors import OutputError
    from slide_clip.survival import run_survival

    sub = _subset(surv, tmp_path, 12)
    need = sum(f.stat().st_size for f in sub.out.rglob("*") if f.is_file())
    with _mounted_tmpfs(tmp_path / "small", f"size={(need + (4 << 20)) // 4096 * 4096}") as disk:
        out = disk / "out"
        shutil.copytree(sub.out, out)
        run = lambda seed: run_survival(out, sub.clinical, "os_months", "dead",  # noqa: E731
                                        settings=_coxnet(name="R", seed=seed), log=lambda m: None)
        run(0)
        previous = _run_files(out / "survival" / "coxnet" / "R")
        failures = 0
        for left in (2 << 10, 24 << 10, 60 << 10):
            filler = disk / "filler"
            st = os.statvfs(disk)
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - left))
            try:
                run(1)
            except OutputError as e:
                failures += 1
                text = str(e)
                assert "cannot write: no space left on the device" in text and str(out / "survival") in text
                assert "\n" not in text and "run the same command again" in text
            filler.unlink()
            assert _run_files(out / "survival" / "coxnet" / "R") == previous  # untouched
            assert not list((out / "survival" / "coxnet").glob(".*"))  # no partial folder left
        assert failures >= 2, "the disk never filled up"
        run(1)  # space again: the same command finishes
        ref = run_survival(sub.out, sub.clinical, "os_months", "dead", settings=_coxnet(name="R", seed=1),
                           log=lambda m: None)
        assert ref["coxnet"]["headline"] == json.loads((out / "survival/coxnet/R/report.json").read_text())["headline"]


def test_read_only_out_and_damaged_stores_are_one_line_errors(surv, tmp_path):
    import shutil
    import subprocess

    sub = _subset(surv, tmp_path, 12)
    with _mounted_tmpfs(tmp_path / "ro", "size=64m") as ro:
        shutil.copytree(sub.out, ro / "out")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        ro_sub = SimpleNamespace(**{**vars(sub), "out": ro / "out"})
        r = _cli(*_survival_args(ro_sub))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip() == (f"error: {ro / 'out' / 'survival'}: cannot write: the file system is read-only. "
                                    "survival writes its results under OUT/survival/: make OUT writable, or copy the "
                                    "stores to a writable folder and run there.")
    # a damaged store (a chunk file lost): the store's own one-line error, never a traceback
    victim = sub.out / f"{sub.slides[2].slide_id}.zarr"
    next((victim / "embeddings").rglob("c/0/0")).unlink()
    r = _cli(*_survival_args(sub))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {victim}"), r.stderr


def test_km_plot_has_a_numbers_at_risk_table_and_the_random_weights_note(tmp_path):
    """The KM picture carries the patients at risk of each group at its time ticks (counted here
    independently), and says so when the embeddings came from random weights."""
    from PIL import Image

    from slide_clip.pictures import RANDOM_WEIGHTS_NOTE, png_title
    from slide_clip.survival.metrics import km_plot

    rng = np.random.default_rng(3)
    t = rng.uniform(1, 60, 40).round(1)
    e = rng.random(40) < 0.6
    high = np.arange(40) % 2 == 0
    r = km_plot(t, e, high, tmp_path / "km.png", "test", "os_months", random_weights=True)
    at = r["at_risk"]
    assert at["times"][0] == 0 and at["times"] == sorted(at["times"]) and max(at["times"]) <= t.max()
    for name, mask in (("high risk", high), ("low risk", ~high)):
        assert at[name] == [int(((t >= x) & mask).sum()) for x in at["times"]]
    assert at["high risk"][0] == 20 and at["low risk"][0] == 20
    assert RANDOM_WEIGHTS_NOTE in png_title(tmp_path / "km.png")
    w, h = Image.open(tmp_path / "km.png").size
    assert h > 500  # the table is under the curves
    r = km_plot(t, e, high, tmp_path / "km2.png", "test", "os_months")
    assert RANDOM_WEIGHTS_NOTE not in png_title(tmp_path / "km2.png")

