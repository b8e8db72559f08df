"""Checkpoints: one `flow.save` directory holding net, optimizer, epoch and the model config.

A checkpoint rebuilds its own model (`load_model`), so prediction needs only the path. A save goes to
`.NAME.tmp` first; then the previous checkpoint moves to `.NAME.old` and the new one into place, and
`.NAME.old` is removed. A run killed at any moment therefore leaves a loadable checkpoint: NAME itself,
or, when killed between the two renames, `.NAME.old`, which `load_checkpoint(NAME)` falls back to.
A save that fails (disk full) removes `.NAME.tmp`, keeps the previous checkpoint and raises a WriteError.
"""

import os
import shutil

import oneflow as flow

from isbi_unet.errors import DataError, cannot_write
from isbi_unet.formats import CHECKPOINT_FORMAT as FORMAT
from isbi_unet.model import UNet


def sibling(path, suffix):
    """`dir/.NAME.suffix` beside checkpoint `dir/NAME`."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.{suffix}")


def nonfinite_entries(state_dict):
    return [name for name, t in state_dict.items() if t.is_floating_point() and not bool(flow.isfinite(t).all())]


def save_checkpoint(path, model, **extra):
    """Writes model, its config and `extra` (optimizer state, epoch, ...) to the directory `path`."""
    weights = model.state_dict()
    bad = nonfinite_entries(weights)
    if bad:  # the last line of defence: a diverged run must not replace a good checkpoint
        raise DataError(f"{path}: not saved, {bad[0]} holds NaN or inf (training diverged)")
    state = {"format": FORMAT, "model_config": model.config(), "model": weights, **extra}
    tmp, old = sibling(path, "tmp"), sibling(path, "old")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)  # left by a run killed after its swap
    try:
        flow.save(state, tmp)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
    except OSError as e:  # disk full, say: the previous checkpoint stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(path) and os.path.exists(old):
            os.rename(old, path)
        raise cannot_write(path, e) from None
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path, device="cpu"):
    if not os.path.exists(path) and os.path.isfile(os.path.join(sibling(path, "old"), "pickled_data")):
        path = sibling(path, "old")  # killed between the two renames of a save
    if not os.path.exists(path):
        raise DataError(f"{path}: no such checkpoint")
    if not os.path.isfile(os.path.join(path, "pickled_data")):
        raise DataError(f"{path}: not a checkpoint of this repo (expected a flow.save directory with pickled_data)")
    try:
        state = flow.load(path, map_location=device)
    except Exception as e:  # OneFlow raises assorted types for truncated or foreign files
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise DataError(f"{path}: unreadable checkpoint, truncated or corrupt ({detail})") from None
    if isinstance(state, dict) and state.get("format") == "isbi-unet-oneflow/1":
        raise DataError(f"{path}: trained by an older version of this repo on unstandardised input; retrain it")
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


def saved_note(last_saved):
    """What a stopped run can continue from: `last_saved` if it exists (a failed save keeps the previous one)."""
    if last_saved and os.path.exists(last_saved):
        return f"last good checkpoint is {last_saved}"
    return "no checkpoint was saved"
