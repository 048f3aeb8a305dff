"""Evaluate a policy on math benchmarks: avg@n, pass@k and maj@n from n sampled answers per problem.

For every problem we sample n responses with the training student's prompt, read the final answer of
each (every \\boxed{} after the thinking block, as one list: antisd.extract_boxed) and check it
against the gold answer with the same verifier that gives the training reward. Reported per
benchmark and as their unweighted mean.

Design decisions:
  1. The prompt, the chat-template settings (--enable-thinking) and the verifier are the training
     student's (antisd.student_prompt_ids, antisd.verify), imported rather than copied, so the
     numbers measure exactly the behaviour that training rewards.
  2. Sampling defaults are the paper's eval settings: T=0.7, top-p 0.95 (M9, docs/METHOD.md). The paper
     reports avg@32 on AIME and avg@4 on Minerva; the default here is n=4 on a small set, sized
     for one GPU (see 7).
  3. Each benchmark names its own columns explicitly (BENCHMARKS below), separately for the hub
     copy and for a local <name>.jsonl, because the two often differ (amc23 says `question` on
     the hub and `problem` locally; local minerva_math has no answer field at all). Nothing else
     is guessed; a missing file or field is an error that names it.
  4. pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k), computed as the product of the c
     factors (1 - k/i), i = n-c+1..n, never with large binomials; reported for every power of two k <= n.
  5. maj@n groups the extracted answers by verified equivalence (\\frac12 and 0.5 are one vote),
     not by string; responses without a \\boxed{} do not vote; ties go to the answer seen first.
  6. All prompts of all benchmarks go through one sampler loop, sorted by prompt length so that a
     batch pads little. Every sample draws from its own generator, seeded from --seed, the problem
     and the sample's number (PerSampleSampling): results repeat, a problem's samples do not depend
     on the problems before it or in its batch (so --resume gives what an uninterrupted evaluation
     gives), and an evaluation in the middle of training leaves the training run's random stream alone.
  7. Cost, an ESTIMATE (not measured): Qwen3-1.7B in bf16 on one H100 with batch 64 decodes at
     roughly 25-35 ms per step, and a batch runs until its longest response stops, i.e. usually
     --max-new-tokens steps. The defaults (aime24, aime25, amc23, minerva_math: 372 problems,
     n=4, 2048 new tokens) make 1,488 samples = 24 batches x ~1 min, about 20-30 minutes.
  8. --limit K keeps the first K rows of each benchmark (0: all), in file order, for quick checks. A row whose
     gold answer antisd.clean_gold cannot parse is skipped with a warning (nothing could ever
     match it, so it would only count as a wrong answer); a benchmark with none left is an error.

Outputs in --out-dir: results.json (metrics per benchmark under "benchmarks", their mean under
"mean"; in "mean", `problems` is the total), samples.jsonl (one line per problem with all of its
responses, appended as each problem is checked, in benchmark order once the evaluation ends),
settings.json (what --resume checks), and a Markdown table on stdout. A killed evaluation continues
with the same command plus --resume.

Run:  python eval.py                                    # Qwen/Qwen3-1.7B, default benchmarks, one GPU
      python eval.py --model runs/antisd/checkpoint-200 --benchmarks aime24,aime25,hmmt25 --n 32
      python eval.py --data-dir bench/ --benchmarks math500,gsm8k --limit 100   # local <name>.jsonl files
      python eval.py --model tiny --benchmarks arith --limit 200        # CPU: the tiny arith model, held out
      python eval.py --compare runs/grpo runs/sd runs/antisd --out-dir figures  # compare.png, compare.md
      python eval.py --show runs/antisd --out-dir figures                       # tokens.html, coloured by u
"""

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import time


def _stopped_while_starting(signum, frame):
    print(f"interrupted ({signal.Signals(signum).name}): stopped at once, nothing more was saved",
          file=sys.stderr, flush=True)
    os._exit(128 + signum)  # nothing is written yet; an exception could be swallowed inside an import


if __name__ == "__main__":  # a stop while the libraries below load: one line (run_as_script takes over after)
    for _signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(_signum, _stopped_while_starting)

import datasets  # noqa: E402  (after the handlers above: loading the libraries takes seconds)
import torch
from tqdm import tqdm

import antisd
import tiny_tasks

# -----------------------------------------------------------------------------
# Benchmarks: where each lives, and which fields hold the problem and the gold answer

# how to get the gold answer out of the gold field, before antisd.clean_gold normalises it
GOLD_RULES = {
    "value": lambda value: value,                               # the field is the answer (str, int, float or list)
    "last_boxed": lambda text: antisd.last_boxed(text),         # a worked solution: its last \boxed{}
    "after_hashes": lambda text: text[text.rindex("####"):] if "####" in text else None,  # GSM8K "... #### 1,000"
}

