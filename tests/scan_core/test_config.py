"""The pipeline config's method sections: Super-AND and two-stage settings built from their
sections, validation with pipeline key names, and the method sections leaving the other
sections' fingerprints (hence the stage keys of existing configs) untouched."""

import pytest
from pydantic import ValidationError

from scan_core.config import (
    PipelineConfig,
    PretextConfig,
    SuperANDConfig,
    SuperANDSettings,
    TwoStageConfig,
    TwoStageSettings,
)


def test_superand_takes_the_pretext_settings_and_its_own() -> None:
    cfg = PipelineConfig().with_overrides(
        {
            "pretext.method": "superand",
            "pretext.epochs": 6,
            "pretext.lr": 0.03,
            "superand.rounds": 3,
        }
    )
    superand = cfg.superand_config()
    assert isinstance(superand, SuperANDConfig)
    assert (superand.epochs, superand.lr, superand.rounds) == (6, 0.03, 3)
    assert superand.backbone == cfg.pretext.backbone
    assert superand.anchor_rate == SuperANDSettings().anchor_rate
    # every Super-AND setting comes from exactly one of the two sections
    shared = set(PretextConfig.model_fields) - {"method"}
    assert shared | set(SuperANDSettings.model_fields) == set(SuperANDConfig.model_fields)
    assert not shared & set(SuperANDSettings.model_fields)


def test_superand_is_checked_with_pipeline_key_names() -> None:
    with pytest.raises(ValidationError, match=r"pretext.epochs \(2\) must be at least superand"):
        PipelineConfig().with_overrides({"pretext.method": "superand", "pretext.epochs": 2})
    with pytest.raises(ValidationError, match="superand.anchor_rate"):
        PipelineConfig().with_overrides(
            {"pretext.method": "superand", "superand.anchor_rate": 0.5, "superand.rounds": 4}
        )
    # the superand section only matters for Super-AND
    assert PipelineConfig().with_overrides({"pretext.epochs": 2}).pretext.epochs == 2


def test_twostage_takes_the_number_of_clusters_from_scan() -> None:
    cfg = PipelineConfig().with_overrides(
        {"clustering.method": "twostage", "scan.num_clusters": 4, "twostage.epochs": 7}
    )
    assert cfg.twostage_config() == TwoStageConfig(num_clusters=4, epochs=7)
    assert cfg.twostage_config(12).num_clusters == 12
    assert set(TwoStageConfig.model_fields) == set(TwoStageSettings.model_fields) | {"num_clusters"}
    with pytest.raises(ValidationError, match=r"twostage.overcluster \(4\) must exceed"):
        PipelineConfig().with_overrides(
            {"clustering.method": "twostage", "scan.num_clusters": 4, "twostage.overcluster": 4}
        )
    with pytest.raises(ValidationError, match="clustering.method"):
        PipelineConfig.model_validate({"clustering": {"method": "dbscan"}})


def test_method_sections_leave_the_other_sections_alone() -> None:
    base = PipelineConfig()
    other = base.with_overrides(
        {
            "clustering.method": "kmeans",
            "kmeans.temperature": 0.5,
            "twostage.epochs": 3,
            "superand.rounds": 2,
            "cluster_count.k_max": 12,
        }
    )
    for section in ("image", "pretext", "neighbors", "scan", "selflabel", "growth", "duplicates"):
        assert getattr(base, section).fingerprint() == getattr(other, section).fingerprint()
    # an older config file (no method sections) still loads, with the defaults
    old = PipelineConfig.model_validate({"scan": {"num_clusters": 3}})
    assert old.clustering.method == "scan" and old.pretext.method == "simclr"
