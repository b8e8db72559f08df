"""A training run's folder (--checkpoint_dir): who may write it, and config.json, the run's settings.

A folder holds a run once it has any of RUN_FILES. A new run never replaces another unless told
(--overwrite); a resumed run continues in its checkpoint's own folder, keeps the log rows of the epochs
it does not redo, and reads its settings back from config.json, where each resume is appended to a
"resumed" list beside the original settings.
"""

import hashlib
import json
import os

from isbi_unet.checkpoint import load_checkpoint
from isbi_unet.errors import DataError, atomic_write, check_apart, check_output_dir, make_output_dir, warn
from isbi_unet.images import list_images, training_sources
from isbi_unet.outputs import remove
from isbi_unet.record import run_record
from isbi_unet.train_settings import MAY_CHANGE, resume_rule
from isbi_unet.training import truncate_log

RUN_FILES = ("log.csv", "config.json", "best", "last")  # what makes a folder hold a run
RUN_STEMS = {"log", "config", "best", "last", "loss"}  # what a run writes (with loss.png), temporaries included


def checkpoint_dir_for(checkpoint_dir, resume, data_path, overwrite, master_process=True):
    """(folder, whether a run there is replaced): --checkpoint_dir, by default the folder of --resume.

    Refused before any work when the folder lies in the data, cannot be written, or holds another run
    without --overwrite. A run that stopped before its first checkpoint holds nothing to continue: the same
    command starts it again, replacing what it left.
    """
    if checkpoint_dir is None:
        checkpoint_dir = (os.path.dirname(resume) or ".") if resume else "checkpoints"
    check_apart(checkpoint_dir, "--checkpoint_dir", [(data_path, "--data_path")])
    check_output_dir(checkpoint_dir, "--checkpoint_dir")
    folder = os.path.realpath(checkpoint_dir)
    continuing = resume is not None and os.path.realpath(os.path.dirname(resume) or ".") == folder
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]
    replace_run = bool(found) and not continuing
    # Only rank 0 decides: it writes the folder, and another rank looking later could see this run's own files.
    if master_process and not overwrite:
        resume_point = continue_from(checkpoint_dir)
        if replace_run and resume_point:
            raise DataError(
                f"{checkpoint_dir}: --checkpoint_dir holds another run ({', '.join(found)}); continue it with "
                f"--resume {resume_point}, write elsewhere, or replace it with --overwrite"
            )
        others = not_a_runs(folder)
        if others:
            raise DataError(
                f"{checkpoint_dir}: --checkpoint_dir holds files a run does not write ({', '.join(others[:3])}); "
                "choose a new or empty folder, or pass --overwrite to train there anyway"
            )
    return checkpoint_dir, replace_run


def continue_from(checkpoint_dir):
    """The checkpoint a run in `checkpoint_dir` continues from: `last`, else `best` (a kill between the two saves
    of its first epoch), else None (it stopped before its first checkpoint)."""
    for name in ("last", "best"):
        if os.path.isdir(os.path.join(checkpoint_dir, name)):
            return os.path.join(checkpoint_dir, name)
    return None


def not_a_runs(folder):
    """Names in `folder` that no run writes (its files, their temporaries such as .best.tmp), but README.md,
    the repo's own note in checkpoints/."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n.lstrip(".").split(".")[0] not in RUN_STEMS and n != "README.md")


def check_resume_point(resume):
    """A missing --resume checkpoint is one line naming the one that continues its run, if any: `best` of a run
    killed between its first two saves."""
    if not os.path.exists(resume):
        other = continue_from(os.path.dirname(resume) or ".")
        hint = f"; continue with --resume {other}" if other else ""
        raise DataError(f"{resume}: no such checkpoint{hint}")


def config_path(resume):
    """config.json of the run that wrote checkpoint `resume` (DIR/config.json for DIR/last)."""
    return os.path.join(os.path.dirname(resume) or ".", "config.json")


def read_config(path):
    """The dict stored in config.json `path`; None when there is none (a checkpoint copied on its own)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable run settings ({e})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: not a run's settings (expected a JSON object)")
    return config


