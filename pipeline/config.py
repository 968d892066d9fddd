"""pipeline-config.yml: one typed, validated tree; every error names the key path and the fix.

The top-level keys are fixed (docs/architecture.md). Each stage section has `enable`; what else it holds is
declared here and documented in the commented `pipeline-config.yml` at the repository root.
Relative paths resolve against the folder of the config file, so a config travels with its data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from pipeline.config_yaml import check_config_file, invalid, load_yaml, read_config_text
from pipeline.contract.formats import CONFIG_SCHEMA, SCHEMA_KEY
from pipeline.data.layout import SCENE_ID, Scene, available, discover_scenes, find_auxiliary
from pipeline.data.tiles import is_tile_id
from pipeline.errors import ConfigError, DataError
from pipeline.registry import STAGES, Access, folder_uses

DATE_KEY = re.compile(r"^\d{8}T\d{6}$")
DEFAULT_CONFIG = "pipeline-config.yml"
RUNTIME_KEYS = {"enable", "workers", "on_scene_error", "tensorboard"}
NESTED_RUNTIME_KEYS = {"cloud_detection": {"backend"}}  # the same, one level down
SEED_LIMIT = 2**32  # numpy's legacy seeding and many tools take 32-bit seeds
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


class Section(BaseModel):
    """Strict: unknown keys and wrong types are errors, never silently coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _check_dates(dates: list[str]) -> list[str]:
    """A date list holds sensing times (that time in every tile) or scene ids (one tile's scene)."""
    for date in dates:
        if not (DATE_KEY.match(date) or SCENE_ID.match(date)):
            raise ValueError(f"expected sensing times like 20210111T102309 (YYYYMMDDTHHMMSS, every tile) or "
                             f"scene ids like 32TNS_20210111T102309 (one tile), got {date!r}")
    if len(set(dates)) != len(dates):
        raise ValueError("lists a date twice")
    return dates


class Paths(Section):
    extracted_data: str = "extracted_data"
    annotated_masks: str = "annotated_masks"
    dataset: str = "dataset"
    results: str = "results"
    work: str = "work"
    # The decode stage's rasters, one folder per product; on a cluster: data/decoded beside extracted_data.
    decoded: str = "decoded"


HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class Download(Section):
    """Where the raw data lives: rsync over SSH from `user@host:remote_path` (pipeline/stages/download.py)."""

    enable: bool = False
    host: str = ""  # the data server; "" is allowed only while enable is false
    user: str = ""  # "" = ssh's default (the local user or ~/.ssh/config)
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    key: str = ""  # private key file; "" = ssh's default keys and agent
    known_hosts: str = "~/.ssh/known_hosts"  # host keys are always checked against this file
    remote_path: str = ""  # folder on the server with the products, ExoLabs_classification_S2/, {tile}_auxiliary_data/

    @field_validator("host")
    @classmethod
    def _host(cls, host: str) -> str:
        if host and not HOST_NAME.match(host):
            raise ValueError(f"expected a host name or IPv4 address such as data.example.org, got {host!r}")
        return host

    @field_validator("user")
    @classmethod
    def _user(cls, user: str) -> str:
        if user and not USER_NAME.match(user):
            raise ValueError(f"expected a login name (letters, digits, . _ -), got {user!r}")
        return user

    @field_validator("remote_path")
    @classmethod
    def _remote_path(cls, remote: str) -> str:
        if any(ch in remote for ch in "\n\r\0"):
            raise ValueError("expected a folder path on one line")
        return remote

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> Download:
        missing = [name for name in ("host", "remote_path") if not getattr(self, name)]
        if self.enable and missing:
            raise ValueError(f"enable is true but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                             f"empty: set the data server (host) and its data folder (remote_path)")
        return self


class Decode(Section):
    """Stage 1b (pipeline/stages/decode.py): JPEG 2000 bands into fast GeoTIFFs at native resolution."""

    enable: bool = True
    workers: Annotated[int, Field(ge=0, le=256)] = 0  # decoding threads; 0 = every CPU the process may use
    # always: keep the decoded rasters for later runs; until_used: delete a scene's once every enabled stage
    # that reads them (annotate, dataset, infer) has finished it in this config's outputs.
    keep: Literal["always", "until_used"] = "always"


class CloudDetection(Section):
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.4
    average_over: Annotated[int, Field(ge=0, le=64)] = 4
    dilation_size: Annotated[int, Field(ge=0, le=64)] = 2
    # 20 m: a quarter of the detector's cost, as close to the demo's truth as 10 m (docs/benchmarks.md, "Annotate")
    resolution: Literal[10, 20, 60] = 20
    window: Annotated[int, Field(ge=16, le=8192)] = 1024
    # auto: the compiled model when it is built or can be built here, else LightGBM; compiled: required;
    # lightgbm: never compiled. The same masks either way (pipeline/stages/cloud_backend.py), so not in the
    # record's config hash.
    backend: Literal["auto", "compiled", "lightgbm"] = "auto"


class Annotation(Section):
    enable: bool = True
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    on_scene_error: Literal["skip", "fail"] = "fail"
    water: bool = True
    glacier: bool = True
    exolabs_snow: bool = True
    clouds: bool = True
    cloud_detection: CloudDetection = CloudDetection()


class Normalisation(Section):
    method: Literal["log_percentile"] = "log_percentile"
    # 2/98, not the thesis' 30/70: fitted on mostly snow and cloud, 30/70 squeezes dark surfaces (water, shaded
    # forest) into a few float16 steps and the model loses water (docs/benchmarks.md, "Normalisation").
    low_percentile: Annotated[float, Field(gt=0.0, lt=100.0)] = 2.0
    high_percentile: Annotated[float, Field(gt=0.0, lt=100.0)] = 98.0

    @model_validator(mode="after")
    def _ordered(self) -> Normalisation:
        """Swapped percentiles would invert every band's contrast without an error."""
        if self.low_percentile >= self.high_percentile:
            raise ValueError(f"low_percentile ({self.low_percentile:g}) must be below high_percentile "
                             f"({self.high_percentile:g}); swap them")
        return self


class Dataset(Section):
    enable: bool = True
    patch_size: Annotated[int, Field(ge=16, le=2048)] = 256
    patches_per_scene: Annotated[int, Field(ge=1, le=65536)] = 512  # thesis: 8192
    sampling: Literal["uniform", "balanced"] = "balanced"
    split: Literal["scene", "patch"] = "scene"
    validation_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    validation_dates: list[str] = []
    include_dem: bool = True
    seed: Seed = 42
    on_scene_error: Literal["skip", "fail"] = "fail"
    normalisation: Normalisation = Normalisation()

    _dates = field_validator("validation_dates")(_check_dates)


class ModelSettings(Section):
    base_channels: Annotated[int, Field(ge=2, le=256)] = 64
    depth: Annotated[int, Field(ge=1, le=6)] = 4


class Augmentation(Section):
    flip: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25  # per axis
    channel_dropout: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3  # probability that a patch drops channels
    random_erasing: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3


# The training recipe's choices (pipeline/training/losses.py, selection.py; measured in docs/model.md).
LossName = Literal["cross_entropy", "cross_entropy_dice", "focal"]
SelectBy = Literal["mean_iou", "val_loss", "background_iou", "snow_iou", "clouds_iou", "water_iou"]
Schedule = Literal["plateau", "cosine"]


class Training(Section):
    enable: bool = False
    model: ModelSettings = ModelSettings()
    epochs: Annotated[int, Field(ge=1, le=10000)] = 60
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 48
    steps_per_epoch: Annotated[int, Field(ge=0, le=1_000_000)] = 0  # 0 = every training patch once per epoch
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 0.001
    weight_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    lr_factor: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    lr_patience: Annotated[int, Field(ge=0, le=10000)] = 1
    early_stopping_patience: Annotated[int, Field(ge=1, le=10000)] = 30
    gradient_clip: Annotated[float, Field(ge=0.0, le=1000.0)] = 1.0
    class_weights: Literal["sqrt_inverse_frequency", "inverse_frequency", "none"] = "sqrt_inverse_frequency"
    loss: LossName = "cross_entropy"  # or cross_entropy_dice, focal (pipeline/training/losses.py)
    focal_gamma: Annotated[float, Field(ge=0.0, le=10.0)] = 2.0
    select_by: SelectBy = "val_loss"  # best.pt and early stopping: val_loss, mean_iou or <class>_iou
    schedule: Schedule = "plateau"  # plateau (ReduceLROnPlateau on the validation loss) or cosine
    warmup_epochs: Annotated[int, Field(ge=0, le=1000)] = 0  # cosine only: linear warm-up epochs, below epochs
    mixed_precision: bool = True
    augmentation: Augmentation = Augmentation()
    workers: Annotated[int, Field(ge=0, le=64)] = 4
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: Literal["auto", "never"] = "auto"
    tensorboard: bool = True  # event files in results/training/tensorboard/ (losses, IoU, lr, predictions)
    seed: Seed = 42

    @model_validator(mode="after")
    def _warmup_within_epochs(self) -> Training:
        """A warm-up as long as the training never reaches the learning rate and never decays."""
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs}): the "
                             f"learning rate would still be warming up when training ends; lower "
                             f"training.warmup_epochs or raise training.epochs")
        return self


