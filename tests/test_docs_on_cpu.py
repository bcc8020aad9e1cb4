"""The front page stays a front page, and the documentation's links lead somewhere."""

import re
from pathlib import Path

import pytest

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


def bash_blocks(text: str) -> list[list[str]]:
    """The lines of each ```bash block in ``text``, continuation lines joined."""
    return [b.replace("\\\n", " ").splitlines() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def shell_block(doc: Path, heading: str) -> list[str]:
    """The commands of the first ```bash block under ``heading`` (comments dropped)."""
    block = bash_blocks(doc.read_text().split(heading, 1)[1])[0]
    return [" ".join(line.split("  #", 1)[0].split()) for line in block if line.strip()]


def run_as_printed(commands: list[str], where: Path) -> None:
    """Each command through the installed CLI in ``where`` (analysis/ and pipelines/ beside it): exit 0."""
    import os
    import subprocess
    import sys

    for folder in ("analysis", "pipelines"):
        (where / folder).symlink_to(ROOT / folder)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        p = subprocess.run(command, shell=True, cwd=where, env=env, capture_output=True, text=True)
        assert p.returncode == 0, f"{command}\n{p.stderr[-2000:]}"


def test_usage_try_it_without_any_model_runs_as_printed(tmp_path):
    """docs/usage.md's model-free walk-through, every line through the installed CLI in a fresh folder."""
    commands = shell_block(ROOT / "docs" / "usage.md", "## Try it without any model")
    assert len(commands) >= 8 and all(c.startswith("opdcache ") for c in commands)
    run_as_printed(commands, tmp_path)
    assert (tmp_path / "runs" / "demo" / "scores" / "topp").is_dir()


@pytest.mark.slow
def test_readme_pipeline_runs_as_printed_on_the_tiny_models(tmp_path, models, tiny_overrides):
    """README's stage-by-stage block: S and T become the tiny models, `init` gets the tiny sizes and
    `run` 2 rounds instead of 20; every other argument as printed."""
    (tmp_path / "prompts.jsonl").write_bytes((models / "prompts.jsonl").read_bytes())
    commands = shell_block(ROOT / "README.md", "## The pipeline")
    assert [c.split()[1] for c in commands] == [
        *("init", "rollout", "teacher", "score", "train", "budget", "run", "replay", "query", "report")
    ]
    sizes = " ".join(f"--set {s}" for s in tiny_overrides if not s.startswith(("models.", "data.")))
    commands[0] = f"{commands[0]} {sizes}".replace("=S ", f"={models / 'student'} ")
    commands[0] = commands[0].replace("=T ", f"={models / 'teacher'} ")
    commands = [c.replace("--rounds 20", "--rounds 2") for c in commands]
    run_as_printed(commands, tmp_path)
    run = tmp_path / "runs" / "r1"
    assert (run / "checkpoints" / "round=2").is_dir() and (run / "replays" / "g08").is_dir()
    assert any((tmp_path / "reports").rglob("*.md"))


@pytest.mark.slow
def test_usage_stages_then_pack_run_as_printed_on_the_tiny_models(tmp_path, models, tiny_overrides):
    """docs/usage.md's stage-by-stage block (/ckpt/student and /ckpt/teacher become the tiny models,
    `init` gets the tiny sizes), then its pack / unpack block on the run it made (/data -> ./data)."""
    (tmp_path / "prompts.jsonl").write_bytes((models / "prompts.jsonl").read_bytes())
    usage = ROOT / "docs" / "usage.md"
    stages = shell_block(usage, "## Rollout and teacher stages")
    assert [c.split()[1] for c in stages] == ["init", "rollout", "teacher", "score"]
    sizes = " ".join(f"--set {s}" for s in tiny_overrides if not s.startswith(("models.", "data.")))
    stages[0] = f"{stages[0]} {sizes}".replace("=/ckpt/student ", f"={models / 'student'} ")
    stages[0] = stages[0].replace("=/ckpt/teacher ", f"={models / 'teacher'} ")
    moving = [c.replace(" /data/", " data/") for c in shell_block(usage, "## Moving a run: pack and unpack")]
    assert [c.split()[1] for c in moving] == ["pack", "pack", "unpack"]
    run_as_printed([*stages, *moving, "opdcache verify data/runs/r1"], tmp_path)
    assert (tmp_path / "r1.tar.zst").is_file() and (tmp_path / "r1-cache.tar.zst").is_file()
    assert (tmp_path / "data" / "runs" / "r1" / "scores").is_dir()


def test_every_documented_command_parses(tmp_path, monkeypatch, capsys):
    """Every `opdcache ...` line in a ```bash block of README.md and docs/ (torchrun's `-m opdcache.cli`
    included) is accepted by the CLI's parser: no unknown option, no swapped or missing argument. Only
    an input file the reader supplies (a prompt file) may be missing here."""
    import shlex

    from opdcache.cli import build_parser

    (tmp_path / "pipelines").symlink_to(ROOT / "pipelines")
    monkeypatch.chdir(tmp_path)
    seen, wrong = 0, []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in bash_blocks(doc.read_text()):
            for line in block:
                m = re.search(r"(?:^|\s)(?:\.venv/bin/)?(?:opdcache|-m opdcache\.cli)\s+(.*)$", line)
                if not m:
                    continue
                seen += 1
                try:
                    build_parser().parse_args(shlex.split(m.group(1), comments=True))
                except SystemExit as e:
                    err = capsys.readouterr().err.strip().splitlines()
                    if e.code != 0 and not (
                        err and re.search(r"argument --data: \S+: no such file", err[-1])
                    ):
                        wrong.append(f"{doc.name}: {line.strip()} -> {err[-1] if err else e.code}")
    assert seen >= 40 and not wrong, "\n".join(wrong)
