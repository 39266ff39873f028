"""One atomic commit of model + data, and the stale temp folders of killed runs.

The output's data file is named by its content (``NAME.<sha256[:16]>.data``): the same run
gives the same bytes and name, two writers with different data different names, and the
model is renamed last, so a model only ever points at its own data.  Real processes write
and read concurrently here; a SIGKILLed writer's temp folder is removed by the next run.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

import onnxprune
from builders import save
from onnxprune import _temps
from onnxprune.load import save_model
from test_bad_input import _cnn

# A writer process: saves model A or B (same graph, different weights, a marker in the
# doc string) onto one output with external data, again and again.
WRITER = textwrap.dedent("""
    import sys
    import numpy as np, onnx_ir as ir
    from onnxprune.load import save_model
    src, out, marker, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = ir.load(src)
    for v in model.graph.initializers.values():
        v.const_value = ir.tensor(np.full(v.const_value.shape, float(ord(marker)), np.float32), name=v.name)
    model.doc_string = marker
    for _ in range(n):
        save_model(model, out, external=True, validate=lambda p: None)
""")

# A writer whose validation never ends: SIGKILLed while its temp folder exists.
HANGING = textwrap.dedent("""
    import sys, time
    import onnx_ir as ir
    from onnxprune.load import save_model
    def hang(path):
        print("staged", flush=True)
        time.sleep(600)
    save_model(ir.load(sys.argv[1]), sys.argv[2], external=True, validate=hang)
""")


def _locations(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def _pair(out: Path) -> tuple[str, float] | None:
    """(the model's marker, the value its data holds), or None when the data file went
    away between the two reads (removed after a newer model replaced this one)."""
    proto = onnx.load(str(out), load_external_data=False)  # one read: marker and location together
    (location,) = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    try:
        raw = (out.parent / location).read_bytes()
    except FileNotFoundError:
        return None
    assert location == f"{out.name}.{hashlib.sha256(raw).hexdigest()[:16]}.data"
    return proto.doc_string, float(np.frombuffer(raw[:4], np.float32)[0])


def test_same_run_gives_same_bytes_and_one_data_file(tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.onnx"
    model = ir.load(str(src))
    save_model(model, out, external=True, validate=lambda p: None)
    first = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    save_model(model, out, external=True, validate=lambda p: None)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == first
    assert len(first) == 2


def test_a_new_write_removes_the_old_data_file_only_after_the_model(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_cnn(), str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.onnx"
    onnxprune.prune(src, out, ratio=0.25, round_to=1)
    (old,) = _locations(out)
    seen = []

    def validate(path: Path) -> None:  # the old pair is still in place while the new one is checked
        seen.append(sorted(p.name for p in out_dir.iterdir()))

    model, _ = onnxprune.prune(src, ratio=0.5, round_to=1)
    save_model(model, out, external=True, validate=validate)
    (new,) = _locations(out)
    assert new != old
    assert [n for n in seen[0] if not n.startswith(".")] == ["o.onnx", old]
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.onnx", new]


def test_two_writers_never_pair_a_model_with_the_others_data(tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.onnx"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writers = [subprocess.Popen([sys.executable, str(script), str(src), str(out), m, "150"], stderr=subprocess.PIPE, text=True)
               for m in "AB"]
    pairs = []
    while any(w.poll() is None for w in writers):  # a reader, all along
        if out.exists():
            pair = _pair(out)
            if pair is not None:
                pairs.append(pair)
    for w in writers:
        assert w.wait() == 0, w.stderr.read()
    pairs.append(_pair(out))
    assert pairs and all(value == float(ord(marker)) for marker, value in pairs), [
        p for p in pairs if p[1] != float(ord(p[0]))][:3]
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["o.onnx", *_locations(out)], names  # the loser's data file is gone, no temp folder


def _wait_for_line(proc: subprocess.Popen, line: str) -> None:
    assert proc.stdout.readline().strip() == line, proc.stderr.read()


def test_a_killed_runs_temp_folder_is_removed_by_the_next_run(tmp_path):
    src = save(_cnn(), tmp_path / "m.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = tmp_path / "hang.py"
    script.write_text(HANGING)
    killed = subprocess.Popen([sys.executable, str(script), str(src), str(out_dir / "a.onnx")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    alive = subprocess.Popen([sys.executable, str(script), str(src), str(out_dir / "b.onnx")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(killed, "staged")
        _wait_for_line(alive, "staged")
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        left = {p.name for p in out_dir.iterdir()}
        assert len(left) == 2 and all(n.startswith(f".onnxprune-{_temps._machine_tag()}-") for n in left), left
        save_model(ir.load(str(src)), out_dir / "c.onnx", external=False, validate=lambda p: None)
        names = {p.name for p in out_dir.iterdir()}
        assert names == {"c.onnx", *(n for n in left if f"-{alive.pid}-" in n)}, names  # the live one stays
    finally:
        alive.kill()
        alive.wait()


def test_old_or_foreign_temp_entries(tmp_path):
    """A foreign host's entry is removed only when older than a day; names onnxprune does
    not give are never touched; a legacy name (no pid) only by age."""
    day = _temps.STALE_AFTER
    entries = {
        ".onnxprune-0badc0de-12345-abcdefgh": (True, 2 * day),  # another host, old
        ".onnxprune-0badc0de-12345-abcdefg2": (False, 60),  # another host, recent: may be running
        ".onnxprune-zz7_a1b2.json": (True, 2 * day),  # legacy report temp file, old
        ".onnxprune-zz7_a1b3.json": (False, 60),
        ".onnxprune-notes": (False, 2 * day),  # not a name onnxprune gives
        "onnxprune-0badc0de-1-abcdefgh": (False, 2 * day),
    }
    now = time.time()
    for name, (_, age) in entries.items():
        p = tmp_path / name
        p.mkdir() if "json" not in name else p.write_text("{}")
        os.utime(p, (now - age, now - age))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mine = tmp_path / f".onnxprune-{_temps._machine_tag()}-{int(dead.stdout)}-abcdefgh"
    mine.mkdir()  # this host, a process that has exited: stale however young
    run = tmp_path / f"opr-{int(dead.stdout)}-abcdefgh"  # a run folder under TMPDIR, marked
    run.mkdir()
    _temps.mark(run)
    unmarked = tmp_path / f"opr-{int(dead.stdout)}-abcdefg2"  # someone else's, or not yet marked
    unmarked.mkdir()
    removed = {p.name for p in _temps.remove_stale(tmp_path)}
    assert removed == {n for n, (gone, _) in entries.items() if gone} | {mine.name, run.name}
    assert {p.name for p in tmp_path.iterdir()} == {n for n, (gone, _) in entries.items() if not gone} | {unmarked.name}


def test_a_killed_runs_tmpdir_folder_is_removed_by_the_next_run(tmp_path):
    """An unguarded run SIGKILLed mid-way leaves its private folder under TMPDIR; the next
    run with that TMPDIR removes it."""
    src = save(_cnn(), tmp_path / "m.onnx")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), ONNXPRUNE_NO_GUARD="1")
    cmd = [sys.executable, "-m", "onnxprune", str(src), str(tmp_path / "o.onnx"), "-q"]
    killed = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    while not any(tmp.glob("opr-*/" + _temps.RUN_MARKER)):
        assert killed.poll() is None, killed.stderr.read()
        time.sleep(0.01)
    killed.kill()
    killed.wait()
    (left,) = tmp.iterdir()
    assert left.name.startswith(f"opr-{killed.pid}-")
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert list(tmp.iterdir()) == []
