"""Paths that collide: a report, plot or JSON naming an input file, the output or its data
file, and outputs that would land on the input's files, are exit 2 before any work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import save
from test_bad_input import _cnn, expect_refusal


def _external(tmp_path: Path, name: str = "m.onnx", data: str = "m.onnx.data") -> tuple[Path, Path]:
    onnx.save(_cnn(), str(tmp_path / name), save_as_external_data=True, location=data, size_threshold=0)
    return tmp_path / name, tmp_path / data


@pytest.mark.parametrize("flag", ["--report", "--plot"])
@pytest.mark.parametrize("target", ["input", "symlink", "hardlink", "output", "output data", "input data"])
def test_side_output_collides(capsys, tmp_path, flag, target):
    src, data = _external(tmp_path)
    out = tmp_path / "o.onnx"
    paths = {
        "input": src, "output": out, "output data": tmp_path / "o.onnx.data", "input data": data,
        "symlink": tmp_path / "link.json", "hardlink": tmp_path / "hard.json",
    }
    if target == "symlink":
        os.symlink(src, paths[target])
    if target == "hardlink":
        os.link(src, paths[target])
    expect_refusal(capsys, tmp_path, [str(src), str(out), flag, str(paths[target])], [src, data], flag)


def test_existing_output_named_by_report(capsys, tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    out = save(_cnn(), tmp_path / "o.onnx")  # an earlier result: the report must not replace it
    expect_refusal(capsys, tmp_path, [str(src), str(out), "--report", str(tmp_path / "." / "o.onnx")], [src, out],
                   "is the output model")


def test_report_and_plot_on_one_path(capsys, tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    side = tmp_path / "side.out"
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--report", str(side), "--plot", str(side)],
                   [src], "--plot")


@pytest.mark.parametrize("where", ["missing", "under a file"])
def test_report_folder_unusable(capsys, tmp_path, where):
    src = save(_cnn(), tmp_path / "m.onnx")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    report = tmp_path / "no" / "r.json" if where == "missing" else blocker / "r.json"
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--report", str(report)], [src, blocker],
                   "--report")


def test_analyze_json_on_the_input(capsys, tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    expect_refusal(capsys, tmp_path, ["analyze", str(src), "--json", str(src)], [src], "--json")


def test_output_onto_input_external_data(capsys, tmp_path):
    src, data = _external(tmp_path)
    expect_refusal(capsys, tmp_path, [str(src), str(data)], [src, data], "external data file")


def test_input_named_like_output_data(capsys, tmp_path):
    # The input model is called what the output's data file will be: o.onnx -> o.onnx.data.
    src, data = _external(tmp_path, name="o.onnx.data", data="weights.bin")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx")], [src, data], "data file")


def test_input_data_named_like_output_data(capsys, tmp_path):
    src, data = _external(tmp_path, name="m.onnx", data="o.onnx.data")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx")], [src, data], "data file")


def test_report_written_atomically_beside_output(capsys, tmp_path):
    from onnxprune.cli import main

    src = save(_cnn(), tmp_path / "m.onnx")
    report = tmp_path / "r.json"
    assert main([str(src), str(tmp_path / "o.onnx"), "--report", str(report), "-q"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx", "r.json"]
    assert report.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _data(tmp_path: Path) -> dict[str, Path]:
    """A --calib folder, an --eval folder and a --labels file for the _cnn model."""
    rng = np.random.default_rng(0)
    paths = {"--calib": tmp_path / "calib", "--eval": tmp_path / "eval", "--labels": tmp_path / "labels.npy"}
    for flag in ("--calib", "--eval"):
        paths[flag].mkdir()
        np.save(paths[flag] / "s.npy", rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    np.save(paths["--labels"], np.arange(4) % 4)
    return paths


def _args(src: Path, out: Path, data: dict[str, Path], *extra: str) -> list[str]:
    return [str(src), str(out), *(a for flag, p in data.items() for a in (flag, str(p))), "-q", *extra]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flag", ["--calib", "--eval"])
@pytest.mark.parametrize("written", ["output", "--report", "--plot"])
def test_nothing_written_into_a_data_folder(capsys, tmp_path, flag, written):
    from onnxprune.cli import main

    src = save(_cnn(), tmp_path / "m.onnx")
    data = _data(tmp_path)
    os.symlink(data[flag], tmp_path / "link")  # the written path names the folder through a link
    target = tmp_path / "link" / ("o.onnx" if written == "output" else "side.out")
    out = target if written == "output" else tmp_path / "o.onnx"
    extra = [] if written == "output" else [written, str(target)]
    before = _files(tmp_path)
    code = main(_args(src, out, data, *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"inside the {flag} path" in err, err
    assert _files(tmp_path) == before


@pytest.mark.parametrize("written", ["output", "--report", "--plot"])
@pytest.mark.parametrize("how", ["same", "hardlink"])
def test_nothing_written_over_the_labels(capsys, tmp_path, written, how):
    from onnxprune.cli import main

    src = save(_cnn(), tmp_path / "m.onnx")
    data = _data(tmp_path)
    target = data["--labels"]
    if how == "hardlink":
        target = tmp_path / "hard.npy"
        os.link(data["--labels"], target)
    out = target if written == "output" else tmp_path / "o.onnx"
    extra = [] if written == "output" else [written, str(target)]
    before = _files(tmp_path)
    code = main(_args(src, out, data, *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--labels" in err, err
    assert _files(tmp_path) == before


def test_api_output_into_calib_folder(tmp_path):
    import onnxprune
    from onnxprune.errors import InputError

    src = save(_cnn(), tmp_path / "m.onnx")
    data = _data(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(InputError, match="inside the --calib path"):
        onnxprune.prune(src, data["--calib"] / "sub" / ".." / "o.onnx", calib=str(data["--calib"]))
    assert _files(tmp_path) == before


def test_data_beside_the_output_is_fine(capsys, tmp_path):
    """Writing next to a data folder (not into it) is allowed."""
    from onnxprune.cli import main

    src = save(_cnn(), tmp_path / "m.onnx")
    data = _data(tmp_path)
    assert main(_args(src, tmp_path / "o.onnx", data, "--report", str(tmp_path / "r.json"))) == 0, capsys.readouterr().err
    assert (tmp_path / "o.onnx").is_file() and (tmp_path / "r.json").is_file()


def test_case_folding_detection_on_this_filesystem(tmp_path):
    """ext4/tmpfs are case-sensitive: the probe says so and leaves nothing behind.  No
    case-folding filesystem can be mounted here (no vfat, kernel without ext4 casefold), so
    the folded comparisons below take the detection result as an argument."""
    from onnxprune import load

    assert load.case_insensitive(tmp_path) is False
    assert list(tmp_path.iterdir()) == []


def test_case_folded_comparisons(tmp_path):
    from onnxprune import load

    folds, keeps = (lambda _: True), (lambda _: False)
    a, b = tmp_path / "Out.onnx", tmp_path / "out.ONNX"  # neither exists yet
    assert load.same_path(a, b, fold=folds) and not load.same_path(a, b, fold=keeps)
    other = tmp_path / "sub"
    other.mkdir()
    assert not load.same_path(a, other / "out.onnx", fold=folds)  # another folder
    data = tmp_path / "OUT.onnx.0123456789ABCDEF.Data"
    assert load.is_output_data(a, data, fold=folds) and not load.is_output_data(a, data, fold=keeps)


def test_case_folding_filesystem_refuses_report_on_output(capsys, tmp_path, monkeypatch):
    """With the detection saying "folds case" (as on macOS or Windows), a report named like
    the output in another case is refused before any work."""
    from onnxprune import load

    monkeypatch.setattr(load, "case_insensitive", lambda folder: True)
    src = save(_cnn(), tmp_path / "m.onnx")
    expect_refusal(capsys, tmp_path, [str(src), str(tmp_path / "o.onnx"), "--report", str(tmp_path / "O.ONNX")], [src],
                   "is the output model")
