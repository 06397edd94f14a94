"""Argument checks, in pure Python: the names of the divergences and reductions, the options'
types and values (of every op, through ``kdfused._options.parse``), the logit transform's options
(:func:`check_logit_transform`) and the tensors of :func:`kdfused.kd_loss`.

Used by the Python wrappers and by the pure-PyTorch specification (``kdfused.reference``), so
that both reject the same inputs with the same exception types and messages as the C++ ops
(``csrc/kdfused.cpp``: ``check_options`` / ``check_inputs``; ``csrc/kd_topk.cpp``; the label
range is checked by each backend before anything is computed). The C++ ops keep their own copy of
these checks: they are callable without Python (``torch.ops.kdfused.*``, the C++ build).

Exception types: a bad value is a ``ValueError``, a bad type (or dtype) a ``TypeError``, a device
mismatch a ``RuntimeError`` -- what ``TORCH_CHECK_VALUE`` / ``TORCH_CHECK_TYPE`` / ``TORCH_CHECK``
raise in Python.

Nothing here imports the compiled extension.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# Every divergence name lives here (the ops, the modules, the references and the tests read it).
DIVERGENCES = ("kl", "ce", "reverse_kl", "jsd", "tvd")
# Top-k distillation: over which buckets the two distributions are compared ("full": the student
# over the whole vocabulary; "renormalized": both over the teacher's valid entries; "tail": those
# entries plus one bucket each for the rest of the mass), and what the stored values are.
SUPPORTS = ("full", "renormalized", "tail")
VALUE_KINDS = ("logits", "logprobs")
# With support "full" the teacher has no probabilities outside its k entries while the student
# has: only the divergences weighted by the teacher's distribution are defined.
TOPK_DIVERGENCES = ("kl", "ce")
# The divergences that need the mixture of both distributions per row (a second exchange in the
# vocabulary-parallel path).
MIXING_DIVERGENCES = ("jsd", "tvd")
REDUCTIONS = ("batchmean", "mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)

# c10's names of the scalar types, as the C++ messages print them.
_C10_NAMES = {
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.float16: "Half",
    torch.float32: "Float",
    torch.float64: "Double",
    torch.bfloat16: "BFloat16",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype))


_DTYPE_LISTS = {
    FLOAT_DTYPES: "float16, bfloat16, float32 or float64",
    LABEL_DTYPES: "int64 or int32",
}


def check_dtype(name: str, x: torch.Tensor, allowed: tuple = FLOAT_DTYPES) -> None:
    """TypeError unless ``x``'s dtype is one of ``allowed`` (FLOAT_DTYPES or LABEL_DTYPES), in
    the C++ ops' words: ``kdfused: {name} must be float16, ..., got Float``."""
    if x.dtype not in allowed:
        raise TypeError(
            f"kdfused: {name} must be {_DTYPE_LISTS[allowed]}, got {_dtype_name(x.dtype)}"
        )


def _num(x: float) -> str:
    """A double as C++'s ostream prints it (6 significant digits, 'nan', 'inf')."""
    return format(float(x), "g")


def _shape(shape) -> str:
    return str(tuple(int(d) for d in shape))


def _quoted(names, sep: str = ", ") -> str:
    return sep.join(f"'{n}'" for n in names)


def effective_divergence(divergence: str, beta: float) -> str:
    """The generalised JSD's end points are the two KLs (as TRL and Liger define them): beta = 0
    is KL(p || q), beta = 1 is KL(q || p), computed by exactly those code paths."""
    if divergence == "jsd" and beta == 0.0:
        return "kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def check_tensor_types(who: str, required, optional=()) -> None:
    """``required``: (name, value) pairs that must be tensors; ``optional``: tensors or None."""
    for name, x in required:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a tensor, got {type(x).__name__}")
    for name, x in optional:
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a tensor or None, got {type(x).__name__}")


def check_logits_types(student_logits, teacher_logits, labels) -> None:
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise TypeError("kdfused: student_logits and teacher_logits must be tensors")
    check_tensor_types("kdfused", (), (("labels", labels),))


