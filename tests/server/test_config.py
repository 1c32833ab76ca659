"""Configuration: defaults, then a TOML file, then the environment, then flags."""

from __future__ import annotations

import pytest

from lstm_server.config import ServerConfig, load_config


def test_precedence_file_env_flags(tmp_path) -> None:
    (tmp_path / "server.toml").write_text('port = 7000\nmax_sessions = 5\nmodels = "from-file"\n')
    env = {"LSTM_SERVER_MAX_SESSIONS": "9", "LSTM_SERVER_BACKEND": "torchscript"}
    config = load_config(["--config", str(tmp_path / "server.toml"), "--port", "7100"], env)
    assert config.port == 7100  # flag over file
    assert config.max_sessions == 9  # env over file
    assert config.models == "from-file"  # file over default
    assert config.backend == "torchscript"
    assert config.idle_timeout_s == ServerConfig().idle_timeout_s


def test_unknown_file_option_and_bad_value_are_refused(tmp_path, capsys) -> None:
    (tmp_path / "bad.toml").write_text("max_sesions = 5\n")
    with pytest.raises(SystemExit):
        load_config(["--config", str(tmp_path / "bad.toml")], {})
    assert "unknown options ['max_sesions']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_config(["--port", "many"], {})


def test_per_model_backend_override() -> None:
    config = ServerConfig(model_backends="charlm=torchscript, other=onnxruntime")
    assert config.backend_for("charlm") == "torchscript"
    assert config.backend_for("sentiment") == "onnxruntime"


def test_per_model_version_pin() -> None:
    config = ServerConfig(model_versions="charlm=1")
    assert config.version_for("charlm") == 1 and config.version_for("sentiment") is None
