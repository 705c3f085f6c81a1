from __future__ import annotations

from pathlib import Path

import pytest

from extauthz.errors import ConfigError
from extauthz.settings import Settings, load_settings, parse_duration


def test_defaults_need_no_environment(tmp_path: Path) -> None:
    """With nothing set, the store is a SQLite file and the pepper a file in the data dir."""
    s = load_settings(environ={"EXTAUTHZ_DATA_DIR": str(tmp_path)})
    assert s.db_url == f"sqlite:///{tmp_path}/extauthz.db"
    assert s.pepper_path == tmp_path / "pepper"
    assert s.grpc_addr == "127.0.0.1:9001"
    assert s.key_headers == ("x-api-key", "authorization")


def test_required_environment_names_exist() -> None:
    """EXTAUTHZ_DATABASE_URL and EXTAUTHZ_GRPC_ADDR are read under exactly those names."""
    s = load_settings(
        environ={"EXTAUTHZ_DATABASE_URL": "memory://", "EXTAUTHZ_GRPC_ADDR": "127.0.0.1:7000"}
    )
    assert (s.db_url, s.grpc_addr) == ("memory://", "127.0.0.1:7000")


def test_environment_overrides_settings_file(tmp_path: Path) -> None:
    """File values apply, and EXTAUTHZ_* beats the file."""
    f = tmp_path / "s.yaml"
    f.write_text("grpc_workers: 8\nkey_headers: [x-key, authorization]\nkey_cache_ttl: 10s\n")
    s = load_settings(f, environ={"EXTAUTHZ_GRPC_WORKERS": "2"})
    assert (s.grpc_workers, s.key_headers, s.key_cache_ttl) == (2, ("x-key", "authorization"), 10.0)


def test_unknown_setting_in_file_names_file_and_line(tmp_path: Path) -> None:
    """A typo in the settings file is an error that says where."""
    f = tmp_path / "s.yaml"
    f.write_text("grpc_addr: 127.0.0.1:1\ngrpc_wrokers: 3\n")
    with pytest.raises(ConfigError, match=r"s\.yaml:2: unknown setting 'grpc_wrokers'"):
        load_settings(f, environ={})


def test_pepper_is_refused_in_settings_file(tmp_path: Path) -> None:
    """The pepper may only come from the environment or the pepper file, never settings."""
    f = tmp_path / "s.yaml"
    f.write_text("pepper: abcd\n")
    with pytest.raises(ConfigError, match="EXTAUTHZ_PEPPER"):
        load_settings(f, environ={})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EXTAUTHZ_GRPC_WORKERS": "zero"}, "not an integer"),
        ({"EXTAUTHZ_GRPC_WORKERS": "0"}, "at least 1"),
        ({"EXTAUTHZ_KEY_CACHE_TTL": "-1"}, "duration"),
        ({"EXTAUTHZ_KEY_HEADERS": "bad header"}, "not a valid header"),
        ({"EXTAUTHZ_KEY_HEADERS": ","}, "at least one"),
        ({"EXTAUTHZ_LOG_LEVEL": "loud"}, "debug, info"),
        ({"EXTAUTHZ_MODE": "grpcc"}, "grpc, http, both or bridge"),
    ],
)
def test_bad_values_are_clear_errors(env: dict[str, str], message: str) -> None:
    """Each bad value names the variable and what is wrong."""
    with pytest.raises(ConfigError, match=message):
        load_settings(environ=env)


def test_counters_urls_take_every_redis_scheme_and_a_bad_one_hides_its_password() -> None:
    """memory://, redis://, rediss:// and unix:// are counters URLs; anything else is a
    ConfigError that lists them and never shows the URL's password."""
    for url in (
        "memory://",
        "redis://h:6379/0",
        "rediss://u:p@h:6380/1?ssl_ca_certs=/ca.pem",
        "unix:///run/redis.sock?db=2",
    ):
        assert load_settings(environ={"EXTAUTHZ_COUNTERS_URL": url}).counters_url == url
    with pytest.raises(ConfigError, match=r"unix:///PATH") as refused:
        load_settings(environ={"EXTAUTHZ_COUNTERS_URL": "http://user:s3cret@h:6379/0"})
    assert "s3cret" not in str(refused.value)


def test_durations_parse_units() -> None:
    """Durations accept plain seconds and ms/s/m/h/d/w suffixes."""
    assert [parse_duration(x) for x in ("1.5", "250ms", "30s", "15m", "2h", "30d", "1w")] == [
        1.5,
        0.25,
        30,
        900,
        7200,
        2_592_000,
        604_800,
    ]
    with pytest.raises(ConfigError):
        parse_duration("soon")


def test_settings_repr_hides_pepper() -> None:
    """A pepper passed by environment never shows up in repr(settings)."""
    assert "deadbeef" not in repr(Settings(pepper="deadbeef" * 8))


def test_example_settings_file_is_valid() -> None:
    """config/extauthz.yaml, the documented example, loads without error."""
    root = Path(__file__).resolve().parents[2]
    load_settings(root / "config" / "extauthz.yaml", environ={})


def test_json_logs_are_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    """EXTAUTHZ_LOG_FORMAT=json: each record is a JSON object with ts, level, logger and
    message (and the traceback, when there is one)."""
    import json
    import logging

    from extauthz.telemetry.logs import configure

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure("info", "json")
    try:
        logging.getLogger("extauthz.test").warning("policy reloaded: %s", "abc")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("extauthz.test").exception("failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [(e["level"], e["logger"], e["message"]) for e in lines] == [
        ("warning", "extauthz.test", "policy reloaded: abc"),
        ("error", "extauthz.test", "failed"),
    ]
    assert "ValueError: boom" in lines[1]["exception"]
