"""The teacher stage: complete RUN/rollouts/ parts with teacher columns into RUN/cache/ parts.

    opdcache teacher RUN --round R

Before anything is computed: the student and teacher tokenizers must agree (ids and special
tokens; a different EOS is reported), and the teacher's output layer must cover the tokenizer
(padded rows are sliced off). Each completed cache part is written atomically, then its rollout
part is removed; a rerun skips parts already in the cache.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from opdcache.cache.shards import flat, manifest_path, read_cache_meta, read_cache_shard, write_cache_shard
from opdcache.config import RunConfig
from opdcache.errors import OpdcacheError
from opdcache.models.checkpoint import require_checkpoint, student_checkpoint
from opdcache.models.fingerprint import model_fingerprint
from opdcache.models.memory import release_gpu_memory
from opdcache.results import TeacherResult
from opdcache.rundir import RunDir
from opdcache.shard import WHOLE, Shard
from opdcache.teacher.compat import check_tokenizers, usable_vocab
from opdcache.teacher.forward import check_architecture, score_response


def load_teacher(path: str, dtype: str, device: str, device_map: str) -> Any:
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    torch_dtype = {
        "auto": torch.bfloat16 if cuda else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }.get(dtype)
    if torch_dtype is None:
        raise OpdcacheError(f"teacher.dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not device_map:
        model.to(("cuda" if cuda else "cpu") if device == "auto" else device)
    check_architecture(model)
    return model.eval()


class ResidentTeacher:
    """The teacher loaded once for all rounds of an ``opdcache run`` (its checkpoint never changes).

    On a GPU ``release`` drops it after each teacher stage, so the trainer and the next rollout engine
    get the memory; on CPU it stays loaded.
    """

    def __init__(self) -> None:
        self.model: Any = None
        self.key: tuple = ()
        self.fingerprint = ""

    def get(self, cfg: RunConfig, path: str = "") -> tuple[Any, str, float]:
        """(model, fingerprint, seconds spent loading it: 0 when it was resident); ``path``: another
        teacher checkpoint than models.teacher (the evaluation's), with the same teacher.* settings."""
        tc = cfg.teacher
        key = (path or cfg.models.teacher, tc.dtype, tc.device, tc.device_map)
        t0 = time.perf_counter()
        if self.model is None or key != self.key:
            self.model = None
            self.model = load_teacher(*key)
            self.key, self.fingerprint = key, model_fingerprint(key[0])
        return self.model, self.fingerprint, time.perf_counter() - t0

    def release(self) -> None:
        if torch.cuda.is_available():
            self.model = None
            release_gpu_memory()


def teacher_vocab(cfg: RunConfig, student: str) -> int:
    """Check the teacher against the student's tokenizer (before any compute); the usable vocabulary."""
    if not cfg.models.teacher:
        raise OpdcacheError("models.teacher is not set in the run config")
    return checked_vocab(cfg.models.teacher, student)


def checked_vocab(teacher: str, student: str) -> int:
    """``teacher_vocab`` for any teacher checkpoint (also the evaluation's)."""
    from transformers import AutoConfig, AutoTokenizer

    require_checkpoint(teacher, "teacher")
    s_tok, t_tok = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(teacher)
    for w in check_tokenizers(s_tok, t_tok, student, teacher):
        print(f"opdcache: warning: {w}", file=sys.stderr)
    return usable_vocab(AutoConfig.from_pretrained(teacher).vocab_size, len(t_tok), teacher)


def teacher_round(
    run: RunDir,
    r: int,
    cfg: RunConfig,
    progress: bool = True,
    teacher: ResidentTeacher | None = None,
    shard: Shard = WHOLE,
    *,
    student: Callable[[], str] | None = None,
) -> TeacherResult:
    """Complete round ``r``'s rollout parts that are not yet in the cache (with ``teacher``: a model kept
    loaded across rounds; without, one loaded for this call; with ``shard`` i/N, parts p mod N = i;
    ``student``: a call returning round r's checkpoint where the caller has it)."""
    run.require()
    todo = [
        p
        for p in run.shards(run.rollout_round(r))
        if shard.owns(run.part_index(p.name)) and not run.done("teacher", r, part=p.name)
    ]
    if not todo:
        if not run.shards(run.rollout_round(r)) and not run.shards(run.cache_round(r)):
            have = sorted(set(run.rounds(run.rollouts)) | set(run.rounds()))
            raise OpdcacheError(
                f"teacher --round {r}: round {r} has no rollout parts in {run.rollout_round(r)} (rounds "
                f"rolled out: {have or 'none'}); run `opdcache rollout {run.root} --round {r}` first"
            )
        return TeacherResult(r, 0)
    vocab = teacher_vocab(cfg, student() if student else student_checkpoint(run, cfg, r))
    for p in todo:  # unreadable rollout parts fail here, before the teacher is loaded
        read_cache_meta(p, rollout=True)
    resident = teacher or ResidentTeacher()
    model, t_fp, load_seconds = resident.get(cfg)

    total_pos = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"teacher round {r}", unit="part", disable=not progress)
    for part in todo:
        table, meta = read_cache_shard(part, rollout=True)
        if meta.k != cfg.rollout.k:
            raise OpdcacheError(f"{part}: written with k={meta.k}, config has rollout.k={cfg.rollout.k}")
        cols = {
            name: table.column(name).to_pylist()
            if name in ("prompt_id", "finish_reason")
            else table.column(name)
            for name in table.column_names
        }
        prompts = table.column("prompt_ids").to_numpy(zero_copy_only=False)
        resp_v, resp_off = flat(table.column("response_ids"))
        stud_v = flat(table.column("student_topk_ids"))[0].reshape(-1, meta.k)
        for name, ids in (
            ("prompt_ids", flat(table.column("prompt_ids"))[0]),
            ("response_ids", resp_v),
            ("student_topk_ids", stud_v),
        ):
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise OpdcacheError(
                    f"{part}: column {name!r} holds token id {int(ids.max())} (or {int(ids.min())}); "
                    f"the teacher tokenizer has {vocab} tokens"
                )
        topk_ids, topk_lp, sampled, on_s = [], [], [], []
        for i in range(table.num_rows):
            a, b = resp_off[i], resp_off[i + 1]
            o = score_response(
                model, prompts[i], resp_v[a:b], stud_v[a:b], meta.k, vocab, cfg.teacher.chunk_positions
            )
            topk_ids.append(o.topk_ids.reshape(-1))
            topk_lp.append(o.topk_logprobs.reshape(-1))
            sampled.append(o.sampled_logprob)
            on_s.append(o.on_student_topk.reshape(-1))
        cols.update(
            teacher_topk_ids=topk_ids,
            teacher_topk_logprobs=topk_lp,
            teacher_logprob=sampled,
            teacher_logprob_on_student_topk=on_s,
        )
        full = dataclasses.replace(meta, teacher_model=cfg.models.teacher, teacher_fingerprint=t_fp)
        total_pos += write_cache_shard(run.cache_round(r) / part.name, cols, full)
        part.unlink()
        manifest_path(part).unlink(missing_ok=True)  # the rollout part's integrity record goes with it
        bar.update(1)
        bar.set_postfix(tok_per_s=f"{total_pos / (time.perf_counter() - t0):.0f}")
    bar.close()
    del model
    resident.release()  # a GPU is handed back; on CPU a call-local teacher goes with this frame
    return TeacherResult(r, len(todo), total_pos, time.perf_counter() - t0, load_seconds)
