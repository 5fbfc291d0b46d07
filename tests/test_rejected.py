"""Rejected commands: exit 2 with a message, no traceback, and nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from imgfeat.cli.main import main
from imgfeat.core.errors import ConfigError
from imgfeat.core.workspace import check_name


def _image_root(tmp_path):
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / "a.jpg")
    return root


def _last_json(capsys) -> tuple[dict, str]:
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


@pytest.mark.quick
@pytest.mark.parametrize("kind", ["file", "devnull", "under_a_file"])
def test_a_workspace_that_is_a_file_or_a_device_exits_2(tmp_path, capsys, kind):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a workspace")
    target = {"file": a_file, "devnull": "/dev/null", "under_a_file": a_file / "ws"}[kind]
    root = _image_root(tmp_path)
    code = main(["scan", str(root), "--dataset", "d", "--workspace", str(target), "--json"])
    out, err = _last_json(capsys)
    assert code == 2 and "not a folder" in out["error"] and "Traceback" not in err
    assert a_file.read_text() == "not a workspace"


@pytest.mark.quick
def test_a_workspace_behind_a_broken_link_exits_2(tmp_path, capsys):
    link = tmp_path / "ws"
    link.symlink_to(tmp_path / "gone" / "away")
    code = main(["scan", str(_image_root(tmp_path)), "--dataset", "d", "--workspace", str(link), "--json"])
    out, err = _last_json(capsys)
    assert code == 2 and "broken symbolic link" in out["error"] and "Traceback" not in err


def test_a_rejected_command_does_not_create_a_mistyped_workspace(tmp_path, capsys):
    typo = tmp_path / "dtaa"
    assert main(["predict", "--head", "nope", "--dataset", "d", "--workspace", str(typo), "--json"]) == 2
    out, _ = _last_json(capsys)
    assert "unknown head" in out["error"]
    assert not typo.exists(), "runs/<id>.json created a mistyped workspace"


@pytest.mark.quick
@pytest.mark.parametrize(
    "command",
    [
        ["scan", "ROOT", "--dataset", "d"],
        ["run", "job.toml"],
        ["train", "--dataset", "d", "--featureset", "f"],
        ["predict", "--head", "h", "--dataset", "d"],
        ["report", "--head", "h"],
    ],
)
def test_wait_must_be_zero_or_more_seconds(tmp_path, capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--wait", "-5", "--workspace", str(tmp_path / "ws")])
    assert exc.value.code == 2 and "a number from 0 to" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


@pytest.mark.quick
@pytest.mark.parametrize("name", ["photos\n", "photos\r", "photos\n\n", "\nphotos"])
def test_names_with_a_newline_fail_the_name_check(name):
    with pytest.raises(ConfigError, match="invalid dataset name"):
        check_name("dataset", name)


@pytest.mark.quick
def test_a_bad_labels_csv_leaves_no_lock_files(ws, tmp_path):
    from imgfeat.scan.scan import ScanConfig, run_scan

    root = _image_root(tmp_path)
    bad = tmp_path / "labels.csv"
    bad.write_text("file,label\na.jpg,x\n")
    with pytest.raises(ConfigError, match="path,label"):
        run_scan(ws, ScanConfig(root, "d", labels_csv=bad), "r1")
    assert list(ws.root.rglob("*")) == [], "a rejected scan wrote files"
