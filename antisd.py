"""AntiSD: anti-self-distillation for reasoning RL, on one GPU.

One step (Algorithm 1 of arXiv 2605.11609; "M<n>" below cites section n of docs/METHOD.md, the summary
of the paper's equations and settings that this file follows):
  1. sample G rollouts per problem from the student                                  (M1)
  2. reward each rollout: is its final boxed answer equivalent to the gold (verify)? (M1)
  3. group advantages: z-score of the rewards within each group of G                 (M2)
  4. score every rollout twice with the same weights: as student (problem only) and as teacher
     (problem + a verified solution + feedback), keeping per-token log-probs, entropies, JSD (M1, M7)
  5. gate: switch the self-distillation term off while the teacher's entropy has collapsed (M6)
  6. per-token advantage = group advantage + lambda * (-phi(u)),  u = teacher - student log-prob (M4, M5)
  7. one clipped policy-gradient step, token-mean over the whole batch               (M2)
The file has two parts. Part I, from step 1 to the end of `main`, is the method: one section per
step, then `one_step` (steps 1-7 on one batch) and `main` (the loop). Part II is what the steps stand
on: the reward's refusal rules, the checker's worker, the float32 master weights, data, logging,
checkpoints, torchrun, the command line. The laptop tasks and their tiny models are in tiny_tasks.py.
Default self-distillation (--method sd, advantage +u, M3) runs the same code with another term in
step 6. GRPO (--method grpo) skips the teacher: no teacher prompts or scoring in step 4, no gate in
step 5, no term in step 6.

Design decisions:
  1. The teacher is the student's own current weights with a longer prompt (M1); it scores the
     sampled token ids, never re-tokenized text, so u is exactly PMI(y_t; c | x, y_<t).
  2. Prompts are left-padded and responses right-padded, so every response starts in the same column
     and the logits for response positions are one slice (`logits_to_keep`); position ids come from
     the attention mask, so padding never shifts a token's position.
  3. Everything per-token over the vocabulary (log-probs, entropies, JSD) goes through
     antisd_kernels.lm_head_token_stats: the lm_head projection fused with the statistics, a chunk of rows
     at a time, so no [tokens, V] logits exist; only per-token scalars live between micro-batches.
  4. The loss is a token-mean over the whole batch (sum over micro-batches / total tokens), so the
     gradient does not depend on --micro-batch-size.
  5. Weights are bf16 on the GPU but AdamW updates float32 master copies: a bf16 weight of size 1e-2
     has a spacing of 6e-5, so an lr=1e-6 step applied to it in place would round to nothing.
  6. Defaults are a one-GPU run: Qwen3-1.7B in non-thinking mode, 16 problems x 8 rollouts per step,
     responses up to 1,536 tokens (the paper: 32 x 8 and 32K tokens on many GPUs, M9).
  7. The reward checker (math-verify) runs in a worker process killed after VERIFY_SECONDS: some
     answers (9^9^9^9) hang it past its own time limit. A killed check scores 0, with a warning on
     stderr. The worker exits with its parent, even after a kill -9.
  8. Checkpoints hold everything a run needs to continue bit for bit (optimizer, RNG states, data
     cursor, gate state); --resume continues the newest whole one and refuses changed settings or
     data. Expected failures (bad input, out of memory) end with a one-paragraph message, no traceback.

Where this file differs from the paper, and why:
  - batch and response length are smaller (one GPU; see 6 above); everything else is M9's settings.
  - the teacher's prompt (M7) shows a correct sibling's text after its thinking block (the answer, not
    the search for it), and where neither a correct sibling nor a reference solution exists (DAPO has
    answers only) it shows "The final answer is \\boxed{gold}." rather than no solution at all.
  - --gate perplexity keeps the on/off gate of M6 with the official code's signal (teacher
    perplexity, reopening at 1.07x its warm-up value, M8).
  - --term official is the official code's form of the term (M8): -phi(u) with u clamped, tokens with
    |u| > 2 sigma left out, z-scored per sequence; --lambda-form continuous is its per-rollout lambda.
    With --gate perplexity they are the official code's AntiSD as far as M8 describes it. The
    paper's form stays the default.
  - --estimator full (not in the paper) replaces the sampled-token term by the exact gradient of the
    full-vocabulary JSD, at the cost of one more teacher forward per micro-batch. It is refused for
    --method sd, whose objective is the reverse KL (M3): antisd_kernels.py computes the JSD, and its exact
    gradient would descend another objective than the +u of the token estimator.

Run:  python antisd.py                                        # Qwen3-1.7B on MATH, one GPU
      python antisd.py --method grpo --out-dir runs/grpo      # the GRPO baseline, same code
      python antisd.py --method sd --out-dir runs/sd          # default self-distillation
      python antisd.py --term official --lambda-form continuous --gate perplexity  # the official code's AntiSD (M8)
      python antisd.py --resume                               # continue runs/antisd after a stop
      python antisd.py --model tiny --method grpo             # CPU, offline, minutes: a small model trained on
                                                              # arith (cached on first use), RL on held-out-checked arith
      python antisd.py --model tiny-search --method sd        # CPU, minutes: the task where checking pays, where
                                                              # SD stops checking and AntiSD keeps it (README)
      python antisd.py --model tiny-random --dataset arith --steps 3  # CPU, seconds: an untrained model, shapes only
      torchrun --nproc_per_node 8 antisd.py --eval-every 0    # FSDP2 over 8 GPUs (see World)
      python tiny_tasks.py                                    # one step by hand: what each step computes
"""


import argparse
import contextlib
import functools
import gc
import hashlib
import importlib
import inspect
import json
import math
import numbers
import os
import random
import re
import shlex
import shutil
import signal
import sys
import time
import types


def _stopped_while_starting(signum, frame):
    print(f"interrupted ({signal.Signals(signum).name}): stopped at once, nothing more was saved",
          file=sys.stderr, flush=True)
    os._exit(128 + signum)  # nothing is written yet; an exception could be swallowed inside an import


if __name__ == "__main__":  # a stop while the libraries below load: one line (run_as_script takes over after)
    for _signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(_signum, _stopped_while_starting)

import torch  # noqa: E402  (after the handlers above: loading torch and transformers takes seconds)
import torch.nn.functional as F

from antisd_kernels import IGNORE_INDEX, lm_head_token_stats

class UserError(ValueError):
    """A failure the user can fix (a bad flag, file, row or checkpoint, settings that break training):
    the command line prints its message alone and exits non-zero. Any other exception is a bug and
    keeps its traceback (run_command, at the end of this file)."""


# =============================================================================
# Part I: the method. Steps 1-7 of Algorithm 1 and the loop; read this next to the paper.
# =============================================================================


# -----------------------------------------------------------------------------
# 1. Sample G rollouts per problem from the student (M1), kept as token ids

STUDENT_INSTRUCTION = "Solve the following math problem step by step. Put your final answer within \\boxed{}.\n\n"


def student_message(problem):
    return STUDENT_INSTRUCTION + problem


def render_prompt(tokenizer, user_message, enable_thinking):
    """Token ids of a one-turn chat ending in the assistant header. Student and teacher use the same
    settings, or the first response tokens see different contexts and get a spurious u (M7)."""
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=True, enable_thinking=enable_thinking)
    return list(encoded["input_ids"])


def student_prompt_ids(tokenizer, problem, enable_thinking):
    return render_prompt(tokenizer, student_message(problem), enable_thinking)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p, batch_size, synced_gpus=False,
             compiled=False):
    """One sampled response per prompt: (token ids up to and including the stop token, truncated).
    Prompts are generated in length order to cut padding; results come back in input order.
    compiled=True decodes with the compiled decoder (Part II; unmeasured, only the GPU benchmark uses it)."""
    from transformers import CompileConfig, GenerationConfig
    stop_ids = stop_token_ids(model, tokenizer)
    # every sampling setting is explicit: unset ones would be filled from the model's own
    # generation_config (Qwen3 ships top_k=20), and the rollouts would not come from pi_theta
    config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                              min_p=0.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                              eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    if compiled:
        config.compile_config = CompileConfig(**COMPILE_OPTIONS)
        config.compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        # transformers 5.17 calls the cache argument past_key_values, later versions cache
        cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    was_training = model.training
    model.eval()  # in train mode with gradient checkpointing, transformers turns the KV cache off
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = [prompt_ids[i] for i in rows]
        extra = {}
        if compiled:  # a short last batch would be a new shape: fill it with copies, dropped below
            batch += [batch[-1]] * (batch_size - len(batch))
            extra[cache_argument] = reusable_static_cache(model, batch_size, max(map(len, batch)), max_new_tokens)
        input_ids, attention_mask = left_pad(batch, tokenizer.pad_token_id, model.device)
        # synced_gpus (torchrun): a rank whose batch has finished keeps stepping with the others
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                synced_gpus=synced_gpus, **extra)
        for i, new_tokens in zip(rows, output[:, input_ids.shape[1]:].tolist()):
            results[i] = cut_at_stop(new_tokens, stop_ids)
    model.train(was_training)
    return results


def cut_at_stop(new_tokens, stop_ids):
    """(the tokens up to and including the first stop token, False), or (all of them, True) when none
    stopped it: truncated. The stop token stays in the response: the policy must learn when to stop."""
    stop = next((k for k, tok in enumerate(new_tokens) if tok in stop_ids), None)
    return (new_tokens[:stop + 1], False) if stop is not None else (new_tokens, True)


def decode_response(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


# -----------------------------------------------------------------------------
# 2. Reward: 1 if the final \boxed{} answer is equivalent to the gold answer (M1)

def verify(response, gold):
    """1.0 if the response's final answer equals the gold answer, else 0.0 (M1). The answer is every
    \\boxed{} after the thinking block, read together as one list (extract_boxed); a box that could
    hold two answers is refused (clean_answer); math-verify decides equivalence, in a worker process
    killed after VERIFY_SECONDS. A missing or refused answer and an unparsable gold are 0, never 1.
    The rules are in Part II ("The reward's rules")."""
    gold = clean_gold_once(gold) if isinstance(gold, str) else clean_gold(gold)
    answer = extract_boxed(response)
    if answer is None or gold is None or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    return float(_check_math("verify", gold, answer))


# -----------------------------------------------------------------------------
# 3. Group advantages (M2)

def group_advantages(rewards, group_size, eps=1e-6):
    """A_seq_i = (R_i - mean_group) / (std_group + eps); a group whose rewards are equal gives 0.
    std is the sample standard deviation (divides by G - 1), as in verl, which the paper's code uses."""
    grouped = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)  # [P, G]
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    return (centered / (grouped.std(dim=1, keepdim=True) + eps)).flatten()  # [P*G]


# -----------------------------------------------------------------------------
# 4. Scoring: teacher prompts (M7), then student and teacher log-probs of the sampled tokens (M1)

def strip_thinking(text):
    """A sibling's text after its thinking block (M7). Everything up to the last </think> goes, with
    or without a <think> opener: templates that put <think> in the prompt (Qwen3 *-Thinking-2507)
    leave only the closing tag in the response."""
    return text.rsplit("</think>", 1)[-1].strip()


MAX_SOLUTION_TOKENS = 1024  # the solution shown to the teacher is cut to this; the problem never is


def truncate_to_tokens(tokenizer, text, budget):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= budget else tokenizer.decode(ids[:budget])


def build_teacher_prompt(problem, index, rewards, sibling_texts, reference_solution, gold, rng,
                         tokenizer=None, max_solution_tokens=None):
    """The teacher's user message for rollout `index` of a group (M7).

    The solution shown is a correct sibling chosen at random, never the rollout itself; without one,
    the dataset's reference solution; without that, the gold answer. The feedback is about rollout
    `index`. Only the solution is truncated to max_solution_tokens; the problem never is."""
    correct_siblings = [j for j, r in enumerate(rewards) if r == 1 and j != index]
    if correct_siblings:
        solution = strip_thinking(sibling_texts[rng.choice(correct_siblings)])
    elif reference_solution:
        solution = reference_solution
    else:
        solution = f"The final answer is \\boxed{{{gold}}}."
    if tokenizer is not None and max_solution_tokens is not None:
        solution = truncate_to_tokens(tokenizer, solution, max_solution_tokens)
    feedback = "Your answer is correct." if rewards[index] == 1 else "Your answer is incorrect."
    return (student_message(problem)
            + f"\nYour previous attempt:\n\n{solution}\n\n"
            + f"\nPrevious assessment: {feedback}\n"
            + "\n\nNow solve this problem step by step.\n")