class Inference(Section):
    enable: bool = False
    dates: list[str] = []  # [] = the top-level dates
    checkpoint: str = "best"  # best | last | a path (relative to the config file)
    # 0 = a quarter of the scene's longer side, at least 1024 px (pipeline/inference/tiling.py, window_for)
    window: Annotated[int, Field(ge=0, le=8192)] = 0
    halo: Annotated[int, Field(ge=0, le=1024)] = 64  # at most window / 2
    batch_size: Annotated[int, Field(ge=0, le=256)] = 0  # 0 = as many windows as fit the device (CPU: 1)
    tta: bool = False
    save_probabilities: bool = False
    quicklooks: bool = True
    decode_once: bool = True  # decode each band once into scratch files (TMPDIR) instead of once per window
    device: Literal["auto", "cpu", "cuda"] = "auto"

    _dates = field_validator("dates")(_check_dates)

    @model_validator(mode="after")
    def _halo_fits_window(self) -> Inference:
        """Each window reads (window + 2 halo)^2 pixels to keep window^2: a large halo multiplies the work."""
        if 0 < self.window < 32:
            raise ValueError(f"window ({self.window}) must be at least 32 px, or 0 for a quarter of the scene")
        if self.window and 2 * self.halo > self.window:
            cost = (self.window + 2 * self.halo) ** 2 / self.window**2
            raise ValueError(f"halo ({self.halo}) must be at most half of window ({self.window}): every window "
                             f"would read {cost:.0f}x the pixels it predicts; lower inference.halo (64 is "
                             f"plenty) or raise inference.window")
        return self


class Testing(Section):
    enable: bool = False
    dates: list[str] = []  # [] = the inference dates
    reference: Literal["exolabs", "annotated_masks"] = "exolabs"


