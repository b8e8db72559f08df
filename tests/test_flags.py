"""isbi_unet.flags: one spelling declared, the other accepted; defaults in --help; bad flags are one line."""

import pytest

from conftest import assert_fails, run
from isbi_unet.flags import Parser


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
