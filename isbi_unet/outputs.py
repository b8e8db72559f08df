"""Every output has one owner: a script writes over nothing it did not make.

A folder output (predictions, overlays) is new, empty, or holds this script's own earlier output, known by
its record (run.json, overlay.json), which lists what the script wrote there (a training run's folder keeps
the same rule with its own files, isbi_unet/run_dir.py, since a run continues there). Then the
earlier output is removed as a whole before the new one is written, so the two never mix. A folder that
holds anything else is refused unless --overwrite; even then, only the earlier output is removed.

The record is written before the outputs, marked unfinished, and marked finished after them: a run cut short
leaves a folder that a rerun replaces and that readers (evaluate.py, visualize.py) refuse.

A single-file output (a plot, a figure, an ONNX file, a package) is new, or a file of the same kind that
this repo wrote (known by a mark inside it); anything else in its place is refused unless --overwrite.
"""

import json
import os
import shutil
import zipfile

from isbi_unet.errors import DataError, atomic_write
from isbi_unet.formats import KIND_KEY, OVERLAYS
from isbi_unet.formats import ONNX_FORMAT as FORMAT


def read_record(folder, record):
    """The folder's record as a dict, or None when there is none (or it is not one of ours)."""
    try:
        with open(os.path.join(folder, record)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("outputs"), list) else None


def earlier_output(folder, record):
    """Names in `folder` that its record says this script wrote (the record included), and what
    visualize.py drew there from them (an overlay folder, a figure), which would be stale after a new run."""
    data = read_record(folder, record)
    if data is None:
        return []
    present = set(os.listdir(folder))
    listed = present & {*map(str, data["outputs"]), record}
    drawn = {
        name
        for name in present - listed
        if read_record(os.path.join(folder, name), OVERLAYS) is not None
        or written_kind(os.path.join(folder, name)) == "figure"
    }
    return sorted(listed | drawn)


def claim_folder(folder, flag, record, overwrite=False):
    """Before any work: may the script whose record is `record` write into `folder`? Raises DataError if not."""
    if not os.path.isdir(folder):
        return
    others = sorted(set(os.listdir(folder)) - set(earlier_output(folder, record)))
    if others and not overwrite:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise DataError(
            f"{folder}: {flag} holds files this script did not write ({shown}); choose a new or empty folder, "
            "or pass --overwrite to write there anyway"
        )


def start_output(folder, record, outputs, **fields):
    """Removes the earlier output, then writes the record (unfinished) listing `outputs` (names in `folder`)."""
    os.makedirs(folder, exist_ok=True)
    remove(folder, [name for name in earlier_output(folder, record) if name != record])
    write_record(folder, record, outputs, finished=False, **fields)


def finish_output(folder, record, outputs, **fields):
    write_record(folder, record, outputs, finished=True, **fields)


def write_record(folder, record, outputs, finished, **fields):
    with atomic_write(os.path.join(folder, record)) as tmp, open(tmp, "w") as f:
        json.dump({**fields, "finished": finished, "outputs": sorted(set(outputs))}, f, indent=1, default=str)
        f.write("\n")


def check_finished(folder, record, flag):
    """For readers of a folder output: refuses one whose run was cut short."""
    data = read_record(folder, record)
    if data is not None and data.get("finished") is False:
        raise DataError(f"{folder}: {flag} holds an unfinished run (it was stopped); run it again")


def remove(folder, names):
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


ONNX_MARK = FORMAT.encode()  # export_onnx.py's metadata, stored after the graph


def written_kind(path):
    """What this repo wrote at `path`, from a mark inside the file: a PNG's text chunk, an ONNX file's
    metadata, a package's ONNX weights. None for anything else (or an unreadable file)."""
    lower = path.lower()
    try:
        if lower.endswith(".png"):
            from PIL import Image  # comes with matplotlib; imported here, the only user

            with Image.open(path) as image:
                return image.text.get(KIND_KEY)
        if lower.endswith(".onnx"):
            with open(path, "rb") as f:
                return "ONNX export" if ends_marked(f) else None
        if lower.endswith(".zip"):
            with zipfile.ZipFile(path) as z, z.open("weights.onnx") as f:
                return "bioimage.io package" if "rdf.yaml" in z.namelist() and ends_marked(f) else None
    except Exception:  # not of its format, truncated, unreadable: in any case not ours
        return None
    return None


def ends_marked(f, tail=1 << 16):
    """Whether ONNX_MARK stands in the last `tail` bytes of the stream `f` (read through, for zip members)."""
    last = b""
    for chunk in iter(lambda: f.read(1 << 20), b""):
        last = (last + chunk)[-tail:]
    return ONNX_MARK in last


def claim_file(path, flag, kind, overwrite=False):
    """Before any work: a file output `path` may replace only a file of the same `kind` that this repo wrote."""
    if not os.path.lexists(path) or overwrite:
        return
    if os.path.isdir(path):
        raise DataError(f"{path}: {flag} is a folder; name a file")
    if written_kind(path) != kind:
        raise DataError(
            f"{path}: {flag} exists and is not a {kind} written here; choose another name or pass --overwrite"
        )
