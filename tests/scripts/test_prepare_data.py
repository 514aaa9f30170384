"""prepare_data on bad input: a clear error naming the file (and line), and no output left
behind; a previous output is kept whole."""
import json
import os
import subprocess
import sys

import pytest

from scripts.prepare_data import prepare

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def entries(folder):
    return sorted(os.listdir(folder))


def test_malformed_jsonl_names_file_and_line_and_leaves_no_output(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps({"text": "fine"}) + "\n\n" + '{"text": "cut off\n')
    with pytest.raises(ValueError, match=r"a.jsonl:3 is not valid JSON \(Unterminated string"):
        prepare(str(src), str(tmp_path / "out"))
    assert entries(tmp_path) == ["in"], "no output folder, no temporary folder"
    (src / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:1 has no 'text' field; set --text-key"):
        prepare(str(src), str(tmp_path / "out"))
    (src / "a.jsonl").write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:1: field 'text' is int, not a string"):
        prepare(str(src), str(tmp_path / "out"))


def test_failed_run_keeps_the_previous_output_whole(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    first = prepare(str(src), str(tmp_path / "out"))
    before = {name: (tmp_path / "out" / name).read_bytes() for name in entries(tmp_path / "out")}
    (src / "b.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="b.jsonl:1"):
        prepare(str(src), str(tmp_path / "out"))
    assert {name: (tmp_path / "out" / name).read_bytes() for name in entries(tmp_path / "out")} == before
    assert entries(tmp_path) == ["in", "out"]
    (src / "b.jsonl").write_text(json.dumps({"text": "more"}) + "\n")
    assert prepare(str(src), str(tmp_path / "out"))["num_docs"] == first["num_docs"] + 1
    assert entries(tmp_path) == ["in", "out"]


@pytest.mark.parametrize("files", [{}, {"x.bin": b"\x00\x01", "y.png": b"\x89PNG"}])
def test_no_documents_is_an_error(tmp_path, files):
    src = tmp_path / "in"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    with pytest.raises(ValueError, match=rf"no documents found in .*in': it holds {len(files)} file\(s\), none of them "
                                         r"\.jsonl or \.txt, \.md, \.rst, \.py \(set --ext"):
        prepare(str(src), str(tmp_path / "out"))
    assert entries(tmp_path) == ["in"]


@pytest.mark.parametrize("data, message", [
    (bytes(range(256)) * 4, r"r.txt is not UTF-8 text \(byte 0x80 at offset 128\)"),
    (b"text\x00\x00\x00more", r"r.txt holds NUL bytes at offset 4: binary data"),
])
def test_non_text_input_is_reported(tmp_path, data, message):
    src = tmp_path / "in"
    src.mkdir()
    (src / "r.txt").write_bytes(data)
    with pytest.raises(ValueError, match=message):
        prepare(str(src), str(tmp_path / "out"))
    assert entries(tmp_path) == ["in"]


def test_output_folder_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.me").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a prepared token folder"):
        prepare(str(tmp_path / "in"), str(tmp_path / "out"))
    assert entries(tmp_path / "out") == ["keep.me"]


def test_command_line_error_is_one_line(tmp_path):
    (tmp_path / "in").mkdir()
    proc = subprocess.run([sys.executable, "-m", "scripts.prepare_data", str(tmp_path / "in"), str(tmp_path / "out")],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("prepare_data: no documents found") and "Traceback" not in proc.stderr