def resumed_flags(flags, given, world_size=1, may_change=MAY_CHANGE):
    """(the run's config.json record, `flags` with the run's own settings, what this resume changes).

    Settings come from config.json beside --resume's folder (as earlier resumes left them), else the
    checkpoint's run_args. A flag in `given` (on the command line) that would change what is trained is
    refused, naming both values; the flags in `may_change` take this command's values, and --epochs,
    when not given, the run's. Another number of processes is allowed with a warning, and recorded.
    """
    path = config_path(flags["resume"])
    record = read_config(path)
    if record is None:  # a checkpoint copied on its own
        path, record = flags["resume"], load_checkpoint(flags["resume"]).get("run_args") or {}
    run = current_settings(record)
    if run.get("world_size", world_size) != world_size:  # not a flag, but the total batch and steps change
        warn(f"{path}: the run trained on {run['world_size']} process(es), this resume on {world_size}")
    kept = dict(flags, data_path=os.path.abspath(flags["data_path"]))
    for key in [k for k in flags if k in run and k not in may_change]:
        if key not in given:
            kept[key] = run[key]
        elif not same_setting(key, kept[key], run[key], record):
            raise DataError(f"--{key} {flags[key]} differs from the run's {run[key]} ({path}); {KEPT}")
    check_same_data(kept["data_path"], record, path)
    if "epochs" not in given and "epochs" in run:
        kept["epochs"] = run["epochs"]
    changed = {k: [run[k], kept[k]] for k in flags if k in given and k in run and not same(k, run[k], kept[k])}
    if run.get("world_size", world_size) != world_size:
        changed["world_size"] = [run["world_size"], world_size]
    return record, kept, changed


KEPT = f"a resumed run keeps its settings ({resume_rule()})"


def current_settings(record):
    """A config.json record's settings as its last resume left them, --data_path made absolute."""
    run = dict(record)
    if "data_path" in run:
        run["data_path"] = os.path.abspath(os.path.join(record.get("cwd", ""), run["data_path"]))
    for resume in record.get("resumed", []):
        run.update({key: new for key, (_, new) in resume.get("changed", {}).items()})
    return run


def same(key, a, b):
    return os.path.realpath(a) == os.path.realpath(b) if key == "data_path" else a == b


def same_setting(key, value, theirs, record):
    """Whether a given flag asks for what the run had; data under another path counts when its bytes match."""
    if same(key, value, theirs):
        return True
    if key != "data_path" or not os.path.exists(value):
        return False
    if not record.get("data_sha256") and not os.path.exists(theirs):
        return False
    return data_fingerprint(value) == (record.get("data_sha256") or data_fingerprint(theirs))


def data_files(data_path):
    """{file relative to `data_path`: SHA-256 of its bytes} for the training sources (folders or stacks)."""
    files = {}
    for source in training_sources(data_path):
        paths = [source] if os.path.isfile(source) else [os.path.join(source, n) for n in list_images(source)]
        for path in paths:
            with open(path, "rb") as f:
                files[os.path.relpath(path, data_path)] = hashlib.sha256(f.read()).hexdigest()
    return files


def data_fingerprint(data_path, files=None):
    """SHA-256 over the training sources' slice names and bytes: the same data under another path matches."""
    digest = hashlib.sha256()
    for name, sha in (files or data_files(data_path)).items():
        digest.update(os.path.basename(name).encode() + b"\0" + bytes.fromhex(sha))
    return digest.hexdigest()


def listed(names, most=3):
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_same_data(data_path, record, config):
    """A resumed run trains on the bytes it began with: refused in one line naming what changed, when the
    record (`config`) holds the data's fingerprint (a checkpoint copied on its own does not)."""
    if not record.get("data_sha256"):
        return
    files = data_files(data_path)
    if data_fingerprint(data_path, files) == record["data_sha256"]:
        return
    what = "its content"
    if isinstance(record.get("data_files"), dict):
        theirs = record["data_files"]
        changed = [n for n in files if n in theirs and files[n] != theirs[n]]
        added, gone = sorted(set(files) - set(theirs)), sorted(set(theirs) - set(files))
        parts = [(changed, "changed"), (added, "added"), (gone, "removed")]
        what = "; ".join(f"{listed(names)} {how}" for names, how in parts if names)
    raise DataError(
        f"{data_path}: the training data differ from what the run began with ({what}; {config} holds its "
        "fingerprint); a resumed run trains on the same slices: restore them, or start a new run"
    )


def write_config(path, settings, data_path, device, original=None, changed=None):
    """config.json: a new run's `settings` with its data's fingerprint and run_record, or for a resumed
    run the `original` record with this resume (its `changed` settings and run_record) appended to its
    "resumed" list."""
    if original is None:
        files = data_files(data_path)
        record = {**settings, "data_sha256": data_fingerprint(data_path, files), "data_files": files}
        record.update(run_record(device))
    else:
        record = dict(original)
        record["resumed"] = [*original.get("resumed", []), {"changed": changed or {}, **run_record(device)}]
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=2)


def prepare_run_dir(checkpoint_dir, replace_run, done_epochs):
    """Rank 0: the folder made, a replaced run's files removed, and log rows after `done_epochs` dropped."""
    make_output_dir(checkpoint_dir, "--checkpoint_dir")
    if replace_run:  # --overwrite: nothing of the old run stays to be mistaken for this one's
        remove(checkpoint_dir, (*RUN_FILES, "loss.png"))
    truncate_log(os.path.join(checkpoint_dir, "log.csv"), done_epochs)
