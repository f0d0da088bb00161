"""The installed distribution: build a wheel, install it into an empty folder, import every module from there.

The development install is editable, and its finder (setuptools' `_EditableFinder`, put on sys.meta_path by
`__editable__.cogvx_mega-*.pth`) maps every module name to the source tree, so a module that a real install
lacks still imports in every other test. This one takes the editable finder off the import path of a fresh
interpreter (a `sitecustomize.py` on PYTHONPATH) and keeps the repository root off it (PYTHONSAFEPATH, cwd in
a temporary folder), so only what the wheel installed can import.

The expected modules come from the source tree at test time: cogvx_mega/**.py as cogvx_mega.*, data/**.py as
cogvx_mega.data.*, tools/**.py as cogvx_mega.tools.*, kernels/<op>/**.py as cogvx_mega.kernels.<op>.* (the
mapping of setup.py). setup.py once listed its packages by hand and left cogvx_mega.kernels.rope and
cogvx_mega.kernels.adaln out of non-editable installs; those two are checked by name.

The wheel is built from the repository in place, but with setuptools' build folder and egg-info redirected
into the test's temporary folder (DIST_EXTRA_CONFIG): the repository's build/ is left alone, so neither a
stale build/lib (setuptools never removes files from it: a module deleted or turned into a package would stay
in every later wheel) nor a concurrent build (pytest -n 2) can change what this test sees.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
REQUIRED = ("cogvx_mega.kernels.rope", "cogvx_mega.kernels.adaln")

# Source folder -> the package it installs as (see setup.py's discover_packages). kernels/ has no __init__.py:
# each kernels/<op>/ is cogvx_mega.kernels.<op>, beside cogvx_mega/kernels/ (the package itself, backend.py).
TREES = (("cogvx_mega", "cogvx_mega"), ("data", "cogvx_mega.data"), ("tools", "cogvx_mega.tools"),
         ("kernels", "cogvx_mega.kernels"))

# Takes the editable install off the import path: its meta-path finder, its path hook, and any __editable__
# entry of sys.path (the same approach as benchmarks/gpu_suite.py's rehearsal_shim).
SHIM = """\
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if '__editable__' not in repr(f) and '_EditableFinder' not in repr(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if 'Editable' not in repr(h) and '__editable__' not in repr(h)]
sys.path[:] = [p for p in sys.path if '__editable__' not in p]
sys.path_importer_cache.clear()
"""

# Runs in the interpreter under test: argv[1] the target folder, argv[2] a JSON list of module names,
# argv[3] where to write the JSON result (stdout is left to whatever the modules print).
PROBE = """\
import importlib, importlib.util, json, os, sys, traceback
site, names, out = os.path.realpath(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]

def under_site(path):
    return bool(path) and os.path.realpath(path).startswith(site + os.sep)

result = {
    "editable_finders": [repr(f) for f in sys.meta_path if '__editable__' in repr(f) or 'Editable' in repr(f)],
    "sys_path": list(sys.path),
}
import cogvx_mega
result["package_file"] = cogvx_mega.__file__
failed = {}
for name in names:
    try:
        if name.rsplit(".", 1)[-1] == "__main__":
            # a __main__ module runs its program when imported: find it and compile it, without running it
            spec = importlib.util.find_spec(name)
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r}")
            if not under_site(spec.origin):
                raise ImportError(f"{name} found at {spec.origin}, outside the target folder")
            spec.loader.get_code(name)
            continue
        importlib.import_module(name)
    except BaseException as error:  # SystemExit too: a module must not exit on import
        failed[name] = "".join(traceback.format_exception_only(type(error), error)).strip()
result["failed"] = failed
result["outside"] = sorted(
    f"{name}: {getattr(module, '__file__', None)}" for name, module in list(sys.modules.items())
    if (name == "cogvx_mega" or name.startswith("cogvx_mega.")) and module is not None
    and not under_site(getattr(module, "__file__", None)))
