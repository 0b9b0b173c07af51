"""`pneumoscan heads fit`: the feature heads fitted onto an existing bundle, recorded and checked."""

import hashlib
import json
import shutil
from dataclasses import fields

import pytest

from pneumoscan.cli.main import main
from pneumoscan.model.schema import CARD, GATE, SUBTYPE
from pneumoscan.model.store import load_bundle


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.data
def test_heads_fit_writes_the_subtype_head_records_it_and_regenerates_the_card(trained_bundle, small_data, tmp_path):
    copy = shutil.copytree(trained_bundle.path, tmp_path / "model")
    gate_before = (copy / GATE).read_bytes() if (copy / GATE).exists() else None
    (copy / SUBTYPE).unlink(missing_ok=True)  # a bundle from before the head existed...
    config = json.loads((copy / "config.json").read_text())
    config.get("files", {}).pop(SUBTYPE, None)  # ...records none
    (copy / "config.json").write_text(json.dumps(config))
    (copy / CARD).write_text("stale card")
    assert load_bundle(copy).load_subtype() is None

    code = main(["heads", "fit", str(copy), "--data", str(small_data), "--only", "subtype", "--quiet"])

    assert code == 0
    bundle = load_bundle(copy)  # checks every recorded sha256
    assert bundle.config["files"][SUBTYPE] == _sha256(copy / SUBTYPE)
    assert bundle.load_subtype() is not None and "subtype" in bundle.metrics["validation"]
    assert (copy / CARD).read_text() != "stale card"
    assert gate_before is None or (copy / GATE).read_bytes() == gate_before  # --only subtype leaves the gate


def test_heads_fit_refuses_a_bad_value_as_the_api_does(tmp_path, capsys):
    from pneumoscan.core.errors import ConfigError
    from pneumoscan.training.heads import fit_heads

    assert main(["heads", "fit", str(tmp_path), "--data", str(tmp_path), "--only", "lungs"]) == 2
    with pytest.raises(ConfigError) as raised:
        fit_heads(tmp_path, tmp_path, only="lungs")
    assert capsys.readouterr().err == f"pneumoscan: error: {raised.value}\n"


def test_only_takes_the_heads_there_are():
    from pneumoscan.core.settings import _spec
    from pneumoscan.training.heads import FITTERS, HeadsFitOptions

    only = next(f for f in fields(HeadsFitOptions) if f.name == "only")
    assert set(_spec(only).choices) == set(FITTERS)
