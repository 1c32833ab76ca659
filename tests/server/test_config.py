"""Configuration: defaults, then a TOML file, then the environment, then flags."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from lstm_server.cli import main as server_main
from lstm_server.config import ConfigError, ServerConfig, load_config, options_markdown


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
    (tmp_path / "both.toml").write_text('max_sesions = 5\nport = "many"\n')  # both problems, in one line
    with pytest.raises(ConfigError) as both:
        load_config(["--config", str(tmp_path / "both.toml")], {})
    assert "unknown options ['max_sesions']" in str(both.value) and "--port: must be an integer" in str(both.value)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-sessions=-5"], {}, "--max-sessions: must be a number from 1 to 10000000, got -5"),
        (["--idle-timeout-s", "0"], {}, "--idle-timeout-s: must be a number >= 0.001, got 0.0"),
        (
            [],
            {"LSTM_SERVER_PORT": "70000"},
            "--port: must be a number from 0 to 65535, got 70000 (from LSTM_SERVER_PORT)",
        ),
        (["--device", "tpu"], {}, "--device: must be one of cpu, cuda, got 'tpu'"),
        (["--insecure-no-auth", "maybe"], {}, "--insecure-no-auth: must be true or false, got 'maybe'"),
        (["--tls-cert", "a.pem"], {}, "--tls-cert and --tls-key: give both"),
        (["--host", "0.0.0.0"], {}, "--host 0.0.0.0: not a loopback address, and no authentication"),
        (["--default-max-tokens", "9", "--max-tokens-limit", "5"], {}, "--default-max-tokens: must be at most"),
        (["--list-page-size", "2000"], {}, "--list-page-size: must be at most --list-max-page-size (1000), got 2000"),
        (["--max-message-bytes", "3e9"], {}, "--max-message-bytes: must be an integer, got '3e9'"),
        (["--max-message-bytes", "3000000000"], {}, "must be a number from 1024 to 2147483647, got 3000000000"),
        ([], {"LSTM_SERVER_TRACING": "jaeger"}, "--tracing: must be one of off, console, otlp, got 'jaeger' (from"),
        (["--log-level", "LOUD"], {}, "--log-level: must be one of CRITICAL, FATAL, ERROR, WARN, WARNING, INFO,"),
        (["--model-backends", "charlm=tensorrt"], {}, "--model-backends: charlm='tensorrt': give each model"),
        (["--model-versions", "charlm=latest"], {}, "--model-versions: charlm='latest': give each model a whole"),
        (["--max-batch"], {}, "argument --max-batch: expected one argument (lstm-server --help lists the options)"),
        (["--max-bacth", "4"], {}, "unrecognized arguments: --max-bacth 4 (lstm-server --help lists the options)"),
        (["--max-bat", "4"], {}, "unrecognized arguments: --max-bat 4"),  # no abbreviations
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


def test_problems_from_every_source_are_reported_together_with_where_each_value_came_from(tmp_path) -> None:
    (tmp_path / "server.toml").write_text('port = "many"\nmax_batch = true\nmodels = 3\n')
    with pytest.raises(ConfigError) as refused:
        load_config(["--config", str(tmp_path / "server.toml"), "--device", "tpu"], {"LSTM_SERVER_THREADS": "-1"})
    where = f"(in {tmp_path / 'server.toml'})"
    assert str(refused.value).split("; ") == [
        f"--models: must be a string, got 3 {where}",
        f"--port: must be an integer, got 'many' {where}",
        "--device: must be one of cpu, cuda, got 'tpu'",
        "--threads: must be a number from 0 to 1024, got -1 (from LSTM_SERVER_THREADS)",
        f"--max-batch: must be an integer, got True {where}",  # TOML's true is not 1
    ]


def test_a_file_that_is_not_toml_is_refused(tmp_path) -> None:
    (tmp_path / "server.toml").write_text("port: 7000\n")
    with pytest.raises(ConfigError, match=r"^--config .*server.toml: cannot be read as TOML \(Expected '='"):
        load_config(["--config", str(tmp_path / "server.toml")], {})
    with pytest.raises(ConfigError, match=r"^--config .*missing.toml: cannot be read as TOML \(.*No such file"):
        load_config(["--config", str(tmp_path / "missing.toml")], {})


def test_each_layer_overrides_the_one_before(tmp_path) -> None:
    (tmp_path / "server.toml").write_text("max_batch = 10\nthread_spinning = false\n")
    file = ["--config", str(tmp_path / "server.toml")]
    env = {"LSTM_SERVER_MAX_BATCH": "20", "LSTM_SERVER_THREAD_SPINNING": "on"}
    assert (load_config([], {}).max_batch, load_config([], {}).thread_spinning) == (256, True)
    assert (load_config(file, {}).max_batch, load_config(file, {}).thread_spinning) == (10, False)
    assert (load_config(file, env).max_batch, load_config(file, env).thread_spinning) == (20, True)
    flags = load_config([*file, "--max-batch", "30", "--thread-spinning", "no"], env)
    assert (flags.max_batch, flags.thread_spinning) == (30, False)


def test_booleans_and_the_environment() -> None:
    for word, value in [("true", True), ("YES", True), ("1", True), ("off", False), ("No", False), ("0", False)]:
        assert load_config(["--allow-batch-variance", word], {}).allow_batch_variance is value
        assert load_config([], {"LSTM_SERVER_ALLOW_BATCH_VARIANCE": word}).allow_batch_variance is value
    assert load_config(["--allow-batch-variance"], {}).allow_batch_variance is True  # a flag alone means true
    # variables that name no option are ignored (the environment is shared: Kubernetes adds LSTM_SERVER_SERVICE_HOST
    # for a service named lstm-server)
    assert load_config([], {"LSTM_SERVER_SERVICE_HOST": "10.0.0.1", "LSTM_SERVER_MAX_BACTH": "5"}) == ServerConfig()


def test_a_config_built_in_code_reads_no_environment(monkeypatch) -> None:
    for name in [name for name in os.environ if name.startswith("LSTM_SERVER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LSTM_SERVER_PORT", "7000")
    assert ServerConfig().port == 50051 and load_config([]).port == 7000  # load_config reads os.environ by default
    assert ServerConfig(replica_name="").replica_name == os.uname().nodename  # empty: the host name
    with pytest.raises(ValidationError, match="max_batch"):  # the same rules hold in code
        ServerConfig(max_batch=0)


def test_help_says_what_each_option_does(monkeypatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a description
    with pytest.raises(SystemExit) as exited:
        server_main(["--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, field in ServerConfig.model_fields.items():
        flag, description = "--" + name.replace("_", "-"), re.escape(str(field.description))
        assert re.search(rf" {flag} \S+ {description} \[[^]]*env LSTM_SERVER_{name.upper()}\]", text), name
    assert (
        " --max-batch INT Sessions stepped together in one model call "
        "[from 1 to 100000; default 256; env LSTM_SERVER_MAX_BATCH] " in text
    )
    assert " --device {cpu,cuda} Device the models run on [default cpu; env LSTM_SERVER_DEVICE] " in text
    assert " --insecure-no-auth [BOOL] Allow a host that is not loopback without authentication" in text
    assert " (empty: the host name) [default empty; env LSTM_SERVER_REPLICA_NAME] " in text
    assert " sessions: --max-sessions INT " in text and "A boolean flag alone means true" in text


def test_the_documented_options_are_the_models() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "server.md").read_text()
    assert options_markdown() in docs, "docs/server.md: paste options_markdown() over its options table"


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
