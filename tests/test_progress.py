"""Progress display: a bar on a terminal, a few plain lines in a log."""

from __future__ import annotations

import io

from modellego.terminal import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_quarter_not_per_step():
    log = io.StringIO()
    with Progress(10, "epoch 1/2", stream=log) as bar:
        for step in range(10):
            bar.update(loss=f"{1.0 / (step + 1):.3f}")
        bar.write("epoch 1: done")
    assert log.getvalue().splitlines() == [
        "epoch 1/2: 3/10 (loss 0.333)", "epoch 1/2: 5/10 (loss 0.200)",
        "epoch 1/2: 8/10 (loss 0.125)", "epoch 1/2: 10/10 (loss 0.100)", "epoch 1: done"]
    assert "\r" not in log.getvalue()


def test_a_terminal_gets_a_bar_and_disabled_shows_nothing():
    tty = FakeTerminal()
    with Progress(4, "work", stream=tty) as bar:
        for _ in range(4):
            bar.update()
    assert "\r" in tty.getvalue() and "work" in tty.getvalue()
    quiet = io.StringIO()
    with Progress(4, "work", stream=quiet, enabled=False) as bar:
        bar.update(4)
        bar.write("hidden")
    assert quiet.getvalue() == ""


def test_training_logs_plain_lines(capsys):
    from modellego.training import TrainConfig, train

    train(TrainConfig(arch="lenet5", dataset="digits", epochs=1, width=0.25, batch_size=512),
          progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[-1].startswith("epoch 1: loss ") and " val accuracy " in lines[-1]
    assert lines[0].startswith("epoch 1/1: 1/3 (loss ")
