"""``pneumoscan verify``: a bundle's ONNX models against its weights, on the bundled reference X-rays."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from corpus import REAL

pytestmark = pytest.mark.data

CLI = [sys.executable, "-m", "pneumoscan.cli"]


def _cli(*args, **kw):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


def _edit(bundle_path, name: str, edit) -> None:
    """Edit an ONNX graph of the bundle with ``edit(model)``, keep its metadata (the weights digest included)
    and re-record its sha256 in config.json: what a hostile author can do."""
    import onnx

    from pneumoscan.model.backbones import sha256_file

    path = bundle_path / name
    model = onnx.load(str(path))
    edit(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    config = json.loads((bundle_path / "config.json").read_text())
    config["files"][name] = sha256_file(path)
    (bundle_path / "config.json").write_text(json.dumps(config))


def _after(model, tensor: str, nodes) -> None:
    """Make ``tensor`` (a graph output: logit or features) the result of ``nodes(raw)`` on what computed it."""
    graph = model.graph
    index = next(i for i, n in enumerate(graph.node) if tensor in n.output)
    producer = graph.node[index]
    producer.output[:] = [f"{tensor}.raw" if o == tensor else o for o in producer.output]
    for offset, node in enumerate(nodes(f"{tensor}.raw")):
        graph.node.insert(index + 1 + offset, node)


def _constant(model, name: str, value) -> str:
    import numpy as np
    from onnx import numpy_helper

    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    return name


def shift(tensor: str, offset):
    """Every ``tensor`` (logit or features) gets ``offset`` added."""

    def edit(model):
        from onnx import helper

        _after(
            model, tensor, lambda raw: [helper.make_node("Add", [raw, _constant(model, "a.offset", offset)], [tensor])]
        )

    return edit


def scale(tensor: str, factor: float):
    def edit(model):
        from onnx import helper

        _after(
            model, tensor, lambda raw: [helper.make_node("Mul", [raw, _constant(model, "a.factor", factor)], [tensor])]
        )

    return edit


def trigger(tensor: str, offset, key: str):
    """``tensor`` gets ``offset`` added only on inputs with a property the reference X-rays never have: a mean
    brightness over 250 (``bright``), or a top-left pixel of exactly 77 (``pixel``)."""

    def edit(model):
        import numpy as np
        from onnx import helper, numpy_helper

        g = model.graph
        ints = [
            numpy_helper.from_array(np.array(v, np.int64), n)
            for n, v in [("a.zero", [0, 0]), ("a.one", [1, 1]), ("a.axes", [2, 3]), ("a.flat", [-1]), ("a.col", [1])]
        ]
        g.initializer.extend(ints)
        if key == "bright":
            statistic = [
                helper.make_node("Cast", ["image"], ["a.float"], to=1),
                helper.make_node("ReduceMean", ["a.float"], ["a.value"], axes=[1, 2, 3], keepdims=0),
            ]
            test = helper.make_node("Greater", ["a.value", _constant(model, "a.level", 250.0)], ["a.on"])
        else:
            statistic = [
                helper.make_node("Slice", ["image", "a.zero", "a.one", "a.axes"], ["a.corner"]),
                helper.make_node("Cast", ["a.corner"], ["a.float"], to=1),
                helper.make_node("Reshape", ["a.float", "a.flat"], ["a.value"]),
            ]
            test = helper.make_node("Equal", ["a.value", _constant(model, "a.level", 77.0)], ["a.on"])
        cond = "a.on"
        unsqueeze = []
        if tensor == "features":
            unsqueeze = [helper.make_node("Unsqueeze", ["a.on", "a.col"], ["a.on2"])]
            cond = "a.on2"

        def nodes(raw):
            return [
                *statistic,
                test,
                *unsqueeze,
                helper.make_node("Add", [raw, _constant(model, "a.offset", offset)], ["a.shifted"]),
                helper.make_node("Where", [cond, "a.shifted", raw], [tensor]),
            ]

        _after(model, tensor, nodes)

    return edit


def nudge_weight(factor: float):
    """One float weight (the largest initializer) multiplied by ``factor``: no node added."""

    def edit(model):
        from onnx import numpy_helper

        floats = [t for t in model.graph.initializer if t.data_type == 1]
        target = max(floats, key=lambda t: numpy_helper.to_array(t).size)
        target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * factor, target.name))

    return edit


def int8_bias(steps: int):
    """The int32 bias of the int8 model's last convolution moved by ``steps`` quantisation steps: the features
    shift, and no node or tensor is added."""

    def edit(model):
        from onnx import numpy_helper

        g = model.graph
        initializers = {t.name: t for t in g.initializer}
        biases = [
            n.input[0]
            for n in g.node
            if n.op_type == "DequantizeLinear"
            and n.input[0] in initializers
            and initializers[n.input[0]].data_type == 6
        ]
        target = initializers[biases[-1]]
        target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) + steps, target.name))

    return edit


def int8_range(factor: float):
    """The activation range of the int8 model's features (its QuantizeLinear scale) narrowed by ``factor``."""

    def edit(model):
        from onnx import numpy_helper

        g = model.graph
        initializers = {t.name: t for t in g.initializer}
        name = next(n.input[1] for n in g.node if n.op_type == "QuantizeLinear" and n.output[0].startswith("features"))
        target = initializers[name]
        target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * factor, target.name))

    return edit


