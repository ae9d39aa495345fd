"""Reference statistics: computed from a folder / tensor / the digits data and cached as .npz with metadata
(extractor, mode, image size, count), or clean-fid's named statistics (e.g. cifar10) when present locally.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from .errors import OnestepError
from .features import Extractor
from .streaming import TensorSource, stream_features


class ReferenceError(OnestepError):
    """Reference statistics that are missing or were made with another extractor."""


@dataclass
class Reference:
    """Feature moments of the real data; `features` (some or all rows) for KID and precision / recall."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict = field(default_factory=dict)
    features: np.ndarray | None = None

    @property
    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma

    def save(self, path: str) -> None:
        """Write an .npz (mu, sigma, meta as JSON, features if kept); atomic rename."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(self.meta))}
        if self.features is not None:
            arrays["features"] = self.features
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, extractor: Extractor | None = None) -> "Reference":
        """Read a file written by `save`; refuse it if it was made with another extractor or mode, or if it is not
        whole statistics (empty, cut short, metadata not an object, sizes that do not fit each other or the
        extractor's features)."""
        fix = "recompute them (eval/benchmark.py --reference FOLDER --out DIR)"
        if not os.path.isfile(path):
            raise ReferenceError(f"reference statistics {path!r} do not exist; make them with eval/benchmark.py "
                                 "--reference FOLDER --out DIR (writes DIR/reference.npz), or pass a folder or digits")
        if os.path.getsize(path) == 0:
            raise ReferenceError(f"{path} is an empty file (0 bytes), not reference statistics; {fix}")
        try:
            with np.load(path) as z:
                if "meta" not in z:
                    raise ReferenceError(f"{path} has no onestep metadata (extractor, mode); recompute it from the "
                                         "images (eval/benchmark.py --reference FOLDER --out DIR), or for clean-fid's "
                                         "statistics pass --reference cleanfid:NAME:RES[:SPLIT]")
                ref = cls(z["mu"], z["sigma"], json.loads(str(z["meta"])), z["features"] if "features" in z else None)
        except OnestepError:
            raise
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ReferenceError(f"{path} is not reference statistics written by onestep ({type(e).__name__}); "
                                 f"{fix}") from None
        if not isinstance(ref.meta, dict):
            raise ReferenceError(f"{path}: its metadata is a JSON {type(ref.meta).__name__}, not an object (written by "
                                 f"onestep); {fix}")
        mu, sigma = np.asarray(ref.mu), np.asarray(ref.sigma)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ReferenceError(f"{path}: mean {mu.shape} and covariance {sigma.shape} do not fit together; {fix}")
        if ref.features is not None and (ref.features.ndim != 2 or ref.features.shape[1] != len(mu)):
            raise ReferenceError(f"{path}: its kept features {ref.features.shape} do not match its {len(mu)}-d "
                                 f"statistics; {fix}")
        if extractor is not None:
            ref.check(extractor, path)
            if extractor.dim is not None and len(mu) != extractor.dim:
                raise ReferenceError(f"{path} holds {len(mu)}-d statistics; the {extractor.name} features are "
                                     f"{extractor.dim}-d; {fix}")
        return ref

    def check(self, extractor: Extractor, where: str = "reference") -> None:
        """Refuse statistics made with another extractor or mode, or with other weights where both record theirs
        (clean-fid's named statistics and older files do not)."""
        want, got = extractor.meta, {k: self.meta.get(k) for k in extractor.meta}
        if got.get("weights") is None:
            want.pop("weights", None)
            got.pop("weights", None)
        if want != got and got["extractor"] == want["extractor"] and got["mode"] == want["mode"]:
            raise ReferenceError(f"{where} was computed with other weights of the {want['extractor']!r} extractor "
                                 f"(fingerprint {got['weights']}, not {want['weights']}); recompute it")
        if want != got:
            raise ReferenceError(f"{where} was computed with extractor {got['extractor']!r} mode {got['mode']!r}, "
                                 f"not {want['extractor']!r} mode {want['mode']!r}; recompute it or pick that extractor")


def compute_reference(source, extractor: Extractor, description: str, batch_size: int = 250, keep: int = 10_000,
                      accelerator=None) -> Reference:
    """Moments (and the first `keep` features) of a source's images under `extractor`."""
    r = stream_features(source, extractor, batch_size, keep, accelerator)
    mu, sigma = r.stats.moments()
    size = None if r.image_shape is None else list(r.image_shape)  # None: images of several sizes
    meta = {**extractor.meta, "image_size": size, "count": r.stats.n, "source": description}
    return Reference(mu, sigma, meta, r.features)


def digits_reference(extractor: Extractor, split: str = "all", **kw) -> Reference:
    """Reference statistics of scikit-learn's digits (`onestep.data.load_digits(split)`)."""
    from .data import load_digits

    x, y = load_digits(split)
    return compute_reference(TensorSource(x, y), extractor, f"digits:{split}", **kw)


def cleanfid_stats_path(name: str, res: int | str, mode: str, split: str, kid: bool = False) -> str:
    """Where clean-fid keeps its named statistics (its package `stats/` folder), by its naming rule."""
    import cleanfid

    res = "na" if split == "custom" else res  # clean-fid's rule for custom statistics (make_custom_stats)
    fname = f"{name}_{mode}_{split}_{res}{'_kid' if kid else ''}.npz".lower()
    return os.path.join(os.path.dirname(cleanfid.__file__), "stats", fname)


def cleanfid_reference(name: str, res: int | str, mode: str = "clean", split: str = "train") -> Reference:
    """clean-fid's named Inception statistics (e.g. cifar10, 32, clean, train), read only when present."""
    from cleanfid.features import get_reference_statistics

    path = cleanfid_stats_path(name, res, mode, split)
    if not os.path.isfile(path):
        url = "https://www.cs.cmu.edu/~clean-fid/stats/" + os.path.basename(path)
        raise ReferenceError(f"clean-fid statistics {name!r} (res {res}, mode {mode}, split {split}) are not here; "
                             f"download {url} and put it at {path}")
    mu, sigma = get_reference_statistics(name, res, mode=mode, split=split)
    kid_path = cleanfid_stats_path(name, res, mode, split, kid=True)
    feats = np.load(kid_path)["feats"] if os.path.isfile(kid_path) else None
    meta = {"extractor": "inception_v3", "mode": mode, "image_size": None, "count": None,
            "source": f"cleanfid:{name}:{res}:{split}"}
    return Reference(mu, sigma, meta, feats)
