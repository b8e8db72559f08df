"""isbi_unet.flags: one spelling declared, the other accepted; defaults in --help; bad flags are one line."""

import os

import pytest

from conftest import REPO, assert_fails, run
from isbi_unet.flags import CORES, Above, Below, Parser, describe


def parser():
    p = Parser("doc")
    p.add_argument("--data_path", default="data/train", help="where")
    p.add_argument("--epochs", type=int, help="passes (recipe default)")
    p.add_argument("--tta", action="store_true", help="flips")
    p.add_argument("--tile", type=int, default=0, help="tile side; 0 = none")
    p.add_argument("--Test_Data_path", default="data/test", help="images")
    return p


@pytest.mark.parametrize("argv", [["--data_path", "x"], ["--data-path", "x"], ["--data-path=x"], ["--data_path=x"]])
def test_both_spellings(argv):
    assert parser().parse_args(argv).data_path == "x"


@pytest.mark.parametrize("flag", ["--Test_Data_path", "--test-data-path", "--Test-Data-Path"])
def test_the_articles_capitals_need_not_be_typed_in_kebab(flag):
    assert parser().parse_args([flag, "x"]).Test_Data_path == "x"


def test_a_kebab_value_is_left_alone():
    assert parser().parse_args(["--data_path=--my-dir"]).data_path == "--my-dir"


def test_help_shows_defaults_but_not_none_or_false():
    text = parser().format_help()
    assert "where (default: data/train)" in text and "0 = none (default: 0)" in text
    assert "(recipe default)\n" in text and "default: None" not in text and "default: False" not in text


@pytest.mark.parametrize("argv", [["--nope"], ["--epochs", "many"], ["extra"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "usage" not in err[0]


@pytest.mark.parametrize("script", ["plot.py", "visualize.py", "get_data.py"])
def test_scripts_report_a_bad_flag_in_one_line(script):
    assert_fails(run(script, "--no_such_flag", "1", check=False), "--no_such_flag")


def test_a_missing_required_flag_is_one_line():
    assert_fails(run("evaluate.py", "--prob_dir", "p", check=False), "--label_dir")


# --- every number bounded ---------------------------------------------------------------------------------

BOUNDED_SCRIPTS = ["TrainUnetDataSet.py", "plot.py", "evaluate.py", "visualize.py", "get_data.py", "benchmark.py",
                   "dataloader.py", "unet.py", "export_onnx.py", "predict_unet_test.py"]  # fmt: skip


def bounded_parser():
    p = Parser("doc")
    p.add_argument("--seed", type=int, default=0, bounds=(0, 2**32 - 1), help="seed")
    p.add_argument("--lr", type=float, default=1e-3, bounds=(Above(0), None), help="rate")
    p.add_argument("--sigma", type=float, default=0.0, bounds=(0, 1000), help="px")
    return p


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--seed", "4294967296"], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--lr", "0"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "-0.001"], "--lr"),
        (["--sigma", "inf"], "--sigma"),
        (["--sigma", "1000.5"], "--sigma"),
    ],
)
def test_a_number_out_of_its_range_is_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        bounded_parser().parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: argument {flag}: must be "), err
    assert f"got {argv[1]}" in err[0] or "got nan" in err[0] or "got inf" in err[0]


def test_a_number_in_its_range_and_the_ends_are_taken():
    args = bounded_parser().parse_args(["--seed", str(2**32 - 1), "--lr", "1e10", "--sigma", "0"])
    assert (args.seed, args.lr, args.sigma) == (2**32 - 1, 1e10, 0.0)


def test_ranges_are_described_as_they_are_checked():
    assert describe((0, 9), int) == "an integer in 0..9"
    assert describe((Above(0), 10), float) == "a finite number in (0, 10]"
    assert describe((Above(0), Below(1)), float) == "a finite number in (0, 1)"
    assert describe((0, None), float) == "a finite number >= 0"


def numeric_flags_without_bounds(path):
    """`--flag` names of add_argument / setting calls in `path` whose type is int or float but have no bounds."""
    import ast

    with open(path) as f:
        tree = ast.parse(f.read())
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "add_argument":
            keywords = {k.arg: k.value for k in node.keywords}
            numeric = isinstance(keywords.get("type"), ast.Name) and keywords["type"].id in ("int", "float")
            if numeric and "bounds" not in keywords:
                missing.append(ast.literal_eval(node.args[0]))
    return missing


@pytest.mark.parametrize("script", BOUNDED_SCRIPTS)
def test_every_numeric_flag_of_a_script_has_a_range(script):
    assert numeric_flags_without_bounds(os.path.join(REPO, script)) == []


def test_the_range_check_finds_an_unbounded_flag(tmp_path):
    (tmp_path / "s.py").write_text(
        'p.add_argument("--n", type=int, default=3)\np.add_argument("--m", type=int, bounds=(0, 1))\n'
    )
    assert numeric_flags_without_bounds(tmp_path / "s.py") == ["--n"]


def test_every_numeric_training_setting_has_a_range():
    from isbi_unet.flags import flag_fields, kind
    from isbi_unet.train_settings import TrainSettings

    numeric = [f.name for f in flag_fields(TrainSettings) if kind(f) in (int, float)]
    assert (
        "seed" in numeric and [n for n in numeric if not TrainSettings.__dataclass_fields__[n].metadata["bounds"]] == []
    )


def test_worker_processes_are_capped_at_the_cores(capsys):
    from TrainUnetDataSet import parse_args

    assert parse_args(["--num_workers", str(CORES)]).num_workers == CORES
    with pytest.raises(SystemExit):
        parse_args(["--num_workers", str(CORES + 1)])
    assert f"must be an integer in 0..{CORES}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script,argv,flag",
    [
        ("TrainUnetDataSet.py", ["--seed", 2**32], "--seed"),
        ("TrainUnetDataSet.py", ["--elastic-sigma", "inf"], "--elastic_sigma"),
        ("visualize.py", ["--dpi", 10**6], "--dpi"),
        ("benchmark.py", ["--steps", 0], "--steps"),
        ("unet.py", ["--width", 0], "--width"),
    ],
)
def test_scripts_refuse_an_out_of_range_number_in_one_line(script, argv, flag):
    assert_fails(run(script, *argv, check=False), f"argument {flag}: must be ")
