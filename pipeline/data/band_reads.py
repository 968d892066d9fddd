"""Every read of a scene's band pixels, with one damage policy: any GDAL warning or error while pixels are
decoded means the file is damaged, and the scene fails with one line naming the file and the fix.

Why: OpenJPEG decodes a damaged JPEG 2000 code stream (half of a band overwritten, same size) to garbage with
only the warning "Stream does not end with EOC": read without this policy, it gave 95 % changed pixels and
no error, so masks, dataset patches and predictions of garbage. Every reader goes through `decoding`: the
decode stage's strips (pipeline/stages/decode.py), SceneReader's windows (pipeline/data/reader.py, and with it
the infer stage's scratch decoding in pipeline/data/decoded.py) and the infer stage's native reads
(pipeline/inference/native.py). A decoded GeoTIFF (the decode stage's output) is read under the same policy;
its fix is to decode the scene again, not to re-extract the product.

Threads: GDAL's messages reach Python's logging in the thread that decodes, and GDAL_ERRORS collects them per
thread (pipeline/data/raster_checks.py). GDAL's own decoding threads would report to no one (with
GDAL_NUM_THREADS above 1, OpenJPEG's errors went to stderr and the read "succeeded"), so every read here
decodes on its caller's thread (GDAL_NUM_THREADS=1): the stages parallelise across bands and strips instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import rasterio

from pipeline.data.layout import Scene
from pipeline.data.raster_checks import GDAL_ERRORS, is_gdal_failure
from pipeline.errors import SceneError

# Decoding on the calling thread: GDAL's worker threads would lose the warnings that reveal a damaged file.
SINGLE_THREADED = {"GDAL_NUM_THREADS": "1"}
DAMAGED_PRODUCT = "the file is damaged: re-extract the product zip or download it again"


def damage_fix(scene: Scene, path: Path | str) -> str:
    """What to do about a damaged band file: decode the scene again (a decoded raster), else re-extract."""
    decoded = next((p for p in scene.decoded.values() if str(p) == str(path)), None)
    if decoded is None:
        return DAMAGED_PRODUCT
    return (f"the decoded file is damaged: run `snowpipe stage decode CONFIG --scene {scene.id} --force`, "
            f"or delete {decoded.parent} to read the JPEG 2000 files")


def _gdal_message(exc: BaseException) -> str:
    """GDAL's own words for a failure (rasterio's 'Read failed. See previous exception' chains them)."""
    seen = exc
    while seen.__cause__ is not None and is_gdal_failure(seen.__cause__):
        seen = seen.__cause__
    return str(seen).strip() or type(exc).__name__


@contextmanager
def decoding(scene: Scene, path: Path | str, where: str = "") -> Iterator[None]:
    """Run a read of `path`'s pixels (in this thread) under the damage policy: a GDAL warning or error
    during the block, or a GDAL failure raised from it, is a SceneError naming the file (and `where`: rows)."""
    problems: list[str] = []
    failure: BaseException | None = None
    with GDAL_ERRORS.listening(), GDAL_ERRORS.into(problems, warnings=True), rasterio.Env(**SINGLE_THREADED):
        try:
            yield
        except Exception as exc:
            if not is_gdal_failure(exc):
                raise
            failure = exc
    if failure is None and not problems:
        return
    said = problems[0] if problems else _gdal_message(failure) if failure is not None else ""
    said = " ".join(said.split())  # one line, whatever GDAL put in its message
    detail = f" ({where})" if where else ""
    raise SceneError(scene.id, f"cannot decode {path}{detail}: {said} ({damage_fix(scene, path)})") from None

