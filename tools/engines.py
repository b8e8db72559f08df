"""ONNX Runtime and OpenVINO side by side on an export_onnx.py file: time, the largest probability difference from
ONNX Runtime, and the ISBI scores of held-out slices with each engine and precision.

    python3 tools/engines.py --onnx unet.onnx --images data/train/image --labels data/train/label --slices 20-24

Sizes 512, 1024 and 2048 px are made by tiling the first slice (2x2, 4x4); every engine runs a warm-up pass, then
the best of --repeat passes is reported (best, not mean: the quietest measure on a shared machine). OpenVINO is
optional (`pip install openvino`); without it only ONNX Runtime is measured. Prints a Markdown table
(docs/volumes.md quotes it).
"""

import argparse
import os
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from isbi_unet.images import preprocess  # noqa: E402
from isbi_unet.metrics import evaluate_slices  # noqa: E402
from isbi_unet.onnx_backend import onnx_forward, open_session  # noqa: E402

SIZES = (512, 1024, 2048)
THRESHOLD = 1 / 255  # an engine within this of ONNX Runtime everywhere keeps the answer (prob PNGs are x 255)


def onnx_runtime(path):
    return onnx_forward(open_session(path))


def openvino_engine(path, precision):
    """OpenVINO's CPU plugin on the ONNX file, at `precision` (f32, or bf16 where the CPU has it)."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()

    def forward(batch):
        return np.array(request.infer([np.asarray(batch, np.float32)])[compiled.output(0)])

    return forward


def engines(path):
    """(name, forward) for every engine installed here."""
    found = [("ONNX Runtime f32", onnx_runtime(path))]
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("OpenVINO is not installed: ONNX Runtime only", file=sys.stderr)
        return found
    return found + [("OpenVINO f32", openvino_engine(path, "f32")), ("OpenVINO bf16", openvino_engine(path, "bf16"))]


def best_time(forward, x, repeat):
    forward(x)  # warm-up: OpenVINO compiles a shape on its first pass
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - t0)
    return min(times)


def read(folder, name):
    return cv2.imread(os.path.join(folder, name), cv2.IMREAD_GRAYSCALE)


def slice_range(text):
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True)
    p.add_argument("--images", required=True, help="folder of slices N.png")
    p.add_argument("--labels", required=True, help="their labels N.png (255 = cell)")
    p.add_argument("--slices", default="20-24", help="held-out slices to score, e.g. 20-24")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    names = [f"{i}.png" for i in slice_range(args.slices)]
    images = [read(args.images, n) for n in names]
    labels = [read(args.labels, n) for n in names]
    runs = engines(args.onnx)
    print(f"| engine | {' | '.join(f'{s}² s' for s in SIZES)} | max diff | V_rand | V_info | pixel error |")
    print("|---" * (len(SIZES) + 5) + "|")
    reference = None
    for name, forward in runs:
        seconds = []
        for size in SIZES:
            x = preprocess(np.tile(images[0], (size // 512, size // 512)))[None]
            seconds.append(best_time(forward, x, args.repeat))
        probs = [forward(preprocess(im)[None])[0, 0] for im in images]
        reference = reference or probs
        diff = max(float(np.abs(a - b).max()) for a, b in zip(probs, reference))
        s = evaluate_slices(probs, [(lb > 127).astype(np.uint8) * 255 for lb in labels])
        cells = " | ".join(f"{t:.3f}" for t in seconds)
        keeps = "" if diff <= THRESHOLD else " (> 1/255)"
        print(
            f"| {name} | {cells} | {diff:.2g}{keeps} | {s['v_rand']:.4f} | {s['v_info']:.4f} | {s['pixel_error']:.4f} |"
        )


if __name__ == "__main__":
    main()
