"""Put the ISBI 2012 slices in data/: train/image, train/label (255 = cell, 0 = membrane) and test.

    python3 get_data.py                          # nothing to do if data/ is complete
    ISBI_DATA=/path/to/isbi2012 python3 get_data.py

Where from, in order: $ISBI_DATA or ../shared/data/isbi2012 (a folder of the same layout), else the
public 30 + 30 slice PNG copy in zhixuhao/unet (pinned to one commit, so its content cannot change).
Everything lands in a temporary folder and is checked (every file decodes, labels are binary, every
image has its label) before it is moved into place, so a failed copy or download leaves no half data.
It writes only folders it made: data/.get_data.json lists the files it put there. A train/image,
train/label or test folder of anyone else's is never touched; then it changes nothing and says so.
"""

from isbi_unet.process.interrupt import guard_start_up, keyboard_interrupts

if __name__ == "__main__":
    guard_start_up()  # Ctrl-C from here on: one line, exit 130, nothing half-written (isbi_unet/process/interrupt.py)


import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import urllib.request

import cv2

from isbi_unet.errors import DataError, atomic_write, check_apart, warn
from isbi_unet.flags import Parser
from isbi_unet.images import find_pairs, list_images, read_gray, read_pair
from isbi_unet.process import run_main

REPO = os.path.dirname(os.path.abspath(__file__))
PARTS = ("train/image", "train/label", "test")
URL = "https://raw.githubusercontent.com/zhixuhao/unet/909ae9b5fefd8a55900e24a771b073b1d4ef70ff/data/membrane/{part}/{i}.png"
N_SLICES = 30
RECORD = ".get_data.json"  # in data_dir: the files get_data.py put in each part


def is_complete(root):
    try:
        find_pairs(os.path.join(root, "train/image"), os.path.join(root, "train/label"))
        list_images(os.path.join(root, "test"))
        return True
    except DataError:
        return False


def check(root):
    """Raises DataError unless root holds decodable, paired slices with binary labels."""
    pairs = find_pairs(os.path.join(root, "train/image"), os.path.join(root, "train/label"))
    for image_name, label_name in pairs:
        read_pair(os.path.join(root, "train/image"), os.path.join(root, "train/label"), image_name, label_name)
    tests = list_images(os.path.join(root, "test"))
    for name in tests:
        read_gray(os.path.join(root, "test", name))
    return len(pairs), len(tests)


def copy_from(source, staging):
    missing = [part for part in PARTS if not os.path.isdir(os.path.join(source, part))]
    if missing:
        raise DataError(f"{source}: no {', '.join(p + '/' for p in missing)} (expected {', '.join(PARTS)})")
    for part in PARTS:
        try:
            shutil.copytree(os.path.join(source, part), os.path.join(staging, part))
        except (OSError, shutil.Error) as e:
            raise DataError(f"{os.path.join(source, part)}: cannot be copied ({e})") from None


def download_to(staging, url_template):
    for part in PARTS:
        os.makedirs(os.path.join(staging, part))
        for i in range(N_SLICES):
            url = url_template.format(part=part, i=i)
            path = os.path.join(staging, part, f"{i}.png")
            try:
                with urllib.request.urlopen(url, timeout=60) as r, open(path, "wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as e:
                raise DataError(f"{url}: download failed ({e})") from None
            if cv2.imread(path, cv2.IMREAD_UNCHANGED) is None:
                raise DataError(f"{url}: downloaded file is not an image")


def own_parts(data_dir):
    """{part: file names} that get_data.py wrote, for the parts that still hold nothing else."""
    try:
        with open(os.path.join(data_dir, RECORD)) as f:
            record = json.load(f)["parts"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    own = {}
    for part, names in record.items():
        folder = os.path.join(data_dir, part)
        if part in PARTS and os.path.isdir(folder) and set(os.listdir(folder)) <= set(names):
            own[part] = names
    return own


def others_parts(data_dir):
    """The parts present in data_dir that get_data.py did not write (or that hold files it did not write)."""
    own = own_parts(data_dir)
    return [part for part in PARTS if os.path.lexists(os.path.join(data_dir, part)) and part not in own]


def install(staging, data_dir, origin):
    """Moves the checked parts into data_dir, replacing only its own earlier ones, and records them."""
    parts = {part: sorted(os.listdir(os.path.join(staging, part))) for part in PARTS}
    for part in PARTS:
        target = os.path.join(data_dir, part)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(os.path.join(staging, part), target)
    with atomic_write(os.path.join(data_dir, RECORD)) as tmp, open(tmp, "w") as f:
        json.dump({"source": origin, "parts": parts}, f, indent=1)


def main(argv=None):
    keyboard_interrupts()
    p = Parser(__doc__)
    p.add_argument("--data_dir", default=os.path.join(REPO, "data"), help="where train/ and test/ go")
    p.add_argument(
        "--source",
        default=os.environ.get("ISBI_DATA") or os.path.join(REPO, "..", "shared", "data", "isbi2012"),
        help="local folder to copy from (default: $ISBI_DATA, else ../shared/data/isbi2012); downloads if absent",
    )
    p.add_argument(
        "--url", default=URL, help="download address, with {part} (train/image, train/label, test) and {i} (0-29)"
    )
    args = p.parse_args(argv)
    if is_complete(args.data_dir):
        return
    from_env = bool(os.environ.get("ISBI_DATA"))
    if from_env and not os.path.isdir(args.source):
        raise DataError(f"{args.source}: ISBI_DATA points to no folder")
    if os.path.isdir(args.source):
        check_apart(args.data_dir, "--data_dir", [(args.source, "--source")])
    others = others_parts(args.data_dir)
    if others:  # the user's own slices: neither replaced nor mixed with the challenge's
        found = ", ".join(os.path.join(args.data_dir, part) for part in others)
        warn(
            f"{found}: not written by get_data.py, so left as is and nothing added; complete train/image, "
            f"train/label and test there yourself, or get the ISBI 2012 slices with --data_dir NEW_FOLDER"
        )
        return
    os.makedirs(args.data_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".incoming-", dir=args.data_dir)
    try:
        if os.path.isdir(args.source):
            origin = os.path.normpath(args.source)
            print(f"get_data: copying ISBI 2012 slices from {origin}", flush=True)
            copy_from(args.source, staging)
        else:
            origin = args.url.split("{part}")[0].rstrip("/")
            print(f"get_data: downloading ISBI 2012 slices ({3 * N_SLICES} PNGs, about 15 MB)", flush=True)
            download_to(staging, args.url)
        warnings = io.StringIO()
        try:
            with contextlib.redirect_stderr(warnings):
                n_train, n_test = check(staging)
        except DataError as e:  # name the file where it came from, not the staging copy about to vanish
            raise DataError(str(e).replace(staging, origin)) from None
        finally:
            sys.stderr.write(warnings.getvalue().replace(staging, origin))
        install(staging, args.data_dir, origin)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"get_data: {n_train} labeled training slices and {n_test} test slices in {args.data_dir}/")


if __name__ == "__main__":
    run_main(main)
