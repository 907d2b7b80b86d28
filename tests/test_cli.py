"""The ``steppo`` command's error handling and default config, in-process (no training)."""

from pathlib import Path

import pytest

from steppo_jax import cli
from steppo_jax.train.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def failing(err):
    def fn(args):
        raise err
    return fn


def test_user_errors_are_one_line_with_exit_status_2(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_train", failing(ConfigError("rollout.max_context: must be >= 1")))
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err == "steppo train: error: rollout.max_context: must be >= 1\n"
    monkeypatch.setattr(cli, "cmd_train", failing(FileNotFoundError("no such file: data/x.json")))
    assert cli.main(["train"]) == 2 and "no such file: data/x.json" in capsys.readouterr().err


def test_internal_errors_keep_their_traceback(monkeypatch):
    # a ValueError from deep inside (a shape mismatch, say) is a bug, not a user error
    monkeypatch.setattr(cli, "cmd_train", failing(ValueError("operands could not be broadcast")))
    with pytest.raises(ValueError, match="broadcast"):
        cli.main(["train"])


@pytest.mark.parametrize("argv", [["--debug", "train"], ["train", "--debug"]])
def test_debug_shows_the_traceback_of_user_errors(monkeypatch, argv):
    monkeypatch.setattr(cli, "cmd_train", failing(ConfigError("bad key")))
    with pytest.raises(ConfigError, match="bad key"):
        cli.main(argv)


def test_default_config_is_found_from_any_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert Path(cli.config_path(None)) == ROOT / "configs" / "default.yaml"
    own = tmp_path / "configs" / "default.yaml"
    own.parent.mkdir()
    own.write_text("seed: 3\n")
    assert Path(cli.config_path(None)) == own  # the working directory's comes first
    assert cli.config_path("mine.yaml") == "mine.yaml"  # an explicit path is taken as given