BENCHMARKS = {
    # name: hub (id, config, split); hub and local (<name>.jsonl) fields: (problem, gold, gold rule)
    "math500": dict(hub=("HuggingFaceH4/MATH-500", None, "test"),
                    hub_fields=("problem", "answer", "value"),
                    local_fields=("problem", "answer", "value")),
    "aime24": dict(hub=("HuggingFaceH4/aime_2024", None, "train"),
                   hub_fields=("problem", "answer", "value"),        # "025": a string with leading zeros
                   local_fields=("problem", "answer", "value")),
    "aime25": dict(hub=("math-ai/aime25", None, "test"),
                   hub_fields=("problem", "answer", "value"),
                   local_fields=("problem", "answer", "value")),     # an int locally
    "amc23": dict(hub=("math-ai/amc23", None, "test"),
                  hub_fields=("question", "answer", "value"),
                  local_fields=("problem", "answer", "value")),      # a float 27.0 locally
    "minerva_math": dict(hub=("math-ai/minervamath", None, "test"),
                         hub_fields=("question", "answer", "value"),
                         local_fields=("problem", "solution", "last_boxed")),  # no answer field locally
    "olympiadbench": dict(hub=("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
                          hub_fields=("question", "final_answer", "value"),   # a list of strings
                          local_fields=("question", "final_answer", "value")),
    "gsm8k": dict(hub=("openai/gsm8k", "main", "test"),
                  hub_fields=("question", "answer", "after_hashes"),
                  local_fields=("question", "answer", "after_hashes")),
    "hmmt25": dict(hub=("MathArena/hmmt_feb_2025", None, "train"),
                   hub_fields=("problem", "answer", "value"),
                   local_fields=("problem", "answer", "value")),     # no local copy exists: the hub's fields
}


# The tiny models' benchmarks, generated offline (no file, no hub) from the held-out side of their
# task's split (tiny_tasks.arith_is_held_out, tiny_tasks.search_is_held_out): the training problems and the
# tiny models' supervised starts draw only from the other side, so none occurs in training.
# name: (the task's problem generator, problems drawn per problem kept: duplicates are dropped)
OFFLINE_BENCHMARKS = {"arith": (tiny_tasks.make_arith_problems, 4), "search": (tiny_tasks.make_search_problems, 2)}
OFFLINE_BENCHMARK_SIZE = 500


def offline_benchmark(name, count):
    """The first `count` held-out problems of a tiny task, each problem once."""
    if count > OFFLINE_BENCHMARK_SIZE:
        raise antisd.UserError(f"{name}: the benchmark has {OFFLINE_BENCHMARK_SIZE} problems; a limit of {count} "
                               f"(--limit, or antisd.py's --eval-limit) asks for more")
    make_problems, draws = OFFLINE_BENCHMARKS[name]
    unique = {}
    for item in make_problems(draws * OFFLINE_BENCHMARK_SIZE, seed=-1, held_out=True):
        unique.setdefault(item["problem"], {"problem": item["problem"], "answer": item["answer"]})
    return list(unique.values())[:count]


def load_benchmark(name, data_dir=None, limit=None):
    """The first `limit` problems of a benchmark as [{"problem": str, "answer": str}], gold cleaned.

    From the hub by default, or from DATA_DIR/<name>.jsonl in that file's own schema.
    """
    if name in OFFLINE_BENCHMARKS:
        return offline_benchmark(name, limit or OFFLINE_BENCHMARK_SIZE)
    if name not in BENCHMARKS:
        raise antisd.UserError(f"unknown benchmark {name!r}; known: {', '.join([*BENCHMARKS, *OFFLINE_BENCHMARKS])}")
    if limit is not None and limit < 1:
        raise antisd.UserError(f"{name}: limit must be at least 1 (None: all problems), got {limit}")
    spec = BENCHMARKS[name]
    if data_dir is None:
        hub_id, config, split = spec["hub"]
        source = f"hub dataset {hub_id}" + (f" config {config}" if config else "") + f" split {split}"
        try:
            rows = datasets.load_dataset(hub_id, config, split=split).to_list()
        except Exception as error:  # offline, renamed, gated: say which benchmark and what to do
            raise antisd.UserError(f"{name}: could not load the {source} ({antisd.one_line(error)}); without "
                                   f"the hub, pass --data-dir DIR with a file {name}.jsonl") from None
        problem_field, gold_field, gold_rule = spec["hub_fields"]
        places = [f"row {index}" for index in range(len(rows))]
    else:
        source = os.path.join(data_dir, f"{name}.jsonl")
        if not os.path.isdir(data_dir):
            raise antisd.UserError(f"{name}: the data folder {data_dir} does not exist")
        if not os.path.isfile(source):
            raise antisd.UserError(f"{name}: benchmark file {source} does not exist")
        numbered = antisd.read_jsonl(source, with_line_numbers=True)
        rows = [row for _, row in numbered]
        places = [f"line {line_number}" for line_number, _ in numbered]  # errors name the file's own lines
        problem_field, gold_field, gold_rule = spec["local_fields"]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise antisd.UserError(f"{name}: {source} has no problems")

    problems, unparsable = [], []
    for index, row in enumerate(rows):
        for field in (problem_field, gold_field):
            if field not in row:
                raise antisd.UserError(f"{name}: {source} {places[index]} has no field {field!r} "
                                 f"(fields: {', '.join(sorted(row))})")
        problem = row[problem_field]
        if not isinstance(problem, str) or not problem.strip():
            raise antisd.UserError(f"{name}: {source} {places[index]}: field {problem_field!r} is not a problem "
                                   f"text: {problem!r:.200}")
        antisd.check_text_size(problem, problem_field, f"{name}: {source} {places[index]}")
        raw_gold = GOLD_RULES[gold_rule](row[gold_field])
        gold = None if raw_gold is None else antisd.clean_gold(raw_gold)
        if gold is None:  # nothing could ever be verified against it: leave it out, loudly
            unparsable.append(index)
            continue
        problems.append({"problem": problem, "answer": gold})
    if not problems:
        raise antisd.UserError(f"{name}: {source}: no row has a gold answer that can be parsed in field "
                               f"{gold_field!r} (rule {gold_rule}); {places[0]} has {str(rows[0][gold_field])[-200:]!r}")
    if unparsable:
        print(f"warning: {name}: skipped {len(unparsable)} of {len(rows)} problems whose gold answer in field "
              f"{gold_field!r} cannot be parsed ({', '.join(places[i] for i in unparsable[:10])})", file=sys.stderr)
    return problems


# -----------------------------------------------------------------------------
# Metrics

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i): no large numbers, no cancellation
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def same_answer(answer, other):
    """Whether two extracted answers are the same: equal strings, or verified equivalent."""
    return answer.strip() == other.strip() or antisd.verify("\\boxed{" + answer + "}", other) == 1.0


