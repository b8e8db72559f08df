"""Peak memory of one forward pass per window pixel, for OneFlow and ONNX Runtime: the numbers behind
isbi_unet/volume.py's FORWARD_BYTES_PER_PIXEL and PROCESS_BYTES (docs/volumes.md).

    python3 tools/block_memory.py --checkpoint checkpoints/best unet.onnx --sides 512 1024 2048

Each (model, side) runs in a fresh process: its peak RSS after loading the model, and after one forward pass of a
side x side window; the bytes per pixel are the growth divided by the window's pixels.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from isbi_unet.flags import Parser  # noqa: E402

CHILD = """
import json, resource, sys, numpy as np
from isbi_unet.predictor import Predictor, Spec
p = Predictor.open(Spec((sys.argv[1],), threads=int(sys.argv[3])))
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
side = int(sys.argv[2])
p.window(np.random.default_rng(0).standard_normal((1, side, side)).astype(np.float32))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"loaded": loaded, "peak": peak}))
"""


def measure(model, side, threads):
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(side), str(threads)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = Parser(__doc__)
    p.add_argument("--checkpoint", nargs="+", required=True)
    p.add_argument("--sides", nargs="+", type=int, default=[512, 1024, 2048])
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: every core)")
    args = p.parse_args()
    print(f"{'model':<40}{'side':>6}{'loaded MB':>11}{'peak MB':>9}{'B/px':>7}")
    for model in args.checkpoint:
        for side in args.sides:
            m = measure(model, side, args.threads)
            per = (m["peak"] - m["loaded"]) / side**2
            print(f"{model[-40:]:<40}{side:>6}{m['loaded'] / 1e6:>11.0f}{m['peak'] / 1e6:>9.0f}{per:>7.0f}")


if __name__ == "__main__":
    main()
