"""The training progress bar: off a terminal the step lines print exactly as before; tokens are counted."""

from utils.metrics_logger import format_step_line
from utils.progress import TrainProgress


def test_no_bar_off_a_tty_and_lines_unchanged(capsys):
    progress = TrainProgress(total_steps=10, start_step=4, tokens_per_step=512)
    assert progress.bar is None  # pytest's stderr is not a terminal
    line = format_step_line(5, {"train/loss": 0.5, "train/lr": 1e-4})
    progress.write(line)
    progress.update(500)
    progress.close()
    assert capsys.readouterr().out == line + "\n"
    assert progress.tokens == 4 * 512 + 500 and progress.total_tokens == 10 * 512