class PipelineConfig(Section):
    tiles: list[str]  # `tile_id: X` in a file is read as `tiles: [X]`
    dates: list[str] = []
    paths: Paths = Paths()
    download: Download = Download()
    decode: Decode = Decode()
    annotation: Annotation = Annotation()
    dataset: Dataset = Dataset()
    training: Training = Training()
    inference: Inference = Inference()
    testing: Testing = Testing()
    # Not a key of the file: the folder relative paths resolve against (set by load_config).
    base_dir: Annotated[str, Field(exclude=True)] = "."
    # Not a key a user writes either: the version planners stamp on a frozen config.json (contract/formats.py).
    schema_version: Annotated[int | None, Field(alias=SCHEMA_KEY, exclude=True)] = None

    _dates = field_validator("dates")(_check_dates)

    @field_validator("schema_version")
    @classmethod
    def _known_schema(cls, version: int | None) -> int | None:
        if version is not None and not 1 <= version <= CONFIG_SCHEMA:
            raise ValueError(f"this frozen config has format version {version}, this snowpipe reads up to "
                             f"{CONFIG_SCHEMA}: run the job with the code the run was planned with (runs/RUN/code)")
        return version

    @model_validator(mode="before")
    @classmethod
    def _one_tile(cls, data: Any) -> Any:
        """`tile_id: X` (the one-tile form, older configs and frozen config.json) is `tiles: [X]`."""
        if isinstance(data, dict) and isinstance(data.get("tiles"), str):
            data = {**data, "tiles": [data["tiles"]]}  # `tiles: 32TNS`, as one would write one tile
        if isinstance(data, dict) and "tile_id" in data:
            if "tiles" in data:
                raise ValueError("give `tiles` (a list) or `tile_id` (one tile), not both; keep `tiles`")
            data = {("tiles" if key == "tile_id" else key): ([value] if key == "tile_id" else value)
                    for key, value in data.items()}
        return data

    @field_validator("tiles")
    @classmethod
    def _tiles(cls, tiles: list[str]) -> list[str]:
        if not tiles:
            raise ValueError("lists no tile: give at least one Sentinel-2 tile id such as 32TNS")
        for tile in tiles:
            if not isinstance(tile, str) or not is_tile_id(tile):
                raise ValueError(f"expected Sentinel-2 tile ids such as 32TNS, got {tile!r}")
        if len(set(tiles)) != len(tiles):
            raise ValueError("lists a tile twice")
        return tiles

    @property
    def tile_names(self) -> str:
        """The tiles for a message: "32TNS" or "32TNS, 32TMS"."""
        return ", ".join(self.tiles)

    def path(self, name: str) -> Path:
        """An absolute data path: relative entries resolve against the config file's folder."""
        raw = Path(getattr(self.paths, name)).expanduser()
        return raw if raw.is_absolute() else (Path(self.base_dir) / raw).resolve()

    def resolved(self) -> dict[str, Any]:
        """The config as JSON-ready data with absolute paths: what a remote job reads."""
        data: dict[str, Any] = self.model_dump(mode="json")
        data["paths"] = {name: str(self.path(name)) for name in Paths.model_fields}
        return data

    def frozen(self) -> dict[str, Any]:
        """`resolved()` stamped with the frozen-config format version: the content of a run's config.json."""
        return {SCHEMA_KEY: CONFIG_SCHEMA, **self.resolved()}

    def section_hash(self, *sections: str, tile: str | None = None) -> str:
        """Hash of the given sections and the tile: a stage's outputs depend on nothing else.

        A per-scene output depends on its own scene's `tile` only, so adding a tile to the config redoes no other
        tile's scenes; a whole-run output (dataset, model) on every tile of the config. Keys that change how a
        stage runs but not what it writes (workers, error policy) are left out.
        """
        data = self.resolved()
        picked = {name: data[name] for name in sections}
        picked["tile_id"] = tile or ",".join(self.tiles)  # one tile: the key and value of one-tile records
        for name in sections:
            picked[name] = {k: v for k, v in picked[name].items() if k not in RUNTIME_KEYS}
            for sub, keys in NESTED_RUNTIME_KEYS.items():
                if isinstance(picked[name].get(sub), dict):
                    picked[name][sub] = {k: v for k, v in picked[name][sub].items() if k not in keys}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _describe(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model that owns the key at `loc`, to list its valid keys."""
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _valid_keys(model: type[BaseModel]) -> str:
    return ", ".join(name for name, f in model.model_fields.items() if not f.exclude)


EXPECTED = {
    "bool_type": "expected true or false",
    "int_type": "expected a whole number",
    "float_type": "expected a number",
    "string_type": "expected text",
    "list_type": "expected a list",
    "model_type": "expected a mapping of keys",
    "dict_type": "expected a mapping of keys",
    "finite_number": "expected a finite number",
}

BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def _format_error(error: ErrorDetails) -> str:
    loc = tuple(error["loc"])
    path = ".".join(str(part) for part in loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc)
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        valid = f"; valid keys in {where}: {_valid_keys(model)}" if model else ""
        return f"{path}: unknown key{valid}"
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind in EXPECTED:
        return f"{path}: {EXPECTED[kind]}, got {_describe(error.get('input'))}"
    if kind == "literal_error":
        return f"{path}: expected one of {error['ctx']['expected']}, got {_describe(error.get('input'))}"
    if kind in BOUNDS:
        symbol, key = BOUNDS[kind]
        return f"{path}: expected a number {symbol} {error['ctx'][key]}, got {_describe(error.get('input'))}"
    if kind == "value_error":
        return f"{path}: {error['ctx']['error']}"
    return f"{path}: {error['msg'].lower()}, got {_describe(error.get('input'))}"


def parse_config(data: Any, base_dir: Path, source: str = DEFAULT_CONFIG) -> PipelineConfig:
    """Validate already-loaded YAML data; raise ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {_describe(data)}")
    if "base_dir" in data:  # an internal field, not a key of the file
        raise invalid(source, [f"base_dir: unknown key; valid keys in the top level: {_valid_keys(PipelineConfig)}"])
    try:
        config = PipelineConfig.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as exc:
        raise invalid(source, [_format_error(error) for error in exc.errors()]) from None
    overlaps = overlapping_paths(config)
    if overlaps:
        raise invalid(source, overlaps)
    return config


def load_config(path: str | Path | None = None) -> PipelineConfig:
    """Read and validate a config file (default: ./pipeline-config.yml)."""
    config_path = Path(path or DEFAULT_CONFIG).expanduser()
    if config_path.is_dir():
        config_path = config_path / DEFAULT_CONFIG
    check_config_file(config_path)  # a FIFO, a device, a symlink loop: named, never opened
    if not config_path.is_file():
        raise ConfigError(
            f"config file {config_path} not found: pass its path (snowpipe validate PATH) "
            f"or run `snowpipe demo-data OUT` to create a demo config"
        )
    data = load_yaml(read_config_text(config_path), str(config_path))
    if data is None:
        raise ConfigError(f"{config_path} is empty: it needs at least tiles (e.g. tiles: [32TNS])")
    return parse_config(data, config_path.resolve().parent, source=str(config_path))


def _real(config: PipelineConfig, folder: str) -> tuple[Path, Path]:
    """A stage's folder ("key" or "key/part") as configured (absolute) and with every symlink resolved."""
    key, _, part = folder.partition("/")
    raw = Path(getattr(config.paths, key)).expanduser()
    given = Path(os.path.abspath(raw if raw.is_absolute() else Path(config.base_dir) / raw)) / part
    return given, Path(os.path.realpath(given))  # realpath: a symlink loop is left as it is, not an error


def _shown(folder: str) -> str:
    return f"paths.{folder}"


def _listed(names: list[str]) -> str:
    return f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]


