"""README "How the code is laid out" names every module of the package (issue 16): a module
added without saying what its one job is fails here."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_layout_section_names_every_module():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([A-Za-z_/]+)`", section))
    modules = {p.stem for p in (ROOT / "onnxprune").glob("*.py") if p.stem not in ("__init__", "__main__")}
    packages = {f"{p.name}/" for p in (ROOT / "onnxprune").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    missing = sorted((modules | packages) - named)
    assert not missing, f"README 'How the code is laid out' does not name: {missing}"
