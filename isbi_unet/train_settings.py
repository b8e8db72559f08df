"""TrainUnetDataSet.py's settings, declared once: each field is a flag (help, default or recipe default, range,
whether a resumed run may change it) or a value the run derives. The schema makes the parser
(isbi_unet/flags.py), its recipe fields are filled by isbi_unet/recipes.py, the resume check reads
`MAY_CHANGE` (isbi_unet/run_dir.py), and config.json stores `record()`.
"""

import dataclasses
import os
from typing import Optional

from isbi_unet.errors import DataError
from isbi_unet.flags import CORES, Above, may_change, out_of_bounds, setting, stored
from isbi_unet.formats import LOSS_FUNCTIONS
from isbi_unet.process.runtime import JOIN_TIMEOUT
from isbi_unet.recipes import RECIPES

LAUNCHER = "under the launcher"
MAX_SECONDS = 1e7  # about 4 months: far beyond any step, below threading's TIMEOUT_MAX


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    data_path: str = setting("data/train", "image/ and label/ folders, or train-volume.tif and train-labels.tif")
    recipe: str = setting("auto", "defaults of the next 6 flags; auto: full if CUDA", choices=("auto", *RECIPES))
    epochs: Optional[int] = setting(
        None, "passes over the training slices (recipe default)", bounds=(1, 10**6), may_change=True
    )
    batch_size: Optional[int] = setting(
        None, "images per step and process (recipe default: its total over the processes)", bounds=(1, 4096)
    )
    lr: Optional[float] = setting(None, "Adam learning rate (recipe default)", bounds=(Above(0), None))
    width: Optional[int] = setting(
        None, "U-Net channels at the first level, 64 in the paper (recipe default)", bounds=(1, 1024)
    )
    crop_size: Optional[int] = setting(
        None, "train on random square crops of this side; 0 = whole slices (recipe default)", bounds=(0, 2**16)
    )
    samples_per_slice: Optional[int] = setting(
        None, "crops (or whole slices) per training slice and epoch (recipe default)", bounds=(1, 10**4)
    )
    bilinear: bool = setting(False, "bilinear upsampling instead of transposed convolutions")
    loss: str = setting("bce_dice", "bce (the article's), or BCE + soft Dice on membranes", choices=LOSS_FUNCTIONS)
    elastic_sigma: float = setting(10.0, "elastic deformation's grid std in px (paper: 10); 0 = off", bounds=(0, 1000))
    border_weight: float = setting(0.0, "w0 of the paper's border weight map (paper: 10); 0 = off", bounds=(0, 1000))
    schedule: str = setting("cosine", "lr: cosine decay to 0, or constant", choices=("cosine", "constant"))
    graph: bool = setting(False, "train and validate through nn.Graph (static graph), one process")
    amp: bool = setting(False, "mixed precision; CUDA with --graph only")
    bn_slices: int = setting(8, "precise BN: set BatchNorm statistics from N whole slices; 0 = off", bounds=(0, 10**6))
    val_slices: int = setting(5, "hold out a block of N neighbouring slices; 0 = none, best = last", bounds=(0, 10**6))
    val_start: int = setting(-1, "first held-out slice (name order); -1 = last N, others: CV folds", bounds=(-1, 10**9))
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N", may_change=True)
    seed: int = setting(0, "seed for weights, sampling and augmentation", bounds=(0, 2**32 - 1))
    checkpoint_dir: Optional[str] = setting(
        None, "checkpoints, log.csv, config.json (default: --resume's folder, else checkpoints)", may_change=True
    )
    resume: Optional[str] = setting(
        None, "continue this checkpoint's run, with the settings in the config.json beside it", may_change=True
    )
    overwrite: bool = setting(
        False, "train into a --checkpoint_dir that holds another run, replacing it", may_change=True
    )
    num_workers: int = setting(
        0, "DataLoader worker processes (data is in memory; 0 is fastest)", bounds=(0, CORES), may_change=True
    )
    join_timeout: float = setting(
        JOIN_TIMEOUT,
        "seconds for every process of every node to join before each exits 2 saying how many did",
        bounds=(Above(0), MAX_SECONDS),
        may_change=True,
        group=LAUNCHER,
    )
    step_timeout: float = setting(
        1800.0,
        "end the job (exit 3) when no training step has begun for this many seconds, as when a node froze; "
        "must exceed a step plus an epoch's validation and saving",
        bounds=(Above(0), MAX_SECONDS),
        may_change=True,
        group=LAUNCHER,
    )
    # Derived by the run, and recorded in config.json.
    recipe_reason: Optional[str] = setting(None, "why the recipe was chosen", flag=False)
    world_size: int = setting(1, "processes training together", flag=False)
    replace_run: bool = setting(False, "whether this run replaces another in --checkpoint_dir", flag=False)
    # A resumed run's config.json record, and what this resume changes: written into config.json's "resumed".
    original: Optional[dict] = setting(None, "the resumed run's config.json", flag=False, stored=False)
    changed: Optional[dict] = setting(None, "what this resume changes: name -> [was, now]", flag=False, stored=False)

    def __post_init__(self):
        problem = out_of_bounds(self)  # values from config.json and recipes too, not only the command line
        if problem:
            raise DataError(problem)

    def record(self):
        """What config.json and each checkpoint store: every stored field, and the directory a relative
        --data_path is relative to (a checkpoint copied on its own is resumed from anywhere)."""
        return {**stored(self), "cwd": os.getcwd()}


MAY_CHANGE = frozenset(may_change(TrainSettings))


def resume_rule():
    """The sentence README.md's Train section holds, made from the schema."""
    names = [f"`--{name}`" for name in may_change(TrainSettings)]
    return f"of its flags only {', '.join(names[:-1])} and {names[-1]} may change"
