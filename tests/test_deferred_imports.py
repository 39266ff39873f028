"""Start-up: sympy (imported by onnx_ir for symbolic-dim arithmetic) loads only when used."""

import subprocess
import sys
import textwrap

from onnxprune import _deferred

CHECK = textwrap.dedent(
    """
    import sys
    import onnxprune.cli
    loaded = [m for m in sys.modules if m == "sympy" or m.startswith("sympy.")]
    assert loaded == ["sympy"], loaded  # only the stand-in
    assert type(sys.modules["sympy"]).__name__ == "_StandIn"
    import onnx_ir as ir
    assert str(ir.SymbolicDim("N") + 1) == "N + 1"  # onnx_ir's arithmetic loads the real module
    import sympy
    from sympy import Symbol
    assert type(sys.modules["sympy"]).__name__ == "module"
    assert str(sympy.Max(Symbol("a"), 2)) == "Max(2, a)"
    import sympy.core.expr
    print("ok")
    """
)


def test_cli_import_leaves_sympy_unloaded_until_used():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_defer_is_a_no_op_for_missing_or_loaded_modules():
    before = dict(sys.modules)
    _deferred.defer("no_such_module_onnxprune_test")
    _deferred.defer("json")  # already imported here
    _deferred.defer("json.no_such_submodule")  # its package is imported: left alone
    assert "no_such_module_onnxprune_test" not in sys.modules
    assert sys.modules["json"] is before["json"]
    assert "json.no_such_submodule" not in sys.modules
