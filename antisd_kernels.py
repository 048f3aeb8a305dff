"""Per-token statistics over a large vocabulary: log-prob, entropy and Jensen-Shannon divergence.

AntiSD needs, for every response token, a handful of numbers computed from the student's and the
teacher's logits over the whole vocabulary (151,936 columns for Qwen):

  logp      = log p_S(y_t)                         log-softmax of the student at the sampled token
  entropy   = -sum_v p_S(v) log p_S(v)             the student's entropy
  t_logp    = log p_T(y_t)                         the same for the teacher (no gradient)
  t_entropy = -sum_v p_T(v) log p_T(v)             drives the entropy gate (M6, docs/METHOD.md)
  jsd       = beta KL(p_T || M) + (1-beta) KL(p_S || M),   M = beta p_T + (1-beta) p_S

with p = softmax(logits / temperature). logp, entropy and jsd are differentiable with respect to the
student logits; nothing flows into the teacher. Rows whose target is IGNORE_INDEX give zeros.

Gradients (z = student logits of one row, T = temperature, p = p_S, y = target, all logs natural)
-----------------------------------------------------------------------------------------------
  d logp    / dz_j = (onehot(y)_j - p_j) / T
  d entropy / dz_j = -p_j (log p_j + entropy) / T
  d jsd     / dz_j = (1-beta) p_j (log p_j - log M_j - KL(p_S || M)) / T

The last one: write jsd = beta sum p_T log p_T + (1-beta) sum p_S log p_S - sum M log M (the cross
terms collect into M log M because beta p_T + (1-beta) p_S = M). Then d jsd / d p_S_k =
(1-beta)(log p_S_k + 1) - (1-beta)(log M_k + 1) = (1-beta)(log p_S_k - log M_k): the "+1"s cancel, and
so does every explicit dependence on the teacher's KL term. Pushing a vector g through the softmax
Jacobian gives p_j (g_j - sum_k p_k g_k) / T, and sum_k p_k (1-beta)(log p_S_k - log M_k) is
(1-beta) KL(p_S || M). With per-row upstream gradients a (logp), b (entropy), c (jsd) the fused
backward therefore writes, for every column,

  grad_j = [ a onehot(y)_j + p_j ( -a - b (log p_j + H) + c (1-beta)(log p_j - log M_j - KL_S) ) ] / T

which only needs, per row, the student's and teacher's max and log-sum-exp, H and KL_S.

Two implementations
-------------------
`token_stats_torch` is the readable definition and the CPU path. It works on chunks of rows, so it
never holds more than a few float32 [chunk, V] temporaries (log_softmax, its exp, log M, ... for
chunk = 256 rows and V = 151,936 each is 155 MB), and its backward recomputes each chunk; the only
[N, V] tensor it allocates is the gradient itself. It still streams every chunk through memory many
times in float32.

`token_stats_triton` is the fused kernel used for CUDA tensors. The forward runs one program per
row: pass 1 streams the raw student (and teacher) logits once, keeping an online running max and
rescaled sums (sum exp, and sum exp * log for the entropy) in float32, base 2; pass 2 (teacher only)
streams both rows again to accumulate KL(p_S || M) and KL(p_T || M), which need the normalised
probabilities. It saves six floats per row. The backward recomputes p_S, p_T and log M from those
floats on a 2-D grid (rows x vocabulary blocks), reading each logit once and writing each gradient
entry once, in the logits' dtype. (A backward looping over a row in one program would move the same
bytes; with every row statistic saved the 2-D grid needs no reduction, no barrier, and gives the
scheduler N x V/BLOCK independent programs.) The only [N, V] allocation in forward + backward is the
gradient.
Bytes per vocabulary entry for bf16 logits: forward 2 (student only) or 8 (teacher: two passes over
two rows), backward 4 or 6 (read student [and teacher], write gradient); with a teacher, forward +
backward moves 14 bytes per entry. Ignored rows read nothing.
"""

import contextlib
import math
import os
import sys
import time

import torch

try:                                    # triton is optional: without it the torch path still works
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:                     # pragma: no cover - depends on the installation
    triton = None
    tl = None
    HAS_TRITON = False

IGNORE_INDEX = -100
STAT_NAMES = ("logp", "entropy", "t_logp", "t_entropy", "jsd")


# -----------------------------------------------------------------------------
# The definition, for one chunk of rows, in plain torch ops (float32)

def _row_stats(logits, targets, teacher_logits, beta, temperature):
    """The five statistics for a chunk of rows; differentiable through `logits` by autograd."""
    valid = targets != IGNORE_INDEX                                    # [n]
    safe_targets = targets.clamp(min=0)[:, None]                       # [n, 1] -100 -> any column
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # [n, V]
    p = logp_all.exp()
    logp = logp_all.gather(-1, safe_targets)[:, 0]                     # [n]
    entropy = -(p * logp_all).sum(-1)                                  # [n]
    stats = {"logp": logp, "entropy": entropy}
    if teacher_logits is not None:
        t_logp_all = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [n, V]
        t_p = t_logp_all.exp()
        stats["t_logp"] = t_logp_all.gather(-1, safe_targets)[:, 0]
        stats["t_entropy"] = -(t_p * t_logp_all).sum(-1)
        # log M = log(beta p_T + (1-beta) p_S), in log space so tiny probabilities stay exact
        log_mix = torch.logaddexp(t_logp_all + torch.log(torch.tensor(beta)),
                                  logp_all + torch.log(torch.tensor(1.0 - beta)))  # [n, V]
        kl_teacher = (t_p * (t_logp_all - log_mix)).sum(-1)           # KL(p_T || M)
        kl_student = (p * (logp_all - log_mix)).sum(-1)               # KL(p_S || M)
        stats["jsd"] = beta * kl_teacher + (1.0 - beta) * kl_student
    return {name: torch.where(valid, value, torch.zeros_like(value)) for name, value in stats.items()}


