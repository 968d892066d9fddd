"""Stage 1, download: rsync raw data from a data server over SSH into extracted_data (never on the cluster).

The server folder (download.remote_path) holds L1C products as SAFE folders or product zips
(S2?_MSIL1C_<date>_..._T<tile>_....SAFE / .zip, as the thesis' server did), ExoLabs_classification_S2/ and
{tile}_auxiliary_data/ (or its zip). The stage lists the folder, picks the tile's products of the wanted
dates, the ExoLabs files of their days and the auxiliary folder, transfers them with one resumable rsync,
checks every file's size against the server's listing, and unpacks zips into SAFE folders atomically.
Zips are kept beside their SAFE folders, so a second run transfers nothing and unpacks nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.data.layout import EXOLABS_FOLDER, SAFE_NAME, scene_id
from pipeline.data.writer import swap_folder
from pipeline.errors import ConfigError, DataError, SnowpipeError
from pipeline.progress import make_progress, say
from pipeline.registry import STAGES, stage_dates
from pipeline.stages.base import SceneOutcome, StageReport
from pipeline.stages.rsync import DataServer, Entry, list_remote, received_files, transfer

INFO = STAGES["download"]

BATCH_VARIABLES = ("SNOWPIPE_BATCH_JOB", "SLURM_JOB_ID")  # set in every batch job snowpipe submits
PRODUCT_NAME = re.compile(SAFE_NAME.pattern.replace(r"\.SAFE$", r"\.(?P<form>SAFE|zip)$"))
UNPACKED_RECORD = ".snowpipe-unpacked.json"  # inside a SAFE folder unpacked from a zip: which zip it came from
MAX_LISTED = 5


@dataclass(frozen=True)
class Product:
    name: str  # as on the server: a .SAFE folder or a .zip
    date: str
    tile: str
    form: str  # "SAFE" or "zip"

    @property
    def id(self) -> str:
        return scene_id(self.tile, self.date)

    @property
    def folder(self) -> str:
        """The SAFE folder it becomes in extracted_data."""
        return self.name if self.form == "SAFE" else self.name[: -len(".zip")] + ".SAFE"

    @property
    def day(self) -> str:
        return f"{self.date[0:4]}-{self.date[4:6]}-{self.date[6:8]}"


def refuse_in_batch_job() -> None:
    """Downloads need the data server, which compute nodes usually cannot reach: never in a batch job."""
    for variable in BATCH_VARIABLES:
        if os.environ.get(variable):
            raise SnowpipeError(
                f"download refused: {variable}={os.environ[variable]} says this is a batch job on the cluster; "
                f"downloads run on the laptop / workstation (`snowpipe stage download CONFIG`) before "
                f"`ansible-playbook submit.yml`, which syncs extracted_data to the cluster")


def _local_file(config: PipelineConfig, key: str, raw: str) -> Path:
    """A file named by download.KEY: ~ expanded, relative to the config file's folder; it must exist."""
    path = Path(raw).expanduser()
    path = path if path.is_absolute() else (Path(config.base_dir) / path).resolve()
    if not path.is_file():
        fix = ("create it by connecting once with ssh and accepting the server's checked host key"
               if key == "known_hosts" else "point it at your private key file")
        raise ConfigError(f"download.{key}: file {path} does not exist: {fix}")
    return path


def remote_of(config: PipelineConfig) -> DataServer:
    settings = config.download
    for key in ("host", "remote_path"):
        if not getattr(settings, key):
            raise ConfigError(f"download.{key}: empty: set the data server's "
                              f"{'host name' if key == 'host' else 'folder with the products'} in the config")
    key_file = _local_file(config, "key", settings.key) if settings.key else None
    return DataServer(host=settings.host, path=settings.remote_path, port=settings.port, user=settings.user,
                      key=key_file, known_hosts=_local_file(config, "known_hosts", settings.known_hosts))


