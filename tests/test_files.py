"""sslam_fast._files.write_text_atomic: the new text or the old file, never half of one, no temporary left."""

import os

import pytest

from sslam_fast._files import write_text_atomic


def test_write_replaces_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "list.txt"
    write_text_atomic(path, "a\nb\n")
    assert path.read_text(encoding="utf-8") == "a\nb\n"
    write_text_atomic(path, "é\r\n")  # UTF-8, newlines as given
    assert path.read_bytes() == "é\r\n".encode()

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "new")
    assert path.read_bytes() == "é\r\n".encode()
    assert os.listdir(tmp_path) == ["list.txt"]
