"""The package as a user gets it: declared dependencies only, presets inside, nothing read from
outside the repository. (.ci/run also installs the built wheel into a fresh venv.)"""

from __future__ import annotations

import re
import sys

from helpers import REPO, run

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

WITHOUT_NUMPY = REPO / "tests" / "assets" / "without_numpy"


def test_check_runs_without_numpy_from_another_directory(tmp_path):
    # A stub numpy that fails to import stands in for a venv holding only torch and sp_rope.
    result = run(
        [
            sys.executable,
            "-m",
            "sp_rope.check",
            "--nproc",
            "2",
            "--quiet",
            "--config",
            "quick",
            "--schemes",
            "contiguous:t,zigzag",
            "--dtypes",
            "float64",
            "--layouts",
            "interleaved",
            "--start-frames",
            "0,17",
        ],
        env={"PYTHONPATH": str(WITHOUT_NUMPY)},
        cwd=tmp_path,
    )
    assert result.code == 0, result
    assert re.search(r"^[1-9]\d* passed, 0 failed", result.out, re.M), result


def test_the_numpy_stub_really_blocks_numpy(tmp_path):
    # Otherwise the test above would prove nothing.
    result = run([sys.executable, "-c", "import numpy"], env={"PYTHONPATH": str(WITHOUT_NUMPY)}, cwd=tmp_path)
    assert result.code != 0 and "numpy is blocked" in result.err, result


def test_wheel_packages_every_package_and_the_presets():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "sp_rope").rglob("__init__.py")}
    listed = set(setuptools["packages"])
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"
    assert setuptools["package-dir"]["sp_rope.configs"] == "configs"
    assert setuptools["package-data"]["sp_rope.configs"] == ["*.toml"]
    assert len(list((REPO / "configs").glob("*.toml"))) >= 6


def test_nothing_reads_outside_the_repository():
    shared = re.compile(r"\.\./shared|[\"']shared[\"']\s*/")
    offenders = []
    for path in [*REPO.glob("sp_rope/**/*.py"), *REPO.glob("tests/**/*.py"), *REPO.glob("examples/**/*.py"),
                 *REPO.glob("benchmarks/*"), REPO / ".ci" / "run", *REPO.glob("launch/*")]:
        if not path.is_file() or path.name == "test_packaging.py":
            continue
        depth = len(path.relative_to(REPO).parts) - 1  # Path(__file__).parents[depth] is the repo root
        for n, line in enumerate(path.read_text().splitlines(), 1):
            above = [int(k) for k in re.findall(r"parents\[(\d+)\]", line)]
            if shared.search(line) or any(k > depth for k in above):
                offenders.append(f"{path.relative_to(REPO)}:{n}")
    assert not offenders, offenders


def test_torch_has_no_upper_bound_and_numpy_is_not_declared():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.startswith("torch"))
    assert "<" not in torch_dep, torch_dep
    assert not any(d.startswith("numpy") for d in deps)
