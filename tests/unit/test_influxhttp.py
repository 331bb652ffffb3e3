"""kvmfleet.influxhttp's pure logic: URL checks and their wording by each caller, redaction, scrubbing, auth
headers, a server's error text, the body size limit and the TLS defaults."""

from __future__ import annotations

import base64
import io
import logging
import ssl
from pathlib import Path

import pytest

from kvmfleet import influxhttp
from kvmfleet.audit.client import AuditError, Connection, InfluxQLClient
from kvmfleet.influxhttp import (
    MAX_ERROR_TEXT,
    CAFileError,
    Scrubber,
    URLProblem,
    auth_headers,
    check_url,
    endpoint,
    read_limited,
    redact_url,
    server_message,
    tls_context,
)
from kvmfleet.ship.writers import ShipConfigError, V1Writer, V2Writer

# ------------------------------------------------------------------------------------------------ URLs

@pytest.mark.parametrize("url", ["http://127.0.0.1:8086", "https://influx.example", "https://h:8086/influx/",
                                 "http://[::1]:8086", "HTTP://Influx:1/x"])
def test_good_urls_pass(url: str) -> None:
    parts = check_url(url)
    assert parts.scheme in ("http", "https") and parts.hostname


@pytest.mark.parametrize(("url", "kind", "message"), [
    ("http://h:99999", influxhttp.URL_UNPARSABLE, "bad url 'http://h:99999': Port out of range 0-65535"),
    ("http://h:port", influxhttp.URL_UNPARSABLE, "bad url 'http://h:port': Port could not be cast"),
    ("http://[::1", influxhttp.URL_UNPARSABLE, "bad url '<unparsable url>': Invalid IPv6 URL"),
    ("ftp://h", influxhttp.URL_NOT_HTTP, "url must be http(s)://host[:port][/path], got 'ftp://h'"),
    ("h:8086", influxhttp.URL_NOT_HTTP, "url must be http(s)://host[:port][/path], got 'h:8086'"),
    ("http:///path", influxhttp.URL_NOT_HTTP, "got 'http:///path'"),
    ("http://u:pw@h", influxhttp.URL_CREDENTIALS, "credentials do not belong in the url"),
    ("http://u@h", influxhttp.URL_CREDENTIALS, "credentials do not belong in the url"),
    ("http://@h", influxhttp.URL_CREDENTIALS, "credentials do not belong in the url"),
    ("http://h/?db=x", influxhttp.URL_QUERY, "the url must have no query string or fragment"),
    ("http://h/#x", influxhttp.URL_QUERY, "the url must have no query string or fragment"),
])
def test_bad_urls_say_why(url: str, kind: str, message: str) -> None:
    with pytest.raises(URLProblem) as exc:
        check_url(url)
    assert exc.value.kind == kind and message in str(exc.value)


@pytest.mark.parametrize("url", ["ftp://user:pw-SECRET@h", "http://user:pw-SECRET@h:99999", "http://user:pw-SECRET@h"])
def test_url_problems_never_show_the_password(url: str) -> None:
    with pytest.raises(URLProblem) as exc:
        check_url(url)
    assert "pw-SECRET" not in str(exc.value) and "pw-SECRET" not in exc.value.shown


