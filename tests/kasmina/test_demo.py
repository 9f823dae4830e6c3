"""`make demo`'s training job, run briefly against the live test server and worker."""

import pytest
import torch


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the demo pins torch to one thread


def test_the_demo_trains_grows_reports_and_plots(registry, token, tmp_path, capsys, threads):
    from examples import demo
    from tamiyo.models import Experience, TrainingRun

    plot = tmp_path / "demo.png"
    argv = ["--server", registry.base_url, "--token", token.key, "--epochs", "8"]
    code = demo.main([*argv, "--policy", "random", "--plot", str(plot), "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    for variant in ("static small", "static large", "grown"):
        assert variant in out
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    run = TrainingRun.objects.get()
    assert run.status == "finished" and run.config["policy"] == "random"
    assert Experience.objects.filter(run=run, reward__isnull=False).exists()


def test_the_demo_says_clearly_when_the_server_is_unreachable(capsys, threads):
    from examples import demo

    code = demo.main(["--server", "http://127.0.0.1:1", "--token", "x" * 40, "--epochs", "1"])
    assert code == 2
    assert "cannot reach the Esper server" in capsys.readouterr().err
