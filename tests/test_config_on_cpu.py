"""YAML configs: typed, validated, with errors that name the file and key."""

from pathlib import Path

import pytest

from opdcache.config import load_config, read_run_config, to_yaml, write_run_config
from opdcache.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    configs = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_defaults_are_the_papers():
    cfg = load_config()
    assert (
        cfg.score.spec.gamma,
        cfg.score.spec.top_p,
        cfg.score.spec.w_drop,
        cfg.score.spec.w_base,
        cfg.score.spec.eps,
    ) == (
        0.7,
        0.95,
        0.01,
        0.5,
        1e-8,
    )
    b = cfg.budget
    assert (b.rho, b.step, b.margin, b.patience, b.min, b.max, b.initial) == (
        0.1,
        100,
        100,
        3,
        1024,
        12288,
        1024,
    )
    assert cfg.rollout.k == 16


@pytest.mark.parametrize(
    "text, message",
    [
        ("budget:\n  intial: 3\n", "budget.intial: unknown key; did you mean 'initial'"),
        ("scor:\n  gamma: 0.5\n", "scor: unknown key; did you mean 'score'"),
        ("score:\n  gamma: high\n", "score.gamma: expected float, got str 'high'"),
        ("rollout:\n  k: 1.5\n", "rollout.k: expected int, got float"),
        ("score:\n  metric: cosine\n", "score.metric: expected one of 'overlap'"),
        ("score:\n  gamma: 1.5\n", "score.gamma: expected >= 0 and <= 1, got 1.5"),
        ("budget:\n  initial: 100\n", "min <= initial <= max"),
        ("- a\n- b\n", "expected a mapping"),
        ("score: [1\n", "not valid YAML"),
        ("score:\n  variant: ../x\n", "score.variant"),
        ("rollout:\n  temperature: 0\n", "rollout.temperature: expected > 0, got 0"),
        ("train:\n  grad_accum: 4\n", "train.grad_accum: expected >= 1 and <= 1, got 4"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_overrides_and_resolved_round_trip(tmp_path):
    cfg = load_config(None, ["budget.initial=2048", "score.gamma=0.8", "models.student=/m/s"])
    assert cfg.budget.initial == 2048 and cfg.score.spec.gamma == 0.8 and cfg.models.student == "/m/s"
    write_run_config(tmp_path, cfg)
    assert read_run_config(tmp_path) == cfg
    assert "gamma: 0.8" in to_yaml(cfg)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["gamma"])
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_float_keys_accept_exponent_notation_that_yaml_reads_as_text():
    from opdcache.config import load_config

    assert load_config(None, ["train.lr=2e-4"]).train.lr == 2e-4
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=fast"])


def test_every_key_is_documented_and_the_docs_table_is_current(capsys):
    from pathlib import Path

    from opdcache.cli import main
    from opdcache.config import RunConfig, config_markdown
    from opdcache.fields import help_rows

    rows = list(help_rows(RunConfig))
    assert len(rows) > 50 and all(h for _, _, h in rows), [k for k, _, h in rows if not h]
    # every documented key is accepted by --set with its documented default, giving the defaults back
    import json

    assert load_config(None, [f"{k}={json.dumps(d)}" for k, d, _ in rows]) == RunConfig()
    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_markdown(), "regenerate: python -m opdcache.config > docs/config.md"
    with pytest.raises(SystemExit):
        main(["init", "--help"])
    out = capsys.readouterr().out
    assert "score.gamma" in out and "eq. 7" in out and "budget.patience" in out


def test_init_refuses_to_replace_a_different_config(tmp_path, capsys):
    from opdcache.cli import main

    run = tmp_path / "run"
    assert main(["init", str(run), "--set", "rollout.k=16"]) == 0
    before = (run / "config.yaml").read_text()
    assert main(["init", str(run), "--set", "rollout.k=16"]) == 0  # the same config: fine
    assert main(["init", str(run), "--set", "rollout.k=8"]) == 2
    assert "differs from" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == before