class _ChunkedTokenStats(torch.autograd.Function):
    """Runs `_row_stats` chunk by chunk; the backward recomputes each chunk (activation checkpointing
    at chunk granularity), so memory stays at a few [chunk, V] float32 tensors for any number of rows."""

    @staticmethod
    def forward(ctx, logits, targets, teacher_logits, beta, temperature, chunk_rows):
        with torch.no_grad():
            chunks = [_row_stats(logits[i:i + chunk_rows], targets[i:i + chunk_rows],
                                 None if teacher_logits is None else teacher_logits[i:i + chunk_rows],
                                 beta, temperature)
                      for i in range(0, logits.shape[0], chunk_rows)]
        names = STAT_NAMES if teacher_logits is not None else STAT_NAMES[:2]
        outputs = [torch.cat([chunk[name] for chunk in chunks]) if chunks
                   else logits.new_zeros(0, dtype=torch.float32) for name in names]
        ctx.save_for_backward(logits, targets, teacher_logits)
        ctx.settings = (beta, temperature, chunk_rows, names)
        ctx.mark_non_differentiable(*[out for name, out in zip(names, outputs) if name.startswith("t_")])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        logits, targets, teacher_logits = ctx.saved_tensors
        beta, temperature, chunk_rows, names = ctx.settings
        grad_logits = torch.empty_like(logits)
        for i in range(0, logits.shape[0], chunk_rows):
            rows = slice(i, i + chunk_rows)
            with torch.enable_grad():
                chunk = logits[rows].detach().requires_grad_()
                stats = _row_stats(chunk, targets[rows],
                                   None if teacher_logits is None else teacher_logits[rows],
                                   beta, temperature)
                pairs = [(stats[name], grad[rows]) for name, grad in zip(names, grad_outputs)
                         if grad is not None and not name.startswith("t_")]
                grad_chunk, = torch.autograd.grad([s for s, _ in pairs], [chunk],
                                                  [g for _, g in pairs], allow_unused=True)
            grad_logits[rows] = 0 if grad_chunk is None else grad_chunk
        return grad_logits, None, None, None, None, None


