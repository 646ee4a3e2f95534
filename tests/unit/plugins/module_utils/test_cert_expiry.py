"""The probe's own reading of when certificates and CRLs end, against what cryptography
(the library the roles' own checks use) says of the same files."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ansible_collections.aphrodite.baremetal.plugins.module_utils._cert_expiry import (
    CertificateError,
    end_of,
    renewal_state,
)

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
KEY = ec.generate_private_key(ec.SECP256R1())
NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-ca")])


def _certificate(not_after: datetime.datetime, version: x509.Version = x509.Version.v3) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(NAME).issuer_name(NAME).public_key(KEY.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(NOW - datetime.timedelta(days=1))
               .not_valid_after(not_after))
    if version == x509.Version.v3:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(KEY, hashes.SHA256())


def _crl(next_update: datetime.datetime) -> x509.CertificateRevocationList:
    revoked = (x509.RevokedCertificateBuilder().serial_number(7).revocation_date(NOW - datetime.timedelta(days=2)).build())
    return (x509.CertificateRevocationListBuilder().issuer_name(NAME).last_update(NOW - datetime.timedelta(days=1))
            .next_update(next_update).add_revoked_certificate(revoked).sign(KEY, hashes.SHA256()))


@pytest.mark.parametrize("not_after", [
    datetime.datetime(2027, 1, 7, 8, 9, 10, tzinfo=UTC),   # UTCTime
    datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),
    datetime.datetime(2050, 1, 1, 0, 0, 0, tzinfo=UTC),    # GeneralizedTime from 2050 on (RFC 5280)
    datetime.datetime(2126, 6, 1, 0, 0, 1, tzinfo=UTC),
])
def test_the_end_of_a_certificate_as_cryptography_reads_it(not_after: datetime.datetime) -> None:
    cert = _certificate(not_after)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert end_of(pem) == cert.not_valid_after_utc == not_after
    assert end_of(cert.public_bytes(serialization.Encoding.DER)) == not_after


def test_haproxy_s_combined_file_is_read_for_its_first_certificate() -> None:
    leaf = _certificate(datetime.datetime(2027, 3, 1, tzinfo=UTC))
    ca = _certificate(datetime.datetime(2036, 3, 1, tzinfo=UTC))
    key = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    combined = (leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM) + key)
    assert end_of(combined) == leaf.not_valid_after_utc
    # The key first, as some tools write it: the certificate is still the one read.
    assert end_of(key + leaf.public_bytes(serialization.Encoding.PEM)) == leaf.not_valid_after_utc


def _der(tag: int, content: bytes) -> bytes:
    length = len(content)
    head = bytes([length]) if length < 0x80 else bytes([0x80 | ((length.bit_length() + 7) // 8)]) + length.to_bytes(
        (length.bit_length() + 7) // 8, "big")
    return bytes([tag]) + head + content


def _split(data: bytes) -> tuple[bytes, bytes]:
    """The first DER element's content and what follows it."""
    length, pos = data[1], 2
    if length & 0x80:
        count = length & 0x7F
        length, pos = int.from_bytes(data[2:2 + count], "big"), 2 + count
    return data[pos:pos + length], data[pos + length:]


def test_a_version_1_certificate() -> None:
    """cryptography writes only v3, so the [0] version is cut out of one (its signature no longer
    matters: only the dates are read)."""
    not_after = datetime.datetime(2028, 2, 29, 1, 2, 3, tzinfo=UTC)
    outer, _ = _split(_certificate(not_after).public_bytes(serialization.Encoding.DER))
    tbs, signature = _split(outer)
    assert tbs[0] == 0xA0
    _, without_version = _split(tbs)
    v1 = _der(0x30, _der(0x30, without_version) + signature)
    assert end_of(v1) == not_after


def test_the_next_update_of_a_crl_der_and_pem() -> None:
    crl = _crl(datetime.datetime(2027, 1, 5, 6, 7, 8, tzinfo=UTC))
    assert end_of(crl.public_bytes(serialization.Encoding.DER)) == crl.next_update_utc
    assert end_of(crl.public_bytes(serialization.Encoding.PEM)) == crl.next_update_utc


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x30\x82\xff\xff", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                                  b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"])
def test_what_is_no_certificate_is_named(data: bytes) -> None:
    with pytest.raises(CertificateError):
        end_of(data)


def test_renewal_state_at_the_margin(tmp_path: Path) -> None:
    due = tmp_path / "edge.pem"
    due.write_bytes(_certificate(NOW + datetime.timedelta(days=28, hours=23)).public_bytes(serialization.Encoding.PEM))
    later = tmp_path / "link.pem"
    later.write_bytes(_certificate(NOW + datetime.timedelta(days=29, hours=1)).public_bytes(serialization.Encoding.PEM))
    crl = tmp_path / "ca.crl"
    crl.write_bytes(_crl(NOW + datetime.timedelta(days=3)).public_bytes(serialization.Encoding.DER))
    assert renewal_state(str(due), 29, NOW) == "renew"
    assert renewal_state(str(later), 29, NOW) == "valid"
    assert renewal_state(str(later), 30, NOW) == "renew"
    assert renewal_state(str(crl), 2, NOW) == "valid" and renewal_state(str(crl), 4, NOW) == "renew"
    assert renewal_state(str(tmp_path / "missing.pem"), 29, NOW) == "absent"
    (tmp_path / "bad.pem").write_text("not a certificate")
    assert renewal_state(str(tmp_path / "bad.pem"), 29, NOW).startswith("unreadable (")
    # Without a clock given, the real one: a certificate of a year is valid at a month's margin.
    year = tmp_path / "year.pem"
    year.write_bytes(_certificate(datetime.datetime.now(UTC) + datetime.timedelta(days=365)).public_bytes(serialization.Encoding.PEM))
    assert renewal_state(str(year), 29) == "valid" and renewal_state(str(year), 366) == "renew"
