"""Whether an ONNX graph is the one a bundle's weights export to: a graph rebuilt from the weights here,
compared node by node.

Names are not compared (an exporter numbers its tensors as it likes), wiring is: every node's operator,
domain, attributes and the nodes or tensors its inputs come from, the graph's inputs and outputs, its
opsets and any model-local functions, subgraphs (a Scan body) alike. Tensors (initializers, Constant
values) are compared by value, exactly, except the int8 parameters that depend on the images a static
quantisation was calibrated on (activation ranges and the int32 biases scaled by them): those are
compared by what they compute, within bounds (:data:`CALIBRATION`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Calibration-dependent int8 parameters, against a rebuild calibrated on the reference X-rays. An activation's
# range may be up to ``range`` times as wide as the rebuild's (a coarser step) and must cover at least ``cover``
# of it (a narrower range clips); a quantised constant (int8 weight, int32 bias) must dequantise to the
# rebuild's within half a step of each (``steps`` half-steps), at a step at most ``range`` times the rebuild's.
# The shipped int8 model, calibrated on 256 training images, measures cover 0.98, width 1.46, step ratio 1.29
# and 1.00 half-steps at worst.
CALIBRATION = {"range": 3.0, "cover": 0.5, "steps": 1.001}


@dataclass
class _Flat:
    """A graph as a sequence of name-free entries (compared exactly) and the tensors they refer to."""

    entries: list[tuple] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    tensors: list[np.ndarray] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)  # top-level tensor name -> its name-free id
    outputs: dict[str, tuple] = field(default_factory=dict)  # top-level output name -> (source, type)

    def add(self, entry: tuple, label: str) -> None:
        self.entries.append(entry)
        self.labels.append(label)

    def tensor(self, value: np.ndarray) -> str:
        self.tensors.append(value)
        return f"t{len(self.tensors) - 1}"


def _type_of(value_info) -> tuple:
    t = value_info.type.tensor_type
    return (t.elem_type, tuple(d.dim_value or d.dim_param for d in t.shape.dim))


def _attribute(attr, flat: _Flat, ids: dict[str, str], where: str) -> tuple:
    from onnx import AttributeProto, helper, numpy_helper

    if attr.type == AttributeProto.TENSOR:
        return (attr.name, "tensor", flat.tensor(numpy_helper.to_array(attr.t)))
    if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
        graphs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
        for i, graph in enumerate(graphs):
            _walk(graph, flat, ids, f"{where}{attr.name}[{i}]: ")
        return (attr.name, "graph", len(graphs))
    if attr.type in (AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS, AttributeProto.TENSORS):
        return (attr.name, "unsupported", attr.type)  # never made by the export: differs from the rebuild
    value = helper.get_attribute_value(attr)
    return (attr.name, attr.type, tuple(value) if isinstance(value, list) else value)


def _walk(graph, flat: _Flat, outer: dict[str, str], where: str = "") -> dict[str, str]:
    from onnx import numpy_helper

    ids = dict(outer)
    initializers = {t.name: t for t in graph.initializer}
    flat.add(("sparse initializers", len(graph.sparse_initializer)), f"{where}sparse initializers")
    for i, value in enumerate(v for v in graph.input if v.name not in initializers):
        ids[value.name] = f"{where}input{i}"
        flat.add(("input", value.name if not where else i, _type_of(value)), f"{where}input {value.name!r}")

    def source(name: str) -> str:
        if name not in ids and name in initializers:
            ids[name] = flat.tensor(numpy_helper.to_array(initializers[name]))
        return ids.get(name, "") if name else "-"  # "" an undefined name: unlike any rebuilt graph's

    for index, node in enumerate(graph.node):
        label = f"{where}node {index} ({node.op_type})"
        inputs = tuple(source(n) for n in node.input)
        attributes = tuple(_attribute(a, flat, ids, f"{label} ") for a in sorted(node.attribute, key=lambda a: a.name))
        flat.add((node.op_type, node.domain, inputs, len(node.output), attributes), label)
        for j, name in enumerate(node.output):
            if name:
                ids[name] = f"{where}n{index}.{j}"
    for i, value in enumerate(graph.output):
        if where:
            flat.add(("output", i, source(value.name), _type_of(value)), f"{where}output {i}")
        else:
            flat.outputs[value.name] = (source(value.name), _type_of(value))
    return ids


def flatten(model) -> _Flat:
    """``model`` (an onnx ModelProto) as name-free entries and tensors."""
    flat = _Flat()
    opsets = tuple(sorted((o.domain, o.version) for o in model.opset_import))
    flat.add(("opsets", opsets), "opset imports")
    flat.add(("functions", len(model.functions)), "model-local functions")
    flat.ids = _walk(model.graph, flat, {})
    return flat


def _calibration_roles(model, flat: _Flat) -> dict[int, tuple[str, tuple[int, ...]]]:
    """The int8 parameters of a statically quantised graph that depend on its calibration images or on
    rounding, by tensor index: ``("range", (scale, zero point))`` per activation QuantizeLinear,
    ``("quantized", (values, scale, zero point))`` per quantised constant (int8 weights, int32 biases,
    whose steps follow the activation ranges); float tensors are compared exactly."""
    initializers = {t.name for t in model.graph.initializer}
    index = {name: int(i[1:]) for name, i in flat.ids.items() if i.startswith("t") and i[1:].isdigit()}
    roles = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        if not all(n in index for n in node.input[1:3]):
            continue
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers:
            members = tuple(index[n] for n in node.input[1:3])
            kind = "range"
        elif node.op_type == "DequantizeLinear" and node.input[0] in index:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            members = (*(index[n] for n in node.input[:3]), axis)
            kind = "quantized"
        else:
            continue
        for k in members[:3] if kind == "quantized" else members:
            roles.setdefault(k, (kind, members))
    return roles


def _representable(scale: np.ndarray, zero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    info = np.iinfo(zero.dtype)
    s, z = scale.astype(np.float64), zero.astype(np.float64)
    return (info.min - z) * s, (info.max - z) * s


def _range_difference(given: list[np.ndarray], rebuilt: list[np.ndarray]) -> str | None:
    (gs, gz), (rs, rz) = given, rebuilt
    if gs.shape != rs.shape or gz.shape != rz.shape or gz.dtype != rz.dtype or not np.all(gs > 0):
        return "its shape, type or sign differs"
    (glo, ghi), (rlo, rhi) = _representable(gs, gz), _representable(rs, rz)
    width = np.maximum(rhi - rlo, 1e-12)
    covered = (np.minimum(ghi, rhi) - np.maximum(glo, rlo)) / width
    if np.min(covered) < CALIBRATION["cover"]:
        return (
            f"it covers {np.min(covered):.2f} of the range the reference X-rays need (at least {CALIBRATION['cover']})"
        )
    if np.max((ghi - glo) / width) > CALIBRATION["range"]:
        return f"it is {np.max((ghi - glo) / width):.1f} times as wide as they need (at most {CALIBRATION['range']:g})"
    return None


def _quantized_difference(given: list[np.ndarray], rebuilt: list[np.ndarray], axis: int) -> str | None:
    (gq, gs, gz), (rq, rs, rz) = given, rebuilt
    if gq.shape != rq.shape or gs.shape != rs.shape or gq.dtype != rq.dtype or not np.all(gs > 0):
        return "its shape, type or sign differs"
    ratio = gs.astype(np.float64) / rs
    if np.max(ratio) > CALIBRATION["range"]:
        return f"its step is {np.max(ratio):.1f} times the rebuild's (at most {CALIBRATION['range']:g})"
    shape = [1] * gq.ndim
    if gs.ndim == 1 and gq.ndim > 1:
        shape[axis] = -1  # per channel along the node's axis
    steps = [np.reshape(s, shape) if s.ndim and gq.ndim > 1 else s for s in (gs, gz, rs, rz)]
    g = (gq.astype(np.float64) - steps[1]) * steps[0]
    r = (rq.astype(np.float64) - steps[3]) * steps[2]
    off = np.abs(g - r) / (0.5 * (steps[0] + steps[2]))
    if np.max(off) > CALIBRATION["steps"]:
        return f"it is {np.max(off):.1f} half-steps from the weights' value (at most {CALIBRATION['steps']:g})"
    return None


def _tensor_difference(k: int, given: list[np.ndarray], rebuilt: list[np.ndarray], roles: dict) -> str | None:
    if k in roles:
        kind, members = roles[k]
        if k != members[0]:
            return None  # checked with the first of its group
        if kind == "range":
            reason = _range_difference([given[i] for i in members], [rebuilt[i] for i in members])
        else:
            *arrays, axis = members
            reason = _quantized_difference([given[i] for i in arrays], [rebuilt[i] for i in arrays], axis)
        return None if reason is None else f"an int8 {'activation range' if kind == 'range' else 'constant'}: {reason}"
    a, b = given[k], rebuilt[k]
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
        return "its values differ from the weights'"
    return None


def graph_difference(given, rebuilt, calibrated: bool = False) -> str | None:
    """How ``given`` differs from ``rebuilt`` (onnx ModelProtos), in words, or None where they are the same
    graph (``given`` may leave out outputs of ``rebuilt``, never add one). ``calibrated``: both are statically
    quantised, so the calibration-dependent int8 parameters are compared within :data:`CALIBRATION`, every
    other tensor exactly."""
    g, r = flatten(given), flatten(rebuilt)
    for i, (a, b) in enumerate(zip(g.entries, r.entries)):
        if a != b:
            return f"{g.labels[i]} is not the rebuilt graph's {r.labels[i]}"
    if len(g.entries) > len(r.entries):
        return f"{g.labels[len(r.entries)]} is not in the rebuilt graph"
    if len(g.entries) < len(r.entries):
        return f"the graph ends where the rebuilt graph has {r.labels[len(g.entries)]}"
    for name, output in g.outputs.items():  # a subset: an older export gave no feature_map
        if r.outputs.get(name) != output:
            return f"output {name!r} is not the rebuilt graph's"
    roles = _calibration_roles(rebuilt, r) if calibrated else {}
    for k in range(len(r.tensors)):
        reason = _tensor_difference(k, g.tensors, r.tensors, roles)
        if reason:
            return f"tensor {k} ({_used_by(r, k)}): {reason}"
    return None


def _used_by(flat: _Flat, k: int) -> str:
    """The label of the first entry that refers to tensor ``k``."""
    name = f"t{k}"
    for entry, label in zip(flat.entries, flat.labels):
        if name in _strings(entry):
            return f"an input of {label}"
    return "unused"


def _strings(entry) -> set[str]:
    if isinstance(entry, tuple):
        return set().union(*map(_strings, entry)) if entry else set()
    return {entry} if isinstance(entry, str) else set()
