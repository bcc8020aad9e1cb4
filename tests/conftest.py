import pytest

from opdcache.cache.synthetic import write_synthetic_run


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
