"""Training and inference speed of this U-Net in OneFlow (eager, nn.Graph, 2-process DDP), optionally against PyTorch.

    python3 benchmark.py                                     # both settings, OneFlow eager / graph / ddp2
    python3 benchmark.py --setting cpu --steps 3             # only the 2-core CPU recipe's shapes
    python3 benchmark.py --torch_python /opt/torch/bin/python3   # + the same U-Net in PyTorch and the ratio
    python3 benchmark.py --device cuda --amp                 # on a GPU: + graph with mixed precision
    python3 benchmark.py --setting cpu --modes ddp2,graph_ddp2 --width 8   # data-parallel graph; another width
    python3 benchmark.py --modes onnx --setting cpu --width 16   # ONNX Runtime inference only, width 16 / 64
    python3 benchmark.py --modes onnx --setting article
    python3 benchmark.py --volume --checkpoint unet.onnx --side 2048 --sizes_mb 64,256,1024 --workers 1,2,4

`--volume` times predict_unet_test.py itself on TIFF stacks of --side x --side pages tiled from real slices
(--slices), megapixels per second and the peak memory of all its processes together, for each stack size and
worker count (isbi_unet/volume_bench.py; docs/volumes.md has the measured tables); with --whole_memory, the
smallest stack also runs with that --max_memory (one block per slice), for the blockwise overhead.

Settings: `cpu` is the CPU recipe (width 16, 256x256 crops, batch 4); `article` is the article's model
(width 64, whole 512x512 slices, batch 1). A training step is forward + BCE loss + backward + Adam on
random data; inference is one slice at batch 1 with no gradient. Every mode runs in its own process
(so peak memory, the resident set's high-water mark on CPU, is its own) and reports the median of
--steps timed steps after --warmup untimed ones. `ddp2` is two processes under isbi_unet.launch, each
with half the batch, the way `NPROC=2 bash train.sh` trains; its images/s counts both processes.
`graph_ddp2` is the same through one data-parallel nn.Graph: the model as global tensors broadcast to both
processes, each batch split between them (the scripts do not train this way; see docs/speed.md).
`onnx` exports the model with export_onnx.py's converter (oneflow-onnx) and times ONNX Runtime inference,
one slice at batch 1 on every core (no training row; its peak memory includes the conversion). PyTorch runs
with its default threads; its U-Net (tools/torch_unet.py) mirrors unet.py layer for layer (parameter counts
are printed to show it). Results are printed as a table; --json also writes them to a file.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from isbi_unet.device import select_device  # OneFlow is imported only where a measurement needs it
from isbi_unet.errors import DataError, atomic_write, check_output_dir
from isbi_unet.flags import Above, Parser
from isbi_unet.process import run_main
from isbi_unet.process.runtime import whoami
from isbi_unet.recipes import RECIPES

CPU = RECIPES["cpu"]
SETTINGS = {
    "cpu": dict(width=CPU["width"], size=CPU["crop_size"], batch=CPU["batch_size"]),
    "article": dict(width=RECIPES["full"]["width"], size=512, batch=1),  # the article's model, whole slices
}
HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_WORKER = os.path.join(HERE, "tools", "torch_unet.py")  # the same U-Net in PyTorch, for --torch_python


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("--setting", choices=["all", *SETTINGS], default="all", help="which model/input shapes to time")
    p.add_argument(
        "--modes",
        default="eager,graph,ddp2,onnx",
        help="comma-separated modes: OneFlow's eager, graph, ddp2, graph_ddp2 (and graph_amp on CUDA with --amp); "
        "onnx: ONNX Runtime inference of the exported model",
    )
    p.add_argument(
        "--width",
        type=int,
        bounds=(1, 1024),
        help="U-Net channels at the first level instead of the setting's (16 for cpu, 64 for article)",
    )
    p.add_argument(
        "--steps", type=int, default=5, bounds=(1, 10**5), help="timed steps per measurement (the median is reported)"
    )
    p.add_argument(
        "--warmup", type=int, default=2, bounds=(0, 10**5), help="untimed steps first (graph compilation happens here)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="also time graph mode with mixed precision (CUDA only)")
    p.add_argument("--torch_python", help="a Python interpreter with PyTorch: time the same U-Net there too")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--volume", action="store_true", help="time predict_unet_test.py on stacks (see above)")
    p.add_argument("--checkpoint", default="checkpoints/best", help="--volume: the model (checkpoint, .onnx, .zip)")
    p.add_argument("--slices", default="data/train/image", help="--volume: the slices the stacks are tiled from")
    p.add_argument("--side", type=int, default=2048, bounds=(16, 65536), help="--volume: the stacks' page side")
    p.add_argument("--sizes_mb", default="64,256,1024", help="--volume: comma-separated stack sizes in MB")
    p.add_argument("--workers", default="1,2,4", help="--volume: comma-separated --workers values")
    p.add_argument(
        "--whole_memory",
        type=float,
        bounds=(Above(0), 1 << 20),
        help="--volume: also the smallest stack at this --max_memory",
    )
    p.add_argument("--scratch", default="/tmp", help="--volume: where the stacks and outputs are made (and removed)")
    p.add_argument(
        "--engine", default="auto", help="--volume: predict_unet_test.py's --engine (auto, oneflow, onnxruntime, ...)"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: framework:mode:setting, prints one JSON line
    return p.parse_args(argv)


def timed(step, steps, warmup, sync):
    for _ in range(warmup):
        sync(step())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def eager_train_step(model, criterion, optimizer, x, y):
    """One step on fixed data; the same code drives OneFlow and PyTorch (their APIs agree here)."""

    def step():
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    return step


def peak_memory_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def oneflow_worker(mode, setting, steps, warmup, device_name, width):
    import oneflow as flow

    from isbi_unet.engine import InferenceGraphs, TrainGraph
    from isbi_unet.losses import SegmentationLoss
    from unet import UNet

    me = whoami()
    rank, world = me.rank, me.world
    device = select_device(device_name, me.local_rank)
    s = SETTINGS[setting]
    batch = max(1, s["batch"] // world)  # ddp2 splits the batch; a batch of 1 becomes 1 per process
    flow.manual_seed(0)
    model = UNet(1, 1, width=width or s["width"]).to(device)
    params = sum(p.numel() for p in model.parameters())
    x = flow.rand(batch, 1, s["size"], s["size"], device=device)
    y = (flow.rand(batch, 1, s["size"], s["size"], device=device) > 0.5).float()
    sync = lambda t: t.numpy()
    if mode == "ddp2":
        model = flow.nn.parallel.DistributedDataParallel(model)
    if mode == "graph_ddp2":  # global tensors: gradients of the broadcast weights are summed over the split batch
        placement = flow.placement(device.type, ranks=list(range(world)))
        model = model.to_global(placement=placement, sbp=flow.sbp.broadcast)
        x, y = (t.to_global(placement=placement, sbp=flow.sbp.split(0)) for t in (x, y))
        sync = lambda t: t.to_local().numpy()
    optimizer = flow.optim.Adam(model.parameters(), lr=1e-4)
    criterion = SegmentationLoss("bce")
    if mode.startswith("graph"):
        graph = TrainGraph(model, criterion, optimizer, amp=mode == "graph_amp")
        train_step = lambda: graph(x, y)
    else:
        train_step = eager_train_step(model, criterion, optimizer, x, y)
    train = timed(train_step, steps, warmup, sync)
    infer = None
    if not mode.endswith("ddp2"):  # inference is one process's business
        model.eval()
        run = InferenceGraphs(model, amp=mode == "graph_amp") if mode.startswith("graph") else model
        x1 = flow.rand(1, 1, s["size"], s["size"], device=device)
        with flow.no_grad():
            infer = timed(lambda: run(x1), steps, warmup, sync)
    replicas_agree = None
    if mode.endswith("ddp2"):  # data parallelism must leave every process with the same weights
        checksum = sum(
            float((p.to_local() if p.is_global else p).numpy().astype("float64").sum()) for p in model.parameters()
        )
        gathered = [flow.zeros(1, dtype=flow.float64) for _ in range(world)]
        flow.comm.all_gather(gathered, flow.tensor([checksum], dtype=flow.float64))
        replicas_agree = all(float(g) == checksum for g in gathered)
    if rank == 0:
        print(
            json.dumps(
                dict(
                    framework="oneflow",
                    version=flow.__version__,
                    mode=mode,
                    setting=setting,
                    params=params,
                    train_s=train,
                    images=batch * world,
                    infer_s=infer,
                    peak_mb=peak_memory_mb(),
                    replicas_agree=replicas_agree,
                )
            ),
            flush=True,
        )


def onnx_worker(setting, steps, warmup, width):
    """ONNX Runtime inference of the same U-Net, exported as export_onnx.py exports it; prints one JSON line."""
    import tempfile

    import numpy as np
    import oneflow as flow
    import onnxruntime

    from isbi_unet.onnx_backend import onnx_forward, open_session
    from isbi_unet.onnx_export import MIN_OPSET, convert, free_sizes
    from unet import UNet

    s = SETTINGS[setting]
    flow.manual_seed(0)
    model = UNet(1, 1, width=width or s["width"]).eval()
    with tempfile.TemporaryDirectory() as tmp:  # the session holds the model in memory once created
        path = os.path.join(tmp, "unet.onnx")
        convert(model, s["size"], path, MIN_OPSET)
        free_sizes(path, MIN_OPSET)  # the size-free graph that export_onnx.py writes
        forward = onnx_forward(open_session(path))
    x = np.random.default_rng(0).standard_normal((1, 1, s["size"], s["size"]), dtype=np.float32)
    infer = timed(lambda: forward(x), steps, warmup, lambda y: y)
    row = dict(framework="onnxruntime", version=onnxruntime.__version__, mode="onnx", setting=setting)
    params = sum(p.numel() for p in model.parameters())
    row.update(params=params, train_s=None, images=1, infer_s=infer, peak_mb=peak_memory_mb(), replicas_agree=None)
    print(json.dumps(row), flush=True)


def run_worker(python, spec, args, launcher=False):
    """Runs one measurement in its own process (under the launcher for ddp2 modes); its JSON line, or None."""
    launch = [
        "-m",
        "isbi_unet.launch",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29600 + os.getpid() % 300),
    ]
    script = TORCH_WORKER if spec.startswith("torch:") else os.path.abspath(__file__)
    cmd = [
        python,
        *(launch if launcher else []),
        script,
        "--worker",
        spec,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        *(["--width", str(args.width)] if args.width else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode == -9:
            tail = "killed by SIGKILL, e.g. the kernel's out-of-memory killer"
        print(f"{spec}: failed ({tail})", file=sys.stderr, flush=True)
        return None
    return json.loads(lines[-1])


def print_table(results):
    header = (
        f"{'setting':<8} {'framework':<19} {'mode':<16} {'params':>10} {'train ms/step':>14} {'train img/s':>12} "
        f"{'infer img/s':>12} {'peak MB':>8} {'vs PyTorch':>11}"
    )
    print(header)
    torch_ms = {r["setting"]: r["train_s"] for r in results if r["framework"] == "pytorch"}
    for r in results:
        trains = r["train_s"] is not None  # ONNX Runtime rows are inference only
        ratio = f"{r['train_s'] / torch_ms[r['setting']]:.2f}x" if trains and r["setting"] in torch_ms else "-"
        infer = f"{1 / r['infer_s']:.2f}" if r["infer_s"] else "-"
        ms, rate = (f"{r['train_s'] * 1000:.0f}", f"{r['images'] / r['train_s']:.2f}") if trains else ("-", "-")
        print(
            f"{r['setting']:<8} {r['framework'] + ' ' + r['version']:<19} {r['mode']:<16} {r['params']:>10,} "
            f"{ms:>14} {rate:>12} {infer:>12} {r['peak_mb']:>8.0f} {ratio:>11}"
        )


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        _, mode, setting = args.worker.split(":")
        if mode == "onnx":
            return onnx_worker(setting, args.steps, args.warmup, args.width)
        return oneflow_worker(mode, setting, args.steps, args.warmup, args.device, args.width)
    if args.amp and not args.device.startswith("cuda"):
        raise DataError("--amp needs --device cuda")
    if args.torch_python and not os.path.exists(args.torch_python):
        raise DataError(f"{args.torch_python}: no such interpreter")
    if args.json:  # before minutes of timing
        check_output_dir(os.path.dirname(os.path.abspath(args.json)), "--json")
        if os.path.exists(args.json) and not args.overwrite:
            raise DataError(f"{args.json}: --json exists; choose another name or pass --overwrite to replace it")
    if args.volume:
        return volume_mode(args)
    select_device(args.device)  # a missing GPU is refused here, once, not in every worker
    modes = [m for m in args.modes.split(",") if m] + (["graph_amp"] if args.amp else [])
    settings = list(SETTINGS) if args.setting == "all" else [args.setting]
    results = []
    for setting in settings:
        if args.torch_python:
            results.append(run_worker(args.torch_python, f"torch:eager:{setting}", args))
        for mode in modes:
            framework = "onnxruntime" if mode == "onnx" else "oneflow"
            spec = f"{framework}:{mode}:{setting}"
            results.append(run_worker(sys.executable, spec, args, launcher=mode.endswith("ddp2")))
            print(f"... {setting} {mode} done", file=sys.stderr, flush=True)
    results = [r for r in results if r]
    print(f"{os.cpu_count()} CPU cores, device {args.device}, median of {args.steps} steps after {args.warmup} warm-up")
    print_table(results)
    if args.json:
        with atomic_write(args.json, "the results") as tmp, open(tmp, "w") as f:
            json.dump(results, f, indent=2)


def volume_mode(args):
    """--volume: the table of predict_unet_test.py's speed and memory on stacks (isbi_unet/volume_bench.py)."""
    from isbi_unet.volume_bench import print_volume_table, volume_benchmark

    sizes, workers = (numbers(v, flag) for v, flag in ((args.sizes_mb, "--sizes_mb"), (args.workers, "--workers")))
    scratch = tempfile.mkdtemp(prefix="volume-benchmark-", dir=args.scratch)
    try:
        script = os.path.join(HERE, "predict_unet_test.py")
        rows = volume_benchmark(
            script, args.checkpoint, args.slices, scratch, args.side, sizes, workers, args.whole_memory, args.engine
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{os.cpu_count()} CPU cores, model {args.checkpoint}, --engine {args.engine}")
    print_volume_table(rows)
    if args.json:
        with atomic_write(args.json, "the results") as tmp, open(tmp, "w") as f:
            json.dump(rows, f, indent=2)


def numbers(text, flag):
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise DataError(f"{flag} must be comma-separated positive whole numbers, got {text!r}")
    return values


if __name__ == "__main__":
    run_main(main)
