"""The cloud detector's tree model: s2cloudless's LightGBM model compiled to machine code, or LightGBM itself.

`compiled`: treelite reads the LightGBM model file and tl2cgen translates its 170 trees to C, compiled with
gcc -O3 for the machine's architecture (portable, no -march: any node of the same architecture runs it) into
a shared library. It takes the same branches as LightGBM (float64 features against float64 thresholds,
looked up as bin indices with quantize 1) and adds the same leaf values in the same order, so the
probabilities are the same (bit-identical for the real model after the float32 cast; docs/benchmarks.md,
"Annotate"), 1.7x (random reflectance) to 5.6x (the demo's pixels) faster on one thread. Compiling the real
model takes minutes (3 to 5.5 on one core, its 8 C files in parallel on more), so the library is built once
into a cache shared by every run:

    {cache}/cloud-detector/{key}/model.so, probe.npz, build.json

`{cache}` is $SNOWPIPE_CACHE, else $XDG_CACHE_HOME/snowpipe, else ~/.cache/snowpipe (a home folder is shared
by a cluster's login node and its compute nodes). `{key}` names the model file's content (SHA-256), the
versions of treelite and tl2cgen, the machine's architecture and the code generator's settings: a new model,
a new treelite or tl2cgen or another architecture gets a library of its own. The folder is built beside its
name and renamed into place when complete, under a lock (pipeline/locks.py), and carries `probe.npz`: 4096
feature rows and LightGBM's probabilities for them. A library is used only when it reproduces those within
MAX_DIFFERENCE, checked each time it is loaded (a few milliseconds), so a damaged or foreign library is never
used.

Backends (`annotation.cloud_detection.backend`):
- `auto` (default): the cached library; when there is none, build it here if a C compiler is on PATH, no
  other process is building it and $SNOWPIPE_DETECTOR_BUILD is not `never` (the tests set it: CI never
  compiles the real model), else LightGBM for this run, saying why and how to build it;
- `compiled`: the cached library, built here when missing; an error when it cannot be built or loaded;
- `lightgbm`: LightGBM, as s2cloudless runs it (no compiler, no cache).
`snowpipe build-detector` builds the library ahead (a cluster's login node, the set-up of a laptop).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.errors import SnowpipeError
from pipeline.locks import output_lock, read_lock

BACKENDS = ("auto", "compiled", "lightgbm")
MAX_DIFFERENCE = 1e-6  # probabilities of the compiled model against LightGBM's, on the probe rows
PROBE_ROWS = 4096
# The code generator's settings. quantize 1: thresholds become integer bin indices, compared after one binary
# search per feature and row (docs/benchmarks.md, "Annotate": measured against quantize 0). parallel_comp: the
# trees split into this many C files, compiled in parallel on as many threads as the build is given.
CODEGEN = {"quantize": 1, "parallel_comp": 8}
LIBRARY = "model.so"
CHUNK_ROWS = 1 << 18  # feature rows handed to the compiled model at once


class DetectorBackendError(SnowpipeError):
    """The compiled detector was required (backend: compiled) but cannot be built or loaded."""


class TreeModel(Protocol):
    name: str

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Cloud probability (n,) float32 of feature rows (n, 10) float32."""
        ...


def default_model_file() -> Path:
    """The LightGBM model shipped in the s2cloudless wheel."""
    from s2cloudless import cloud_detector

    return Path(cloud_detector.__file__).parent / "models" / cloud_detector.MODEL_FILENAME


