"""Fix a dynamic-H/W fused model to the one input size it serves, so ONNX Runtime can fold its shape arithmetic.

A bundle exported with ``--dynamic-spatial`` computes, on every call, what depends on the input size:
the CAM's bilinear interpolation matrices, the early features' averaging matrices and (with the guard
subgraph, :mod:`gamguard.runtime.checks.graph`) the comparison grid's resampling matrices — a few
dozen small nodes (``Shape`` → ``Range`` → comparisons → ``Resize`` of an identity …) whose fixed cost
per node weighs on small models at batch 1. The guard only ever runs a bundle at its input spec's size
(:meth:`gamguard.runtime.guard.Guard.verify_tensor` refuses any other), so the engine fixes the input's
height and width there (the batch axis stays dynamic) and replaces every ``Shape`` of the input whose
sliced dims are now static by a constant. ONNX Runtime's constant folding then turns those chains into
constant matrices when the session is created: same graph, same numbers, fewer nodes per call.

The model on disk is unchanged (and still dynamic: a TensorRT plan with a spatial profile, or another
size, is built from it as before); only the session's copy is specialised.
"""

from __future__ import annotations

import numpy as np

from .base import INPUT_NAME, EngineError


def spatial_dims(model) -> tuple[object, object] | None:
    """The input's (H, W) dims as ints (static) or strings (symbolic), or None for a non-4-D input."""
    inputs = [i for i in model.graph.input if i.name == INPUT_NAME]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    if len(dims) != 4:
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims[2:])


def is_spatially_dynamic(model) -> bool:
    dims = spatial_dims(model)
    return dims is not None and not all(isinstance(d, int) for d in dims)


def specialize_spatial(model, height: int, width: int):
    """A copy of ``model`` (``onnx.ModelProto``) whose input is ``[N, C, height, width]``, with the
    input's ``Shape`` nodes over static dims replaced by constants and the ``cam`` output declared
    ``[N, height, width]`` (the fused model's contract). A model with a static input is returned as
    is when its size matches, and refused when it does not."""
    import onnx
    from onnx import helper, numpy_helper

    dims = spatial_dims(model)
    if dims is None:
        raise EngineError(f"the model's input {INPUT_NAME!r} is not [N, C, H, W]")
    if all(isinstance(d, int) for d in dims):
        if tuple(dims) != (height, width):
            raise EngineError(f"the model's input is {dims[0]}x{dims[1]}, not {height}x{width}")
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inp = next(i for i in graph.input if i.name == INPUT_NAME)
    shape = inp.type.tensor_type.shape.dim
    for d, v in zip(shape[2:], (height, width)):
        d.Clear()
        d.dim_value = int(v)
    static = [None] + [d.dim_value if d.HasField("dim_value") else None for d in shape[1:]]
    kept = []
    for node in graph.node:
        if node.op_type == "Shape" and node.input[0] == INPUT_NAME:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            part = static[slice(attrs.get("start", 0), attrs.get("end", None))]
            if part and all(v is not None for v in part):
                graph.initializer.append(numpy_helper.from_array(np.asarray(part, np.int64), node.output[0]))
                continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    for o in graph.output:
        if o.name == "cam" and len(o.type.tensor_type.shape.dim) == 3:
            for d, v in zip(o.type.tensor_type.shape.dim[1:], (height, width)):
                d.Clear()
                d.dim_value = int(v)
    # intermediate shapes recorded by the exporter are symbolic in H/W: let ONNX Runtime infer them again
    del graph.value_info[:]
    return out
