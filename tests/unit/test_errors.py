"""errors.py: the bad-flag idiom and the CNI code names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from overlaycni import errors
from overlaycni.cni import shim
from overlaycni.errors import CNI_INVALID_CONFIG, ConfigError, FieldError, UsageError, cni_code

SRC = Path(errors.__file__).resolve().parent


@pytest.mark.parametrize(
    ("field", "shown"),
    [("lease-ttl", "--lease-ttl: is out of range"), ("NODE", "NODE: is out of range"), (None, "is out of range")],
)
def test_usage_error_names_the_flag_or_argument(field, shown):
    err = UsageError("is out of range", field=field)
    assert str(err) == err.message == shown
    assert err.field == field
    assert cni_code(err) == CNI_INVALID_CONFIG


def test_usage_error_reads_like_a_field_error():
    assert str(UsageError("bad", field="dns-service-ip")) == str(ConfigError(FieldError("dns-service-ip", "bad")))


def test_the_shim_uses_the_spec_codes_of_errors_py():
    # the shim is standard library only (copied verbatim), so it keeps its own names
    for name in ("INCOMPATIBLE_VERSION", "INVALID_ENV", "DECODE_FAILURE", "INVALID_CONFIG", "TRY_AGAIN_LATER", "NOT_AVAILABLE"):
        assert getattr(shim, name) == getattr(errors, "CNI_" + name)


def test_no_bare_cni_codes_in_src():
    bare = re.compile(r'CNIError\(\s*\d|["\']code["\']\s*:\s*\d|cni_code\s*=\s*\d')
    found = [
        f"{p.relative_to(SRC)}:{n}: {line.strip()}"
        for p in sorted(SRC.rglob("*.py"))
        if p.name != "errors.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if bare.search(line)
    ]
    assert found == []
