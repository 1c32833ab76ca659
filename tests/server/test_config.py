"""Configuration: defaults, then a TOML file, then the environment, then flags."""

from __future__ import annotations

import os

import pytest

from lstm_server.cli import main as server_main
from lstm_server.config import ConfigError, ServerConfig, load_config


def test_precedence_file_env_flags(tmp_path) -> None:
    (tmp_path / "server.toml").write_text('port = 7000\nmax_sessions = 5\nmodels = "from-file"\n')
    env = {"LSTM_SERVER_MAX_SESSIONS": "9", "LSTM_SERVER_BACKEND": "torchscript"}
    config = load_config(["--config", str(tmp_path / "server.toml"), "--port", "7100"], env)
    assert config.port == 7100  # flag over file
    assert config.max_sessions == 9  # env over file
    assert config.models == "from-file"  # file over default
    assert config.backend == "torchscript"
    assert config.idle_timeout_s == ServerConfig().idle_timeout_s


def test_unknown_file_option_and_bad_value_are_refused(tmp_path) -> None:
    (tmp_path / "bad.toml").write_text("max_sesions = 5\n")
    with pytest.raises(ConfigError, match=r"unknown options \['max_sesions'\]"):
        load_config(["--config", str(tmp_path / "bad.toml")], {})
    with pytest.raises(ConfigError, match="--port: must be an integer, got 'many'"):
        load_config(["--port", "many"], {})


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-sessions=-5"], {}, "--max-sessions: must be a number from 1 to 1e+07, got -5"),
        (["--idle-timeout-s", "0"], {}, "--idle-timeout-s: must be a number >= 0.001, got 0.0"),
        ([], {"LSTM_SERVER_PORT": "70000"}, "--port: must be a number from 0 to 65535, got 70000"),
        (["--device", "tpu"], {}, "--device: must be one of cpu, cuda, got 'tpu'"),
        (["--insecure-no-auth", "maybe"], {}, "--insecure-no-auth: must be true or false, got 'maybe'"),
        (["--tls-cert", "a.pem"], {}, "--tls-cert and --tls-key: give both"),
        (["--host", "0.0.0.0"], {}, "--host 0.0.0.0: not a loopback address, and no authentication"),
        (["--default-max-tokens", "9", "--max-tokens-limit", "5"], {}, "--default-max-tokens: must be at most"),
    ],
)
def test_a_bad_option_ends_the_server_with_one_line_naming_it(argv, env, message, monkeypatch, capsys) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert server_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("lstm-server: ") and message in err, err


def test_options_that_open_the_server_to_the_network() -> None:
    assert load_config(["--host", "0.0.0.0", "--insecure-no-auth"], {}).insecure_no_auth is True
    assert load_config(["--host", "::1"], {}).host == "::1"  # loopback needs no authentication
    assert load_config(["--host", "10.1.2.3", "--auth-tokens", "tokens.txt"], {}).authenticated
    assert load_config([], {"LSTM_SERVER_INSECURE_NO_AUTH": "no"}).insecure_no_auth is False


def test_per_model_backend_override() -> None:
    config = ServerConfig(model_backends="charlm=torchscript, other=onnxruntime")
    assert config.backend_for("charlm") == "torchscript"
    assert config.backend_for("sentiment") == "onnxruntime"


def test_per_model_version_pin() -> None:
    config = ServerConfig(model_versions="charlm=1")
    assert config.version_for("charlm") == 1 and config.version_for("sentiment") is None


def test_per_model_threads() -> None:
    config = ServerConfig(threads=3, model_threads="charlm=1")
    assert config.threads_for("charlm") == 1 and config.threads_for("sentiment") == 3
    assert ServerConfig().threads_for("charlm") == (os.cpu_count() or 1)
    for bad in ("charlm=0", "charlm=two", "charlm=", "charlm=2000"):
        with pytest.raises(ConfigError, match="--model-threads: charlm="):
            load_config(["--model-threads", bad], {})
