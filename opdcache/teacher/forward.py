"""The gathering teacher forward: full-vocabulary log-probs at chosen ids on student prefixes.

vLLM's prompt_logprobs returns only the teacher's own top-k, but the OPD reward needs the teacher's
log-prob at each of the *student's* top-k ids, so this is a plain transformers forward. Memory is
bounded by running the body once and the output layer + log-softmax over chunks of positions
(chunk x vocab floats), so 12k-token responses with 150k vocabularies fit. A teacher too big for
one device is sharded with ``teacher.device_map: auto`` (accelerate's layer-wise placement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opdcache.errors import OpdcacheError


@dataclass
class TeacherOutputs:
    topk_ids: np.ndarray  # [T, k] int32, by descending log-prob
    topk_logprobs: np.ndarray  # [T, k] float32
    sampled_logprob: np.ndarray  # [T] float32
    on_student_topk: np.ndarray  # [T, k] float32
    full_kl: np.ndarray | None = None  # [T] float32, KL(student || teacher) over the vocabulary (evaluation)


def check_architecture(model: Any) -> None:
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(cfg, attr, None):
            raise OpdcacheError(
                f"teacher config sets {attr}; the chunked forward assumes logits = lm_head(hidden)"
            )


@torch.no_grad()
def score_response(
    model: Any,
    prompt_ids: np.ndarray,
    response_ids: np.ndarray,
    student_topk_ids: np.ndarray,
    k: int,
    vocab: int,
    chunk: int = 1024,
    start: int = 0,
    student: Any = None,
) -> TeacherOutputs:
    """Teacher log-probs for one response on the student's prefixes (positions P-1 .. P+T-2); with
    ``start``, only for response positions ``start`` .. T-1 (the in-flight rollout's new chunk). With
    ``student`` (a transformers model, evaluation only) also the full-vocabulary reverse KL
    sum_v p(v) (log p(v) - log q(v)) per position, over the same chunks."""
    device = model.get_output_embeddings().weight.device
    p = len(prompt_ids)
    ids = torch.from_numpy(np.concatenate([prompt_ids, response_ids]).astype(np.int64))[None].to(device)
    span = slice(p - 1 + start, p - 1 + len(response_ids))
    hidden = model.base_model(input_ids=ids).last_hidden_state[0, span]
    if student is not None:
        s_head = student.get_output_embeddings()
        s_hidden = student.base_model(input_ids=ids.to(s_head.weight.device)).last_hidden_state[0, span]
    response_ids, student_topk_ids = response_ids[start:], student_topk_ids[start:]
    t = len(response_ids)
    head = model.get_output_embeddings()
    resp = torch.from_numpy(response_ids.astype(np.int64)).to(device)
    stud = torch.from_numpy(student_topk_ids.astype(np.int64)).to(device)
    out = TeacherOutputs(
        np.empty((t, k), np.int32),
        np.empty((t, k), np.float32),
        np.empty(t, np.float32),
        np.empty((t, k), np.float32),
        None if student is None else np.empty(t, np.float32),
    )
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        lp = torch.log_softmax(head(hidden[s:e]).float()[:, :vocab], dim=-1)
        top = lp.topk(k, dim=-1)
        out.topk_ids[s:e] = top.indices.cpu().numpy()
        out.topk_logprobs[s:e] = top.values.cpu().numpy()
        out.sampled_logprob[s:e] = lp.gather(1, resp[s:e, None])[:, 0].cpu().numpy()
        out.on_student_topk[s:e] = lp.gather(1, stud[s:e]).cpu().numpy()
        if student is not None:
            ls = torch.log_softmax(s_head(s_hidden[s:e]).float()[:, :vocab], dim=-1).to(lp.device)
            out.full_kl[s:e] = (ls.exp() * (ls - lp)).sum(-1).cpu().numpy()
    return out
