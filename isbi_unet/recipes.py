"""Training recipes: the defaults that depend on the machine, here and nowhere else.

"full" is the article's setting (width-64 U-Net on whole 512x512 slices); "cpu" is sized to finish in
under 30 minutes on 2 cores. A recipe's batch_size is the total over all processes; each process
takes its share. TrainUnetDataSet.py, benchmark.py and tools/torch_reference.py read them from here.
"""

from isbi_unet.errors import DataError
from isbi_unet.formats import POOL

RECIPES = {
    "full": dict(width=64, crop_size=0, samples_per_slice=1, batch_size=2, epochs=60, lr=3e-4),
    "cpu": dict(width=16, crop_size=256, samples_per_slice=4, batch_size=4, epochs=13, lr=1e-3),
}


def choose_recipe(name, cuda):
    """(recipe name, why it was chosen): `auto` means full on a CUDA device and cpu otherwise."""
    if name != "auto":
        return name, "--recipe"
    return ("full", "CUDA device found") if cuda else ("cpu", "no CUDA device")


def recipe_values(name, world_size=1):
    """The recipe's flag values for one process: its batch split over `world_size` processes."""
    values = dict(RECIPES[name])
    values["batch_size"] = max(1, values["batch_size"] // world_size)
    return values


def apply_recipe(flags, cuda, world_size=1):
    """A copy of the flag dict `flags` with the recipe chosen, its values filling the flags left at None, and
    combinations that cannot work refused (DataError naming the flag) before any heavy work; each flag's own
    range is isbi_unet/train_settings.py's."""
    recipe, reason = choose_recipe(flags["recipe"], cuda)
    values = recipe_values(recipe, world_size)
    flags = dict(flags, recipe=recipe, recipe_reason=reason)
    flags.update({key: value for key, value in values.items() if flags[key] is None})
    if flags["crop_size"] < 0 or 0 < flags["crop_size"] < POOL:
        raise DataError(f"--crop_size must be 0 or at least {POOL} (four poolings), got {flags['crop_size']}")
    if flags["amp"] and not (cuda and flags["graph"]):
        raise DataError("--amp needs --graph on a CUDA device (OneFlow's eager CPU path has no float16 kernels)")
    if flags["graph"] and world_size > 1:
        raise DataError("--graph runs on one process; under the launcher train in eager mode (DistributedDataParallel)")
    return flags
