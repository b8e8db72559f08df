"""Checkpoints: one `flow.save` directory holding net, optimizer, epoch and the model config.

A checkpoint rebuilds its own model (`load_model`), so prediction needs only the path. Writes go to a
temporary directory first and are swapped in by rename, so a run killed mid-save keeps the previous one.
"""
import os
import shutil
import tempfile

import oneflow as flow

from errors import DataError
from unet import UNet

FORMAT = "isbi-unet-oneflow/1"


def save_checkpoint(path, model, **extra):
    """Writes model, its config and `extra` (optimizer state, epoch, ...) to the directory `path`."""
    state = {"format": FORMAT, "model_config": model.config(), "model": model.state_dict(), **extra}
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the checkpoint from other users
    try:
        flow.save(state, tmp)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.rename(path, os.path.join(old, "ckpt"))
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path, device="cpu"):
    if not os.path.exists(path):
        raise DataError(f"{path}: no such checkpoint")
    if not os.path.isfile(os.path.join(path, "pickled_data")):
        raise DataError(f"{path}: not a checkpoint of this repo (expected a flow.save directory with pickled_data)")
    try:
        state = flow.load(path, map_location=device)
    except Exception as e:  # OneFlow raises assorted types for truncated or foreign files
        raise DataError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path}: not a checkpoint of this repo (no '{FORMAT}' marker)")
    return state


def load_model(path, device="cpu"):
    """The UNet stored in `path`, weights loaded, in eval mode; and the whole checkpoint dict."""
    state = load_checkpoint(path, device)
    model = UNet(**state["model_config"]).to(device)
    try:
        model.load_state_dict(state["model"])
    except Exception as e:
        raise DataError(f"{path}: weights do not fit UNet{state['model_config']} ({e})") from None
    model.eval()
    return model, state
