"""Stage 3, dataset: random patches inside coverage, a split by scene, normalisation, memory-mappable arrays.

Output in {dataset}/: `train_images.npy` (n, channels, P, P) float16, already normalised;
`train_masks.npy` (n, P, P) uint8 class ids; the same for `validation_`; and `manifest.json`
with the split, patch positions, class distribution and normalisation constants. The training
loader opens the arrays with `np.load(..., mmap_mode="r")`, so any number of workers share them.
The folder is built beside the target under a private name and swapped in whole, the manifest (its
completion record) being the last piece, under the dataset's lock (pipeline/records/publish.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from pipeline import records
from pipeline.bands import BANDS, CLASS_NAMES
from pipeline.config import Dataset, PipelineConfig
from pipeline.data.layout import Auxiliaries, Auxiliary, Scene, find_auxiliaries
from pipeline.data.masks import MaskFiles, find_mask
from pipeline.data.normalise import Normaliser
from pipeline.data.reader import SceneReader
from pipeline.data.scene_folders import read_folder
from pipeline.data.writer import allocate_npy, write_json
from pipeline.errors import DataError, SceneError, SnowpipeError
from pipeline.locks import output_lock
from pipeline.progress import make_progress, say
from pipeline.records import annotation
from pipeline.records.publish import building, reclaim_partials
from pipeline.registry import STAGES, stage_dates
from pipeline.stages import sampling
from pipeline.stages.base import SceneOutcome, StageReport, enforce_policy, failure_message
from pipeline.stages.decode import discover_readable, release_if_used

INFO = STAGES["dataset"]
MANIFEST = records.DATASET_MANIFEST
CHUNK = 1024  # patches are cut from reads of about this many pixels square
STATS_PIXELS = 2_000_000  # training pixels sampled to fit the normalisation


@dataclass
class ScenePlan:
    scene: Scene
    masks: MaskFiles
    split: str = "train"
    candidates: sampling.Candidates | None = None
    positions: list[tuple[int, int]] = field(default_factory=list)
    rows: dict[int, tuple[str, int]] = field(default_factory=dict)  # patch -> (split, row in its arrays)

    @property
    def scanned(self) -> sampling.Candidates:
        """The candidates of a plan that _scan kept (it drops every plan whose scan failed)."""
        assert self.candidates is not None, f"{self.scene.id}: scene not scanned"
        return self.candidates


def split_scenes(dates: list[str], settings: Dataset) -> tuple[set[str], str]:
    """Validation scene ids, and the split actually used (by scene unless only one scene exists). Scenes of
    every tile are split together: validation holds whole scenes of any tile."""
    if settings.split == "patch":
        return set(), "patch"
    if settings.validation_dates:
        named = settings.validation_dates
        unknown = sorted(entry for entry in named if not any(entry in (d, d.rpartition("_")[2]) for d in dates))
        if unknown:
            raise DataError(f"dataset.validation_dates: {', '.join(unknown)} not among the scenes "
                            f"with masks ({', '.join(dates)})")
        return {d for d in dates if d in named or d.rpartition("_")[2] in named}, "scene"
    if len(dates) < 2:
        return set(), "patch"
    rng = np.random.default_rng(settings.seed)
    n_val = min(len(dates) - 1, max(1, round(settings.validation_fraction * len(dates))))
    return {dates[i] for i in rng.permutation(len(dates))[:n_val]}, "scene"


def _check_grid(plan: ScenePlan, reader: SceneReader, mask: rasterio.DatasetReader) -> None:
    if (mask.width, mask.height) != (reader.grid.width, reader.grid.height) or \
            not mask.transform.almost_equals(reader.grid.transform):
        grid = reader.grid
        raise SceneError(plan.scene.id, f"{plan.masks.mask} is not on the scene's 10 m grid "
                                          f"({mask.width}x{mask.height} vs {grid.width}x{grid.height})")


def _plan_scene(plan: ScenePlan, config: PipelineConfig, auxiliaries: Auxiliaries) -> None:
    """Open everything once (so broken scenes fail here, before any patch is written) and summarise."""
    settings = config.dataset
    block = max(8, settings.patch_size // 8)
    with SceneReader(plan.scene, plan.scene.tile, auxiliaries[plan.scene.tile]) as reader, \
            rasterio.open(plan.masks.mask) as mask, rasterio.open(plan.masks.coverage) as coverage:
        _check_grid(plan, reader, mask)
        plan.candidates = sampling.candidates(sampling.summarise(mask, coverage, block), settings.patch_size)
    if len(plan.candidates.rows) == 0:
        raise SceneError(plan.scene.id, f"no {settings.patch_size} px patch lies fully inside coverage "
                                          f"(lower dataset.patch_size or check {plan.masks.coverage})")


def _extract(plan: ScenePlan, config: PipelineConfig, auxiliaries: Auxiliaries, arrays: dict[str, tuple],
             rng: np.random.Generator, stats: list, per_patch: int) -> None:
    """Cut the scene's patches (raw reflectance and DEM, float16) into their rows of the split arrays."""
    size = config.dataset.patch_size
    by_chunk: dict[tuple[int, int], list[int]] = {}
    for i, (row, col) in enumerate(plan.positions):
        by_chunk.setdefault((row // CHUNK, col // CHUNK), []).append(i)
    with SceneReader(plan.scene, plan.scene.tile, auxiliaries[plan.scene.tile]) as reader, \
            rasterio.open(plan.masks.mask) as mask:
        for members in by_chunk.values():
            spots = [plan.positions[i] for i in members]
            r0, c0 = min(r for r, _ in spots), min(c for _, c in spots)
            r1, c1 = max(r for r, _ in spots) + size, max(c for _, c in spots) + size
            window = Window(c0, r0, c1 - c0, r1 - r0)
            bands, _ = reader.read_bands(window)
            dem = reader.read_layer("dem", window) if config.dataset.include_dem else None
            labels = mask.read(1, window=window)
            for i, (row, col) in zip(members, spots):
                split, index = plan.rows[i]
                images, masks = arrays[split]
                rs, cs = slice(row - r0, row - r0 + size), slice(col - c0, col - c0 + size)
                images[index, :len(BANDS)] = bands[:, rs, cs]
                if dem is not None:
                    images[index, len(BANDS)] = dem[rs, cs]
                masks[index] = labels[rs, cs]
                if split == "train":
                    pick = rng.choice(size * size, size=per_patch, replace=False)
                    stats.append((bands[:, rs, cs].reshape(len(BANDS), -1)[:, pick],
                                  None if dem is None else dem[rs, cs].reshape(-1)[pick]))


def _assign_rows(plans: list[ScenePlan], split: str, settings: Dataset, rng: np.random.Generator) -> dict:
    """Give every patch its split and row; the patch split draws validation patches at random."""
    patches = [(plan, i) for plan in plans for i in range(len(plan.positions))]
    if split == "patch":
        n_val = min(len(patches) - 1, max(1, round(settings.validation_fraction * len(patches))))
        validation = set(rng.permutation(len(patches))[:n_val].tolist())
    else:
        validation = {k for k, (plan, _) in enumerate(patches) if plan.split == "validation"}
    counts = {"train": 0, "validation": 0}
    for k, (plan, i) in enumerate(patches):
        name = "validation" if k in validation else "train"
        plan.rows[i] = (name, counts[name])
        counts[name] += 1
    return counts


def _normalise_in_place(images: np.ndarray, normaliser: Normaliser, with_dem: bool) -> None:
    for i in range(images.shape[0]):
        raw = images[i].astype(np.float32)
        images[i] = normaliser.apply(raw[:len(BANDS)], raw[len(BANDS)] if with_dem else None)


def _class_pixels(masks: np.ndarray) -> list[int]:
    counts = np.zeros(256, np.int64)
    for i in range(0, masks.shape[0], 256):
        counts += np.bincount(np.asarray(masks[i:i + 256]).ravel(), minlength=256)
    return [int(c) for c in counts[:len(CLASS_NAMES)]]


def _is_complete(out: Path, key: records.RecordKey) -> bool:
    """The manifest is the dataset's completion record; one written by an older snowpipe that still names the
    same files is upgraded in place (keeping its old identity as `legacy_inputs`, so training resumes)."""
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(data, dict) or data.get("config") != key.config:
        return False
    if data.get("schema") == records.SCHEMA:
        return data.get("inputs") == key.inputs and not records.output_problems(out, data.get("outputs", {}))
    arrays = [f"{split}_{kind}.npy" for split in ("train", "validation") for kind in ("images", "masks")]
    old_identity = key.sampled_inputs if data.get("schema") == records.SAMPLED_SCHEMA else key.legacy_inputs
    if data.get("inputs") == old_identity and all((out / name).is_file() for name in arrays):
        data.update(schema=records.SCHEMA, legacy_inputs=data["inputs"], inputs=key.inputs,
                    outputs=records.output_entries(out, arrays))
        write_json(out / MANIFEST, data)
        return True
    if data.get("inputs") is not None:
        say(f"  dataset: {out / MANIFEST} was written by an older snowpipe for inputs that no longer match "
            f"(moved, changed or interrupted data): building the dataset again")
    return False


def _mask_problem(config: PipelineConfig, scene: Scene, auxiliary: Auxiliary, files: MaskFiles) -> str | None:
    """Why a scene's masks cannot be trusted, or None: with annotation enabled they must be the annotate
    stage's complete output for this data and config; without, a snowpipe record must still vouch for them,
    and a folder without any record is the user's own."""
    folder = read_folder(config.path("annotated_masks"), scene, config.tiles)
    if files.mask is None or files.coverage is None:
        return (f"no annotated mask in {folder} (mask.tif and coverage.tif): run the annotate stage or add "
                f"the mask")
    if config.annotation.enable:
        key = annotation.record_key(scene, config, auxiliary)
        if not records.is_complete(folder, key, required=("mask.tif", "coverage.tif")):
            return (f"the masks in {folder} are not a complete annotate output for this data and config "
                    f"(interrupted, outdated or made by hand): run the annotate stage for this scene, or set "
                    f"annotation.enable: false to use masks you made yourself")
    elif records.read_record(folder) is not None and not records.vouches(folder):
        return (f"the masks in {folder} do not match their completion record (changed or half-copied): "
                f"run the annotate stage for this scene, or delete {folder / records.RECORD_NAME} if you "
                f"edited them yourself")
    return None


def _find_scenes(config: PipelineConfig, dates: list[str] | None, report: StageReport) -> list[ScenePlan]:
    """Scenes with an annotated mask; the others are reported as failed, by date."""
    plans: list[ScenePlan] = []
    masks_root = config.path("annotated_masks")
    auxiliaries = find_auxiliaries(config.path("extracted_data"), config.tiles)
    for scene in discover_readable(config, stage_dates(config, INFO.name, dates)):
        files = find_mask(masks_root, scene, config.tiles)
        problem = _mask_problem(config, scene, auxiliaries[scene.tile], files)
        if problem:
            report.outcomes.append(SceneOutcome(scene.id, "failed", message=problem))
        else:
            plans.append(ScenePlan(scene, files))
    return plans


def _scan(plans: list[ScenePlan], config: PipelineConfig, auxiliaries: Auxiliaries, report: StageReport) -> None:
    with make_progress() as progress:
        bar = progress.add_task("dataset: scanning masks", total=len(plans))
        for plan in list(plans):
            try:
                _plan_scene(plan, config, auxiliaries)
            except SnowpipeError as exc:
                report.outcomes.append(SceneOutcome(plan.scene.id, "failed", message=failure_message(exc)))
                plans.remove(plan)
            progress.advance(bar)


def _choose_positions(plans: list[ScenePlan], validation: set[str], settings: Dataset,
                      rng: np.random.Generator) -> None:
    train_pixels = sum((p.scanned.counts.sum(0) for p in plans if p.scene.id not in validation),
                       np.zeros(len(CLASS_NAMES), np.int64))
    weights = sampling.class_weights(train_pixels) if settings.sampling == "balanced" else None
    for plan in plans:
        plan.split = "validation" if plan.scene.id in validation else "train"
        # Validation patches are drawn uniformly, so validation metrics see the true class mix.
        use = weights if plan.split == "train" else None
        plan.positions = sampling.choose(rng, plan.scanned, settings.patches_per_scene, settings.patch_size, use)


def _write_splits(partial: Path, plans: list[ScenePlan], counts: dict[str, int], config: PipelineConfig,
                  auxiliaries: Auxiliaries, rng: np.random.Generator,
                  report: StageReport) -> tuple[Normaliser, dict[str, dict]]:
    """Cut all patches into the split arrays, fit the normalisation on the training ones, apply it."""
    settings = config.dataset
    channels, size = len(BANDS) + int(settings.include_dem), settings.patch_size
    # Allocated up front: a full disk is one OutputError here, not a SIGBUS while the patches are cut.
    arrays = {name: (allocate_npy(partial / f"{name}_images.npy", np.float16, (n, channels, size, size)),
                     allocate_npy(partial / f"{name}_masks.npy", np.uint8, (n, size, size)))
              for name, n in counts.items()}
    per_patch = int(np.clip(STATS_PIXELS // max(counts["train"], 1), 16, size * size))
    stats: list = []
    with make_progress() as progress:
        bar = progress.add_task("dataset: cutting patches", total=sum(counts.values()))
        for plan in plans:
            _extract(plan, config, auxiliaries, arrays, rng, stats, per_patch)
            progress.advance(bar, len(plan.positions))
            report.outcomes.append(SceneOutcome(plan.scene.id, "done", details={
                "split": plan.split, "patches": len(plan.positions)}))
    bands_sample = np.concatenate([s[0] for s in stats], axis=1).astype(np.float32)
    dem_sample = np.concatenate([s[1] for s in stats]).astype(np.float32) if settings.include_dem else None
    normaliser = Normaliser.fit(bands_sample, dem_sample, settings.normalisation.low_percentile,
                                settings.normalisation.high_percentile)
    splits_info = {}
    for name, (images, masks) in arrays.items():
        _normalise_in_place(images, normaliser, settings.include_dem)
        images.flush()
        masks.flush()
        pixels = _class_pixels(masks)
        rows = sorted((plan.rows[i][1], plan.scene.id, *plan.positions[i])
                      for plan in plans for i in range(len(plan.positions)) if plan.rows[i][0] == name)
        splits_info[name] = {
            "dates": sorted({date for _, date, _, _ in rows}),
            "patches": len(rows),
            "images": f"{name}_images.npy",
            "masks": f"{name}_masks.npy",
            "class_pixels": pixels,
            "class_fraction": [round(p / max(sum(pixels), 1), 6) for p in pixels],
            "positions": [[date, r, c] for _, date, r, c in rows],
        }
    return normaliser, splits_info


def run(config: PipelineConfig, dates: list[str] | None = None, force: bool = False) -> StageReport:
    start = time.perf_counter()
    settings = config.dataset
    out = config.path("dataset")
    report = StageReport(INFO.name, output=str(out))
    auxiliaries = find_auxiliaries(config.path("extracted_data"), config.tiles)
    for tile, auxiliary in auxiliaries.items():
        if settings.include_dem and auxiliary.layers.get("dem") is None:
            folder = auxiliary.folder or config.path("extracted_data")
            raise DataError(f"the dataset's DEM channel needs {tile}_30m_DEM_AW3D30.tif in {folder} "
                            f"(or set dataset.include_dem: false)")
    with output_lock(out, "dataset"):
        report = _build(config, dates, force, report, auxiliaries, start)
    if config.decode.keep == "until_used":
        for scene in discover_readable(config, stage_dates(config, INFO.name, dates)):
            release_if_used(config, scene)
    return report


def _build(config: PipelineConfig, dates: list[str] | None, force: bool, report: StageReport,
           auxiliaries: Auxiliaries, start: float) -> StageReport:
    """Under the dataset's lock: skip a complete dataset, or build it in a private folder and swap it in."""
    settings = config.dataset
    out = config.path("dataset")
    reclaim_partials(out)
    plans = _find_scenes(config, dates, report)
    key = records.key_for(INFO.name, config, [p for plan in plans for p in (*plan.scene.bands.values(),
                                                                            plan.masks.mask, plan.masks.coverage)],
                          "dataset")
    if not force and plans and _is_complete(out, key):
        report.outcomes += [SceneOutcome(p.scene.id, "skipped") for p in plans]
    else:
        _scan(plans, config, auxiliaries, report)
    for outcome in report.failed:
        say(f"  {outcome.scene}: FAILED: {outcome.message}")
    enforce_policy(report, settings.on_scene_error, "dataset")
    if report.count("skipped"):
        report.seconds = time.perf_counter() - start
        return report
    if not plans:
        raise DataError("no scene is usable for the dataset (see the messages above)")

    validation, split = split_scenes([p.scene.id for p in plans], settings)
    if split != settings.split:
        report.note = "one scene only: patches split at random instead of by scene"
    rng = np.random.default_rng(settings.seed)
    _choose_positions(plans, validation, settings, rng)
    counts = _assign_rows(plans, split, settings, rng)
    with building(out, owned=("*.npy", MANIFEST)) as partial:
        normaliser, splits_info = _write_splits(partial, plans, counts, config, auxiliaries, rng, report)
        arrays = [info[kind] for info in splits_info.values() for kind in ("images", "masks")]
        write_json(partial / MANIFEST, {
            "version": 1,
            "schema": records.SCHEMA,
            "tiles": config.tiles,
            "patch_size": settings.patch_size,
            "channels": normaliser.channels,
            "classes": list(CLASS_NAMES),
            "split": split,
            "sampling": settings.sampling,
            "seed": settings.seed,
            "class_distribution": {k: v["class_fraction"] for k, v in splits_info.items()},
            "splits": splits_info,
            "normalisation": normaliser.to_dict(),
            "inputs": key.inputs,
            "config": key.config,
            "outputs": records.output_entries(partial, arrays),
        })
    report.seconds = time.perf_counter() - start
    train, val = splits_info["train"], splits_info["validation"]
    fractions = ", ".join(f"{n} {f:.1%}" for n, f in zip(CLASS_NAMES, train["class_fraction"]))
    report.note = (report.note + "; " if report.note else "") + (
        f"{train['patches']} train patches ({len(train['dates'])} scenes), {val['patches']} validation "
        f"({len(val['dates'])} scenes); train classes: {fractions}")
    return report
