"""The default command against real implementations nobody here wrote: FastVideo 0.2.1's cached
``get_rotary_pos_embed`` (its file from the PyPI wheel, fetched at test time, its three imports
shimmed) and diffusers 0.42.1's ``WanRotaryPosEmbed``. Each must pass with cases actually run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile

from helpers import check

FASTVIDEO = "fastvideo==0.2.1"
MODULE = "fastvideo/layers/rotary_embedding.py"
# FastVideo's own imports, replaced by the least that lets the module load outside FastVideo:
# get_sp_group is substituted by the check during every call anyway.
SHIMS = {
    "from fastvideo.distributed.parallel_state import get_sp_group": (
        "def get_sp_group():\n    raise RuntimeError('replaced by sp_rope.check during calls')"
    ),
    "from fastvideo.layers.custom_op import CustomOp": (
        "class CustomOp(torch.nn.Module):\n    @classmethod\n    def register(cls, name):\n"
        "        return lambda op: op"
    ),
    "from fastvideo.logger import init_logger": "from logging import getLogger as init_logger",
}


def _fastvideo_rope(tmp_path) -> str:
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", FASTVIDEO, "-d", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fetched.returncode == 0, f"could not fetch {FASTVIDEO} from the package index: {fetched.stderr[-800:]}"
    (wheel,) = tmp_path.glob("fastvideo-0.2.1-*.whl")
    source = zipfile.ZipFile(wheel).read(MODULE).decode()
    for line, shim in SHIMS.items():
        assert line in source, f"{MODULE} no longer imports {line!r}"
        source = source.replace(line, shim)
    path = tmp_path / "fastvideo_rotary_embedding.py"
    path.write_text(source)
    return str(path)


def _passes_with_cases(result, report, at_least: int, geometries: int) -> dict:
    assert result.code == 0, result
    summary = json.loads(report.read_text())["summary"]
    cases = json.loads(report.read_text())["cases"]
    ran = [c for c in cases if c["status"] == "passed" and c["config"] != "probe"]
    assert summary["failed"] == 0 and len(ran) >= at_least, (summary, len(ran))
    assert len({c["config"] for c in ran}) >= geometries, sorted({c["config"] for c in ran})
    return summary


def test_fastvideo_0_2_1_passes_the_default_check(tmp_path):
    impl = _fastvideo_rope(tmp_path)
    report = tmp_path / "report.json"
    result = check(
        "--nproc",
        "4",
        "--seed",
        "1",
        "--quiet",
        "--report",
        str(report),
        "--convention",
        "fastvideo",
        "--impl",
        f"{impl}:get_rotary_pos_embed",
        "--impl-cache",
        f"{impl}:_ROTARY_POS_EMBED_CACHE",
        timeout=600,
    )
    _passes_with_cases(result, report, at_least=200, geometries=6)


def test_diffusers_wan_rotary_pos_embed_passes_the_default_check(tmp_path):
    report = tmp_path / "report.json"
    result = check(
        "--nproc", "4", "--seed", "1", "--quiet", "--report", str(report), "--convention", "diffusers-wan", timeout=600
    )
    # diffusers expresses only an even flat split of float32 interleaved tables at start_frame 0,
    # with the default dim split and no factors: the plain breadth geometries.
    _passes_with_cases(result, report, at_least=12, geometries=3)
    assert re.search(r"^\d+ passed, 0 failed", result.out, re.M), result
