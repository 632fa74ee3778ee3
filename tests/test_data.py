"""Calibration sources: .npz, .npy folders, image folders, CalibrationDataReader, batching rules."""

import numpy as np
import pytest
from PIL import Image

from conftest import cnn
from onnxptq.data import CalibrationSet, ImageOptions, InputSpec, load_calibration
from onnxptq.errors import InputError


@pytest.fixture
def model(rng):
    return cnn(rng)


def test_npz_npy_folder_and_reader_agree(tmp_path, model, rng):
    x = rng.standard_normal((6, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "x.npy", x)
    (tmp_path / "samples").mkdir()
    for i in range(6):
        np.save(tmp_path / "samples" / f"{i:02d}.npy", x[i])

    class Reader:
        def __init__(self):
            self.items = iter([{"x": x[i:i + 2]} for i in range(0, 6, 2)])

        def get_next(self):
            return next(self.items, None)

    for source in (tmp_path / "c.npz", tmp_path / "npy", tmp_path / "samples", Reader(), {"x": x}):
        data = load_calibration(source, model)
        assert len(data) == 6
        np.testing.assert_array_equal(np.concatenate([f["x"] for f in data.batches(4)]), x)


def test_image_folder_preprocessing(tmp_path, model):
    img = np.zeros((40, 60, 3), np.uint8)
    img[..., 0] = 255  # pure red
    Image.fromarray(img).save(tmp_path / "a.png")
    data = load_calibration(tmp_path, model, ImageOptions(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    (x,) = data.arrays.values()
    assert x.shape == (1, 3, 16, 16)
    np.testing.assert_allclose(x[0, 0], 1.0)
    np.testing.assert_allclose(x[0, 1:], -1.0)


def test_sample_axis_rules():
    fixed = [InputSpec("x", np.dtype(np.float32), (1, 4))]
    per_sample = CalibrationSet({"x": np.zeros((5, 1, 4), np.float32)}, fixed, "t")
    assert [f["x"].shape for f in per_sample.batches(8)] == [(1, 4)] * 5
    free = [InputSpec("x", np.dtype(np.float32), (None, 4))]
    batched = CalibrationSet({"x": np.zeros((5, 4), np.float32)}, free, "t")
    assert [f["x"].shape for f in batched.batches(2)] == [(2, 4), (2, 4), (1, 4)]
    with pytest.raises(InputError, match="multiple of 2"):
        CalibrationSet({"x": np.zeros((5, 4), np.float32)}, [InputSpec("x", np.dtype(np.float32), (2, 4))], "t")


def test_split_holds_back_the_tail():
    spec = [InputSpec("x", np.dtype(np.float32), (None, 1))]
    data = CalibrationSet({"x": np.arange(10, dtype=np.float32)[:, None]}, spec, "t")
    head, tail = data.split(3)
    assert len(head) == 7 and tail.arrays["x"][:, 0].tolist() == [7, 8, 9]


def test_unsupported_sources(tmp_path, model):
    (tmp_path / "c.txt").write_text("1,2,3")
    with pytest.raises(InputError, match="not .npz"):
        load_calibration(tmp_path / "c.txt", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .npy or image files"):
        load_calibration(tmp_path / "empty", model)
    with pytest.raises(InputError, match="unsupported calibration source"):
        load_calibration(42, model)