def teacher_prompts_for_step(tokenizer, problems, rewards, texts, rng, args):
    """Token ids of each rollout's teacher prompt (M7), in rollout order: rollouts g*G .. g*G + G-1
    are the group of problems[g], and each sees a sibling of its own group and its own feedback.
    Rendered with the student's chat-template settings (render_prompt)."""
    group_size, prompts = args.group_size, []
    for i in range(len(texts)):
        first = i - i % group_size
        group = slice(first, first + group_size)
        item = problems[i // group_size]
        message = build_teacher_prompt(item["problem"], i - first, rewards[group], texts[group], item["solution"],
                                       item["answer"], rng, tokenizer, MAX_SOLUTION_TOKENS)
        prompts.append(render_prompt(tokenizer, message, args.enable_thinking))
    return prompts


def pack(prompts, responses, pad_id, device):
    """Left-pad the prompts and right-pad the responses, so response token j of every row sits at
    column P + j. targets[:, j] is response token j (IGNORE_INDEX past its end) and has one extra
    IGNORE column, so that the R+1 kept logits reshape to rows without a copy."""
    prompt_width = max(len(p) for p in prompts)
    response_width = max(len(r) for r in responses)
    input_ids = torch.full((len(prompts), prompt_width + response_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    targets = torch.full((len(prompts), response_width + 1), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids[row, prompt_width - len(prompt):prompt_width] = torch.tensor(prompt)
        input_ids[row, prompt_width:prompt_width + len(response)] = torch.tensor(response)
        attention_mask[row, prompt_width - len(prompt):prompt_width + len(response)] = 1
        targets[row, :len(response)] = torch.tensor(response)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # pads never shift a position
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device), targets.to(device)


def response_mask(responses, device):
    """[N, R] True on each response's tokens: the layout of score's outputs (zeros past each end)."""
    lengths = torch.tensor([len(r) for r in responses], device=device)
    return torch.arange(int(lengths.max()), device=device)[None, :] < lengths[:, None]


def response_hidden(model, prompts, responses, pad_id):
    """Final hidden states (after the last norm) at the positions that predict each response token:
    [B, R+1, H], and targets [B, R+1]. The [B, R+1, V] logits are never formed:
    `response_token_stats` projects them through the lm_head chunk by chunk."""
    input_ids, attention_mask, position_ids, targets = pack(prompts, responses, pad_id, model.device)
    # through the whole model's forward, not model.model's, so that FSDP2 (torchrun) gathers the root's
    # weights; logits for no position (an empty index), the last hidden state is after the final norm
    no_position = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                   logits_to_keep=no_position, output_hidden_states=True).hidden_states[-1]  # [B, P+R, H]
    return hidden[:, -targets.shape[1]:], targets                                                # [B, R+1, H]


def response_token_stats(model, prompts, responses, pad_id, temperature, teacher_prompts=None):
    """Per response token of one micro-batch, [B, R] each: logp and entropy (differentiable), and with
    teacher_prompts t_logp, t_entropy and jsd (the teacher's forward runs under no_grad, M1). The
    lm_head projection is fused with antisd_kernels.token_stats per chunk of rows, so memory beyond the
    hidden states is O(chunk x V) whatever the response length (design decision 3)."""
    teacher_hidden = None
    if teacher_prompts is not None:  # first: the student's forward is then the last before its backward
        with torch.no_grad():
            teacher_hidden = response_hidden(model, teacher_prompts, responses, pad_id)[0].flatten(0, 1)
    hidden, targets = response_hidden(model, prompts, responses, pad_id)
    stats = lm_head_token_stats(hidden.flatten(0, 1), model.get_output_embeddings().weight, targets.flatten(),
                                teacher_hidden, temperature=temperature)
    r = targets.shape[1] - 1  # the extra last column predicts past the response
    return {name: value.view(targets.shape)[:, :r] for name, value in stats.items()}


@torch.no_grad()
def score(model, student_prompts, teacher_prompts, responses, pad_id, micro_batch_size, temperature):
    """Per response token, padded to [N, R] with zeros past each end: logp (s_old, the student's
    log-prob), entropy, and with teacher prompts t_logp (t), t_entropy and jsd. teacher_prompts=None
    scores the student alone."""
    width = max(len(r) for r in responses)
    names = ("logp", "entropy") if teacher_prompts is None else ("logp", "entropy", "t_logp", "t_entropy", "jsd")
    out = {name: torch.zeros(len(responses), width, device=model.device) for name in names}
    for start in range(0, len(responses), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        stats = response_token_stats(model, student_prompts[rows], responses[rows], pad_id, temperature,
                                     None if teacher_prompts is None else teacher_prompts[rows])
        for name in names:
            out[name][rows, :stats[name].shape[1]] = stats[name]  # [mb, R]
    return out


# -----------------------------------------------------------------------------
# 5. The entropy-triggered gate (M6)

def median(values):
    """The median of a tensor's elements; for an even count the mean of the two middle ones, as
    statistics.median (torch.median returns the lower one). The gate's H and H_warm both use it."""
    ordered = values.flatten().sort().values
    n = ordered.numel()
    return (float(ordered[(n - 1) // 2]) + float(ordered[n // 2])) / 2


class EntropyGate:
    """Schmitt trigger on a per-step signal (the median teacher entropy, M6).

    The first `warmup` steps return lambda 0 and record the signal; H_warm is their median and
    tau_down = tau_ratio * H_warm. After that, with g starting at 1: g -> 0 when the signal falls
    below tau_down, g -> 1 when it is back at reopen_ratio * H_warm or above. lambda = g * lambda_max."""

    def __init__(self, warmup=5, tau_ratio=0.93, lambda_max=0.5, reopen_ratio=1.0):
        if warmup < 1:
            raise ValueError("--gate-warmup must be at least 1: the gate calibrates on the warm-up steps")
        self.warmup, self.tau_ratio, self.lambda_max, self.reopen_ratio = warmup, tau_ratio, lambda_max, reopen_ratio
        self.history, self.h_warm, self.tau_down, self.on = [], None, None, True

    def update(self, signal):
        if len(self.history) < self.warmup:
            self.history.append(float(signal))
            if len(self.history) == self.warmup:
                self.h_warm = median(torch.tensor(self.history, dtype=torch.float64))
                self.tau_down = self.tau_ratio * self.h_warm
            return 0.0
        if self.on and signal < self.tau_down:
            self.on = False  # the teacher has collapsed: u is noise now
        elif not self.on and signal >= self.reopen_ratio * self.h_warm:
            self.on = True
        return self.lambda_max if self.on else 0.0

    def state_dict(self):
        return {"history": list(self.history), "h_warm": self.h_warm, "tau_down": self.tau_down, "on": self.on}

    def load_state_dict(self, state):
        self.history, self.h_warm, self.tau_down, self.on = (list(state["history"]), state["h_warm"],
                                                             state["tau_down"], state["on"])


def make_gate(args):
    """The run's gate: on the median teacher entropy (M6), or on the teacher perplexity, reopening at
    1.07 times its warm-up value as in the official code (M8); None for grpo or --gate none."""
    if args.method == "grpo" or args.gate == "none":
        return None
    return EntropyGate(args.gate_warmup, args.tau_ratio, args.lambda_max,
                       reopen_ratio=1.07 if args.gate == "perplexity" else 1.0)


# -----------------------------------------------------------------------------
# 6. Per-token advantages (M3, M4, M5)

def antisd_advantage(u):
    """-phi(u), phi(u) = (softplus(u) - log 2) / 2: bounded above by log(2)/2 (M4)."""
    return -0.5 * (F.softplus(u) - math.log(2.0))


def continuous_lambda(t_logp, mask, tau, lambda_max):
    """The official code's per-sequence lambda (M8), an option: from the teacher's perplexity of each
    rollout, ppl_i = exp(-mean_t t), lambda_i = clamp(0.2 log(clamp(ppl_i / tau, 0.5, 3)), 0, lambda_max),
    tau the perplexity gate's tau_down. It is 0 at or below tau and at most 0.2 log 3 = 0.22: the
    term weighs most on the rollouts the teacher finds least likely. [N, R] -> [N, 1]."""
    ppl = torch.exp(-(t_logp * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1))    # [N]
    return (0.2 * torch.log((ppl / tau).clamp(0.5, 3.0))).clamp(0.0, lambda_max)[:, None]


def official_antisd_term(u, mask, eps=1e-6):
    """The official code's AntiSD term (M8), an option: u clamped to +-5, tokens with |u| > 2 sigma
    zeroed, -phi of the rest z-scored within each sequence and clipped to +-5. M8 does not say over
    which tokens sigma_ref is taken: here it is the standard deviation of u over the batch's response
    tokens. Zeroed tokens get no term and do not count in their sequence's mean and std (the sample
    std, as in group_advantages). u, mask: [N, R] -> [N, R], 0 off the mask."""
    sigma = u[mask].std() if mask.sum() > 1 else u.new_tensor(0.0)
    kept = mask & (u.abs() <= 2 * sigma)                                        # [N, R]
    a = antisd_advantage(u.clamp(-5.0, 5.0)) * kept                             # -phi(u) (M4)
    count = kept.sum(dim=1, keepdim=True)                                       # [N, 1]
    mean = a.sum(dim=1, keepdim=True) / count.clamp(min=1)
    var = (((a - mean) * kept) ** 2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
    return ((a - mean) / (var.sqrt() + eps) * kept).clamp(-5.0, 5.0)           # [N, R]


def token_advantages(seq_adv, u, lam, method, divergence, compose, term="paper", mask=None):
    """A_{i,t} from the group advantage [N] and u [N, R] (M5); term "official" (M8) needs the
    response mask [N, R]."""
    if method == "grpo":
        a = torch.zeros_like(u)
    elif method == "sd":
        a = u                                     # descend KL(pi_S || pi_T): +u (M3)
    elif divergence == "jsd" and term == "official":
        a = official_antisd_term(u, mask)         # the official code's normalised -phi(u) (M8)
    elif divergence == "jsd":
        a = antisd_advantage(u)                   # ascend JSD: -phi(u) (M4)
    else:
        a = -u                                    # ascend reverse KL: -u, unbounded (M5 ablation)
    if compose == "mult":
        return seq_adv[:, None] * (1 + lam * a), a  # [N, R] M5 ablation
    return seq_adv[:, None] + lam * a, a          # [N, R] additive (M5)


def gate_and_advantages(stats, mask, seq_adv, gate, args):
    """Steps 5 and 6 of Algorithm 1: from one batch's scoring statistics to the gate and the
    per-token advantages. stats: `score`'s [N, R] tensors (logp, t_logp, t_entropy; None or student
    only for grpo); mask [N, R]: response tokens; seq_adv [N]; gate: an EntropyGate (updated here,
    once per step) or None. Returns a dict:
      u [N, R]                t - s_old on response tokens, 0 past each end (M1)
      teacher_entropy_median  H over the batch's response tokens (M6); 0.0 without a teacher
      gate_signal             H, or the teacher perplexity with --gate perplexity (M8); 0.0 without a teacher
      gate_on                 the per-token term is on this step: after warm-up with g = 1, or no gate
      lam                     lambda = g * lambda_max (M5); 0 during warm-up and for grpo; with
                              --lambda-form continuous the mean over rollouts of g * lambda_i (M8)
      a [N, R]                the per-token term (-phi(u), +u or -u); None with --estimator full
      advantages [N, R]       A_seq + lam * a (M5), or A_seq alone with --estimator full; 0 past each end
      jsd_weight              lam with --estimator full (the loss ascends the exact JSD, M4), else 0"""
    if args.method == "grpo":
        u = torch.zeros(mask.shape, device=mask.device)                        # [N, R]
        teacher_entropy_median, signal_value, lam, gate_on = 0.0, 0.0, 0.0, False
    else:
        u = (stats["t_logp"] - stats["logp"]) * mask                            # [N, R] PMI, M1
        teacher_entropy_median = median(stats["t_entropy"][mask])               # H, M6
        signal_value = (teacher_entropy_median if args.gate != "perplexity"
                        else math.exp(-float(stats["t_logp"][mask].mean())))    # M8
        if gate is None:
            lam, gate_on = args.lambda_max, True
        else:
            warming_up = len(gate.history) < gate.warmup  # g starts at 1, but lambda is 0 until H_warm is set
            lam = gate.update(signal_value)
            gate_on = not warming_up and gate.on
            if args.lambda_form == "continuous" and lam:  # one lambda per rollout [N, 1] (M8)
                lam = continuous_lambda(stats["t_logp"], mask, gate.tau_down, args.lambda_max)
    if args.estimator == "full":  # the exact JSD gradient replaces the sampled-token term
        advantages, a, jsd_weight = seq_adv[:, None].expand(mask.shape), None, lam
    else:
        advantages, a = token_advantages(seq_adv, u, lam, args.method, args.divergence, args.compose,
                                         args.term, mask)
        jsd_weight = 0.0
    lam = float(lam.mean()) if torch.is_tensor(lam) else lam
    return {"u": u, "teacher_entropy_median": teacher_entropy_median, "gate_signal": signal_value,
            "gate_on": gate_on, "lam": lam, "a": a, "advantages": advantages * mask, "jsd_weight": jsd_weight}


# -----------------------------------------------------------------------------
# 7. The update: PPO clipped surrogate, token-mean over the batch (M2)

GRAD_CLIP = 1.0  # the norm the gradient is clipped to before each optimizer step, as in verl


def policy_loss(new_logp, old_logp, advantages, mask, total_tokens, clip):
    """Sum over this micro-batch of the clipped surrogate, divided by the token count of the whole
    batch: summed over micro-batches it is the batch token-mean. Also the number of tokens where
    the clip binds: min() picks the clipped term and it is smaller (r > 1 + clip with A > 0, or
    r < 1 - clip with A < 0), so that the token contributes no gradient."""
    ratio = torch.exp(new_logp - old_logp)                                          # [mb, R]
    unclipped, clipped = ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    binding = (clipped < unclipped) & mask
    return -(surrogate * mask).sum() / total_tokens, binding.sum()


def policy_gradient(model, prompts, responses, advantages, mask, old_logp, pad_id, micro_batch_size,
                    clip, temperature, teacher_prompts=None, jsd_weight=0.0, total_tokens=None):
    """Accumulates into .grad the gradient of the batch's token-mean clipped surrogate, one
    micro-batch at a time. old_logp=None means ratio 1 (one update per batch, no scoring pass).
    With jsd_weight != 0 (--estimator full) the loss also has -jsd_weight * token-mean JSD over the
    full vocabulary, the teacher re-scored under no_grad. Returns (loss, number of tokens where the
    clip binds). total_tokens: the token count of the whole batch, when these rows are one process's
    share of it (torchrun); by default mask's."""
    total_tokens = int(mask.sum()) if total_tokens is None else total_tokens
    loss_total, clipped_total = 0.0, 0
    for start in range(0, len(responses), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        stats = response_token_stats(model, prompts[rows], responses[rows], pad_id, temperature,
                                     teacher_prompts[rows] if jsd_weight else None)
        new_logp = stats["logp"]                                                         # [mb, R]
        r = new_logp.shape[1]
        old = new_logp.detach() if old_logp is None else old_logp[rows, :r]
        loss, clipped = policy_loss(new_logp, old, advantages[rows, :r], mask[rows, :r], total_tokens, clip)
        if jsd_weight:  # ascend (antisd, weight > 0) or descend (sd, weight < 0) the exact JSD
            loss = loss - jsd_weight * (stats["jsd"] * mask[rows, :r]).sum() / total_tokens
        loss.backward()
        loss_total += loss.item()
        clipped_total += int(clipped)
    return loss_total, clipped_total


def update_policy(model, optimizer, prompts, responses, terms, mask, old_stats, teacher_prompts, pad_id, world, args):
    """--ppo-epochs passes of policy_gradient + a clipped-norm optimizer step over this process's rows
    (torchrun: its share; the loss is still divided by the whole batch's token count). An epoch whose
    loss or gradient is not finite is not applied and ends the update. old_stats: score's statistics
    (None: ratio 1, the old log-probs are the detached new ones). Returns the losses and gradient norms
    of the epochs run, the tokens where the clip bound, and the number of epochs applied."""
    my_rows, total_tokens = world.rows(len(mask)), int(mask.sum())
    update = {"losses": [], "grad_norms": [], "clipped_tokens": 0, "epochs_applied": 0}
    for epoch in range(args.ppo_epochs):
        try:
            loss, clipped = policy_gradient(
                model, prompts, responses, terms["advantages"][my_rows], mask[my_rows],
                None if old_stats is None else old_stats["logp"][my_rows], pad_id, args.micro_batch_size,
                args.clip, args.temperature, teacher_prompts, terms["jsd_weight"], total_tokens)
            loss, clipped = world.sum(loss), int(world.sum(clipped))  # global: every rank agrees
        except torch.cuda.OutOfMemoryError:
            raise out_of_memory("the update", "--micro-batch-size", args.micro_batch_size) from None
        grad_norm = optimizer.clip_gradients(GRAD_CLIP)
        update["losses"].append(loss)
        update["grad_norms"].append(grad_norm)
        update["clipped_tokens"] += clipped
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            optimizer.zero_grad()
            break
        optimizer.step()
        update["epochs_applied"] += 1
    return update


# -----------------------------------------------------------------------------
# The training loop: steps 1-7 once per optimizer step

def one_step(model, tokenizer, batch, optimizer, gate, rng, world, timer, args):
    """Steps 1-7 of Algorithm 1 on one batch of problems (rollout i is of batch[i // G]). Returns what
    the step computed: the loop logs it, and the worked step (python tiny_tasks.py) prints it."""
    my_problems = world.share(batch)  # torchrun: this rank's whole groups; one process: all

    # ---- 1. sample G rollouts per problem from the student (M1)
    student_prompts = [student_prompt_ids(tokenizer, item["problem"], args.enable_thinking)
                       for item in my_problems for _ in range(args.group_size)]
    with timer("generate", "--gen-batch-size", args.gen_batch_size), whole_weights_for_generation(model):
        samples = generate(model, tokenizer, student_prompts, args.max_new_tokens, args.temperature, args.top_p,
                           args.gen_batch_size, synced_gpus=world.size > 1)
    my_responses = [ids for ids, _ in samples]
    my_texts = [decode_response(tokenizer, ids) for ids in my_responses]

    # ---- 2. reward: 1 if the final boxed answer is equivalent to the gold (M1)
    my_golds = [item["answer"] for item in my_problems for _ in range(args.group_size)]
    my_rewards = [verify(text, gold) for text, gold in zip(my_texts, my_golds)]

    # ---- 3. group advantages over the whole step (M2); torchrun: every rank's rollouts
    responses, texts, rewards = (world.gather(x) for x in (my_responses, my_texts, my_rewards))
    truncated = world.gather([cut for _, cut in samples])
    seq_adv = group_advantages(rewards, args.group_size).to(model.device)                 # [N]

    # ---- 4. score the sampled ids as student and as teacher (M1, M7): s_old, t, H, JSD
    with timer("score", "--micro-batch-size", args.micro_batch_size):
        teacher_prompts = None if args.method == "grpo" else teacher_prompts_for_step(
            tokenizer, my_problems, my_rewards, my_texts, rng, args)
        stats = None  # grpo with one epoch: ratio 1, the old log-probs are the detached new ones
        if args.method != "grpo" or args.ppo_epochs > 1:
            stats = score(model, student_prompts, teacher_prompts, my_responses, tokenizer.pad_token_id,
                          args.micro_batch_size, args.temperature)
    if stats is not None:
        stats = {name: world.gather(value).to(model.device) for name, value in stats.items()}  # [N, R]
    mask = response_mask(responses, model.device)                                           # [N, R]

    # ---- 5. gate (M6) and 6. per-token advantages A_seq + lambda * (-phi(u)) (M4, M5)
    terms = gate_and_advantages(stats, mask, seq_adv, gate, args)

    # ---- 7. clipped policy-gradient step(s), token-mean over the whole batch (M2)
    with timer("update"):
        update = update_policy(model, optimizer, student_prompts, my_responses, terms, mask, stats,
                               teacher_prompts, tokenizer.pad_token_id, world, args)
    return types.SimpleNamespace(student_prompts=student_prompts, teacher_prompts=teacher_prompts,
                                 responses=responses, texts=texts, rewards=rewards, truncated=truncated,
                                 seq_adv=seq_adv, stats=stats, mask=mask, terms=terms, update=update)


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device, args.model)
    world = World(device)  # torchrun's processes; one process: rank 0 of 1
    refuse_what_sharding_cannot_do(world, args)
    checkpoints = prepare_out_dir(args, world)  # one run per folder, never over an existing run
    problems, dropped = load_problems(args.dataset, args.seed)
    args.dataset_fingerprint = dataset_fingerprint(problems)  # a run-defining setting, saved with the others
    print(f"dataset {args.dataset}: {len(problems)} problems, {dropped} dropped (gold answer unparsable)")
    evaluation, eval_sets = load_eval_sets(args)
    stream = ProblemStream(len(problems), args.seed)
    checkpoint, resumed, model, tokenizer = start_or_resume(args, checkpoints, device, world)
    if device.type == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if world.sharded:
        model = shard_model(model, world, device)
    model.train()
    optimizer = MasterAdamW(model, args.lr, world)
    gate = make_gate(args)
    rng = random.Random(args.seed + world.rank)  # sibling choice and rollout logging
    torch.manual_seed(args.seed + world.rank)  # each rank samples its own rollouts
    first_step = 1
    if resumed:
        first_step = restore_trainer_state(resumed, optimizer, stream, gate, rng, device)
        if first_step > args.steps:
            return nothing_left_to_run(checkpoint, first_step - 1, args.steps)
        print(f"resumed from {checkpoint}: continuing at step {first_step}")
    logs = RunLogs(args.out_dir, world, first_step)
    timer, bad_steps, last_saved = PhaseTimer(device), 0, checkpoint if resumed else None
    with logs, StopRequests() as stop:  # Ctrl-C / SIGTERM: finish the current step, save, exit
        if eval_sets and first_step == 1:  # the starting model, so that the curves show the change
            logs.write_metrics({"step": 0, **evaluate_in_loop(evaluation, model, tokenizer, eval_sets, args)})
        for step in logs.progress_bar(first_step, args.steps, args.method):
            batch = [problems[i] for i in stream.next(args.prompts_per_step)]
            done = one_step(model, tokenizer, batch, optimizer, gate, rng, world, timer, args)   # steps 1-7

            # ---- log, evaluate, save
            bad_steps = 0 if done.update["epochs_applied"] == args.ppo_epochs else bad_steps + 1
            record = step_metrics(step, done.rewards, done.truncated, done.mask, done.stats, done.terms, done.update,
                                  gate, timer, args, done.texts, batch)
            if eval_sets and step % args.eval_every == 0:
                record.update(evaluate_in_loop(evaluation, model, tokenizer, eval_sets, args))
            logs.write_step(step, record, rng, tokenizer, batch, done, args.group_size)
            if bad_steps >= MAX_BAD_STEPS:
                raise too_many_bad_steps(step, bad_steps, last_saved, args)
            if step % args.save_every == 0 or step == args.steps or stop.requested:
                last_saved = save_checkpoint(args.out_dir, step, model, tokenizer,
                                             trainer_state(step, args, optimizer, stream, gate, rng, device, world),
                                             KEEP_CHECKPOINTS, world)
            if stop.requested and step < args.steps:
                return stop.say_how_to_resume(step, last_saved, argv)
    print(f"done: {args.steps} steps, checkpoint in {last_saved}")


# =============================================================================
# Part II: infrastructure. Nothing below changes what a step computes; it makes it run (the
# grader's refusal rules, the checker's process, the float32 master weights, data, checkpoints,
# torchrun, the command line). The laptop tasks and their tiny models live in tiny_tasks.py.
# =============================================================================


# -----------------------------------------------------------------------------
# Sampling mechanics: padding, and the compiled decoder

def left_pad(sequences, pad_id, device):
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq):] = torch.tensor(seq)
        attention_mask[row, width - len(seq):] = 1
    return input_ids.to(device), attention_mask.to(device)


# --generate-with compiled: transformers decodes from a static KV cache with its forward under
# torch.compile (mode "reduce-overhead": CUDA graphs, so one token step is a few graph launches instead
# of hundreds of Python-issued kernels). The prefill stays eager. It compiles again whenever a shape
# changes, and CUDA graphs are recorded again whenever the cache moves in memory, so both are fixed
# for the whole run: every call is padded to exactly batch_size rows and decodes into one cache,
# allocated once (STATIC_CACHE_BUCKET-rounded prompt width + max_new_tokens) and emptied in place
# before each call. Weights are read by address, so in-place optimizer steps need no recompilation.
STATIC_CACHE_BUCKET = 512
COMPILE_OPTIONS = {"mode": "reduce-overhead", "fullgraph": False, "dynamic": False}


def reusable_static_cache(model, batch_size, prompt_width, max_new_tokens):
    """The model's one static KV cache, emptied; a new one only for a new batch size or a longer
    prompt than it holds (then the decode step compiles again)."""
    from transformers import StaticCache
    needed = prompt_width + max_new_tokens
    cache, size = getattr(model, "_rollout_cache", (None, None))
    if cache is None or size[0] != batch_size or size[1] < needed:
        model._rollout_cache = None  # free the old one first
        length = -(-prompt_width // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET + max_new_tokens
        cache, size = StaticCache(config=model.config, max_cache_len=length), (batch_size, length)
        model._rollout_cache = (cache, size)
    cache.reset()
    return cache


# -----------------------------------------------------------------------------
# The reward's rules: which box is the answer, what a box may hold, how golds are cleaned
#
# verify (step 2) applies them in this order:
#   1. the answer is what follows </think>; no answer while thinking is unfinished;
#   2. every \boxed{} there, read together as one list; a cut-off last box means no answer;
#   3. a box is refused if it could hold two answers (clean_answer): an unescaped $, a line break
#      or & outside a matrix, a LaTeX command that answers are not written with (arrows,
#      strike-outs, \tag, documents, environments other than matrices), an unpaired |, or text
#      between formulas other than "and"/"or";
#   4. both sides are normalised (normalise_math; a raw gold goes through clean_gold first):
#      whitespace and newlines, thin spaces as thousands separators (10\,000), scientific notation
#      (4.5e33, 4.5 \times 10^{33}) as 45 \times 10^{32}, \mathrm{e} and \mathrm{i} as e and i, % as \%,
#      \$ dropped;
#   5. x = 5 is the answer 5, but a relation between two different numbers (6 = 5) is wrong;
#   6. math-verify decides equivalence, in the worker, within VERIFY_SECONDS; a number below 0.1 must
#      also agree to six significant digits (small_numbers_differ), not only to six decimal places.


@functools.lru_cache(maxsize=65536)
def clean_gold_once(gold):
    """clean_gold of a text gold, remembered: training verifies every rollout against its gold, and a
    gold that is not a plain number costs a round trip to the worker to clean. Golds that are already
    clean come back unchanged."""
    return clean_gold(gold)


MAX_ANSWER_CHARS = 1000  # no real answer is longer; a runaway one is wrong, not worth 5 seconds


def extract_boxed(response):
    """The final answer: every \\boxed{} after the thinking block, read together as one list, whatever
    stands between them ("\\boxed{1} and \\boxed{2}" is 1, 2; a repeated box counts once). Boxes that
    hedge ("\\boxed{5}, no wait, \\boxed{6}") are then a list that equals no single gold. None while
    thinking is unfinished, when there is no box, when the last box is cut off, or when a box is
    refused by clean_answer."""
    if "</think>" in response:
        response = response.rsplit("</think>", 1)[1]
    elif "<think>" in response:
        return None
    boxes = all_boxed(response, prose_between=True)
    if boxes is None:  # no box, or one cut off (an earlier, retracted box is not the answer)
        return None
    answers = [clean_answer(box) for box in boxes]
    if None in answers:
        return None
    return ", ".join(dict.fromkeys(answers))


def last_boxed(text):
    """Content of the last balanced \\boxed{...} in text, or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j]
        start = text.rfind("\\boxed{", 0, start)  # unbalanced (cut off): try the one before
    return None


def all_boxed(text, prose_between=False):
    """Contents of every \\boxed{...} in text, in order. Unless prose_between, the text between two
    boxes may only be a list separator (",", "and", "or", spacing, $ or \\( \\)), so
    "\\boxed{1} and \\boxed{2}" is 1, 2 but "\\boxed{1} no, \\boxed{2}" is None. None also when a box
    is cut off (unbalanced) and when there is no box."""
    boxes, gaps, start, end = [], [], text.find("\\boxed{"), 0
    while start != -1:
        gaps.append(text[end:start])
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                boxes.append(text[i + 1:j])
                break
        else:
            return None
        end = j + 1
        start = text.find("\\boxed{", end)
    for gap in gaps[1:] if not prose_between else []:
        words = re.sub(r"\\[()\[\]]|\$|\\q?quad|\\text\s*\{|\\[,;!]|[\s,.;:{}~&]", " ", gap).split()
        if not set(words) <= {"and", "or"}:
            return None
    return boxes or None


# What a box may hold. math-verify reads an unknown relation or arrow as its right side and skips what
# it cannot parse, so "6 \to 5", "\cancel{6} 5", "6 \\ 5" or "6 \tag{x} 5" would all be read as 5: one
# box, two answers. So a box may use only the LaTeX commands that answers are written with.
ANSWER_COMMANDS = set("""
    frac dfrac tfrac cfrac sqrt binom dbinom tbinom left right big Big bigg Bigg bigl bigr Bigl Bigr
    cdot times div pm mp circ degree prime infty partial nabla hbar ell AA mho angle triangle odot star ast
    alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi omicron pi
    varpi rho varrho sigma varsigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi
    Sigma Upsilon Phi Psi Omega sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln lg exp
    max min gcd lcm det deg lim sum prod int pmod
    text textbf textit textrm textnormal textup textsf mbox mathrm mathbf mathit mathsf mathcal mathbb
    boldsymbol bold emph operatorname overline underline bar hat vec dot ddot tilde widehat widetilde
    overrightarrow emptyset varnothing setminus cup cap in notin subset subseteq supset supseteq le leq ge
    geq lt gt neq ne leqslant geqslant approx equiv sim simeq cong propto mid parallel perp lfloor rfloor
    lceil rceil langle rangle lvert rvert vert Vert quad qquad dots ldots cdots displaystyle limits
    begin end""".split())
MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|smallmatrix|array)\}.*?\\end\{\1\}")  # their \\ and & are theirs
TEXT = re.compile(r"(\\(?:text(?:bf|it|rm|sf|normal|up)?|mbox|mathrm)\s*\{[^{}]*\})")
LIST_WORDS = {"and", "or", ",", ", and", "and also"}  # "6 \text{ and } 8" is the list 6, 8
REFUSED_IN_ANSWER = re.compile(
    r"(?<!\\)\$"                                     # a '$' splits the box into two formulas
    r"|\\\\|&|\\&|:=|=:"                             # a line break or a column outside a matrix
    r"|\\operatorname\s*\{[^{}]*[^a-zA-Z{}][^{}]*\}"  # \operatorname{6}: a name is letters
    r"|(?<![,+\-=])(?<![,+\-=] )\\[lc]?dots(?! ?[,+\-=])")  # "6 \dots 5"; "1, 2, \dots" is a list


# relations whose two sides, both numbers, must be equal: "6 = 5" is not the answer 5
RELATION = re.compile(r"(?<![<>!\\])=(?!=)|\\(?:equiv|approx|sim|simeq|cong|propto|in|mid|parallel|perp|cup|cap"
                      r"|setminus|subset|subseteq|supset|supseteq)(?![a-zA-Z])")


# a number in scientific notation: 4.5e33, 4.5E+33, 4.5 \times 10^{33}, 4.5 \cdot 10^{33}. The e needs digits
# right after it (3e is 3 times Euler's e, 2e - 1 is 2e minus 1), the number is not part of a name or a
# subscript (x_1e5), and its exponent has at most three digits: no quantity needs more, and comparing
# 10^{99999999} costs math-verify its whole 3-second limit, where 1e99999999 left as written costs nothing
SCIENTIFIC = re.compile(r"(?<![\w.\\])(\d+\.?\d*|\.\d+)(?:[eE]([+-]?\d{1,3})(?![\w.])"
                        r"|\s*\\(?:times|cdot)\s*10\s*\^\s*(?:\{\s*([+-]?\d{1,3})\s*\}|(\d)(?![\d.])))")


def exact_scientific(match):
    """4.5e33 as 45 \\times 10^{32}: an integer times a power of ten, which math-verify evaluates exactly.
    It reads 4.5e33 as 4.5 times e times 33, and 8.7 \\times 10^{8} as a float that is not 870000000.
    Trailing zeros move into the exponent: one value, one text."""
    mantissa, exponent = match.group(1), int(next(g for g in match.groups()[1:] if g is not None))
    whole, _, decimals = mantissa.partition(".")
    digits = (whole + decimals).lstrip("0")
    significant = digits.rstrip("0")
    if not significant:
        return "0"
    return f"{significant} \\times 10^{{{exponent - len(decimals) + len(digits) - len(significant)}}}"


def normalise_math(text):
    """What both golds and answers go through: whitespace, thousands separators, scientific notation,
    e and i, % and \\$."""
    text = re.sub(r"\s+", " ", text).strip()  # a newline inside a box is layout, not a second answer
    # thin spaces as thousands separators: 10\,000, 11,\!111, 1{,}000
    text = re.sub(r"(?<=\d)(?:\{,\}|,\\!|\\,|\\!|\\ |\\;|~) ?(?=\d{3}(?!\d))", "", text)
    text = re.sub(r"(?<![\d.])(\d{1,3}(?: \d{3})+)(?![\d.])", lambda m: m.group(1).replace(" ", ""), text)  # 1 000
    text = SCIENTIFIC.sub(exact_scientific, text)
    # Euler's e and i, not units; after a digit, a space keeps 2\mathrm{e}-1 from reading as 0.2 the
    # next time (verify cleans a cleaned gold again)
    text = re.sub(r"(?:(\d) ?)?\\(?:mathrm|text)\s*\{\s*([ei])\s*\}",
                  lambda m: f"{m[1]} {m[2]}" if m[1] else m[2], text)
    text = re.sub(r"(?<!\\)%", r"\\%", text)  # a bare % starts a LaTeX comment: it would hide the rest
    text = text.replace("\\$", "")  # a dollar sign is a unit
    text = re.sub(r"~|\\[>:;]|\\h?space\*?\{[^{}]*\}", " ", text)  # spacing commands are spaces
    return re.sub(r"\s+", " ", text).strip()  # once more: a second pass must change nothing


def clean_answer(box):
    """The content of a final \\boxed{} ready for math-verify, or None if it is refused because one box
    could hold two answers: an unescaped $, a line break or & outside a matrix, any LaTeX command but
    those of ANSWER_COMMANDS (arrows, strike-outs, \\tag, \\color, documents, other environments), an
    unpaired |, text between two formulas other than "and"/"or" (read as a list), a text before a
    formula that is not its label, or a number inside a text."""
    box = normalise_math(box)
    while re.fullmatch(r"\\boxed\{(.*)\}", box) and all_boxed(box) == [box[7:-1]]:
        box = box[7:-1].strip()  # \boxed{\boxed{5}} is 5
    outside = TEXT.sub(" ", MATRIX.sub(" ", box))  # what is not a matrix and not in a \text{}
    commands = set(re.findall(r"\\([a-zA-Z]+)", outside))
    if (not box or not commands <= ANSWER_COMMANDS or {"begin", "end"} & commands
            or REFUSED_IN_ANSWER.search(outside) or (outside.count("|") + outside.count("\\vert")) % 2):
        return None  # an unknown command, an environment other than a matrix, or an unpaired |
    # text between two formulas: a list word becomes a comma; anything else ("no wait") is refused
    pieces = TEXT.split(box)  # formula, text, formula, text, ..., formula
    formulas = [p.strip() for p in pieces[0::2]]
    has_formula = [bool(re.sub(r"[\s,.;:]|\\quad|\\qquad", "", f)) and not f.startswith(("^", "_")) for f in formulas]
    for k, text in enumerate(pieces[1::2]):
        preceding = "".join(pieces[:2 * k + 1])
        if preceding.count("{") > preceding.count("}"):
            continue  # inside a subscript or an argument (\lambda_{\text{red}}): a label, not prose
        before, after = any(has_formula[:k + 1]), has_formula[k + 1]
        words = " ".join(text[text.index("{") + 1:-1].split()).strip(" .").lower()
        if (before or after) and re.search(r"\d", words):
            return None  # "5 \text{ (or 6)}": a number in the prose is a second answer
        if before and after:
            if words not in LIST_WORDS:
                return None
            pieces[2 * k] = pieces[2 * k].rstrip().rstrip(",")  # "7, -2, \text{ and } -5": one comma
            pieces[2 * k + 1] = ", "
        elif after and not formulas[k + 1].startswith(("=", ":", "\\in", "<", ">", "\\le", "\\ge")):
            return None  # a label before a formula ("answer: 2") leaves a second reading
    return re.sub(r"\s+", " ", "".join(pieces)).strip()


def states_two_different_numbers(text, math_verify):
    """True for "6 = 5" or "x = 5+5 = 7": a relation between two numbers that are not equal. Runs in
    the worker (it parses); a formula without a relation costs nothing."""
    if "\\begin" in text:
        return False
    sides, start = [], 0
    for match in RELATION.finditer(text):  # split at relations outside braces
        depth_here = text.count("{", 0, match.start()) - text.count("}", 0, match.start())
        if depth_here == 0:
            sides.append(text[start:match.start()])
            start = match.end()
    if not sides:
        return False
    sides.append(text[start:])
    values = []  # each side's value if it is a number, else None
    for side in sides:
        parsed = math_verify.parse(f"${side}$", parsing_timeout=3) if side.strip() else []
        value = parsed[0] if parsed else None
        is_number = getattr(value, "is_number", False) and not getattr(value, "free_symbols", True)
        values.append(value if is_number else None)
    return any(a is not None and b is not None and not math_verify.verify([a], [b], timeout_seconds=3)
               for a, b in zip(values, values[1:]))


def small_numbers_differ(gold_text, gold, answer):
    """True when the gold is a number between 0 and 0.1 in size and the answer (or the right side of
    its relation, x = 0.0) a number that differs from it in the sixth significant digit. math-verify
    rounds to six decimal places, so below 5e-7 every number equals 0.0 and every other such number
    (Minerva's 2.88e-19 would accept 0.0 and 2.89e-19): small numbers are compared as it compares
    those between 0.1 and 1. A percentage keeps math-verify's reading (9\\% is 9). Takes math-verify's
    parses, in the worker."""
    if "\\%" in gold_text:
        return False
    gold = real_number(gold)
    answer = real_number(answer.rhs if getattr(answer, "is_Relational", False) else answer)
    if gold is None or answer is None or not 0 < abs(gold) < 0.1:
        return False
    order = 10.0 ** (math.floor(math.log10(abs(gold))) + 1)  # gold / order lies in [0.1, 1)
    return abs(answer - gold) >= 1e-6 * order


def real_number(value):
    """A parsed expression's value as a float if it is a real number without variables, else None."""
    try:
        return float(value) if getattr(value, "is_number", False) else None
    except (TypeError, ValueError, OverflowError):  # complex, or too large for a float
        return None


def clean_gold(value):
    """A gold answer as a string math-verify can parse, or None. Only strings and real numbers are
    golds: a dict, a bool or a NaN would otherwise become a string ("nan") that an answer can match."""
    if isinstance(value, list):  # OlympiadBench: a list of answers
        value = value[0] if value else None
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        return None
    if isinstance(value, numbers.Integral):
        value = str(int(value))
    elif isinstance(value, numbers.Real):
        if not math.isfinite(value):
            return None
        value = str(int(value)) if float(value).is_integer() else repr(float(value))  # AMC: 27.0
    text = value.strip()
    if "####" in text:  # GSM8K: the answer follows '####'
        text = text.split("####")[-1].strip().replace(",", "")
    if "\\boxed{" in text:  # several boxes are one answer together: "\\boxed{1} and \\boxed{-2}" is 1, -2
        boxes = all_boxed(text, prose_between=True) or []
        if len(set(boxes)) > 1 and all_boxed(text) is None:
            boxes = []  # different boxes with prose between ("\\boxed{1} no no \\boxed{2}"): no reading, dropped
        text = ", ".join(dict.fromkeys(boxes))
    stripped = None
    while stripped != text:  # OlympiadBench: "$(-\\infty, 0)$."; every layer, so that a second pass changes nothing
        stripped, text = text, text.strip().rstrip(".").strip().strip("$").strip()
    text = normalise_math(re.sub(r"(?<!\\)\$", " ", text))  # "$21,16$ or $11$": inner '$' only delimit
    # a plain number or one capital letter always parses: no round trip to the worker (arith and GSM8K
    # golds are all numbers, search golds letters)
    if not text or not (re.fullmatch(r"-?\d+(?:\.\d+)?|[A-Z]", text) or _check_math("parse", text)):
        return None
    return text


# -----------------------------------------------------------------------------
# The answer checker's worker: math-verify in a process of its own (design decision 7)

# math-verify's own time limit (signal.alarm) cannot interrupt a long big-integer power such as
# 9^9^9^9, and a stuck check would stall training: every check runs in a worker process that is
# killed and restarted after VERIFY_SECONDS, and that check counts as incorrect.
VERIFY_SECONDS = 5.0
_verifier = None  # (process, connection) of the worker, started on first use


def _verifier_loop(connection, parent_end, parent_pid):
    """The worker: answers ("parse", text) with bool and ("verify", gold, answer) with bool. Both
    sides are read as $...$ math: inside \\boxed{} math-verify misreads some expressions."""
    _detach_from_parent(parent_end)
    import math_verify
    parsed_before = {}  # a problem's gold is checked once per rollout: parse each text once

    def parse(text):
        if text not in parsed_before:
            if len(parsed_before) >= 10_000:
                parsed_before.clear()
            parsed_before[text] = math_verify.parse(f"${text}$", parsing_timeout=3)
        return list(parsed_before[text])

    connection.send("ready")
    while True:
        # exit with the parent, even after a kill -9: EOF once no one holds the parent's end,
        # or a new parent pid (re-parented) if some other forked process still holds it
        while not connection.poll(1.0):
            if os.getppid() != parent_pid:
                return
        try:
            request = connection.recv()
        except EOFError:
            return
        try:
            parsed = [parse(text) for text in request[1:]]
            if request[0] == "parse":
                result = bool(parsed[0])
            else:
                result = (all(parsed) and not states_two_different_numbers(request[2], math_verify)
                          and bool(math_verify.verify(parsed[0], parsed[1], timeout_seconds=3))
                          and not small_numbers_differ(request[1], parsed[0][0], parsed[1][0]))
        except Exception:  # a checker crash on odd input means "no", never a crashed run
            result = False
        connection.send(result)


def _detach_from_parent(parent_end):
    """In the worker: drop what it inherited from the parent that must close when the parent dies.
    A forked child holds copies of the parent's file descriptors: with the parent's end of the pipe
    it would never see end-of-file, and with stdout/stderr a `| tee` would wait for it forever."""
    if parent_end is not None:  # None under spawn: the child never receives it
        parent_end.close()
    # fork copies the parent's signal handlers too: Ctrl-C is for the parent (its last step still needs
    # checks), and SIGTERM, which multiprocessing sends at exit before it waits, must end the worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closing terminal: the worker ends with its parent
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _start_verifier():
    import multiprocessing
    # fork: no re-import of this file (works from notebooks); the worker never touches CUDA
    methods = multiprocessing.get_all_start_methods()
    forked = "fork" in methods
    context = multiprocessing.get_context("fork" if forked else "spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_verifier_loop, args=(theirs, ours if forked else None, os.getpid()),
                              daemon=True)
    process.start()
    theirs.close()  # the worker's end lives in the worker only: its death is EOF here
    try:
        ready = ours.poll(120) and ours.recv() == "ready"
    except EOFError:  # it died while starting
        ready = False
    if not ready:  # a checker that cannot start must not mean "all wrong"
        process.kill()
        raise RuntimeError("the answer-checking process (math-verify) did not start; is math-verify installed?")
    return process, ours


def _check_math(*request):
    """Runs one check in the worker; False if it takes longer than VERIFY_SECONDS or kills the worker."""
    global _verifier
    if _verifier is None or not _verifier[0].is_alive():
        _verifier = _start_verifier()
    process, connection = _verifier
    try:
        connection.send(request)
        if connection.poll(VERIFY_SECONDS):
            return connection.recv()
    except (EOFError, OSError):  # the worker died on this input (e.g. out of memory)
        pass
    process.kill()  # stuck or dead: this check is a "no"; the next one gets a fresh worker
    process.join()
    _verifier = None
    print(f"warning: an answer check ran past {VERIFY_SECONDS:g} s (or killed the checker) and counts as wrong: "
          f"{request[0]} {str(request[-1])[:80]!r}; many of these mean the machine is too loaded for the checker",
          file=sys.stderr, flush=True)
    return False


# -----------------------------------------------------------------------------
# Float32 master weights for the update (design decision 5)

class MasterAdamW:
    """AdamW on float32 master copies of low-precision weights (see design decision 5). Float32
    weights are updated directly."""

    def __init__(self, model, lr, world=None):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world = world
        # FSDP2 (see World): the parameters are float32 shards, and each rank's shard is its master
        self.sharded = hasattr(self.params[0], "to_local")
        self.master = [p.to_local().detach() if self.sharded else p if p.dtype == torch.float32
                       else p.detach().float().clone() for p in self.params]
        self.copy_back = not self.sharded and any(m is not p for p, m in zip(self.params, self.master))
        # weight decay 0.01 as in verl, which the paper's code builds on (negligible at lr 1e-6)
        self.optimizer = torch.optim.AdamW(self.master, lr=lr, weight_decay=0.01)

    def clip_gradients(self, max_norm):
        """Moves the gradients onto the master copies and clips them; returns the norm before clipping."""
        for p, m in zip(self.params, self.master):
            if m is not p:
                # FSDP2 averages over ranks; each rank's loss already has the global token count: sum
                m.grad = None if p.grad is None else (p.grad.to_local() * self.world.size if self.sharded else p.grad).float()
                p.grad = None
        if not self.sharded:
            return float(torch.nn.utils.clip_grad_norm_(self.master, max_norm))
        # the norm of the whole gradient: each rank holds a disjoint shard of every parameter
        grads = [m.grad for m in self.master if m.grad is not None]
        norm = math.sqrt(self.world.sum(sum(float(g.double().pow(2).sum()) for g in grads)))
        for g in grads:  # the same factor as clip_grad_norm_
            g.mul_(min(1.0, max_norm / (norm + 1e-6)))
        return norm

    def step(self):
        self.optimizer.step()
        self.zero_grad()
        # a finite loss and gradient can still overflow the weights (an absurd --lr): stop here, so that
        # no later step, log line or checkpoint uses them (bf16 weights never even receive them)
        finite = bool(torch.stack([m.isfinite().all() for m in self.master]).all())
        if self.sharded:  # every rank must take the same branch
            finite = self.world.sum(not finite) == 0
        if not finite:
            raise UserError("the update made some weights infinite or NaN although the loss and gradient "
                            "were finite: the learning rate is too large for these weights. Nothing was "
                            "saved after the last checkpoint; lower --lr and resume or restart.")
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                if self.copy_back and m is not p:
                    p.copy_(m)

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def state_dict(self):
        return {"adamw": self.optimizer.state_dict(), "master": [m.detach().cpu() for m in self.master]}

    def load_state_dict(self, state):
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.master, state["master"]):
                m.copy_(saved)
                if self.copy_back and m is not p:
                    p.copy_(m)
        self.optimizer.load_state_dict(state["adamw"])


# -----------------------------------------------------------------------------
# Data loading: every problem becomes {problem, answer, solution or None}

def read_jsonl(path, with_line_numbers=False):
    """Rows of a JSONL file; a bad line is an error that names the file and the line."""
    rows = []
    try:
        f = open(path, "rb")  # bytes: a line that is not UTF-8 is reported with its number
    except OSError as e:  # missing, a directory, no permission
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    with f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise UserError(f"{path}, line {line_number}: not UTF-8 text (byte {line[e.start]:#04x} at "
                                f"position {e.start})") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {line_number}: invalid JSON ({e.msg})") from None
            except (ValueError, RecursionError) as e:  # json's own limits: a 5,000-digit number, deep nesting
                reason = "nested too deeply" if isinstance(e, RecursionError) else one_line(e, 120)
                raise UserError(f"{path}, line {line_number}: JSON that cannot be read ({reason})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_number, row) if with_line_numbers else row)
    return rows


def gsm8k_solution(text):
    """GSM8K's worked answer as prose ending in a boxed answer: drop the <<calculator>> notes."""
    body, _, answer = text.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is \\boxed{{{answer.strip().replace(',', '')}}}."


DAPO_PREFIX = "Solve the following math problem step by step."
DAPO_SUFFIX = "\n\nRemember to put your answer on its own line after \"Answer:\"."


def dapo_problem(content):
    """DAPO wraps each problem in its own instruction; keep the problem, we add ours (M7)."""
    if content.startswith(DAPO_PREFIX) and content.endswith(DAPO_SUFFIX):
        return content[:-len(DAPO_SUFFIX)].split("\n\n", 1)[1]
    return content


# The longest problem or solution in the real benchmark files has about 10,000 characters. A row
# far beyond that is a broken file, and would stall the tokenizer (over a minute for 50 MB) when drawn.
MAX_TEXT_CHARS = 100_000


def check_text_size(text, field, where):
    if text is not None and len(text) > MAX_TEXT_CHARS:
        raise UserError(f"{where}: field {field!r} has {len(text):,} characters, more than the limit of "
                        f"{MAX_TEXT_CHARS:,} (MAX_TEXT_CHARS in antisd.py)")


def problem_from_row(row, where):
    """{problem, answer, solution} from a row with `problem` (or `question`) and an `answer`
    (or `final_answer`) or a `solution` ending in a boxed answer. answer is None if unparsable."""
    problem = row.get("problem", row.get("question"))
    if not isinstance(problem, str) or not problem.strip():
        raise UserError(f"{where}: missing field 'problem' (or 'question')")
    solution = row.get("solution")
    solution = solution if isinstance(solution, str) else None  # OlympiadBench has a list here
    check_text_size(problem, "problem", where)
    check_text_size(solution, "solution", where)
    for field in ("answer", "final_answer"):
        if field in row:
            gold = row[field]
            break
    else:
        if solution is None:
            raise UserError(f"{where}: missing field 'answer' (or 'solution' with a \\boxed{{}} answer)")
        gold = last_boxed(solution)
    if isinstance(gold, str) and "####" in gold and solution is None:  # GSM8K: answer holds the solution
        solution = gsm8k_solution(gold)
    return {"problem": problem, "answer": clean_gold(gold), "solution": solution}


HUB_DATASETS = {  # --dataset name: (hub id, config), split "train"
    "math": ("DigitalLearningGmbH/MATH-lighteval", "default"),  # MATH train: 7,500 with full solutions
    "gsm8k": ("openai/gsm8k", "main"),
    "dapo": ("BytedTsinghua-SIA/DAPO-Math-17k", None),           # answers only
}


def load_problems(name, seed):
    """Returns (problems, dropped): problems whose gold answer cannot be parsed are dropped."""
    if name in ("arith", "search"):  # the laptop tasks, generated (tiny_tasks.py)
        import tiny_tasks
        rows = {"arith": tiny_tasks.make_arith_problems, "search": tiny_tasks.make_search_problems}[name](2000, seed)
        where = [name] * len(rows)
    elif name.endswith(".jsonl"):
        if not os.path.exists(name):
            raise UserError(f"--dataset {name}: file not found")
        numbered = read_jsonl(name, with_line_numbers=True)
        if not numbered:
            raise UserError(f"--dataset {name}: the file holds no rows")
        rows = [row for _, row in numbered]
        where = [f"{name}, line {line_number}" for line_number, _ in numbered]
    elif name in HUB_DATASETS:
        import datasets
        hub_id, config = HUB_DATASETS[name]
        try:
            hub_rows = datasets.load_dataset(hub_id, config, split="train")
        except Exception as e:  # offline, renamed, gated: say which and what to do instead
            raise UserError(f"--dataset {name}: could not load {hub_id} from the hub ({type(e).__name__}: {e}); "
                             f"without the hub, pass a local .jsonl file") from None
        if name == "dapo":  # DAPO-Math-17k repeats each problem ~100 times: keep one of each
            seen, rows = set(), []
            for row in hub_rows:
                problem = dapo_problem(row["prompt"][0]["content"])
                if problem not in seen:
                    seen.add(problem)
                    rows.append({"problem": problem, "answer": row["reward_model"]["ground_truth"]})
        else:
            rows = list(hub_rows)
        where = [f"{name}, row {i}" for i in range(len(rows))]
    else:
        raise UserError(f"--dataset {name!r}: expected one of math, gsm8k, dapo, arith, search, or a path to a .jsonl file")
    problems = [problem_from_row(row, w) for row, w in zip(rows, where)]
    kept = [p for p in problems if p["answer"] is not None]
    if not kept:
        raise UserError(f"--dataset {name}: all {len(problems)} rows were dropped: no gold answer could be parsed")
    return kept, len(problems) - len(kept)


def dataset_fingerprint(problems):
    """A hash of the problems as loaded (text, gold, solution): a run resumed on an edited file or a
    changed hub dataset would silently train on other problems in another order."""
    return hashlib.sha256(json.dumps(problems, sort_keys=True).encode()).hexdigest()[:16]


class ProblemStream:
    """Seeded epochs of shuffled problems. Its state is two integers, so a resumed run sees the
    same problems in the same order."""

    def __init__(self, size, seed):
        self.size, self.seed, self.epoch, self.cursor = size, seed, 0, 0

    def _order(self):
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self, count):
        taken = []
        while len(taken) < count:
            order = self._order()
            take = order[self.cursor:self.cursor + count - len(taken)]
            taken += take
            self.cursor += len(take)
            if self.cursor == self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
        return taken

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state):
        self.epoch, self.cursor = state["epoch"], state["cursor"]


# -----------------------------------------------------------------------------
# The model and its tokenizer

def pick_device(requested, model_name):
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cuda", "cpu"):
            raise UserError(f"--device {requested!r}: expected cuda, cuda:N or cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested}: no CUDA GPU is available here (torch.cuda.is_available() is False)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if model_name not in TINY_MODELS:
        sys.exit(f"No CUDA GPU found: --model {model_name} needs one (pass --device cpu to force it).\n"
                 f"For a CPU demo run:  python antisd.py --model tiny --dataset arith --steps 3")
    return torch.device("cpu")


TINY_MODELS = ("tiny", "tiny-search", "tiny-random")  # the laptop models of tiny_tasks.py


def load_model(name, device):
    """(model, tokenizer): bf16 weights on CUDA, float32 on CPU; left padding for generation."""
    if name in TINY_MODELS:
        import tiny_tasks
        torch.set_num_threads(1)  # a model this small is overhead-bound: one thread beats two on a busy CPU
    if name == "tiny-random":
        model, tokenizer = tiny_tasks.build_tiny()
    else:
        name = {"tiny": tiny_tasks.tiny_arith_path, "tiny-search": tiny_tasks.tiny_search_path}[name]() \
            if name in TINY_MODELS else name
        from transformers import AutoModelForCausalLM, AutoTokenizer
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        refuse_pickled_weights(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            check_chat_template(tokenizer)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # not on the hub (or offline), not a model folder, a damaged file in it
            where = "from its local folder" if os.path.isdir(name) else "no such local folder, nor from the hub"
            raise UserError(f"--model {name}: could not load it ({where}): {one_line(e)}") from None
    refuse_non_finite_weights(model, f"--model {name}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def check_chat_template(tokenizer):
    """A missing or damaged chat template fails at load time, not at the first step: it must render
    and put the user's message in the prompt."""
    probe = "What is 1 + 1?"
    if probe not in tokenizer.decode(render_prompt(tokenizer, probe, False)):
        raise ValueError("its chat template does not put the user's message into the prompt")


def refuse_pickled_weights(folder):
    """Weights are read from safetensors only: a pickle (pytorch_model.bin) can run code when loaded."""
    if not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    pickled = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl")) and "model" in n)
    if pickled and not any(n.endswith(".safetensors") for n in names):
        raise UserError(f"--model {folder}: its weights are only in a pickle ({', '.join(pickled)}), which can run "
                        f"code when it is loaded, so it is not read. Convert it where you trust it "
                        f"(AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder) writes safetensors)")


def refuse_non_finite_weights(model, what):
    """A NaN or inf weight makes every sampling step fail, or every answer silently wrong."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise UserError(f"{what}: {len(bad)} weight tensor(s) hold NaN or inf values ({', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}): the model is damaged")


def stop_token_ids(model, tokenizer):
    """Generation stops at any of these (Qwen3: <|im_end|> and <|endoftext|>)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return sorted(ids | {tokenizer.eos_token_id})


# -----------------------------------------------------------------------------
# Logging: metrics.jsonl, rollouts.jsonl, timers, the in-loop evaluation

def load_eval_sets(args):
    """(eval.py as a module, {benchmark: problems}) for the in-loop evaluation; (None, {}) without one."""
    if not args.eval_every:
        return None, {}
    evaluation = importlib.import_module("eval")  # eval.py; `import eval` would shadow the builtin
    return evaluation, {name: evaluation.load_benchmark(name, args.eval_data_dir, args.eval_limit or None)
                        for name in args.eval_benchmarks.split(",")}


def step_metrics(step, rewards, truncated, mask, stats, terms, update, gate, timer, args, texts=(), batch=()):
    """One metrics.jsonl line: what the step saw and did (README: "Metrics"). texts and batch (the
    step's problems; rollout i is of batch[i // G]) feed the search task's metrics."""
    rewards_grouped = torch.tensor(rewards).view(-1, args.group_size)      # [P, G]
    lengths, total_tokens = mask.sum(dim=1), int(mask.sum())
    u_valid = terms["u"][mask]
    u_p01, u_p99 = masked_quantiles(terms["u"], mask, [0.01, 0.99])
    losses, grad_norms = update["losses"], update["grad_norms"]
    return {
        "step": step,
        "reward_mean": float(rewards_grouped.mean()),
        "groups_with_signal": float((rewards_grouped.std(dim=1) > 0).float().mean()),
        "response_length_mean": float(lengths.float().mean()),
        "response_length_max": int(lengths.max()),
        "truncation_rate": sum(truncated) / len(truncated),
        "u_mean": float(u_valid.mean()),
        "u_std": float(u_valid.std()) if u_valid.numel() > 1 else 0.0,
        "u_frac_negative": float((u_valid < 0).float().mean()),
        "u_p01": u_p01,
        "u_p99": u_p99,
        "sd_term_mean": float(terms["a"][mask].mean()) if terms["a"] is not None else None,
        "teacher_entropy_median": terms["teacher_entropy_median"],
        "student_entropy_median": median(stats["entropy"][mask]) if stats is not None else 0.0,
        "jsd_mean": float(stats["jsd"][mask].mean()) if args.method != "grpo" else 0.0,
        "gate_signal": terms["gate_signal"],
        "gate_on": float(terms["gate_on"]),
        "lambda": terms["lam"],
        "h_warm": gate.h_warm if gate and gate.h_warm is not None else 0.0,
        "tau_down": gate.tau_down if gate and gate.tau_down is not None else 0.0,
        "loss": sum(losses) / len(losses),              # mean over the epochs run
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "update_applied": update["epochs_applied"] > 0,
        "epochs_applied": update["epochs_applied"],
        "clip_fraction": update["clipped_tokens"] / (total_tokens * len(losses)),
        "seconds_generate": timer.seconds["generate"],
        "seconds_score": timer.seconds["score"],
        "seconds_update": timer.seconds["update"],
        "generated_tokens_per_second": total_tokens / timer.seconds["generate"],
        "peak_gpu_memory_gb": max(timer.peak_gb.values()),
        "peak_gpu_memory_gb_generate": timer.peak_gb["generate"],
        "peak_gpu_memory_gb_score": timer.peak_gb["score"],
        "peak_gpu_memory_gb_update": timer.peak_gb["update"],
        **(search_metrics(texts, batch, args.group_size) if args.dataset == "search" else {}),
    }


def search_metrics(texts, batch, group_size):
    """The search task's two metrics (tiny_tasks.py): how often a response checks a box, and how many
    check lines are wrong. Rollout i is of batch[i // group_size]."""
    import tiny_tasks
    return {"deliberation_rate": tiny_tasks.search_deliberation_rate(texts),
            "check_error_rate": tiny_tasks.search_check_error_rate(
                texts, [batch[i // group_size]["problem"] for i in range(len(texts))])}


class RunLogs:
    """metrics.jsonl (one line per step), rollouts.jsonl (two sampled rollouts per step, every token
    with its u) and the progress bar; written by rank 0 only. A resumed run first drops the lines
    of the steps it will redo (keep_log_lines_up_to). A context manager: closes all three."""

    def __init__(self, out_dir, world, first_step):
        self.rank = world.rank
        if self.rank == 0:  # a new run (no checkpoint yet) keeps none of a failed earlier start's lines
            kept_up_to = first_step - 1 if first_step > 1 else -1
            logged = keep_log_lines_up_to(os.path.join(out_dir, "metrics.jsonl"), kept_up_to)
            keep_log_lines_up_to(os.path.join(out_dir, "rollouts.jsonl"), kept_up_to)
            missing = sorted(set(range(1, first_step)) - set(logged))
            if missing:  # a deleted or cut log: continue (the checkpoint is whole), but never silently
                print(f"warning: {os.path.join(out_dir, 'metrics.jsonl')} has no line for step(s) "
                      f"{step_ranges(missing)}, which the checkpoint has already trained: the resumed log will "
                      f"have a gap there", file=sys.stderr, flush=True)
        self.metrics = open(os.path.join(out_dir, "metrics.jsonl") if self.rank == 0 else os.devnull, "a")
        self.rollouts = open(os.path.join(out_dir, "rollouts.jsonl") if self.rank == 0 else os.devnull, "a")
        self.progress = None

    def progress_bar(self, first_step, steps, method):
        from tqdm import tqdm
        self.progress = tqdm(range(first_step, steps + 1), initial=first_step - 1, total=steps, desc=method,
                             dynamic_ncols=True, disable=self.rank > 0)
        return self.progress

    def write_metrics(self, record):
        append_log_line(self.metrics, {k: finite_or_none(v) for k, v in record.items()})

    def write_step(self, step, record, rng, tokenizer, batch, done, group_size):
        """A step's metrics line, two of its rollouts (write_rollouts) and the progress bar's numbers.
        done: what one_step returned."""
        self.write_metrics(record)
        self.write_rollouts(step, rng, tokenizer, batch, done.responses, done.texts, done.rewards, done.truncated,
                            done.terms["u"], group_size)
        self.progress.set_postfix(reward=f"{record['reward_mean']:.3f}", lam=f"{done.terms['lam']:.2f}",
                                  H_T=f"{record['teacher_entropy_median']:.3f}")

    def write_rollouts(self, step, rng, tokenizer, batch, responses, texts, rewards, truncated, u, group_size):
        """Two rollouts of the step drawn with the run's rng, each with its most negative and most
        positive u and every token's u (eval.py --show colours them, the paper's Fig. 2)."""
        for i in rng.sample(range(len(responses)), k=min(2, len(responses))):
            most_negative, most_positive = extreme_tokens(tokenizer, responses[i], u[i])
            append_log_line(self.rollouts, {
                "step": step, "problem": batch[i // group_size]["problem"], "gold": batch[i // group_size]["answer"],
                "response": texts[i], "reward": rewards[i], "truncated": truncated[i],
                "most_negative_u": most_negative, "most_positive_u": most_positive,
                "tokens": token_u_pairs(tokenizer, responses[i], u[i])})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.close()
        self.metrics.close()
        self.rollouts.close()


class PhaseTimer:
    """Seconds and peak GPU memory of each phase of a step (generate, score, update). Out of memory in
    a phase given a flag ends the run with a message naming that flag."""
    WORDS = {"generate": "generation", "score": "scoring", "update": "the update"}

    def __init__(self, device):
        self.device, self.seconds, self.peak_gb = device, {}, {}

    @contextlib.contextmanager
    def __call__(self, phase, flag=None, value=None):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.time()
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            if flag is None:
                raise
            raise out_of_memory(self.WORDS[phase], flag, value) from None
        self.seconds[phase] = time.time() - start
        self.peak_gb[phase] = phase_peak_memory_gb(self.device)


def masked_quantiles(values, mask, qs):
    flat = values[mask].float()
    if flat.numel() == 0:
        return [0.0] * len(qs)
    if flat.numel() > 1_000_000:  # torch.quantile refuses very large inputs; a fixed subsample is plenty
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000].to(flat.device)]
    return torch.quantile(flat, torch.tensor(qs, device=flat.device)).tolist()


def extreme_tokens(tokenizer, response_ids, u_row, count=5):
    """The tokens with the most negative u (deliberation) and most positive u (shortcuts), Fig. 2."""
    u_row = u_row[:len(response_ids)].tolist()
    ranked = sorted(range(len(u_row)), key=lambda k: u_row[k])
    show = lambda ks: [[tokenizer.decode([response_ids[k]]), round(u_row[k], 3)] for k in ks]
    return show(ranked[:count]), show(ranked[::-1][:count])


def token_u_pairs(tokenizer, response_ids, u_row):
    """[[token text, u], ...] for every response token: what eval.py --show colours (Fig. 2)."""
    return [[tokenizer.decode([token]), round(value, 4)] for token, value in zip(response_ids, u_row.tolist())]


def evaluate_in_loop(evaluation, model, tokenizer, eval_sets, args):
    """eval.py's metrics on the held-out benchmarks at the paper's eval sampling (T=0.7, top-p 0.95, M9),
    as {"eval/<benchmark>/<metric>": value}."""
    results, _ = evaluation.evaluate(model, tokenizer, eval_sets, args.eval_n, 0.7, 0.95, args.max_new_tokens,
                                     args.gen_batch_size, args.enable_thinking, args.seed)
    return {f"eval/{name}/{key}": value
            for name, metrics in {**results["benchmarks"], "mean": results["mean"]}.items()
            for key, value in metrics.items()}


def step_ranges(steps):
    """[1, 2, 3, 7] -> "1-3, 7"."""
    ranges, start = [], None
    for k, step in enumerate(steps):
        start = step if start is None else start
        if k + 1 == len(steps) or steps[k + 1] != step + 1:
            ranges.append(f"{start}-{step}" if step > start else f"{step}")
            start = None
    return ", ".join(ranges)


def finite_or_none(value):
    """JSON has no NaN: a non-finite number is written as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def keep_log_lines_up_to(path, step):
    """A resumed run redoes the steps after its checkpoint: drop their old log lines. A kill can
    leave the last line half-written; it is dropped too. The file is rewritten into a new file that
    then replaces it, so a kill during the rewrite leaves the old one whole. Returns the steps kept."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    kept, kept_steps = [], []
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            logged_step = json.loads(line)["step"]
            kept_steps.append(int(logged_step))
        except (ValueError, KeyError, TypeError, RecursionError):
            if line_number == len(lines):  # no newline after it: torn by a kill mid-write
                continue
            raise UserError(f"{path}, line {line_number}: not a log line of this program "
                            f"(move the file away to resume without it)") from None
        if logged_step <= step:
            kept.append(line + b"\n")
        else:
            kept_steps.pop()
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: the old file is still whole
        if os.path.exists(temporary):
            os.remove(temporary)
        raise UserError(disk_full_message(f"the log lines kept up to step {step}", temporary, e,
                                          os.path.dirname(path) or ".")) from None
    os.replace(temporary, path)
    return kept_steps


def phase_peak_memory_gb(device):
    """Peak GPU memory since the last call (then resets the peak), so each phase reports its own."""
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def out_of_memory(phase, flag, value):
    return SystemExit(f"CUDA out of memory during {phase} with {flag} {value}: lower {flag} "
                      f"(e.g. {flag} {max(1, value // 2)}), or --max-new-tokens.")


# -----------------------------------------------------------------------------
# Checkpoints and resuming: the model in Hugging Face format plus everything needed to continue exactly

KEEP_CHECKPOINTS = 2  # the newest two: one may be cut short by a full disk or a kill, the other is whole
MAX_BAD_STEPS = 3     # consecutive steps whose loss or gradient is not finite (not applied): then stop

# what defines a run: resuming with any of these changed would silently make it another run
RUN_DEFINING = ["model", "dataset", "enable_thinking", "method", "estimator",
                "divergence", "term", "lambda_form", "compose", "lambda_max", "gate", "gate_warmup", "tau_ratio",
                "prompts_per_step", "group_size", "max_new_tokens", "temperature", "top_p", "lr",
                "clip", "ppo_epochs", "seed", "dataset_fingerprint"]
# settings added after checkpoints had been written without them, and the value those runs had
RUN_DEFINING_ADDED = {"term": "paper", "lambda_form": "gate"}
# settings that were flags once and are constants now: a checkpoint saved with another value is another run
RUN_DEFINING_REMOVED = {"max_solution_tokens": MAX_SOLUTION_TOKENS, "grad_clip": GRAD_CLIP}


def setting_name(key):
    """How a RUN_DEFINING setting is named in messages: its flag, or what it is."""
    return "the problems of --dataset (fingerprint)" if key == "dataset_fingerprint" else "--" + key.replace("_", "-")


def prepare_out_dir(args, world):
    """--out-dir's checkpoints (oldest first), after locking the folder for this run (rank 0; the
    other ranks write only into rank 0's checkpoint folders) and refusing to start over an existing
    run without --resume, or to resume none."""
    if world.rank == 0:
        lock_out_dir(args.out_dir)
    checkpoints = list_checkpoints(args.out_dir)
    if checkpoints and not args.resume:
        raise SystemExit(f"--out-dir {args.out_dir} already holds a run ({os.path.basename(checkpoints[-1])}): "
                         f"pass --resume to continue it, or choose another --out-dir")
    if args.resume and not checkpoints:
        raise SystemExit(f"--resume: no checkpoint in --out-dir {args.out_dir}")
    return checkpoints


def start_or_resume(args, checkpoints, device, world):
    """(checkpoint path, trainer state, model, tokenizer) of the newest whole checkpoint with --resume,
    after refusing another process count or changed run-defining settings; else (None, None, the
    --model, its tokenizer)."""
    if not args.resume:
        return (None, None, *load_model(args.model, device))
    checkpoint, resumed, model, tokenizer = resume_from_newest_whole_checkpoint(
        checkpoints, device, f"trainer_state-rank{world.rank}.pt" if world.rank else "trainer_state.pt")
    if resumed.get("world_size", 1) != world.size:
        raise UserError(f"{checkpoint} was written by {resumed.get('world_size', 1)} process(es), each with its "
                        f"own optimizer shard and random state; resume it with that many "
                        f"(torchrun --nproc_per_node {resumed.get('world_size', 1)}), not {world.size}")
    saved = {key: resumed["args"].get(key, RUN_DEFINING_ADDED.get(key)) for key in RUN_DEFINING}
    changed = [f"{setting_name(key)} {saved[key]!r} -> {getattr(args, key)!r}"
               for key in RUN_DEFINING if saved[key] != getattr(args, key)]
    changed += [f"--{key.replace('_', '-')} {resumed['args'][key]!r} (no longer a flag: {value!r} now)"
                for key, value in RUN_DEFINING_REMOVED.items() if resumed["args"].get(key, value) != value]
    if changed:
        raise SystemExit(f"refusing to resume {checkpoint} with different settings: " + "; ".join(changed))
    return checkpoint, resumed, model, tokenizer


def trainer_state(step, args, optimizer, stream, gate, rng, device, world):
    """Everything besides the weights that the run needs to continue bit for bit."""
    return {"format": CHECKPOINT_FORMAT, "step": step, "args": vars(args), "optimizer": optimizer.state_dict(),
            "stream": stream.state_dict(), "gate": gate.state_dict() if gate else None,
            "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            "world_size": world.size}


def restore_trainer_state(state, optimizer, stream, gate, rng, device):
    """The inverse of trainer_state; returns the first step to run."""
    optimizer.load_state_dict(state["optimizer"])
    stream.load_state_dict(state["stream"])
    if gate:
        gate.load_state_dict(state["gate"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"])
    return state["step"] + 1


# Ctrl-C, a job scheduler's stop and the terminal closing: during the loop the step is finished and
# saved (StopRequests); anywhere else the program stops at once in one line (run_command)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside the step loop: handled as Ctrl-C is (run_command)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def stop_at_once(signum, frame):
    raise Stopped(signum)


class StopRequests:
    """A stop signal during the loop: finish the current step, save, exit (a second one stops at
    once). A context manager that installs the handlers and puts the previous ones back."""

    def __init__(self):
        self.requested, self.previous = None, {}

    def _request(self, signum, frame):
        if self.requested:
            raise Stopped(signum)
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving (again to stop now)", flush=True)

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._request) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def say_how_to_resume(self, step, last_saved, argv):
        command = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
        print(f"stopped after step {step}, saved {last_saved}. To continue:\n"
              f"  python antisd.py {shlex.join(command + ['--resume'])}")


def nothing_left_to_run(checkpoint, saved_step, steps):
    """--resume when the newest whole checkpoint is already at or past --steps: say so, train nothing."""
    if saved_step == steps:
        print(f"the run is complete: {checkpoint} is step {saved_step} of --steps {steps}; nothing to do "
              f"(pass a larger --steps to train further)")
        return
    raise UserError(f"--resume --steps {steps}: the newest whole checkpoint, {checkpoint}, is already at step "
                    f"{saved_step}; nothing was run. Pass --steps {saved_step + 1} or more to train further, or "
                    f"use {checkpoint} as it is")


def too_many_bad_steps(step, bad_steps, last_saved, args):
    return SystemExit(f"stopping at step {step}: {bad_steps} consecutive steps had a non-finite loss "
                      f"or gradient and were not applied (MAX_BAD_STEPS in antisd.py). "
                      f"The last good checkpoint is {last_saved or 'none (no save yet)'}; "
                      f"lower --lr or inspect {args.out_dir}/rollouts.jsonl.")


# One run per --out-dir: two runs writing one folder would interleave their logs and overwrite each
# other's checkpoints. An OS lock (flock) rather than a file that merely exists: the kernel releases it
# when its process dies, however it dies, so a kill -9 or a crash never leaves a stale lock behind.
# (On NFS, Linux maps flock to NFS byte-range locks, which the server releases when the client's lease
# expires.) The file also holds the pid, for the message. It is held until the process exits.
LOCK_FILE = "antisd.lock"
_held_locks = {}  # lock path -> open file: calling main again in the same process keeps the same lock


def lock_out_dir(out_dir):
    """Creates --out-dir if needed and locks it for this process; UserError naming the process that
    holds it when another run is using it."""
    import fcntl
    import socket
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a file of that name, or a file on its path
        raise UserError(f"--out-dir {out_dir}: cannot create it ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"--out-dir {out_dir}: not writable")
    path = os.path.realpath(os.path.join(out_dir, LOCK_FILE))
    if path in _held_locks:
        return path
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "(it has not written its pid yet)"
        lock.close()
        raise UserError(f"--out-dir {out_dir} is in use by another run: process {holder} holds {path}. "
                        f"Two runs in one folder would overwrite each other's files: wait for "
                        f"that run to end (or stop it), then pass --resume to continue it, or choose "
                        f"another --out-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    _held_locks[path] = lock
    return path


def human_size(n):
    return f"{n / 2**30:,.1f} GB" if n >= 2**30 else f"{n / 2**20:,.1f} MB"


def disk_full_message(what, path, error, out_dir):
    """One paragraph for a write that failed: what could not be written and why, the space left in the
    folder, and the newest whole checkpoint (what --resume would continue from)."""
    reason = (f"{error.strerror} [errno {error.errno}]" if isinstance(error, OSError) and error.strerror
              else f"{type(error).__name__}: {one_line(error, 200)}, a write that came up short, as on a full disk")
    try:
        usage = shutil.disk_usage(out_dir)
        space = f"{out_dir} has {human_size(usage.free)} free of {human_size(usage.total)}"
    except OSError as e:
        space = f"the free space of {out_dir} is unknown ({e.strerror})"
    checkpoints = list_checkpoints(out_dir)
    if checkpoints:
        size = sum(os.path.getsize(os.path.join(checkpoints[-1], name)) for name in os.listdir(checkpoints[-1]))
        space += f" and a checkpoint takes {human_size(size)}"
    newest = (f"the newest whole checkpoint is {checkpoints[-1]}: free some space (or move --out-dir), then "
              f"--resume continues from it" if checkpoints else "no checkpoint was saved yet: the run starts again")
    return f"could not write {what} ({path}: {reason}); {space}; {newest}"


def is_write_failure(error):
    """Whether an exception from writing a file means the file could not be written (a full disk, a
    quota, a read-only folder) rather than a bug. torch.save reports a short write as a RuntimeError
    from its zip writer, safetensors as its own error type; neither carries an errno."""
    text = str(error)
    return isinstance(error, OSError) or any(sign in text for sign in (
        "inline_container", "PytorchStreamWriter", "No space left", "Disk quota", "Read-only file system",
        "os error", "IoError"))


def write_json_line(file, record):
    """Appends one JSON line with unbuffered writes: a full disk fails here, at the record it could not
    keep, and leaves nothing in a buffer to fail again at close."""
    line = (json.dumps(record) + "\n").encode()
    while line:
        line = line[os.write(file.fileno(), line):]


def append_log_line(log_file, record):
    """write_json_line into metrics.jsonl or rollouts.jsonl; a failed write ends the run in one paragraph.
    A line cut short by it is dropped on --resume (keep_log_lines_up_to)."""
    try:
        write_json_line(log_file, record)
    except OSError as e:
        out_dir = os.path.dirname(log_file.name) or "."
        raise UserError(disk_full_message(f"the log line of step {record['step']}", log_file.name, e, out_dir)) from None


def list_checkpoints(out_dir):
    """Checkpoints in out_dir, oldest first (a save in progress is a .tmp folder, never listed)."""
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match:
            found.append((int(match.group(1)), os.path.join(out_dir, name)))
    return [path for _, path in sorted(found)]


def save_checkpoint(out_dir, step, model, tokenizer, trainer_state, keep, world=None):
    """Written to a temporary folder, then renamed: a kill mid-save leaves the previous checkpoint
    whole. Keeps the newest `keep`. Under torchrun (see World) every rank calls it: the full weights
    are gathered for rank 0, and each rank adds its own state (its optimizer shard, its RNG)."""
    final = os.path.join(out_dir, f"checkpoint-{step}")
    temporary = final + ".tmp"
    rank, sharded = (world.rank, world.sharded) if world else (0, False)
    weights = full_state_dict(model, world.compute_dtype) if sharded else None

    def write_all(write):  # a full disk, a quota or a read-only folder ends the run in one paragraph
        try:
            write()
        except Exception as e:
            if not is_write_failure(e):
                raise
            cause = e  # the frames of the error (and of those it arose from) hold the half-written file
            while cause is not None:  # open, and its space is freed only once it is closed
                cause.__traceback__, cause = None, cause.__context__
            gc.collect()
            shutil.rmtree(temporary, ignore_errors=True)  # a partial checkpoint only keeps the disk full
            raise UserError(disk_full_message(f"checkpoint-{step}", temporary, e, out_dir)
                            + f" (the partial {os.path.basename(temporary)} was removed)") from None

    def write_rank0():
        shutil.rmtree(temporary, ignore_errors=True)
        model.save_pretrained(temporary, state_dict=weights)
        if sharded:  # FSDP2 renamed the class FSDP<name>; the saved config names the model's own
            model.config.architectures = [name.removeprefix("FSDP") for name in model.config.architectures]
            model.config.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        torch.save(trainer_state, os.path.join(temporary, "trainer_state.pt"))

    if rank == 0:
        write_all(write_rank0)
    if sharded:
        world.dist.barrier()
        if rank > 0:
            write_all(lambda: torch.save(trainer_state, os.path.join(temporary, f"trainer_state-rank{rank}.pt")))
        world.dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old)
    if sharded:
        world.dist.barrier()
    return final


# The layout of trainer_state.pt: bump CHECKPOINT_FORMAT whenever a key is added, removed or changes
# type, so that a checkpoint of another version is named as such instead of failing somewhere later.
# Format 1 (written before the number was recorded) has the same keys except "format".
CHECKPOINT_FORMAT = 2
TRAINER_STATE_TYPES = {"format": int, "step": int, "args": dict, "optimizer": dict, "stream": dict,
                       "gate": (dict, type(None)), "rng": tuple, "torch_rng": torch.Tensor,
                       "cuda_rng": (torch.Tensor, type(None)), "world_size": int}


def check_trainer_state(state, file):
    """UserError naming what does not fit this version's trainer state: another format, a missing or
    unexpected key, a value of the wrong type."""
    if not isinstance(state, dict):
        raise UserError(f"{file}: not a trainer state (a {type(state).__name__}, expected a dict)")
    version = state.get("format")  # None: format 1, the same keys without the number
    expected = {key: kind for key, kind in TRAINER_STATE_TYPES.items() if key != "format" or version is not None}
    problems = []
    if isinstance(version, int) and version != CHECKPOINT_FORMAT:
        problems.append(f"written by {'an older' if version < CHECKPOINT_FORMAT else 'a newer'} format "
                        f"({version}) than this antisd.py reads ({CHECKPOINT_FORMAT})")
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing:
        problems.append("missing " + ", ".join(map(repr, missing)))
    if unexpected:
        problems.append("unexpected " + ", ".join(map(repr, unexpected)))
    for key, kind in expected.items():
        if key in state and (not isinstance(state[key], kind) or isinstance(state[key], bool) and kind is int):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            problems.append(f"{key!r} is a {type(state[key]).__name__}, expected {names}")
    if problems:
        raise UserError(f"{file} does not fit this version of antisd.py (format {CHECKPOINT_FORMAT}): "
                        + "; ".join(problems))


def load_checkpoint(path, device, state_file="trainer_state.pt"):
    """(trainer state, model, tokenizer) of a checkpoint; UserError naming the file that is missing
    or cannot be read (a disk that filled up, a copy cut short, a file deleted by hand), or a trainer
    state that another version of this file wrote (check_trainer_state)."""
    weights = [name for name in ("model.safetensors", "model.safetensors.index.json")
               if os.path.exists(os.path.join(path, name))]
    missing = [name for name in (state_file, "config.json", "tokenizer.json", "tokenizer_config.json")
               if not os.path.exists(os.path.join(path, name))] + ([] if weights else ["model.safetensors"])
    if missing:
        raise UserError(f"{path}: {', '.join(missing)} missing")

    def read(what, load):
        try:
            return load()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # any failure to read a checkpoint file means the file is damaged
            raise UserError(f"{what} cannot be read ({type(e).__name__}: {one_line(e)})") from None

    def read_json(file):
        with open(file, encoding="utf-8") as f:
            return json.load(f)

    from safetensors import safe_open
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if name.endswith(".json"):
            read(file, lambda: read_json(file))
        elif name.endswith(".safetensors"):  # the header gives every tensor's bytes: a cut file fails here
            read(file, lambda: safe_open(file, "pt").keys())
    # weights_only: tensors, numbers, strings and containers only; a pickled object that would run code is
    # refused (the file is then damaged, and the checkpoint before it is used)
    state = read(os.path.join(path, state_file), lambda: torch.load(os.path.join(path, state_file), weights_only=True))
    check_trainer_state(state, os.path.join(path, state_file))
    if not all(bool(torch.isfinite(m).all()) for m in state["optimizer"].get("master", [])
               if isinstance(m, torch.Tensor)):
        raise UserError(f"{os.path.join(path, state_file)}: the float32 master weights hold NaN or inf values")
    model, tokenizer = read(f"the model in {path}", lambda: load_model(path, device))
    return state, model, tokenizer


def resume_from_newest_whole_checkpoint(checkpoints, device, state_file="trainer_state.pt"):
    """(path, trainer state, model, tokenizer) of the newest checkpoint that loads. A damaged one is
    reported and the one before it used: every saved step can be redone, so nothing is lost but time."""
    damaged = []
    for path in reversed(checkpoints):
        try:
            return (path, *load_checkpoint(path, device, state_file))
        except UserError as e:
            damaged.append(str(e))
            print(f"checkpoint {path} is damaged: {e}; trying the one before it", file=sys.stderr)
    raise UserError("--resume: no checkpoint is whole: " + "; ".join(damaged))


# -----------------------------------------------------------------------------
# Several processes: torchrun + FSDP2 (one process skips all of it)
# Several processes: torchrun + FSDP2 (infrastructure; one process skips all of it)
#
# `torchrun --nproc_per_node N antisd.py ...` runs the same loop on N processes. Each takes its own
# share of the step's problems (whole groups of G) and generates, rewards and scores them; then every
# process receives the whole step's rollouts and statistics, so that the group advantages, the gate
# and the logged metrics are computed from the global batch, identically everywhere. The update runs
# on each process's own rows with the global token count, and FSDP2 sums the gradients. The weights
# are sharded with FSDP2 (each decoder layer, then the root): the float32 shards are the master
# weights (AdamW is elementwise, so each process updates its own shard), the forward and backward
# compute in bf16 on CUDA.

class World:
    """This process's place among torchrun's processes. In one process rank 0
    of 1, nothing sharded, and every method returns its input."""

    def __init__(self, device):
        import torch.distributed as dist
        self.dist = dist
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.sharded = self.size > 1
        self.compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the unsharded path's dtype
        if self.sharded and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend)

    def share(self, items):
        """This rank's contiguous share of a step's items (problems: groups are never split)."""
        if len(items) % self.size:
            raise UserError(f"--prompts-per-step {len(items)} must be divisible by the number of processes ({self.size})")
        per_rank = len(items) // self.size
        return items[self.rank * per_rank:(self.rank + 1) * per_rank]

    def rows(self, n_rollouts):
        """This rank's rows of the whole step's rollouts."""
        per_rank = n_rollouts // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def gather(self, items):
        """Every rank's list concatenated in rank order (a tensor: along dim 0, padded with zeros on
        dim 1 to the widest). One process: items itself."""
        if self.size == 1:
            return items
        if isinstance(items, torch.Tensor):
            parts = self.gather([items.cpu()])
            width = max(part.shape[1] for part in parts)
            return torch.cat([F.pad(part, (0, width - part.shape[1])) for part in parts]).to(items.device)
        parts = [None] * self.size
        self.dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def sum(self, value):
        """The sum of a number over all ranks."""
        if self.size == 1:
            return value
        total = torch.tensor(float(value), dtype=torch.float64)
        self.dist.all_reduce(total)
        return float(total)


def refuse_what_sharding_cannot_do(world, args):
    if world.sharded and args.eval_every:
        raise UserError(f"--eval-every {args.eval_every} is not supported under torchrun: pass --eval-every 0 "
                        f"(evaluate the saved checkpoints with eval.py)")


def shard_model(model, world, device):
    """FSDP2: each decoder layer, then the root (embeddings, final norm, lm_head, tied or not).
    Parameters are float32 shards (the master weights); on CUDA the forward and backward run in
    bf16 and gradients are reduced in float32 (averaged over ranks: MasterAdamW turns that back into
    the sum, since each rank's loss is already divided by the global token count)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world.size,))
    settings = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=world.compute_dtype, reduce_dtype=torch.float32)}
    model.to(torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **settings)
    fully_shard(model, **settings)
    return model


class whole_weights_for_generation:
    """Gathers every shard once for generation and reshards after; otherwise every generated token
    would all-gather every layer again. Unsharded (one process): nothing to do. (The root's weights
    stay gathered after its forward anyway: FSDP2 does that for the root.)"""

    def __init__(self, model):
        from torch.distributed.fsdp import FSDPModule
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def __enter__(self):
        for unit in self.units:
            unit.unshard()
            if unit is not self.units[0]:
                unit.set_reshard_after_forward(False, recurse=False)

    def __exit__(self, *exc):
        for unit in self.units[1:]:
            unit.set_reshard_after_forward(True, recurse=False)
        for unit in self.units:
            unit.reshard()


def full_state_dict(model, dtype):
    """The whole model's weights on rank 0's CPU (every rank must call it), in `dtype`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor.to(dtype) for name, tensor in state.items()}


# -----------------------------------------------------------------------------
# The command line: flags, and expected failures as one paragraph without a traceback

def get_args(argv=None):
    p = argparse.ArgumentParser(description="AntiSD / self-distillation / GRPO on one GPU",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model and data
    p.add_argument("--model", default="Qwen/Qwen3-1.7B", help="hub id, local checkpoint dir, 'tiny' (CPU demo: a small model trained on arith, cached) or 'tiny-random' (untrained, for tests)")
    p.add_argument("--dataset", default="math", help="math | gsm8k | dapo | arith | search | path/to/file.jsonl")
    p.add_argument("--enable-thinking", action="store_true", help="Qwen3 thinking mode (off: answers stay short enough for one GPU)")
    # method
    p.add_argument("--method", default="antisd", choices=["antisd", "sd", "grpo"], help="per-token term: -phi(u) | +u | none")
    p.add_argument("--estimator", default="token", choices=["token", "full"], help="token: the sampled-token term (the paper); full (antisd only): exact full-vocabulary JSD gradient, one more teacher forward")
    p.add_argument("--divergence", default="jsd", choices=["jsd", "rkl"], help="antisd term: -phi(u) (JSD ascent, M4) or -u (reverse-KL ascent, M5 ablation)")
    p.add_argument("--term", default="paper", choices=["paper", "official"], help="antisd term: -phi(u) (M4), or the official code's: u clamped to +-5, |u| > 2 sigma zeroed, z-scored per sequence, clipped to +-5 (M8)")
    p.add_argument("--lambda-form", default="gate", choices=["gate", "continuous"], help="gate: lambda = g * lambda_max (M5, M6); continuous: the official code's per-rollout lambda from the teacher's perplexity of it, needs --gate perplexity (M8)")
    p.add_argument("--compose", default="add", choices=["add", "mult"], help="A_seq + lam*a (M5) or A_seq*(1 + lam*a) (M5 ablation)")
    p.add_argument("--lambda-max", type=float, default=0.5, help="lambda_max (M5)")
    p.add_argument("--gate", default=None, choices=["entropy", "perplexity", "none"], help="default: entropy for antisd, none for sd (M6, M8)")
    p.add_argument("--gate-warmup", type=int, default=5, help="W: steps with lambda=0 that calibrate H_warm (M6)")
    p.add_argument("--tau-ratio", type=float, default=0.93, help="tau_down = tau_ratio * H_warm (M6)")
    # sampling
    p.add_argument("--prompts-per-step", type=int, default=16, help="problems per step (paper: 32)")
    p.add_argument("--group-size", type=int, default=8, help="G rollouts per problem (M2)")
    p.add_argument("--max-new-tokens", type=int, default=1536, help="response length cap (paper: 32K)")
    p.add_argument("--temperature", type=float, default=1.0, help="training sampling temperature (M9)")
    p.add_argument("--top-p", type=float, default=1.0, help="training nucleus sampling (M9)")
    p.add_argument("--gen-batch-size", type=int, default=64, help="sequences generated at once; lower it on out-of-memory")
    # optimisation
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (M9)")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (M9)")
    p.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip epsilon (M2)")
    p.add_argument("--ppo-epochs", type=int, default=1, help="passes over each batch; 1 = the paper (ratio 1, REINFORCE)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward/backward; lower it on out-of-memory")
    p.add_argument("--seed", type=int, default=0)
    # evaluation during training (eval.py)
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps; 0 = never")
    p.add_argument("--eval-benchmarks", default="math500", help="comma-separated eval.py benchmarks (held out from training data)")
    p.add_argument("--eval-n", type=int, default=4, help="samples per problem: avg@n, pass@k, maj@n")
    p.add_argument("--eval-limit", type=int, default=100, help="first N problems of each benchmark")
    p.add_argument("--eval-data-dir", default=None, help="read benchmarks from <dir>/<name>.jsonl instead of the hub")
    # logging and checkpoints
    p.add_argument("--out-dir", default="runs/antisd", help="metrics.jsonl, rollouts.jsonl and checkpoints go here")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out-dir from its newest checkpoint")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    # the tiny models are CPU demos: unless set explicitly, shrink the run to minutes (tiny) or seconds
    model_name = p.parse_known_args(argv)[0].model
    if model_name in TINY_MODELS:
        import tiny_tasks
        p.set_defaults(**tiny_tasks.tiny_run_defaults(model_name))
    args = p.parse_args(argv)
    # argparse reads "nan" and "inf" as floats, and every comparison with NaN is False
    for key, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            p.error(f"--{key.replace('_', '-')} must be a finite number, got {value}")

    # refuse inconsistent flags now, not after the model has loaded
    n_rollouts = args.prompts_per_step * args.group_size
    for flag, value in [("--prompts-per-step", args.prompts_per_step), ("--max-new-tokens", args.max_new_tokens),
                        ("--gen-batch-size", args.gen_batch_size), ("--micro-batch-size", args.micro_batch_size),
                        ("--steps", args.steps), ("--ppo-epochs", args.ppo_epochs), ("--save-every", args.save_every),
                        ("--eval-n", args.eval_n)]:
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.group_size < 2:
        p.error(f"--group-size must be at least 2 (group advantages compare rollouts), got {args.group_size}")
    if n_rollouts % args.micro_batch_size:
        p.error(f"--prompts-per-step * --group-size = {n_rollouts} must be divisible by --micro-batch-size ({args.micro_batch_size})")
    # a flag the chosen method never reads is refused: a run that silently ignores it would be mislabelled
    if args.method == "grpo":
        ignored = [f"--{name.replace('_', '-')}" for name in ("divergence", "term", "lambda_form", "compose", "lambda_max")
                   if getattr(args, name) != p.get_default(name)]
        ignored += ["--gate"] if args.gate not in (None, "none") else []
        if ignored:
            p.error(f"{', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect with --method grpo (no per-token term)")
    if args.method == "sd" and args.divergence != "jsd":
        p.error("--divergence has no effect with --method sd: its term is always +u (M3)")
    if args.term == "official" and (args.method != "antisd" or args.divergence != "jsd" or args.estimator != "token"):
        p.error("--term official is the official code's form of the sampled-token -phi(u): it needs --method antisd, "
                "--divergence jsd and --estimator token")
    if args.lambda_form == "continuous" and (args.method != "antisd" or args.gate != "perplexity" or args.estimator != "token"):
        p.error("--lambda-form continuous is the official code's per-rollout lambda: it needs --method antisd, "
                "--gate perplexity (whose tau_down it divides by) and --estimator token")
    if args.gate is None:
        args.gate = "entropy" if args.method == "antisd" else "none"
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        p.error(f"--temperature must be > 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}")
    if args.lr <= 0 or args.clip <= 0 or args.lambda_max < 0:
        p.error("--lr and --clip must be > 0 and --lambda-max >= 0")
    if args.gate != "none" and args.method != "grpo" and (args.gate_warmup < 1 or not 0 < args.tau_ratio <= 1):
        p.error(f"--gate-warmup must be >= 1 and --tau-ratio in (0, 1], got {args.gate_warmup} and {args.tau_ratio}")
    if args.estimator == "full" and (args.method != "antisd" or args.divergence != "jsd" or args.compose != "add"):
        p.error("--estimator full is the JSD gradient itself: it needs --method antisd, --divergence jsd, --compose add "
                "(for --method sd it would descend the JSD, not the reverse KL of M3: use --estimator token)")
    if args.estimator == "full" and args.ppo_epochs > 1:
        p.error("--estimator full needs --ppo-epochs 1: the exact JSD term has no ratio or clip, and later epochs "
                "would re-score the teacher with already-updated weights")
    if args.eval_every < 0 or args.eval_limit < 0:
        p.error("--eval-every and --eval-limit must be >= 0")
    if not (args.model in TINY_MODELS or os.path.isdir(args.model) or re.fullmatch(r"[\w.-]+/[\w.-]+", args.model)):
        p.error(f"--model {args.model!r}: expected 'tiny', 'tiny-search', 'tiny-random', a local checkpoint directory, or a hub id such as Qwen/Qwen3-1.7B")
    return args


def one_line(error, limit=500):
    """A library's error message, which may span lines, as one short line."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def run_command(main, *args):
    """Runs main the way the shell should see it (also eval.py's). Bad input and unfixable settings
    (UserError), out of memory and Ctrl-C outside the step loop's own handler print one paragraph and
    exit non-zero. Any other exception is a bug: it keeps its traceback."""
    previous = {sig: signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else stop_at_once)
                for sig in STOP_SIGNALS}
    try:
        return main(*args)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # a file that could not be written or read: a full disk, a read-only folder, ...
        raise SystemExit(f"error: {e.filename or 'a file'}: {e.strerror or one_line(e, 200)} [errno {e.errno}]; "
                         f"nothing after the last checkpoint was kept: fix this, then run the same command "
                         f"again (with --resume where a checkpoint exists)") from None
    except torch.cuda.OutOfMemoryError as e:
        raise SystemExit(f"CUDA out of memory ({one_line(e, 200)}): lower the batch sizes (antisd.py: "
                         f"--gen-batch-size, --micro-batch-size; eval.py: --batch-size) or --max-new-tokens.") from None
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name}): stopped at once, nothing more was saved (--resume "
              f"continues from the newest checkpoint, if there is one)", file=sys.stderr)
        raise SystemExit(128 + signum) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_as_script(main, *args):
    """run_command, then stop signals are ignored: the work is done, or has failed and said so, and a
    signal during the interpreter's exit (which resets Python's handlers) would kill it without a word."""
    try:
        run_command(main, *args)
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


if __name__ == "__main__":
    sys.modules.setdefault("antisd", sys.modules[__name__])  # eval.py's `import antisd` gets this module, not a second copy
    run_as_script(main)