def majority_is_correct(answers, correct, same=same_answer):
    """maj@n for one problem: 1.0 if the most voted answer group is correct.

    answers: the extracted answer of each sample, None when it has no \\boxed{} (no vote).
    correct: each sample's verified score. A group is represented by its first answer, and ties
    go to the group seen first, so the result does not depend on anything but the sample order.
    """
    groups = []  # [representative answer, votes, representative's score]
    for answer, score in zip(answers, correct):
        if answer is None:
            continue
        for group in groups:
            if same(answer, group[0]):
                group[1] += 1
                break
        else:
            groups.append([answer, 1, score])
    if not groups:
        return 0.0
    return float(max(groups, key=lambda group: group[1])[2])  # max keeps the first of equal counts


def benchmark_metrics(records, n):
    """Metrics of one benchmark from its per-problem records (see evaluate)."""
    ks = [2 ** i for i in range(n.bit_length())]                       # 1, 2, 4, ... <= n
    metrics = {"problems": len(records),
               f"avg@{n}": sum(sum(r["correct"]) / n for r in records) / len(records)}
    for k in ks:
        metrics[f"pass@{k}"] = sum(pass_at_k(n, int(sum(r["correct"])), k) for r in records) / len(records)
    metrics[f"maj@{n}"] = sum(r["majority_correct"] for r in records) / len(records)
    samples = n * len(records)
    metrics["no_box"] = sum(a is None for r in records for a in r["extracted"]) / samples
    metrics["truncated"] = sum(t for r in records for t in r["truncated"]) / samples
    metrics["mean_length"] = sum(sum(r["lengths"]) for r in records) / samples
    return metrics


def mean_metrics(per_benchmark):
    """The unweighted mean over benchmarks of every metric; `problems` is the total instead."""
    names = list(next(iter(per_benchmark.values())))
    mean = {name: sum(m[name] for m in per_benchmark.values()) / len(per_benchmark) for name in names}
    mean["problems"] = sum(m["problems"] for m in per_benchmark.values())
    return mean


# -----------------------------------------------------------------------------
# Sampling and scoring

class PerSampleSampling:
    """A logits processor that samples every row from its own random stream, so that a sample depends
    only on the seed, its problem and its number, never on the rows that share its batch or on what
    ran before it (a resumed evaluation samples exactly what an uninterrupted one does). Temperature
    and top-p as in training (antisd.generate), then Gumbel-max: the argmax of log p + Gumbel noise is
    a sample of p. generate then takes that one token greedily."""

    def __init__(self, generators, temperature, top_p):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper
        self.generators = generators
        self.warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]

    def __call__(self, input_ids, scores):
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        logp = torch.log_softmax(scores.float(), dim=-1)                         # [B, V]
        uniform = torch.stack([torch.rand(scores.shape[1], generator=g, device=g.device) for g in self.generators])
        choice = (logp - torch.log(-torch.log(uniform))).argmax(dim=-1)          # [B] Gumbel-max
        return torch.full_like(scores, -math.inf).scatter_(1, choice[:, None], 0.0)