def test_verify_passes_a_bundle_exported_here(exported_bundle):
    done = _cli("verify", "--model", exported_bundle.path)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.strip().splitlines()
    assert rows[0].startswith("engine"), done.stdout
    assert rows[1].startswith("onnx ") and rows[2].startswith("onnx-int8") and all(" ok " in r for r in rows[1:3])
    assert all(" same " in r for r in rows[1:3]), done.stdout
    assert rows[3].startswith("images: 16 reference X-rays and 16 probe images made from seed ")
    not_proven = [r for r in rows[4:] if r.startswith("not proven: ")]
    assert len(not_proven) == len(rows) - 4 and any("onnx-int8: its activation ranges" in r for r in not_proven)


def test_each_run_probes_with_images_of_its_own(exported_bundle):
    """The probe images come from a fresh seed each run: a graph cannot be made to behave on them alone."""
    from pneumoscan.evaluation.verify import probe_images, reference_images, verify_bundle
    from pneumoscan.io.images import prepare

    films = np.stack([prepare(f, exported_bundle.preprocessing) for f in reference_images()])
    a, b = probe_images(films, 1), probe_images(films, 2)
    assert a.shape == b.shape == (16, *films.shape[1:]) and a.dtype == np.uint8 and not np.array_equal(a, b)
    assert np.array_equal(a, probe_images(films, 1))
    seeds = {verify_bundle(exported_bundle.path)[0].seed for _ in range(2)}
    assert len(seeds) == 2


def test_a_graph_with_its_tensors_renamed_is_the_same_graph(exported_bundle):
    """The comparison follows wiring and values, not the names an exporter gives its tensors."""
    import onnx

    from pneumoscan.model.onnx_compare import graph_difference

    model = onnx.load(str(exported_bundle.path / "model.int8.onnx"))
    renamed = onnx.load(str(exported_bundle.path / "model.int8.onnx"))
    kept = {"image", "logit", "features", "feature_map"}
    names = {t.name: f"x{i}" for i, t in enumerate(renamed.graph.initializer)}
    names.update(
        {o: f"y{i}.{j}" for i, n in enumerate(renamed.graph.node) for j, o in enumerate(n.output) if o not in kept}
    )
    for t in renamed.graph.initializer:
        t.name = names[t.name]
    for n in renamed.graph.node:
        n.input[:] = [names.get(x, x) for x in n.input]
        n.output[:] = [names.get(x, x) for x in n.output]
        n.name = ""
    assert graph_difference(renamed, model, calibrated=True) is None
    nudge_weight(1.0001)(renamed)
    assert "values differ" in graph_difference(renamed, model, calibrated=True)


