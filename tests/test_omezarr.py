"""OME-Zarr in and out (isbi_unet/omezarr.py): images written by ome-zarr-py's own writer are read window by window
as they are; extra axes of size 1 are accepted; more than one channel, other pixel types, a missing chunk (which
zarr reads as zeros) and a truncated one (which Blosc decodes into noise) are one DataError each; the sinks write
images with the input's axes, chunks and scale that ome-zarr's reader (napari-ome-zarr's) opens."""

import json
import os

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")  # requirements-volumes.txt installs only on CPython 3.10+
pytest.importorskip("ome_zarr")

from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Reader  # noqa: E402

from conftest import assert_fails, predict_script, wait_for_blocks, write_omezarr  # noqa: E402
from isbi_unet.blocks import Block, exact_stats, streaming_stats  # noqa: E402
from isbi_unet.errors import DataError  # noqa: E402
from isbi_unet.omezarr import OmeZarrSink, OmeZarrSource, is_omezarr  # noqa: E402
from isbi_unet.volume import open_source, to_mask, to_prob_8  # noqa: E402


def volume(shape=(3, 100, 90), dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    return (rng.random(shape) * top).astype(dtype)


def test_reads_windows_of_every_slice_as_written(tmp_path):
    image = volume()
    source = open_source(write_omezarr(tmp_path / "v.ome.zarr", image))
    assert isinstance(source, OmeZarrSource)
    assert source.names == ["0", "1", "2"] and source.shape(1) == (100, 90) and source.dtype == np.uint8
    np.testing.assert_array_equal(source.read(1, slice(10, 70), slice(5, 90)), image[1, 10:70, 5:90])
    np.testing.assert_array_equal(source.read(2, slice(0, 100), slice(0, 90)), image[2])


@pytest.mark.parametrize(
    "axes, shape, dtype",
    [("yx", (64, 80), np.uint16), ("tczyx", (1, 1, 2, 64, 48), np.float32), ("cyx", (1, 40, 40), np.uint8)],
)
def test_2d_and_size_1_axes_and_pixel_kinds(tmp_path, axes, shape, dtype):
    image = volume(shape, dtype)
    source = OmeZarrSource(write_omezarr(tmp_path / "v.zarr", image, axes=axes))
    slices = image.reshape(-1, *shape[-2:])
    assert len(source.names) == len(slices) and source.dtype == dtype
    for z, want in enumerate(slices):
        np.testing.assert_array_equal(source.read(z, slice(0, shape[-2]), slice(0, shape[-1])), want)
        assert source.stats(z) == exact_stats(want)  # what the whole-image pass standardises with


def test_big_slices_stats_stream_through_chunk_rows(tmp_path, monkeypatch):
    import isbi_unet.omezarr

    image = volume((2, 300, 200), np.uint16)
    source = OmeZarrSource(write_omezarr(tmp_path / "v.zarr", image, chunks=(1, 64, 64)))
    monkeypatch.setattr(isbi_unet.omezarr, "EXACT_STATS_PIXELS", 100)  # as for a slice too big to hold
    want = streaming_stats(lambda ys: image[1][ys], (300, 200), image.dtype)
    got = source.stats(1)
    assert got.bits == want.bits == 16
    assert got.mean == pytest.approx(want.mean, abs=1e-12) and got.std == pytest.approx(want.std, abs=1e-12)


@pytest.mark.parametrize(
    "axes, shape, dtype, words",
    [
        ("czyx", (3, 2, 32, 32), np.uint8, "3 channels (axis c); only single-channel images are segmented"),
        ("tyx", (2, 32, 32), np.uint8, "axis t has 2 entries; only z, y, x may be longer than 1"),
        ("zyx", (2, 32, 32), np.int16, "unsupported pixel type int16; expected uint8, uint16 or float"),
        ("zyx", (2, 32, 32), np.uint32, "unsupported pixel type uint32"),
    ],
)
def test_refused_images_are_one_data_error(tmp_path, axes, shape, dtype, words):
    path = write_omezarr(tmp_path / "v.zarr", np.zeros(shape, dtype), axes=axes)
    with pytest.raises(DataError, match="^" + str(path)) as e:
        OmeZarrSource(path)
    assert words in str(e.value)


@pytest.mark.parametrize(
    "axes, words",
    [
        (
            [("c", "channel"), ("y", "space"), ("x", "space"), ("z", "space")],
            "axes c, y, x, z; the last two must be y, x",
        ),
        ([("z", "space"), ("c", "channel"), ("y", "space"), ("x", "space")], "axes z, c, y, x are not valid NGFF 0.4"),
    ],
)
def test_axes_must_be_valid_and_end_in_y_x(tmp_path, axes, words):
    path = write_omezarr(tmp_path / "v.zarr", np.zeros((2, 1, 32, 32), np.uint8), axes="czyx")
    attrs = json.loads((tmp_path / "v.zarr" / ".zattrs").read_text())
    attrs["multiscales"][0]["axes"] = [{"name": n, "type": t} for n, t in axes]
    (tmp_path / "v.zarr" / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(DataError, match=words):
        OmeZarrSource(path)


def test_not_an_image_a_collection_or_ngff_0_5_is_one_line(tmp_path):
    zarr.open_array(str(tmp_path / "plain.zarr"), mode="w", shape=(8, 8), dtype="u1")
    with pytest.raises(DataError, match="not an OME-Zarr image"):
        OmeZarrSource(tmp_path / "plain.zarr")
    os.makedirs(tmp_path / "raw.zarr")
    (tmp_path / "raw.zarr" / ".zattrs").write_text(json.dumps({"bioformats2raw.layout": 3}))
    write_omezarr(tmp_path / "raw.zarr" / "0", volume())
    with pytest.raises(DataError, match="a collection of OME-Zarr images; pass one of them, e.g. .*raw.zarr/0"):
        OmeZarrSource(tmp_path / "raw.zarr")
    os.makedirs(tmp_path / "v3.zarr")
    (tmp_path / "v3.zarr" / "zarr.json").write_text("{}")
    with pytest.raises(DataError, match="zarr v3 store"):
        OmeZarrSource(tmp_path / "v3.zarr")
    with pytest.raises(DataError, match="no such OME-Zarr folder"):
        OmeZarrSource(tmp_path / "absent.ome.zarr")
    assert is_omezarr(tmp_path / "absent.ome.zarr") and not is_omezarr(tmp_path)


def test_a_missing_chunk_is_refused_not_read_as_zeros(tmp_path):
    path = write_omezarr(tmp_path / "v.zarr", volume())
    os.remove(os.path.join(path, "0", "1", "1", "1"))  # rows 32-63, columns 32-63 of slice 1
    source = OmeZarrSource(path)
    np.testing.assert_array_equal(source.read(1, slice(0, 32), slice(0, 90)), volume()[1, :32])  # not touched
    with pytest.raises(DataError, match=r"chunk 0/1/1/1 is missing; zarr would read it as zeros"):
        source.read(1, slice(20, 40), slice(0, 90))


@pytest.mark.parametrize("compressor", ["blosc", "zlib", None])
def test_a_truncated_chunk_is_refused(tmp_path, compressor):
    from numcodecs import Blosc, Zlib

    codecs = {"blosc": Blosc(), "zlib": Zlib(), None: None}
    path = write_omezarr(tmp_path / "v.zarr", volume(), compressor=codecs[compressor])
    chunk = os.path.join(path, "0", "2", "0", "1")
    with open(chunk, "r+b") as f:
        f.truncate(os.path.getsize(chunk) // 2)
    source = OmeZarrSource(path)
    with pytest.raises(DataError, match=r"chunk 0/2/0/1 is truncated or corrupt"):
        source.read(2, slice(0, 100), slice(0, 90))


def test_sinks_write_what_ome_zarr_reads_with_the_inputs_axes_chunks_and_scale(tmp_path):
    image = volume((1, 2, 70, 50), np.uint16)
    transforms = [[{"type": "scale", "scale": [1.0, 30.0, 5.0, 5.0]}]]
    source = OmeZarrSource(
        write_omezarr(tmp_path / "v.zarr", image, axes="czyx", chunks=(1, 1, 32, 16), transforms=transforms)
    )
    prob = np.random.default_rng(1).random((2, 70, 50)).astype(np.float32)
    out = {
        "prob": OmeZarrSink(tmp_path / "out" / "prob.ome.zarr", source, to_prob_8, "prob"),
        "mask": OmeZarrSink(tmp_path / "out" / "mask.ome.zarr", source, lambda p: to_mask(p, 0.5), "mask"),
    }
    for z in range(2):
        for y0, y1 in ((0, 48), (48, 70)):
            for sink in out.values():
                sink.write(Block(z, y0, y1, 0, 50), prob[z, y0:y1])
    for sink in out.values():
        sink.close()
    for name, want in (("prob", to_prob_8(prob)), ("mask", to_mask(prob, 0.5))):
        node = list(Reader(parse_url(str(tmp_path / "out" / f"{name}.ome.zarr")))())[0]
        assert [a["name"] for a in node.metadata["axes"]] == ["c", "z", "y", "x"]
        assert node.metadata["coordinateTransformations"] == transforms
        assert node.data[0].chunksize == (1, 1, 32, 16) and node.data[0].dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(node.data[0])[0], want)
    # What this repo writes it also reads back, chunk for chunk (none is left out, all-zero ones included).
    again = OmeZarrSource(tmp_path / "out" / "mask.ome.zarr")
    np.testing.assert_array_equal(again.read(1, slice(0, 70), slice(0, 50)), to_mask(prob[1], 0.5))


def test_a_resumed_sink_keeps_what_was_written(tmp_path):
    source = OmeZarrSource(write_omezarr(tmp_path / "v.zarr", volume()))
    path = tmp_path / "prob.ome.zarr"
    first = OmeZarrSink(path, source, to_prob_8, "prob")
    first.write(Block(0, 0, 100, 0, 90), np.ones((100, 90), np.float32))
    OmeZarrSink(path, source, to_prob_8, "prob", resume=True).write(
        Block(1, 0, 100, 0, 90), np.zeros((100, 90), np.float32)
    )
    data = zarr.open_array(str(path / "0"), mode="r")[:]
    assert (data[0] == 255).all() and (data[1] == 0).all()


# ------------------------------------------------------------------------------------ predict_unet_test.py, end to end


def test_predict_writes_ome_zarr_maps_equal_to_the_stacks_and_ome_zarr_opens_them(trained_run, tmp_path):
    import tifffile

    image = volume((3, 80, 64), np.uint8, seed=2)
    path = write_omezarr(tmp_path / "v.ome.zarr", image, chunks=(1, 32, 32))
    tifffile.imwrite(tmp_path / "v.tif", image, photometric="minisblack")
    flags = ["--device", "cpu", "--workers", 1]
    out = predict_script(trained_run / "last", path, tmp_path / "out", *flags, "--tile", 32).stdout
    predict_script(trained_run / "last", tmp_path / "v.tif", tmp_path / "stack", *flags)  # whole slices
    assert (
        f"masks in {tmp_path / 'out' / 'mask.ome.zarr'}, probabilities in {tmp_path / 'out' / 'prob.ome.zarr'}" in out
    )
    assert sorted(os.listdir(tmp_path / "out")) == ["mask.ome.zarr", "prob.ome.zarr", "run.json", "submission.tif"]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["finished"] is True
    for name in ("prob", "mask"):
        node = list(Reader(parse_url(str(tmp_path / "out" / f"{name}.ome.zarr")))())[0]
        want = tifffile.imread(tmp_path / "stack" / f"{name}.tif")
        np.testing.assert_array_equal(np.asarray(node.data[0]), want)  # blocks of 32 px = whole slices, exactly
        assert node.metadata["coordinateTransformations"] == [[{"type": "scale", "scale": [50.0, 4.0, 4.0]}]]
    submission = tifffile.imread(tmp_path / "out" / "submission.tif")
    assert np.abs(submission - tifffile.imread(tmp_path / "stack" / "submission.tif")).max() == 0


def test_predict_refuses_more_channels_before_writing_and_a_missing_chunk_in_one_line(trained_run, tmp_path):
    many = write_omezarr(tmp_path / "rgb.ome.zarr", np.zeros((3, 2, 48, 48), np.uint8), axes="czyx")
    proc = predict_script(trained_run / "last", many, tmp_path / "out", check=False)
    assert_fails(proc, many, "3 channels (axis c)")
    assert not os.path.exists(tmp_path / "out")
    holed = write_omezarr(tmp_path / "holed.ome.zarr", volume((2, 64, 64)))
    os.remove(os.path.join(holed, "0", "1", "1", "0"))
    proc = predict_script(trained_run / "last", holed, tmp_path / "out", "--device", "cpu", check=False)
    assert_fails(proc, holed, "chunk 0/1/1/0 is missing")
    assert json.loads((tmp_path / "out" / "run.json").read_text())["finished"] is False  # never taken as a result


@pytest.mark.slow
def test_a_killed_run_on_ome_zarr_continues_to_the_uninterrupted_result(trained_run, procs, tmp_path):
    import sys

    path = write_omezarr(tmp_path / "v.ome.zarr", volume((6, 96, 96), seed=3), chunks=(1, 64, 64))
    flags = ["--device", "cpu", "--workers", 1, "--tile", 32]  # blocks of 32 px share chunks of 64: partial writes
    predict_script(trained_run / "last", path, tmp_path / "whole", *flags)
    args = ["--checkpoint", trained_run / "last", "--Test_Data_path", path, "--save_res_path", tmp_path / "cut"]
    proc = procs.start("cut", [sys.executable, "predict_unet_test.py", *args, *flags])
    wait_for_blocks(proc, tmp_path / "cut", 20)  # of 54
    procs.kill(proc)
    assert proc.returncode == -9
    out = predict_script(trained_run / "last", path, tmp_path / "cut", *flags).stdout
    assert "continuing the stopped run" in out
    for name in ("prob.ome.zarr", "mask.ome.zarr"):
        cut, whole = (zarr.open_array(str(tmp_path / run / name / "0"))[:] for run in ("cut", "whole"))
        np.testing.assert_array_equal(cut, whole)