def _use(folder: str, uses: dict[str, Access]) -> str:
    """`paths.decoded is written by decode and read by annotate, dataset and infer`."""
    done = [f"{verb} by {_listed([stage for stage, a in uses.items() if a == access])}"
            for access, verb in (("w", "written"), ("r", "read")) if access in uses.values()]
    return f"{_shown(folder)} is {' and '.join(done)}"


def overlapping_paths(config: PipelineConfig) -> list[str]:
    """One line per pair of stage folders that overlap where one is written: the same folder, or a written one
    around another (its writer would replace or delete what the other stage keeps there). Folders of every
    stage count, enabled or not (`snowpipe stage` runs any), compared with symlinks resolved. A written folder
    inside one that is only read is fine: readers look up their own names in it (the tests keep everything
    under extracted_data). See the stage table in pipeline/registry.py."""
    uses = folder_uses()
    located = {folder: _real(config, folder) for folder in uses}
    problems = []
    names = list(uses)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a, b = located[first][1], located[second][1]
            written = {folder for folder in (first, second) if "w" in uses[folder].values()}
            if a == b and written:
                outer, inner, relation = first, second, "are the same folder"
            elif a in b.parents and first in written:
                outer, inner, relation = first, second, "contains"
            elif b in a.parents and second in written:
                outer, inner, relation = second, first, "contains"
            else:
                continue
            problems.append(_overlap_line(outer, inner, relation, located, uses))
    return problems


def _overlap_line(outer: str, inner: str, relation: str, located: dict[str, tuple[Path, Path]],
                  uses: dict[str, dict[str, Access]]) -> str:
    def where(folder: str) -> str:
        given, real = located[folder]
        return f"{given} -> {real}" if given != real else str(given)

    what = (f"{_shown(outer)} ({where(outer)}) contains {_shown(inner)} ({where(inner)})" if relation == "contains"
            else f"{_shown(outer)} ({where(outer)}) and {_shown(inner)} ({where(inner)}) are the same folder")
    # The one to move: a configured folder (results/<part> moves with results), written, the container first
    movable = [f for f in ((outer, inner) if relation == "contains" else (inner, outer)) if "/" not in f]
    move = next((f for f in movable if "w" in uses[f].values()), movable[0] if movable else None)
    other = outer if move == inner else inner
    fix = (f"give {_shown(move)} a folder of its own, outside {_shown(other)} and not containing it" if move
           else "make them separate folders (a symlink joins them)")
    return f"{what}: {_use(outer, uses[outer])}, {_use(inner, uses[inner])}; {fix}"


