"""Attention MIL (ABMIL, gated attention; Ilse et al. 2018) over patient bags, trained with the
Cox partial likelihood in torch, on the GPU when there is one.

A bag's tiles ``x_k`` (standardised embeddings) go through ``h_k = ReLU(W x_k)``; gated
attention ``a_k = softmax_k(w . (tanh(V h_k) * sigmoid(U h_k)))`` pools them into
``z = sum_k a_k h_k``, and the patient's risk (log relative hazard) is ``r = c . z + b``.
So ``r = sum_k a_k (c . h_k) + b``: ``c . h_k`` is the tile's risk and ``a_k (c . h_k)`` its
contribution to the patient's risk.

Training streams bags: patients are visited in shuffled mini-batches, and bags are read
from the stores when they are needed unless the whole training set fits in ``cache_mb``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from slide_clip.survival.bags import BagDataset, PatientCohort

MODEL_FORMAT = "slide-clip-abmil/1"


@dataclass(frozen=True)
class ABMILSettings:
    """Hyperparameters (fixed in advance, not tuned on the test folds)."""

    hidden: int = 64
    attention: int = 32
    dropout: float = 0.25
    epochs: int = 40
    batch_patients: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-3
    max_tiles: int = 2048  # tiles sampled per bag per training step (all tiles at prediction)
    cache_mb: float = 1024.0  # keep training bags in memory below this size, else re-read them
    device: str = "auto"
    cpu_threads: int | None = None  # torch threads while training on a CPU (None: torch's default)

    def to_dict(self) -> dict:
        return asdict(self)


def cox_loss(risk, time, event):
    """Negative Cox log partial likelihood (Breslow ties), mean over events.

    ``-(1/E) sum_{i: event} [r_i - log sum_{j: t_j >= t_i} exp(r_j)]``; 0 when no event.
    All arguments are 1-d torch tensors of the same length.
    """
    import torch

    t = time.detach().cpu().numpy()
    order = np.argsort(-t, kind="stable")  # descending time: risk sets are prefixes
    ts = t[order]
    # For ties, the risk set of i includes every j with t_j == t_i: the prefix up to the last tie.
    last = np.searchsorted(-ts, -ts, side="right") - 1
    idx = torch.as_tensor(order, device=risk.device)
    r = risk[idx]
    lse = torch.logcumsumexp(r, dim=0)[torch.as_tensor(last, device=risk.device)]
    e = event[idx].to(r.dtype)
    n_events = e.sum()
    if float(n_events) == 0:
        return (r * 0).sum()
    return -((r - lse) * e).sum() / n_events


def _build(d: int, s: ABMILSettings):
    import torch
    from torch import nn

    class GatedABMIL(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Sequential(nn.Linear(d, s.hidden), nn.ReLU(), nn.Dropout(s.dropout))
            self.att_v = nn.Linear(s.hidden, s.attention)
            self.att_u = nn.Linear(s.hidden, s.attention)
            self.att_w = nn.Linear(s.attention, 1)
            self.head = nn.Linear(s.hidden, 1)

        def forward(self, x, mask=None):
            """One bag ``x`` (n, d) -> (risk scalar, attention (n,), tile risk (n,)); or a padded
            batch (B, n, d) with ``mask`` (B, n) True on real tiles -> (B,), (B, n), (B, n)."""
            h = self.embed(x)
            logits = self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h))).squeeze(-1)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            a = torch.softmax(logits, dim=-1)
            tile_risk = self.head(h).squeeze(-1)
            bias = self.head.bias.squeeze()
            return (a * (tile_risk - bias)).sum(-1) + bias, a, tile_risk

    return GatedABMIL()


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ABMILModel:
    """A trained ABMIL model with the tile standardisation of its training patients."""

    def __init__(self, net, mean: np.ndarray, scale: np.ndarray, settings: ABMILSettings, device: str):
        self.net, self.mean, self.scale, self.settings, self.device = net, mean, scale, settings, device

    def _x(self, feats: np.ndarray):
        import torch

        return torch.from_numpy(((feats - self.mean) / self.scale).astype(np.float32)).to(self.device)

    def predict_bag(self, feats: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """(risk, attention (n,), tile risk (n,)) of one bag of raw embeddings (n, d), all tiles."""
        import torch

        self.net.eval()
        with torch.no_grad():
            r, a, tr = self.net(self._x(feats))
        return float(r), a.cpu().numpy().astype(np.float64), tr.cpu().numpy().astype(np.float64)

    def save(self, path: str | Path) -> Path:
        """Write the model as safetensors (no pickle): the network's tensors, the tile
        standardisation (``standardise.mean``, ``standardise.scale``) and, in the metadata,
        the format and the hyperparameters. :func:`load_abmil` reads it back."""
        import torch
        from safetensors.torch import save_file

        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tensors["standardise.mean"] = torch.from_numpy(np.ascontiguousarray(self.mean, np.float64))
        tensors["standardise.scale"] = torch.from_numpy(np.ascontiguousarray(self.scale, np.float64))
        save_file(tensors, str(path), metadata={"format": MODEL_FORMAT,
                                                "settings": json.dumps(self.settings.to_dict())})
        return Path(path)


def load_abmil(path: str | Path, device: str = "cpu") -> ABMILModel:
    """A model written by :meth:`ABMILModel.save` (safetensors: loading runs no code)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path}: not a slide-clip ABMIL model (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    s = ABMILSettings(**json.loads(meta["settings"]))
    mean, scale = tensors.pop("standardise.mean").numpy(), tensors.pop("standardise.scale").numpy()
    net = _build(len(mean), s)
    net.load_state_dict({k[len("net."):]: v for k, v in tensors.items()})
    return ABMILModel(net.to(device), mean, scale, s, device)


def _tile_stats(bags: BagDataset, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation over every tile of these bags (one pass)."""
    d = bags.cohort.embed_dim
    s1, s2, n = np.zeros(d), np.zeros(d), 0
    for i in rows:
        b = bags[i]["features"].astype(np.float64)
        s1 += b.sum(0)
        s2 += (b * b).sum(0)
        n += len(b)
    mean = s1 / max(n, 1)
    sd = np.sqrt(np.maximum(s2 / max(n, 1) - mean**2, 0))
    sd[sd < 1e-8] = 1.0
    return mean, sd


def _padded(feats: list[np.ndarray], mean, scale, device):
    """Standardised bags stacked into (B, n_max, d) zeros-padded, and the (B, n_max) tile mask."""
    import torch

    n = max(len(f) for f in feats)
    x = np.zeros((len(feats), n, len(mean)), np.float32)
    mask = np.zeros((len(feats), n), bool)
    for k, f in enumerate(feats):
        x[k, :len(f)] = (f - mean) / scale
        mask[k, :len(f)] = True
    return torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device)


def fit_abmil(cohort: PatientCohort, patients: list[str], time, event, settings: ABMILSettings | None = None,
              seed: int = 0, log=None, bags: BagDataset | None = None) -> ABMILModel:
    """Train on these patients' bags with the Cox partial likelihood over mini-batches of patients.

    ``bags``: a patient :class:`BagDataset` of the cohort to read them from (and share its
    cache); default a new one holding up to ``settings.cache_mb``.
    """
    import torch

    s = settings or ABMILSettings()
    device = pick_device(s.device)
    threads = torch.get_num_threads()
    if device == "cpu" and s.cpu_threads:
        torch.set_num_threads(s.cpu_threads)
    try:
        return _train(cohort, patients, time, event, s, device, seed, log, bags)
    finally:
        torch.set_num_threads(threads)


def _train(cohort, patients, time, event, s: ABMILSettings, device: str, seed: int, log, bags) -> ABMILModel:
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    full = bags or BagDataset(cohort, "patient", as_torch=False, cache_mb=s.cache_mb)
    where = {pid: k for k, pid in enumerate(full.ids)}
    ds = BagDataset(cohort, "patient", ids=list(patients), as_torch=False)
    mean, scale = _tile_stats(full, [where[p] for p in ds.ids])
    net = _build(cohort.embed_dim, s).to(device)
    model = ABMILModel(net, mean, scale, s, device)
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    t_all = torch.as_tensor(np.asarray(time, np.float64))
    e_all = torch.as_tensor(np.asarray(event, np.float64))

    def bag(i: int) -> np.ndarray:
        return full[where[ds.ids[i]]]["features"]

    for epoch in range(s.epochs):
        net.train()
        order = rng.permutation(len(ds))
        total = 0.0
        for start in range(0, len(order), s.batch_patients):
            idx = order[start:start + s.batch_patients]
            if e_all[idx].sum() == 0:
                continue  # no event: no partial likelihood in this batch
            feats = []
            for i in idx:
                f = bag(int(i))
                if len(f) > s.max_tiles:
                    f = f[np.sort(rng.choice(len(f), s.max_tiles, replace=False))]
                feats.append(f)
            x, mask = _padded(feats, mean, scale, device)
            loss = cox_loss(net(x, mask)[0], t_all[idx], e_all[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if log and (epoch + 1) % max(1, s.epochs // 4) == 0:
            log(f"abmil epoch {epoch + 1}/{s.epochs}: Cox loss {total / max(1, len(ds)):.4f}")
        if not math.isfinite(total):
            raise FloatingPointError("ABMIL training diverged (non-finite Cox loss)")
    return model


def predict_patients(model: ABMILModel, cohort: PatientCohort, patients: list[str]) -> np.ndarray:
    """Risk per patient (all tiles of all its slides)."""
    ds = BagDataset(cohort, "patient", ids=list(patients), as_torch=False)
    return np.array([model.predict_bag(ds[i]["features"])[0] for i in range(len(ds))])