@pytest.mark.parametrize(("url", "message"), [
    ("http://h:99999", "influxdb v1: bad url 'http://h:99999': Port out of range 0-65535"),
    ("ftp://h", "influxdb v1: url must be http(s)://host[:port][/path], got 'ftp://h'"),
    ("http://u:p@h", "influxdb v1: credentials do not belong in the url; use the secret file options"),
    ("http://h?db=kvm", "influxdb v1: the url must have no query string or fragment"),
])
def test_shipping_wording(url: str, message: str) -> None:
    with pytest.raises(ShipConfigError) as exc:
        V1Writer(url, "kvm")
    assert str(exc.value) == message
    with pytest.raises(ShipConfigError) as exc:
        V2Writer(url, "org", "bucket")
    assert str(exc.value) == message.replace("v1", "v2")


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://h", "--url 'ftp://h': expected http(s)://host[:port][/path]"),
    ("http://h:99999", "--url 'http://h:99999': expected http(s)://host[:port][/path]"),
    ("ftp://u:pw@h", "--url 'ftp://***@h': expected http(s)://host[:port][/path]"),
    ("http://u:p@h", "--url must not carry credentials: use --token-file or --username/--password-file"),
    ("http://h/#f", "--url must not carry a query string or fragment"),
])
def test_audit_wording(url: str, message: str) -> None:
    with pytest.raises(AuditError) as exc:
        InfluxQLClient(Connection(url=url, database="kvm"))
    assert str(exc.value) == message


