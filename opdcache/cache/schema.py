"""The teacher-cache and score-file contract (docs/cache-format.md), enforced in code.

One row per response. Per-position columns are Arrow lists of length T (the response length);
top-k columns are *flat* lists of length T*k, position-major (position tau's k entries are
``[tau*k, (tau+1)*k)``). Log-probabilities are float32 rounded to fp16's 10-bit mantissa, which
keeps fp16 precision with fp32's range and lets Parquet's BYTE_STREAM_SPLIT + zstd store them in
~1.6 bytes. ``round`` is the hive partition key (``round=<r>`` directory), not a stored column.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

SCHEMA_VERSION = 1
CACHE_META_KEY = b"opdcache.cache"
ROLLOUT_META_KEY = b"opdcache.rollout"
SCORE_META_KEY = b"opdcache.score"
VARIANT_META_KEY = b"opdcache.variant"
LOGPROB_MANTISSA_BITS = 10

Extent = Literal["response", "position", "topk"]


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    extent: Extent  # "response": one value per row; "position": T values; "topk": T*k values
    doc: str

    @property
    def is_logprob(self) -> bool:
        return self.type == pa.list_(pa.float32())


_I32, _F32 = pa.list_(pa.int32()), pa.list_(pa.float32())

CACHE_COLUMNS: tuple[Column, ...] = (
    Column("prompt_id", pa.string(), "response", "id of the prompt in the prompt set"),
    Column("sample", pa.int32(), "response", "index of this response among the prompt's n samples"),
    Column("prompt_ids", _I32, "response", "prompt token ids (after templating)"),
    Column("response_ids", _I32, "position", "sampled response token ids y_1..y_T"),
    Column("finish_reason", pa.string(), "response", "'stop' (EOS) or 'length' (hit max_tokens)"),
    Column("max_tokens", pa.int32(), "response", "budget M_t the response was sampled under"),
    Column("student_logprob", _F32, "position", "rollout policy log p(y_tau)"),
    Column("student_topk_ids", _I32, "topk", "student top-k ids, by descending logprob"),
    Column("student_topk_logprobs", _F32, "topk", "student log p at student_topk_ids"),
    Column("teacher_topk_ids", _I32, "topk", "teacher top-k ids, by descending logprob"),
    Column("teacher_topk_logprobs", _F32, "topk", "teacher log q at teacher_topk_ids"),
    Column("teacher_logprob", _F32, "position", "teacher log q(y_tau)"),
    Column(
        "teacher_logprob_on_student_topk",
        _F32,
        "topk",
        "teacher log q (full-vocabulary normalised) at each student_topk_ids entry",
    ),
)

# RUN/rollouts/ parts hold the student side only; the teacher stage completes them into cache parts
ROLLOUT_COLUMNS = CACHE_COLUMNS[:9]
assert ROLLOUT_COLUMNS[-1].name == "student_topk_logprobs"

SCORE_KEY_COLUMNS = ("prompt_id", "sample")
SCORE_COLUMNS: tuple[Column, ...] = (
    Column("prompt_id", pa.string(), "response", "as in the cache"),
    Column("sample", pa.int32(), "response", "as in the cache"),
    Column("overlap", _F32, "position", "eq. 6 overlap O_tau (metric overlap/none/random)"),
    Column("accept", pa.list_(pa.bool_()), "position", "App. A.10 acceptance (metric top_p)"),
    Column("bad", pa.list_(pa.bool_()), "position", "eq. 7 bad event B_tau (pruned, for random)"),
    Column("reliability", _F32, "position", "eq. 9 R_tau"),
    Column("weight", _F32, "position", "eq. 10 L_tau"),
    Column("effective_len", pa.int32(), "response", "eq. 12 E"),
    Column(
        "outcome", pa.float32(), "response", "outcome reward 0/1: the run's checker on the decoded response"
    ),
    Column(
        "grpo_advantage", pa.float32(), "response", "GRPO advantage of the outcome over the prompt's samples"
    ),
)
OUTCOME_COLUMNS = ("outcome", "grpo_advantage")  # only in variants scored with an outcome checker

CACHE_BY_NAME = {c.name: c for c in CACHE_COLUMNS}
SCORE_BY_NAME = {c.name: c for c in SCORE_COLUMNS}


@dataclass(frozen=True)
class CacheMeta:
    """File-level metadata of a cache shard, stored as JSON under ``opdcache.cache``."""

    k: int
    student_model: str = ""
    student_fingerprint: str = ""
    teacher_model: str = ""
    teacher_fingerprint: str = ""
    tokenizer_fingerprint: str = ""
    schema_version: int = SCHEMA_VERSION
    # prompt_id -> gold answer of the part's prompts (the outcome reward's; empty in parts written
    # before it was recorded): the score stage grades without the prompt file, which may have moved
    answers: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: v for key, v in data.items() if key in known})


def cache_schema(
    meta: CacheMeta, columns: tuple[Column, ...] = CACHE_COLUMNS, key: bytes = CACHE_META_KEY
) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.type, nullable=False) for c in columns]).with_metadata(
        {key: meta.to_json()}
    )


def score_columns(metric: str, outcome: bool = False) -> tuple[Column, ...]:
    drop = {"overlap" if metric == "top_p" else "accept", *(() if outcome else OUTCOME_COLUMNS)}
    return tuple(c for c in SCORE_COLUMNS if c.name not in drop)
