"""Cell probability maps from trained models: OneFlow checkpoints, ONNX exports, or an ensemble of them.

    spec = Spec(("checkpoints/best",), device="cpu", tile=0, overlap=64, tta=False)
    predictor = Predictor.open(spec)           # every model loaded and checked now
    prob = predictor(image)                    # uint8 HxW slice -> float32 HxW cell probability in [0, 1]
    prob = predictor.window(x)                 # the same from a standardised window (isbi_unet/volume.py's blocks)

A backend runs one model: `backend.probabilities(batch)` maps float32 Nx1xhxw to cell probabilities of the same
shape. `backend_class` alone tells model kinds apart, by path. A Predictor averages its backends (an ensemble)
and owns the overlap-tile and TTA settings. OneFlow is imported only by a OneFlow backend, so ONNX models run
without it.
"""

import functools
import os
from typing import NamedTuple, Optional

from isbi_unet.errors import DataError
from isbi_unet.formats import POOL
from isbi_unet.images import preprocess
from isbi_unet.onnx_backend import fixed_tile, is_onnx, load_onnx, onnx_forward
from isbi_unet.openvino_backend import ENGINES, ONNX_RUNTIME, OpenVinoBackend
from isbi_unet.tiling import predict_tiled


class OneFlowBackend:
    """A checkpoint directory written by TrainUnetDataSet.py, run by OneFlow, eagerly or through nn.Graph."""

    runtime = "OneFlow"
    uses_every_core = False  # eager CPU kernels keep about one core busy: more cores want more processes
    input_size = None  # any size that four poolings divide

    def __init__(self, path, device, graph, threads):
        from isbi_unet.checkpoint import load_model
        from isbi_unet.engine import InferenceGraphs

        self.model, self.state = load_model(path, device)
        self.device = device
        self.run = InferenceGraphs(self.model) if graph else self.model

    def probabilities(self, batch):
        import oneflow as flow

        with flow.no_grad():
            return flow.sigmoid(self.run(flow.tensor(batch, device=self.device))).numpy()


class OnnxBackend:
    """An export_onnx.py file or bioimage.io package, run by ONNX Runtime on the CPU (at any size, or at the
    fixed input size of an older export)."""

    runtime = "ONNX Runtime"
    uses_every_core = True  # ONNX Runtime's own threads

    def __init__(self, path, device, graph, threads):
        session, self.state = load_onnx(path, threads)
        self.input_size = self.state.get("input_size")
        self.probabilities = onnx_forward(session)


def backend_class(path, engine=ONNX_RUNTIME):
    """The backend that runs the model at `path`: the one place where model kinds are told apart (by name); an
    ONNX model runs in --engine's runtime."""
    if not is_onnx(path):
        return OneFlowBackend
    return OnnxBackend if engine == ONNX_RUNTIME else OpenVinoBackend


def open_model(path, device="cpu", graph=False, threads=None, engine=ONNX_RUNTIME):
    """The model at `path`, loaded and checked (a bad file is one DataError), behind its backend."""
    kind = backend_class(path, engine)
    if kind is OpenVinoBackend:
        return OpenVinoBackend(path, threads, ENGINES[engine])
    return kind(path, device=device, graph=graph, threads=threads)


def uses_every_core(paths):
    """Whether every model's runtime spreads itself over the cores, so that one process is enough."""
    return all(backend_class(p).uses_every_core for p in paths)


