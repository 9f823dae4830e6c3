"""`make demo`'s training job, end to end as a newcomer runs it: its own embedded server
(a child process with SQLite, the in-process broker and worker threads) in a fresh home."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(600)


def _demo(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env["ESPER_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "examples.demo", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        stdin=subprocess.DEVNULL,
    )


def test_the_demo_trains_grows_reports_plots_and_records_experiences(tmp_path):
    home = tmp_path / "home"
    plot = tmp_path / "demo.png"
    done = _demo(home, "--policy", "random", "--seed", "1", "--plot", str(plot))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for label in ("static small", "static large", "grown", "training Tamiyo's policy"):
        assert label in done.stdout, done.stdout
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    with sqlite3.connect(home / "esper.sqlite3") as db:
        runs = db.execute("SELECT name, status FROM tamiyo_trainingrun").fetchall()
        rewarded = db.execute(
            "SELECT COUNT(*) FROM tamiyo_experience WHERE reward IS NOT NULL"
        ).fetchone()[0]
    assert runs == [("demo-digits-random-seed1", "finished")]
    assert rewarded > 0, done.stdout


def test_the_demo_says_clearly_when_the_server_is_unreachable(tmp_path):
    done = _demo(tmp_path, "--server", "http://127.0.0.1:1", "--token", "x" * 40)
    assert done.returncode == 2
    assert "cannot reach the Esper server" in done.stderr and "Traceback" not in done.stderr


def test_mnist1d_is_generated_locally_split_and_standardised():
    from examples.morphogenesis import load_dataset

    state = np.random.get_state()[1].copy()
    data = load_dataset("mnist1d", seed=0)
    again = load_dataset("mnist1d", seed=0)
    assert (data.n_features, data.n_classes) == (40, 10)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (3200, 800, 1000)
    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_test, again.y_test)
    # standardised on the training split only
    assert data.x_train.mean(0).abs().max() < 1e-4
    assert (data.x_train.std(0) - 1).abs().max() < 1e-2
    assert set(data.y_train.unique().tolist()) == set(range(10))
    # generating it leaves numpy's global generator where it was
    assert (np.random.get_state()[1] == state).all()
