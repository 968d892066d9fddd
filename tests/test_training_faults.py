"""Training under faults: killed while saving, a corrupt or hostile checkpoint, a changed config or dataset,
a project whose dataset identity was upgraded, a stop signal in the middle of an epoch.

Kills are real SIGKILLs of a real `snowpipe stage train` process, at an exact write (SNOWPIPE_KILL_AT).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.errors import DataError
from pipeline.model.checkpoint import CHECKPOINT_HASHES, FORMAT, load_model, read_checkpoint
from pipeline.stages import train
from pipeline.training.data import PatchDataset
from pipeline.training.loop import SET_FILES, Trainer, TrainingInterrupted
from pipeline.training.selection import selection_score
from tests.builders import make_config, write_dataset

TINY = {"model": {"base_channels": 4, "depth": 1}, "batch_size": 4, "workers": 0, "learning_rate": 0.01,
        "mixed_precision": False, "device": "cpu"}


def config_for(root: Path, **training):
    return make_config(root, training={**TINY, **training})


def write_config_file(root: Path, **training) -> Path:
    data = {"tile_id": "32TNS", "paths": {"dataset": "dataset", "results": "results"},
            "training": {"enable": True, **TINY, **training}}
    path = root / "pipeline-config.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def snowpipe_train(config: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SNOWPIPE_KILL_AT", None)
    if kill_at:
        env["SNOWPIPE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "pipeline", "stage", "train", str(config), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def training(root: Path) -> Path:
    return root / "results" / "training"


def history(root: Path) -> list[dict]:
    return json.loads((training(root) / "history.json").read_text())


def recorded_epochs(root: Path) -> list[int]:
    path = training(root) / "history.json"
    return [r["epoch"] for r in json.loads(path.read_text())] if path.is_file() else []


def assert_the_set_agrees(root: Path) -> dict:
    """history.json is last.pt's history; best.pt is this training's best epoch; the curves are not older."""
    folder = training(root)
    last = read_checkpoint(folder / "last.pt")
    assert history(root) == last["history"]
    best_epochs = [r["epoch"] for r in last["history"] if r["best"]]
    scores = {r["epoch"]: selection_score("val_loss", r["val_loss"], r["val_metrics"]) for r in last["history"]}
    assert scores[best_epochs[-1]] == max(scores.values())  # the default training.select_by
    best = read_checkpoint(folder / "best.pt")
    assert best["epoch"] == best_epochs[-1] and best["run"] == last["run"]
    for curve in ("loss.png", "iou.png"):
        assert (folder / curve).stat().st_mtime >= (folder / "last.pt").stat().st_mtime
    return last


def test_a_kill_after_any_write_of_an_epoch_is_repaired_by_the_next_run(tmp_path, capsys):
    write_dataset(tmp_path / "dataset", train=8, validation=4)
    config = write_config_file(tmp_path, epochs=30)
    folder = training(tmp_path)
    # Each run trains one more epoch and dies right after one of its writes (SET_FILES is their order).
    for point in SET_FILES:
        job = snowpipe_train(config, kill_at=f"published {point}")
        assert job.returncode == -signal.SIGKILL, job.stderr[-2000:]
        saved = read_checkpoint(folder / "last.pt")
        capsys.readouterr()
        if point == "last.pt":
            # Killed in epoch 1: no best.pt, no history yet. A run for 2 epochs resumes, repairs first,
            # and trains to the configured count.
            assert saved["epoch"] == 1 and recorded_epochs(tmp_path) == [] and not (folder / "best.pt").exists()
            report = train.run(config_for(tmp_path, epochs=2))
            assert report.count("done") == 1
            assert "repaired history.json and best.pt from" in capsys.readouterr().err
            assert assert_the_set_agrees(tmp_path)["epoch"] == 2
            continue
        if point == "best.pt":  # history.json and the curves are an epoch behind
            assert recorded_epochs(tmp_path) == list(range(1, saved["epoch"]))
        # The same config run again finds the training finished at that epoch: it repairs the set and skips.
        report = train.run(config_for(tmp_path, epochs=saved["epoch"]))
        assert report.count("skipped") == 1
        assert assert_the_set_agrees(tmp_path)["epoch"] == saved["epoch"]
        assert [r["epoch"] for r in history(tmp_path)] == list(range(1, saved["epoch"] + 1))


def test_a_corrupt_last_pt_is_one_line_naming_it_and_the_fix_and_force_trains_anew(tmp_path):
    write_dataset(tmp_path / "dataset", train=8, validation=4)
    config = write_config_file(tmp_path, epochs=1)
    train.run(config_for(tmp_path, epochs=1))
    last = training(tmp_path) / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated: a disk or copy went wrong
    job = snowpipe_train(config)
    assert job.returncode == 1 and "Traceback" not in job.stderr and "internal error" not in job.stderr
    errors = [line for line in job.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot read checkpoint {last}" in errors[0]
    assert "delete it, or run the train stage with --force" in errors[0]
    last.write_bytes(random.Random(1).randbytes(4096))  # random bytes: the same one line
    with pytest.raises(DataError, match=r"damaged.*--force") as error:
        train.run(config_for(tmp_path, epochs=1))
    assert "\n" not in str(error.value)
    report = train.run(config_for(tmp_path, epochs=1), force=True)
    assert report.count("done") == 1 and read_checkpoint(last)["epoch"] == 1
    assert_the_set_agrees(tmp_path)


DAMAGED_PICKLE = b"\x80\x04" + random.Random(7).randbytes(4094)  # a pickle header, then garbage


def torch_noise(stderr: str) -> list[str]:
    """Lines of torch's own warnings (`.../torch/...py:N: UserWarning: ...` and the source line after it)."""
    return [line for line in stderr.splitlines() if "Warning" in line or "torch" in line.lower()]


