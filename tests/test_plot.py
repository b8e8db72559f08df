"""plot.py on hand-made logs: the old columns, the new metric columns, blanks and bad input."""

import cv2

from conftest import assert_fails, run
from isbi_unet.figures import plot_losses, read_log

OLD = """epoch,train_loss,val_loss,lr,seconds
1,0.69,0.68,0.001,50.1
2,0.50,0.45,0.001,49.8
3,0.40,0.38,0.001,50.3
"""
NEW = """epoch,train_loss,val_loss,v_rand,v_info,pixel_error,lr,seconds
1,0.69,0.68,0.31,0.62,0.21,0.001,50.1
2,0.50,0.45,,,,0.001,49.8
3,0.40,0.38,0.52,0.85,0.09,0.001,50.3
"""


def test_old_log_gives_one_loss_panel(tmp_path):
    (tmp_path / "log.csv").write_text(OLD)
    assert plot_losses(read_log(str(tmp_path / "log.csv")), str(tmp_path / "a.png")) == [
        ["train loss", "validation loss"]
    ]
    out = run("plot.py", "--log", tmp_path / "log.csv").stdout.strip()
    assert out == str(tmp_path / "loss.png") and cv2.imread(out).shape == (480, 720, 3)


def test_metric_columns_add_a_second_panel_with_gaps_for_blank_cells(tmp_path):
    (tmp_path / "log.csv").write_text(NEW)
    columns = read_log(str(tmp_path / "log.csv"))
    assert columns["v_rand"][0] == 0.31 and columns["v_rand"][1] != columns["v_rand"][1]  # NaN
    panels = plot_losses(columns, str(tmp_path / "a.png"))
    assert panels == [["train loss", "validation loss"], ["V_rand", "V_info", "pixel error"]]
    run("plot.py", "--log", tmp_path / "log.csv", "--out", tmp_path / "b.png")
    assert cv2.imread(str(tmp_path / "b.png")).shape == (480, 1320, 3)


def test_log_without_validation_draws_train_loss_only(tmp_path):
    (tmp_path / "log.csv").write_text("epoch,train_loss,val_loss,lr,seconds\n1,0.7,nan,0.001,1\n2,0.6,nan,0.001,1\n")
    assert plot_losses(read_log(str(tmp_path / "log.csv")), str(tmp_path / "a.png")) == [["train loss"]]


def test_bad_logs_and_unwritable_output(tmp_path):
    (tmp_path / "log.csv").write_text("a,b\n1,2\n")
    assert_fails(run("plot.py", "--log", tmp_path / "log.csv", check=False), tmp_path / "log.csv", "not a training log")
    (tmp_path / "log.csv").write_text(OLD)
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    assert_fails(
        run("plot.py", "--log", tmp_path / "log.csv", "--out", blocker / "loss.png", check=False), blocker, "--out"
    )


def test_a_figure_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    (tmp_path / "log.csv").write_text(OLD)
    folder = tmp_path / "loss.png"  # with --overwrite it passes every check, then the write itself fails
    folder.mkdir()
    proc = run("plot.py", "--log", tmp_path / "log.csv", "--out", folder, "--overwrite", check=False)
    assert_fails(proc, folder, "cannot write the loss plot")