def token_stats_torch(logits, targets, teacher_logits=None, beta=0.5, temperature=1.0, chunk_rows=256):
    """Torch reference. logits, teacher_logits: [N, V] (any float dtype; rows may be strided);
    targets: [N] int (IGNORE_INDEX rows give zeros). Returns a dict of float32 [N] tensors."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"token_stats: logits must be [N, V] and targets [N], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if teacher_logits is not None:
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"token_stats: teacher_logits {tuple(teacher_logits.shape)} "
                             f"!= logits {tuple(logits.shape)}")
        teacher_logits = teacher_logits.detach()
    outputs = _ChunkedTokenStats.apply(logits, targets, teacher_logits, float(beta),
                                       float(temperature), int(chunk_rows))
    names = STAT_NAMES if teacher_logits is not None else STAT_NAMES[:2]
    return dict(zip(names, outputs))


# -----------------------------------------------------------------------------
# Fused Triton kernels
#
# Notation inside the kernels: z is a raw logit (loaded in its own dtype, immediately cast to
# float32), m the running row maximum *in raw logit units*, and scale = log2(e) / T, so that
# a = (z - m) * scale is log2 of an unnormalised probability. Subtracting the maximum before
# scaling keeps a exact near the top of the distribution even for |logits| ~ 3e4, where z * scale
# alone would already lose ~1e-3 in float32. Everything is accumulated in float32.

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2
N_ROW_STATS = 6        # saved per row: m_S, log2 s_S, m_T, log2 s_T, entropy_S, KL(p_S || M)

# Launch settings for the GPU, chosen from ptxas register counts for sm_90 (not yet timed on
# hardware; `python antisd_kernels.py --sweep` times alternatives). Forward: 8 elements per thread keep the
# teacher variant at ~80 registers, so three 8-warp programs share an SM and hide each other's
# per-block max reduction; 16 elements per thread would need ~170 registers (one program per SM).
# Backward: no reductions; 16 elements per thread at ~64 registers, four programs per SM.
# Instruction budget (sm_90 SASS, bf16, with teacher, per vocabulary entry): ~30 in pass 1, ~43 in
# pass 2 and ~51 in the backward, of which ~20 each in pass 2 and the backward are the float32 log2
# of M. At H100/H200 bandwidth that is close to the instruction throughput, so these passes are balanced
# rather than purely memory-bound.
FWD_BLOCK, FWD_WARPS = 2048, 8
BWD_BLOCK, BWD_WARPS = 4096, 8
INTERPRETER_MAX_BLOCK = 65536          # on CPU the interpreter is fast per element, slow per block

# When True, outputs and the gradient are allocated filled with NaN instead of uninitialised, so
# that tests can check that the kernels write every element.
_poison = False


def _alloc(shape, dtype, device):
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# Triton decides whether a @triton.jit function runs in its CPU interpreter when the function is
# decorated, i.e. when this module is imported: TRITON_INTERPRET=1 must be set before that.
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def _interpreting():
    """True when the kernels below run in the interpreter and TRITON_INTERPRET=1 is still set."""
    return INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1"


if HAS_TRITON:

    # Globals read inside @triton.jit functions must be constexpr.
    _LN2 = tl.constexpr(LN2)

    @triton.jit
    def _online_update(z, m, acc_sum, acc_ent, scale):
        """Fold one block of raw logits z into the running (max, sum exp2, sum exp2 * log2) of a row.
        m is a scalar shared by the row; acc_sum and acc_ent are per-lane vectors kept relative to m,
        so only the max needs a cross-lane reduction per block."""
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = (m - m_new) * scale                  # <= 0; exactly 0 when the max did not move
        alpha = tl.exp2(shift)
        # log2 of the unnormalised probability, <= 0. The floor only touches masked columns (loaded
        # as -inf) and -inf logits, where e = 0 anyway; it keeps e * a at 0 instead of 0 * -inf.
        a = tl.maximum((z - m_new) * scale, -1e30)
        e = tl.exp2(a)
        # sum e * a relative to the new max: alpha * (sum e_old * (a_old + shift))
        acc_ent = alpha * (acc_ent + shift * acc_sum) + e * a
        acc_sum = alpha * acc_sum + e
        return m_new, acc_sum, acc_ent

    @triton.jit
    def _finish_row(m, acc_sum, acc_ent, z_target, inv_temp):
        """Row statistics from the online accumulators: (log2 sum, entropy in nats, logp in nats)."""
        total = tl.sum(acc_sum, axis=0)
        total = tl.where(total > 0, total, 1.0)      # 0 only for ignored rows (no block visited)
        log2_sum = tl.log2(total)
        # H = -sum p log p = ln2 * (log2 s - sum e a / s), with a relative to the max
        entropy = _LN2 * (log2_sum - tl.sum(acc_ent, axis=0) / total)
        # logp in natural units directly: for a target far below the max (|z - m| ~ 1e4) every extra
        # float32 rounding of the large (z - m) term would cost ~1e-3 absolute
        logp = (z_target - m) * inv_temp - _LN2 * log2_sum
        return log2_sum, entropy, logp

    @triton.jit
    def _token_stats_fwd_kernel(
        s_ptr, s_stride, t_ptr, t_stride, tgt_ptr,
        logp_ptr, ent_ptr, t_logp_ptr, t_ent_ptr, jsd_ptr, stats_ptr,
        V, scale, inv_temp, beta,
        HAS_TEACHER: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)          # int64: N * row_stride can exceed 2**31
        cols0 = tl.arange(0, BLOCK)
        target = tl.load(tgt_ptr + row).to(tl.int64)
        valid = target != -100                       # IGNORE_INDEX
        # A target outside [0, V) is not read (no stray memory access); its logp becomes NaN.
        target_ok = valid & (target >= 0) & (target < V)
        safe_target = tl.where(target_ok, target, 0)
        end = tl.where(valid, V, 0)                  # ignored rows skip both passes (read nothing)
        s_row = s_ptr + row * s_stride
        t_row = t_ptr + row * t_stride

        # ---- pass 1: online max / sum / entropy sums, student and teacher side by side
        # The initial max is a finite "minus infinity": with -inf, (m - m_new) * acc_sum would be
        # -inf * 0 = nan on the first block.
        m_s = -1e30
        sum_s = tl.zeros([BLOCK], dtype=tl.float32)
        ent_s = tl.zeros([BLOCK], dtype=tl.float32)
        m_t = -1e30
        sum_t = tl.zeros([BLOCK], dtype=tl.float32)
        ent_t = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, end, BLOCK):
            cols = start + cols0
            in_row = cols < V
            z_s = tl.load(s_row + cols, mask=in_row, other=-float("inf")).to(tl.float32)
            m_s, sum_s, ent_s = _online_update(z_s, m_s, sum_s, ent_s, scale)
            if HAS_TEACHER:
                z_t = tl.load(t_row + cols, mask=in_row, other=-float("inf")).to(tl.float32)
                m_t, sum_t, ent_t = _online_update(z_t, m_t, sum_t, ent_t, scale)

        zy_s = tl.load(s_row + safe_target, mask=target_ok, other=float("nan")).to(tl.float32)
        l2s_s, entropy_s, logp_s = _finish_row(m_s, sum_s, ent_s, zy_s, inv_temp)
        tl.store(logp_ptr + row, tl.where(valid, logp_s, 0.0))
        tl.store(ent_ptr + row, tl.where(valid, entropy_s, 0.0))
        # Saved for the backward; ignored rows get neutral values (the backward masks them anyway).
        stats = stats_ptr + row * 6                  # N_ROW_STATS
        tl.store(stats + 0, tl.where(valid, m_s, 0.0))
        tl.store(stats + 1, tl.where(valid, l2s_s, 0.0))
        tl.store(stats + 4, tl.where(valid, entropy_s, 0.0))

        if HAS_TEACHER:
            zy_t = tl.load(t_row + safe_target, mask=target_ok, other=float("nan")).to(tl.float32)
            l2s_t, entropy_t, logp_t = _finish_row(m_t, sum_t, ent_t, zy_t, inv_temp)
            tl.store(t_logp_ptr + row, tl.where(valid, logp_t, 0.0))
            tl.store(t_ent_ptr + row, tl.where(valid, entropy_t, 0.0))

            # ---- pass 2: KL(p_S || M) and KL(p_T || M) from normalised probabilities
            # log2 M = log2(beta p_T + (1-beta) p_S). M is floored at 1e-37 (a normal float): below
            # that both p are < 1e-37 and their terms vanish, while log2(0) = -inf would give 0 * inf.
            kl_s = tl.zeros([BLOCK], dtype=tl.float32)
            kl_t = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, end, BLOCK):
                cols = start + cols0
                in_row = cols < V
                z_s = tl.load(s_row + cols, mask=in_row, other=-float("inf")).to(tl.float32)
                z_t = tl.load(t_row + cols, mask=in_row, other=-float("inf")).to(tl.float32)
                # log2 p_S and log2 p_T, floored as in pass 1 so that masked columns give 0 * finite
                lp_s = tl.maximum((z_s - m_s) * scale - l2s_s, -1e30)
                lp_t = tl.maximum((z_t - m_t) * scale - l2s_t, -1e30)
                p_s = tl.exp2(lp_s)
                p_t = tl.exp2(lp_t)
                log2_mix = tl.log2(tl.maximum(beta * p_t + (1.0 - beta) * p_s, 1e-37))
                kl_s += p_s * (lp_s - log2_mix)
                kl_t += p_t * (lp_t - log2_mix)
            kl_student = _LN2 * tl.sum(kl_s, axis=0)
            kl_teacher = _LN2 * tl.sum(kl_t, axis=0)
            jsd = beta * kl_teacher + (1.0 - beta) * kl_student
            tl.store(jsd_ptr + row, tl.where(valid, jsd, 0.0))
            tl.store(stats + 2, tl.where(valid, m_t, 0.0))
            tl.store(stats + 3, tl.where(valid, l2s_t, 0.0))
            tl.store(stats + 5, tl.where(valid, kl_student, 0.0))
        else:
            tl.store(stats + 2, 0.0)
            tl.store(stats + 3, 0.0)
            tl.store(stats + 5, 0.0)

    @triton.jit
    def _to_bf16_rtne(x):
        """float32 -> bfloat16, round to nearest even, by integer arithmetic. Only used under the
        CPU interpreter, whose own float32 -> bfloat16 cast truncates; compiled kernels use the
        hardware conversion, which already rounds to nearest even. Finite inputs only."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _token_stats_bwd_kernel(
        s_ptr, s_stride, t_ptr, t_stride, tgt_ptr, stats_ptr,
        g_logp_ptr, g_ent_ptr, g_jsd_ptr, grad_ptr, grad_stride,
        V, scale, inv_temp, beta,
        USE_JSD: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)          # rows on axis 0: axes 1 and 2 are capped at 65535
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_row = cols < V
        target = tl.load(tgt_ptr + row).to(tl.int32)   # V < 2**31, so 32-bit column compares
        valid = target != -100                       # IGNORE_INDEX
        load_mask = in_row & valid                   # ignored rows read nothing and get zeros

        # Per-row scalars, with 1/T and ln 2 folded in once per program rather than per element:
        #   grad = p_S * (k0 + k_ent * log2 p_S + k_jsd * (log2 p_S - log2 M)) + [j == y] a / T
        #   k0 = -(a + b H + c (1-beta) KL_S) / T,  k_ent = -b ln2 / T,  k_jsd = c (1-beta) ln2 / T
        # (log2 p_S - log2 M) stays one difference: it is small where p_S ~ M and must not cancel.
        stats = stats_ptr + row * 6                  # N_ROW_STATS
        m_s = tl.load(stats + 0)
        l2s_s = tl.load(stats + 1)
        g_logp = tl.load(g_logp_ptr + row) * inv_temp
        g_ent = tl.load(g_ent_ptr + row) * inv_temp
        k0 = -g_logp - g_ent * tl.load(stats + 4)
        k_ent = -g_ent * _LN2

        z_s = tl.load(s_ptr + row * s_stride + cols, mask=load_mask, other=0.0).to(tl.float32)
        lp_s = (z_s - m_s) * scale - l2s_s           # log2 p_S
        p_s = tl.exp2(lp_s)
        coef = k0 + k_ent * lp_s
        if USE_JSD:
            m_t = tl.load(stats + 2)
            l2s_t = tl.load(stats + 3)
            g_jsd = tl.load(g_jsd_ptr + row) * inv_temp * (1.0 - beta)
            k0_jsd = -g_jsd * tl.load(stats + 5)
            k_jsd = g_jsd * _LN2
            z_t = tl.load(t_ptr + row * t_stride + cols, mask=load_mask, other=0.0).to(tl.float32)
            p_t = tl.exp2((z_t - m_t) * scale - l2s_t)
            # M floored as in the forward: where it matters p_S is < 1e-37 and the term vanishes
            log2_mix = tl.log2(tl.maximum(beta * p_t + (1.0 - beta) * p_s, 1e-37))
            coef += k0_jsd + k_jsd * (lp_s - log2_mix)
        # The one-hot term and p_S * coef nearly cancel at a confident target (p ~ 1): they are added
        # in float32 and rounded once to the output dtype, so the result keeps float32 accuracy
        # instead of inheriting a bf16 rounding error of size ~|a| / 256 from either piece.
        grad = p_s * coef + tl.where(cols == target, g_logp, 0.0)
        grad = tl.where(load_mask, grad, 0.0)
        out = grad_ptr + row * grad_stride + cols
        if ROUND_BF16_BY_HAND:
            tl.store(out, _to_bf16_rtne(grad), mask=in_row)
        else:
            tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _check_shapes(logits, targets, teacher_logits):
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"token_stats: logits must be [N, V] and targets [N], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if teacher_logits is not None and teacher_logits.shape != logits.shape:
        raise ValueError(f"token_stats: teacher_logits {tuple(teacher_logits.shape)} "
                         f"!= logits {tuple(logits.shape)}")