def test_a_damaged_checkpoint_is_only_the_one_line_without_torchs_warning_before_it(tmp_path, recwarn,
                                                                                     monkeypatch):
    """torch warns "Detected pickle protocol 4 in the checkpoint ..." on its way to failing on a damaged file: the
    user sees snowpipe's one line only. A damaged best.pt beside a good last.pt is repaired without the noise."""
    write_dataset(tmp_path / "dataset", train=8, validation=4)
    config = write_config_file(tmp_path, epochs=1)
    train.run(config_for(tmp_path, epochs=1))
    folder = training(tmp_path)
    good_last = (folder / "last.pt").read_bytes()

    (folder / "best.pt").write_bytes(DAMAGED_PICKLE)
    job = snowpipe_train(config)
    assert job.returncode == 0, job.stderr
    assert f"repaired best.pt from {folder / 'last.pt'}" in job.stderr and torch_noise(job.stderr) == []
    assert read_checkpoint(folder / "best.pt")["epoch"] == 1

    (folder / "last.pt").write_bytes(DAMAGED_PICKLE)
    job = snowpipe_train(config)
    assert job.returncode == 1 and torch_noise(job.stderr) == [], job.stderr
    said = [line for line in job.stderr.splitlines() if line.strip() and not line.startswith("== train:")]
    assert len(said) == 1 and said[0].startswith(f"error: cannot read checkpoint {folder / 'last.pt'}: the file "
                                                 f"is damaged"), job.stderr

    recwarn.clear()  # in this process too: the DataError, and no warning left behind
    with pytest.raises(DataError, match="the file is damaged"):
        read_checkpoint(folder / "last.pt")
    assert [str(w.message) for w in recwarn] == []
    real_load = torch.load

    def load_with_a_warning(*args, **kwargs):
        warnings.warn("a warning torch gives about a file that loads", UserWarning, stacklevel=2)
        return real_load(*args, **kwargs)

    (folder / "last.pt").write_bytes(good_last)
    monkeypatch.setattr(torch, "load", load_with_a_warning)
    with pytest.warns(UserWarning, match="a file that loads"):  # only a failed load's warnings are held back
        assert read_checkpoint(folder / "last.pt")["epoch"] == 1


def test_a_training_of_another_config_or_dataset_keeps_the_previous_model_aside(tmp_path, capsys):
    write_dataset(tmp_path / "dataset", train=8, validation=4)
    folder = training(tmp_path)
    train.run(config_for(tmp_path, epochs=1))
    first = read_checkpoint(folder / "last.pt")
    capsys.readouterr()
    report = train.run(config_for(tmp_path, epochs=1, learning_rate=0.02))  # another config
    assert report.count("done") == 1
    message = capsys.readouterr().err
    (aside,) = folder.glob("previous-*")
    assert re.fullmatch(r"previous-\d{8}T\d{6}Z", aside.name)
    assert f"{folder / 'last.pt'} belongs to another config or dataset; the previous model is kept in {aside}/" \
        in message.replace("\n", "")
    assert set(SET_FILES) <= {p.name for p in aside.iterdir()}
    kept = read_checkpoint(aside / "last.pt")
    assert kept["config_hash"] == first["config_hash"] and kept["history"] == first["history"]
    assert json.loads((aside / "history.json").read_text()) == first["history"]
    assert history(tmp_path)[0]["lr"] == 0.02 and read_checkpoint(folder / "last.pt")["run"] != first["run"]
    # The dataset is made again from other inputs: the second model is kept too, next to the first.
    manifest_file = tmp_path / "dataset" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "inputs": "other scenes"}))
    train.run(config_for(tmp_path, epochs=1, learning_rate=0.02))
    assert len(list(folder.glob("previous-*"))) == 2 and (folder / "last.pt").is_file()


