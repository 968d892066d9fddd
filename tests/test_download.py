"""download: rsync over SSH from a data server (the embedded cluster's sshd serves a demo folder here)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline.config import parse_config
from pipeline.data.layout import discover_scenes, find_auxiliary
from pipeline.demo import generate_demo
from pipeline.errors import ConfigError, DataError, SnowpipeError
from pipeline.registry import STAGES
from pipeline.runner import select_stages
from pipeline.stages import download
from pipeline.stages.download import (
    Product,
    pick_products,
    refuse_in_batch_job,
    remote_of,
    selection_filters,
    unpack,
    verify_sizes,
)
from pipeline.stages.rsync import DataServer, Entry, explain, list_remote, parse_listing

TILE = "32TNS"
SAFE_A = "S2A_MSIL1C_20211220T102451_N0301_R065_T32TNS_20211220T122851"
SAFE_B = "S2B_MSIL1C_20220113T102411_N0301_R065_T32TNS_20220113T122811"


def config_for(root: Path, dates: list[str] | None = None, tile: str = TILE, **download_keys: object):
    data = {"tile_id": tile, "dates": dates or [], "paths": {"extracted_data": "local/extracted_data"},
            "download": {"enable": True, "host": "example.org", "remote_path": "/data", **download_keys}}
    return parse_config(data, root)


def expect_config_error(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"tile_id": TILE, "download": data}, Path("."))
    assert message in str(caught.value)


# ------------------------------------------------------------------ fast unit tests


def test_download_keys_have_safe_defaults():
    settings = parse_config({"tile_id": TILE}, Path(".")).download
    assert (settings.enable, settings.host, settings.port) == (False, "", 22)
    assert settings.known_hosts == "~/.ssh/known_hosts" and settings.key == settings.user == ""


@pytest.mark.parametrize(("data", "message"), [
    ({"enable": True}, "download: enable is true but host and remote_path are empty"),
    ({"enable": True, "host": "h"}, "download: enable is true but remote_path is empty"),
    ({"port": 0}, "download.port: expected a number >= 1, got 0"),
    ({"port": "22"}, "download.port: expected a whole number, got '22'"),
    ({"host": "-oProxyCommand=x"}, "download.host: expected a host name"),
    ({"user": "a b"}, "download.user: expected a login name"),
    ({"hots": "h"}, "download.hots: unknown key; valid keys in download: enable, host, user, port, key, known_hosts"),
])
def test_download_key_mistakes_name_the_key(data, message):
    expect_config_error(data, message)


def test_key_and_known_hosts_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id").write_text("k")
    (tmp_path / "keys" / "known").write_text("")
    remote = remote_of(config_for(tmp_path, key="keys/id", known_hosts="keys/known", port=2200, user="me"))
    assert (remote.key, remote.known_hosts) == (tmp_path / "keys" / "id", tmp_path / "keys" / "known")
    argv = remote.ssh_argv()
    assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv and argv[argv.index("-p") + 1] == "2200"
    assert remote.source == "me@example.org:/data/"
    with pytest.raises(ConfigError, match=r"download.key: file .*missing does not exist"):
        remote_of(config_for(tmp_path, key="missing", known_hosts="keys/known"))
    with pytest.raises(ConfigError, match="download.known_hosts: file .* does not exist"):
        remote_of(config_for(tmp_path, known_hosts="nowhere"))


def test_products_are_picked_by_tile_and_date_and_a_safe_folder_wins_over_its_zip():
    entries = [Entry(f"{SAFE_A}.SAFE", 4096, "dir"), Entry(f"{SAFE_A}.zip", 10, "file"),
               Entry(f"{SAFE_B}.zip", 10, "file"), Entry(SAFE_B.replace("T32TNS", "T33UUU") + ".zip", 10, "file"),
               Entry("notes.txt", 1, "file")]
    picked = pick_products(entries, [TILE], [], "server:/data")
    assert [(p.name, p.form) for p in picked] == [(f"{SAFE_A}.SAFE", "SAFE"), (f"{SAFE_B}.zip", "zip")]
    assert picked[1].folder == f"{SAFE_B}.SAFE"
    assert [p.date for p in pick_products(entries, [TILE], ["20220113T102411"], "s")] == ["20220113T102411"]
    with pytest.raises(DataError,
                       match="20990101T000000 in the config match no product.*available: 32TNS_20211220T102451"):
        pick_products(entries, [TILE], ["20990101T000000"], "s")
    with pytest.raises(DataError, match="no product of tile 10TAA .* in server:/data: check tiles"):
        pick_products(entries, ["10TAA"], [], "server:/data")


def test_filters_select_products_exolabs_days_and_auxiliary_only():
    products = [Product(f"{SAFE_A}.SAFE", "20211220T102451", TILE, "SAFE"),
                Product(f"{SAFE_B}.zip", "20220113T102411", TILE, "zip")]
    rules = selection_filters(products, {TILE: Entry("32TNS_auxiliary_data", 0, "dir")}, exolabs=True)
    assert rules == [f"--include=/{SAFE_A}.SAFE/***", f"--include=/{SAFE_B}.zip", "--include=/32TNS_auxiliary_data/***",
                     "--include=/ExoLabs_classification_S2/",
                     "--include=/ExoLabs_classification_S2/S2_32TNS_2021-12-20*.tif",
                     "--include=/ExoLabs_classification_S2/S2_32TNS_2022-01-13*.tif", "--exclude=*"]


def test_rsync_listings_are_parsed():
    text = ("drwxr-xr-x           4096 2024/01/31 12:00:00 .\n-rw-r--r--       12345 2024/01/31 12:00:00 a b.zip\n"
            "drwxr-xr-x           4096 2024/01/31 12:00:00 x.SAFE\nlrwxrwxrwx 3 2024/01/31 12:00:00 l -> t\n")
    assert parse_listing(text) == [Entry("a b.zip", 12345, "file"), Entry("x.SAFE", 4096, "dir"),
                                   Entry("l", 3, "other")]


@pytest.mark.parametrize(("stderr", "code", "message"), [
    ("Host key verification failed.\n", 255, "the host key of h port 22 is not in"),
    ("u@h: Permission denied (publickey).\n", 255, "h refused the login of u"),
    ("ssh: connect to host h port 22: Connection refused\n", 255,
     "cannot reach h port 22 (download.host, download.port)"),
    ("ssh: Could not resolve hostname h: Name or service not known\n", 255, "cannot reach h port 22"),
    ('rsync: [sender] change_dir "/data" failed: No such file or directory (2)\n', 23,
     "download.remote_path: folder /data does not exist on h"),
    ("bash: rsync: command not found\n", 127, "rsync is not installed on h"),
])
def test_ssh_and_rsync_failures_become_one_line_with_the_fix(stderr, code, message):
    error = explain(DataServer("h", "/data", user="u"), stderr, code, "listing")
    assert message in str(error) and "\n" not in str(error)


@pytest.mark.parametrize("variable", ["SNOWPIPE_BATCH_JOB", "SLURM_JOB_ID"])
def test_the_stage_refuses_to_run_in_a_batch_job(monkeypatch, variable):
    monkeypatch.setenv(variable, "run-1")
    message = f"download refused: {variable}=run-1 .*before `ansible-playbook submit.yml`"
    with pytest.raises(SnowpipeError, match=message):
        refuse_in_batch_job()


def test_the_cli_refusal_is_one_line(tmp_path):
    config = tmp_path / "pipeline-config.yml"
    config.write_text("tile_id: 32TNS\ndownload:\n  enable: true\n  host: example.org\n  remote_path: /data\n")
    env = {**os.environ, "SNOWPIPE_BATCH_JOB": "20240101-abc"}
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run([sys.executable, "-m", "pipeline", "stage", "download", str(config)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: download refused: SNOWPIPE_BATCH_JOB=20240101-abc" in result.stderr


def test_download_is_the_first_stage_and_runs_when_enabled(tmp_path):
    assert list(STAGES)[0] == "download"
    info = STAGES["download"]
    assert (info.per_scene, info.needs_gpu, info.section) == (False, False, "download")
    assert select_stages(config_for(tmp_path, dates=None))[:2] == ["download", "decode"]


def make_zip(folder: Path, zip_path: Path) -> None:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder.parent).as_posix())


def test_zips_unpack_atomically_once_and_corrupt_ones_are_named(tmp_path):
    product = tmp_path / "src" / f"{SAFE_A}.SAFE" / "GRANULE" / "g" / "IMG_DATA"
    product.mkdir(parents=True)
    (product / "T32TNS_20211220T102451_B02.jp2").write_bytes(b"x" * 100)
    zip_path = tmp_path / f"{SAFE_A}.zip"
    make_zip(tmp_path / "src" / f"{SAFE_A}.SAFE", zip_path)
    target = tmp_path / "out" / f"{SAFE_A}.SAFE"
    target.parent.mkdir()
    assert unpack(zip_path, target) is True
    assert (target / "GRANULE" / "g" / "IMG_DATA" / "T32TNS_20211220T102451_B02.jp2").stat().st_size == 100
    assert unpack(zip_path, target) is False and unpack(zip_path, target, force=True) is True
    assert sorted(p.name for p in target.parent.iterdir()) == [f"{SAFE_A}.SAFE"]  # no temporary left
    zip_path.write_bytes(zip_path.read_bytes()[:50])
    with pytest.raises(DataError, match=f"cannot unpack .*{SAFE_A}.zip .*delete it and run the download again"):
        unpack(zip_path, target)
    assert sorted(p.name for p in target.parent.iterdir()) == [f"{SAFE_A}.SAFE"]


# ------------------------------------------------------------------ against the local sshd


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two server folders: the demo's SAFE folders, and the same data with product zips instead."""
    root = tmp_path_factory.mktemp("server")
    summary = generate_demo(root / "demo", scenes=2, size=96, tiles=[TILE], seed=0)
    plain = root / "demo" / "extracted_data"
    zipped = root / "zipped"
    shutil.copytree(plain, zipped)
    for safe in sorted(zipped.glob("*.SAFE")):
        make_zip(safe, safe.with_suffix(".zip"))
        shutil.rmtree(safe)
    return plain, zipped, summary.dates


