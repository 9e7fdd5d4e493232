"""Configuration: validation errors name the key and the problem; exit codes."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from typing import Any

import pytest

from smtpguard.config import Address, ConfigError, load, load_file

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_defaults_are_a_quick_start() -> None:
    c = load({})
    assert c.listen == (Address("127.0.0.1", 2525),)
    assert c.upstream is None
    assert c.metrics_listen == Address("127.0.0.1", 9325)
    assert c.session.help_local is True
    assert c.session.max_line_bytes == 512


def test_workers_default_to_one_per_usable_core() -> None:
    import os

    usable = len(os.sched_getaffinity(0))
    assert load({}).workers == usable
    assert load({"workers": "auto"}).workers == usable
    assert load({"workers": 3}).workers == 3
    with pytest.raises(ConfigError) as err:
        load({"workers": 0})
    assert err.value.key == "workers"


def test_full_example_config_loads() -> None:
    c = load_file(REPO / "config" / "smtpguard.yaml")
    assert c.listen == (Address("0.0.0.0", 25), Address("::", 25))
    assert c.upstream == Address("127.0.0.1", 10025)
    assert c.session.discard_keywords == frozenset({"ETRN", "DSN"})
    assert "MAIL" in c.session.help_topics
    assert c.timeouts.data_end_seconds == 600


def test_config_is_frozen() -> None:
    c = load({})
    with pytest.raises(AttributeError):
        c.upstream = Address("x", 1)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"listen": "127.0.0.1:70000"}, "listen", "port must be 0-65535"),
        ({"listen": ["127.0.0.1:25", "::1:25"]}, "listen[1]", "need brackets"),
        ({"listen": "[zz]:25"}, "listen", "not an IPv6 address"),
        ({"upstream": 25}, "upstream", "must be a 'host:port' string"),
        ({"upstream": "mx:0"}, "upstream", "port 0"),
        ({"metrics": {"listen": "localhost"}}, "metrics.listen", "missing port"),
        ({"metrics": {"port": 1}}, "metrics.port", "unknown key"),
        ({"help": {"local": "yes"}}, "help.local", "true or false"),
        ({"help": {"text": []}}, "help.text", "non-empty"),
        ({"pipelining": {"upstream": "fast"}}, "pipelining.upstream", "'auto' or 'serial'"),
        ({"limits": {"max_line_bytes": 10}}, "limits.max_line_bytes", "at least 64"),
        ({"timeouts": {"connect_seconds": -1}}, "timeouts.connect_seconds", "at least"),
        ({"timeouts": {"connect": 1}}, "timeouts.connect", "unknown key"),
        ({"lissten": "x"}, "lissten", "unknown key"),
        ({"hostname": "a b"}, "hostname", "without spaces"),
        ({"ehlo": {"discard_keywords": "SIZE"}}, "ehlo.discard_keywords", "list"),
        ({"upstream_connect": "later"}, "upstream_connect", "on_command"),
        ({"banner": "two\nlines"}, "banner", "one line"),
        ({"upstream_limits": {"max_sessions": -1}}, "upstream_limits.max_sessions", "at least"),
        ({"upstream_limits": {"queue": 1}}, "upstream_limits.queue", "unknown key"),
        ({"rates": {"ipv4_prefix": 33}}, "rates.ipv4_prefix", "at most 32"),
        ({"rates": {"connections_per_minute": 1.5}}, "rates.connections_per_minute", "whole"),
        ({"penalty_box": {"reply": 550}}, "penalty_box.reply", "421 or 554"),
        ({"penalty_box": {"reply": 421.0}}, "penalty_box.reply", "421 or 554"),
        ({"banner": "x" * 501}, "banner", "500 octets"),
        ({"rates": {"messages_per_minute": -1}}, "rates.messages_per_minute", "at least"),
        ({"rates": {"recipients_per_minute": "x"}}, "rates.recipients_per_minute", "number"),
        ({"penalty_box": {"violations": "many"}}, "penalty_box.violations", "number"),
    ],
)
def test_errors_name_the_key_and_the_problem(
    raw: dict[str, object], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(raw)
    assert info.value.key == key
    assert fragment in info.value.problem


def test_invalid_yaml_names_the_line(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("listen: [127.0.0.1:25\nupstream: x\n")
    with pytest.raises(ConfigError) as info:
        load_file(f)
    assert info.value.key == "file"
    assert "line" in info.value.problem


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smtpguard", *args], capture_output=True, text=True, timeout=60
    )


def test_check_command_exit_codes(tmp_path: pathlib.Path) -> None:
    good = run_cli("check", "--config", str(REPO / "config" / "smtpguard.yaml"))
    assert good.returncode == 0, good.stderr
    assert "config OK" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: 127.0.0.1:25\nlimits:\n  max_line_bytes: many\n")
    result = run_cli("check", "--config", str(bad))
    assert result.returncode == 2
    assert "limits.max_line_bytes: must be a number" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run_cli("check", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "file: cannot read" in missing.stderr


def test_serve_refuses_a_bad_config_before_listening(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: nowhere\n")
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "listen: missing port" in result.stderr


def test_a_listener_may_have_its_own_upstreams() -> None:
    c = load(
        {
            "listen": [
                "127.0.0.1:25",
                {"address": "127.0.0.1:587", "upstream": ["10.0.0.1", "10.0.0.2:2525"]},
                {"address": "127.0.0.1:465", "upstream": "10.0.0.3:465", "tls": "none"},
            ],
            "upstream": "10.0.0.9:25",
        }
    )
    assert [spec.upstreams for spec in c.listeners] == [
        (),
        (Address("10.0.0.1", 25), Address("10.0.0.2", 2525)),
        (Address("10.0.0.3", 465),),
    ]
    for raw, key in (
        ({"address": "127.0.0.1:587", "upstream": []}, "listen[0].upstream"),
        ({"address": "127.0.0.1:587", "upstream": ["10.0.0.1:0"]}, "listen[0].upstream[0]"),
        ({"address": "127.0.0.1:587", "upstrem": "x"}, "listen[0].upstrem"),
    ):
        with pytest.raises(ConfigError) as err:
            load({"listen": [raw]})
        assert err.value.key == key


@pytest.fixture
def pem(tmp_path: pathlib.Path) -> dict[str, str]:
    import trustme

    leaf = trustme.CA().issue_cert("guard.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return {"certificate": str(cert), "key": str(key)}


@pytest.mark.parametrize(
    ("section", "extra", "key", "fragment"),
    [
        ("tls", {"groups": ["X25519", "X9999"]}, "tls.groups", "X9999"),
        ("tls", {"groups": "P-256:nope"}, "tls.groups", "nope"),
        ("tls", {"groups": []}, "tls.groups", "list of group names"),
        ("tls", {"groups": ["P-256\u00e9"]}, "tls.groups", "P-256"),
        ("upstream_tls", {"groups": ["P-256\u00e9"]}, "upstream_tls.groups", "P-256"),
        ("tls", {"ciphers": "NOPE-CIPHER"}, "tls.ciphers", "NOPE-CIPHER"),
        ("upstream_tls", {"groups": ["X9999"]}, "upstream_tls.groups", "X9999"),
        ("upstream_tls", {"ciphers": "NOPE-CIPHER"}, "upstream_tls.ciphers", "NOPE-CIPHER"),
    ],
)
def test_tls_groups_and_ciphers_are_checked_naming_the_key(
    pem: dict[str, str], section: str, extra: dict[str, object], key: str, fragment: str
) -> None:
    raw: dict[str, object] = {"tls": pem}
    raw[section] = {**(pem if section == "tls" else {"mode": "opportunistic"}), **extra}
    with pytest.raises(ConfigError) as info:
        load(raw)
    assert info.value.key == key
    assert fragment in info.value.problem


def test_tls_defaults_are_mozilla_intermediate(pem: dict[str, str]) -> None:
    from smtpguard.config import server_context

    config = load({"tls": pem})
    assert config.tls is not None and config.tls.groups == ("X25519", "P-256", "P-384")
    names = {c["name"] for c in server_context(config.tls).get_ciphers()}
    tls12 = {n for n in names if not n.startswith("TLS_")}
    assert tls12 and all(n.startswith("ECDHE-") for n in tls12)
    # AEAD only: no CBC suite (ECDHE-RSA-AES128-SHA256 and the like).
    assert all("-GCM-" in n or "CHACHA20" in n for n in tls12), tls12


def test_workers_share_one_ticket_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each context used to get OpenSSL's random ticket keys: a client resumed
    # only when its next connection reached the same worker.
    from smtpguard import tlsctx

    shared = bytes(range(80))
    monkeypatch.setattr(tlsctx, "_PROCESS_TICKET_KEYS", None)
    monkeypatch.setenv(tlsctx.TICKET_KEYS_ENV, shared.hex())
    assert tlsctx.ticket_keys() == shared
    monkeypatch.setattr(tlsctx, "_PROCESS_TICKET_KEYS", None)
    monkeypatch.delenv(tlsctx.TICKET_KEYS_ENV)
    made = tlsctx.ticket_keys()
    assert len(made) == 80 and made != shared and tlsctx.ticket_keys() == made


def test_the_store_section_defaults_to_no_store() -> None:
    store = load({}).store
    assert store.redis is None
    assert (store.timeout_seconds, store.retry_seconds, store.key_prefix) == (0.5, 2, "smtpguard:")
    loaded = load({"store": {"redis": "redis://10.0.0.5:6380/2", "timeout_seconds": 0.1}}).store
    assert loaded.redis == "redis://10.0.0.5:6380/2"
    assert loaded.timeout_seconds == 0.1
    assert loaded.configured
    sentinel = load(
        {"store": {"sentinel": {"service": "mail", "nodes": ["10.0.0.7", "[fd00::1]:26380"]}}}
    ).store
    assert sentinel.configured and sentinel.redis is None
    assert sentinel.sentinel_service == "mail"
    assert sentinel.sentinel_nodes == (Address("10.0.0.7", 26379), Address("fd00::1", 26380))


@pytest.mark.parametrize(
    ("store", "key", "problem"),
    [
        ({"redis": "http://cache:6379"}, "store.redis", "redis://"),
        ({"redis": 6379}, "store.redis", "URL"),
        ({"timeout_seconds": 0}, "store.timeout_seconds", "at least"),
        ({"retry_seconds": "soon"}, "store.retry_seconds", "number"),
        ({"key_prefix": "a{b}"}, "store.key_prefix", "braces"),
        ({"sentinel": "x"}, "store.sentinel", "mapping"),
        ({"sentinel": {"service": "m"}}, "store.sentinel.nodes", "list"),
        ({"sentinel": {"nodes": ["a:1"]}}, "store.sentinel.service", "name"),
        ({"sentinel": {"service": "m", "nodes": ["a:x"]}}, "store.sentinel.nodes[0]", "port"),
        (
            {"sentinel": {"service": "m", "nodes": ["a"], "port": 1}},
            "store.sentinel.port",
            "unknown",
        ),
        (
            {"redis": "redis://a", "sentinel": {"service": "m", "nodes": ["a"]}},
            "store.sentinel",
            "not both",
        ),
        ({"password": "x"}, "store.password", "unknown key"),
    ],
)
def test_a_bad_store_section_names_the_key(store: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load({"store": store})
    assert err.value.key == key
    assert problem in str(err.value)
