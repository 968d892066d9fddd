"""The demo-data generator, checked through the rasters it writes (read back with rasterio)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.bands import AUX_FILES, BAND_RESOLUTION, BANDS, BASELINE_04_OFFSET, NODATA
from pipeline.data.tiles import tile_crs, tile_origin
from pipeline.demo import generate_demo
from pipeline.demo.render import band_reflectance, band_valid, make_fields
from pipeline.demo.scenes import plan_scenes, safe_name
from pipeline.demo.terrain import make_terrain
from pipeline.errors import SnowpipeError

SIZE, SCENES, TILE = 240, 3, "32TNS"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    calls = []
    out = tmp_path_factory.mktemp("demo")
    summary = generate_demo(out, scenes=SCENES, size=SIZE, tiles=[TILE], seed=0, progress=lambda *a: calls.append(a))
    return summary, calls


@pytest.fixture(scope="module")
def out(demo) -> Path:
    return demo[0].out


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def safe_dir(out: Path, date: str) -> Path:
    (safe,) = (out / "extracted_data").glob(f"S2?_MSIL1C_{date}_*.SAFE")
    return safe


def band_path(out: Path, date: str, band: str) -> Path:
    (path,) = safe_dir(out, date).glob(f"GRANULE/*/IMG_DATA/T{TILE}_{date}_{band}.jp2")
    return path


def bands(out: Path, date: str) -> dict[str, np.ndarray]:
    return {band: read(band_path(out, date, band)) for band in BANDS}


def exolabs_path(out: Path, date: str) -> Path:
    day = f"{date[:4]}-{date[4:6]}-{date[6:8]}"
    return out / "extracted_data" / "ExoLabs_classification_S2" / f"S2_{TILE}_{day}_classification.tif"


def truth(out: Path, date: str) -> np.ndarray:
    return read(out / "truth" / f"{TILE}_{date}.tif")


def to_10m(array: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(array, factor, 0), factor, 1)[:SIZE, :SIZE]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_layout_names_and_progress(demo):
    summary, calls = demo
    out = summary.out
    assert (summary.tiles, summary.size, len(summary.dates)) == ([TILE], SIZE, SCENES)
    assert all(re.fullmatch(r"\d{8}T\d{6}", date) for date in summary.dates)
    assert calls == [(i + 1, SCENES, f"{TILE}_{date}") for i, date in enumerate(summary.dates)]
    aux = out / "extracted_data" / f"{TILE}_auxiliary_data"
    assert sorted(p.name for p in aux.iterdir()) == sorted(
        f"{TILE}_{AUX_FILES[k]}" for k in ("lakes", "surface_water", "glacier", "dem")
    )
    safes = sorted(p.name for p in (out / "extracted_data").glob("*.SAFE"))
    assert len(safes) == SCENES and {name[:3] for name in safes} == {"S2A", "S2B"}
    pattern = rf"S2[AB]_MSIL1C_(\d{{8}}T\d{{6}})_N0(301|400)_R\d{{3}}_T{TILE}_\d{{8}}T\d{{6}}\.SAFE"
    assert sorted(re.fullmatch(pattern, name).group(1) for name in safes) == summary.dates
    for date in summary.dates:
        granule = next((safe_dir(out, date) / "GRANULE").iterdir())
        assert re.fullmatch(rf"L1C_T{TILE}_A\d{{6}}_{date}", granule.name)
        assert len(list((granule / "IMG_DATA").glob("*.jp2"))) == 13
        assert exolabs_path(out, date).is_file()
    assert not [p for p in out.rglob("*") if "partial" in p.name or p.suffix == ".xml"]


def test_grids_share_crs_and_corner(out, demo):
    date = demo[0].dates[0]
    rasters = {band_path(out, date, band): BAND_RESOLUTION[band] for band in BANDS}
    aux = out / "extracted_data" / f"{TILE}_auxiliary_data"
    rasters.update(
        {
            aux / f"{TILE}_{AUX_FILES[k]}": 10 if k == "lakes" else 30
            for k in ("lakes", "surface_water", "glacier", "dem")
        }
    )
    rasters.update({exolabs_path(out, date): 20, out / "truth" / f"{TILE}_{date}.tif": 10})
    for path, res in rasters.items():
        with rasterio.open(path) as src:
            side = math.ceil(SIZE * 10 / res)
            assert (src.height, src.width) == (side, side), path.name
            assert src.crs == tile_crs(TILE)
            assert (src.transform.c, src.transform.f) == tile_origin(TILE)
            assert (src.transform.a, -src.transform.e) == (res, res)
            if path.suffix == ".jp2":
                assert src.dtypes[0] == "uint16"
            else:
                assert src.profile["compress"] == "deflate"
    with rasterio.open(out / "truth" / f"{TILE}_{date}.tif") as src:
        assert src.nodata == NODATA and src.dtypes[0] == "uint8"


def test_dn_follow_reflectance_and_baseline(out, demo):
    dates = demo[0].dates
    baselines = [re.search(r"_(N\d{4})_", safe_dir(out, d).name).group(1) for d in dates]
    assert "N0301" in baselines and "N0400" in baselines
    terrain = make_terrain(SIZE, 0)
    for spec, date, baseline in zip(plan_scenes(SCENES, 0), dates, baselines):
        assert spec.date_key == date and spec.baseline == baseline
        fields = make_fields(terrain, spec)
        offset = BASELINE_04_OFFSET if baseline == "N0400" else 0
        for band in ("B04", "B11", "B10"):
            dn = read(band_path(out, date, band)).astype(np.int64)
            valid = band_valid(fields, band)
            assert 0.03 < (~valid).mean() < 0.3
            assert (dn[~valid] == 0).all() and (dn[valid] >= 1).all()
            expected = np.clip(np.rint(band_reflectance(fields, band) * 10000) + offset, 1, 65535)
            assert np.abs(dn[valid] - expected[valid]).max() <= 1


def test_same_seed_same_rasters_other_seed_differs(out, demo, tmp_path):
    date = demo[0].dates[0]
    again = generate_demo(tmp_path / "again", scenes=1, size=SIZE, tiles=[TILE], seed=0)
    other = generate_demo(tmp_path / "other", scenes=1, size=SIZE, tiles=[TILE], seed=1)
    assert again.dates[0] == date
    for band in ("B02", "B8A", "B09"):
        assert np.array_equal(read(band_path(out, date, band)), read(band_path(again.out, date, band)))
        assert not np.array_equal(read(band_path(out, date, band)), read(band_path(other.out, other.dates[0], band)))
    assert np.array_equal(truth(out, date), truth(again.out, date))
    assert np.array_equal(read(exolabs_path(out, date)), read(exolabs_path(again.out, date)))
    dem = f"extracted_data/{TILE}_auxiliary_data/{TILE}_{AUX_FILES['dem']}"
    assert np.array_equal(read(out / dem), read(again.out / dem))
    assert not np.array_equal(read(out / dem), read(other.out / dem))


def test_truth_classes_and_swath(out, demo):
    present = set()
    for date in demo[0].dates:
        classes = truth(out, date)
        assert set(np.unique(classes)) <= {0, 1, 2, 3, NODATA}
        empty = np.all([read(band_path(out, date, b)) == 0 for b in ("B02", "B03", "B04", "B08")], axis=0)
        assert np.array_equal(classes == NODATA, empty)
        counts = np.bincount(classes[classes != NODATA], minlength=4)
        assert (counts[:3] > 0).all(), counts
        present |= set(np.flatnonzero(counts))
    assert present == {0, 1, 2, 3}


def test_static_layers_are_plausible(out):
    aux = out / "extracted_data" / f"{TILE}_auxiliary_data"
    dem = read(aux / f"{TILE}_{AUX_FILES['dem']}")
    assert 300 < dem.min() < 1500 and 2500 < dem.max() < 4500
    lakes, jrc = read(aux / f"{TILE}_{AUX_FILES['lakes']}"), read(aux / f"{TILE}_{AUX_FILES['surface_water']}")
    assert set(np.unique(lakes)) == {0, 1} and 0.003 < lakes.mean() < 0.08
    assert iou(to_10m(jrc, 3) == 1, lakes == 1) > 0.6
    glacier = read(aux / f"{TILE}_{AUX_FILES['glacier']}")
    assert glacier.any() and dem[glacier == 1].mean() > dem.mean() + 500


def test_exolabs_is_a_close_but_different_opinion(out, demo):
    for date in demo[0].dates:
        exo = read(exolabs_path(out, date))
        assert set(np.unique(exo)) <= set(range(9))
        assert np.array_equal(exo == 0, read(band_path(out, date, "B05")) == 0)
        classes = truth(out, date)
        as_truth = np.select([exo == 4, exo == 3, exo == 6], [1, 2, 3], 0)
        valid = classes != NODATA
        agree = (to_10m(as_truth, 2) == classes)[valid].mean()
        assert 0.75 < agree < 0.99


@pytest.fixture(scope="module")
def s2cloudless_masks(out, demo):
    from s2cloudless import S2PixelCloudDetector

    detector = S2PixelCloudDetector(threshold=0.4, average_over=4, dilation_size=2, all_bands=True)
    terrain = make_terrain(SIZE, 0)
    results = {}
    for spec, date in zip(plan_scenes(SCENES, 0), demo[0].dates):
        stack = [to_10m(dn, BAND_RESOLUTION[b] // 10) for b, dn in bands(out, date).items()]
        reflectance = (np.stack(stack, -1).astype(np.float32) - spec.offset) / 10000
        probability = detector.get_cloud_probability_maps(reflectance[None])
        mask = detector.get_mask_from_prob(probability)[0].astype(bool)
        results[date] = (probability[0], mask, make_fields(terrain, spec).alpha)
    return results


def test_s2cloudless_finds_the_clouds(out, s2cloudless_masks):
    for date, (probability, mask, alpha) in s2cloudless_masks.items():
        classes = truth(out, date)
        valid = classes != NODATA
        assert iou(mask & valid, (classes == 2) & valid) >= 0.55, date
        assert np.percentile(probability[valid & (alpha > 0.7)], 10) > 0.9
        assert np.median(probability[classes == 0]) < 0.1
        snow = classes == 1
        assert mask[snow].mean() < 0.3  # some bright snow is flagged, but not most of it


def test_thesis_overlay_scores_well(out, s2cloudless_masks):
    aux = out / "extracted_data" / f"{TILE}_auxiliary_data"
    lakes, jrc = read(aux / f"{TILE}_{AUX_FILES['lakes']}"), read(aux / f"{TILE}_{AUX_FILES['surface_water']}")
    glacier = to_10m(read(aux / f"{TILE}_{AUX_FILES['glacier']}"), 3) == 1
    water = (lakes == 1) | (to_10m(jrc, 3) == 1)
    for date, (_, clouds, _) in s2cloudless_masks.items():
        overlay = np.zeros((SIZE, SIZE), np.uint8)
        overlay[water] = 3
        overlay[glacier] = 1
        overlay[to_10m(read(exolabs_path(out, date)), 2) == 4] = 1
        overlay[clouds] = 2
        classes = truth(out, date)
        scored = (classes != NODATA) & (classes != 2)
        for cls in (1, 3):
            assert iou((overlay == cls) & scored, (classes == cls) & scored) >= 0.8, (date, cls)


def test_arguments_are_checked(tmp_path):
    for kwargs in (dict(scenes=0), dict(size=10), dict(tiles=["nope"])):
        with pytest.raises(SnowpipeError):
            generate_demo(tmp_path, **kwargs)


def test_any_number_of_scenes_gets_distinct_sensing_days():
    """Past one season's days (161), one scene a day and on into the next seasons: none overwrites another."""
    specs = plan_scenes(400, 0)
    days = [spec.sensing.date() for spec in specs]
    assert len(set(days)) == len(set(spec.date_key for spec in specs)) == 400
    assert days == sorted(days)
    assert len({safe_name(spec, TILE) for spec in specs}) == 400
    season = plan_scenes(161, 0)  # one a day fills the season: the 400 begin with it, then a year later
    assert [s.date_key for s in specs[:161]] == [s.date_key for s in season]
    assert (season[-1].sensing.date() - season[0].sensing.date()).days == 160
    assert specs[161].sensing.date() == season[0].sensing.date().replace(year=2022)
    assert [s.date_key[:8] for s in plan_scenes(3, 0)] == ["20211220", "20220113", "20220206"]  # as ever