def cluster_config(root: Path, cluster, remote: Path, dates: list[str] | None = None, tile: str = TILE,
                   **overrides):
    keys = {"host": cluster.host, "port": cluster.port, "user": cluster.user, "key": str(cluster.key),
            "known_hosts": str(cluster.known_hosts), "remote_path": str(remote), **overrides}
    return config_for(root, dates=dates, tile=tile, **keys)


@pytest.mark.cluster
def test_safe_folders_download_and_a_second_run_transfers_nothing(tmp_path, local_cluster, servers):
    plain, _, dates = servers
    config = cluster_config(tmp_path, local_cluster, plain)
    first = download.run(config)
    assert first.count("done") == 2 and sum(o.details["files"] for o in first.outcomes) == 26
    dest = config.path("extracted_data")
    scenes = discover_scenes(dest, TILE)
    assert [s.date for s in scenes] == dates and all(s.exolabs and not s.missing_bands for s in scenes)
    auxiliary = find_auxiliary(dest, TILE).layers
    assert all(auxiliary[name] for name in ("lakes", "surface_water", "glacier", "dem"))
    second = download.run(config)
    assert second.count("skipped") == 2 and all(o.details["files"] == 0 for o in second.outcomes)
    assert second.note.startswith("0 file(s), 0.0 MB transferred")


