"""Document lengths: one resolution rule (setting > $LONGCTX_DOCLENS > packaged), clear errors."""
import json

import pytest

from parallel.perf.workload import DOCLENS_ENV, PACKAGED_DOCLENS, fill, load_doclens


def test_packaged_default_then_variable_then_setting(tmp_path, monkeypatch):
    mine, theirs = tmp_path / "mine.json", tmp_path / "theirs.json"
    mine.write_text("[3, 4]")
    theirs.write_text("[5]")
    monkeypatch.delenv(DOCLENS_ENV, raising=False)
    assert load_doclens(None) == json.loads(PACKAGED_DOCLENS.read_text())
    monkeypatch.setenv(DOCLENS_ENV, "")  # empty counts as unset
    assert len(load_doclens(None)) > 1000
    monkeypatch.setenv(DOCLENS_ENV, str(theirs))
    assert load_doclens(None) == [5]
    assert load_doclens(str(mine)) == [3, 4]


@pytest.mark.parametrize("content, match", [
    (None, "do not exist"), ("dir", "not a file"), ("[1, 2", "not valid JSON"), ("{}", "non-empty JSON list"),
    ("[]", "non-empty"), ("[1, 0]", "positive ints"), ("[1.5]", "positive ints"), ('["7"]', "positive ints"),
])
def test_bad_files_name_the_setting_and_the_variable(tmp_path, monkeypatch, content, match):
    path = tmp_path / "lens.json"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    for via_env in (False, True):
        if via_env:
            monkeypatch.setenv(DOCLENS_ENV, str(path))
        with pytest.raises(ValueError, match=match) as err:
            load_doclens(None if via_env else str(path), "data.doclens")
        text = str(err.value)
        assert "data.doclens" in text and DOCLENS_ENV in text and str(path) in text
        assert ("$" + DOCLENS_ENV in text) == via_env  # says where the file came from


def test_fill_packs_exactly_and_cuts_the_last_document():
    draws = iter([5, 7, 9])
    assert fill(15, lambda: next(draws)) == [5, 7, 3]


def test_the_packaged_default_is_package_data():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["*"]
    assert PACKAGED_DOCLENS.name.endswith(".json") and "*.json" in patterns
    assert PACKAGED_DOCLENS.is_file() and PACKAGED_DOCLENS.parent.joinpath("__init__.py").is_file()
