"""The data sync when the network misbehaves: a connection cut in the middle of a transfer is resumed, a
refusal that waiting cannot fix is one line at once."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.submit import transfer

STUB = """#!/bin/bash
# Stands in for rsync: fails as scripted by $RSYNC_SCRIPT (one exit code per call), then succeeds.
calls=$(( $(cat "$RSYNC_CALLS" 2>/dev/null || echo 0) + 1 )); echo "$calls" > "$RSYNC_CALLS"
code=$(sed -n "${calls}p" "$RSYNC_SCRIPT")
echo ">f+++++++++ file-$calls"
if [[ -n "$code" && "$code" != 0 ]]; then
  echo "${RSYNC_ERROR:-rsync error: error in socket IO (code $code)}" >&2
  exit "$code"
fi
"""


@pytest.fixture
def stub_rsync(tmp_path, monkeypatch):
    stub = tmp_path / "rsync"
    stub.write_text(STUB)
    stub.chmod(0o755)
    monkeypatch.setenv("RSYNC_CALLS", str(tmp_path / "calls"))
    monkeypatch.setenv("RSYNC_SCRIPT", str(tmp_path / "script"))
    monkeypatch.setattr(transfer, "FIRST_DELAY_S", 0.01)

    def script(*codes: int) -> list[str]:
        (tmp_path / "script").write_text("".join(f"{code}\n" for code in codes))
        return [str(stub), "src/", "cluster:/data/"]

    return script


def test_a_dropped_connection_is_retried_with_back_off_and_keeps_what_was_sent(stub_rsync, capsys):
    argv = stub_rsync(12, 255, 0)
    code, out, _ = transfer.run_rsync(argv, first_delay=0.01)
    assert code == 0 and out.splitlines() == [">f+++++++++ file-1", ">f+++++++++ file-2", ">f+++++++++ file-3"]
    err = capsys.readouterr().err
    assert "retry 1/3 in 0 s" in err and "retry 2/3" in err


def test_a_refusal_is_not_retried_and_is_one_line(stub_rsync, monkeypatch, capsys):
    monkeypatch.setenv("RSYNC_ERROR", "root@cluster: Permission denied (publickey).")
    assert transfer.main(["--", *stub_rsync(255, 0)]) == 255
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "failed and cannot be retried (exit 255: root@cluster: Permission denied" in err


def test_a_connection_that_keeps_dropping_gives_up_with_one_line(stub_rsync, capsys):
    assert transfer.main(["--", *stub_rsync(30, 30, 30, 30)]) == 30
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("rsync to cluster:/data/ failed after retries (exit 30")


@pytest.mark.cluster
def test_a_transfer_cut_by_killing_sshd_resumes_and_arrives_whole(local_cluster, tmp_path):
    """Kill the sshd serving the transfer halfway through: the next attempt sends the rest."""
    source = tmp_path / "send"
    source.mkdir()
    big = source / "B01.jp2"
    big.write_bytes(os.urandom(64 * 1024 * 1024))
    dest = local_cluster.remote_root / "transfer-test" / tmp_path.name
    argv = [sys.executable, "-m", "pipeline.submit.transfer", "--", "rsync", "--archive", "--partial",
            "--itemize-changes", "--timeout=60", "--bwlimit=16m", "--rsh", local_cluster.ssh_options().rsh(),
            f"{source}/", f"{local_cluster.user}@{local_cluster.host}:{dest}/"]
    killed: list[int] = []

    def cut_the_connection() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            partial = list(dest.glob(".B01.jp2.*"))
            if partial and partial[0].stat().st_size > 8 * 1024 * 1024:
                server = subprocess.run(["pgrep", "-f", "^rsync --server"], capture_output=True, text=True).stdout
                for pid in server.split():
                    parent = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[1]  # its sshd
                    subprocess.run(["kill", "-9", parent], check=False)
                    killed.append(int(parent))
            time.sleep(0.1)

    dest.mkdir(parents=True, exist_ok=True)
    cutter = threading.Thread(target=cut_the_connection)
    cutter.start()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        cutter.join()
        assert killed, "the transfer ended before it could be cut"
        assert done.returncode == 0, done.stderr
        assert "transfer interrupted" in done.stderr and "retry 1/3" in done.stderr
        sent = dest / "B01.jp2"
        assert hashlib.sha256(sent.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
    finally:
        subprocess.run(["rm", "-rf", str(dest)], check=False)


def sync_masks(source: Path, dest: Path, *flags: str) -> subprocess.CompletedProcess:
    """The stage_data role's sync of annotated_masks, with the real rsync into a local folder (no host needed)."""
    from pipeline.contract import formats

    return subprocess.run([sys.executable, "-m", "pipeline.submit.transfer", *flags, "--", "rsync", "--archive",
                           "--partial", "--itemize-changes", "--protect-args", "--timeout=120",
                           *(f"--exclude={pattern}" for pattern in formats.TEMPORARY_FILES), f"{source}/", f"{dest}/"],
                          capture_output=True, text=True, timeout=120)