with open(out, "w") as handle:
    json.dump(result, handle)
"""


def expected_files() -> dict[str, str]:
    """{path inside the wheel (cogvx_mega/...py): source path} for every module of the source tree."""
    files: dict[str, str] = {}
    clashes = []
    for folder, package in TREES:
        base = ROOT / folder
        for source in sorted(base.rglob("*.py")):
            parts = source.relative_to(base).parts
            if "__pycache__" in parts or any(part.startswith(".") for part in parts):
                continue  # bytecode caches, editor and checkpoint files
            wheel_path = "/".join([*package.split("."), *parts])
            if wheel_path in files:
                clashes.append(f"{wheel_path}: {files[wheel_path]} and {source.relative_to(ROOT)}")
            files[wheel_path] = str(source.relative_to(ROOT))
    assert not clashes, "two source files install to the same place:\n" + "\n".join(clashes)
    return files


def module_name(wheel_path: str) -> str:
    parts = wheel_path[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def run(command: list, *, cwd: Path, env: dict, timeout: float, what: str) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        partial = expired.stdout or ""
        partial = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        pytest.fail(f"{what} ran past {timeout} s: {' '.join(map(str, command))}\n{partial[-4000:]}")
    assert done.returncode == 0, (
        f"{what} failed (exit {done.returncode}): {' '.join(map(str, command))}\n{done.stdout[-6000:]}")
    return done


@pytest.mark.timeout(600)
def test_wheel_installs_and_imports_every_module(tmp_path):
    timings = {}
    # 1. The wheel, with setuptools' build folder and egg-info in tmp_path instead of the repository. The
    # expected modules are read just before and just after the build; should the tree change in between
    # (someone editing the checkout), the build is done again, so the comparison is with what was built.
    build_config = tmp_path / "distutils.cfg"
    build_config.write_text(f"[build]\nbuild_base = {tmp_path / 'build'}\n"
                            f"[egg_info]\negg_base = {tmp_path}\n")
    build_env = dict(os.environ, DIST_EXTRA_CONFIG=str(build_config), PIP_DISABLE_PIP_VERSION_CHECK="1")
    build_env.pop("PYTHONPATH", None)
    started = time.perf_counter()
    for attempt in range(3):
        expected = expected_files()
        dist = tmp_path / f"dist{attempt}"
        shutil.rmtree(tmp_path / "build", ignore_errors=True)  # nothing of a previous attempt in the wheel
        run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
             str(ROOT)], cwd=tmp_path, env=build_env, timeout=150, what="building the wheel")
        if expected_files() == expected:
            break
    else:
        pytest.fail("the source tree changed during each of three wheel builds")
    timings["wheel"] = time.perf_counter() - started
    wheels = sorted(dist.glob("cogvx_mega-*.whl"))
    assert len(wheels) == 1, f"expected one cogvx_mega wheel in {dist}, found {[w.name for w in dist.iterdir()]}"
    wheel = wheels[0]

    by_name: dict[str, list[str]] = {}
    for path in expected:
        by_name.setdefault(module_name(path), []).append(expected[path])
    shadowed = {name: sources for name, sources in by_name.items() if len(sources) > 1}
    assert not shadowed, "a module and a package of the same name (the package shadows the module):\n" + "\n".join(
        f"  {name}: {' and '.join(sorted(sources))}" for name, sources in sorted(shadowed.items()))
    modules = sorted(by_name)
    for name in REQUIRED:
        assert name in modules, f"{name} is no longer in the source tree (kernels/{name.rsplit('.', 1)[1]}/)"

    # 2. What the wheel holds: exactly the source tree's modules, under cogvx_mega/ only.
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/", 1)[0] for name in names}
    stray = sorted(t for t in top if t != "cogvx_mega" and not t.endswith(".dist-info"))
    assert not stray, f"the wheel installs top-level names besides cogvx_mega: {stray}"
    shipped = {name for name in names if name.startswith("cogvx_mega/") and name.endswith(".py")}
    for name in REQUIRED:
        init = name.replace(".", "/") + "/__init__.py"
        if init not in shipped:
            pytest.fail(f"{name} is missing from the wheel ({init} not in {wheel.name}): setup.py does not "
                        f"install kernels/{name.rsplit('.', 1)[1]}/ (the bug of the hand-written package list)")
    missing = sorted(set(expected) - shipped)
    extra = sorted(shipped - set(expected))
    if missing or extra:
        pytest.fail(f"the wheel's cogvx_mega/ does not match the source tree\n"
                    f"missing from the wheel ({len(missing)}):\n"
                    + "".join(f"  {path}  (from {expected[path]})\n" for path in missing)
                    + f"in the wheel but not in the source tree ({len(extra)}):\n"
                    + "".join(f"  {path}\n" for path in extra))

    # 3. Install it into an empty folder.
    site = tmp_path / "site"
    started = time.perf_counter()
    run([PY, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        cwd=tmp_path, env=build_env, timeout=120, what="installing the wheel")
    timings["install"] = time.perf_counter() - started

    # 4. Import every module from there, with neither the editable install nor the repository on the path.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(shim)]), PYTHONSAFEPATH="1",
               PYTHONDONTWRITEBYTECODE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONHOME", None)
    result_file = tmp_path / "imports.json"
    started = time.perf_counter()
    done = run([PY, "-c", PROBE, str(site), json.dumps(modules), str(result_file)],
               cwd=tmp_path, env=env, timeout=300, what="importing from the installed wheel")
    timings["imports"] = time.perf_counter() - started
    result = json.loads(result_file.read_text())

    assert not result["editable_finders"], (
        f"the editable install's finder is still on sys.meta_path: {result['editable_finders']}")
    root = os.path.realpath(ROOT)
    on_path = [p for p in result["sys_path"] if p in ("", ".") or os.path.realpath(p) == root]
    assert not on_path, f"the repository root (or cwd) is on the subprocess's sys.path: {on_path}"
    package_file = os.path.realpath(result["package_file"])
    assert package_file.startswith(os.path.realpath(site) + os.sep), (
        f"cogvx_mega was imported from {result['package_file']}, not from the installed wheel in {site}")
    if result["failed"]:
        pytest.fail(f"{len(result['failed'])} of {len(modules)} modules do not import from the installed wheel:\n"
                    + "\n".join(f"  {name}: {line}" for name, line in sorted(result["failed"].items()))
                    + f"\n--- subprocess output ---\n{done.stdout[-3000:]}")
    if result["outside"]:
        pytest.fail("modules of cogvx_mega were imported from outside the installed wheel:\n  "
                    + "\n  ".join(result["outside"]))

    # 5. The console script pip wrote beside the packages.
    script = site / "bin" / "cogvx"
    assert script.is_file(), f"pip install --target wrote no console script {script}: {sorted(os.listdir(site))}"
    started = time.perf_counter()
    done = run([str(script), "--help"], cwd=tmp_path, env=env, timeout=120, what="`cogvx --help`")
    timings["cli"] = time.perf_counter() - started
    usage = done.stdout
    assert "usage:" in usage.lower(), f"`cogvx --help` printed no usage text:\n{usage}"
    assert re.search(r"(?<![\w-])train(?![\w-])", usage), f"`cogvx --help` lists no `train` command:\n{usage}"

    # `python -m <package>` of every package with a __main__.py (torchrun starts `python -m cogvx_mega.cli`).
    started = time.perf_counter()
    for name in modules:
        if name.endswith(".__main__"):
            package = name[: -len(".__main__")]
            done = run([PY, "-m", package, "--help"], cwd=tmp_path, env=env, timeout=120,
                       what=f"`python -m {package} --help`")
            assert "usage:" in done.stdout.lower(), f"`python -m {package} --help` printed no usage:\n{done.stdout}"
    timings["python -m"] = time.perf_counter() - started

    print("packaging timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
