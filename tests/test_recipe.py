"""Training presets (`train --recipe NAME`) and what `train` accepts as data; no training runs here."""

from __future__ import annotations

import json

import pytest

from pneumoscan.cli.main import build_parser, main
from pneumoscan.core.errors import ConfigError
from pneumoscan.core.settings import given
from pneumoscan.model.store import resolve_model
from pneumoscan.training.augment import Augmentation
from pneumoscan.training.recipe import RECIPES, TrainConfig

SHIPPED_CONFIG = resolve_model("default") / "config.json"  # the recipe's model
NOT_THE_RECIPE = {"data", "out", "recipe", "devices", "num_nodes", "accelerator", "precision", "workers", "cache"}


def _config(*flags: str) -> TrainConfig:
    """The TrainConfig the CLI builds from these train flags."""
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", *flags])
    chosen = given(TrainConfig, args)
    return TrainConfig.from_recipe(chosen.pop("recipe", "default"), **chosen, augmentation=given(Augmentation, args))


def test_the_shipped_recipe_is_the_one_the_shipped_model_was_trained_with():
    recorded = json.loads(SHIPPED_CONFIG.read_text())["training"]["recipe"]
    shipped = TrainConfig.from_recipe("shipped", data="d", out="o").recorded()
    differing = {k for k in recorded if k not in NOT_THE_RECIPE and recorded[k] != shipped[k]}
    assert differing == set()
    assert shipped["augmentation"]["acquisition"] == 0.5 and shipped["unfreeze"] == 16


def test_defaults_fine_tune_and_the_presets_are_recorded_by_name():
    default = _config()
    assert (default.recipe, default.epochs, default.fine_tune_epochs, default.unfreeze) == ("default", 3, 4, 6)
    assert (default.schedule, default.fine_tune_lr) == ("onecycle", 3e-4)
    assert default == TrainConfig(data="d", out="o")  # the dataclass defaults are the default recipe
    quick = _config("--recipe", "quick")
    assert (quick.epochs, quick.fine_tune_epochs, quick.limit) == (1, 1, 200)
    assert quick.recorded()["recipe"] == "quick"
    assert set(RECIPES) == {"default", "shipped", "quick"}


def test_flags_given_with_a_recipe_override_it():
    cfg = _config("--recipe", "shipped", "--unfreeze", "6", "--acquisition", "0.2", "--zoom", "0.3")
    assert (cfg.unfreeze, cfg.augmentation.acquisition, cfg.augmentation.zoom) == (6, 0.2, 0.3)
    assert cfg.recipe == "shipped" and cfg.fine_tune_epochs == 4  # the rest of the preset stays
    # a flag equal to the default still overrides the preset
    assert _config("--recipe", "quick", "--epochs", "3").epochs == 3
    with pytest.raises(ConfigError, match="--recipe must be one of"):
        TrainConfig.from_recipe("best", data="d", out="o")


def test_train_refuses_a_folder_without_train(tmp_path, capsys):
    for split in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "flat" / split).mkdir(parents=True)
    for folder in (tmp_path / "flat", tmp_path):
        assert main(["train", "--data", str(folder), "--out", str(tmp_path / "run"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "no train/ folder" in err and "data prepare" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_the_bundle_records_its_recipe(trained_bundle):
    recipe = trained_bundle.config["training"]["recipe"]
    assert recipe["recipe"] == "default" and recipe["fine_tune_epochs"] == 0  # the preset, and what overrode it


@pytest.mark.data
def test_a_split_seed_fixes_the_validation_patients_while_the_seed_varies():
    from conftest import D224

    from pneumoscan.io.dataset import recipe_splits

    def validation(*flags):
        return [s.path for s in recipe_splits(D224, _config(*flags).recorded())[1]]

    assert "split_seed" not in _config("--seed", "3").recorded()  # recipes recorded before it read the same
    assert validation("--seed", "3") == validation("--seed", "3", "--split-seed", "3")
    assert validation("--seed", "1", "--split-seed", "7") == validation("--seed", "2", "--split-seed", "7")
    assert validation("--seed", "1") != validation("--seed", "2")
    for hostile in ({"split_seed": [1]}, {"seed": "3"}, {"seed": -1}, {"val_fraction": "0.1"}, {"val_fraction": 2}):
        with pytest.raises(ConfigError, match="recorded recipe"):  # a bundle's recipe comes from anywhere
            recipe_splits(D224, hostile)
