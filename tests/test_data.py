"""Training data: the bundled digits and image folders, and every documented data error."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.cli import main
from fastdiff.data import DigitsData, FolderData, load_data


def _png(path, size=(6, 6), mode="L", value=None, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    a = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value,
                                                                                  np.uint8)
    Image.fromarray(a, mode).save(path)
    return a


def test_digits_native_and_resized():
    d = DigitsData()
    assert len(d) == 1797 and d.channels == 1 and d.resolution == 8 and d.num_classes == 10
    x = d.images(torch.arange(5))
    assert x.shape == (5, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    assert sorted(d.labels.unique().tolist()) == list(range(10))
    from sklearn.datasets import load_digits
    ref = torch.tensor(load_digits().images[:5], dtype=torch.float32) / 8.0 - 1.0
    assert torch.equal(x[:, 0], ref)
    d16 = load_data("digits", 16)
    assert d16.images(torch.arange(3)).shape == (3, 1, 16, 16) and d16.resolution == 16


def test_folder_classes_gray_exact_values(tmp_path):
    a = _png(str(tmp_path / "cat" / "a.png"), seed=1)
    _png(str(tmp_path / "cat" / "b.png"), seed=2)
    _png(str(tmp_path / "dog" / "sub" / "c.png"), seed=3)
    d = FolderData(str(tmp_path), class_labels=True)
    assert d.class_names == ["cat", "dog"] and d.labels.tolist() == [0, 0, 1]
    assert d.channels == 1 and d.resolution == 6 and len(d) == 3
    x = d.images(torch.tensor([0, 2]))
    assert x.shape == (2, 1, 6, 6)
    assert torch.equal(x[0, 0], torch.from_numpy(a).float() / 127.5 - 1)


def test_folder_rgb_resize_center_crop(tmp_path):
    _png(str(tmp_path / "wide.png"), size=(12, 6), mode="RGB", value=200)
    _png(str(tmp_path / "g.png"), size=(4, 4), mode="L", value=10)
    d = FolderData(str(tmp_path), resolution=4)
    assert d.channels == 3 and d.labels is None and d.class_names is None
    x = d.images(torch.arange(2))
    assert x.shape == (2, 3, 4, 4)
    # "g.png" sorts first: gray 10 on every channel; "wide.png": 200 after resize and crop
    assert torch.allclose(x[0], torch.full((3, 4, 4), 10 / 127.5 - 1))
    assert torch.allclose(x[1], torch.full((3, 4, 4), 200 / 127.5 - 1), atol=1e-2)


def test_error_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(str(tmp_path / "nope"))


def test_error_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        load_data(str(tmp_path))


def test_error_unreadable_file(tmp_path):
    _png(str(tmp_path / "ok.png"))
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"cannot read image file .*broken\.png"):
        load_data(str(tmp_path))


def test_error_mixed_sizes_without_resolution(tmp_path):
    _png(str(tmp_path / "a.png"), size=(6, 6))
    _png(str(tmp_path / "b.png"), size=(8, 8))
    with pytest.raises(ValueError, match="different sizes.*--resolution"):
        load_data(str(tmp_path))
    assert load_data(str(tmp_path), resolution=4).images(torch.arange(2)).shape == (2, 1, 4, 4)


def test_error_not_square_without_resolution(tmp_path):
    _png(str(tmp_path / "a.png"), size=(6, 4))
    with pytest.raises(ValueError, match="not square"):
        load_data(str(tmp_path))


def test_error_class_labels_layout(tmp_path):
    _png(str(tmp_path / "loose.png"))
    with pytest.raises(ValueError, match="holds images directly"):
        load_data(str(tmp_path), class_labels=True)
    os.remove(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="has none"):
        load_data(str(tmp_path), class_labels=True)
    (tmp_path / "empty_class").mkdir()
    _png(str(tmp_path / "full" / "a.png"))
    with pytest.raises(ValueError, match="empty_class.*holds no images"):
        load_data(str(tmp_path), class_labels=True)


def test_error_bad_resolution():
    with pytest.raises(ValueError, match="resolution must be a positive int"):
        load_data("digits", 0)


def test_cli_reports_data_errors(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    rc = main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "holds no images" in capsys.readouterr().err
