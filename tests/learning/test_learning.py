"""The learned similarity: pair features, training pairs, training on real structures, persistence."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import joblib
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from cspml_flows.core.composition import roles
from cspml_flows.core.descriptors import DESCRIPTOR_VERSION, magpie_stats
from cspml_flows.core.errors import ModelError
from cspml_flows.learning.features import Standardizer, role_distance, unlearned_distance
from cspml_flows.learning.model import MODEL_FORMAT, QueryBatch, SimilarityModel, dist_column, training_hash
from cspml_flows.learning.pairs import pair_labels, sample_pairs

# ---------------------------------------------------------------- helpers


def _some_pairs(index, n: int = 400, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    std = Standardizer(index.stats, index.role_props)
    a, t = sample_pairs(index, np.arange(len(index)), np.arange(len(index)), std, n_near=4, n_random=2, seed=seed)
    pick = np.random.default_rng(seed).choice(len(a), size=min(n, len(a)), replace=False)
    return a[pick], t[pick]


def _features(model, index, a, t) -> np.ndarray:
    q = QueryBatch(index.roles, index.stats, index.role_props, index.role_fracs)
    return model.features(q, a, index.role_props[a], index, t)


def _row(index, material_id: str) -> int:
    return int(np.flatnonzero(index.ids == material_id)[0])


# ---------------------------------------------------------------- features


def test_standardizer_is_nan_aware():
    stats = np.array([[1.0, 10.0], [3.0, np.nan], [5.0, 30.0]])
    role_props = np.array([[[1.0], [np.nan]], [[3.0], [5.0]]])
    std = Standardizer(stats, role_props)
    np.testing.assert_allclose(std.stats_mu, [3.0, 20.0])
    np.testing.assert_allclose(std.role_mu, [3.0])
    scaled = std.stats(stats)
    assert not np.isnan(scaled).any()  # NaN descriptors become 0 after scaling
    np.testing.assert_allclose(scaled[:, 0], [-1.224745, 0.0, 1.224745], atol=1e-5)
    assert np.isnan(std.roles(role_props)[0, 1, 0])  # missing roles stay missing


def test_query_batch_matches_index_descriptors(template_index):
    i = _row(template_index, "hand-srtio3")
    qb = QueryBatch.from_roles([roles("SrTiO3"), roles("KBr")])
    np.testing.assert_allclose(qb.stats[0], template_index.stats[i])
    np.testing.assert_allclose(qb.role_props[0], template_index.role_props[i], equal_nan=True)
    np.testing.assert_allclose(qb.role_fracs[0], template_index.role_fracs[i], equal_nan=True)
    assert qb.stats.shape[0] == qb.role_props.shape[0] == qb.role_fracs.shape[0] == 2


def test_pair_features_shape_identity_flag_and_distance_column(template_index, trained_model):
    idx = template_index
    i, j, k = _row(idx, "hand-nacl"), _row(idx, "hand-kcl"), _row(idx, "hand-lif")
    a, t = np.array([i, i, i]), np.array([i, j, k])
    x = _features(trained_model, idx, a, t)
    assert x.shape[0] == 3 and x.dtype == np.float32
    same_col = dist_column() + 3  # dist_stats, dist_role, max_role, same
    assert x[:, same_col].tolist() == [1.0, 0.0, 0.0]
    dist = unlearned_distance(idx.stats[a], idx.stats[t], trained_model.std)
    np.testing.assert_allclose(x[:, dist_column()], dist, rtol=1e-5)
    assert dist[0] == pytest.approx(0.0, abs=1e-6)
    assert dist[1] > 0 and dist[2] > 0
    # same composition: every role-difference feature is zero where the roles exist
    assert np.nanmax(np.abs(x[0, : x.shape[1] // 3])) == pytest.approx(0.0, abs=1e-6)


def test_pair_features_are_row_aligned(template_index, trained_model):
    """Features of a batch equal those of each pair computed alone."""
    a, t = _some_pairs(template_index, n=20)
    batch = _features(trained_model, template_index, a, t)
    for r in (0, 7, 19):
        alone = _features(trained_model, template_index, a[r : r + 1], t[r : r + 1])
        np.testing.assert_array_equal(batch[r], alone[0])


def test_role_distance_ignores_missing_roles():
    std = Standardizer(magpie_stats(["NaCl", "KBr"]), np.ones((2, 6, 12)) * np.arange(12))
    q = np.full((1, 6, 12), np.nan)
    q[0, :2] = 1.0
    t = np.full((1, 6, 12), np.nan)
    t[0, :2] = 1.0
    assert role_distance(q, t, std)[0] == pytest.approx(0.0)
    t[0, 1, 0] = 2.0
    assert role_distance(q, t, std)[0] > 0


# ---------------------------------------------------------------- training pairs


def test_sample_pairs_share_anonymous_formula_and_exclude_self(template_index):
    idx = template_index
    std = Standardizer(idx.stats, idx.role_props)
    anchors = np.arange(0, len(idx), 3)
    allowed = np.arange(len(idx))[np.arange(len(idx)) % 2 == 0]
    a, t = sample_pairs(idx, anchors, allowed, std, n_near=5, n_random=2, seed=0)
    assert len(a) > 100
    assert np.all(idx.anon[a] == idx.anon[t])
    assert np.all(a != t)
    assert set(a.tolist()) <= set(anchors.tolist())
    assert set(t.tolist()) <= set(allowed.tolist())
    # at most n_near + n_random templates per anchor, each template once
    for anchor in np.unique(a)[:50]:
        ts = t[a == anchor]
        assert len(ts) <= 7
        assert len(set(ts.tolist())) == len(ts)


def test_sample_pairs_nearest_first(template_index):
    """The first templates of an anchor are its nearest same-anonymous-formula ones by role distance."""
    idx = template_index
    std = Standardizer(idx.stats, idx.role_props)
    nacl = _row(idx, "hand-nacl")
    _a, t = sample_pairs(idx, np.array([nacl]), np.arange(len(idx)), std, n_near=3, n_random=0, seed=0)
    others = idx.by_anon["AB"][idx.by_anon["AB"] != nacl]
    d = role_distance(idx.role_props[nacl][None], idx.role_props[others], std)
    assert sorted(t.tolist()) == sorted(others[np.argsort(d)[:3]].tolist())
    assert "KCl" in set(idx.formulas[t].tolist())


def test_sample_pairs_deterministic_and_empty(template_index):
    idx = template_index
    std = Standardizer(idx.stats, idx.role_props)
    args = (idx, np.arange(50), np.arange(len(idx)), std, 4, 3)
    a1, t1 = sample_pairs(*args, seed=5)
    a2, t2 = sample_pairs(*args, seed=5)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(t1, t2)
    a0, t0 = sample_pairs(idx, np.zeros(0, dtype=int), np.arange(len(idx)), std)
    assert len(a0) == len(t0) == 0


def test_pair_labels_follow_prototype_clusters(template_index):
    idx = template_index
    nacl, kcl, csi, gdsi = (_row(idx, i) for i in ("hand-nacl", "hand-kcl", "hand-csi", "mp-601371"))
    labels = pair_labels(idx, np.array([nacl, nacl, nacl, kcl]), np.array([kcl, csi, gdsi, nacl]))
    assert labels.tolist() == [1, 0, 0, 1]
    # (zincblende lands in the rocksalt cluster: the CSP matcher fits them, rms 0.43 < stol 0.5)
    assert idx.cluster[_row(idx, "hand-srtio3")] == idx.cluster[_row(idx, "hand-bazro3")]
    assert idx.cluster[_row(idx, "hand-srtio3")] != idx.cluster[_row(idx, "mp-4651")]  # tetragonal SrTiO3


# ---------------------------------------------------------------- training on real structures


def test_training_report_beats_unlearned_distance(trained, template_index):
    model, report = trained
    assert report.n_templates == len(template_index)
    assert report.n_train_pairs > 1000 and report.n_test_pairs > 100
    assert 0.05 < report.positive_fraction < 0.6
    # held-out compositions: the learned similarity must clearly beat the plain descriptor distance
    assert report.roc_auc > 0.85
    assert report.roc_auc > report.baseline_roc_auc + 0.1
    assert report.pair_accuracy > 0.8
    assert report.label_agreement is not None and report.label_agreement >= 0.9
    assert model.meta["report"]["roc_auc"] == report.roc_auc


def test_trained_model_meta(trained_model, template_index):
    meta = trained_model.meta
    assert meta["format"] == MODEL_FORMAT
    assert meta["descriptor_version"] == DESCRIPTOR_VERSION
    assert meta["training_hash"] == training_hash(template_index)
    assert meta["n_templates"] == len(template_index)


def test_trained_model_ranks_same_prototype_higher(trained_model, template_index):
    """KBr (roles of hand-kbr) against rocksalt, CsCl-type and orthorhombic (GdSi, oP8) templates."""
    idx = template_index
    kbr = _row(idx, "hand-kbr")
    ts = np.array([_row(idx, i) for i in ("hand-nabr", "hand-kcl", "hand-csbr", "hand-cscl", "mp-601371")])
    p = trained_model.predict_proba(_features(trained_model, idx, np.full(len(ts), kbr), ts))
    assert p.shape == (5,) and np.all((p >= 0) & (p <= 1))
    assert min(p[:2]) > 0.5 > max(p[2:])
    assert p[4] < 0.1


def test_predict_proba_empty_and_untrained(trained_model):
    assert trained_model.predict_proba(np.zeros((0, 10), dtype=np.float32)).shape == (0,)
    untrained = SimilarityModel(trained_model.std)
    with pytest.raises(ModelError, match="not trained"):
        untrained.predict_proba(np.zeros((1, 10), dtype=np.float32))


def test_training_hash_depends_on_ids_and_clusters(template_index):
    h = training_hash(template_index)
    assert h == training_hash(template_index) and len(h) == 16
    mask = np.ones(len(template_index), dtype=bool)
    mask[0] = False
    assert training_hash(template_index.subset(mask)) != h


def test_train_needs_ten_templates(template_index):
    small = template_index.subset(np.arange(len(template_index)) < 9)
    with pytest.raises(ModelError, match="at least 10 templates"):
        SimilarityModel.train(small)


def test_train_rejects_single_class_pairs(template_index):
    """A store of rocksalts only: every pair is positive, nothing to learn."""
    rocksalt = template_index.cluster == template_index.cluster[_row(template_index, "hand-nacl")]
    assert rocksalt.sum() >= 10
    with pytest.raises(ModelError, match="one class"):
        SimilarityModel.train(template_index.subset(rocksalt), check_labels=0)


def test_train_on_binary_and_ternary_store(template_index):
    """A store of binaries and ternaries only (the MP-20 subset itself) must be trainable."""
    idx = template_index
    assert max(len(r.elements) for r in idx.roles) == 3
    with threadpool_limits(limits=1, user_api="openmp"):
        model, report = SimilarityModel.train(idx, check_labels=0, max_iter=20, refit_all=False)
    a, t = _some_pairs(idx, n=50)
    assert np.all(np.isfinite(model.predict_proba(_features(model, idx, a, t))))
    assert report.roc_auc > 0.5


def test_train_without_e_above_hull(template_index):
    """A store imported from CIF files has no e_above_hull; training must still work."""
    idx = copy.copy(template_index)
    idx.e_above_hull = np.full(len(idx), np.nan)
    with threadpool_limits(limits=1, user_api="openmp"):
        model, _ = SimilarityModel.train(idx, check_labels=0, max_iter=20, refit_all=False)
    a, t = _some_pairs(idx, n=50)
    assert np.all(np.isfinite(model.predict_proba(_features(model, idx, a, t))))


# ---------------------------------------------------------------- persistence


def test_save_load_round_trip(trained_model, template_index, tmp_path: Path):
    path = trained_model.save(tmp_path / "sub" / "model.json.gz")
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary file, then renamed
    loaded = SimilarityModel.load(path)
    a, t = _some_pairs(template_index, n=300)
    x = _features(trained_model, template_index, a, t)
    np.testing.assert_allclose(loaded.predict_proba(x), trained_model.predict_proba(x), rtol=1e-9)
    np.testing.assert_array_equal(_features(loaded, template_index, a, t), x)  # same standardizer
    assert loaded.meta["training_hash"] == trained_model.meta["training_hash"]


def test_model_file_is_plain_json(trained_model, tmp_path: Path):
    """The file is gzipped JSON: the standardiser as lists, LightGBM's text model, the metadata."""
    path = trained_model.save(tmp_path / "model.json.gz")
    blob = json.loads(gzip.decompress(path.read_bytes()))
    assert set(blob) == {"meta", "std", "booster"}
    assert blob["booster"].startswith("tree\n")
    assert path.stat().st_size < 5_000_000


