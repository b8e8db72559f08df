"""This repo's U-Net in PyTorch, layer for layer (= unet.UNet), and its benchmark worker.

    /path/to/python-with-torch tools/torch_unet.py --worker torch:eager:cpu --steps 5 --warmup 2 --device cpu

benchmark.py --torch_python runs it this way and compares; tools/torch_reference.py trains it.
Needs torch, not OneFlow.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmark import SETTINGS, eager_train_step, peak_memory_mb, timed  # noqa: E402  (stdlib only at import)


def torch_unet(width):
    import torch
    import torch.nn as nn

    def double(i, o):
        return nn.Sequential(
            nn.Conv2d(i, o, 3, padding=1, bias=False),
            nn.BatchNorm2d(o),
            nn.ReLU(inplace=True),
            nn.Conv2d(o, o, 3, padding=1, bias=False),
            nn.BatchNorm2d(o),
            nn.ReLU(inplace=True),
        )

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            w = [width * 2**i for i in range(5)]
            self.inc = double(1, w[0])
            self.downs = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), double(w[i], w[i + 1])) for i in range(4))
            self.ups = nn.ModuleList(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in reversed(range(4)))
            self.convs = nn.ModuleList(double(w[i + 1], w[i]) for i in reversed(range(4)))
            self.outc = nn.Conv2d(w[0], 1, 1)

        def forward(self, x):
            skips = [self.inc(x)]
            for down in self.downs:
                skips.append(down(skips[-1]))
            x = skips.pop()
            for up, conv in zip(self.ups, self.convs):
                x = conv(torch.cat([skips.pop(), up(x)], 1))
            return self.outc(x)

    return Net()


def torch_worker(setting, steps, warmup, device_name, width):
    import torch

    s = SETTINGS[setting]
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = torch_unet(width or s["width"]).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    criterion = torch.nn.BCEWithLogitsLoss()
    x = torch.rand(s["batch"], 1, s["size"], s["size"], device=device)
    y = (torch.rand(s["batch"], 1, s["size"], s["size"], device=device) > 0.5).float()
    sync = (lambda t: torch.cuda.synchronize()) if device.type == "cuda" else (lambda t: None)
    train = timed(eager_train_step(model, criterion, optimizer, x, y), steps, warmup, sync)
    model.eval()
    x1 = torch.rand(1, 1, s["size"], s["size"], device=device)
    with torch.no_grad():
        infer = timed(lambda: model(x1), steps, warmup, sync)
    print(
        json.dumps(
            dict(
                framework="pytorch",
                version=torch.__version__,
                mode=f"eager {torch.get_num_threads()} threads",
                setting=setting,
                params=params,
                train_s=train,
                images=s["batch"],
                infer_s=infer,
                peak_mb=peak_memory_mb(),
            )
        ),
        flush=True,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", required=True, help="torch:eager:SETTING, SETTING one of benchmark.SETTINGS")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--width", type=int, help="U-Net channels at the first level instead of the setting's")
    args = p.parse_args(argv)
    torch_worker(args.worker.split(":")[-1], args.steps, args.warmup, args.device, args.width)


if __name__ == "__main__":
    main()