def write_masks(folder: Path, content: bytes, record: bool, mtime: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"mask.tif": content, "coverage.tif": content[::-1]}
    if record:
        files[".snowpipe-complete.json"] = b'{"schema": 2, "stage": "annotate"}'
    for name, data in files.items():
        (folder / name).write_bytes(data)
        os.utime(folder / name, (mtime, mtime))


def test_the_mask_sync_never_replaces_masks_a_run_completed_on_the_cluster(tmp_path):
    """An annotate job of an earlier run wrote a scene's masks (with their record) into the shared
    data/annotated_masks/; the laptop holds an older, different copy. The next submission's sync used to replace
    mask.tif and coverage.tif under that run (its dataset job may be reading them). With --keep-completed the
    folder stays byte for byte; the user's own masks (no record there) are updated and new folders sent."""
    laptop, cluster = tmp_path / "laptop", tmp_path / "cluster" / "annotated_masks"
    write_masks(laptop / "20210115T102321", b"laptop's old mask", record=True, mtime=1_600_000_000)
    write_masks(laptop / "20210116T102321", b"the user's edited mask", record=False, mtime=1_700_000_000)
    write_masks(laptop / "20210117T102321", b"a scene the cluster lacks", record=False, mtime=1_700_000_000)
    write_masks(cluster / "20210115T102321", b"the cluster run's mask", record=True, mtime=1_650_000_000)
    write_masks(cluster / "20210116T102321", b"the user's first mask", record=False, mtime=1_600_000_000)
    (cluster / ".20210118T102321.partial-node-7").mkdir()  # a live annotate job's folder: never touched
    before = {path: path.read_bytes() for path in (cluster / "20210115T102321").iterdir()}

    plain = tmp_path / "plain"  # what the sync did before: the run's masks replaced by the laptop's
    shutil.copytree(cluster, plain)
    assert sync_masks(laptop, plain).returncode == 0
    assert (plain / "20210115T102321" / "mask.tif").read_bytes() == b"laptop's old mask"

    done = sync_masks(laptop, cluster, "--keep-completed")
    assert done.returncode == 0, done.stderr
    assert {path: path.read_bytes() for path in (cluster / "20210115T102321").iterdir()} == before
    assert (cluster / "20210116T102321" / "mask.tif").read_bytes() == b"the user's edited mask"
    assert (cluster / "20210117T102321" / "mask.tif").read_bytes() == b"a scene the cluster lacks"
    assert (cluster / ".20210118T102321.partial-node-7").is_dir()
    (kept,) = [line for line in done.stdout.splitlines() if line.startswith("kept ")]
    assert f"kept 1 folder(s) of {cluster}/ that a snowpipe stage completed there (20210115T102321;" in kept
    assert not [line for line in done.stdout.splitlines() if "20210115T102321/" in line and line[:2] in (">f", "cd")]


def test_keeping_completed_folders_into_a_destination_that_does_not_exist_yet_sends_everything(tmp_path):
    laptop = tmp_path / "laptop"
    write_masks(laptop / "20210115T102321", b"mask", record=True, mtime=1_600_000_000)
    done = sync_masks(laptop, tmp_path / "new", "--keep-completed")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "new" / "20210115T102321" / ".snowpipe-complete.json").is_file()
    assert "kept" not in done.stdout