def check_option_types(
    who: str, temperature, soft_weight, hard_weight, divergence, beta, ignore_index, reduction
) -> None:
    """The options' Python types, for every op (``who`` starts the messages)."""
    for name, value in (
        ("temperature", temperature),
        ("soft_weight", soft_weight),
        ("hard_weight", hard_weight),
        ("beta", beta),
    ):
        # (int, float) rather than numbers.Real: torch.compile traces this check.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{who}: {name} must be a real number, got {type(value).__name__}")
    if not isinstance(divergence, str) or not isinstance(reduction, str):
        raise TypeError(f"{who}: divergence and reduction must be strings")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{who}: ignore_index must be an int, got {type(ignore_index).__name__}")


def check_options(
    temperature, soft_weight, hard_weight, divergence, beta, reduction, divergences=DIVERGENCES
) -> None:
    """The option values (csrc/kdfused.cpp: check_options; with ``divergences`` =
    TOPK_DIVERGENCES, csrc/kd_topk.cpp: the same order). Assumes check_option_types passed."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"kdfused: temperature must be finite and > 0, got {_num(temperature)}")
    if not (math.isfinite(soft_weight) and soft_weight >= 0):
        raise ValueError(f"kdfused: soft_weight must be finite and >= 0, got {_num(soft_weight)}")
    if not (math.isfinite(hard_weight) and hard_weight >= 0):
        raise ValueError(f"kdfused: hard_weight must be finite and >= 0, got {_num(hard_weight)}")
    if divergence not in divergences:
        if divergences is TOPK_DIVERGENCES:
            raise ValueError(
                f"kdfused: topk_kd_loss supports divergence {_quoted(divergences, ' or ')}, "
                f"got '{divergence}'"
            )
        raise ValueError(
            f"kdfused: divergence must be one of {_quoted(divergences)}, got '{divergence}'"
        )
    if not (0 <= beta <= 1):  # (NaN fails both comparisons)
        raise ValueError(f"kdfused: beta must be in [0, 1], got {_num(beta)}")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"kdfused: reduction must be one of {_quoted(REDUCTIONS)}, got '{reduction}'"
        )


def check_topk_option_types(support, values) -> None:
    """The Python types of topk_kd_loss's own options (the others: check_option_types)."""
    if not isinstance(support, str) or not isinstance(values, str):
        raise TypeError("kdfused: support and values must be strings")


def check_topk_options(divergence, support, values, teacher_transformed: bool) -> None:
    """topk_kd_loss's own option values and their combinations with the divergence and the
    teacher's logit transform (after check_options, which checked the divergence's name)."""
    if support not in SUPPORTS:
        raise ValueError(f"kdfused: support must be one of {_quoted(SUPPORTS)}, got '{support}'")
    if values not in VALUE_KINDS:
        raise ValueError(f"kdfused: values must be {_quoted(VALUE_KINDS, ' or ')}, got '{values}'")
    if support == "full" and divergence not in TOPK_DIVERGENCES:
        # By name: "jsd" is refused even at beta 0, where it would be KL.
        raise ValueError(
            f"kdfused: topk_kd_loss with support='full' supports divergence "
            f"{_quoted(TOPK_DIVERGENCES, ' or ')} (the others need support='renormalized' or "
            f"'tail'), got '{divergence}'"
        )
    if support == "tail" and values != "logprobs":
        # The tail bucket is the mass the teacher left outside its entries: logits do not say.
        raise ValueError(
            "kdfused: support='tail' needs values='logprobs' (the tail bucket is the teacher's "
            "probability mass outside its stored entries)"
        )
    if values == "logprobs" and teacher_transformed:
        raise ValueError(
            "kdfused: values='logprobs' are the teacher's final log-probabilities: "
            "teacher_logit_scale and teacher_softcap do not apply to them"
        )


