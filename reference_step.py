"""One step of Algorithm 1 written the obvious way: the shortest complete statement of what a step of
antisd.py computes, written apart from it, for reading and for checking it.

Each problem, each of its rollouts, one at a time: no padding, batching or chunking, and every number
in float64, the forward pass included (the step runs on a float64 deep copy of the model, so that in a
comparison with antisd.py the rounding is the fast code's float32 alone). "M<n>" cites section n of
docs/METHOD.md. test_antisd.py ("The reference step") runs real steps of antisd.one_step against it.

  1. the rollouts come sampled (sampling is random, so they are checked rather than drawn again):
     each must be a draw from its own problem's prompt: every token inside the top-p nucleus at
     temperature T, a stop token only at its end                                                (M1)
  2. reward each rollout against its own problem's gold                                        (M1)
  3. group advantages: the z-score of the rewards within each group (sample std, eps 1e-6)      (M2)
  4. each rollout's teacher prompt, from its own group and problem (M7); student and teacher
     log-probs, entropies and JSD from a full-vocabulary softmax of one unpadded sequence     (M1, M4)
  5. the gate: one signal per step, the median teacher entropy (or perplexity, M8); a Schmitt
     trigger after W warm-up steps; lambda = g * lambda_max, or per rollout (M8)               (M6)
  6. per-token advantages A_seq + lambda * term, term -phi(u), +u or -u (or M8's form)     (M3-M5, M8)
  7. the clipped surrogate, token-mean over the whole batch; its gradient by autograd; the
     gradient's norm clipped to 1; AdamW with weight decay 0.01                                 (M2)

What it takes from antisd.py, and why (nothing else):
  - the model and its tokenizer: the step is a step of that network; here of a float64 copy of it.
  - antisd.verify, the reward: a grader (the final box, hedges refused, math-verify in a worker
    process) with its own tests against hundreds of graded answers. Written again here it would be a
    second grader, and a difference between the two would be a grading question, not the loop's.
    Tests that script the reward replace antisd.verify, and the reference sees the same rewards.
  - antisd.student_message and antisd.render_prompt: the prompt's text and the chat template's
    rendering, which the teacher must share with the student token for token (M7). The teacher's
    three added blocks are written out below from M7, so the fast code's copy of them is checked.
The method's settings are `settings` below, written from METHOD.md rather than read from
antisd.get_args, so that a default changed on the command line shows up as a difference.

Where METHOD.md leaves a choice open, the choice is the fast code's, and it is stated here:
  - log-probs are those of the distribution the rollouts were sampled from, softmax(logits / T),
    over the whole vocabulary (top-p only limits the sampling).
  - M7's random sibling is rng.choice(correct siblings, in index order), drawn for each rollout that
    has one, in rollout order, from a random.Random of the process holding the rollout. The step
    takes those generators in the state the fast step found them, rather than the indices it chose:
    given the indices, it could not tell a draw made for the wrong rollout or group from a right one.
  - the teacher sees a correct sibling's text after its thinking block; the solution shown is cut to
    1024 tokens, the problem never.
  - M8's sigma_ref is the sample standard deviation of u over the batch's response tokens.
Not covered: the search task's two metrics (tiny_tasks.py; an untrained model never checks a box).
"""

import copy
import math
import statistics
import types

import torch

import antisd

EPS = 1e-6                   # in the z-scores of M2 and M8
GRAD_CLIP = 1.0              # the gradient's norm is clipped to this before AdamW (verl's value)
WEIGHT_DECAY = 0.01          # AdamW's (verl's value; negligible at lr 1e-6)
MAX_SOLUTION_TOKENS = 1024   # the solution shown to the teacher is cut to this; M7 sets no limit


def settings(method="antisd", **flags):
    """What `python antisd.py --method <method>` runs, from METHOD.md; flags as named on the command
    line (gate_warmup=1 for --gate-warmup 1)."""
    chosen = dict(method=method,
                  lambda_max=0.5, gate_warmup=5, tau_ratio=0.93,        # M5, M6
                  gate="entropy" if method == "antisd" else "none",     # M6 gates AntiSD; default SD (M3) has no gate
                  term="paper", lambda_form="gate", estimator="token",  # -phi(u) and lambda = g * lambda_max (M4, M5)
                  divergence="jsd", compose="add",                      # M5: the ablations are options
                  clip=0.2, ppo_epochs=1, lr=1e-6,                      # M2, M9: one update per batch
                  temperature=1.0, top_p=1.0, enable_thinking=False)    # M9; Qwen3 without its thinking block
    chosen.update(flags)
    return types.SimpleNamespace(**chosen)


