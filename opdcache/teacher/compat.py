"""Student/teacher compatibility checks, run before any compute or write."""

from __future__ import annotations

from typing import Any

from opdcache.errors import OpdcacheError


def check_tokenizers(student: Any, teacher: Any, student_name: str, teacher_name: str) -> list[str]:
    """Raise if the tokenizers disagree on the token -> id mapping or on special tokens other than EOS.

    A different EOS (e.g. a Base student ending on <|endoftext|>, an Instruct teacher on <|im_end|>)
    is legitimate but changes where responses stop; it is returned as a warning to report.
    """
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv) - set(tv))[:5]
        only_t = sorted(set(tv) - set(sv))[:5]
        moved = sorted(t for t in set(sv) & set(tv) if sv[t] != tv[t])[:5]
        raise OpdcacheError(
            f"tokenizer mismatch between student {student_name} ({len(sv)} tokens) and teacher {teacher_name} "
            f"({len(tv)} tokens): only in student {only_s}, only in teacher {only_t}, different ids {moved}. "
            "Top-k ids are compared across models, so both must share one vocabulary"
        )
    warnings = []
    for attr in ("bos_token_id", "pad_token_id", "unk_token_id"):
        a, b = getattr(student, attr, None), getattr(teacher, attr, None)
        if a is not None and b is not None and a != b:
            raise OpdcacheError(
                f"tokenizer mismatch: {attr} is {a} in student {student_name} but {b} in teacher {teacher_name}"
            )
    if student.eos_token_id != teacher.eos_token_id:
        warnings.append(
            f"EOS differs: student {student_name} ends on {student.eos_token!r} (id {student.eos_token_id}), "
            f"teacher {teacher_name} on {teacher.eos_token!r} (id {teacher.eos_token_id}); the teacher will "
            "score the student's EOS like any other token"
        )
    return warnings


def usable_vocab(model_vocab: int, tokenizer_len: int, name: str) -> int:
    """Rows of the output layer that are real tokens: padded embeddings are sliced off."""
    if model_vocab < tokenizer_len:
        raise OpdcacheError(
            f"{name}: output layer has {model_vocab} rows but the tokenizer has {tokenizer_len} tokens"
        )
    return tokenizer_len