EDITS = {
    "logit +0.5": ("model.onnx", shift("logit", 0.5)),
    "logit +8 (int8)": ("model.int8.onnx", shift("logit", 8.0)),
    "features +0.05": ("model.onnx", shift("features", 0.05)),
    "features -0.02 (int8)": ("model.int8.onnx", shift("features", -0.02)),
    "features x1.02 (int8)": ("model.int8.onnx", scale("features", 1.02)),
    "features x0.9": ("model.onnx", scale("features", 0.9)),
    "bright trigger": ("model.onnx", trigger("logit", -6.0, "bright")),
    "pixel trigger (int8)": ("model.int8.onnx", trigger("logit", -6.0, "pixel")),
    "features trigger (int8)": ("model.int8.onnx", trigger("features", -1.0, "bright")),
    "a weight x1.0001": ("model.onnx", nudge_weight(1.0001)),
    "a weight x1.01 (int8)": ("model.int8.onnx", nudge_weight(1.01)),
    "last bias +3 steps (int8)": ("model.int8.onnx", int8_bias(3)),
    "features range x0.3 (int8)": ("model.int8.onnx", int8_range(0.3)),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_verify_catches_an_edited_graph_that_loads(exported_bundle, tmp_path, edit):
    """Each edit keeps the metadata and re-records the digest, so the bundle loads and predicts; verify names
    the edited model as not the graph its weights export to, and passes the other."""
    from pneumoscan import Classifier
    from pneumoscan.evaluation.verify import verify_bundle

    name, change = EDITS[edit]
    copy = shutil.copytree(exported_bundle.path, tmp_path / "model")
    _edit(copy, name, change)
    clf = Classifier.load(copy, engine="onnx", int8=name.endswith("int8.onnx"))  # every load check passes
    assert clf.predict_one(REAL).ok
    checks = {c.engine: c for c in verify_bundle(copy)}
    edited = "onnx-int8" if "int8" in name else "onnx"
    assert not checks[edited].ok and checks[edited].graph is not None, checks[edited]
    assert all(c.ok for engine, c in checks.items() if engine != edited)
    if edit == "logit +8 (int8)":  # the numbers catch a large edit too, besides the graph
        assert checks[edited].mean_logit == pytest.approx(8.0, abs=1.0)
        done = _cli("verify", "--model", copy)
        assert done.returncode == 1 and "FAIL" in done.stdout and " DIFFERS " in done.stdout, done.stdout
        assert name in done.stderr and "not the graph its weights export to" in done.stderr, done.stderr


def test_the_bundled_default_passes():
    done = _cli("verify")
    assert done.returncode == 0 and "FAIL" not in done.stdout and "DIFFERS" not in done.stdout, (
        done.stdout,
        done.stderr,
    )


def _towards_normal(bundle, size: float) -> np.ndarray:
    """A feature offset of ``size`` times the mean feature norm, along the direction that lowers the head's logit."""
    from pneumoscan.evaluation.verify import reference_images
    from pneumoscan.inference.engines import OnnxEngine
    from pneumoscan.io.images import prepare

    head = bundle.head_weights()
    direction = -(head["w2"] @ head["w1"])[0]
    images = np.stack([prepare(f, bundle.preprocessing) for f in reference_images()])
    _, features = OnnxEngine(bundle.onnx_path(), bundle).run(images)
    norm = float(np.linalg.norm(features, axis=1).mean())
    return (size * norm * direction / np.linalg.norm(direction)).astype(np.float32)


HEAD_ONLY_EDITS = [
    "features towards NORMAL x0.5",
    "features towards NORMAL x0.02",
    "features x0.95",
    "features trigger",
    "logit +0.5",
]


@pytest.mark.backbones
@pytest.mark.parametrize("edit", HEAD_ONLY_EDITS)
def test_verify_catches_an_edited_head_only_graph(head_only_bundle, tmp_path, edit):
    """A head-only bundle (a frozen DINOv2) ships its backbone only as an int8 graph: verify rebuilds that graph
    from the registry's pinned weights, so an edit is caught whatever its size, and compares its logits with the
    head on the float32 backbone's features, so a shift that moves answers is caught by the numbers too."""
    from pneumoscan.evaluation.verify import TOLERANCE, verify_bundle

    bundle, _ = head_only_bundle
    (genuine,) = verify_bundle(bundle.path)
    assert genuine.ok and genuine.graph is None and genuine.tolerance == TOLERANCE["head-only"], genuine
    copy = shutil.copytree(bundle.path, tmp_path / "dinov2")
    if edit.startswith("features towards"):
        change = shift("features", _towards_normal(bundle, float(edit.rsplit("x", 1)[1])))
    elif edit == "features x0.95":
        change = scale("features", 0.95)
    elif edit == "features trigger":
        change = trigger("features", _towards_normal(bundle, 0.5), "bright")
    else:
        change = shift("logit", 0.5)
    _edit(copy, "model.onnx", change)
    (check,) = verify_bundle(copy)
    assert not check.ok and check.graph is not None, check
    if edit == "features towards NORMAL x0.5":  # the answers move: the float32 backbone and the head say so too
        assert check.max_logit > check.tolerance["logit"] and check.mean_logit < -check.tolerance["mean_logit"]
        done = _cli("verify", "--model", copy)
        assert done.returncode == 1 and "not the graph its weights export to" in done.stderr, done.stderr


def test_verify_without_torch_is_one_line(exported_bundle, tmp_path):
    """Where PyTorch is not installed (the base install), verify says so in one line, exit 2."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    done = _cli("verify", "--model", exported_bundle.path, env=env)
    assert done.returncode == 2 and "PyTorch" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_int8_with_the_torch_engine_is_refused(exported_bundle):
    done = _cli("predict", REAL, "--model", exported_bundle.path, "--int8", "--engine", "torch")
    assert done.returncode == 2 and "--int8" in done.stderr and len(done.stderr.strip().splitlines()) == 1