def pick_products(entries: list[Entry], tiles: list[str], dates: list[str], where: str) -> list[Product]:
    """The tiles' products of `dates` (sensing times or scene ids; [] = all); a SAFE folder wins over a zip of
    the same product. Every product of a scene is fetched (the scene's newest baseline is chosen at discovery)."""
    found: dict[str, Product] = {}
    for entry in entries:
        match = PRODUCT_NAME.match(entry.path)
        form = match["form"] if match else ""
        if not match or match["tile"] not in tiles or (entry.kind != ("dir" if form == "SAFE" else "file")):
            continue
        product = Product(entry.path, match["date"], match["tile"], form)
        if product.folder not in found or form == "SAFE":
            found[product.folder] = product
    products = sorted(found.values(), key=lambda p: (p.id, p.name))
    empty = [tile for tile in tiles if not any(p.tile == tile for p in products)]
    if empty:
        raise DataError(f"download: no product of tile {', '.join(empty)} (S2?_MSIL1C_*_T{empty[0]}_*.SAFE or "
                        f".zip) in {where}: check tiles and download.remote_path")
    if dates:
        missing = [d for d in dates if not any(d in (p.date, p.id) for p in products)]
        if missing:
            available = sorted({p.id for p in products})
            shown = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
            raise DataError(f"download: date(s) {', '.join(missing)} in the config match no product of tile "
                            f"{', '.join(tiles)} in {where}; available: {shown}")
        products = [p for p in products if p.date in dates or p.id in dates]
    return products


def _auxiliary(entries: list[Entry], tile: str) -> Entry | None:
    names = {e.path: e for e in entries}
    for name in (f"{tile}_auxiliary_data", f"{tile}-auxiliary_data"):
        if names.get(name) and names[name].kind == "dir":
            return names[name]
    zipped = names.get(f"{tile}_auxiliary_data.zip")
    return zipped if zipped and zipped.kind == "file" else None


def selection_filters(products: list[Product], auxiliaries: dict[str, Entry | None], exolabs: bool) -> list[str]:
    """rsync filter rules selecting exactly what the stage needs; everything else on the server is excluded."""
    rules = [f"--include=/{p.name}/***" if p.form == "SAFE" else f"--include=/{p.name}" for p in products]
    for auxiliary in auxiliaries.values():
        if auxiliary is not None:
            rules.append(f"--include=/{auxiliary.path}/***" if auxiliary.kind == "dir"
                         else f"--include=/{auxiliary.path}")
    if exolabs:
        rules.append(f"--include=/{EXOLABS_FOLDER}/")
        rules += [f"--include=/{EXOLABS_FOLDER}/S2_{tile}_{day}*.tif"
                  for tile, day in sorted({(p.tile, p.day) for p in products})]
    return [*rules, "--exclude=*"]


