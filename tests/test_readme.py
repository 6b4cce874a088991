"""The README's promises: its two commands are what CI runs, and its code example runs."""

import re
import sys
from pathlib import Path

from helpers import run

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", README, re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    install_and_check, install_and_test = _bash_blocks()[:2]
    assert install_and_check.endswith("python -m sp_rope.check")
    assert "pytest" in install_and_test
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci_lines


def _python_block(starting_with: str) -> str:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if b.startswith(starting_with)]
    return block


def test_readme_library_example_runs():
    exec(compile(_python_block("from sp_rope import RopeSpec"), "README.md", "exec"), {})


def test_readme_native_example_passes_the_check_as_documented(tmp_path):
    (tmp_path / "my_rope.py").write_text(_python_block("# my_rope.py"))
    command = re.search(r"`(python -m sp_rope.check --impl my_rope.py:rope[^`]*)`", README).group(1)
    result = run([sys.executable, *command.split()[1:], "--nproc", "2", "--quiet", "--config", "quick"], cwd=tmp_path)
    assert result.code == 0, result
