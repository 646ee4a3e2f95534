# Copyright: aphrodite.baremetal contributors
# Apache License 2.0 (see LICENSES/Apache-2.0.txt)
"""When a certificate or CRL runs out, read on the host without a library or a process.

The fast path's probe (plugins/modules/converged.py) asks this of every TLS file a role
renews: a certificate due for renewal is no drift on disk, so the record holds whether
each one is due, and the answer changing sends the host through its role.  Running
``openssl`` or a Python with ``cryptography`` for it cost a process each (``cryptography``
alone about 65 ms of CPU a call); the two dates sit at fixed places in the DER structure
(RFC 5280 4.1 and 5.1), so they are read here directly.
"""

from __future__ import annotations

import base64
import datetime
import re

_UTC = datetime.timezone.utc
_SEQUENCE = 0x30
_INTEGER = 0x02
_VERSION = 0xA0  # [0] EXPLICIT Version of a certificate
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_PEM = re.compile(rb"-----BEGIN (CERTIFICATE|X509 CRL)-----\s+(.+?)-----END \1-----", re.S)


class CertificateError(ValueError):
    """The file is no certificate or CRL this module can read."""


def _element(data: bytes, pos: int) -> tuple[int, int, int]:
    """Tag, start and end of the content of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise CertificateError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or pos + count > len(data):
            raise CertificateError("unsupported DER length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise CertificateError("truncated DER")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    found = []
    while start < end:
        element = _element(data, start)
        found.append(element)
        start = element[2]
    return found


def _time(data: bytes, element: tuple[int, int, int]) -> datetime.datetime:
    tag, start, end = element
    text = data[start:end].decode("ascii")
    if not text.endswith("Z"):
        raise CertificateError("a time that is not UTC: %s" % text)
    if tag == _UTC_TIME:  # YYMMDDHHMM[SS]Z; RFC 5280 4.1.2.5.1: 50-99 are 19xx
        year, rest = int(text[:2]), text[2:-1]
        year += 1900 if year >= 50 else 2000
    elif tag == _GENERALIZED_TIME:  # YYYYMMDDHHMMSS[.f]Z
        year, rest = int(text[:4]), text[4:-1].split(".")[0]
    else:
        raise CertificateError("no time where one belongs (tag 0x%02x)" % tag)
    second = int(rest[8:10]) if len(rest) >= 10 else 0
    return datetime.datetime(year, int(rest[0:2]), int(rest[2:4]), int(rest[4:6]), int(rest[6:8]), second, tzinfo=_UTC)


def _is_time(element: tuple[int, int, int]) -> bool:
    return element[0] in (_UTC_TIME, _GENERALIZED_TIME)


def end_of(data: bytes) -> datetime.datetime | None:
    """The end of validity of a certificate (notAfter) or of a CRL (nextUpdate, None when it has
    none), PEM (the first certificate or CRL block, as HAProxy's combined files hold it) or DER."""
    match = _PEM.search(data)
    if match:
        try:
            data = base64.b64decode(b"".join(match.group(2).split()), validate=True)
        except ValueError as exc:
            raise CertificateError("bad base64 in the PEM block") from exc
    elif data.lstrip().startswith(b"-----BEGIN"):
        raise CertificateError("a PEM file without a certificate or CRL")
    tag, start, end = _element(data, 0)
    if tag != _SEQUENCE:
        raise CertificateError("not DER: no outer SEQUENCE")
    tag, start, end = _element(data, start)  # tbsCertificate or tbsCertList
    if tag != _SEQUENCE:
        raise CertificateError("no to-be-signed SEQUENCE")
    parts = _children(data, start, end)
    # A CRL: [version INTEGER] signature issuer thisUpdate [nextUpdate] ...
    # A certificate: [[0] version] serial signature issuer validity ...
    first = 1 if parts and parts[0][0] in (_VERSION, _INTEGER) else 0
    if len(parts) > first + 2 and _is_time(parts[first + 2]) and parts[0][0] != _VERSION:
        following = parts[first + 3] if len(parts) > first + 3 else None
        return _time(data, following) if following is not None and _is_time(following) else None
    base = 1 if parts and parts[0][0] == _VERSION else 0
    if len(parts) <= base + 3 or parts[base + 3][0] != _SEQUENCE:
        raise CertificateError("no validity in the certificate")
    validity = _children(data, parts[base + 3][1], parts[base + 3][2])
    if len(validity) != 2:
        raise CertificateError("a validity without two times")
    return _time(data, validity[1])


def renewal_state(path: str, within_days: int, now: datetime.datetime | None = None) -> str:
    """``renew`` when the certificate or CRL at ``path`` ends within ``within_days`` days from
    now, ``valid`` when not (or, for a CRL, when it names no next update), ``absent`` or
    ``unreadable (why)`` otherwise."""
    now = now or datetime.datetime.now(_UTC)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return "absent"
    except OSError as exc:
        return "unreadable (%s)" % exc.strerror
    try:
        end = end_of(data)
    except (CertificateError, ValueError, UnicodeDecodeError) as exc:
        return "unreadable (%s)" % exc
    if end is None:
        return "valid"
    return "renew" if end < now + datetime.timedelta(days=within_days) else "valid"