def sample_generator(seed, benchmark, index, sample, device):
    """The random stream of one sample: from the run's seed, the problem (benchmark and index) and the
    sample's number."""
    key = hashlib.sha256(f"{seed}/{benchmark}/{index}/{sample}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(key[:8], "little") >> 1)


def sample_batch(model, tokenizer, prompts, generators, max_new_tokens, temperature, top_p):
    """One response per prompt, (token ids up to and including the stop token, truncated), each row
    sampled from its own generator (PerSampleSampling)."""
    from transformers import GenerationConfig, LogitsProcessorList
    stop_ids = antisd.stop_token_ids(model, tokenizer)
    # greedy over the one token PerSampleSampling leaves; every other setting explicit, as in antisd.generate
    config = GenerationConfig(do_sample=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                              eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    input_ids, attention_mask = antisd.left_pad(prompts, tokenizer.pad_token_id, model.device)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                            logits_processor=LogitsProcessorList([PerSampleSampling(generators, temperature, top_p)]))
    return [antisd.cut_at_stop(new_tokens, stop_ids) for new_tokens in output[:, input_ids.shape[1]:].tolist()]


def check_problem(tokenizer, name, index, item, problem_outputs):
    """One problem's record: its responses verified, extracted and voted on."""
    responses = [antisd.decode_response(tokenizer, ids) for ids, _ in problem_outputs]
    correct = [antisd.verify(response, item["answer"]) for response in responses]
    extracted = [antisd.extract_boxed(response) for response in responses]
    return {"benchmark": name, "index": index, "problem": item["problem"], "answer": item["answer"],
            "responses": responses, "extracted": extracted, "correct": correct,
            "majority_correct": majority_is_correct(extracted, correct),
            "truncated": [truncated for _, truncated in problem_outputs],
            "lengths": [len(ids) for ids, _ in problem_outputs]}


def evaluate(model, tokenizer, benchmarks, n, temperature, top_p, max_new_tokens, batch_size,
             enable_thinking, seed, done=None, on_problem=None):
    """Sample n responses per problem and score them.

    benchmarks: {name: load_benchmark(name, ...)}. Returns (results, samples): results is
    {"benchmarks": {name: metrics}, "mean": metrics}, samples one dict per problem, in benchmark order.
    done: {(name, index): sample} of problems evaluated before (eval.py --resume), not sampled again.
    on_problem(sample) is called for each new problem as soon as its responses are checked.
    The model is put in eval mode and given back in the mode it came in; the caller's random
    state is not touched (every sample has its own generator).
    """
    done = done or {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    # one prompt per problem, each asked n times; ids are the training student's exactly
    problems = [(name, index, item) for name, items in benchmarks.items() for index, item in enumerate(items)]
    prompts = [antisd.student_prompt_ids(tokenizer, item["problem"], enable_thinking) for _, _, item in problems]
    requests = [p for p in range(len(prompts)) for _ in range(n)]     # sample j of prompt p is request p*n+j
    order = sorted(range(len(requests)), key=lambda r: len(prompts[requests[r]]))  # similar lengths share a batch
    # the batches are fixed by the settings, not by what is left: a resumed evaluation runs the same
    # batches (the done problems of a batch are sampled again and dropped), so even the padding is the same
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    samples = {p: done[(name, index)] for p, (name, index, _) in enumerate(problems) if (name, index) in done}
    waiting = {p: n for p in range(len(problems)) if p not in samples}  # samples still to come, per problem
    outputs = [None] * len(requests)

    with torch.no_grad():
        for batch in tqdm([b for b in batches if any(requests[r] in waiting for r in b)], desc="sampling", unit="batch"):
            generators = [sample_generator(seed, *problems[requests[r]][:2], r % n, device) for r in batch]
            generated = sample_batch(model, tokenizer, [prompts[requests[r]] for r in batch], generators,
                                     max_new_tokens, temperature, top_p)
            for r, output in zip(batch, generated):
                p = requests[r]
                outputs[r] = output
                if p not in waiting:
                    continue
                waiting[p] -= 1
                if waiting[p] == 0:  # the problem's last sample: check it now, so that it can be kept
                    del waiting[p]
                    samples[p] = check_problem(tokenizer, *problems[p], outputs[p * n:(p + 1) * n])
                    if on_problem:
                        on_problem(samples[p])
    model.train(was_training)

    samples = [samples[p] for p in range(len(problems))]
    per_benchmark = {name: benchmark_metrics([s for s in samples if s["benchmark"] == name], n) for name in benchmarks}
    return {"benchmarks": per_benchmark, "mean": mean_metrics(per_benchmark)}, samples


def markdown_table(results):
    """results["benchmarks"] and results["mean"] as one Markdown table, a row per benchmark."""
    rows = {**results["benchmarks"], "mean": results["mean"]}
    columns = list(results["mean"])
    lines = ["| benchmark | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [str(metrics[c]) if c == "problems" else
                 f"{metrics[c]:.1f}" if c == "mean_length" else f"{metrics[c]:.3f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Reading training runs: curves side by side (--compare) and tokens coloured by u (--show)

# the panels of compare.png: (title, [(metrics.jsonl key, label)]); "eval/mean/avg@" takes any n
CURVES = [("reward (training batch)", [("reward_mean", "")]),
          ("held-out accuracy (avg@n)", [("eval/mean/avg@", "")]),
          ("lambda (solid) and gate on (dotted)", [("lambda", ""), ("gate_on", ":")]),
          ("teacher (solid) / student (dashed) entropy, median", [("teacher_entropy_median", ""), ("student_entropy_median", "--")]),
          ("u = teacher - student log-prob: mean, 1st/99th pct", [("u_mean", ""), ("u_p01", ":"), ("u_p99", ":")]),
          ("JSD(student, teacher), token mean", [("jsd_mean", "")]),
          ("response length, tokens", [("response_length_mean", "")])]
TABLE_METRICS = ["reward_mean", "eval/mean/avg@", "response_length_mean", "u_mean", "jsd_mean",
                 "teacher_entropy_median", "lambda"]
NOT_MEASURED_IF_ZERO = {"teacher_entropy_median", "student_entropy_median", "u_mean", "u_p01", "u_p99", "jsd_mean"}
HIGHER_IS_BETTER = {"reward_mean", "eval/mean/avg@"}  # "best" is their highest value; other rows have none


def read_run(run_dir):
    """metrics.jsonl of a run as a list of dicts, in step order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise antisd.UserError(f"{run_dir}: no metrics.jsonl (is it an --out-dir of antisd.py?)")
    lines = antisd.read_jsonl(path, with_line_numbers=True)
    for line_number, line in lines:
        if not isinstance(line.get("step"), int) or isinstance(line["step"], bool):
            raise antisd.UserError(f"{path}, line {line_number}: not a metrics line of antisd.py (no integer 'step')")
    return sorted((line for _, line in lines), key=lambda line: line["step"])


def series(lines, key):
    """(steps, values) of a metric, skipping steps that do not log it; a key ending in '@' matches any n.
    A teacher statistic that is 0 at every step was never measured (GRPO scores no teacher): no series."""
    points = []
    for line in lines:
        name = next((k for k in line if k.startswith(key)), None) if key.endswith("@") else key
        if name in line and line[name] is not None:
            points.append((line["step"], line[name]))
    if key in NOT_MEASURED_IF_ZERO and all(v == 0 for _, v in points):
        return [], []
    return [s for s, _ in points], [v for _, v in points]


def compare_runs(run_dirs, out_dir):
    """compare.png (the curves of every run, one colour per run) and compare.md (first, best, last)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {os.path.basename(os.path.normpath(d)): read_run(d) for d in run_dirs}
    os.makedirs(out_dir, exist_ok=True)
    figure, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    for ax, (title, keys) in zip(axes.flat, CURVES):
        for color, (name, lines) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs.items()):
            for key, style in keys:
                steps, values = series(lines, key)
                ax.plot(steps, values, style or "-", color=color, marker="o" if key.startswith("eval/") else None,
                        markersize=3, label=name if key == keys[0][0] else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    axes.flat[-1].legend(*axes.flat[0].get_legend_handles_labels(), loc="center", fontsize=11, title="run")
    figure.tight_layout()
    figure.savefig(os.path.join(out_dir, "compare.png"), dpi=70)
    plt.close(figure)

    rows = ["| run | metric | first | best | last |", "|---|---|---|---|---|"]
    for name, lines in runs.items():
        for key in TABLE_METRICS:
            steps, values = series(lines, key)
            if not values:
                continue
            best = f"{max(values):.4f} (step {steps[values.index(max(values))]})" if key in HIGHER_IS_BETTER else ""
            label = next(k for k in lines[steps[0] - lines[0]["step"]] if k.startswith(key)) if key.endswith("@") else key
            rows.append(f"| {name} | {label} | {values[0]:.4f} (step {steps[0]}) | {best} | {values[-1]:.4f} (step {steps[-1]}) |")
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write("\n".join(rows) + "\n")


GROUP_CURVES = [("held-out accuracy (avg@n)", "eval/mean/avg@"), ("reward (training batch)", "reward_mean"),
                ("deliberation rate (search)", "deliberation_rate"), ("wrong checks (search)", "check_error_rate"),
                ("lambda", "lambda")]


def run_group(run_dir):
    """The group a run belongs to: its folder name without a trailing seed (-s3, -seed3)."""
    return re.sub(r"[-_](s|seed)?\d+$", "", os.path.basename(os.path.normpath(run_dir)))


def compare_groups(run_dirs, out_dir):
    """compare-groups.png and .md: per group of runs (run_group: one method, several seeds), the mean
    of each curve over the runs (line) and its spread (band: lowest to highest run), at the steps all
    of them logged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = {}
    for d in run_dirs:
        groups.setdefault(run_group(d), []).append(read_run(d))
    os.makedirs(out_dir, exist_ok=True)
    figure, axes = plt.subplots(1, len(GROUP_CURVES), figsize=(4.2 * len(GROUP_CURVES), 3.6))
    rows = ["| group | runs | metric | " + " | ".join(["first", "last"]) + " |", "|---|---|---|---|---|"]
    for ax, (title, key) in zip(axes, GROUP_CURVES):
        for color, (name, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], groups.items()):
            curves = [dict(zip(*series(lines, key))) for lines in runs]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            values = [[c[s] for c in curves] for s in steps]                   # [steps, runs]
            means = [sum(v) / len(v) for v in values]
            ax.plot(steps, means, "-", color=color, marker="o" if key.startswith("eval/") else None, markersize=3,
                    label=f"{name} (n={len(runs)})")
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2)
            rows.append(f"| {name} | {len(runs)} | {key} | {means[0]:.3f} (step {steps[0]}, {min(values[0]):.3f}-{max(values[0]):.3f}) "
                        f"| {means[-1]:.3f} (step {steps[-1]}, {min(values[-1]):.3f}-{max(values[-1]):.3f}) |")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("mean over seeds (line) and lowest-highest seed (band)", fontsize=10)
    figure.tight_layout()
    figure.savefig(os.path.join(out_dir, "compare-groups.png"), dpi=70)
    plt.close(figure)
    with open(os.path.join(out_dir, "compare-groups.md"), "w") as f:
        f.write("\n".join(rows) + "\n")


def u_colour(u, scale):
    """Blue for u < 0 (the teacher finds the token less likely: deliberation), red for u > 0."""
    strength = min(abs(u) / scale, 1.0)
    fade = int(255 * (1 - 0.85 * strength))
    return f"rgb({fade},{fade},255)" if u < 0 else f"rgb(255,{fade},{fade})"


def read_rollouts(path):
    """rollouts.jsonl's lines, each checked for what tokens.html shows; a line of another shape is
    named rather than failing halfway through the page."""
    rollouts = []
    for line_number, r in antisd.read_jsonl(path, with_line_numbers=True):
        tokens = r.get("tokens", [])
        well_formed = (isinstance(r.get("step"), int) and isinstance(r.get("reward"), (int, float))
                       and isinstance(r.get("problem", ""), str) and isinstance(tokens, list)
                       and all(isinstance(t, list) and len(t) == 2 and isinstance(t[0], str)
                               and isinstance(t[1], (int, float)) and not isinstance(t[1], bool) for t in tokens))
        if not well_formed:
            raise antisd.UserError(f"{path}, line {line_number}: not a rollout line of antisd.py (expected step, "
                                   f"reward, problem and tokens as [text, u] pairs)")
        rollouts.append(r)
    return rollouts


def show_tokens(run_dir, out_dir, steps_shown=6, scale=3.0):
    """tokens.html: the logged rollouts of a few steps across the run, every token coloured by its u."""
    import html
    path = os.path.join(run_dir, "rollouts.jsonl")
    if not os.path.isfile(path):
        raise antisd.UserError(f"{run_dir}: no rollouts.jsonl (is it an --out-dir of antisd.py?)")
    rollouts = [r for r in read_rollouts(path) if "tokens" in r]
    if not rollouts:
        raise antisd.UserError(f"{path}: no rollout has per-token u ('tokens'); it was written by an older antisd.py")
    steps = sorted({r["step"] for r in rollouts})
    count = min(steps_shown, len(steps))  # the first, the last and evenly spaced steps between them
    chosen = sorted({steps[round(k * (len(steps) - 1) / max(1, count - 1))] for k in range(count)})
    legend = "".join(f'<span style="background:{u_colour(u, scale)}">&nbsp;{u:+g}&nbsp;</span>'
                     for u in (-scale, -scale / 2, -scale / 4, 0, scale / 4, scale / 2, scale))
    parts = [f"<!doctype html><meta charset='utf-8'><title>tokens coloured by u: {html.escape(run_dir)}</title>",
             "<body style='font-family:sans-serif;max-width:60em'>",
             f"<h1>{html.escape(run_dir)}: each response token coloured by u</h1>",
             "<p>u = log p<sub>teacher</sub>(token) - log p<sub>student</sub>(token), the pointwise mutual information "
             "between the token and the teacher's privileged context. Blue: u &lt; 0 (the teacher, seeing a correct "
             "solution, finds the token less likely). Red: u &gt; 0 (the solution makes it more likely). "
             f"Colour saturates at |u| = {scale:g}; hover a token for its value. GRPO runs do not score a teacher: u = 0.</p>",
             f"<p>legend: {legend}</p>"]
    for step in chosen:
        parts.append(f"<h2>step {step}</h2>")
        for r in (r for r in rollouts if r["step"] == step):
            tokens = "".join(f'<span title="u = {u:+.3f}" style="background:{u_colour(u, scale)}">'
                             f'{html.escape(text).replace(chr(10), "<br>")}</span>' for text, u in r["tokens"])
            parts.append(f"<p><b>reward {r['reward']:g}</b>, gold {html.escape(str(r.get('gold')))}<br>"
                         f"<i>{html.escape(r.get('problem', ''))}</i></p><p style='font-family:monospace;line-height:1.8'>{tokens}</p>")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokens.html"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + "\n</body>\n")


# -----------------------------------------------------------------------------
# Resuming: samples.jsonl keeps every problem as soon as it is checked

# what defines an evaluation: resuming with any of these changed would mix two evaluations in one file
EVALUATION_DEFINING = ["model", "benchmarks", "data_dir", "limit", "n", "temperature", "top_p", "max_new_tokens",
                       "enable_thinking", "seed", "problems"]


def evaluation_settings(args, benchmarks):
    """The settings that define this evaluation, with a fingerprint of its problems (an edited file is
    another evaluation)."""
    settings = {key: getattr(args, key) for key in EVALUATION_DEFINING if key != "problems"}
    settings["problems"] = {name: antisd.dataset_fingerprint(items) for name, items in benchmarks.items()}
    return settings


# what check_problem writes for each problem, and what the metrics of a resumed evaluation read back
SAMPLE_FIELDS = {"benchmark": str, "index": int, "problem": str, "responses": list, "extracted": list,
                 "correct": list, "majority_correct": (int, float), "truncated": list, "lengths": list}


def read_done_problems(path):
    """{(benchmark, index): sample} from samples.jsonl. A kill can leave the last line half-written: it
    is dropped, and the file rewritten without it (into a new file that replaces it), so that the next
    line starts on a line of its own. Damage anywhere else is named."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    done, kept = {}, []
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
            key = (sample["benchmark"], sample["index"])
            if not all(isinstance(sample[field], kind) and not isinstance(sample[field], bool)
                       for field, kind in SAMPLE_FIELDS.items()):
                raise TypeError("a field of another type")
        except (ValueError, KeyError, TypeError, RecursionError):
            if line_number == len(lines):  # no newline after it: torn by a kill mid-write
                continue
            raise antisd.UserError(f"{path}, line {line_number}: not a sample line of eval.py (move the file "
                                   f"away to evaluate again from the start)") from None
        done[key] = sample
        kept.append(line + b"\n")
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        f.writelines(kept)
    os.replace(temporary, path)
    return done


def start_or_resume(args, benchmarks):
    """{(benchmark, index): sample} of the problems already evaluated in --out-dir (none unless
    --resume), after checking that they belong to this evaluation. Writes settings.json for a new one."""
    settings = evaluation_settings(args, benchmarks)
    samples_path = os.path.join(args.out_dir, "samples.jsonl")
    settings_path = os.path.join(args.out_dir, "settings.json")
    finished = os.path.exists(os.path.join(args.out_dir, "results.json"))
    if not args.resume:
        if os.path.exists(samples_path) and not finished:
            raise antisd.UserError(f"--out-dir {args.out_dir} holds an unfinished evaluation ({samples_path}): "
                                   f"pass --resume to continue it, or choose another --out-dir")
        with open(settings_path, "w") as f:
            json.dump(settings, f, indent=2)
        open(samples_path, "w").close()
        return {}
    if not os.path.exists(settings_path) or not os.path.exists(samples_path):
        raise antisd.UserError(f"--resume: --out-dir {args.out_dir} holds no evaluation to continue "
                               f"(no settings.json and samples.jsonl)")
    try:
        with open(settings_path) as f:
            saved = json.load(f)
    except (ValueError, RecursionError) as e:
        raise antisd.UserError(f"--resume: {settings_path} cannot be read ({antisd.one_line(e)})") from None
    if not isinstance(saved, dict):
        raise antisd.UserError(f"--resume: {settings_path} holds a JSON {type(saved).__name__}, not the settings of "
                               f"an evaluation (move it away to evaluate again from the start)")
    changed = [f"--{key.replace('_', '-')} {saved.get(key)!r} -> {value!r}" for key, value in settings.items()
               if key != "problems" and saved.get(key) != value]
    old_problems = saved.get("problems") if isinstance(saved.get("problems"), dict) else {}
    changed += [f"the problems of {name} changed ({os.path.join(args.data_dir, name + '.jsonl') if args.data_dir else 'hub'})"
                for name, fingerprint in settings["problems"].items() if old_problems.get(name) != fingerprint]
    if changed:
        raise antisd.UserError(f"refusing to resume the evaluation in {args.out_dir} with different settings: "
                               + "; ".join(changed))
    done = read_done_problems(samples_path)
    known = {(name, index) for name, items in benchmarks.items() for index in range(len(items))}
    if not set(done) <= known:
        raise antisd.UserError(f"--resume: {samples_path} holds problems this evaluation does not have "
                               f"({sorted(set(done) - known)[:3]}); it was written by another evaluation")
    print(f"resuming the evaluation in {args.out_dir}: {len(done)} of {len(known)} problems done")
    return done


def model_fingerprint(model):
    """A hash of the model's config and every weight's bytes: the model itself, not its path (a folder
    whose model.safetensors was replaced is another model)."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_model_identity(args, model):
    """Records the model's fingerprint in settings.json, or on --resume refuses a model other than the
    one that wrote the samples so far."""
    settings_path = os.path.join(args.out_dir, "settings.json")
    with open(settings_path) as f:
        settings = json.load(f)
    fingerprint = model_fingerprint(model)
    if args.resume and settings.get("model_fingerprint") not in (None, fingerprint):
        raise antisd.UserError(f"refusing to resume the evaluation in {args.out_dir}: --model {args.model} is not "
                               f"the model it started with (its weights or config changed: fingerprint "
                               f"{settings['model_fingerprint']} -> {fingerprint}); evaluate it into another --out-dir")
    settings["model_fingerprint"] = fingerprint
    temporary = settings_path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(settings, f, indent=2)
    os.replace(temporary, settings_path)


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # reading training runs instead of evaluating a model
    parser.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="write OUT_DIR/compare.png and compare.md from these runs' metrics.jsonl")
    parser.add_argument("--by-group", action="store_true", help="with --compare: also compare-groups.png/.md, the mean and spread over runs whose folder names differ only by a trailing seed (grpo-s0, grpo-s1)")
    parser.add_argument("--show", metavar="RUN_DIR", help="write OUT_DIR/tokens.html from this run's rollouts.jsonl")
    # model and data
    parser.add_argument("--model", default="Qwen/Qwen3-1.7B", help="hub id, checkpoint dir saved by antisd.py, 'tiny' (the arith model), 'tiny-search' or 'tiny-random' (CPU, offline)")
    parser.add_argument("--benchmarks", default="aime24,aime25,amc23,minerva_math",  # competition sets + the paper's Minerva; ~20-30 min (estimate, docstring 7)
                        help=f"comma-separated, from: arith, search (generated, held out from --dataset arith and search), {', '.join(BENCHMARKS)}")
    parser.add_argument("--data-dir", default=None, help="read DIR/<name>.jsonl instead of the hub, in each benchmark's own schema")  # None: the hub
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first K problems of each benchmark")  # 0: all, as antisd.py --eval-limit
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu")  # None: CUDA when available (antisd.pick_device)
    # sampling
    parser.add_argument("--n", type=int, default=4, help="samples per problem")  # the paper's avg@4 (Minerva); it uses 32 for AIME
    parser.add_argument("--temperature", type=float, default=0.7)  # the paper's eval sampling (M9, docs/METHOD.md)
    parser.add_argument("--top-p", type=float, default=0.95)  # the paper's eval sampling (M9, docs/METHOD.md)
    parser.add_argument("--max-new-tokens", type=int, default=2048)  # fits one GPU in well under an hour (estimate, docstring 7); the paper allows 32K
    parser.add_argument("--enable-thinking", action="store_true",
                        help="Qwen3 chat-template thinking mode; use the same setting as training")  # off, as antisd.py: answers fit the token budget
    parser.add_argument("--batch-size", type=int, default=64)  # sequences per generate call; ~17 GB of KV cache at 1.7B and 2K+prompt tokens
    parser.add_argument("--seed", type=int, default=0)  # seeds sampling, so a rerun gives the same responses on the same machine
    # output
    parser.add_argument("--out-dir", default="eval_out", help="where results.json and samples.jsonl go (a finished evaluation is overwritten)")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished evaluation in --out-dir after its last checked problem")
    args = parser.parse_args(argv)
    if args.compare or args.show:
        if args.compare:
            compare_runs(args.compare, args.out_dir)
            print(f"wrote {args.out_dir}/compare.png and compare.md")
            if args.by_group:
                compare_groups(args.compare, args.out_dir)
                print(f"wrote {args.out_dir}/compare-groups.png and compare-groups.md")
        if args.show:
            show_tokens(args.show, args.out_dir)
            print(f"wrote {args.out_dir}/tokens.html")
        return

    if args.n < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--n, --batch-size and --max-new-tokens must be at least 1")
    if args.limit < 0:
        parser.error(f"--limit must be >= 0 (0: all problems), got {args.limit}")
    if not (math.isfinite(args.temperature) and args.temperature > 0) or not 0 < args.top_p <= 1:  # NaN fails both
        parser.error(f"--temperature must be a finite number > 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}")
    names = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
    if not names:
        parser.error(f"--benchmarks names no benchmark; choose from: {', '.join(BENCHMARKS)}")
    benchmarks = {name: load_benchmark(name, args.data_dir, args.limit or None) for name in names}  # data errors before the model loads
    antisd.lock_out_dir(args.out_dir)  # one evaluation per folder: two would mix their samples
    done = start_or_resume(args, benchmarks)
    device = antisd.pick_device(args.device, args.model)
    model, tokenizer = antisd.load_model(args.model, device)
    check_model_identity(args, model)

    started = time.time()
    with open(os.path.join(args.out_dir, "samples.jsonl"), "a") as samples_file:
        def keep(sample):  # each problem as soon as it is checked: a kill loses at most the batch in flight
            try:
                antisd.write_json_line(samples_file, sample)
            except OSError as e:  # a full disk: what was written is kept, and --resume continues after it
                raise antisd.UserError(f"could not write problem {sample['index']} of {sample['benchmark']} to "
                                       f"{samples_file.name} ({e.strerror}); {args.out_dir} has "
                                       f"{antisd.human_size(shutil.disk_usage(args.out_dir).free)} free; the "
                                       f"problems before it are kept: free some space, then pass --resume") from None

        results, samples = evaluate(model, tokenizer, benchmarks, n=args.n, temperature=args.temperature,
                                    top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                    enable_thinking=args.enable_thinking, seed=args.seed, done=done, on_problem=keep)
    seconds = time.time() - started

    versions = {package: importlib.metadata.version(package)
                for package in ("torch", "transformers", "datasets", "math-verify")}
    versions["python"] = platform.python_version()
    settings = {key: value for key, value in vars(args).items() if key != "resume"}  # resumed or not: one evaluation
    report = {"model": args.model, "settings": settings, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "versions": versions, "seconds": round(seconds, 1), **results}
    # samples.jsonl again, now in benchmark order (it was written in the order problems finished)
    with open(os.path.join(args.out_dir, "samples.jsonl.tmp"), "w") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")
    os.replace(os.path.join(args.out_dir, "samples.jsonl.tmp"), os.path.join(args.out_dir, "samples.jsonl"))
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(markdown_table(results))
    print(f"{len(samples)} problems x {args.n} samples in {seconds:.0f} s; wrote {args.out_dir}/results.json and samples.jsonl")


if __name__ == "__main__":
    antisd.run_as_script(main)