@pytest.mark.parametrize(("url", "shown"), [
    ("https://h:8086/x", "https://h:8086/x"),
    ("https://user:pw@h:8086/x?q=1#f", "https://***@h:8086/x?q=1#f"),
    ("http://user@h", "http://***@h"),
    ("http://user:p@ss@h:1", "http://***@h:1"),
    ("http://user:pw@h:99999", "http://***@h:99999"),
    ("http://user:pw@[::1]:8086", "http://***@[::1]:8086"),
    ("http://[::1", "<unparsable url>"),
    ("not a url", "not a url"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_endpoint_keeps_the_url_path() -> None:
    assert endpoint("http://h:8086", "/query") == "/query"
    assert endpoint("http://h:8086/influx/", "/write", {"db": "kvm db", "rp": "a&b"}) == \
        "/influx/write?db=kvm+db&rp=a%26b"


# ------------------------------------------------------------------------------------------------ secrets

def test_auth_headers() -> None:
    assert auth_headers() == {}
    assert auth_headers(token="t0k") == {"Authorization": "Token t0k"}
    assert auth_headers(token="t0k", username="u", password="p") == {"Authorization": "Token t0k"}
    assert auth_headers(username="u", password="p:w") == {
        "Authorization": "Basic " + base64.b64encode(b"u:p:w").decode()}
    assert auth_headers(username="u") == {"Authorization": "Basic " + base64.b64encode(b"u:").decode()}
    assert auth_headers(username="", password="p") == {}


def test_scrubber_removes_secrets_and_their_basic_encoding() -> None:
    b64 = base64.b64encode(b"admin:Pa55-word").decode()
    scrub = Scrubber("Pa55-word", None, "", username="admin")
    text = f"denied for admin:Pa55-word (Authorization: Basic {b64}), again Pa55-word"
    assert scrub(text) == "denied for admin:*** (Authorization: Basic ***), again ***"
    assert Scrubber("tok")("Token tok") == "Token ***"
    assert Scrubber()("nothing to hide") == "nothing to hide"
    assert Scrubber(None, "")("a b") == "a b"


def test_scrubber_hides_a_longer_secret_before_a_shorter_one_inside_it() -> None:
    scrub = Scrubber("ab", "xxabxx")
    assert scrub("xxabxx and ab") == "*** and ***"


# ------------------------------------------------------------------------------------------------ answers

@pytest.mark.parametrize(("body", "text"), [
    (b'{"error":"database not found: \\"kvm\\""}', 'database not found: "kvm"'),
    (b'{"code":"unauthorized","message":"unauthorized access"}', "unauthorized access"),
    (b'{"error":"","message":"from message"}', "from message"),
    (b'{"code":"x"}', '{"code":"x"}'),
    (b"[1, 2]", "[1, 2]"),
    (b"  plain\n text\t\r\nover lines  ", "plain text over lines"),
    ("already text", "already text"),
    (b"", ""),
    (b'{"error": "two\\nlines"}', "two lines"),
])
def test_server_message(body: bytes | str, text: str) -> None:
    assert server_message(body) == text


def test_server_message_is_cut_with_dots() -> None:
    assert server_message("x" * MAX_ERROR_TEXT) == "x" * MAX_ERROR_TEXT
    cut = server_message("y" * (MAX_ERROR_TEXT + 1))
    assert cut == "y" * MAX_ERROR_TEXT + "..."
    huge = server_message(b'{"error": "' + b"z" * (50 << 20) + b'"}')  # 50 MiB: only the start is looked at
    assert len(huge) == MAX_ERROR_TEXT + 3 and huge.endswith("...")


def test_server_message_of_binary_and_hostile_bodies_is_one_printable_line() -> None:
    text = server_message(bytes(range(256)) * 4)
    assert text and text.isprintable() and len(text) <= MAX_ERROR_TEXT + 3
    assert server_message(b"\x1b[31mred\x1b[0m\x00") == "[31mred [0m"
    assert server_message(b"[" * 100_000).startswith("[[[")  # too deep for json: shown as text, no crash


def test_read_limited() -> None:
    assert read_limited(io.BytesIO(b"abc"), 3) == (b"abc", True)
    assert read_limited(io.BytesIO(b"abcd"), 3) == (b"abc", False)
    assert read_limited(io.BytesIO(b""), 3) == (b"", True)
    assert read_limited(io.BytesIO(b"a"), 0) == (b"", False)


# ------------------------------------------------------------------------------------------------ TLS

def test_tls_verifies_by_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ctx = tls_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert not caplog.records


def test_tls_off_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ctx = tls_context(False, "/no/such/ca.pem", who="influxdb-v1 https://h", off_by="verify_tls false")
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    assert [r.getMessage() for r in caplog.records] == [
        "influxdb-v1 https://h: TLS certificate verification is disabled (verify_tls false)"]


def test_tls_ca_file(tmp_path: Path) -> None:
    with pytest.raises(CAFileError, match=r"^'/no/such/ca\.pem' cannot be used: "):
        tls_context(ca_file="/no/such/ca.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(CAFileError, match=r"junk\.pem' cannot be used"):
        tls_context(ca_file=str(junk))
    with pytest.raises(ShipConfigError, match=r"^ca_file '.*junk\.pem' cannot be used: "):
        V1Writer("https://h", "kvm", ca_file=str(junk))
    with pytest.raises(AuditError, match=r"^--ca-file '.*junk\.pem' cannot be used: "):
        InfluxQLClient(Connection(url="https://h", database="kvm", ca_file=str(junk)))


def test_connection_to_https_verifies_unless_told() -> None:
    conn = influxhttp.KeepAliveConnection("https://h:8086")
    assert conn._tls is not None and conn._tls.verify_mode == ssl.CERT_REQUIRED
    assert influxhttp.KeepAliveConnection("http://h:8086")._tls is None


@pytest.mark.parametrize(("url", "credentials", "allow", "refused"), [
    ("http://db.example:8086", True, False, True),
    ("http://db.example:8086", True, True, False),
    ("http://db.example:8086", False, False, False),
    ("https://db.example:8086", True, False, False),
    ("http://127.0.2.7:8086", True, False, False),
    ("http://[::1]:8086", True, False, False),
])
def test_credentials_go_over_tls_or_stay_on_this_machine(url: str, credentials: bool, allow: bool,
                                                         refused: bool) -> None:
    if refused:
        with pytest.raises(influxhttp.URLProblem) as info:
            influxhttp.check_credentials_transport(url, credentials, allow)
        assert info.value.kind == influxhttp.URL_PLAIN_CREDENTIALS and "unencrypted" in str(info.value)
    else:
        influxhttp.check_credentials_transport(url, credentials, allow)


def test_the_audit_client_refuses_plain_http_credentials() -> None:
    with pytest.raises(AuditError, match="--allow-plain-http"):
        InfluxQLClient(Connection(url="http://db.example:8086", database="kvm", token="t0ken"))
    InfluxQLClient(Connection(url="http://db.example:8086", database="kvm", token="t0ken",
                              allow_plain_http=True)).close()