def response_logits(model, prompt, response):
    """[R, V] logits at the positions that predict each response token, from one unpadded sequence."""
    return model(input_ids=torch.tensor([prompt + response]), use_cache=False).logits[0, len(prompt) - 1:-1]


def in_nucleus(logits, response, temperature, top_p):
    """Could each token have been sampled at temperature T and top-p? It could when the tokens at most
    as likely as it, itself included, hold more than 1 - top_p of the mass (transformers' rule)."""
    probs = torch.softmax(logits / temperature, dim=-1)                         # [R, V]
    token_probs = probs[range(len(response)), response][:, None]                # [R, 1]
    return bool(((probs * (probs <= token_probs)).sum(dim=-1) > 1 - top_p).all())


def minus_phi(u):
    """-phi(u) = -(log(1 + e^u) - log 2) / 2, the AntiSD advantage (M4)."""
    return -0.5 * (torch.log1p(torch.exp(u)) - math.log(2.0))


def jsd(student_log_p, teacher_log_p):
    """[R] JSD(pi_T, pi_S) = (KL(pi_T || M) + KL(pi_S || M)) / 2, M = (pi_S + pi_T) / 2 (M4)."""
    log_m = torch.log((student_log_p.exp() + teacher_log_p.exp()) / 2)
    return 0.5 * ((teacher_log_p.exp() * (teacher_log_p - log_m)).sum(dim=-1)
                  + (student_log_p.exp() * (student_log_p - log_m)).sum(dim=-1))


def official_term(u, sigma):
    """M8's term for one rollout: tokens with |u| > 2 sigma get none, -phi(u clamped to +-5) of the
    rest is z-scored over them (sample std) and clipped to +-5."""
    kept = u.abs() <= 2 * sigma
    a = minus_phi(u.clamp(-5.0, 5.0))[kept]
    term = torch.zeros_like(u)
    if len(a) > 1:  # one kept token is its own mean: 0
        term[kept] = ((a - a.mean()) / (a.std() + EPS)).clamp(-5.0, 5.0)
    return term


def quantile(values, q):
    """Linear interpolation between the two order statistics around q (torch.quantile's rule)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def teacher_message(tokenizer, problem, index, group, rng):
    """The teacher's user message for rollout `index` of its group (M7)."""
    correct_siblings = [j for j, sibling in enumerate(group) if sibling.reward == 1 and j != index]
    if correct_siblings:  # the answer a correct sibling gave, not its search for it
        solution = group[rng.choice(correct_siblings)].text.rsplit("</think>", 1)[-1].strip()
    elif problem["solution"]:
        solution = problem["solution"]
    else:
        solution = f"The final answer is \\boxed{{{problem['answer']}}}."
    solution_ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
    if len(solution_ids) > MAX_SOLUTION_TOKENS:
        solution = tokenizer.decode(solution_ids[:MAX_SOLUTION_TOKENS])
    feedback = "Your answer is correct." if group[index].reward == 1 else "Your answer is incorrect."
    return (antisd.student_message(problem["problem"])
            + f"\nYour previous attempt:\n\n{solution}\n\n"
            + f"\nPrevious assessment: {feedback}\n"
            + "\n\nNow solve this problem step by step.\n")