def _unit_column_stride(x):
    # Rows may be strided (a slice of a wider tensor, a reshaped [B, T, V] view); columns must be
    # adjacent for coalesced loads. Only a transposed-like layout pays for a copy.
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def _on_device(device):
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _default_block(V, device, gpu_block):
    if device.type == "cuda" and not INTERPRETED:
        return gpu_block
    return min(triton.next_power_of_2(V), INTERPRETER_MAX_BLOCK)


class _TritonTokenStats(torch.autograd.Function):
    """Fused forward (one program per row) and backward (rows x vocabulary blocks)."""

    @staticmethod
    def forward(ctx, logits, targets, teacher_logits, beta, temperature, block):
        N, V = logits.shape
        has_teacher = teacher_logits is not None
        device = logits.device
        names = STAT_NAMES if has_teacher else STAT_NAMES[:2]
        outputs = {name: _alloc((N,), torch.float32, device) for name in names}
        stats = _alloc((N, N_ROW_STATS), torch.float32, device)
        teacher = teacher_logits if has_teacher else logits     # placeholder pointer, never read
        fwd_block = block or _default_block(V, device, FWD_BLOCK)
        if N > 0:
            with _on_device(device):
                _token_stats_fwd_kernel[(N,)](
                    logits, logits.stride(0), teacher, teacher.stride(0), targets,
                    outputs["logp"], outputs["entropy"],
                    outputs.get("t_logp", outputs["logp"]), outputs.get("t_entropy", outputs["logp"]),
                    outputs.get("jsd", outputs["logp"]), stats,
                    V, LOG2E / temperature, 1.0 / temperature, beta,
                    HAS_TEACHER=has_teacher, BLOCK=fwd_block, num_warps=FWD_WARPS,
                )
        ctx.save_for_backward(logits, targets, teacher_logits, stats)
        ctx.settings = (beta, temperature, block, names)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*[outputs[name] for name in names if name.startswith("t_")])
        return tuple(outputs[name] for name in names)

    @staticmethod
    def backward(ctx, *grad_outputs):
        logits, targets, teacher_logits, stats = ctx.saved_tensors
        beta, temperature, block, names = ctx.settings
        grads = dict(zip(names, grad_outputs))
        g_logp, g_ent, g_jsd = grads.get("logp"), grads.get("entropy"), grads.get("jsd")
        if g_logp is None and g_ent is None and g_jsd is None:
            return None, None, None, None, None, None
        N, V = logits.shape
        device = logits.device

        def per_row(g):      # None -> zeros; upstream grads may be expanded (stride 0) views
            if g is None:
                return torch.zeros(N, dtype=torch.float32, device=device)
            return g.to(torch.float32).contiguous()

        use_jsd = teacher_logits is not None and g_jsd is not None
        teacher = teacher_logits if use_jsd else logits
        grad_logits = _alloc((N, V), logits.dtype, device)
        bwd_block = block or _default_block(V, device, BWD_BLOCK)
        if N > 0:
            with _on_device(device):
                _token_stats_bwd_kernel[(N, triton.cdiv(V, bwd_block))](
                    logits, logits.stride(0), teacher, teacher.stride(0), targets, stats,
                    per_row(g_logp), per_row(g_ent), per_row(g_jsd if use_jsd else None),
                    grad_logits, grad_logits.stride(0),
                    V, LOG2E / temperature, 1.0 / temperature, beta,
                    USE_JSD=use_jsd,
                    ROUND_BF16_BY_HAND=INTERPRETED and logits.dtype == torch.bfloat16,
                    BLOCK=bwd_block, num_warps=BWD_WARPS,
                )
        return grad_logits, None, None, None, None, None