def check_topk_inputs(student, indices, values, labels, hard_weight: float) -> None:
    """The tensors of topk_kd_loss: dtypes, shapes, devices (csrc/kd_topk.cpp:
    check_topk_inputs, in the same order). Reads no data (the fake kernel runs it too)."""
    check_dtype("student_logits", student)
    check_dtype("teacher_indices", indices, LABEL_DTYPES)
    check_dtype("teacher_values", values)
    if student.dim() < 1:
        raise ValueError(
            "kdfused: student_logits must have at least 1 dimension (..., V), got a 0-dim tensor"
        )
    V = student.shape[-1]
    if V < 1:
        raise ValueError("kdfused: the vocabulary (last) dimension must not be empty")
    lead = tuple(student.shape[:-1])
    if indices.dim() != student.dim() or tuple(indices.shape[:-1]) != lead:
        raise ValueError(
            f"kdfused: teacher_indices must have shape (..., k) with the student's leading "
            f"dims {_shape(lead)}, got {_shape(indices.shape)}"
        )
    if values.shape != indices.shape:
        raise ValueError(
            f"kdfused: teacher_values must have the shape of teacher_indices "
            f"{_shape(indices.shape)}, got {_shape(values.shape)}"
        )
    k = indices.shape[-1]
    if k < 1:
        raise ValueError("kdfused: k (the last dim of teacher_indices) must be >= 1, got 0")
    if k > V:
        raise ValueError(
            f"kdfused: k = {k} teacher entries per row but the vocabulary has only V = {V}"
        )
    if indices.device != student.device or values.device != student.device:
        raise RuntimeError(
            "kdfused: student_logits, teacher_indices and teacher_values must be on one device, "
            f"got {student.device}, {indices.device} and {values.device}"
        )
    if labels is not None:
        if labels.dtype not in LABEL_DTYPES:
            raise TypeError(
                f"kdfused: labels must be int64 (or int32), got {_dtype_name(labels.dtype)}"
            )
        if tuple(labels.shape) != lead:
            raise ValueError(
                f"kdfused: labels must have shape {_shape(lead)} (the logits' leading "
                f"dims), got {_shape(labels.shape)}"
            )
    elif hard_weight != 0:
        raise ValueError("kdfused: hard_weight > 0 needs labels (got labels=None)")


def check_topk_indices(indices: torch.Tensor, valid: torch.Tensor, vocab: int) -> None:
    """Every index in [0, vocab); the indices of the valid entries (``valid``: the teacher value
    is not -inf) distinct within a row. Padding entries may repeat any index (TRL pads with 0).
    Reads the indices (a device sync on a GPU); the messages are the CPU op's, first bad row."""
    idx = indices.reshape(-1, indices.shape[-1]).to(torch.int64)
    valid = valid.reshape(idx.shape)
    out = (idx < 0) | (idx >= vocab)
    # A duplicate: a valid entry whose index an earlier valid entry of the row already holds.
    same = (idx.unsqueeze(-1) == idx.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)
    dup = torch.tril(same, diagonal=-1)  # [r, j, u]: u < j
    bad_rows = (out.any(-1) | dup.flatten(1).any(-1)).nonzero()
    if bad_rows.numel() == 0:
        return
    r = int(bad_rows[0, 0])
    for j in range(idx.shape[1]):
        if bool(out[r, j]):
            raise ValueError(
                f"kdfused: teacher_indices must be in [0, {vocab}), got {int(idx[r, j])} at "
                f"row {r}, position {j}"
            )
        earlier = dup[r, j].nonzero()
        if earlier.numel():
            u = int(earlier[0, 0])
            raise ValueError(
                f"kdfused: teacher_indices of the stored entries (value != -inf) must be "
                f"distinct within a row, got {int(idx[r, j])} twice in row {r} (positions {u} "
                f"and {j})"
            )


