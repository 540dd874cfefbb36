"""The one atomic writer: unique temporary files, umask-honouring modes, symlinks written through,
OutputError for a place that cannot be written (issue 12, items 4 and 5)."""

import json
import os
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from headpolicy.errors import HeadPolicyError, OutputError
from headpolicy.io import atomic_directory, atomic_write, settings_data, write_json
from tests.policies.test_inspect import _png_size
from tests.policies.test_inspect import policy as small_policy


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


# ---- concurrent writers -----------------------------------------------------------------------------------
def test_concurrent_inspect_png_processes_to_one_path(tmp_path):
    """Four `inspect --png` runs to one path: each used to share `.NAME.tmp`, and 1-2 of 4 failed."""
    policy_file, png = tmp_path / "p.yaml", tmp_path / "heads.png"
    small_policy().save(policy_file)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "headpolicy", "inspect", str(policy_file), "--png", str(png)]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(4)]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert names(tmp_path) == ["heads.png", "p.yaml"]  # no temporary file left behind
    assert _png_size(png)[0] > 300


def test_concurrent_writers_in_one_process(tmp_path):
    target = tmp_path / "out.json"
    failures = []

    def writer(i):
        for j in range(25):
            try:
                write_json(target, {"writer": i, "step": j})
            except Exception as e:  # any failure is what this test looks for
                failures.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert names(tmp_path) == ["out.json"]
    assert json.loads(target.read_text())["step"] == 24  # whole: the last write of one of the writers


# ---- modes: as an ordinary file would get --------------------------------------------------------------
@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                              (0o077, 0o600, 0o700)])  # fmt: skip
def test_written_files_honour_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    """mkstemp's 0600 made a policy attached to a shared checkpoint unreadable to other users."""
    umask(mask)
    assert mode(small_policy().save(tmp_path / "p.yaml")) == file_mode
    assert mode(write_json(tmp_path / "r.json", {"a": 1})) == file_mode
    with atomic_directory(tmp_path / "onnx") as out:
        (out / "model.onnx").write_bytes(b"x")
    assert mode(tmp_path / "onnx") == dir_mode


def test_replacing_a_file_gives_the_umask_mode_not_the_old_one(tmp_path, umask):
    path = tmp_path / "p.yaml"
    path.write_text("old")
    path.chmod(0o600)
    umask(0o022)
    small_policy().save(path)
    assert mode(path) == 0o644


# ---- symlinks: written through ---------------------------------------------------------------------------
def test_saving_to_a_symlink_updates_its_target_and_keeps_the_link(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "policy.yaml"
    target.write_text("old")
    link = tmp_path / "link.yaml"
    link.symlink_to(os.path.relpath(target, tmp_path))
    chain = tmp_path / "chain.yaml"
    chain.symlink_to(link.name)

    written = small_policy().save(chain)
    assert written == target.resolve()
    assert chain.is_symlink() and link.is_symlink() and not target.is_symlink()
    assert os.readlink(link) == os.path.relpath(target, tmp_path)
    assert target.read_text() == small_policy().to_yaml()
    assert names(shared) == ["policy.yaml"] and names(tmp_path) == ["chain.yaml", "link.yaml", "shared"]


def test_a_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.yaml"
    link.symlink_to(tmp_path / "sub" / "p.yaml")
    small_policy().save(link)
    assert link.is_symlink() and (tmp_path / "sub" / "p.yaml").read_text() == small_policy().to_yaml()


# ---- places that cannot be written: OutputError, nothing left behind, the target untouched ----------------
def test_output_error_is_a_headpolicy_error_and_an_os_error():
    assert issubclass(OutputError, HeadPolicyError) and issubclass(OutputError, OSError)


@pytest.mark.parametrize(
    ("where", "match"),
    [
        (lambda d: d / "a-file" / "p.yaml", r"a-file is not a directory"),
        (lambda d: d / "a-file" / "deeper" / "p.yaml", r"cannot write .*deeper/p.yaml"),
        (lambda d: d / "a-dir", r"a-dir: it is a directory; give a file path"),
    ],
)
def test_an_impossible_path_is_an_output_error(tmp_path, where, match):
    (tmp_path / "a-file").write_text("keep")
    (tmp_path / "a-dir").mkdir()
    with pytest.raises(OutputError, match=match):
        atomic_write(where(tmp_path), "data")
    assert names(tmp_path) == ["a-dir", "a-file"] and (tmp_path / "a-file").read_text() == "keep"
    assert names(tmp_path / "a-dir") == []


@pytest.mark.parametrize("step", ["tempfile.mkstemp", "os.replace", "os.fsync"])
def test_a_refused_write_is_an_output_error_and_leaves_the_old_file(tmp_path, monkeypatch, step):
    """What a read-only folder or a full disk does (simulated: the tests run as root)."""
    path = tmp_path / "p.yaml"
    path.write_text("old")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(step, refuse)
    with pytest.raises(OutputError, match=f"cannot write {path}: Permission denied"):
        small_policy().save(path)
    monkeypatch.undo()
    assert path.read_text() == "old" and names(tmp_path) == ["p.yaml"]


def test_a_refused_folder_is_an_output_error(tmp_path, monkeypatch):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "old.onnx").write_bytes(b"old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(OutputError, match=f"cannot write folder {out}: Permission denied"):
        with atomic_directory(out) as tmp:
            (tmp / "model.onnx").write_bytes(b"new")
    monkeypatch.undo()
    assert names(tmp_path) == ["onnx"] and names(out) == ["old.onnx"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_folder_is_an_output_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="Permission denied"):
            small_policy().save(folder / "p.yaml")
    finally:
        folder.chmod(0o755)
    assert names(folder) == []


def test_a_folder_that_cannot_take_the_new_one_keeps_the_old(tmp_path, monkeypatch):
    """The second rename fails (the first, moving the old folder aside, worked): the old one is put back."""
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "old.onnx").write_bytes(b"old")
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr("os.replace", second_fails)
    with pytest.raises(OutputError, match="No space left on device"):
        with atomic_directory(out) as tmp:
            (tmp / "model.onnx").write_bytes(b"new")
    monkeypatch.undo()
    assert len(calls) == 3 and names(tmp_path) == ["onnx"] and names(out) == ["old.onnx"]


def test_settings_data_is_what_a_json_round_trip_gives_back(tmp_path):
    """Tuples become lists, so the recorded settings compare equal to the ones read back."""

    @dataclass(frozen=True)
    class Settings:
        lengths: tuple[int, ...] = (2048, 4096)
        depths: tuple[float, ...] = (0.1, 0.5)
        seed: int = 3
        name: str | None = None

    data = settings_data(Settings())
    assert data == {"lengths": [2048, 4096], "depths": [0.1, 0.5], "seed": 3, "name": None}
    assert json.loads(write_json(tmp_path / "s.json", data).read_text()) == data