def test_load_missing_file(tmp_path: Path):
    missing = tmp_path / "nope.json.gz"
    with pytest.raises(ModelError, match="not found") as err:
        SimilarityModel.load(missing)
    assert str(missing) in str(err.value)


def test_load_garbage_file(tmp_path: Path):
    path = tmp_path / "garbage.json.gz"
    path.write_bytes(b"this is not a model file\x00\x01\x02" * 10)
    with pytest.raises(ModelError, match="cannot read model file") as err:
        SimilarityModel.load(path)
    assert str(path) in str(err.value)


class _Payload:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "payload ran"))


def test_pickled_model_file_never_runs_code(tmp_path: Path):
    """A joblib/pickle file (the old model format, or a crafted one) is refused without being unpickled."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "cspml.joblib"
    joblib.dump({"meta": {}, "booster": _Payload(marker)}, path)
    with pytest.raises(ModelError, match="never loaded"):
        SimilarityModel.load(path)
    assert not marker.exists()


def test_load_foreign_json_file(tmp_path: Path):
    path = tmp_path / "other.json.gz"
    path.write_bytes(gzip.compress(b"[1, 2, 3]"))
    with pytest.raises(ModelError, match="not a cspml-flows model"):
        SimilarityModel.load(path)


def test_load_damaged_booster(trained_model, tmp_path: Path):
    path = trained_model.save(tmp_path / "model.json.gz")
    blob = json.loads(gzip.decompress(path.read_bytes()))
    blob["booster"] = "tree\nversion=v4\nnot a model"
    path.write_bytes(gzip.compress(json.dumps(blob).encode()))
    with pytest.raises(ModelError, match="damaged model data"):
        SimilarityModel.load(path)


@pytest.mark.parametrize(
    ("key", "value"), [("descriptor_version", "0-outdated"), ("format", MODEL_FORMAT - 1), ("descriptor_version", None)]
)
def test_load_incompatible_model(trained_model, tmp_path: Path, key, value):
    path = trained_model.save(tmp_path / "model.json.gz")
    blob = json.loads(gzip.decompress(path.read_bytes()))
    if value is None:
        del blob["meta"][key]
    else:
        blob["meta"][key] = value
    path.write_bytes(gzip.compress(json.dumps(blob).encode()))
    with pytest.raises(ModelError, match="retrain"):
        SimilarityModel.load(path)
    assert trained_model.meta[key] != value  # the saved copy was changed, not the session model
