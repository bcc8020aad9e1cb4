"""The front page stays a front page, and the documentation's links lead somewhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    first_screen = "\n".join(lines[:40])
    for command in ("./install.sh", "opdcache demo", "python -m pytest"):
        assert command in first_screen, command


def test_relative_links_resolve():
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken


def shell_block(doc: Path, heading: str) -> list[str]:
    """The commands of the first ```bash block under ``heading`` (comments dropped)."""
    text = doc.read_text().split(heading, 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_usage_try_it_without_any_model_runs_as_printed(tmp_path):
    """docs/usage.md's model-free walk-through, every line through the installed CLI in a fresh folder."""
    import os
    import subprocess
    import sys

    (tmp_path / "analysis").symlink_to(ROOT / "analysis")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = shell_block(ROOT / "docs" / "usage.md", "## Try it without any model")
    assert len(commands) >= 8 and all(c.startswith("opdcache ") for c in commands)
    for command in commands:
        p = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.returncode == 0, f"{command}\n{p.stderr[-2000:]}"
    assert (tmp_path / "runs" / "demo" / "scores" / "topp").is_dir()
