"""Predict membrane masks for a folder of EM slices with a trained checkpoint.

    python3 predict_unet_test.py --checkpoint checkpoints/best --Test_Data_path data/test --save_res_path results

For every input NAME.png it writes save_res_path/NAME.png, the binary mask in the label convention
(255 = cell, 0 = membrane), and save_res_path/prob/NAME.png, the cell probability x 255 (uint8).
The model is rebuilt from the checkpoint alone. save_res_path/run.json records the checkpoint, the
settings and the versions, device and code commit that produced the masks.
"""
import argparse
import json
import os
import time

import cv2
import numpy as np
import oneflow as flow

from checkpoint import load_model
from dataloader import list_images, preprocess, read_gray
from errors import DataError, check_output_dir, make_output_dir, run_main
from run_record import run_record


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/best", help="checkpoint directory written by TrainUnetDataSet.py")
    p.add_argument("--Test_Data_path", "--test-data-path", default="data/test", help="folder of images to segment")
    p.add_argument("--save_res_path", "--save-res-path", default="results", help="output folder for masks (and prob/ for probabilities)")
    p.add_argument("--threshold", type=float, default=0.5, help="cell probability at or above which a pixel is cell")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda or cpu")
    return p.parse_args(argv)


def predict_probability(model, image, device):
    """Cell probability (HxW float32 in [0, 1]) for one uint8 slice."""
    x = flow.tensor(preprocess(image)[None], device=device)
    with flow.no_grad():
        return flow.sigmoid(model(x))[0, 0].numpy()


def write_png(path, array):
    if not cv2.imwrite(path, array):
        raise DataError(f"{path}: could not be written")


def write_run_record(args, state, device):
    record = {"args": vars(args), "checkpoint_epoch": state.get("epoch"), "model_config": state["model_config"],
              **run_record(device)}
    with open(os.path.join(args.save_res_path, "run.json"), "w") as f:
        json.dump(record, f, indent=2)


def main(argv=None):
    args = parse_args(argv)
    if not 0.0 < args.threshold < 1.0:
        raise DataError(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
    check_output_dir(args.save_res_path, "--save_res_path")
    cuda = flow.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
    device = flow.device("cuda" if cuda else "cpu")
    names = list_images(args.Test_Data_path)
    images = [read_gray(os.path.join(args.Test_Data_path, n)) for n in names]  # all checked before any work
    small = [n for n, im in zip(names, images) if min(im.shape) < 16]
    if small:
        raise DataError(f"{os.path.join(args.Test_Data_path, small[0])}: smaller than 16 pixels, too small for four poolings")
    model, state = load_model(args.checkpoint, device)
    prob_dir = os.path.join(args.save_res_path, "prob")
    make_output_dir(prob_dir, "--save_res_path")

    t0 = time.time()
    for name, image in zip(names, images):
        prob = predict_probability(model, image, device)
        out_name = os.path.splitext(name)[0] + ".png"
        write_png(os.path.join(prob_dir, out_name), np.round(prob * 255).astype(np.uint8))
        write_png(os.path.join(args.save_res_path, out_name), np.where(prob >= args.threshold, 255, 0).astype(np.uint8))
    write_run_record(args, state, device)
    print(f"{len(names)} masks in {args.save_res_path}/, probabilities in {prob_dir}/ "
          f"(UNet{state['model_config']}, epoch {state.get('epoch')}, {time.time() - t0:.1f}s on {device})")


if __name__ == "__main__":
    run_main(main)
