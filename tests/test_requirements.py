"""tests/requirements.py: under CI=true a test that cannot run its real part fails with the reason instead of
skipping, only tests marked `gpu` may skip, and the session ends with the skipped tests counted by marker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SAMPLE = '''
import pytest
from tests.requirements import need


def test_that_runs():
    pass


def test_that_needs_a_mount():
    need(False, "cannot mount a tmpfs here: permission denied")


@pytest.mark.skipif(True, reason="a plain skipif, not through need()")
def test_with_a_plain_skipif():
    pass


@pytest.fixture
def mounted():
    need(False, "mounting a small tmpfs needs root")


def test_whose_fixture_cannot_mount(mounted):
    pass


@pytest.mark.gpu
def test_on_a_gpu():
    pytest.skip("no GPU here")  # what the gpu marker's own check does on a machine without one
'''


def run_sample(folder: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.requirements", "-p", "no:cacheprovider",
                           "-q", "-rA", "--rootdir", str(folder), "-o", "markers=gpu: needs a CUDA GPU", str(folder)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_locally_a_missing_part_skips_with_its_reason_and_skips_are_counted_by_marker(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    done = run_sample(tmp_path, ci=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 4 skipped" in done.stdout, done.stdout
    assert "cannot mount a tmpfs here: permission denied" in done.stdout
    assert "skipped tests by marker: gpu 1, unmarked 3" in done.stdout, done.stdout


def test_under_ci_a_missing_part_fails_with_its_reason_and_only_the_gpu_marker_skips(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    done = run_sample(tmp_path, ci=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 1 passed, 1 skipped, 2 errors" in done.stdout, done.stdout
    assert "CI=true: this test cannot run its real part here and CI allows no skip for it: cannot mount a tmpfs " \
           "here: permission denied" in done.stdout, done.stdout
    for reason in ("a plain skipif, not through need()", "mounting a small tmpfs needs root"):
        assert f"CI allows no skip for it: {reason}" in done.stdout, done.stdout
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED [1] ")]
    assert len(skipped) == 1 and ("needs a CUDA GPU" in skipped[0] or "no GPU here" in skipped[0]), done.stdout
    assert "skipped tests by marker: gpu 1 (CI=true: only tests marked gpu may skip)" in done.stdout, done.stdout


def test_under_ci_a_module_skipped_at_import_fails(tmp_path):
    (tmp_path / "test_module.py").write_text('import pytest\npytest.importorskip("no_such_module_here")\n')
    done = run_sample(tmp_path, ci=True)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "CI allows no skip for it: could not import 'no_such_module_here'" in done.stdout, done.stdout
    assert run_sample(tmp_path, ci=False).returncode == 5  # locally: skipped, nothing ran
