"""A lock on a mount where `flock` is local to each host (NFS `nolock`, `local_lock=flock|all`) is refused in one
line from the mount table, before it is taken; a normal mount is locked as before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from layerprobe.cli import main
from layerprobe.locks import file_lock
from layerprobe.mounts import MOUNT_TABLE_ENV, mount_of, refuse_host_local_locks

ROOT_LINE = "21 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw"


def nfs_line(point: Path, options: str, fstype: str = "nfs") -> str:
    """A /proc/self/mountinfo line of an NFS mount at `point`, its mount point escaped as the kernel writes it."""
    return (
        f"97 21 0:52 / {escaped(point)} rw,relatime shared:60 - {fstype} server:/export rw,vers=3,{options},proto=tcp"
    )


def escaped(point: Path) -> str:
    return str(point).replace(" ", "\\040")


def write_table(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_mount_holding_a_path_is_the_longest_mount_point_over_it(tmp_path):
    shared, inside = tmp_path / "shared data", tmp_path / "shared data" / "local"
    table = write_table(
        tmp_path / "mountinfo",
        ROOT_LINE,
        nfs_line(shared, "nolock,local_lock=all"),
        f"98 97 252:2 / {escaped(inside)} rw - ext4 /dev/vdb rw",
    )
    assert mount_of(shared / "features" / ".d.extract.lock", table)[:2] == (str(shared), "nfs")
    assert mount_of(inside / "x", table)[:2] == (str(inside), "ext4")  # a disk mounted inside the NFS export
    assert mount_of(tmp_path / "shared", table)[0] == "/"  # a sibling whose name is a prefix is not inside
    refuse_host_local_locks(inside / "x", table)
    refuse_host_local_locks(tmp_path / "elsewhere", table)
    with pytest.raises(ValueError) as error:
        refuse_host_local_locks(shared / "features" / ".d.extract.lock", table)
    message = str(error.value)
    assert "\n" not in message and str(shared / "features" / ".d.extract.lock") in message
    assert f"{shared} is nfs mounted with `nolock`" in message


@pytest.mark.parametrize("options", ["local_lock=flock", "local_lock=all"])
def test_local_lock_options_that_cover_flock_are_refused_and_posix_is_not(tmp_path, options):
    refused = write_table(tmp_path / "refused", ROOT_LINE, nfs_line(tmp_path, options))
    with pytest.raises(ValueError, match=f"`{options}`"):
        refuse_host_local_locks(tmp_path / ".x.lock", refused)
    fine = write_table(tmp_path / "fine", ROOT_LINE, nfs_line(tmp_path, "local_lock=posix", fstype="nfs4"))
    refuse_host_local_locks(tmp_path / ".x.lock", fine)  # fcntl locks local, flock still the server's
    mounts_style = write_table(tmp_path / "mounts", f"server:/export {tmp_path} nfs rw,vers=3,{options} 0 0")
    with pytest.raises(ValueError, match=f"`{options}`"):
        refuse_host_local_locks(tmp_path / ".x.lock", mounts_style)


def test_a_nolock_mount_is_refused_by_the_cli_before_any_work_and_a_normal_one_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    project = os.path.realpath(tmp_path)
    monkeypatch.setenv(MOUNT_TABLE_ENV, str(write_table(tmp_path / "nolock", ROOT_LINE, nfs_line(project, "nolock"))))
    assert main(["prepare", "--dataset", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{project} is nfs mounted with `nolock`" in err
    assert not (tmp_path / "data").exists()  # refused before the lock or any output was made
    with pytest.raises(ValueError, match="nolock"):
        with file_lock(tmp_path / "other" / ".x.lock"):
            pass

    monkeypatch.setenv(MOUNT_TABLE_ENV, str(write_table(tmp_path / "lock", ROOT_LINE, nfs_line(project, "hard"))))
    assert main(["prepare", "--dataset", "digits"]) == 0
    assert (tmp_path / "data" / "prepared" / "digits").is_dir()