def token_stats_triton(logits, targets, teacher_logits=None, beta=0.5, temperature=1.0, block=None):
    """Fused Triton path; same arguments, outputs and gradients as `token_stats_torch`. `block`
    overrides the vocabulary block size of both kernels (a power of two); by default FWD_BLOCK and
    BWD_BLOCK on GPU and the next power of two >= V (capped at 65536) under the CPU interpreter."""
    if not HAS_TRITON:
        raise RuntimeError("token_stats_triton needs triton")
    if not logits.is_cuda and not INTERPRETED:
        raise RuntimeError("token_stats_triton on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "antisd_kernels.py is imported")
    _check_shapes(logits, targets, teacher_logits)
    if block is not None and (block <= 0 or block & (block - 1)):
        raise ValueError(f"token_stats_triton: block must be a power of two, got {block}")
    logits = _unit_column_stride(logits)
    if teacher_logits is not None:
        teacher_logits = _unit_column_stride(teacher_logits.detach())
    outputs = _TritonTokenStats.apply(logits, targets.contiguous(), teacher_logits, float(beta),
                                      float(temperature), block)
    names = STAT_NAMES if teacher_logits is not None else STAT_NAMES[:2]
    return dict(zip(names, outputs))


# -----------------------------------------------------------------------------
# Dispatch

def token_stats(logits, targets, teacher_logits=None, beta=0.5, temperature=1.0):
    """Per-row logp, entropy (and with a teacher: t_logp, t_entropy, jsd), float32 [N] each.

    CUDA tensors take the fused Triton kernels. CPU tensors take the torch reference, except when
    TRITON_INTERPRET=1 is set in the environment, where the Triton kernels run on the CPU through the
    interpreter; that is how the tests exercise them. The variable must already have been set when
    this module was imported (Triton fixes the mode then); if it was not, CPU tensors stay on the
    torch reference."""
    if HAS_TRITON and (logits.is_cuda or _interpreting()):
        return token_stats_triton(logits, targets, teacher_logits, beta, temperature)
    return token_stats_torch(logits, targets, teacher_logits, beta, temperature)


# -----------------------------------------------------------------------------
# The lm_head projection fused with token_stats, chunk by chunk of rows
#
# For one 32K-token response the logits alone are 32K x 151,936 entries: 10 GB in bf16, once for the
# student, once for the teacher and once for their gradient. Here the logits of `chunk_rows` rows at
# a time are projected from the final hidden states, reduced to the per-row statistics and dropped;
# the backward projects each chunk again and turns its logit gradient into gradients for the hidden
# states and the lm_head weight at once. Beyond the hidden states, memory is O(chunk_rows x V).

LM_HEAD_CHUNK_ROWS = 1024   # 1024 x 151,936 bf16 logits: 0.3 GB per [chunk, V] tensor


class _ChunkedLMHeadTokenStats(torch.autograd.Function):
    """token_stats(hidden @ weight.T, ...) one chunk of rows at a time; the backward recomputes each
    chunk's logits (activation checkpointing at chunk granularity)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher_hidden, beta, temperature, chunk_rows):
        names = STAT_NAMES if teacher_hidden is not None else STAT_NAMES[:2]
        chunks = []
        with torch.no_grad():
            for i in range(0, hidden.shape[0], chunk_rows):
                rows = slice(i, i + chunk_rows)
                teacher_logits = None if teacher_hidden is None else teacher_hidden[rows] @ weight.T
                chunks.append(token_stats(hidden[rows] @ weight.T, targets[rows], teacher_logits,
                                          beta, temperature))      # [chunk, V] lives only here
        outputs = [torch.cat([chunk[name] for chunk in chunks]) if chunks
                   else hidden.new_zeros(0, dtype=torch.float32) for name in names]
        ctx.save_for_backward(hidden, weight, targets, teacher_hidden)
        ctx.settings = (beta, temperature, chunk_rows, names)
        ctx.mark_non_differentiable(*[out for name, out in zip(names, outputs) if name.startswith("t_")])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        hidden, weight, targets, teacher_hidden = ctx.saved_tensors
        beta, temperature, chunk_rows, names = ctx.settings
        # float32 accumulators: the weight's gradient is a sum over every chunk
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        weight = weight.detach().requires_grad_()
        for i in range(0, hidden.shape[0], chunk_rows):
            rows = slice(i, i + chunk_rows)
            with torch.no_grad():
                teacher_logits = None if teacher_hidden is None else teacher_hidden[rows] @ weight.T
            with torch.enable_grad():
                chunk = hidden[rows].detach().requires_grad_()
                stats = token_stats(chunk @ weight.T, targets[rows], teacher_logits, beta, temperature)
                pairs = [(stats[name], grad[rows]) for name, grad in zip(names, grad_outputs)
                         if grad is not None and not name.startswith("t_")]
                if not pairs:
                    continue
                grad_chunk, grad_weight_chunk = torch.autograd.grad(
                    [s for s, _ in pairs], [chunk, weight], [g for _, g in pairs], allow_unused=True)
            if grad_hidden is not None and grad_chunk is not None:
                grad_hidden[rows] = grad_chunk
            if grad_weight is not None and grad_weight_chunk is not None:
                grad_weight += grad_weight_chunk
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None, None)


def lm_head_token_stats(hidden, weight, targets, teacher_hidden=None, beta=0.5, temperature=1.0,
                        chunk_rows=LM_HEAD_CHUNK_ROWS):
    """token_stats(hidden @ weight.T, targets, teacher_hidden @ weight.T, ...) without ever holding
    the [N, V] logits. hidden, teacher_hidden: [N, H] final hidden states (after the last norm);
    weight: [V, H], the lm_head weight (tied to the embeddings or not: gradients reach whatever
    parameter it is). Values and gradients (for hidden and weight) equal the unchunked path's; no
    gradient flows into teacher_hidden. Each chunk goes through `token_stats`, so CUDA tensors use
    the fused kernel."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] \
            or targets.shape != hidden.shape[:1]:
        raise ValueError(f"lm_head_token_stats: hidden must be [N, H], weight [V, H] and targets [N], got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}")
    if teacher_hidden is not None:
        if teacher_hidden.shape != hidden.shape:
            raise ValueError(f"lm_head_token_stats: teacher_hidden {tuple(teacher_hidden.shape)} "
                             f"!= hidden {tuple(hidden.shape)}")
        teacher_hidden = teacher_hidden.detach()
    if chunk_rows < 1:
        raise ValueError(f"lm_head_token_stats: chunk_rows must be at least 1, got {chunk_rows}")
    outputs = _ChunkedLMHeadTokenStats.apply(hidden, weight, targets, teacher_hidden, float(beta),
                                             float(temperature), int(chunk_rows))
    names = STAT_NAMES if teacher_hidden is not None else STAT_NAMES[:2]
    return dict(zip(names, outputs))


# -----------------------------------------------------------------------------
# Benchmark: python antisd_kernels.py (needs a CUDA GPU)
#
# Bytes counted, per vocabulary entry, e = element size of the logits (2 for bf16):
#   forward,        student only: e       (one pass over the student row)
#   forward,        with teacher: 4e      (two passes over the student and teacher rows)
#   forward+backward, student only: 3e    (forward e; backward reads the student, writes the grad)
#   forward+backward, with teacher: 7e    (forward 4e; backward reads both rows, writes the grad)
# This is the traffic of the fused design; the same count is used for every implementation, so the
# GB/s column is an effective bandwidth that compares like with like. "copy" is a device-to-device
# copy of the logits measured in the same run (bytes read + written).

def _plain_reference(logits, targets, teacher_logits, beta, temperature):
    """The reference math on all rows at once (no chunking, no custom autograd.Function), for
    torch.compile: compiling the chunked autograd.Function would graph-break on its Python loops."""
    stats = _row_stats(logits, targets, teacher_logits, beta, temperature)
    names = STAT_NAMES if teacher_logits is not None else STAT_NAMES[:2]
    return tuple(stats[name] for name in names)


def _time_ms(fn, device):
    """Median milliseconds of fn: triton's do_bench on CUDA; on a CPU (the dry run) two plain calls."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, return_mode="median")
    fn()
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def _benchmark(Ns=(8192, 16384), V=151_936, device="cuda", compile_backend="inductor"):
    """Prints one row per (N, teacher, mode, implementation) as soon as it is measured, the goal's
    row (with teacher, forward+backward) first. On a CPU (dry run: tiny sizes, TRITON_INTERPRET=1)
    the timings mean nothing and memory is not measured; it only proves this code runs."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    torch.manual_seed(0)
    dtype, beta, temperature = torch.bfloat16, 0.5, 1.0
    compiled = torch.compile(_plain_reference, dynamic=False, backend=compile_backend)
    impls = [
        ("triton fused", lambda l, y, t: tuple(token_stats_triton(l, y, t, beta, temperature).values())),
        ("torch eager (chunked reference)",
         lambda l, y, t: tuple(token_stats_torch(l, y, t, beta, temperature).values())),
        ("torch.compile (unchunked math)", lambda l, y, t: compiled(l, y, t, beta, temperature)),
    ]
    where = torch.cuda.get_device_name() if on_gpu else "CPU dry run (TRITON_INTERPRET=1; times mean nothing)"
    print(f"{where}, torch {torch.__version__}, triton {triton.__version__}, bf16 logits, V = {V}")
    print("torch.compile row: the reference math on all rows at once (the chunked autograd.Function "
          "is not compiled)")
    print("GB/s counts the fused design's traffic for every row (bf16: fwd 2 or 8 bytes per entry, "
          "fwd+bwd 6 or 14, student only or with teacher); % copy is relative to a device-to-device copy")
    header = (f"{'N':>6} {'teacher':>7} {'mode':>8}  {'implementation':<32} {'ms':>9} {'GB/s':>8} "
              f"{'% copy':>7} {'extra peak GiB':>15} {'x grad':>7}")
    for N in Ns:
        logits = torch.randn(N, V, device=device, dtype=dtype).mul_(3)
        teacher_all = torch.randn(N, V, device=device, dtype=dtype).mul_(3)
        targets = torch.randint(0, V, (N,), device=device)
        upstream = [torch.randn(N, device=device) for _ in range(3)]
        copy_dst = torch.empty_like(logits)
        copy_ms = _time_ms(lambda: copy_dst.copy_(logits), device)
        copy_gbs = 2 * logits.numel() * logits.element_size() / copy_ms / 1e6
        del copy_dst
        grad_bytes = logits.numel() * logits.element_size()
        print(f"\nN = {N}: device-to-device copy {copy_ms:.3f} ms, {copy_gbs:.0f} GB/s; "
              f"gradient tensor {grad_bytes / 2**30:.2f} GiB")
        print(header, flush=True)
        for with_teacher in (True, False):
            teacher = teacher_all if with_teacher else None
            for mode in ("fwd+bwd", "fwd"):
                per_entry = (4 if with_teacher else 1) if mode == "fwd" else (7 if with_teacher else 3)
                moved = per_entry * logits.numel() * logits.element_size()
                for name, fn in impls:
                    if mode == "fwd":
                        def step(fn=fn):
                            with torch.no_grad():
                                fn(logits, targets, teacher)
                    else:
                        leaf = logits.detach().requires_grad_()

                        def step(fn=fn, leaf=leaf):
                            outs = fn(leaf, targets, teacher)
                            diff = [outs[0], outs[1]] + ([outs[4]] if with_teacher else [])
                            torch.autograd.grad(diff, leaf, upstream[:len(diff)])
                    row = f"{N:>6} {'yes' if with_teacher else 'no':>7} {mode:>8}  {name:<32}"
                    try:
                        ms = _time_ms(step, device)
                        extra = 0
                        if on_gpu:
                            torch.cuda.synchronize()
                            torch.cuda.empty_cache()
                            base = torch.cuda.memory_allocated()
                            torch.cuda.reset_peak_memory_stats()
                            step()
                            torch.cuda.synchronize()
                            extra = torch.cuda.max_memory_allocated() - base
                        gbs = moved / ms / 1e6
                        print(f"{row} {ms:>9.3f} {gbs:>8.0f} {100 * gbs / copy_gbs:>6.1f}% "
                              f"{extra / 2**30:>15.3f} {extra / grad_bytes:>7.2f}", flush=True)
                    except torch.OutOfMemoryError:
                        print(f"{row} {'out of memory':>9}", flush=True)
                    except Exception as exc:                     # report and keep measuring
                        print(f"{row} failed: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
                    if on_gpu:
                        torch.cuda.empty_cache()
        del logits, teacher_all


def _sweep_launch_settings(N=8192, V=151_936):
    """Times a few (BLOCK, num_warps) choices for each kernel (bf16, with teacher); the best ones
    belong in FWD_BLOCK / FWD_WARPS / BWD_BLOCK / BWD_WARPS."""
    from triton.testing import do_bench

    global FWD_BLOCK, FWD_WARPS, BWD_BLOCK, BWD_WARPS
    saved = FWD_BLOCK, FWD_WARPS, BWD_BLOCK, BWD_WARPS
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).mul_(3)
    teacher = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).mul_(3)
    targets = torch.randint(0, V, (N,), device="cuda")
    upstream = [torch.randn(N, device="cuda") for _ in range(3)]
    entries = logits.numel()
    print(f"launch settings, N = {N}, V = {V}, bf16, with teacher")
    for FWD_BLOCK, FWD_WARPS in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
        with torch.no_grad():
            ms = do_bench(lambda: token_stats_triton(logits, targets, teacher), return_mode="median")
        print(f"  forward  BLOCK {FWD_BLOCK:>5} warps {FWD_WARPS:>2}: {ms:8.3f} ms "
              f"{8 * entries / ms / 1e6:6.0f} GB/s")
    FWD_BLOCK, FWD_WARPS = saved[:2]
    leaf = logits.detach().requires_grad_()
    with torch.enable_grad():
        out = token_stats_triton(leaf, targets, teacher)
    for BWD_BLOCK, BWD_WARPS in ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
        ms = do_bench(lambda: torch.autograd.grad([out["logp"], out["entropy"], out["jsd"]], leaf,
                                                  upstream, retain_graph=True), return_mode="median")
        print(f"  backward BLOCK {BWD_BLOCK:>5} warps {BWD_WARPS:>2}: {ms:8.3f} ms "
              f"{6 * entries / ms / 1e6:6.0f} GB/s")
    FWD_BLOCK, FWD_WARPS, BWD_BLOCK, BWD_WARPS = saved


if __name__ == "__main__":
    if "--dry-run" in sys.argv[1:]:  # CPU: the same benchmark code at tiny sizes (needs TRITON_INTERPRET=1)
        if not INTERPRETED:
            sys.exit("antisd_kernels.py --dry-run: set TRITON_INTERPRET=1 so that the Triton kernels run on the CPU")
        _benchmark(Ns=(8,), V=256, device="cpu", compile_backend="eager")
    elif not (torch.cuda.is_available() and HAS_TRITON) or INTERPRETED:
        print("antisd_kernels.py benchmark: needs a CUDA GPU with triton (and TRITON_INTERPRET unset); "
              "nothing to measure here.")
    elif "--sweep" in sys.argv[1:]:
        _sweep_launch_settings()
    else:
        _benchmark()
