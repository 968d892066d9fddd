"""Infer from decoded rasters: the host reads native-resolution blocks, the device resamples and normalises
them. The model must see the same numbers as from the CPU reader (GDAL's no-data-aware bilinear warp):
equal for the 10 m and 20 m bands, within 1 DN for the 60 m bands, the same validity, no-data edges included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rasterio.windows import Window

from pipeline.bands import BAND_RESOLUTION, BANDS
from pipeline.config import load_config
from pipeline.data.layout import discover_scenes, find_auxiliary
from pipeline.data.normalise import Normaliser
from pipeline.data.reader import SceneReader
from pipeline.demo import generate_demo
from pipeline.demo.config_file import write_demo_config
from pipeline.inference.native import DeviceInput, native_input, upsample
from pipeline.inference.source import scene_input
from pipeline.stages import decode

SIZE = 300
TILE = "32TNS"
WINDOWS = [Window(0, 0, SIZE, SIZE), Window(0, 0, 37, 53), Window(13, 7, 101, 77),
           Window(SIZE - 61, SIZE - 45, 61, 45), Window(150, 0, 150, 300)]


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    write_demo_config(generate_demo(root, scenes=1, size=SIZE, seed=7))
    config = load_config(root / "pipeline-config.yml")
    decode.run(config)
    scene = decode.discover_readable(config, [])[0]
    assert scene.decoded
    return config, scene


def normaliser_for(scene, auxiliary) -> Normaliser:
    with SceneReader(scene, TILE, auxiliary) as reader:
        window = Window(0, 0, SIZE // 4, SIZE // 4)
        bands, valid = reader.read_bands(window, factor=4)
        dem = reader.read_layer("dem", window, factor=4)
    return Normaliser.fit(bands[:, valid], dem[valid])


def test_native_blocks_resampled_on_the_device_match_the_cpu_reader(decoded):
    config, scene = decoded
    auxiliary = find_auxiliary(config.path("extracted_data"), TILE)
    normaliser = normaliser_for(scene, auxiliary)
    to_device = DeviceInput(normaliser, scene.dn_offset, torch.device("cpu"))
    jp2 = discover_scenes(config.path("extracted_data"), TILE)[0]  # the reference: JPEG 2000 through GDAL
    with native_input(scene, TILE, auxiliary, normaliser)() as read_native, \
            scene_input(jp2, TILE, auxiliary, normaliser)() as read_reference, SceneReader(jp2, TILE) as reader:
        edges = 0
        for window in WINDOWS:
            inputs, valid = to_device(read_native(window))
            expected, expected_valid = read_reference(window)
            assert np.array_equal(valid.numpy(), expected_valid), window
            edges += int((~expected_valid).sum())
            got = inputs.numpy()
            for i, band in enumerate(BANDS):
                if BAND_RESOLUTION[band] < 60:
                    assert np.array_equal(got[i], expected[i]), (band, window)
                else:
                    assert (got[i] != expected[i]).mean() < 0.05, (band, window)
            assert np.allclose(got[len(BANDS)], expected[len(BANDS)])  # the DEM, read on the host as before
            # the 60 m bands within 1 DN of GDAL's warp
            native = read_native(window)
            block = next(b for b in native.blocks if b.factor == 6)
            h, w = int(window.height), int(window.width)
            up = upsample(block.dn.float(), 6)[:, block.row_skip:block.row_skip + h, block.col_skip:block.col_skip + w]
            for j, index in enumerate(block.bands):
                reference = reader.read_band(BANDS[index], window).astype(int)
                assert np.abs(up[j].numpy().astype(int) - reference).max() <= 1
                assert ((up[j].numpy() == 0) == (reference == 0)).all()
    assert edges > 1000  # the demo scene has no-data edges, and the windows cross them


def test_a_window_reads_only_its_native_pixels_and_a_margin(decoded):
    config, scene = decoded
    auxiliary = find_auxiliary(config.path("extracted_data"), TILE)
    normaliser = normaliser_for(scene, auxiliary)
    with native_input(scene, TILE, auxiliary, normaliser)() as read:
        native = read(Window(120, 60, 60, 60))
    shapes = {block.factor: tuple(block.dn.shape[1:]) for block in native.blocks}
    assert shapes[1] == (60, 60) and shapes[2] == (32, 32) and shapes[6] == (12, 12)
    assert all(block.dn.dtype == torch.uint16 for block in native.blocks)  # what crosses to the device


def test_digital_numbers_above_32767_survive_the_trip_to_the_device():
    from pipeline.inference.native import GROUPS, BandBlock, NativeWindow

    normaliser = Normaliser([0.01] * 13, [0.9] * 13, [0.2] * 13)
    to_device = DeviceInput(normaliser, 0, torch.device("cpu"))
    blocks = [BandBlock(factor, indices, torch.full((len(indices), 8, 8), 40000, dtype=torch.uint16), 0, 0)
              for factor, indices in GROUPS.items()]
    inputs, valid = to_device(NativeWindow(6, 6, blocks, None))
    expected = normaliser.dn_tables(0)[:, 40000]
    assert valid.all() and np.allclose(inputs.numpy()[:, 0, 0], expected)
