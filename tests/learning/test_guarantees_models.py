"""Damaged model and cache files: a model file is checked field by field when it is read and refused with one
line naming the file and the field; a damaged cache is rebuilt (one log line) to what a fresh build gives.

Damaged files are the shipped model (or a valid hetero model) with one field edited."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest

import cspml_flows
from cspml_flows.cli.main import main
from cspml_flows.core.descriptors import DESCRIPTOR_VERSION
from cspml_flows.core.errors import ModelError
from cspml_flows.core.safeio import load_npz, read_json_gz, save_npz, write_json_gz
from cspml_flows.learning.features import n_pair_features
from cspml_flows.learning.hetero.embeddings import EMBED_VERSION, N_EMBED, embedding_features, read_cache
from cspml_flows.learning.hetero.encoders import GEOMETRY_VERSION, N_GEOMETRY, geometry_features
from cspml_flows.learning.hetero.model import HETERO_FORMAT, N_STACK_FEATURES, HeteroModel, Stacker, index_geometry
from cspml_flows.learning.model import SimilarityModel
from cspml_flows.learning.ranker import DEFAULT_FEATURES
from cspml_flows.templates.index import TemplateIndex
from cspml_flows.training.hetero_towers import init_model

SHIPPED = Path(cspml_flows.__file__).parent / "data" / "cspml-model.json.gz"


def lgb_text(n_features: int) -> str:
    """A real (tiny) LightGBM binary model that reads ``n_features`` features."""
    rng = np.random.default_rng(0)
    x = rng.random((200, n_features))
    y = (x[:, 0] > 0.5).astype(float)
    params = {"objective": "binary", "num_leaves": 4, "min_data_in_leaf": 5, "verbosity": -1, "num_threads": 1}
    return lgb.train(params, lgb.Dataset(x, y), num_boost_round=2).model_to_string()


def one_line_error(capfd: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one ``error:`` line on stderr (file descriptor 2 included:
    nothing printed by native code either) and no traceback."""
    capfd.readouterr()
    assert main(argv) == 2, argv
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


def setter(path: str, value: Any) -> Callable[[dict], None]:
    """An edit that sets a dotted field (``std.stats_sd.3``: item 3 of the list) of a model blob."""

    def edit(blob: dict) -> None:
        *parents, last = path.split(".")
        node: Any = blob
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is _DELETE:
            del node[last]
        else:
            node[last] = value(node[last]) if callable(value) else value

    return edit


_DELETE = object()