def check_data_folders(config: PipelineConfig, stages: list[str]) -> list[str]:
    """Problems with input folders the selected stages read, each naming the folder and the fix."""
    problems: list[str] = []
    extracted = config.path("extracted_data")
    reads_extracted = any(STAGES[name].reads("extracted_data") for name in stages)
    if reads_extracted and "download" not in stages and not extracted.is_dir():
        problems.append(
            f"paths.extracted_data: folder {extracted} does not exist; fix the path in the config, "
            f"enable the download stage, or create demo data with `snowpipe demo-data OUT`"
        )
    masks = config.path("annotated_masks")
    if "dataset" in stages and "annotate" not in stages and not masks.is_dir():
        problems.append(
            f"paths.annotated_masks: folder {masks} does not exist; fix the path, or enable the "
            f"annotation stage (annotation.enable: true) to create the masks"
        )
    return problems


def apply_settings(config: PipelineConfig, settings: list[str]) -> PipelineConfig:
    """`--set KEY=VALUE` overrides (dotted keys, YAML values), validated like the file itself.

    Batch scripts use it to point a stage at node-local copies of its folders.
    """
    if not settings:
        return config
    data = config.model_dump(mode="json")
    for setting in settings:
        _apply_setting(data, setting)
    return parse_config(data, Path(config.base_dir), source="the config with --set overrides")


def _apply_setting(data: dict[str, Any], setting: str) -> None:
    """One KEY=VALUE into the config data; a malformed one is a ConfigError naming it."""
    key, sep, raw = setting.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {setting!r}: expected KEY=VALUE with a dotted key, "
                          f"e.g. --set paths.results=/scratch/results")
    node = data
    *parents, leaf = parts
    for depth, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            where = ".".join(parents[:depth + 1])
            kind = "not a key" if part not in node else f"a value ({_describe(node[part])}), not a section"
            raise ConfigError(f"--set {setting!r}: {where} is {kind} of the config, so it cannot hold "
                              f"{'.'.join(parts[depth + 1:])}; see pipeline-config.yml for the keys")
        node = node[part]
    node[leaf] = load_yaml(raw, f"--set {setting!r}", lines=False, prefix=".".join(parts)) if raw else ""


def check_scenes(config: PipelineConfig, stages: list[str]) -> list[str]:
    """What a run would find wrong with the scenes: dates that match no scene, SAFE folders without bands.

    Skipped when the download stage runs (it fetches the scenes) or extracted_data does not exist
    (check_data_folders names that).
    """
    return checked_scenes(config, stages)[1]


def checked_scenes(config: PipelineConfig, stages: list[str]) -> tuple[list[Scene], list[str]]:
    """check_scenes and the scenes it found, from one discovery (none where it is skipped or fails)."""
    extracted = config.path("extracted_data")
    if "download" in stages or not extracted.is_dir():
        return [], []
    try:
        found = discover_scenes(extracted, config.tiles)
    except DataError as exc:
        return [], [f"paths.extracted_data: {exc}"]
    ids = {scene.id: scene for scene in found}
    times = {scene.date for scene in found}
    lists = {"dates": config.dates, "inference.dates": config.inference.dates,
             "testing.dates": config.testing.dates, "dataset.validation_dates": config.dataset.validation_dates}
    problems = []
    for key, dates in lists.items():
        unknown = [date for date in dates if date not in ids and date not in times]
        if unknown:
            problems.append(f"{key}: {', '.join(unknown)} match(es) no scene of tile {config.tile_names} in "
                            f"{extracted} (available: {available(found)}); fix the date or add the product")
    trained = {scene.id for scene in found if not config.dates or scene.selected_by(config.dates)}
    outside = sorted(scene.id for scene in found
                     if scene.selected_by(config.dataset.validation_dates) and scene.id not in trained)
    if outside:
        problems.append(f"dataset.validation_dates: {', '.join(outside)} not among dates; add them to dates "
                        f"or drop them from dataset.validation_dates")
    wanted = (config.dates or list(ids)) + config.inference.dates + config.testing.dates
    for scene in found:
        if scene.missing_bands and scene.selected_by(wanted):
            problems.append(f"{scene.safe_dir}: band(s) {', '.join(scene.missing_bands)} missing (expected "
                            f"*_{scene.missing_bands[0]}.jp2 in GRANULE/*/IMG_DATA); re-extract the product zip")
    if "annotate" in stages:
        problems += [f"tile {tile}: no {tile}_auxiliary_data/ folder in {extracted} (the lakes and surface "
                     f"water layers annotation reads); add it or drop the tile from `tiles`"
                     for tile in config.tiles if find_auxiliary(extracted, tile).folder is None]
    return found, problems
