"""A training run's folder (--checkpoint_dir): who may write it, and config.json, the run's settings.

A folder holds a run once it has any of RUN_FILES. One process at a time writes it (rank 0 holds an OS lock
on the folder for the whole run; a second run there is refused, naming the first). A new run never replaces
another unless told (--overwrite), and then removes only the files whose content is still what the run wrote:
config.json's "files" lists each file of the run (log, plot, every file of its checkpoints) with its size and
SHA-256 after every epoch. A file of the run changed since, and a file inside a checkpoint folder that the run
did not write (a save replaces the folder as a whole), are the user's: the run is refused, naming them. A
resumed run continues in its checkpoint's own folder, keeps the log rows of the epochs it does not redo, and
reads its settings back from config.json, where each resume is appended to a "resumed" list beside the
original settings.
"""

import contextlib
import hashlib
import json
import os
from types import SimpleNamespace

from isbi_unet.checkpoint import load_checkpoint
from isbi_unet.errors import DataError, atomic_write, check_apart, check_output_dir, make_output_dir, warn
from isbi_unet.images import list_images, training_sources
from isbi_unet.outputs import file_digest, lock_folder, remove, still_written
from isbi_unet.record import run_record
from isbi_unet.train_settings import MAY_CHANGE, resume_rule
from isbi_unet.training import truncate_log

RUN_FILES = ("log.csv", "config.json", "best", "last")  # what makes a folder hold a run
RUN_STEMS = {"log", "config", "best", "last", "loss"}  # what a run writes (with loss.png), temporaries included


CHECKPOINTS = ("best", "last")  # folders a save replaces as a whole
LOCKS = SimpleNamespace(in_run=False, held={})  # inside held(): the run folders locked, real path -> FolderLock


def checkpoint_dir_for(checkpoint_dir, resume, data_path, overwrite, master_process=True):
    """(folder, whether a run there is replaced): --checkpoint_dir, by default the folder of --resume.

    In a run (inside `held()`) rank 0 locks the folder (made if new) until the run ends, then, under the lock:
    refused before any work when it lies in the data, cannot be written, or holds another run without
    --overwrite, files of the user's without --overwrite, or files of the user's where the run writes (changed
    since, or inside a checkpoint). A run that stopped before its first checkpoint holds nothing to continue:
    the same command starts it again, replacing what it left.
    """
    if checkpoint_dir is None:
        checkpoint_dir = (os.path.dirname(resume) or ".") if resume else "checkpoints"
    check_apart(checkpoint_dir, "--checkpoint_dir", [(data_path, "--data_path")])
    check_output_dir(checkpoint_dir, "--checkpoint_dir")
    folder = os.path.realpath(checkpoint_dir)
    if master_process and LOCKS.in_run and folder not in LOCKS.held:  # only rank 0 writes the folder
        LOCKS.held[folder] = lock_folder(checkpoint_dir, "--checkpoint_dir")
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
    if master_process:
        check_run_files(checkpoint_dir, replace_run)
    return checkpoint_dir, replace_run


@contextlib.contextmanager
def held():
    """Around a training run: the run folders checkpoint_dir_for locks stay locked until it ends (a folder it
    made and left empty, as a refused run does, is removed). Outside one (resolve_args called as a library)
    nothing is locked or made."""
    LOCKS.in_run = True
    try:
        yield
    finally:
        LOCKS.in_run = False
        for lock in LOCKS.held.values():
            lock.release()
        LOCKS.held.clear()


def recorded_files(folder):
    """config.json's "files" ({relative path: size and digest}), or None: no record yet, a save under way, or a
    run from before records listed digests (its files are known by their names)."""
    with contextlib.suppress(DataError):
        files = (read_config(os.path.join(folder, "config.json")) or {}).get("files")
        return files if isinstance(files, dict) else None
    return None


def run_files(folder):
    """Relative paths of the files under the run's names in `folder` (inside checkpoint folders too)."""
    found = []
    for name in (*RUN_FILES, "loss.png"):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            for sub, _, files in os.walk(path):
                found += [os.path.relpath(os.path.join(sub, f), folder) for f in files]
        elif os.path.lexists(path):
            found.append(name)
    return sorted(found)


def check_run_files(checkpoint_dir, replace_run):
    """Refuses a run that would remove a file of the user's: with a record, a file in a checkpoint folder it does
    not list (a save replaces the folder), and, when the run is replaced, a listed file changed since."""
    files = recorded_files(checkpoint_dir)
    if files is None:
        return
    for rel in run_files(checkpoint_dir):
        if rel == "config.json":
            continue
        unlisted = rel not in files and rel.split("/")[0] in CHECKPOINTS
        changed = replace_run and rel in files and not still_written(os.path.join(checkpoint_dir, rel), files[rel])
        if unlisted or changed:
            what = "was changed since the run wrote it" if changed else "was not written by the run"
            raise DataError(
                f"{os.path.join(checkpoint_dir, rel)}: --checkpoint_dir holds this, which {what}, where the run "
                "writes; move it away, or choose another folder"
            )


def record_files(checkpoint_dir, saving=False):
    """After every save: config.json's "files", each file of the run with its size and digest, so that a run
    replacing this one removes only what is still as the run wrote it. Before a save (`saving`) the list is
    null, being written: a run killed inside the save leaves files that are all its own, known by their names
    as before the first save."""
    path = os.path.join(checkpoint_dir, "config.json")
    config = read_config(path)
    if config is None:
        return
    files = [rel for rel in run_files(checkpoint_dir) if rel != "config.json"]
    config["files"] = None if saving else {rel: digest_once(os.path.join(checkpoint_dir, rel)) for rel in files}
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(config, f, indent=2)


DIGESTS = {}  # path -> (inode, size, mtime, digest): `best` unchanged since the last epoch is not read again


def digest_once(path):
    """file_digest(path), read again only when the file is another (a save renames new files into place)."""
    st = os.stat(path)
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    if DIGESTS.get(path, (None,))[:3] != key:
        DIGESTS[path] = (*key, file_digest(path))
    return DIGESTS[path][3]


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
        remove_replaced_run(checkpoint_dir)
    truncate_log(os.path.join(checkpoint_dir, "log.csv"), done_epochs)


def remove_replaced_run(checkpoint_dir):
    """The replaced run's files still as it wrote them (checked under the lock: check_run_files); a run from
    before config.json listed its files goes by name."""
    files = recorded_files(checkpoint_dir)
    if files is None:
        remove(checkpoint_dir, (*RUN_FILES, "loss.png"))
        return
    remove(checkpoint_dir, [rel for rel in run_files(checkpoint_dir) if rel in files or rel == "config.json"])
    for name in CHECKPOINTS:  # their folders, once empty
        for sub, _, _ in sorted(os.walk(os.path.join(checkpoint_dir, name)), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(sub)
