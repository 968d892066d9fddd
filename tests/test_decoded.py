"""Decoding a scene once: the infer stage decodes each band file once into scratch files and serves its
overlapping windows from them, instead of decoding JPEG 2000 tiles again for every window.

One demo scene of 400 px, decoded in strips of 96 rows so that every window spans several strips.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from pipeline.data.decoded import DecodedScene
from pipeline.data.layout import Scene, discover_scenes, find_auxiliary
from pipeline.data.normalise import reflectance
from pipeline.data.reader import SceneReader
from pipeline.demo import generate_demo
from pipeline.errors import SceneError
from tests.builders import sid

SIZE = 400
TILE = "32TNS"
WINDOWS = [Window(0, 0, SIZE, SIZE), Window(0, 0, 37, 53), Window(150, 90, 130, 170),
           Window(SIZE - 61, SIZE - 45, 61, 45), Window(3, 380, 200, 20)]


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Scene:
    root = tmp_path_factory.mktemp("decoded")
    generate_demo(root, scenes=1, size=SIZE, seed=11)
    return discover_scenes(root / "extracted_data", TILE)[0]


def decode_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("decode-")]


def test_the_decoded_scene_serves_the_numbers_of_the_band_files(scene, tmp_path):
    with SceneReader(scene, TILE) as reader, DecodedScene(scene, TILE, scratch=tmp_path, strip=96) as decoded:
        folder = decoded.folder
        assert folder.parent == tmp_path and len(list(folder.glob("*.u16"))) == 13
        for window in WINDOWS:
            expected, expected_valid = reader.read_bands(window)
            got, valid = reflectance(decoded.read_dn(window), scene.dn_offset)
            assert got.shape == expected.shape and got.dtype == np.float32
            assert np.array_equal(valid, expected_valid), window
            # GDAL's bilinear warper rounds a few pixels to the other neighbouring DN depending on the
            # window it is asked for: at most 1 DN (0.0001 reflectance), on a tiny share of the pixels.
            difference = np.abs(got - expected)
            assert difference.max() <= 1.01e-4, window
            assert (difference > 0).mean() < 0.002, window
        assert decoded.decoded_rows() == SIZE
    assert not folder.exists(), "the scratch files are deleted on close"
    assert not decode_threads()


def test_a_window_waits_for_the_strips_it_needs(scene, tmp_path):
    """Asked for at once, the last rows come back complete, not as the zeros of a file still being written."""
    with SceneReader(scene, TILE) as reader:
        bottom = Window(0, SIZE - 10, SIZE, 10)
        expected = reader.read_band("B02", bottom)
    with DecodedScene(scene, TILE, scratch=tmp_path, strip=32) as decoded:
        dn = decoded.read_dn(bottom)
    assert np.array_equal(dn[1], expected)  # B02 is the second band: no resampling, exact


def test_a_band_that_cannot_be_decoded_stops_the_scene_naming_it(scene, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(scene.safe_dir, broken / scene.safe_dir.name)
    damaged = discover_scenes(broken, TILE)[0]
    path = damaged.band_path("B11")
    with rasterio.open(path) as src:
        assert src.width > 0  # the header is intact: opening works, decoding fails
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with DecodedScene(damaged, TILE, scratch=tmp_path, strip=96) as decoded:
        with pytest.raises(SceneError, match="B11"):
            decoded.read_dn(Window(0, 0, SIZE, SIZE))
        folder = decoded.folder
    assert not folder.exists() and not decode_threads()


def test_closing_early_stops_the_decoding(scene, tmp_path):
    decoded = DecodedScene(scene, TILE, scratch=tmp_path, strip=8)
    decoded.close()
    assert not decode_threads() and not any(Path(tmp_path).iterdir())
    with pytest.raises(Exception, match="closed"):
        decoded.read_dn(Window(0, 0, 4, 4))


def test_normalising_digital_numbers_through_tables_equals_computing_it(scene):
    """The infer stage normalises uint16 DN by table lookup; training computed the same from reflectance."""
    from pipeline.data.normalise import Normaliser

    window = Window(0, 0, SIZE, SIZE)
    with SceneReader(scene, TILE, find_auxiliary(scene.safe_dir.parent, TILE)) as reader:
        dn = reader.read_dn(window)
        dem = reader.read_layer("dem", window)
    dn[3, :5, :5] = 0  # one band without data: the pixel is no data in every band
    bands, valid = reflectance(dn, scene.dn_offset)
    assert 0 < valid.mean() < 1
    for normaliser in (Normaliser.fit(bands[:, valid], None), Normaliser.fit(bands[:, valid], dem[valid])):
        for offset in (scene.dn_offset, 0):
            reflectances, expected_valid = reflectance(dn, offset)
            expected = normaliser.apply(reflectances, dem)
            got, got_valid = normaliser.apply_dn(dn, normaliser.dn_tables(offset), dem)
            assert got.shape == expected.shape == (len(normaliser.channels), SIZE, SIZE)
            assert np.array_equal(got_valid, expected_valid)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


# --- scratch of killed and interrupted runs -------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
KILLED_RUN = """
import sys
from pathlib import Path
from rasterio.windows import Window
from pipeline.data.decoded import DecodedScene
from pipeline.data.layout import discover_scenes
scene = discover_scenes(Path(sys.argv[1]), "32TNS")[0]
with DecodedScene(scene, "32TNS", scratch=Path(sys.argv[2]), strip=8) as decoded:
    decoded.read_dn(Window(0, 0, 400, 400))
