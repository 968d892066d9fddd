"""Decoding a scene once: the infer stage decodes each band file once into scratch files and serves its
overlapping windows from them, instead of decoding JPEG 2000 tiles again for every window.

One demo scene of 400 px, decoded in strips of 96 rows so that every window spans several strips.
"""

from __future__ import annotations

import shutil
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