# (case, edit of the shipped model, what the one error line must say)
MODEL_DAMAGES = [
    ("mean-too-short", setter("std.stats_mu", lambda v: v[:-1]), "std.stats_mu has shape 131, expected 132"),
    ("scale-two-dimensional", setter("std.role_sd", lambda v: [v]), "std.role_sd has shape 1 x 12, expected 12"),
    ("ragged-mean", setter("std.role_mu", [[1.0, 2.0], [3.0]]), "std.role_mu is not a rectangular array"),
    ("text-where-a-list-is", setter("std.stats_sd", "1.0 2.0 3.0"), "std.stats_sd is text, expected a list"),
    ("text-in-a-list", setter("std.stats_mu.4", "0.5"), "std.stats_mu holds text where numbers belong"),
    ("booleans", setter("std.role_mu", lambda v: [True] * len(v)), "std.role_mu holds true/false"),
    ("missing-standardiser", setter("std", _DELETE), "field std is missing"),
    ("missing-array", setter("std.role_mu", _DELETE), "field std.role_mu is missing"),
    ("standardiser-a-list", setter("std", [1.0, 2.0]), "field std is a list, expected a mapping"),
    ("meta-a-list", setter("meta", [1]), "field meta is a list, expected a mapping"),
    ("report-text", setter("meta.report", "fine"), "field meta.report is text, expected a mapping"),
    ("booster-a-list", setter("booster", ["tree"]), "field booster is a list, expected text"),
    ("booster-garbage", setter("booster", "tree\nversion=v4\nnot a model"), "field booster is not a LightGBM model"),
    (
        "booster-feature-count",
        setter("booster", lgb_text(150)),
        f"booster is a LightGBM model of 150 features, this version computes {n_pair_features()}",
    ),
    ("zero-std", setter("std.stats_sd.3", 0.0), "std.stats_sd holds a zero or negative scale"),
    ("negative-std", setter("std.role_sd.0", -1.0), "std.role_sd holds a zero or negative scale"),
    ("null-std-entry", setter("std.role_sd.2", None), "std.role_sd holds null where numbers belong"),
    ("null-std", setter("std.stats_sd", None), "field std.stats_sd is null, expected a list"),
    ("nan-mean", setter("std.stats_mu.5", float("nan")), "std.stats_mu holds NaN or infinite values"),
    ("infinite-std", setter("std.stats_sd.0", float("inf")), "std.stats_sd holds NaN or infinite values"),
    (
        "ranker-feature-count",
        setter("ranker.booster", lgb_text(len(DEFAULT_FEATURES) - 1)),
        f"ranker.booster is a LightGBM model of {len(DEFAULT_FEATURES) - 1} features, "
        f"this version computes {len(DEFAULT_FEATURES)}",
    ),
    ("ranker-booster-missing", setter("ranker.booster", _DELETE), "field ranker.booster is missing"),
    ("ranker-text", setter("ranker", "lambdarank"), "field ranker is text, expected a mapping"),
    ("volumes-a-list", setter("meta.element_volumes", [1.0]), "field meta.element_volumes is a list, expected"),
    ("volume-negative", setter("meta.element_volumes.O", -8.0), "meta.element_volumes.O is -8.0, expected a positive"),
    ("volume-text", setter("meta.element_volumes.O", "8"), "meta.element_volumes.O is text, expected a finite number"),
    ("volume-not-an-element", setter("meta.element_volumes.Xx", 8.0), "the key 'Xx', which is not an element symbol"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in MODEL_DAMAGES], ids=[c[0] for c in MODEL_DAMAGES])
def test_damaged_model_file_one_line_error(edit, message, template_folder, tmp_path, capfd):
    blob = read_json_gz(SHIPPED)
    edit(blob)
    bad = write_json_gz(tmp_path / "bad.json.gz", blob)
    with pytest.raises(ModelError, match="damaged model data") as err:
        SimilarityModel.load(bad)
    assert message in str(err.value) and str(bad) in str(err.value)
    line = one_line_error(capfd, ["predict", "NaCl", "--model", str(bad), "--store", template_folder])
    assert message in line and str(bad) in line


def test_shipped_model_passes_its_schema(template_folder, capfd):
    """The valid shipped model loads and predicts; its boosters read exactly the features this version computes."""
    model = SimilarityModel.load(SHIPPED)
    assert model.booster.num_feature() == n_pair_features()
    assert model.ranker is not None and model.ranker.booster.num_feature() == len(DEFAULT_FEATURES)
    assert np.all(model.std.stats_sd > 0) and np.all(model.std.role_sd > 0)
    assert model.volumes is not None and np.nanmin(model.volumes) > 0  # learned from the demo store
    assert main(["predict", "NaCl", "--model", str(SHIPPED), "--store", template_folder, "--top", "1"]) == 0
    out, err = capfd.readouterr()
    assert "NaCl" in out and "error" not in err


def test_model_file_without_element_volumes_rescales_by_the_pure_elements(tmp_path):
    """A model file written before models carried element volumes loads; its substitutions use the pure
    elements' volumes."""
    blob = read_json_gz(SHIPPED)
    del blob["meta"]["element_volumes"]
    model = SimilarityModel.load(write_json_gz(tmp_path / "old.json.gz", blob))
    assert model.volumes is None and SimilarityModel.load(SHIPPED).volumes is not None


# ---------------------------------------------------------------- hetero model files (format 4)