def verify_sizes(listing: list[Entry], dest: Path, where: str) -> None:
    """Every file the server listed is here with the server's size."""
    wrong = []
    for entry in listing:
        if entry.kind != "file":
            continue
        local = dest / entry.path
        size = local.stat().st_size if local.is_file() else None
        if size != entry.size:
            wrong.append(f"{entry.path} ({'missing' if size is None else f'{size} bytes'}, "
                         f"server {entry.size} bytes)")
    if wrong:
        more = len(wrong) - MAX_LISTED
        shown = "; ".join(wrong[:MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")
        raise DataError(f"download: {len(wrong)} file(s) in {dest} differ from {where} after the transfer: {shown}; "
                        f"run the download again (it resumes), or delete those files first if they were changed here")


def unpack(zip_path: Path, target: Path, force: bool = False) -> bool:
    """Unpack a zip into the folder `target` atomically; False when it already holds this very zip.

    The zip is extracted into a hidden temporary folder beside `target` and renamed when complete, so an
    interrupted unpack never leaves a folder that looks finished. A zip with one top-level folder (a product
    zip holds NAME.SAFE/) becomes that folder; otherwise its contents are the folder.
    """
    stat = zip_path.stat()
    stamp = {"zip": zip_path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record = target / UNPACKED_RECORD
    if not force and target.is_dir() and record.is_file():
        try:
            if json.loads(record.read_text()) == stamp:
                return False
        except ValueError:
            pass
    temporary = target.with_name(f".{target.name}.unpack.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(temporary)  # member names with .. or absolute paths are made safe by zipfile
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        raise DataError(f"download: cannot unpack {zip_path} ({exc}): delete it and run the download again") from None
    top = list(temporary.iterdir())
    root = top[0] if len(top) == 1 and top[0].is_dir() else temporary
    (root / UNPACKED_RECORD).write_text(json.dumps(stamp))
    swap_folder(root, target)
    shutil.rmtree(temporary, ignore_errors=True)
    return True


def _unpack_all(dest: Path, products: list[Product], auxiliaries: dict[str, Entry | None],
                force: bool) -> set[str]:
    """Unpack the zips received (products and zipped auxiliary folders); the names of those unpacked."""
    unpacked: set[str] = set()
    for tile, auxiliary in auxiliaries.items():
        if auxiliary is not None and auxiliary.kind == "file" and \
                unpack(dest / auxiliary.path, dest / f"{tile}_auxiliary_data", force):
            unpacked.add(auxiliary.path)
    zips = [p for p in products if p.form == "zip"]
    if zips:
        with make_progress() as progress:
            bar = progress.add_task("download: unpack zips", total=len(zips))
            for product in zips:
                if unpack(dest / product.name, dest / product.folder, force):
                    unpacked.add(product.name)
                progress.advance(bar)
    return unpacked


def _summary(received: list[str], sizes: dict[str, int], products: list[Product],
             auxiliaries: dict[str, Entry | None], listing: list[Entry], unpacked: set[str]) -> str:
    """The report's note: what moved, what was unpacked, what the server lacks."""
    moved = sum(sizes.get(path, 0) for path in received)
    notes = [f"{len(received)} file(s), {moved / 1e6:.1f} MB transferred"]
    zipped = any(a is not None and a.kind == "file" for a in auxiliaries.values())
    if any(p.form == "zip" for p in products) or zipped:
        notes.append(f"{len(unpacked)} zip(s) unpacked (zips kept)")
    notes += [f"no {tile}_auxiliary_data on the server" for tile, a in auxiliaries.items() if a is None]
    names = {Path(e.path).name for e in listing if e.path.startswith(f"{EXOLABS_FOLDER}/")}
    found = {(name[3:8], name[9:19]) for name in names}
    no_exolabs = sorted(p.id for p in products if (p.tile, p.day) not in found)
    if no_exolabs:
        notes.append(f"no ExoLabs file for {', '.join(no_exolabs[:MAX_LISTED])}"
                     f"{' ...' if len(no_exolabs) > MAX_LISTED else ''}")
    return "; ".join(notes)


def run(config: PipelineConfig, dates: list[str] | None = None, force: bool = False) -> StageReport:
    """Download the tile's products of `dates` (default: the config's; [] = all on the server).

    `force` unpacks zips again even when their SAFE folder is up to date; rsync always skips complete files.
    """
    refuse_in_batch_job()
    start = time.perf_counter()
    remote = remote_of(config)
    dest = config.path("extracted_data")
    top = list_remote(remote)
    products = pick_products(top, config.tiles, stage_dates(config, INFO.name, dates), remote.where)
    auxiliaries = {tile: _auxiliary(top, tile) for tile in config.tiles}
    exolabs = any(e.path == EXOLABS_FOLDER and e.kind == "dir" for e in top)
    filters = selection_filters(products, auxiliaries, exolabs)
    listing = list_remote(remote, filters, recursive=True)
    sizes = {e.path: e.size for e in listing}
    say(f"download: {len(products)} product(s) of tile {config.tile_names} from {remote.where} -> {dest}")

    by_name = {p.name: i for i, p in enumerate(products)}
    with make_progress() as progress:
        bar = progress.add_task("download: products", total=len(products))
        reached: set[int] = set()

        def on_item(path: str) -> None:
            index = by_name.get(path.split("/", 1)[0])
            if index is not None and index not in reached:
                reached.add(index)
                progress.update(bar, completed=max(reached))  # rsync goes in name order: earlier ones are done

        items = transfer(remote, dest, filters, on_item)
        progress.update(bar, completed=len(products))
    verify_sizes(listing, dest, remote.where)

    received = received_files(items)
    unpacked = _unpack_all(dest, products, auxiliaries, force)
    report = StageReport(INFO.name, output=str(dest))
    for product in products:
        files = [path for path in received if path.split("/", 1)[0] == product.name]
        changed = bool(files) or product.name in unpacked
        report.outcomes.append(SceneOutcome(product.id, "done" if changed else "skipped",
                                            details={"product": product.name, "files": len(files)}))
    report.note = _summary(received, sizes, products, auxiliaries, listing, unpacked)
    report.seconds = time.perf_counter() - start
    return report
