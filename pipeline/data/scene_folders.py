"""A scene's folder under an output root: `{root}/{TILE}_{YYYYMMDDTHHMMSS}`, and the date-only layout before it.

Projects made before scene ids had one tile and named a scene's folders by its sensing time alone
(`annotated_masks/20211220T102309/`, `results/predictions/20211220T102309/`). For a one-tile config:
- a folder snowpipe wrote there (it holds a completion record) is renamed to the scene id the first time a stage
  asks for it: one atomic rename, its record stays valid (inputs are named relative to their roots, and a one-tile
  config hashes as before), so nothing is redone;
- a folder without a record is the user's own masks (the thesis layout): read where it is, never moved.
A config of several tiles reads only scene-id folders: a date alone could be any of its tiles.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.data.layout import Scene
from pipeline.progress import say

RECORD_NAME = ".snowpipe-complete.json"  # pipeline/records: a completion record (its floor is above this one)


def scene_folder(root: Path, scene: Scene, tiles: Sequence[str]) -> Path:
    """`root/{scene id}`; for a one-tile config, snowpipe's own date-only folder is adopted (renamed) first."""
    folder = root / scene.id
    if len(tiles) == 1:
        old = root / scene.date
        if not folder.exists() and (old / RECORD_NAME).is_file():
            try:
                os.rename(old, folder)
            except OSError:  # another task adopted it first, or the root is read-only: read what is there
                return folder if folder.exists() else old
            say(f"  {old} -> {folder.name}: scene folders are named by tile and sensing time now")
    return folder


def read_folder(root: Path, scene: Scene, tiles: Sequence[str]) -> Path:
    """Where to read a scene's files from: its scene-id folder, else (one tile) the date-only folder."""
    folder = scene_folder(root, scene, tiles)
    legacy = root / scene.date
    if len(tiles) == 1 and not folder.exists() and legacy.is_dir():
        return legacy
    return folder