class ReferenceRun:
    """What Algorithm 1 carries from one step to the next besides the weights: AdamW's moments and the
    gate's state (M6). Each step starts from the weights it is given, loaded into the float64 copy of
    the model, so that in a comparison the fast code's float32 rounding does not accumulate over steps."""

    def __init__(self, model, settings):
        self.model = copy.deepcopy(model).double()
        self.settings = settings
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, weight_decay=WEIGHT_DECAY)
        self.history, self.h_warm, self.tau_down, self.on = [], None, None, True   # g starts at 1

    def gate(self, signal):
        """The Schmitt trigger (M6): (lambda, whether the term is on). lambda is 0 during the W warm-up
        steps, which set H_warm; the perplexity gate reopens at 1.07 x its warm-up value (M8)."""
        s = self.settings
        if len(self.history) < s.gate_warmup:
            self.history.append(signal)
            if len(self.history) == s.gate_warmup:
                self.h_warm = statistics.median(self.history)
                self.tau_down = s.tau_ratio * self.h_warm
            return 0.0, False
        if self.on and signal < self.tau_down:
            self.on = False      # the teacher has collapsed: u is noise
        elif not self.on and signal >= (1.07 if s.gate == "perplexity" else 1.0) * self.h_warm:
            self.on = True
        return (s.lambda_max, True) if self.on else (0.0, False)

    def step(self, weights, tokenizer, problems, rollouts, sibling_rngs):
        """One step from `weights` (a state dict) on problems[p] and rollouts[p], its rollouts as sampled
        (token ids). sibling_rngs: one random.Random per process, each process holding a contiguous share
        of the problems ([rng] in one process). Returns every rollout in rollout order (problem by
        problem) with what the step computed for it, the update, the metrics antisd.py logs, and the
        weights after."""
        self.model.load_state_dict(weights)   # cast to float64
        s, model = self.settings, self.model
        eos = model.generation_config.eos_token_id
        stop_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        groups = [[types.SimpleNamespace(problem=problem, response=response) for response in responses]
                  for problem, responses in zip(problems, rollouts)]
        every = [r for group in groups for r in group]

        # ---- 1. the rollouts, as sampled from the student (M1): each from its own problem's prompt
        for r in every:
            r.student_prompt = antisd.render_prompt(tokenizer, antisd.student_message(r.problem["problem"]),
                                                    s.enable_thinking)
            with torch.no_grad():
                r.student_logits = response_logits(model, r.student_prompt, r.response)   # [R, V] pi_old
            r.truncated = r.response[-1] not in stop_ids   # no stop token: cut at the length cap
            r.sampled_from_own_prompt = (in_nucleus(r.student_logits, r.response, s.temperature, s.top_p)
                                         and not stop_ids & set(r.response[:-1]))

        # ---- 2. reward: 1 if the final boxed answer is equivalent to its own problem's gold (M1)
        for r in every:
            r.text = tokenizer.decode(r.response, skip_special_tokens=True)   # the stop token is not text
            r.reward = antisd.verify(r.text, r.problem["answer"])

        # ---- 3. group advantages: A_seq = (R - mean) / (std + eps) within each group (M2)
        for group in groups:
            rewards = [r.reward for r in group]
            for r in group:
                r.seq_adv = (r.reward - statistics.mean(rewards)) / (statistics.stdev(rewards) + EPS)

        # ---- 4. the teacher prompt (M7); s, t, entropies and JSD per token, full vocabulary (M1, M4)
        for p, group in enumerate(groups):
            rng = sibling_rngs[p * len(sibling_rngs) // len(groups)]   # the process holding problem p
            for k, r in enumerate(group):
                r.log_p = torch.log_softmax(r.student_logits / s.temperature, dim=-1)       # [R, V]
                r.logp = r.log_p[range(len(r.response)), r.response]                       # [R] s_old
                r.entropy = -(r.log_p.exp() * r.log_p).sum(dim=-1)                          # [R]
                r.teacher_prompt = None
                if s.method == "grpo":  # no teacher
                    continue
                r.teacher_prompt = antisd.render_prompt(tokenizer, teacher_message(tokenizer, r.problem, k, group, rng),
                                                        s.enable_thinking)
                with torch.no_grad():  # the teacher is a constant (M1)
                    teacher_logits = response_logits(model, r.teacher_prompt, r.response)
                r.teacher_log_p = torch.log_softmax(teacher_logits / s.temperature, dim=-1)  # [R, V]
                r.t_logp = r.teacher_log_p[range(len(r.response)), r.response]             # [R] t
                r.t_entropy = -(r.teacher_log_p.exp() * r.teacher_log_p).sum(dim=-1)        # [R] H
                r.jsd = jsd(r.log_p, r.teacher_log_p)                                       # [R]

        def tokens(name):
            return [float(x) for r in every for x in getattr(r, name)]

        # ---- 5. the gate: one signal per step over every response token of the batch (M6, M8)
        signal = teacher_entropy_median = 0.0
        if s.method == "grpo":
            lam, gate_on = 0.0, False
        else:
            teacher_entropy_median = statistics.median(tokens("t_entropy"))
            signal = teacher_entropy_median if s.gate != "perplexity" else math.exp(-statistics.mean(tokens("t_logp")))
            lam, gate_on = (s.lambda_max, True) if s.gate == "none" else self.gate(signal)
        for r in every:
            r.lam = lam
            if s.lambda_form == "continuous" and lam:  # per rollout, from the teacher's perplexity of it (M8)
                perplexity = math.exp(-float(r.t_logp.mean()))
                r.lam = min(max(0.2 * math.log(min(max(perplexity / self.tau_down, 0.5), 3.0)), 0.0), s.lambda_max)

        # ---- 6. per-token advantages A = A_seq + lambda * term (M3, M4, M5, M8)
        for r in every:  # u = t - s = PMI(y_t; c | x, y_<t) (M1); grpo has no teacher
            r.u = torch.zeros(len(r.response), dtype=torch.float64) if s.method == "grpo" else r.t_logp - r.logp
        sigma = statistics.stdev(tokens("u"))   # M8's sigma_ref
        for r in every:
            if s.method == "grpo":
                r.a = torch.zeros_like(r.u)
            elif s.method == "sd":
                r.a = r.u                             # descend KL(pi_S || pi_T): +u (M3)
            elif s.estimator == "full":
                r.a = None                            # the loss ascends the JSD itself (step 7)
            elif s.term == "official":
                r.a = official_term(r.u, sigma)       # M8
            elif s.divergence == "jsd":
                r.a = minus_phi(r.u)                  # ascend the JSD: -phi(u) (M4)
            else:
                r.a = -r.u                            # ascend the reverse KL (M5 ablation)
            if r.a is None:
                r.advantages = torch.full_like(r.u, r.seq_adv)
            elif s.compose == "mult":
                r.advantages = r.seq_adv * (1 + r.lam * r.a)   # M5 ablation
            else:
                r.advantages = r.seq_adv + r.lam * r.a         # M5

        # ---- 7. the clipped surrogate, token-mean over the whole batch (M2); autograd; clip; AdamW
        total_tokens = sum(len(r.response) for r in every)
        losses, grad_norms, gradients, clipped_tokens = [], [], [], 0
        for _ in range(s.ppo_epochs):
            loss = 0.0
            for r in every:
                log_p = torch.log_softmax(response_logits(model, r.student_prompt, r.response) / s.temperature, dim=-1)
                ratio = torch.exp(log_p[range(len(r.response)), r.response] - r.logp)   # 1 in the first epoch
                unclipped = ratio * r.advantages
                clipped = ratio.clamp(1 - s.clip, 1 + s.clip) * r.advantages
                rollout_loss = -torch.minimum(unclipped, clipped).sum() / total_tokens
                if s.estimator == "full":  # ascend the full-vocabulary JSD with weight lambda (M4)
                    rollout_loss = rollout_loss - r.lam * jsd(log_p, r.teacher_log_p).sum() / total_tokens
                rollout_loss.backward()
                loss += rollout_loss.item()
                clipped_tokens += int((clipped < unclipped).sum())   # the clip binds: no gradient
            grads = [p.grad for p in model.parameters()]
            norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
            losses.append(loss)
            grad_norms.append(norm)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                self.optimizer.zero_grad()
                break   # not applied, and the update ends
            for g in grads:
                g.mul_(min(1.0, GRAD_CLIP / (norm + 1e-6)))
            gradients.append([g.clone() for g in grads])
            self.optimizer.step()
            self.optimizer.zero_grad()

        u = tokens("u")
        metrics = {
            "reward_mean": statistics.mean(r.reward for r in every),
            "groups_with_signal": statistics.mean(float(len({r.reward for r in group}) > 1) for group in groups),
            "response_length_mean": statistics.mean(len(r.response) for r in every),
            "response_length_max": max(len(r.response) for r in every),
            "truncation_rate": statistics.mean(float(r.truncated) for r in every),
            "u_mean": statistics.mean(u), "u_std": statistics.stdev(u),
            "u_frac_negative": statistics.mean(float(x < 0) for x in u),
            "u_p01": quantile(u, 0.01), "u_p99": quantile(u, 0.99),
            "sd_term_mean": None if s.estimator == "full" else statistics.mean(tokens("a")),
            "teacher_entropy_median": teacher_entropy_median,
            # grpo with one epoch needs no scoring pass before the update, and logs no student entropy
            "student_entropy_median": (0.0 if s.method == "grpo" and s.ppo_epochs == 1
                                       else statistics.median(tokens("entropy"))),
            "jsd_mean": 0.0 if s.method == "grpo" else statistics.mean(tokens("jsd")),
            "gate_signal": signal, "gate_on": float(gate_on),
            "lambda": statistics.mean(r.lam for r in every),
            "h_warm": self.h_warm or 0.0, "tau_down": self.tau_down or 0.0,
            "loss": statistics.mean(losses), "grad_norm": statistics.mean(grad_norms),
            "update_applied": len(gradients) > 0, "epochs_applied": len(gradients),
            "clip_fraction": clipped_tokens / (total_tokens * len(losses)),
        }
        return types.SimpleNamespace(rollouts=every, losses=losses, grad_norms=grad_norms, gradients=gradients,
                                     metrics=metrics,
                                     weights={name: p.detach() for name, p in model.named_parameters()})
