"""Bad input: exit 2 and one clear line naming the field and value, before any rank starts."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sp_rope.check import main

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
        (["--nproc", "0"], "--nproc must be >= 1, got 0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--timeout", "0"], "--timeout must be > 0"),
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
