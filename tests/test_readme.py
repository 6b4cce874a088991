"""The README's promises: its two commands are what CI runs, and its code example runs."""

import re
from pathlib import Path

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


def test_readme_python_example_runs():
    (example,) = re.findall(r"```python\n(.*?)```", README, re.S)
    exec(compile(example, "README.md", "exec"), {})