def threads_per_process(workers):
    """ONNX Runtime's threads in each of `workers` processes: the cores, shared out."""
    return max(1, len(os.sched_getaffinity(0)) // workers)


def common_input_size(backends):
    """The input size the fixed-size models share (None without any); two different sizes are refused."""
    sizes = sorted({b.input_size for b in backends if b.input_size})
    if len(sizes) > 1:
        raise DataError(f"the .onnx models take different input sizes {sizes}; export them at one --size")
    return sizes[0] if sizes else None


class Spec(NamedTuple):
    """What a process needs to build a Predictor: small and picklable, so each pool worker builds its own."""

    checkpoints: tuple
    device: str = "cpu"
    graph: bool = False
    tile: int = 0
    overlap: int = 64
    tta: bool = False
    threads: Optional[int] = None
    engine: str = ONNX_RUNTIME  # what runs the ONNX models (openvino_backend.ENGINES)


class Predictor:
    """uint8 HxW slice -> float32 HxW cell probability: the mean over `backends`, tiled and flipped as set."""

    def __init__(self, backends, tile, overlap, tta, spec=None):
        self.backends, self.tile, self.overlap, self.tta, self.spec = list(backends), tile, overlap, tta, spec
        self.states = [b.state for b in self.backends]  # checkpoint dicts, for run.json and the summary
        self.runtimes = {b.runtime for b in self.backends}
        self.size = common_input_size(self.backends)
        if self.size:
            fixed_tile((self.size, self.size), self.size, tile)  # refuses a --tile the models cannot take

    @classmethod
    def open(cls, spec):
        """Loads every model of `spec` once, in order; the first bad one raises its DataError."""
        backends = [open_model(c, spec.device, spec.graph, spec.threads, spec.engine) for c in spec.checkpoints]
        return cls(backends, spec.tile, spec.overlap, spec.tta, spec)

    def release(self):
        """Lets this process's models go, for workers that load their own; returns the spec they load."""
        self.backends = []
        return self.spec

    def probabilities(self, batch):
        """The members' mean, summed in order: one member's map comes back exactly."""
        return sum(b.probabilities(batch) for b in self.backends) / len(self.backends)

    def plan(self, shape):
        """(tile, overlap) for an image of `shape`: as set, or tiles of the fixed input size where it needs them."""
        if not self.size:
            return self.tile, self.overlap
        tile = fixed_tile(shape, self.size, self.tile)
        return tile, min(self.overlap, tile - POOL) if tile else self.overlap

    def __call__(self, image):
        return self.window(preprocess(image))

    def window(self, x):
        """float32 hxw cell probability of a standardised float32 1xhxw window (a whole slice, or a block's window:
        isbi_unet/blocks.py) in one pass, flipped as set; a fixed-size ONNX model tiles it at its size."""
        tile, overlap = self.plan(x.shape)
        return predict_tiled(self.probabilities, x, tile=tile, overlap=overlap, tta=self.tta)[0]

    def tiling_note(self, shapes):
        """The line saying which images a fixed input size makes tiled; None when none is, or tiles were asked."""
        tiled = [s for s in shapes if fixed_tile(s, self.size)] if self.size and not self.tile else []
        if not tiled:
            return None
        return (
            f"{len(tiled)} of {len(shapes)} images (e.g. {tiled[0][1]}x{tiled[0][0]}) differ from the ONNX "
            f"export's {self.size}x{self.size}: overlap-tile inference at {self.size}"
        )

    def record(self):
        """run.json's fields on the models: scalars for one, lists for an ensemble."""
        epochs, configs = [s.get("epoch") for s in self.states], [s["model_config"] for s in self.states]
        one = len(self.states) == 1
        return {"checkpoint_epoch": epochs[0] if one else epochs, "model_config": configs[0] if one else configs}

    def describe_settings(self):
        """`, tiles 256, TTA, graph, ONNX Runtime`: what the summary line names of how the maps were made."""
        tiles = f", tiles {self.tile}" if self.tile else ""
        graph = ", graph" if self.spec and self.spec.graph else ""
        onnx = ", ONNX Runtime" if OnnxBackend.runtime in self.runtimes else ""
        vino = [b for b in self.backends if isinstance(b, OpenVinoBackend)]
        onnx += f", OpenVINO {vino[0].precision}" if vino else ""
        return f"{tiles}{', TTA' if self.tta else ''}{graph}{onnx}"

    def describe(self):
        """`UNet{config}, epoch E` for one model, `mean of N checkpoints, epochs E1, E2` for an ensemble."""
        if len(self.states) == 1:
            return f"UNet{self.states[0]['model_config']}, epoch {self.states[0].get('epoch')}"
        epochs = ", ".join(str(s.get("epoch")) for s in self.states)
        return f"mean of {len(self.states)} checkpoints, epochs {epochs}"


@functools.lru_cache(maxsize=1)
def worker_predictor(spec):
    """This worker process's predictor: built by its first task, so a load error reaches the parent as one."""
    return Predictor.open(spec)


def predict_in_worker(spec, image):
    return worker_predictor(spec)(image)
