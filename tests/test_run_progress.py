"""What `slide-clip run` shows while it works (slide_clip_flows.progress), read from a real
store being filled, as the run's progress thread reads it."""

import numpy as np

from slide_clip.store import SlideStore
from slide_clip_flows.progress import RunProgress

N, D = 300, 16


def _store_being_encoded(out, sid):
    rng = np.random.default_rng(0)
    st = SlideStore.create(out / f"{sid}.zarr", {"name": sid}, {"tile_size": 224})
    st.write_tissue(rng.random((40, 60)) > 0.5, rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), {"algorithm": 2})
    st.write_tiles(np.stack([np.arange(N) * 224, np.arange(N) % 7 * 224], 1).astype(np.int64),
                   np.stack([np.arange(N) // 20, np.arange(N) % 20], 1).astype(np.int32),
                   rng.random(N).astype(np.float32), {"n": N})
    return st.begin_embeddings({"name": "tiny", "embed_dim": D, "weights_sha256": "a" * 64}, chunk_rows=64)


def test_a_slide_encoding_is_shown_before_any_slide_has_finished(tmp_path):
    """A fresh output folder has no status/ until the first slide finishes; the slide being
    encoded is shown all the same (it was not: the look stopped at the missing folder, and the
    first slide of a cohort ran in silence)."""
    out = tmp_path / "out"
    out.mkdir()
    feats = np.random.default_rng(1).standard_normal((N, D)).astype(np.float32)
    w = _store_being_encoded(out, "s1")
    w.append(feats[:64])
    w.flush()
    lines = []
    progress = RunProgress(out, ["s1", "s2"], "tiny", lines.append, every=0.0)
    progress.look()
    assert not (out / "status").exists()
    assert lines == ["encoding s1: 300 tiles, 64 already written"]
    w.append(feats[64:128])
    w.flush()
    progress.look()
    assert lines[1] == "encoding s1: 128 of 300 tiles", lines  # its rate is timed from here
    shown = len(lines)
    progress.look()  # no rows written since: nothing new to say (it repeated the same counts)
    assert len(lines) == shown, lines[shown:]
    w.append(feats[128:192])
    w.flush()
    progress.look()
    assert lines[shown].startswith("encoding s1: 192 of 300 tiles ("), lines[shown:]


def test_a_slide_begun_early_gets_its_rate_from_its_first_rows(tmp_path, monkeypatch):
    """A slide's store is begun while the slide before it encodes: its tiles/s and time left
    are timed from its first rows written, not from when its empty store was first seen
    (which made a 2-minute slide "about 15 min left")."""
    import slide_clip_flows.progress as progress_module

    clock = [1000.0]
    monkeypatch.setattr(progress_module.time, "time", lambda: clock[0])
    out = tmp_path / "out"
    out.mkdir()
    feats = np.random.default_rng(1).standard_normal((N, D)).astype(np.float32)
    w = _store_being_encoded(out, "s2")
    lines = []
    progress = RunProgress(out, ["s2"], "tiny", lines.append, every=0.0)
    progress.look()  # seen, nothing written yet (the slide before it is encoding)
    clock[0] += 600
    w.append(feats[:64])
    w.flush()
    progress.look()  # its first rows: timing starts
    clock[0] += 60
    w.append(feats[64:128])
    w.flush()
    progress.look()  # 64 rows in 60 s
    said = [line for line in lines if line.startswith("encoding")]
    assert said == ["encoding s2: 300 tiles", "encoding s2: 64 of 300 tiles",
                    "encoding s2: 128 of 300 tiles (1.1 tiles/s, this slide about 3 min left)"], said