def test_a_model_trained_before_the_dataset_manifest_was_upgraded_resumes(tmp_path, capsys):
    for name in ("finished", "continued"):
        root = tmp_path / name
        write_dataset(root / "dataset", train=8, validation=4)
        train.run(config_for(root, epochs=1))
        # The dataset stage upgrades its manifest in place: move-proof inputs, the old value kept.
        manifest_file = root / "dataset" / "manifest.json"
        manifest = json.loads(manifest_file.read_text())
        manifest = {**manifest, "inputs": "relative to extracted_data", "legacy_inputs": manifest["inputs"]}
        manifest_file.write_text(json.dumps(manifest))
    capsys.readouterr()
    config = config_for(tmp_path / "finished", epochs=1)
    assert train.run(config).count("skipped") == 1  # still finished, now under its new identity
    assert read_checkpoint(training(tmp_path / "finished") / "last.pt")["config_hash"] == \
        train.training_hash(config, manifest)
    config = config_for(tmp_path / "continued", epochs=2)
    assert train.run(config).count("done") == 1
    assert "resuming after epoch 1" in capsys.readouterr().err
    last = assert_the_set_agrees(tmp_path / "continued")
    assert last["config_hash"] == train.training_hash(config, manifest) and last["epoch"] == 2
    assert not list(tmp_path.glob("*/results/training/previous-*"))