def cache_root() -> Path:
    if os.environ.get("SNOWPIPE_CACHE"):
        return Path(os.environ["SNOWPIPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "snowpipe"


def _versions() -> dict[str, str]:
    import tl2cgen
    import treelite

    return {"treelite": treelite.__version__, "tl2cgen": tl2cgen.__version__}


def library_key(model_file: Path) -> str:
    """The model's content, the code generator's versions and settings, the architecture: one library each."""
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    identity = json.dumps({"model": digest, **_versions(), "codegen": CODEGEN}, sort_keys=True)
    return f"{platform.machine()}-{digest[:12]}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def library_folder(model_file: Path) -> Path:
    return cache_root() / "cloud-detector" / library_key(model_file)


def compiler() -> str | None:
    """The C compiler tl2cgen calls (gcc), when this machine has one."""
    return shutil.which("gcc")


class LightGBMModel:
    """LightGBM's own predictor, as s2cloudless calls it."""

    name = "lightgbm"

    def __init__(self, model_file: Path, threads: int = 0) -> None:
        from lightgbm import Booster

        self._booster = Booster(model_file=str(model_file))
        self._threads = threads

    def predict(self, features: np.ndarray) -> np.ndarray:
        probability = (self._booster.predict(features, num_threads=self._threads) if self._threads
                       else self._booster.predict(features))
        return np.asarray(probability, np.float32).reshape(-1)


class CompiledModel:
    """The model compiled by tl2cgen; its predictor runs on `threads` threads (0: all CPUs)."""

    name = "compiled"

    def __init__(self, library: Path, threads: int = 0) -> None:
        import tl2cgen

        self._tl2cgen = tl2cgen
        self._predictor = tl2cgen.Predictor(str(library), nthread=threads or None)

    def predict(self, features: np.ndarray) -> np.ndarray:
        out = np.empty(len(features), np.float32)
        for start in range(0, len(features), CHUNK_ROWS):  # the float64 copy stays small (16 MB)
            # float64: LightGBM widens float32 features to double too; tl2cgen's float32 path fails with numpy 2.
            chunk = np.ascontiguousarray(features[start:start + CHUNK_ROWS], np.float64)
            probability = self._predictor.predict(self._tl2cgen.DMatrix(chunk))
            out[start:start + len(chunk)] = np.asarray(probability).reshape(-1)  # to float32, as LightGBM's
        return out


def probe_features(rows: int = PROBE_ROWS, seed: int = 0) -> np.ndarray:
    """Feature rows spread over the model's range: reflectance 0-1.6, some all zero (no data)."""
    features = np.random.default_rng(seed).uniform(0.0, 1.6, (rows, 10)).astype(np.float32)
    features[:16] = 0.0
    return features


def _verify(model: TreeModel, folder: Path) -> float:
    with np.load(folder / "probe.npz") as probe:
        return float(np.max(np.abs(model.predict(probe["features"]) - probe["expected"]), initial=0.0))


def load_compiled(folder: Path, threads: int = 0) -> CompiledModel:
    """The library in `folder`, checked against its probe; DetectorBackendError when missing or wrong."""
    if not (folder / LIBRARY).is_file():
        raise DetectorBackendError(f"no compiled cloud detector in {folder}")
    try:
        model = CompiledModel(folder / LIBRARY, threads)
        difference = _verify(model, folder)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise DetectorBackendError(f"cannot load the compiled cloud detector {folder / LIBRARY}: {exc} "
                                   f"(delete {folder} to rebuild it)") from None
    if not difference <= MAX_DIFFERENCE:
        raise DetectorBackendError(f"the compiled cloud detector {folder / LIBRARY} differs from LightGBM by "
                                   f"{difference:.3g} on its probe rows (delete {folder} to rebuild it)")
    return model


def build(model_file: Path, threads: int = 1, say: Callable[[str], None] = print) -> Path:
    """Compile the model into its cache folder (nothing when it is there already); returns the folder."""
    folder = library_folder(model_file)
    if (folder / LIBRARY).is_file():
        return folder
    if compiler() is None:
        raise DetectorBackendError("no C compiler (gcc) on PATH to build the compiled cloud detector: install "
                                   "gcc, or build it where there is one (snowpipe build-detector), or set "
                                   "annotation.cloud_detection.backend: lightgbm")
    with output_lock(folder, "build the compiled cloud detector"):
        if (folder / LIBRARY).is_file():  # built by the holder we waited for
            return folder
        import tl2cgen
        import treelite

        start = time.perf_counter()
        say(f"compiling the cloud detector's model {model_file.name} to {folder} on {threads} thread(s) "
            f"(once per model, treelite/tl2cgen version and architecture; minutes for s2cloudless's model)")
        partial = folder.with_name(f".{folder.name}.partial-{platform.node()}-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            model = treelite.frontend.load_lightgbm_model(str(model_file))
            tl2cgen.export_lib(model, "gcc", str(partial / LIBRARY), params=dict(CODEGEN), nthread=max(1, threads))
            features = probe_features()
            expected = LightGBMModel(model_file, threads).predict(features)
            np.savez(partial / "probe.npz", features=features, expected=expected)
            seconds = time.perf_counter() - start
            (partial / "build.json").write_text(json.dumps({
                "model_file": str(model_file), **_versions(), "codegen": CODEGEN, "machine": platform.machine(),
                "host": platform.node(), "seconds": round(seconds, 1)}, indent=1))
            difference = _verify(CompiledModel(partial / LIBRARY, threads), partial)
            if not difference <= MAX_DIFFERENCE:
                raise DetectorBackendError(f"the compiled cloud detector differs from LightGBM by {difference:.3g} "
                                           f"on its probe rows: not used (set backend: lightgbm)")
            os.replace(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        say(f"compiled the cloud detector in {seconds:.0f} s: {folder / LIBRARY}")
    return folder


def load(backend: str, threads: int = 0, model_file: Path | None = None,
         say: Callable[[str], None] = print) -> tuple[TreeModel, str]:
    """The tree model for `backend` and one line saying which it is and why."""
    model_file = model_file or default_model_file()
    if backend == "lightgbm":
        return LightGBMModel(model_file, threads), "LightGBM (backend: lightgbm)"
    folder = library_folder(model_file)
    try:
        if not (folder / LIBRARY).is_file():
            if backend == "auto":
                if compiler() is None:
                    raise DetectorBackendError("not built yet and no C compiler (gcc) here to build it")
                if os.environ.get("SNOWPIPE_DETECTOR_BUILD") == "never":
                    raise DetectorBackendError("not built yet, and SNOWPIPE_DETECTOR_BUILD=never here")
                holder = read_lock(folder)
                if holder is not None:
                    raise DetectorBackendError(f"being built by {holder.holder()}")
            build(model_file, threads or (os.cpu_count() or 1), say)
        return load_compiled(folder, threads), f"compiled ({folder / LIBRARY})"
    except DetectorBackendError as exc:
        if backend == "compiled":
            raise
        why = f"{exc}".rstrip(".")
        return LightGBMModel(model_file, threads), (f"LightGBM: the compiled detector is not available ({why}; "
                                                    f"build it with `snowpipe build-detector`)")


def cmd_build_detector(args: argparse.Namespace) -> int:
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    model_file = Path(args.model) if args.model else default_model_file()
    folder = build(model_file, max(1, threads))
    model = load_compiled(folder, max(1, threads))
    print(f"{folder / LIBRARY}: {model.name}, equal to LightGBM within {MAX_DIFFERENCE:g} on "
          f"{PROBE_ROWS} probe rows")
    return 0


def add_build_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-detector", help="compile the cloud detector's model once (minutes), into the cache",
                       description="Compile s2cloudless's LightGBM model to a shared library (treelite, tl2cgen, "
                                   "gcc) into $SNOWPIPE_CACHE, else ~/.cache/snowpipe, for the annotate stage's "
                                   "backend auto / compiled. Run it once on a cluster's login node (the cache "
                                   "is in the shared home) or a laptop; nothing to do when it is built.")
    p.add_argument("--threads", type=int, default=0, help="compiler processes (default: all usable CPUs)")
    p.add_argument("--model", help="a LightGBM model file (default: the one in the s2cloudless wheel)")
    p.set_defaults(func=cmd_build_detector)
