"""Bad input: exit 2 and one clear line naming the field and value, before any rank starts."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import REPO

from sp_rope.check import main, parse_settings

GOOD_TOML = "grid = [4, 4, 4]\nhead_dim = 24\n"


def _run(argv, capsys) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sp_rope.check: "), err
    assert "Traceback" not in err and out == ""
    return lines[0]


def _toml(tmp_path, text: str) -> str:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("grid = [4, 4,\n", "invalid TOML"),
        (GOOD_TOML + "gird = [1]\n", "unknown key 'gird'"),
        ("grid = [4, 4, 4]\nrope_dim_list = [7, 8, 9]\n", "rope_dim_list[0] must be a positive even int, got 7"),
        ("grid = [4, 4, 4]\nhead_dim = 24\nrope_dim_list = [8, 8, 10]\n", "sums to 26, not the head dim 24"),
        ("grid = [4, -4, 4]\nhead_dim = 24\n", "grid sizes must be positive integers"),
        (
            GOOD_TOML + "theta_rescale_factor = [1.0, 2.0]\n",
            "theta_rescale_factor must be a scalar or have one value per axis",
        ),
        ("grid = [3, 5, 7]\nhead_dim = 24\n", "cannot be split by any requested SP size"),
        ('grid = [4, 4, 4]\nhead_dim = "abc"\n', "head_dim must be an integer, got 'abc'"),
        ("grid = [4, 4, 4]\nhead_dim = 24.9\n", "head_dim must be an integer, got 24.9"),
        ('grid = [4, 4, 4]\nrope_dim_list = [8, "a", 8]\n', "rope_dim_list[1] must be an integer, got 'a'"),
        ("grid = [4, true, 4]\nhead_dim = 24\n", "grid[1] must be an integer, got True"),
        (GOOD_TOML + 'theta_rescale_factor = [1, "a", 1]\n', "theta_rescale_factor[1] must be a number, got 'a'"),
        (GOOD_TOML + 'interpolation_factor = "half"\n', "interpolation_factor must be a number, got 'half'"),
        (GOOD_TOML + "start_frames = [0, 1.5]\n", "start_frames[1] must be an integer, got 1.5"),
        (GOOD_TOML + "name = 7\n", "name must be a string, got 7"),
        ("grid = [4, 100000000000, 4]\nhead_dim = 24\n", "has 1,600,000,000,000 tokens; at most 67,108,864"),
    ],
)
def test_bad_config_file(tmp_path, capsys, text, expected):
    argv = ["--config", _toml(tmp_path, text)]
    if "cannot be split" in expected:
        argv += ["--schemes", "zigzag,stripe"]
    assert expected in _run(argv, capsys)


def test_missing_config_file(capsys):
    assert "no such file '/nonexistent/x.toml'" in _run(["--config", "/nonexistent/x.toml"], capsys)


def test_unknown_preset_lists_presets(capsys):
    line = _run(["--config", "wan9"], capsys)
    assert "wan9" in line and "quick" in line


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--start-frames", "0,-1"], "start_frame must be >= 0, got -1"),
        (["--schemes", "contiguous:3"], "shard axis 3 out of range"),
        (["--schemes", "zigzag,spiral"], "unknown scheme 'spiral'"),
        (["--backend", "mpi"], "--backend: unknown value 'mpi'"),
        (["--dtypes", "bfloat16"], "--dtypes: unknown value 'bfloat16'"),
        (["--layouts", "rotated"], "--layouts: unknown value 'rotated'"),
        (["--nproc", "0"], "--nproc must be between 1 and 4096, got 0"),
        (["--nproc", "1099511627776"], "--nproc must be between 1 and 4096, got 1099511627776"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--timeout", "0"], "--timeout must be > 0"),
        (["--timeout", "inf"], "--timeout must be > 0 and <= 86400 seconds, got inf"),
        (["--timeout", "nan"], "--timeout must be > 0 and <= 86400 seconds, got nan"),
        (["--timeout", "1e300"], "--timeout must be > 0 and <= 86400 seconds, got 1e+300"),
        (["--report", ""], "--report: empty path"),
        (["--junit", " "], "--junit: empty path"),
        (["--start-frames", "a,b"], "--start-frames: expected comma-separated integers"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--convention", "megatron"], "--convention: unknown value 'megatron'"),
        (["--convention", "fastvideo"], "--convention fastvideo needs --impl"),
        (["--impl", "no_such_module_xyz:rope"], "cannot import 'no_such_module_xyz'"),
        (["--impl", "sp_rope.tables:no_such_fn"], "has no attribute 'no_such_fn'"),
        (["--impl", "missing_file.py:rope"], "no such file 'missing_file.py'"),
        (["--impl", "just_a_name"], "expected module:attr or path/to/file.py:attr"),
    ],
)
def test_bad_option(capsys, argv, expected):
    assert expected in _run(argv, capsys)


def test_nccl_without_a_gpu_per_rank(capsys):
    nproc = (torch.cuda.device_count() if torch.cuda.is_available() else 0) + 1
    line = _run(["--backend", "nccl", "--nproc", str(nproc)], capsys)
    assert "--backend nccl needs one GPU per rank" in line and f"{nproc} ranks" in line


def test_diffusers_convention_without_diffusers_says_how_to_install(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert "pip install -e '.[diffusers]'" in _run(["--convention", "diffusers-wan"], capsys)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def rope(:\n    pass\n", "failed at {path}:1: SyntaxError: invalid syntax"),
        ("import os\nraise RuntimeError('no GPU here')\n", "failed at {path}:2: RuntimeError: no GPU here"),
        ("import sys\n\nsys.exit(7)\n", "failed at {path}:3: SystemExit: 7 (sys.exit at import)"),
    ],
)
def test_impl_that_fails_to_import_names_file_and_line(tmp_path, capsys, source, expected):
    impl = tmp_path / "broken_rope.py"
    impl.write_text(source)
    line = _run(["--impl", f"{impl}:rope"], capsys)
    assert expected.format(path=impl) in line, line


@pytest.mark.parametrize(
    "where, expected",
    [
        ("missing/r.json", "directory '{tmp}/missing' does not exist"),
        ("a_file/r.json", "'{tmp}/a_file' is not a directory"),
        (".", "is a directory"),
        ("/proc/sp_rope_report.json", "cannot create files in '/proc'"),
    ],
)
@pytest.mark.parametrize("option", ["--report", "--junit"])
def test_unwritable_output_path_is_refused_before_launch(tmp_path, capsys, option, where, expected):
    (tmp_path / "a_file").write_text("not a directory")
    path = where if where.startswith("/") else str(tmp_path / where)
    line = _run([option, path], capsys)
    assert line.startswith(f"sp_rope.check: {option} {path!r}: ") and expected.format(tmp=tmp_path) in line, line


def test_output_path_check_leaves_an_existing_report_alone(tmp_path, capsys):
    report = tmp_path / "r.json"
    report.write_text("earlier report")
    _run(["--report", str(report), "--dtypes", "float16"], capsys)  # bad input: nothing runs
    assert report.read_text() == "earlier report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no probe left behind


def test_a_preset_named_twice_is_checked_once():
    quick = str(REPO / "configs" / "quick.toml")
    settings = parse_settings(["--config", "quick", "--config", quick, "--config", "quick-odd", "--config", "quick"], 4)
    assert [c.name for c in settings.matrix.configs] == ["quick", "quick-odd"]