class Payload:
    """What a hostile "checkpoint" carries: a call that runs when the file is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_carries_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "the-payload-ran"
    hostile = tmp_path / "downloaded.pt"
    torch.save({"format": FORMAT, "model": Payload(marker)}, hostile)
    with pytest.raises(DataError) as error:
        load_model(hostile)  # what infer does with inference.checkpoint
    assert f"cannot read checkpoint {hostile}: it holds posix.system" in str(error.value)
    assert "\n" not in str(error.value)
    write_dataset(tmp_path / "dataset", train=8, validation=4)
    training(tmp_path).mkdir(parents=True)
    shutil.copy(hostile, training(tmp_path) / "last.pt")
    with pytest.raises(DataError, match="posix.system"):
        train.run(config_for(tmp_path, epochs=1))
    assert not marker.exists()
    torch.load(hostile, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_a_checkpoint_of_the_previous_format_still_loads_and_resumes(tmp_path):
    write_dataset(tmp_path / "dataset", train=8, validation=4)
    train.run(config_for(tmp_path, epochs=1))
    folder = training(tmp_path)
    # Rewrite the set as the previous version wrote it: numpy's and Python's RNG states as pickled tuples.
    state = read_checkpoint(folder / "last.pt")
    state.pop("run")
    state["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    state["progress"] = {"best_loss": state["history"][0]["val_loss"],  # then: the lowest validation loss
                         **{k: state["progress"][k] for k in ("bad_epochs", "finished")}}
    for name in ("last.pt", "best.pt"):
        torch.save(state, folder / name)
    (folder / CHECKPOINT_HASHES).unlink()  # that version recorded no content hashes
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(folder / "last.pt")
    model, _ = load_model(folder / "best.pt")
    assert model(torch.zeros(1, 14, 32, 32)).shape == (1, 4, 32, 32)
    assert train.run(config_for(tmp_path, epochs=1)).count("skipped") == 1
    assert train.run(config_for(tmp_path, epochs=2)).count("done") == 1
    last = read_checkpoint(folder / "last.pt")
    assert last["epoch"] == 2 and not torch.serialization.get_unsafe_globals_in_checkpoint(folder / "last.pt")


def test_a_stop_signal_mid_epoch_resumes_that_epoch_where_it_stopped(tmp_path, monkeypatch):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    for root in (reference, stopped):
        write_dataset(root / "dataset", train=16, validation=4)  # batch 4: 4 steps per epoch
    train.run(config_for(reference, epochs=2))
    real, calls = Trainer._stop_agreed, []

    def sigterm_at_step_2_of_epoch_2(self, stop):
        calls.append(1)
        if len(calls) == 6:
            signal.raise_signal(signal.SIGTERM)  # scancel, pre-emption
        return real(self, stop)

    monkeypatch.setattr(Trainer, "_stop_agreed", sigterm_at_step_2_of_epoch_2)
    with pytest.raises(TrainingInterrupted, match=r"holds 1 finished epoch\(s\) and 2 of 4 steps of epoch 2"):
        train.run(config_for(stopped, epochs=2))
    saved = read_checkpoint(training(stopped) / "last.pt")
    assert saved["epoch"] == 1 and saved["progress"]["step"] == 2 and len(saved["history"]) == 1
    monkeypatch.undo()
    assert train.run(config_for(stopped, epochs=2)).count("done") == 1
    # The interrupted training took exactly the steps of the uninterrupted one: same weights, same history.
    one, two = (read_checkpoint(training(root) / "last.pt") for root in (reference, stopped))
    assert all(torch.equal(one["model"][k], two["model"][k]) for k in one["model"])
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in one["history"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in two["history"]]
    assert two["progress"]["step"] == 0 and assert_the_set_agrees(stopped)["epoch"] == 2


def test_sigterm_to_the_whole_process_group_with_loader_workers_saves_and_exits_for_a_requeue(tmp_path):
    """What scancel and preemption do: SIGTERM to the trainer and its two data-loading workers at once."""
    import time

    write_dataset(tmp_path / "dataset", train=64, validation=8)
    config = write_config_file(tmp_path, epochs=12, workers=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SNOWPIPE_KILL_AT", None)
    trainer = subprocess.Popen([sys.executable, "-m", "pipeline", "stage", "train", str(config)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (training(tmp_path) / "last.pt").is_file():  # an epoch finished: the workers are running again
        assert trainer.poll() is None and time.monotonic() < deadline, trainer.communicate()
        time.sleep(0.05)
    os.killpg(trainer.pid, signal.SIGTERM)
    _, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 75, err[-2000:]
    assert "DataLoader worker" not in err and "internal error" not in err
    saved = read_checkpoint(training(tmp_path) / "last.pt")
    assert 1 <= saved["epoch"] < 12
    resumed = snowpipe_train(config)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert recorded_epochs(tmp_path) == list(range(1, 13))  # each epoch once, none lost or repeated


@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_loading_worker_dying_while_scancel_stops_the_job_still_saves_the_steps_taken(tmp_path, monkeypatch, split):
    """scancel signals every process of the job; a data-loading worker still starting dies of it before it can
    ignore the signal. The trainer, asked to stop, saves what it has instead of failing with an internal error."""
    write_dataset(tmp_path / "dataset", train=16, validation=8)
    loaded = {"train": 0, "validation": 0}
    original = PatchDataset.__getitem__

    def dies_after_scancel(self, index):
        split_name = "train" if self.augment is not None else "validation"
        loaded[split_name] += 1
        if split_name == split and loaded[split_name] == 5:  # epoch 1: during step 2 (batch 4) or validation
            os.kill(os.getpid(), signal.SIGTERM)  # the stop request, as scancel sends it
            raise RuntimeError("DataLoader worker (pid(s) 12345) exited unexpectedly")
        return original(self, index)

    monkeypatch.setattr(PatchDataset, "__getitem__", dies_after_scancel)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM during epoch 1"):
        train.run(config_for(tmp_path, epochs=3, batch_size=4))
    saved = read_checkpoint(training(tmp_path) / "last.pt")
    assert saved["epoch"] == 0
    # the steps taken; in validation all 4, not yet validated
    assert saved["progress"]["step"] == (1 if split == "train" else 4)
    monkeypatch.setattr(PatchDataset, "__getitem__", original)
    assert train.run(config_for(tmp_path, epochs=3, batch_size=4)).count("done") == 1
    assert [r["epoch"] for r in history(tmp_path)] == [1, 2, 3]
    assert history(tmp_path)[0]["steps"] == 4


def test_a_checkpoint_damaged_in_its_middle_is_refused_though_torch_would_load_it(tmp_path):
    """torch reads a tensor's damaged bytes as numbers: the checkpoint loads, the model predicts garbage. Its
    content hash, recorded as training wrote it, is checked before it is used: infer, train and verify name it."""
    from pipeline.cli import main
    from pipeline.model.checkpoint import checkpoint_problem

    write_dataset(tmp_path / "dataset", train=8, validation=4)
    config = write_config_file(tmp_path, epochs=1)
    train.run(config_for(tmp_path, epochs=1))
    best = training(tmp_path) / "best.pt"
    data = bytearray(best.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    best.write_bytes(bytes(data))
    assert torch.load(best, weights_only=True)  # torch alone would take it
    assert checkpoint_problem(best) == "the file is damaged: its content changed since training wrote it"
    with pytest.raises(DataError, match=rf"cannot read checkpoint {best}: the file is damaged"):
        read_checkpoint(best)
    assert main(["verify", str(config)]) == 1
    job = snowpipe_train(config)  # last.pt is intact and of the best epoch: best.pt is repaired from it
    assert job.returncode == 0 and "repaired best.pt" in job.stderr, job.stderr
    assert checkpoint_problem(best) is None and read_checkpoint(best)["epoch"] == 1