@pytest.fixture(scope="module")
def hetero_file(tmp_path_factory, hand_docs) -> Path:
    """A valid hetero model file: towers initialised on the hand-built templates, the shipped core model, a
    stacker; saved and loaded once to prove it is valid."""
    index = TemplateIndex.from_docs(hand_docs, workers=1)
    model = init_model(index, index_geometry(index, workers=1, cache=False))
    model.core, model.use_core = SimilarityModel.load(SHIPPED), True
    model.meta = {
        "format": HETERO_FORMAT,
        "descriptor_version": DESCRIPTOR_VERSION,
        "geometry_version": GEOMETRY_VERSION,
        "embedding_version": EMBED_VERSION,
    }
    rng = np.random.default_rng(0)
    x = rng.random((200, N_STACK_FEATURES))
    model.stacker = Stacker().fit(x, (x[:, 0] > 0.5).astype(float))
    path = model.save(tmp_path_factory.mktemp("hetero") / "hetero.json.gz")
    back = HeteroModel.load(path)
    assert back.A.shape == model.A.shape and back.stacker is not None and back.core is not None
    return path


def test_hetero_tower_widths_match_the_encoders(hand_docs):
    index = TemplateIndex.from_docs(hand_docs[:4], workers=1)
    geom = index_geometry(index, workers=1, cache=False)
    plain = init_model(index, geom, dim=4)
    assert (plain.A.shape[1], plain.B.shape[1]) == HeteroModel.widths("none")
    emb = np.random.default_rng(0).random((len(index), N_EMBED))
    with_emb = init_model(index, geom, emb, variant="species", dim=4)
    assert (with_emb.A.shape[1], with_emb.B.shape[1]) == HeteroModel.widths("species")


DC, DS = HeteroModel.widths("none")
HETERO_DAMAGES = [
    (
        "A-wrong-width",
        setter("A", lambda a: [r[:-1] for r in a]),
        f"field A has shape 32 x {DC - 1}, expected n x {DC}",
    ),
    ("B-fewer-rows", setter("B", lambda b: b[:-1]), "fields A and B have 32 and 31 rows"),
    ("w-nan", setter("w.3", float("nan")), "field w holds NaN or infinite values"),
    ("geometry-scale-zero", setter("geo_sd.0", 0.0), "field geo_sd holds a zero or negative scale"),
    ("geometry-mean-null", setter("geo_mu", None), "field geo_mu is null, expected a list"),
    ("embedding-scale-for-none", setter("emb_sd", [1.0]), "field emb_sd has shape 1, expected 0"),
    ("inverse-weights-text", setter("inv.1", "0.5"), "field inv holds text where numbers belong"),
    ("lam-text", setter("lam", "1.0"), "field lam is text, expected a number"),
    ("mu-infinite", setter("mu", float("inf")), "field mu is inf, expected a finite number"),
    ("use-core-text", setter("use_core", "yes"), "field use_core is text, expected true/false"),
    ("variant-unknown", setter("variant", "magic"), "field variant is 'magic'"),
    ("core-zero-std", setter("core.std.stats_sd.7", 0.0), "core.std.stats_sd holds a zero or negative scale"),
    (
        "core-feature-count",
        setter("core.booster", lgb_text(10)),
        f"core.booster is a LightGBM model of 10 features, this version computes {n_pair_features()}",
    ),
    (
        "stacker-feature-count",
        setter("stacker", lgb_text(5)),
        f"field stacker is a LightGBM model of 5 features, this version computes {N_STACK_FEATURES}",
    ),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in HETERO_DAMAGES], ids=[c[0] for c in HETERO_DAMAGES])
def test_damaged_hetero_model_one_line_error(edit, message, hetero_file, template_folder, tmp_path, capfd):
    blob = read_json_gz(hetero_file)
    edit(blob)
    bad = write_json_gz(tmp_path / "bad-hetero.json.gz", blob)
    with pytest.raises(ModelError, match="damaged hetero model data") as err:
        HeteroModel.load(bad)
    assert message in str(err.value) and str(bad) in str(err.value)
    argv = ["predict", "NaCl", "--polymorphs", "2", "--hetero-model", str(bad), "--store", template_folder]
    line = one_line_error(capfd, argv)
    assert message in line and str(bad) in line


# ---------------------------------------------------------------- caches: checked at load, rebuilt when damaged