@pytest.mark.cluster
def test_product_zips_are_unpacked_into_safe_folders_and_kept(tmp_path, local_cluster, servers):
    _, zipped, dates = servers
    config = cluster_config(tmp_path, local_cluster, zipped, dates=[dates[1]])
    report = download.run(config)
    assert report.count("done") == 1 and "1 zip(s) unpacked" in report.note
    dest = config.path("extracted_data")
    assert [s.date for s in discover_scenes(dest, TILE)] == [dates[1]]
    assert len(list(dest.glob("*.zip"))) == 1 and not list(dest.glob(".*.tmp"))
    exolabs = sorted(p.name for p in (dest / "ExoLabs_classification_S2").iterdir())
    assert len(exolabs) == 1 and exolabs[0].startswith(f"S2_{TILE}_{dates[1][:4]}-{dates[1][4:6]}")
    again = download.run(config)
    assert again.count("skipped") == 1 and "0 zip(s) unpacked" in again.note and again.note.startswith("0 file(s)")


@pytest.mark.cluster
def test_sizes_are_checked_against_the_server_listing(tmp_path, local_cluster, servers):
    plain, _, _ = servers
    config = cluster_config(tmp_path, local_cluster, plain)
    download.run(config)
    remote = remote_of(config)
    listing = list_remote(remote, [f"--include=/{SAFE_A}.SAFE/***", "--exclude=*"], recursive=True)
    dest = config.path("extracted_data")
    band = next(dest.glob(f"{SAFE_A}.SAFE/GRANULE/*/IMG_DATA/*_B02.jp2"))
    band.write_bytes(band.read_bytes()[:10])
    with pytest.raises(DataError, match=r"1 file\(s\) .* differ .*_B02.jp2 \(10 bytes, server \d+ bytes\)"):
        verify_sizes(listing, dest, remote.where)
    download.run(config)  # a rerun repairs it
    verify_sizes(listing, dest, remote.where)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.cluster
def test_connection_problems_are_clear_errors(tmp_path, local_cluster, servers):
    plain, _, _ = servers
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(SnowpipeError, match=f"host key of 127.0.0.1 port {local_cluster.port} is not in {empty}"):
        download.run(cluster_config(tmp_path, local_cluster, plain, known_hosts=str(empty)))
    port = free_port()
    with pytest.raises(SnowpipeError, match=f"cannot reach 127.0.0.1 port {port} .*Connection refused"):
        download.run(cluster_config(tmp_path, local_cluster, plain, port=port))
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(SnowpipeError, match=f"refused the login of {local_cluster.user} with key {stranger}"):
        download.run(cluster_config(tmp_path, local_cluster, plain, key=str(stranger)))
    with pytest.raises(DataError, match="download.remote_path: folder .*/nowhere does not exist on 127.0.0.1"):
        download.run(cluster_config(tmp_path, local_cluster, plain.parent / "nowhere"))
    with pytest.raises(DataError, match="no product of tile 33UUU"):
        download.run(cluster_config(tmp_path, local_cluster, plain, tile="33UUU"))
    assert not (tmp_path / "local").exists()  # nothing was created locally
