"""The device token reader: flag, then file, then ``$FWDFLEET_TOKEN``; bad files name themselves."""

from __future__ import annotations

import pytest

from fwdfleet.device_runtime.credentials import TOKEN_ENV, read_token, read_token_file
from fwdfleet.errors import ConfigError


def test_token_comes_from_flag_then_file_then_environment(tmp_path, monkeypatch) -> None:
    f = tmp_path / "token.txt"
    f.write_text("  from-file\n")
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert read_token("from-flag", f) == "from-flag"
    assert read_token(None, f) == "from-file"
    assert read_token(None, None) == "from-env"
    monkeypatch.delenv(TOKEN_ENV)
    assert read_token(None, None) is None


def test_missing_or_empty_token_file_is_an_error_naming_it(tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"empty\.txt is empty"):
        read_token(None, empty)
    with pytest.raises(ConfigError, match=r"cannot read the token file .*missing\.txt"):
        read_token_file(tmp_path / "missing.txt")
