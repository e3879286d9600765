"""config.load(cache_dir=...): the phases read the parsed TOML from the run dir while the file is unchanged."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from pytest_mock import MockerFixture

from vzdump_hook import config
from vzdump_hook.errors import ConfigError

TEXT = ('[hook]\nphase_timeout = 30\n[defaults]\nstop_timeout = 5\n[guests.101]\n'
        'ssh = { host = "10.0.0.1", port = 2222 }\nstacks = ["db", { name = "web", stop_timeout = 7.5 }]\n')


def test_unchanged_file_is_not_parsed_again_and_gives_the_same_config(tmp_path: Path, mocker: MockerFixture) -> None:
    path = tmp_path / "config.toml"
    path.write_text(TEXT)
    first = config.load(str(path), cache_dir=str(tmp_path))
    assert oct((tmp_path / config.CACHE_FILE).stat().st_mode & 0o777) == "0o600"
    parse = mocker.patch("vzdump_hook.config.tomllib.load", side_effect=AssertionError("parsed again"))
    second = config.load(str(path), cache_dir=str(tmp_path))
    assert second == first and second.guests[101].stacks == first.guests[101].stacks
    assert dict(second.guests[101].table) == dict(first.guests[101].table)
    assert parse.call_count == 0


@pytest.mark.parametrize("edit", ["content", "same size", "invalid"])
def test_an_edited_file_is_parsed_again(tmp_path: Path, edit: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(TEXT)
    config.load(str(path), cache_dir=str(tmp_path))
    st = path.stat()
    if edit == "content":
        path.write_text(TEXT.replace("2222", "2223"))
        assert config.load(str(path), cache_dir=str(tmp_path)).guests[101].ssh.port == 2223  # type: ignore[union-attr]
    elif edit == "same size":  # same size, mtime set back: only the content tells
        path.write_text(TEXT.replace("2222", "2224"))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert config.load(str(path), cache_dir=str(tmp_path)).guests[101].ssh.port == 2224  # type: ignore[union-attr]
    else:
        path.write_text(TEXT + "[guests.102\n")
        with pytest.raises(ConfigError, match="not valid TOML"):
            config.load(str(path), cache_dir=str(tmp_path))


def test_no_cache_dir_or_an_unwritable_one_only_costs_a_parse(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(TEXT)
    assert config.load(str(path), cache_dir=str(tmp_path / "missing")).guests[101].ssh.port == 2222  # type: ignore[union-attr]
    assert not (tmp_path / "missing").exists()
    path.write_text(TEXT + '[guests.102]\nssh = { host = "h" }\nbogus = 2026-12-01\n')
    with pytest.raises(ConfigError):  # a TOML date cannot be cached as JSON: parsed, validated, reported
        config.load(str(path), cache_dir=str(tmp_path))
    assert not (tmp_path / config.CACHE_FILE).exists()
    assert tomllib.loads(path.read_text())["guests"]["102"]["bogus"].year == 2026