print("not killed")
"""


def scratch_folders(scratch: Path) -> set[str]:
    return {p.name for p in scratch.iterdir() if p.name.startswith("snowpipe-decoded-")}


def test_scratch_of_a_run_killed_with_sigkill_is_reclaimed_by_the_next_and_live_owners_keep_theirs(
        scene, tmp_path, capsys):
    from pipeline.data.decoded import owner_tag

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(scene.safe_dir.parent), str(scratch)],
                            env={**os.environ, "SNOWPIPE_KILL_AT": "decoded strip:20"}, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (left,) = scratch_folders(scratch)
    assert sum(f.stat().st_size for f in (scratch / left).iterdir()) > 0, "decoded strips were left behind"
    host, pid, start = owner_tag().rsplit("-", 2)
    ours = f"snowpipe-decoded-{scene.id}-{host}-{pid}-{start}-live0000"  # a live owner: this test
    reused = f"snowpipe-decoded-{scene.id}-{host}-{pid}-{int(start) + 1}-reused00"  # this pid, another process
    elsewhere = f"snowpipe-decoded-{scene.id}-othernode-{pid}-{start}-shared00"  # another host's, shared TMPDIR
    legacy = f"snowpipe-decoded-{scene.date}-abc123"  # an older snowpipe's name: owner unknown
    for name in (ours, reused, elsewhere, legacy):
        (scratch / name).mkdir()
        (scratch / name / "B02.u16").write_bytes(b"\0" * 4096)
    capsys.readouterr()
    with DecodedScene(scene, TILE, scratch=scratch, strip=96) as decoded:
        assert scratch_folders(scratch) == {ours, elsewhere, legacy, decoded.folder.name}
        assert f"-{host}-{pid}-{start}-" in decoded.folder.name
    said = capsys.readouterr().err
    assert said.count("\n") == 1, said
    assert re.fullmatch(rf"freed \d+ [kMG]B of decoded scratch left by 2 killed run\(s\) in {scratch}\n", said)
    assert scratch_folders(scratch) == {ours, elsewhere, legacy}


SLOW_INFER = """
import sys, time
import pipeline.data.decoded as decoded
from pipeline import cli

def slow_strip(point):  # a full tile takes seconds per strip: decoding must still run when SIGTERM comes
    time.sleep(0.05)
    if point == "decoded strip" and not hasattr(slow_strip, "told"):
        slow_strip.told = True
        print("decoding", file=sys.stderr, flush=True)

decoded.reached = slow_strip
real_init, real_close = decoded.DecodedScene.__init__, decoded.DecodedScene.close
decoded.DecodedScene.__init__ = lambda self, *a, **k: real_init(self, *a, **{**k, "strip": 8})

def close(self):
    real_close(self)
    print(f"closed with {self.decoded_rows()} of {self.grid.height} rows decoded", file=sys.stderr, flush=True)

decoded.DecodedScene.close = close
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_during_infer_stops_the_decoding_and_removes_its_scratch(scene, tmp_path):
    """scancel sends SIGTERM: the CLI unwinds, DecodedScene.close stops the lanes after their strip and deletes
    the scratch folder, and the process exits 130 within seconds, not after decoding the whole scene."""
    import time

    import torch
    import yaml

    from pipeline.bands import BANDS, CLASS_NAMES
    from pipeline.data.normalise import Normaliser
    from pipeline.model.checkpoint import save_checkpoint
    from pipeline.model.unet import ModelSpec, UNet

    torch.manual_seed(0)
    model = UNet(ModelSpec(in_channels=len(BANDS), classes=len(CLASS_NAMES), base_channels=4, depth=2))
    reflectances = np.random.default_rng(0).uniform(0.05, 0.5, (len(BANDS), 1000)).astype(np.float32)
    save_checkpoint(tmp_path / "tiny.pt", {
        "spec": model.spec.to_dict(), "model": model.state_dict(), "channels": list(BANDS),
        "classes": list(CLASS_NAMES), "normalisation": Normaliser.fit(reflectances, None).to_dict(), "epoch": 1})
    config = tmp_path / "pipeline-config.yml"
    config.write_text(yaml.safe_dump({
        "tile_id": TILE, "paths": {"extracted_data": str(scene.safe_dir.parent), "results": "results"},
        "dataset": {"include_dem": False},
        "inference": {"enable": True, "checkpoint": "tiny.pt", "window": 128, "halo": 16, "batch_size": 2,
                      "device": "cpu", "quicklooks": False}}))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    job = subprocess.Popen([sys.executable, "-c", SLOW_INFER, "stage", "infer", str(config)], cwd=REPO,
                           env={**os.environ, "TMPDIR": str(scratch)}, stderr=subprocess.PIPE, text=True)
    try:
        assert job.stderr is not None
        for line in job.stderr:
            if line.strip() == "decoding":
                break
        assert scratch_folders(scratch), "the scene is being decoded into TMPDIR"
        job.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rest = job.stderr.read()
        job.wait(timeout=60)
    finally:
        job.kill()
    assert time.monotonic() - sent < 15, "the lanes stop after their current strip"
    assert job.returncode == 130 and "interrupted" in rest and "Traceback" not in rest, rest
    rows = re.search(r"closed with (\d+) of (\d+) rows decoded", rest)
    assert rows and int(rows[1]) < int(rows[2]), rest
    assert not scratch_folders(scratch), "the decoded scratch is gone"
    assert not (tmp_path / "results" / "predictions" / sid(scene.date) / "mask.tif").exists()
