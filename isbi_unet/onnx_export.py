"""OneFlow model -> size-free ONNX file with OneFlow's own converter (oneflow-onnx): what export_onnx.py,
benchmark.py and prediction's ONNX Runtime engine all run.

    convert(model, size, "unet.onnx")     # compiled as an nn.Graph at 1x1xSIZExSIZE, sigmoid included
    free_sizes("unet.onnx", MIN_OPSET)     # pixel shuffles -> DepthToSpace: batch, height and width free
    add_metadata("unet.onnx", state, size, checkpoint)   # what isbi_unet/onnx_backend.py reads back
    write_onnx(model, state, checkpoint, "unet.onnx", size, opset)   # all three

    python3 -m isbi_unet.onnx_export CHECKPOINT OUT.onnx   # write_onnx, unchecked: predictor.py runs it in a child

The converter writes each up-convolution's pixel shuffle as reshapes to the traced shape; they become ONNX
DepthToSpace (opset 11 or more, at the lowest IR version that opset allows).
"""

from isbi_unet.process.interrupt import guard_start_up, signals_held

if __name__ == "__main__":
    guard_start_up()  # a Ctrl-C inside `import oneflow` (isbi_unet/process/interrupt.py)

import json
import os
import sys
import tempfile

import numpy as np
import oneflow as flow

from isbi_unet import onnx_backend as ob
from isbi_unet.errors import DataError

MIN_OPSET = 11  # DepthToSpace's CRD mode, the up-convolutions' pixel shuffle
MAX_OPSET = 21  # the newest opset onnx 1.16 defines and ONNX Runtime 1.19 runs: a higher one fails in the checker
PIXEL_SHUFFLE = [0, 1, 4, 2, 5, 3]  # model.UpConv2x2's permute: (n, o, 2, 2, h, w) -> (n, o, h, 2, w, 2)
FREE_DIMS = {0: "batch", 2: "height", 3: "width"}


def import_converter():
    if "bool" not in np.__dict__:  # __dict__, as hasattr would trigger NumPy 1.26's FutureWarning
        # oneflow-onnx 0.6.2's util.py maps TensorProto.BOOL to np.bool, which NumPy 1.24 removed.
        np.bool = bool
    try:
        from oneflow_onnx.oneflow2onnx.util import export_onnx_model
    except ImportError:
        raise DataError(f"exporting needs oneflow-onnx, which is not installed: {ob.INSTALL}") from None
    return export_onnx_model


class ProbabilityGraph(flow.nn.Graph):
    """sigmoid(model(x)), compiled at one input shape: what the converter reads."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def build(self, x):
        return flow.sigmoid(self.model(x))


def convert(model, size, path, opset=None):
    """Writes the converted graph to `path`; the converter's weight folder lives in a temporary dir."""
    export_onnx_model = import_converter()
    graph = ProbabilityGraph(model)
    graph._compile(flow.zeros(1, 1, size, size))  # the converter reads the compiled graph's ops
    with tempfile.TemporaryDirectory() as weights:
        flow.save(graph.state_dict(), weights)
        stdout, sys.stdout = sys.stdout, sys.stderr  # its progress prints go to stderr, our result to stdout
        try:
            export_onnx_model(graph, opset=opset, flow_weight_dir=weights, onnx_model_path=path)
        except Exception as e:  # e.g. bilinear=True: its handler for align_corners upsampling fails
            detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise DataError(f"OneFlow's converter (oneflow-onnx) failed on UNet{model.config()}: {detail}") from None
        finally:
            sys.stdout = stdout


def perm(node):
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def pixel_shuffles(graph):
    """(reshape, transpose, reshape) triples of the converted UpConv2x2 pixel shuffles, each a private chain."""
    producer = {out: node for node in graph.node for out in node.output}
    users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    triples = []
    for node in graph.node:
        if node.op_type != "Transpose" or perm(node) != PIXEL_SHUFFLE:
            continue
        before, after = producer.get(node.input[0]), users.get(node.output[0], [])
        if before is not None and before.op_type == "Reshape" and len(users[before.output[0]]) == 1:
            if len(after) == 1 and after[0].op_type == "Reshape":
                triples.append((before, node, after[0]))
    return triples


def to_depth_to_space(model):
    """Each pixel shuffle as one DepthToSpace(2, CRD): the same permutation, with no traced shape in it."""
    from onnx import helper

    graph = model.graph
    replaced = {}
    for before, transpose, after in pixel_shuffles(graph):
        d2s = helper.make_node(
            "DepthToSpace", [before.input[0]], [after.output[0]], name=transpose.name, blocksize=2, mode="CRD"
        )
        replaced[before.name], replaced[transpose.name], replaced[after.name] = d2s, None, None
    nodes = [replaced.get(n.name, n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(n for n in nodes if n is not None)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]  # the dropped reshapes' shape constants go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(replaced) // 3


def free_sizes(path, opset):
    """Rewrites the converted file in place so that batch, height and width are free; DataError if it cannot."""
    import onnx

    model = onnx.load(path)
    shuffles = to_depth_to_space(model)
    left = [n.name for n in model.graph.node if n.op_type == "Reshape"]
    if left:  # a shape the converter fixed at the traced size, in a pattern not known here
        raise DataError(f"the converted graph keeps {len(left)} reshape(s) to the traced size ({left[0]})")
    del model.graph.value_info[:]  # intermediate shapes recorded at the traced size
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, name in FREE_DIMS.items():
            dims[axis].dim_param = name  # replaces dim_value (a oneof)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, opset)
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return shuffles


def add_metadata(path, state, size, checkpoint):
    """Model config, traced size, preprocessing and provenance into metadata_props, in place."""
    import onnx

    model = onnx.load(path)
    meta = {
        ob.KEY_FORMAT: ob.FORMAT,
        ob.KEY_CONFIG: json.dumps(state["model_config"]),
        ob.KEY_SIZE: str(size),
        ob.KEY_PREPROCESS: ob.PREPROCESS,
        ob.KEY_OUTPUT: ob.OUTPUT,
        ob.KEY_EPOCH: json.dumps(state.get("epoch")),
        ob.KEY_SOURCE: os.path.abspath(checkpoint),
    }
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)


def write_onnx(model, state, checkpoint, path, size, opset):
    """The size-free ONNX file export_onnx.py writes, before its check: converted (a Ctrl-C meanwhile held until the
    converter returns: its bare `except:` clauses would swallow it), sizes freed, metadata added."""
    with signals_held():
        convert(model, size, path, opset)
    free_sizes(path, opset)
    add_metadata(path, state, size, checkpoint)


# A child converts at this size: the traced size does not matter once the sizes are freed, and compiling the graph
# at 16 px keeps the child small.
CHILD_SIZE = 16


def main(argv=None):
    """CHECKPOINT OUT: the checkpoint as the size-free ONNX file export_onnx.py writes, without its check against
    OneFlow (the caller compares what it needs). A bad checkpoint or a failed conversion is one `error:` line."""
    from isbi_unet.checkpoint import load_model

    checkpoint, out = sys.argv[1:] if argv is None else argv
    model, state = load_model(checkpoint, "cpu")
    write_onnx(model, state, checkpoint, out, CHILD_SIZE, MIN_OPSET)


if __name__ == "__main__":
    from isbi_unet.process import run_main

    run_main(main)