def check_inputs(student, teacher, labels: Optional[torch.Tensor], hard_weight: float) -> None:
    """The tensors' dtypes, shapes and devices (csrc/kdfused.cpp: check_inputs, after the options,
    which :func:`kdfused._options.parse` checks), in the same order as the C++ op so that the same
    problem is reported first."""
    check_dtype("student_logits", student)
    check_dtype("teacher_logits", teacher)
    if student.dim() < 1:
        raise ValueError(
            "kdfused: logits must have at least 1 dimension (..., V), got a 0-dim tensor"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            "kdfused: student and teacher logits must have the same shape, got "
            f"{_shape(student.shape)} and {_shape(teacher.shape)}"
        )
    if student.shape[-1] < 1:
        raise ValueError("kdfused: the vocabulary (last) dimension must not be empty")
    if student.device != teacher.device:
        raise RuntimeError(
            "kdfused: student and teacher logits must be on the same device, got "
            f"{student.device} and {teacher.device}"
        )
    if labels is not None:
        if labels.dtype not in LABEL_DTYPES:
            raise TypeError(
                f"kdfused: labels must be int64 (or int32), got {_dtype_name(labels.dtype)}"
            )
        lead = student.shape[:-1]
        if labels.shape != lead:
            raise ValueError(
                f"kdfused: labels must have shape {_shape(lead)} (the logits' leading "
                f"dims), got {_shape(labels.shape)}"
            )
        if labels.device != student.device:
            raise RuntimeError(
                f"kdfused: labels must be on the logits' device ({student.device}), "
                f"got {labels.device}"
            )
    elif hard_weight != 0:
        raise ValueError("kdfused: hard_weight > 0 needs labels (got labels=None)")


def check_label_values(
    labels: Optional[torch.Tensor], vocab: int, ignore_index: int, who="kdfused", what=""
) -> None:
    """Every label is in [0, vocab) or equals ignore_index (the backends check this before they
    compute anything, whether or not the hard term is on: labels also select the valid rows).
    Reads the labels (a device sync on a GPU). ``what``: what the vocabulary is, for the message."""
    if labels is None or labels.numel() == 0:
        return
    y = labels.reshape(-1)
    bad = (y != ignore_index) & ((y < 0) | (y >= vocab))
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{who}: labels must be in [0, {vocab}){what} or equal ignore_index "
            f"({ignore_index}), got {int(y[r])} at row {r}"
        )


def check_logit_transform(
    student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap, values=True
) -> None:
    """The logit transform's options (``z = scale * x``, then ``z = softcap * tanh(z / softcap)``
    when a softcap is given), of every op that takes them. A scale is a finite real number (0 and
    negative scales are accepted); a softcap is None or a finite real number > 0. A bad type is a
    ``TypeError``, a bad value a ``ValueError`` (checked with ``values`` only); both name the
    option."""
    for name, value in (
        ("student_logit_scale", student_logit_scale),
        ("teacher_logit_scale", teacher_logit_scale),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"kdfused: {name} must be a real number, got {type(value).__name__}")
    for name, value in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(
                f"kdfused: {name} must be a real number or None, got {type(value).__name__}"
            )
    if not values:
        return
    for name, value in (
        ("student_logit_scale", student_logit_scale),
        ("teacher_logit_scale", teacher_logit_scale),
    ):
        if not math.isfinite(value):
            raise ValueError(f"kdfused: {name} must be finite, got {_num(value)}")
    for name, value in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"kdfused: {name} must be None or finite and > 0, got {_num(value)}")


def check_flag(name: str, value) -> None:
    """A boolean keyword (``return_entropy``): a bool, else ``TypeError`` naming it."""
    if not isinstance(value, bool):
        raise TypeError(f"kdfused: {name} must be a bool, got {type(value).__name__}")


def check_chunk_size(who: str, chunk_size) -> int:
    """The linear ops' ``chunk_size``: 0 (automatic) for None, else a positive int."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"{who}: chunk_size must be an int or None, got {type(chunk_size).__name__}"
        )
    if chunk_size <= 0:
        raise ValueError(f"{who}: chunk_size must be > 0, got {chunk_size}")
    return chunk_size
