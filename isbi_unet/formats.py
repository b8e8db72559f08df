"""Facts several modules share, with no imports of the repo: what marks a file as ours, the record names,
the metric names and the model's 16-pixel multiple. A leaf, so that any module can read them without
pulling in the code that writes them."""

POOL = 16  # four 2x2 poolings: image, crop and tile sides are multiples of this (or at least it)

KIND_KEY = "isbi_unet"  # PNG text chunk naming what wrote the file
ONNX_FORMAT = "isbi-unet-onnx/1"  # export_onnx.py's metadata mark in an .onnx file
CHECKPOINT_FORMAT = "isbi-unet-oneflow/2"  # /1 models saw unstandardised input and cannot be used

PREDICTIONS = "run.json"  # predict_unet_test.py's record in --save_res_path
OVERLAYS = "overlay.json"  # visualize.py's record in its overlay folder

LOSS_FUNCTIONS = ("bce", "bce_dice")  # --loss: the article's BCE, or BCE + soft Dice on membranes
LOSSES = {"train_loss": "train loss", "val_loss": "validation loss"}
METRICS = {"v_rand": "V_rand", "v_info": "V_info", "pixel_error": "pixel error"}  # log.csv column: label
LOG_COLUMNS = ("epoch", *LOSSES, *METRICS, "lr", "seconds")  # log.csv's header, as training writes it


def round_up(n, m):
    return -(-n // m) * m
