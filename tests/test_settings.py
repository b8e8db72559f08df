"""isbi_unet/train_settings.py: the training settings declared once make the parser, the resume rule, the record
and README's sentence; the flags a user gave are known without argparse's private API."""

import dataclasses
import os
import re

import pytest

from conftest import REPO, repo_python_files
from isbi_unet.errors import DataError
from isbi_unet.flags import flag_fields, kind
from isbi_unet.train_settings import MAY_CHANGE, TrainSettings, resume_rule


def parse_args(argv):
    from TrainUnetDataSet import parse_args

    return parse_args(argv)


def test_readme_states_the_resume_rule_the_schema_makes():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = " ".join(f.read().split())
    assert resume_rule() in readme
    assert "`--epochs`" in resume_rule() and "`--seed`" not in resume_rule()


def test_the_resume_check_reads_the_schema():
    from isbi_unet import run_dir

    assert run_dir.MAY_CHANGE is MAY_CHANGE and {"epochs", "device", "num_workers"} <= MAY_CHANGE
    assert "width" not in MAY_CHANGE and "data_path" not in MAY_CHANGE
    assert all(f"--{name}" in run_dir.KEPT for name in MAY_CHANGE)


def test_given_is_exactly_the_flags_on_the_command_line_even_at_their_default():
    args = parse_args(["--seed", "0", "--epochs=3", "--num-workers", "0", "--bilinear"])
    assert args.given == {"seed", "epochs", "num_workers", "bilinear"}
    assert (args.seed, args.epochs, args.width, args.loss) == (0, 3, None, "bce_dice")  # defaults filled in
    assert parse_args([]).given == frozenset()


def test_no_code_reads_argparses_private_actions():
    offenders = []
    for path in repo_python_files():
        with open(os.path.join(REPO, path)) as f:
            if re.search(r"\._(option_string_)?actions\b", f.read()):
                offenders.append(path)
    assert offenders == []


@pytest.mark.parametrize("field", [f.name for f in flag_fields(TrainSettings)])
def test_every_setting_is_a_flag_in_both_spellings(field):
    f = TrainSettings.__dataclass_fields__[field]
    value = {bool: [], int: ["1"], float: ["1.5"]}.get(kind(f), [str((f.metadata["choices"] or ["x"])[-1])])
    for spelling in (f"--{field}", "--" + field.replace("_", "-")):
        args = parse_args([spelling, *value])
        assert args.given == {field}


def test_the_record_is_the_settings_and_they_are_read_only():
    s = TrainSettings(epochs=2, batch_size=1, lr=1e-3, width=4, crop_size=32, samples_per_slice=1, original={"a": 1})
    record = s.record()
    assert "original" not in record and "changed" not in record
    # and the directory a relative --data_path is relative to, for a checkpoint resumed from elsewhere
    assert set(record) == {f.name for f in dataclasses.fields(TrainSettings)} - {"original", "changed"} | {"cwd"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.epochs = 3


@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("seed", 2**32), ("elastic_sigma", float("nan"))])
def test_a_value_from_a_record_out_of_range_is_refused_naming_the_flag(field, value):
    with pytest.raises(DataError, match=rf"^--{field} must be .*, got {re.escape(str(value))}$"):
        TrainSettings(**{field: value})
