"""Checkpoints: one dict saved atomically with torch.save; enough to rebuild, resume and normalise.

Keys: format, spec (ModelSpec), model (state dict), channels (input channel names), classes,
normalisation (the dataset manifest's constants), epoch (finished epochs), config_hash, run (one id per
training, shared by its last.pt and best.pt), metrics, history, and for resuming: optimizer, scheduler,
scaler, rng, progress.

A checkpoint is data, never code: it is read with `weights_only=True`, so a file that carries pickled
functions or objects (`os.system`, ...) is refused without running them. Everything snowpipe stores is
tensors, numbers, strings, lists and dicts; the random-number states too (`rng_state`). Checkpoints of
the previous format kept numpy's generator state as an array: the few numpy types it needs are
allow-listed for loading, nothing else.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import io
import json
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.writer import atomic_path, write_json
from pipeline.errors import DataError
from pipeline.model.unet import ModelSpec, UNet
from pipeline.records.content import content_hash

FORMAT = "snowpipe-unet-1"
DEFAULT_FIX = "point inference.checkpoint at a checkpoint written by the train stage, or train again"


def _numpy_globals() -> list[Any]:
    """What numpy's legacy RNG state (a uint32 array) unpickles through, under the names numpy 1 and 2 use."""
    # numpy 1 only: the installed (numpy 2) stubs have no numpy.core.multiarray, so import it by name.
    reconstruct = (np._core.multiarray._reconstruct if hasattr(np, "_core")
                   else importlib.import_module("numpy.core.multiarray")._reconstruct)
    return [(reconstruct, "numpy._core.multiarray._reconstruct"),
            (reconstruct, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


LEGACY_GLOBALS = _numpy_globals()


# Beside the checkpoints: per file name, the content hashes (records/content.py's blake2b) a complete save may
# have left there. A checkpoint damaged in place often still loads (torch reads damaged tensors as numbers), so
# its content is checked against this before it is used; a checkpoint without an entry (an older snowpipe, a
# file brought from elsewhere) is read as it is.
CHECKPOINT_HASHES = ".snowpipe-checkpoints.json"


def _recorded_hashes(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads((path.parent / CHECKPOINT_HASHES).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return {k: [str(h) for h in v] for k, v in data.items() if isinstance(v, list)} if isinstance(data, dict) else {}


def _record_hashes(path: Path, hashes: list[str]) -> None:
    recorded = _recorded_hashes(path)
    recorded[path.name] = hashes
    write_json(path.parent / CHECKPOINT_HASHES, recorded)


def vouch_for(path: Path) -> None:
    """Record a checkpoint file's content as complete (one copied into place whole, e.g. best.pt from last.pt)."""
    _record_hashes(path, [content_hash(path)])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a job killed while saving never leaves a truncated checkpoint.

    Serialised in memory first: torch's own file writer reports a full disk as an opaque RuntimeError
    ("unexpected pos ..."), a plain write as ENOSPC, which the atomic writer names with its fix. Its content
    hash, computed from that buffer, is recorded before the rename (beside the previous file's, so whichever of
    the two a crash leaves is vouched for) and alone after it.
    """
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    digest = hashlib.blake2b(buffer.getbuffer(), digest_size=16).hexdigest()
    previous = _recorded_hashes(path).get(path.name, []) if path.is_file() else []
    _record_hashes(path, [*previous, digest])
    with atomic_path(path, needed=buffer.getbuffer().nbytes) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    _record_hashes(path, [digest])


def checkpoint_problem(path: Path, full: bool = False) -> str | None:
    """Why a checkpoint file is not what training wrote (None: it is, or nothing vouches for it)."""
    allowed = _recorded_hashes(path).get(path.name)
    if not allowed or not path.is_file():
        return None
    if content_hash(path, trust_cache=not full) not in allowed:
        return "the file is damaged: its content changed since training wrote it"
    return None


def _why(exc: BaseException) -> str:
    """A short reason for a failed load (torch's own text spans many lines and suggests unsafe loading)."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(exc, pickle.UnpicklingError) and found:
        return (f"it holds {found.group(1)}, which no snowpipe checkpoint contains (refused, not run: loading it "
                f"could execute code)")
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first or first.startswith("Weights only load failed"):
        first = type(exc).__name__
    return f"the file is damaged or not a checkpoint ({first[:160]})"


def read_checkpoint(path: Path, device: str | torch.device = "cpu", fix: str = DEFAULT_FIX,
                    mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's dict; a missing, damaged or hostile file is one DataError naming it and `fix`.

    `mmap` maps the tensors instead of reading them (cheap when only the metadata is needed).
    """
    if not path.is_file():
        raise DataError(f"checkpoint {path} not found: run the train stage first, or set the checkpoint path")
    problem = checkpoint_problem(path)
    if problem:
        raise DataError(f"cannot read checkpoint {path}: {problem}; {fix}")
    # torch warns about what it meets in a damaged file ("Detected pickle protocol 4 ...") before it fails: held
    # back, so a damaged file is the one line below; a file that loads gets its warnings as torch gave them.
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        try:
            with torch.serialization.safe_globals(LEGACY_GLOBALS):
                state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
        except Exception as exc:  # torch raises many types for corrupt files
            raise DataError(f"cannot read checkpoint {path}: {_why(exc)}; {fix}") from None
    for warning in held:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno,
                               source=warning.source)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{path} is not a snowpipe checkpoint (format {FORMAT}); {fix}")
    return state


def rng_state() -> dict[str, Any]:
    """The torch, numpy and Python generator states as tensors, numbers and lists (loadable with weights_only)."""
    numpy_state = np.random.get_state(legacy=False)
    python_version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "python": {"version": python_version, "state": list(python_state), "gauss": python_gauss},
    }


def restore_rng(saved: dict[str, Any]) -> None:
    """Set the generators from `rng_state()`'s dict, or from the previous format's (numpy and Python tuples)."""
    torch.set_rng_state(saved["torch"].cpu())
    numpy_state, python_state = saved["numpy"], saved["python"]
    if isinstance(numpy_state, dict):
        key = numpy_state["key"].cpu().numpy().astype(np.uint32)
        numpy_state = (numpy_state["bit_generator"], key, numpy_state["pos"], numpy_state["has_gauss"],
                       numpy_state["gauss"])
    np.random.set_state(numpy_state)
    if isinstance(python_state, dict):
        python_state = (python_state["version"], tuple(python_state["state"]), python_state["gauss"])
    random.setstate(python_state)


def check_compatible(state: dict[str, Any], channels: list[str], classes: list[str], path: Path) -> None:
    """A checkpoint must expect exactly the data's input channels and classes; name both when not."""
    if list(state["channels"]) != list(channels):
        raise DataError(
            f"checkpoint {path} expects {len(state['channels'])} input channels ({', '.join(state['channels'])}) "
            f"but the data has {len(channels)} ({', '.join(channels)}): use a checkpoint trained on this kind "
            f"of dataset (dataset.include_dem must match)"
        )
    if list(state["classes"]) != list(classes):
        raise DataError(f"checkpoint {path} predicts classes {state['classes']} but snowpipe expects {classes}")


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    """The network in eval mode on `device`, and the checkpoint's metadata."""
    state = read_checkpoint(path, device)
    model = UNet(ModelSpec(**state["spec"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
