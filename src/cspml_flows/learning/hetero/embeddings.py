"""Pretrained structure representations for the structure tower: CHGNet 0.3.0's graph-network features.

Per template, CHGNet (weights ship in the ``chgnet`` wheel; nothing is downloaded) gives a crystal feature
(64, the pooled readout of its last graph layer) and a feature per atom (64); the atom features are pooled
per site role in canonical role order (mean over the role's sites, zeros for absent roles), so one vector
is ``64 + MAX_ROLES * 64`` long and the role blocks line up with the composition tower's role order.

Two variants:

- ``species``: the template as it is (its chemistry and geometry, as the potential sees them);
- ``role``: every site's element replaced by a fixed element per role (:data:`ROLE_ELEMENTS`), so the
  vector describes the structure type alone (element-agnostic; used for inverse design, where the
  template's own elements are replaced by the candidate's).

Vectors are cached per ``material_id`` under ``$CSPML_HOME/hetero/<version>-<variant>.npz`` together with a
digest of the template's structure, so a store whose structure for an id changed recomputes that id; the
file is read with ``allow_pickle=False`` and checked (text ids and digests, one per row; finite vectors of
the right width); a damaged or foreign file is recomputed, with one log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from cspml_flows.core.composition import Roles
from cspml_flows.core.config import home_dir
from cspml_flows.core.descriptors import MAX_ROLES
from cspml_flows.core.engines import pin_torch_threads
from cspml_flows.core.safeio import load_npz, save_npz
from cspml_flows.learning import checks
from cspml_flows.templates.index import TemplateIndex

logger = logging.getLogger(__name__)
EMBED_VERSION = "chgnet030-v1"
FEA = 64  # CHGNet 0.3.0 atom / crystal feature length
N_EMBED = FEA + MAX_ROLES * FEA
VARIANTS = ("species", "role")
ROLE_ELEMENTS = ("Na", "Cl", "Mg", "O", "Al", "S", "Ca", "F", "Si", "N", "K", "Br")  # role k -> a fixed element
_MODEL = None


def chgnet_model():
    """CHGNet 0.3.0, loaded once per process (torch pinned to ``$CSPML_TORCH_THREADS`` threads)."""
    global _MODEL
    if _MODEL is None:
        from chgnet.model import CHGNet

        pin_torch_threads()
        _MODEL = CHGNet.load(model_name="0.3.0", verbose=False)
    return _MODEL


def structure_digest(d: dict) -> str:
    """Digest of a structure dict (its lattice, species and coordinates as stored)."""
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepared(d: dict, r: Roles, variant: str) -> tuple[Structure, np.ndarray]:
    """The structure CHGNet sees and the role index of each site."""
    s = Structure.from_dict(d)
    role_of = {el: k for k, el in enumerate(r.elements)}
    site_roles = np.array([role_of[site.specie.symbol] for site in s])
    if variant == "role":
        s = Structure(s.lattice, [ROLE_ELEMENTS[k % len(ROLE_ELEMENTS)] for k in site_roles], s.frac_coords)
    return s, site_roles


def pool(crystal: np.ndarray, atoms: np.ndarray, site_roles: np.ndarray) -> np.ndarray:
    """Crystal feature followed by the mean atom feature of each role (zeros for absent roles)."""
    out = np.zeros(N_EMBED)
    out[:FEA] = crystal
    for k in range(min(int(site_roles.max()) + 1, MAX_ROLES)):
        sel = site_roles == k
        if sel.any():
            out[FEA * (k + 1) : FEA * (k + 2)] = atoms[sel].mean(axis=0)
    return out


def embed(structures: Sequence[dict], role_list: Sequence[Roles], variant: str = "species", batch_size: int = 32):
    """Pooled CHGNet features (n, N_EMBED) of structures, computed (no cache); zeros where CHGNet fails."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown embedding variant {variant!r}")
    model = chgnet_model()
    with warnings.catch_warnings():
        # CHGNet 0.3.0 reads the cell volumes of a graph through a tensor that requires grad (torch warns)
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True", category=UserWarning)
        return _embed_batches(model, structures, role_list, variant, batch_size)


