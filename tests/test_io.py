"""Atomic writes: outputs appear whole, with the permissions a plain open() would give, and no leftovers."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from dualanodiff.io import atomic_write_bytes, save_png


def test_atomic_write_has_plain_file_permissions_and_leaves_no_temporaries(tmp_path):
    (tmp_path / "plain").write_bytes(b"x")
    atomic_write_bytes(tmp_path / "sub" / "atomic", b"payload")
    assert (tmp_path / "sub" / "atomic").read_bytes() == b"payload"
    mode = stat.S_IMODE(os.stat(tmp_path / "sub" / "atomic").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert os.listdir(tmp_path / "sub") == ["atomic"]


def test_a_write_interrupted_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "image.png"
    save_png(target, np.zeros((4, 4), np.uint8))
    before = target.read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_png(target, np.full((4, 4), 255, np.uint8))
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["image.png"]
