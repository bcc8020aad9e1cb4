"""The gathering teacher forward: full-vocabulary log-probs at chosen ids on student prefixes.

vLLM's prompt_logprobs returns only the teacher's own top-k, but the OPD reward needs the teacher's
log-prob at each of the *student's* top-k ids, so this is a plain transformers forward. Memory is
bounded by running the body once and the output layer + log-softmax over chunks of positions
(chunk x vocab floats), so 12k-token responses with 150k vocabularies fit. A teacher too big for
one device is sharded with ``teacher.device_map: auto`` (accelerate's layer-wise placement).
"""

from __future__ import annotations

import copy
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
    student_entropy: np.ndarray | None = (
        None  # [T] float32, the student's full-vocabulary entropy (evaluation)
    )
    teacher_entropy: np.ndarray | None = None  # [T] float32, the teacher's (evaluation)


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
    student: Any = None,
) -> TeacherOutputs:
    """Teacher log-probs for one response on the student's prefixes (positions P-1 .. P+T-2). With
    ``student`` (a transformers model, evaluation only) also the full-vocabulary reverse KL
    sum_v p(v) (log p(v) - log q(v)) per position, over the same chunks."""
    device = model.get_output_embeddings().weight.device
    p = len(prompt_ids)
    ids = torch.from_numpy(np.concatenate([prompt_ids, response_ids]).astype(np.int64))[None].to(device)
    span = slice(p - 1, p - 1 + len(response_ids))
    hidden = model.base_model(input_ids=ids).last_hidden_state[0, span]
    s_hidden = None
    if student is not None:
        s_device = student.get_output_embeddings().weight.device
        s_hidden = student.base_model(input_ids=ids.to(s_device)).last_hidden_state[0, span]
    return head_outputs(model, hidden, response_ids, student_topk_ids, k, vocab, chunk, student, s_hidden)


def head_outputs(
    model: Any,
    hidden: torch.Tensor,
    response_ids: np.ndarray,
    student_topk_ids: np.ndarray,
    k: int,
    vocab: int,
    chunk: int,
    student: Any = None,
    student_hidden: torch.Tensor | None = None,
) -> TeacherOutputs:
    """The output layer + log-softmax over chunks of positions: ``hidden`` [T, d] holds the teacher's
    last hidden states that predict ``response_ids`` [T] (and the student's, for the full KL)."""
    device = hidden.device
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
        None if student is None else np.empty(t, np.float32),
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
            s_head = student.get_output_embeddings()
            ls = torch.log_softmax(s_head(student_hidden[s:e]).float()[:, :vocab], dim=-1).to(lp.device)
            out.full_kl[s:e] = (ls.exp() * (ls - lp)).sum(-1).cpu().numpy()
            out.student_entropy[s:e] = -(ls.exp() * ls).sum(-1).cpu().numpy()
            out.teacher_entropy[s:e] = -(lp.exp() * lp).sum(-1).cpu().numpy()
    return out


class GrowingResponse:
    """The teacher on a response that grows chunk by chunk (the in-flight rollout): its KV cache (HF
    ``DynamicCache``) is kept between chunks, so every position goes through the teacher once.

    ``extend(new ids, their student top-k)`` returns the teacher outputs at the new positions, equal
    to ``score_response`` on the whole response at those positions (to float rounding). ``fork``
    copies the state: a prompt's n samples share one prompt forward.
    """

    def __init__(self, model: Any, prompt_ids: np.ndarray, k: int, vocab: int, chunk: int = 1024):
        from transformers import DynamicCache

        if len(prompt_ids) == 0:
            raise OpdcacheError("the teacher needs a prompt of at least one token")
        self.model, self.k, self.vocab, self.chunk = model, k, vocab, chunk
        self.device = model.get_output_embeddings().weight.device
        self.cache = DynamicCache()
        self.pending = np.asarray(prompt_ids[-1:], dtype=np.int64)  # fed with the next chunk
        self.positions = 0  # response positions scored
        if len(prompt_ids) > 1:
            self._forward(np.asarray(prompt_ids[:-1], dtype=np.int64))

    @torch.no_grad()
    def _forward(self, ids: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(ids)[None].to(self.device)
        out = self.model.base_model(input_ids=x, past_key_values=self.cache, use_cache=True)
        return out.last_hidden_state[0]

    def fork(self) -> GrowingResponse:
        twin = copy.copy(self)
        twin.cache = copy.deepcopy(self.cache)
        return twin

    @torch.no_grad()
    def extend(self, response_ids: np.ndarray, student_topk_ids: np.ndarray) -> TeacherOutputs:
        """The last fed token predicts the first new one, so the new tokens but the last are fed now
        and the last waits for the next chunk."""
        t = len(response_ids)
        if t == 0:
            raise ValueError("GrowingResponse.extend needs at least one new position")
        ids = np.concatenate([self.pending, np.asarray(response_ids[:-1], dtype=np.int64)])
        self.pending = np.asarray(response_ids[-1:], dtype=np.int64)
        hidden = self._forward(ids)[-t:]
        self.positions += t
        return head_outputs(
            self.model, hidden, response_ids, student_topk_ids, self.k, self.vocab, self.chunk
        )