def _embed_batches(model, structures: Sequence[dict], role_list: Sequence[Roles], variant: str, batch_size: int):
    """:func:`embed` in batches of ``batch_size`` (one by one where a batch fails)."""
    out = np.zeros((len(structures), N_EMBED))
    for s0 in range(0, len(structures), batch_size):
        chunk = [
            prepared(structures[i], role_list[i], variant) for i in range(s0, min(s0 + batch_size, len(structures)))
        ]
        try:
            preds = model.predict_structure(
                [c[0] for c in chunk], task="e", return_crystal_feas=True, return_atom_feas=True, batch_size=batch_size
            )
        except Exception:  # one bad structure (e.g. an isolated atom) fails the batch: one by one
            preds = []
            for c in chunk:
                try:
                    preds.append(
                        model.predict_structure(c[0], task="e", return_crystal_feas=True, return_atom_feas=True)
                    )
                except Exception:  # CHGNet fails on some structures (e.g. an isolated atom): zeros for it
                    logger.debug("no CHGNet embedding for one structure", exc_info=True)
                    preds.append(None)
        if isinstance(preds, dict):
            preds = [preds]
        for j, (p, c) in enumerate(zip(preds, chunk, strict=True)):
            if p is not None:
                out[s0 + j] = pool(np.asarray(p["crystal_fea"]), np.asarray(p["atom_fea"]), c[1])
    return np.nan_to_num(out)


def cache_path(variant: str) -> Path:
    """The embedding cache file of ``variant`` under the home folder."""
    return home_dir() / "hetero" / f"{EMBED_VERSION}-{variant}.npz"


def embedding_features(
    ids: Sequence[str],
    structures: Sequence[dict],
    role_list: Sequence[Roles],
    variant: str = "species",
    cache: bool | Path = True,
    batch_size: int = 32,
) -> np.ndarray:
    """Pooled CHGNet vectors (n, N_EMBED) row-aligned with ``ids``; cached by ``material_id`` and structure
    digest (``cache=False``: computed, nothing written, e.g. for user files)."""
    digests = [structure_digest(d) for d in structures]
    path = None
    known: dict[str, tuple[str, np.ndarray]] = {}
    if cache:
        path = Path(cache) if isinstance(cache, Path) else cache_path(variant)
        if path.is_file():
            known = read_cache(path, variant)
    todo = [i for i, (mid, dg) in enumerate(zip(ids, digests, strict=True)) if known.get(str(mid), ("",))[0] != dg]
    if todo:
        t0 = time.perf_counter()
        vecs = np.zeros((0, N_EMBED))
        step = 2000  # write the cache every few thousand structures: a long first run resumes
        for s in range(0, len(todo), step):
            part = todo[s : s + step]
            v = embed([structures[i] for i in part], [role_list[i] for i in part], variant, batch_size)
            vecs = np.vstack([vecs, v])
            for i, row in zip(part, v, strict=True):
                known[str(ids[i])] = (digests[i], row)
            if path is not None:
                write_cache(path, variant, known)
            dt = time.perf_counter() - t0
            logger.info("embeddings (%s): %d/%d in %.0f s", variant, s + len(part), len(todo), dt)
    return np.array([known[str(mid)][1] for mid in ids]).reshape(len(ids), N_EMBED)


def write_cache(path: Path, variant: str, known: dict[str, tuple[str, np.ndarray]]) -> None:
    """Write the (digest, vector) of every id to the cache file."""
    keys = list(known)
    arrays = {
        "ids": np.array(keys, dtype=str),
        "digests": np.array([known[k][0] for k in keys], dtype=str),
        "vectors": np.array([known[k][1] for k in keys], dtype=float).reshape(len(keys), N_EMBED),
    }
    save_npz(path, arrays, {"version": EMBED_VERSION, "variant": variant})


def read_cache(path: Path, variant: str) -> dict[str, tuple[str, np.ndarray]]:
    """Cached (digest, vector) by id; empty (so rebuilt, with one log line) unless the file is this version's
    and variant's, with one text id and digest per row and finite vectors of width :data:`N_EMBED`."""
    try:
        arrays, meta = load_npz(path)
        if meta.get("version") != EMBED_VERSION or meta.get("variant") != variant:
            raise ValueError("another embedding version or variant")
        ids = checks.texts("ids", arrays.get("ids"))
        digests = checks.texts("digests", arrays.get("digests"), len(ids))
        vectors = checks.numbers("vectors", arrays.get("vectors"), (len(ids), N_EMBED))
        return {str(k): (str(d), v) for k, d, v in zip(ids.tolist(), digests.tolist(), vectors, strict=True)}
    except Exception as exc:  # whatever is wrong with a cache file, it is only rebuilt
        logger.warning("embedding cache %s is unreadable (%s): recomputing it", path, checks.first_line(exc))
        return {}


def index_embeddings(index: TemplateIndex, variant: str = "species", cache: bool | Path = True) -> np.ndarray:
    """Embedding vectors of every template of a TemplateIndex."""
    return embedding_features(list(index.ids), index.structures, index.roles, variant, cache)