def _geometry_damages(ids: np.ndarray, vectors: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Damaged copies of a geometry cache's arrays."""
    nan = vectors.copy()
    nan[1, 4] = np.nan
    return {
        "wrong-width": {"ids": ids, "vectors": vectors[:, :-1]},
        "nan-value": {"ids": ids, "vectors": nan},
        "fewer-ids-than-rows": {"ids": ids[:-1], "vectors": vectors},
        "numeric-ids": {"ids": np.arange(len(ids)), "vectors": vectors},
        "text-vectors": {"ids": ids, "vectors": vectors.astype(str)},
        "vectors-missing": {"ids": ids},
    }


@pytest.mark.parametrize("damage", list(_geometry_damages(np.array(["a", "b"]), np.zeros((2, 5)))))
def test_damaged_geometry_cache_is_rebuilt(damage, hand_docs, cspml_home, caplog):
    """``<home>/hetero/geom-v1.npz`` with a damaged array is rebuilt, with one log line, to exactly what a fresh
    build gives, and the rebuilt file is used from then on."""
    index = TemplateIndex.from_docs(hand_docs[:3], workers=1)
    args = (list(index.ids), index.structures, index.roles, list(index.spacegroup), list(index.nprim), 1)
    fresh = geometry_features(*args, cache=False)
    geometry_features(*args)  # writes the cache under the home
    path = cspml_home / "hetero" / f"{GEOMETRY_VERSION}.npz"
    arrays, meta = load_npz(path)
    save_npz(path, _geometry_damages(arrays["ids"], arrays["vectors"])[damage], meta)
    with caplog.at_level(logging.WARNING, logger="cspml_flows.learning.hetero.encoders"):
        rebuilt = geometry_features(*args)
    assert np.array_equal(rebuilt, fresh)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "recomputing" in warnings[0].getMessage()
    arrays, _ = load_npz(path)
    assert arrays["vectors"].shape == (3, N_GEOMETRY) and np.array_equal(arrays["vectors"], fresh)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cspml_flows.learning.hetero.encoders"):
        assert np.array_equal(geometry_features(*args), fresh)  # the rebuilt cache is read without a word
    assert not caplog.records


def _embedding_damages(ids: np.ndarray, digests: np.ndarray, vectors: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Damaged copies of a CHGNet embedding cache's arrays."""
    nan = vectors.copy()
    nan[0, 0] = np.nan
    return {
        "wrong-width": {"ids": ids, "digests": digests, "vectors": vectors[:, :-2]},
        "nan-value": {"ids": ids, "digests": digests, "vectors": nan},
        "fewer-digests-than-ids": {"ids": ids, "digests": digests[:-1], "vectors": vectors},
        "numeric-ids": {"ids": np.arange(len(ids)), "digests": digests, "vectors": vectors},
        "digests-missing": {"ids": ids, "vectors": vectors},
    }


@pytest.mark.parametrize(
    "damage", list(_embedding_damages(np.array(["a", "b"]), np.array(["x", "y"]), np.zeros((2, 3))))
)
def test_damaged_embedding_cache_is_rebuilt(damage, hand_docs, cspml_home, caplog):
    """``<home>/hetero/<version>-species.npz`` with a damaged array is rebuilt by CHGNet, with one log line, to
    what a fresh computation gives; the rebuilt file reads back without a word."""
    index = TemplateIndex.from_docs(hand_docs[:3], workers=1)
    args = (list(index.ids), index.structures, index.roles, "species")
    fresh = embedding_features(*args, cache=False)
    embedding_features(*args)  # writes the cache under the home
    path = cspml_home / "hetero" / f"{EMBED_VERSION}-species.npz"
    arrays, meta = load_npz(path)
    save_npz(path, _embedding_damages(arrays["ids"], arrays["digests"], arrays["vectors"])[damage], meta)
    with caplog.at_level(logging.WARNING, logger="cspml_flows.learning.hetero.embeddings"):
        rebuilt = embedding_features(*args)
    assert np.array_equal(rebuilt, fresh)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "recomputing" in warnings[0].getMessage()
    back = read_cache(path, "species")
    assert set(back) == set(index.ids) and np.array_equal(np.array([back[i][1] for i in index.ids]), fresh)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cspml_flows.learning.hetero.embeddings"):
        assert np.array_equal(embedding_features(*args), fresh)
    assert not caplog.records
