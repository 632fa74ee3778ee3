"""The examples' cache (examples/common.py): a package appears whole, once, even when two
processes fetch it at the same time; a cached file is written whole or not at all."""

import zipfile
from pathlib import Path

import pytest

from examples import common


def _archive(tmp: Path, text: str) -> Path:
    path = tmp / "pkg.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/data.txt", text)
    return path


def test_a_concurrent_fetch_that_finished_first_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE", tmp_path)

    def racing_fetch(tmp: Path) -> Path:
        # another process unpacks the same package while this one downloads
        common._unpack_once("pkg-1.0", lambda t: _archive(t, "first"))
        return _archive(tmp, "second")

    dest = common._unpack_once("pkg-1.0", racing_fetch)
    assert (dest / "pkg" / "data.txt").read_text() == "first"
    assert sorted(p.name for p in (tmp_path / "pkgs").iterdir()) == ["pkg-1.0"], "no temp folder left behind"


def test_a_failed_fetch_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE", tmp_path)

    def broken(tmp: Path) -> Path:
        raise OSError("download failed")

    with pytest.raises(OSError, match="download failed"):
        common._unpack_once("pkg-1.0", broken)
    assert list((tmp_path / "pkgs").iterdir()) == []


def test_write_atomic_replaces_whole_and_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "models" / "m.onnx"
    assert common.write_atomic(path, b"first") == path and path.read_bytes() == b"first"
    with pytest.raises(TypeError):
        common.write_atomic(path, "not bytes")  # fails inside the write, after the temp file exists
    assert path.read_bytes() == b"first"
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"], "no temp file left behind"
