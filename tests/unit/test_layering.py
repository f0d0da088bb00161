"""Imports point one way (../shared/STYLE.md): config <- kernels <- diffusion, parallel, vae <- checkpoint <- model
<- training, data <- tools <- api, demo <- cli. Every import in the package counts, the lazy ones inside
functions too; parts of one level do not import each other."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# installed name -> folder (setup.py maps kernels/, data/ and tools/ into the package)
FOLDERS = {"cogvx_mega": ROOT / "cogvx_mega", "cogvx_mega.kernels": ROOT / "kernels",
           "cogvx_mega.data": ROOT / "data", "cogvx_mega.tools": ROOT / "tools"}
# the level of each part; an import may only point to a lower level (or within its own part)
LEVELS = {"config": 0, "kernels": 1, "diffusion": 2, "parallel": 2, "vae": 2, "checkpoint": 3, "model": 4,
          "training": 5, "data": 5, "tools": 6, "api": 7, "demo": 7, "cli": 8, "__init__": 8}


def modules():
    for package, folder in FOLDERS.items():
        for file in sorted(folder.rglob("*.py")):
            relative = file.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            yield ".".join([package, *parts]), file, file.name == "__init__.py"


def part_of(module: str) -> str:
    rest = module.split(".")[1:]
    return rest[0] if rest else "__init__"


def imported(module: str, file: Path, is_package: bool):
    tree = ast.parse(file.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names] if not node.module or node.level else [target]
            yield from (name for name in names if name.startswith("cogvx_mega"))
            if node.module and node.level:
                yield target
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("cogvx_mega"))


def test_imports_point_down():
    upward = []
    for module, file, is_package in modules():
        source = part_of(module)
        for target in imported(module, file, is_package):
            destination = part_of(target)
            if destination in LEVELS and destination != source and LEVELS[destination] >= LEVELS[source]:
                upward.append(f"{module} imports {target}")
    assert upward == [], "\n".join(sorted(set(upward)))


def test_every_part_has_a_level():
    assert {part_of(module) for module, _, _ in modules()} <= set(LEVELS)
