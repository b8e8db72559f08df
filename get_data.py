"""Put the ISBI 2012 slices in data/: train/image, train/label (255 = cell, 0 = membrane) and test.

    python3 get_data.py                          # nothing to do if data/ is complete
    ISBI_DATA=/path/to/isbi2012 python3 get_data.py

Where from, in order: $ISBI_DATA or ../shared/data/isbi2012 (a folder of the same layout), else the
public 30 + 30 slice PNG copy in zhixuhao/unet (pinned to one commit, so its content cannot change).
Everything lands in a temporary folder and is checked (every file decodes, labels are binary, every
image has its label) before it is moved into place, so a failed copy or download leaves no half data.
It replaces only its own files: data/.get_data.json lists each file it put there with its size and digest.
A train/image, train/label or test folder holding anything else (a file of the user's, or one of its own
changed since) is never touched; then it changes nothing and says so. One get_data.py at a time writes a
data folder (docs/details.md, "What a script may write").
"""

from isbi_unet.process.interrupt import guard_start_up, keyboard_interrupts

if __name__ == "__main__":
    guard_start_up()  # Ctrl-C from here on: one line, exit 130, nothing half-written (isbi_unet/process/interrupt.py)


import contextlib
import io
import os
import shutil
import sys
import tempfile
import urllib.request

import cv2

from isbi_unet.errors import DataError, warn
from isbi_unet.flags import Parser
from isbi_unet.images import find_pairs, list_images, read_gray, read_pair
from isbi_unet.outputs import claim
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


def others_parts(out):
    """The parts of the claimed data folder holding anything get_data.py did not write, or changed since."""
    users = out.users(under=PARTS)
    return [part for part in PARTS if any(u == part or u.startswith(part + "/") for u in users)]


def install(staging, out, origin):
    """Moves the checked slices into the data folder, file by file, replacing only its own earlier ones; the
    record lists each with its size and digest."""
    files = [f"{part}/{name}" for part in PARTS for name in sorted(os.listdir(os.path.join(staging, part)))]
    out.start(writes=files, source=origin)
    for rel in files:
        os.replace(os.path.join(staging, rel), out.path(rel))


def fetch(args, out):
    """Copies or downloads the slices into a staging folder, checks them, and installs them: (train, test) counts."""
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
                counts = check(staging)
        except DataError as e:  # name the file where it came from, not the staging copy about to vanish
            raise DataError(str(e).replace(staging, origin)) from None
        finally:
            sys.stderr.write(warnings.getvalue().replace(staging, origin))
        install(staging, out, origin)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


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
    inputs = [(args.source, "--source")] if os.path.isdir(args.source) else []
    # --overwrite: the data folder may hold the user's other files; only the three parts must be free of them
    with claim(args.data_dir, "--data_dir", RECORD, overwrite=True, inputs=inputs) as out:  # one get_data at once
        if is_complete(args.data_dir):
            return
        if os.environ.get("ISBI_DATA") and not os.path.isdir(args.source):
            raise DataError(f"{args.source}: ISBI_DATA points to no folder")
        others = others_parts(out)
        if others:  # the user's own slices: neither replaced nor mixed with the challenge's
            found = ", ".join(os.path.join(args.data_dir, part) for part in others)
            warn(
                f"{found}: not written by get_data.py, or changed since, so left as is and nothing added; complete "
                "train/image, train/label and test there yourself, or get the ISBI 2012 slices with "
                "--data_dir NEW_FOLDER"
            )
            return
        n_train, n_test = fetch(args, out)
    print(f"get_data: {n_train} labeled training slices and {n_test} test slices in {args.data_dir}/")


if __name__ == "__main__":
    run_main(main)
