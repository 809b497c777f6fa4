"""CI runs the README's test command and nothing else."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == tests
    assert all(line.startswith(("set ", "cd ")) for line in ci_lines[:-1])
    for command in (main_job, tests):
        assert "torch==2.13.0" in command and "python3 -m venv" in command
