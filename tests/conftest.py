import json

import pytest

from opdcache.cache.synthetic import write_synthetic_run
from opdcache.models.tiny import build_tiny_model


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


def tiny_run_overrides(models) -> list[str]:
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


def write_rollout_parts(parts, dest_dir):
    """Student-only rollout parts (what `opdcache rollout` writes) made from existing cache parts."""
    from opdcache.cache.schema import ROLLOUT_COLUMNS
    from opdcache.cache.shards import read_cache_shard, write_cache_shard

    for part in parts:
        table, meta = read_cache_shard(part)
        cols = {c.name: table.column(c.name) for c in ROLLOUT_COLUMNS}
        write_cache_shard(dest_dir / part.name, cols, meta, rollout=True)
