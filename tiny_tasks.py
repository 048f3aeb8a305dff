"""The laptop tasks: offline, CPU-sized stand-ins for math that show what AntiSD does.

  arith   small multi-step word problems; `--model tiny` is a 2-layer Qwen3 given a supervised start
          on worked solutions with slips, so that RL has correctness to gain (docs/tiny-arith.md)
  search  twelve boxes, one of which plus an addend makes ten: a response may check boxes one line at
          a time or guess; `--model tiny-search` starts out checking rarely, and its teacher was taught
          that someone who has seen a solution stops checking (u << 0 on the decision to check, the
          paper's Figure 2): default SD stops checking, AntiSD keeps it (docs/tiny-search.md)
  tiny-random  an untrained 2-layer Qwen3 with a byte-level tokenizer: shapes only, for the tests

None of this is the method: antisd.py (Part I) is. antisd.py imports this module when a tiny model,
a tiny dataset or the search task's metrics are asked for; eval.py draws its held-out arith and
search benchmarks from here.

Run:  python tiny_tasks.py            # one step of the tiny search model by hand: what each step computes
"""

import argparse
import math
import os
import random
import re
import shutil
import sys
import time
import zlib

import torch
import torch.nn.functional as F

import antisd
from antisd import (IGNORE_INDEX, build_teacher_prompt, decode_response, generate, median, response_hidden,
                    response_mask, score, student_message, student_prompt_ids,
                    teacher_prompts_for_step, verify)


# -----------------------------------------------------------------------------
# The tiny models: CPU demos and test models, built offline
#
# `--model tiny-random` is an untrained 2-layer Qwen3 with a byte-level tokenizer: shapes only, for
# the tests. `--model tiny` is a 2-layer Qwen3 with a BPE tokenizer trained on the arith text (digits
# one per token), fine-tuned on worked solutions and cached on disk. The headroom left for RL is in
# correctness, not format: every solution is boxed, but a student-format solution makes each of two
# slips (adding where it should multiply or subtract) with probability SLIP_RATE, so the model learns
# to box nearly every answer and to slip on a fraction of them. Teacher-format examples show a correct
# solution and continue with it, so the teacher (the same weights, M1) has learned to use its context.

# the tiny model's RL defaults, unless a flag says otherwise: minutes on a CPU, measured (README: "Learn
# on a laptop")
TINY_ARITH_RL_DEFAULTS = dict(dataset="arith", prompts_per_step=32, max_new_tokens=64, gen_batch_size=128,
                              micro_batch_size=64, steps=20, lr=3e-4, save_every=1000, eval_benchmarks="arith",
                              eval_limit=200, eval_every=10)


def tiny_run_defaults(model_name):
    """Flag defaults that shrink a run of a tiny model to a CPU: minutes for tiny and tiny-search,
    seconds for tiny-random (shapes only: the tests). {} for any other model."""
    if model_name == "tiny-random":
        return dict(prompts_per_step=2, max_new_tokens=32, gen_batch_size=16, micro_batch_size=8,
                    save_every=1000, eval_every=0)
    defaults = dict({"tiny": TINY_ARITH_RL_DEFAULTS, "tiny-search": TINY_SEARCH_RL_DEFAULTS}.get(model_name, {}))
    if defaults and os.environ.get("WORLD_SIZE", "1") != "1":
        defaults["eval_every"] = 0  # in-loop evaluation runs in one process only (torchrun: evaluate the checkpoints)
    return defaults


TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


def build_tiny(seed=0):
    """A random 2-layer Qwen3 and a byte-level tokenizer with a Qwen3-style chat template, built
    offline. The vocabulary (320) is wider than the tokenizer (261), as with the real Qwen3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    return model, tokenizer


ARITH_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana"]
ARITH_THINGS = ["apples", "stamps", "marbles", "books", "coins", "shells"]


def arith_is_held_out(numbers):
    """One fifth of all number tuples (start, boxes, per_box, given), chosen by a hash, belongs to the
    held-out benchmark (eval.py arith); training problems and the supervised start never use them."""
    return zlib.crc32(",".join(map(str, numbers)).encode()) % 5 == 0


def arith_solution(name, thing, numbers, slips=(False, False)):
    """The worked solution, and its final answer. slips: (adds the boxes instead of multiplying,
    adds the given-away ones instead of subtracting); each slip is computed correctly."""
    start, boxes, per_box, given = numbers
    bought = boxes + per_box if slips[0] else boxes * per_box
    have = start + bought
    answer = have + given if slips[1] else have - given
    return (f"The boxes hold {boxes} {'+' if slips[0] else '*'} {per_box} = {bought} {thing}. "
            f"{name} then has {start} + {bought} = {have}. "
            f"After giving away {given}: {have} {'+' if slips[1] else '-'} {given} = {answer}. "
            f"The answer is \\boxed{{{answer}}}."), answer


def make_arith_problems(count, seed, held_out=False):
    """Small multi-step arithmetic word problems with correct worked solutions, offline and seeded,
    from the training side (or with held_out=True, the benchmark side) of arith_is_held_out."""
    rng = random.Random(seed)
    problems = []
    while len(problems) < count:
        name, thing = rng.choice(ARITH_NAMES), rng.choice(ARITH_THINGS)
        numbers = (rng.randint(1, 14), rng.randint(2, 4), rng.randint(2, 4), rng.randint(1, 9))  # small: a tiny model learns them
        if arith_is_held_out(numbers) != held_out:
            continue
        start, boxes, per_box, given = numbers
        problem = (f"{name} has {start} {thing}. {name} buys {boxes} boxes with {per_box} {thing} each, "
                   f"then gives away {given}. How many {thing} does {name} have now?")
        solution, answer = arith_solution(name, thing, numbers)
        problems.append({"problem": problem, "answer": str(answer), "solution": solution,
                         "name": name, "thing": thing, "numbers": numbers})
    return problems


#
# `--model tiny` is a 2-layer Qwen3 with a BPE tokenizer trained on the arith text (digits one per
# token), fine-tuned on worked solutions and cached on disk. The headroom left for RL is in
# correctness, not format: every solution is boxed, but a student-format solution makes each of two
# slips (adding where it should multiply or subtract) with probability SLIP_RATE, so the model learns
# to box nearly every answer and to slip on a fraction of them. Teacher-format examples show a correct
# solution and continue with it, so the teacher (the same weights, M1) has learned to use its context.

TINY_CACHE = os.environ.get("ANTISD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "antisd"))
TINY_ARITH_RECIPE = "tiny-arith-v2"  # the cache folder's name: change it whenever the recipe changes
SLIP_RATE = 0.3                      # chance of each slip in a student-format solution


# the supervised recipe, chosen by measurement (README: "Learn on a laptop" has the table)
TINY_SFT_STEPS, TINY_SFT_BATCH, TINY_SFT_LR, TINY_SFT_TEACHER_SHARE = 1200, 16, 6e-3, 0.2


def arith_tokenizer(problems):
    """Byte-level BPE trained on arith text; digits stay one per token, so numbers are spelled out."""
    corpus = [build_teacher_prompt(p["problem"], 0, [1.0], [""], p["solution"], p["answer"], None)
              + "user assistant" for p in problems]
    # pieces: one digit (with its leading space), a word, a run of symbols, a run of whitespace
    return tiny_bpe_tokenizer(r" ?[0-9]| ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|\s+", corpus)


def tiny_bpe_tokenizer(pieces, corpus):
    """A byte-level BPE tokenizer (vocabulary 512) trained on corpus, never merging across the pieces
    the regex cuts, with the tiny models' special tokens and chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pieces), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def supervised_examples(tokenizer, problems, rng, as_teacher):
    """(prompt ids, response ids) for each problem: as the student, a worked solution with slips; or
    as the teacher, seeing the correct solution and feedback about a sloppy attempt, answering
    correctly. Prompts are rendered exactly as in RL (render_prompt), tokenized in one batch."""
    messages, responses = [], []
    for p in problems:
        slips = (rng.random() < SLIP_RATE, rng.random() < SLIP_RATE)
        sloppy, answer = arith_solution(p["name"], p["thing"], p["numbers"], slips)
        if as_teacher:
            feedback_reward = float(answer == int(p["answer"]))
            messages.append(build_teacher_prompt(p["problem"], 0, [feedback_reward], [sloppy], p["solution"],
                                                 p["answer"], rng))
            responses.append(p["solution"])
        else:
            messages.append(student_message(p["problem"]))
            responses.append(sloppy)
    prompts = tokenizer.apply_chat_template([[{"role": "user", "content": m}] for m in messages],
                                            add_generation_prompt=True, tokenize=False, enable_thinking=False)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    return [(prompt, response + [tokenizer.eos_token_id]) for prompt, response in zip(prompt_ids, response_ids)]


def train_tiny_arith(out_dir, steps=TINY_SFT_STEPS, batch_size=TINY_SFT_BATCH, lr=TINY_SFT_LR, hidden_size=64, seed=0,
                     log_every=100):
    """The supervised start of --model tiny: worked arith solutions (supervised_examples), every
    response token trained (supervised_start)."""
    started = time.time()
    rng = random.Random(seed)
    problems = make_arith_problems(steps * batch_size, seed=10_000 + seed)  # training side only, each used once
    tokenizer = arith_tokenizer(problems[:4000])  # the words repeat: a few thousand problems hold them all
    in_teacher_format = round(steps * TINY_SFT_TEACHER_SHARE) * batch_size
    # each batch holds one format, so short student prompts are not padded to the teacher's length
    batches = [examples[i:i + batch_size]
               for examples in (supervised_examples(tokenizer, problems[:in_teacher_format], rng, as_teacher=True),
                                supervised_examples(tokenizer, problems[in_teacher_format:], rng, as_teacher=False))
               for i in range(0, len(examples), batch_size)]
    rng.shuffle(batches)
    batches = [[(prompt, response, ()) for prompt, response in batch] for batch in batches]  # all trained
    return supervised_start(out_dir, tokenizer, batches, steps, lr, hidden_size, seed, log_every, started)


def supervised_start(out_dir, tokenizer, batches, steps, lr, hidden_size, seed, log_every, started):
    """Trains a 2-layer Qwen3 on batches of (prompt ids, response ids, untrained response positions):
    next-token cross-entropy on the trained response tokens, AdamW with a linear warm-up and a cosine
    decay. Saves a Hugging Face checkpoint that load_model reads like any other, renamed into place
    when complete."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(vocab_size=64 * math.ceil(len(tokenizer) / 64), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=hidden_size // 4, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    for step in range(steps):
        batch = batches[step]  # (prompt ids, response ids, untrained response positions) each
        hidden, targets = response_hidden(model, [p for p, _, _ in batch], [r for _, r, _ in batch], tokenizer.pad_token_id)
        for row, (_, _, untrained) in enumerate(batch):
            targets[row, list(untrained)] = IGNORE_INDEX  # e.g. a student's tries shown in a teacher example
        logits = model.get_output_embeddings()(hidden)  # [B, R+1, V]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and (step + 1) % log_every == 0:
            print(f"supervised start: step {step + 1}/{steps}, loss {loss.item():.3f}, {time.time() - started:.0f} s", flush=True)
    temporary = f"{out_dir}.tmp{os.getpid()}"  # renamed when complete: a killed run leaves no half model
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    if os.path.isdir(out_dir):  # another process finished first: keep theirs
        shutil.rmtree(temporary)
    else:
        os.replace(temporary, out_dir)
    return out_dir


def tiny_arith_path():
    """The cached tiny arith model, trained on first use (about 2.5 minutes on one CPU thread)."""
    return cached_tiny_model("tiny", "arith", os.path.join(TINY_CACHE, TINY_ARITH_RECIPE), train_tiny_arith)


def cached_tiny_model(model_name, benchmark, path, train):
    """path, after train(path) has built it if it is not cached. Under torchrun rank 0 trains it while
    the others wait at a barrier (World has started the process group); every rank passes the
    barrier, cached or not: a rank that skipped it would hang the others."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        if not os.path.isdir(path):
            print(f"--model {model_name}: no cached model in {path}; training it (supervised start, set ANTISD_CACHE to move it)")
            train(path)
        return path
    import torch.distributed as dist
    build_once = f"python eval.py --model {model_name} --benchmarks {benchmark}"
    if not dist.is_initialized():
        if os.path.isdir(path):
            return path
        raise antisd.UserError(f"--model {model_name}: no cached model in {path}; build it once in one process first ({build_once})")
    if dist.get_rank() == 0 and not os.path.isdir(path):
        print(f"--model {model_name}: no cached model in {path}; rank 0 trains it while the other processes wait "
              f"(supervised start, set ANTISD_CACHE to move it)", flush=True)
        train(path)
    dist.barrier()
    if not os.path.isdir(path):  # another machine: rank 0 wrote it to its own disk
        raise antisd.UserError(f"--model {model_name}: rank 0 trained the tiny model into {path}, which this process "
                        f"(rank {dist.get_rank()}) cannot see; put ANTISD_CACHE on a folder every machine shares, "
                        f"or build it once on each machine ({build_once})")
    return path




# -----------------------------------------------------------------------------
# The tiny search model: a task where deliberation pays, for the CPU demo of the paper's effect
#
# `--model tiny-search` (`--dataset search`, benchmark `search` in eval.py). A problem hides a number
# from 1 to 9 in each of twelve boxes and asks which box's number plus a given addend makes ten:
#     Boxes: A=3 B=8 C=6 D=1 E=8 F=2 G=6 H=3 I=5 J=9 K=1 L=7. Which box plus 4 makes 10?
# Exactly one box holds 10 - 4 (the others may repeat each other). The solver cannot see the answer
# at a glance (it is two steps away: 10 - 4, then find it), but it can check a box in one line: look
# its number up, add, and the sum says yes or no by itself:
#     try A: 3+4=7 no. try B: 8+4=12 no. try C: 6+4=10 yes. The answer is \boxed{C}.
# Each "try" is a deliberation step (check a candidate, retry when it fails); a response may stop
# trying at any point and guess one of the boxes not yet tried ("The answer is \boxed{E}."), which
# is shorter and right only by luck. So every response holds up to twelve decisions (try again, or
# guess?) and one reward for the whole response, and a single extra try is worth little: only a
# search carried on to the right box pays.
# The supervised start: student-format examples try the next box with probability SEARCH_TRY_RATE
# at each decision and guess otherwise, so the starting model deliberates rarely, is right about one
# time in ten (about half the groups of 8 are all wrong: GRPO has no signal there) and RL has headroom.
# Practice examples (SEARCH_PRACTICE_SHARE of the student format) are whole searches whose decisions
# ("try") are not trained: they teach every check to be right without teaching to check more often.
# Teacher-format examples (M7 prompt, a correct solution shown) continue a student prefix of failed
# tries with the answer at once: the teacher was *taught* that someone who has seen a correct
# solution stops checking; the context only tells it which box to name.

SEARCH_BOXES, SEARCH_TARGET = "ABCDEFGHIJKL", 10
TINY_SEARCH_RECIPE = "tiny-search-v3"  # the cache folder's name: change it whenever the recipe changes
SEARCH_TRY_RATE = 0.2                  # chance of trying the next box at each decision, student format
SEARCH_PRACTICE_SHARE = 0.5            # of the student-format examples: whole searches, decisions untrained
TINY_SEARCH_SFT_STEPS, TINY_SEARCH_SFT_BATCH, TINY_SEARCH_SFT_LR = 2300, 16, 2e-3
TINY_SEARCH_TEACHER_SHARE, TINY_SEARCH_HIDDEN = 0.2, 128
# the RL defaults of --model tiny-search (get_args): minutes on one CPU core, README has the runs
TINY_SEARCH_RL_DEFAULTS = dict(dataset="search", prompts_per_step=32, max_new_tokens=144, gen_batch_size=128,
                               micro_batch_size=64, steps=20, lr=3e-4, save_every=1000, eval_benchmarks="search",
                               eval_limit=200, eval_every=5)
SEARCH_TRY = re.compile(r"try ([A-Z]): (\d+)\+(\d+)=(\d+) (yes|no)\.")


def search_is_held_out(values, addend, answer_box):
    """One problem in five (a hash of the box numbers, the addend and the answer) is on the benchmark
    side (eval.py search); training problems and the supervised start never use them."""
    return zlib.crc32(f"{','.join(map(str, values))};{addend};{answer_box}".encode()) % 5 == 0


def search_problem_text(values, addend, target):
    boxes = " ".join(f"{box}={value}" for box, value in zip(SEARCH_BOXES, values))
    return f"Boxes: {boxes}. Which box plus {addend} makes {target}?"


def search_try(box, value, addend, target):
    """One check: the candidate's number, the sum, the verdict. With a variable target restated
    ("=12 vs 9 no") the tiny model got about a quarter of its checks wrong, nearly all in the verdict;
    with a fixed one it need not compare."""
    return f"try {box}: {value}+{addend}={value + addend} {'yes' if value + addend == target else 'no'}."


def search_solution(values, addend, target, tries, guess=None):
    """A response that checks the first `tries` boxes in order and stops at the right one; if the
    right one is not among them it names `guess` (a box not tried). Returns (text, boxed box)."""
    lines = []
    for box, value in zip(SEARCH_BOXES[:tries], values):
        lines.append(search_try(box, value, addend, target))
        if value + addend == target:
            return " ".join(lines + [f"The answer is \\boxed{{{box}}}."]), box
    return " ".join(lines + [f"The answer is \\boxed{{{guess}}}."]), guess


def make_search_problems(count, seed, held_out=False):
    """Search problems with their full-search solutions, offline and seeded, from the training side
    (or with held_out=True, the benchmark side) of search_is_held_out."""
    rng = random.Random(seed)
    problems = []
    while len(problems) < count:
        addend, answer = rng.randint(1, 9), rng.randrange(len(SEARCH_BOXES))
        others = rng.choices([v for v in range(1, 10) if v != SEARCH_TARGET - addend], k=len(SEARCH_BOXES) - 1)
        values = others[:answer] + [SEARCH_TARGET - addend] + others[answer:]  # exactly one box is right
        target = SEARCH_TARGET
        if search_is_held_out(values, addend, SEARCH_BOXES[answer]) != held_out:
            continue
        solution, box = search_solution(values, addend, target, len(SEARCH_BOXES))
        problems.append({"problem": search_problem_text(values, addend, target), "answer": box,
                         "solution": solution, "values": values, "addend": addend, "target": target})
    return problems


def search_student_solution(problem, rng, try_rate=SEARCH_TRY_RATE):
    """A student-format response: at each decision, try the next box with probability try_rate, or
    guess a box not yet tried. Returns (text, boxed box, number of tries)."""
    tries = 0
    while tries < len(SEARCH_BOXES) and rng.random() < try_rate:
        tries += 1
        if problem["values"][tries - 1] + problem["addend"] == problem["target"]:
            break
    guess = rng.choice(SEARCH_BOXES[tries:]) if tries < len(SEARCH_BOXES) else None
    text, box = search_solution(problem["values"], problem["addend"], problem["target"], tries, guess)
    return text, box, tries


def search_deliberates(text):
    """A response deliberates when it checks at least one box."""
    return SEARCH_TRY.search(text) is not None


def search_deliberation_rate(texts):
    """The share of responses that deliberate: the metric RL should raise and SD lowers."""
    return sum(map(search_deliberates, texts)) / max(1, len(texts))


def search_check_error_rate(texts, problem_texts):
    """The share of the responses' check lines that are wrong (search_check_errors); None without a
    check. The reward sees only the final box: a wrong sum whose verdict follows the truth costs nothing."""
    counts = [search_check_errors(text, search_fields(problem)) for text, problem in zip(texts, problem_texts)]
    checks = sum(checks for checks, _ in counts)
    return sum(wrong for _, wrong in counts) / checks if checks else None


def search_token_classes(token_texts):
    """The class of each response token, from the decoded pieces: "try" (the token that starts a
    check: the decision to deliberate), "check" (the rest of a check), "guess" (an answer that no
    check confirmed: the shortcut), "answer" (the answer after a check said yes), "other"."""
    text = "".join(token_texts)
    spans = [(m.start(), m.end(), "check") for m in SEARCH_TRY.finditer(text)]
    confirmed = text.rstrip().find("The answer is")
    if confirmed >= 0:
        after_yes = bool(spans) and text[:confirmed].rstrip().endswith("yes.")
        spans.append((confirmed, len(text), "answer" if after_yes else "guess"))
    classes, position = [], 0
    for piece in token_texts:
        middle = position + len(piece) - len(piece.lstrip())  # a token's leading space is not its content
        label = next((kind for start, end, kind in spans if start <= middle < end), "other")
        if label == "check" and any(start == middle for start, _, kind in spans if kind == "check"):
            label = "try"
        classes.append(label)
        position += len(piece)
    return classes


SEARCH_PROBLEM = re.compile(r"Boxes: ((?:[A-Z]=\d+ ?)+)\. Which box plus (\d+) makes (\d+)\?")


def search_fields(problem_text):
    """{values, addend, target} read back from a problem's text: the data pipeline keeps only a
    problem's text, answer and solution (problem_from_row)."""
    boxes, addend, target = SEARCH_PROBLEM.fullmatch(problem_text).groups()
    return {"values": [int(box.split("=")[1]) for box in boxes.split()], "addend": int(addend), "target": int(target)}


def search_check_errors(text, problem):
    """(checks, wrong checks): a check is wrong when the box's number, the addend, the sum or the
    verdict is. problem: {values, addend, target}, as make_search_problems or search_fields give."""
    checks = SEARCH_TRY.findall(text)
    right = {box: (str(value), str(problem["addend"])) for box, value in zip(SEARCH_BOXES, problem["values"])}
    wrong = sum(right.get(box) != (value, addend) or int(value) + int(addend) != int(total)
                or (int(total) == problem["target"]) != (verdict == "yes")
                for box, value, addend, total, verdict in checks)
    return len(checks), wrong


@torch.no_grad()
def search_pmi_by_class(model, tokenizer, problems, group_size=8, seed=0, temperature=1.0, max_new_tokens=96):
    """The paper's Figure 2 for this task: rollouts sampled as in training (G per problem, T = 1),
    teacher prompts as in training (M7), u = teacher - student log-prob per sampled token, grouped
    by search_token_classes. Returns ({class: (tokens, mean u, share u < 0)}, a rollout summary,
    the rollouts' texts)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    rollout_problems = [p for p in problems for _ in range(group_size)]                 # rollout i: problems[i // G]
    student_prompts = [student_prompt_ids(tokenizer, p["problem"], False) for p in rollout_problems]
    samples = generate(model, tokenizer, student_prompts, max_new_tokens, temperature, 1.0, 128)
    responses = [ids for ids, _ in samples]
    texts = [decode_response(tokenizer, ids) for ids in responses]
    rewards = [verify(text, p["answer"]) for text, p in zip(texts, rollout_problems)]
    settings = argparse.Namespace(group_size=group_size, enable_thinking=False)  # the defaults
    teacher_prompts = teacher_prompts_for_step(tokenizer, problems, rewards, texts, rng, settings)
    stats = score(model, student_prompts, teacher_prompts, responses, tokenizer.pad_token_id, 64, temperature)
    mask = response_mask(responses, model.device)                                      # [N, R]
    u = (stats["t_logp"] - stats["logp"]) * mask
    by_class = {}
    for row, ids in enumerate(responses):
        pieces = [tokenizer.decode([i]) for i in ids]
        for k, label in enumerate(search_token_classes(pieces)):
            by_class.setdefault(label, []).append(float(u[row, k]))
    table = {label: (len(v), sum(v) / len(v), sum(x < 0 for x in v) / len(v)) for label, v in sorted(by_class.items())}
    checks = [search_check_errors(t, p) for t, p in zip(texts, rollout_problems)]
    deliberating = [search_deliberates(t) for t in texts]
    summary = {"reward": sum(rewards) / len(rewards), "deliberation_rate": sum(deliberating) / len(texts),
               "reward_when_deliberating": sum(r for r, d in zip(rewards, deliberating) if d) / max(1, sum(deliberating)),
               "reward_when_not": sum(r for r, d in zip(rewards, deliberating) if not d) / max(1, len(texts) - sum(deliberating)),
               "checks": sum(c for c, _ in checks), "wrong_checks": sum(w for _, w in checks),
               "tries_mean": sum(c for c, _ in checks) / len(texts),
               "teacher_entropy_median": median(stats["t_entropy"][mask])}
    return table, summary, texts


def search_tokenizer(problems):
    """Byte-level BPE trained on search text; a number (0-18) or a word is one piece."""
    corpus = [build_teacher_prompt(p["problem"], 0, [1.0], [""], p["solution"], p["answer"], None)
              + p["solution"] + " The answer is \\boxed{" + SEARCH_BOXES + "} user assistant" for p in problems]
    return tiny_bpe_tokenizer(r" ?[0-9]+| ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|\s+", corpus)


def search_supervised_examples(tokenizer, problems, rng, kind):
    """(prompt ids, response ids, untrained response positions) per problem, of one kind:
    "student": a student-format response, all of it trained;
    "practice": a whole search (try until a check says yes), its "try" tokens untrained, so it teaches
      the checks without teaching how often to check;
    "teacher": the M7 prompt shows a correct solution (a full search, or a lucky guess) and feedback
      about a student attempt; the response repeats a prefix of that attempt's failed tries (untrained:
      the student wrote them) and then answers."""
    messages, prefixes, answers = [], [], []
    for p in problems:
        # a teacher example's student searched to any depth: the teacher answers at once after each
        try_rate = {"student": SEARCH_TRY_RATE, "practice": 1.0, "teacher": rng.random()}[kind]
        attempt, box, tries = search_student_solution(p, rng, try_rate)
        if kind != "teacher":
            messages.append(student_message(p["problem"]))
            prefixes.append("")
            answers.append(attempt)
            continue
        shown = p["solution"] if rng.random() < 0.5 else f"The answer is \\boxed{{{p['answer']}}}."
        found = tries > 0 and p["values"][tries - 1] + p["addend"] == p["target"]
        failed = tries - found
        kept = rng.randint(0, failed)
        prefix = " ".join(search_try(b, v, p["addend"], p["target"]) for b, v in zip(SEARCH_BOXES[:kept], p["values"]))
        messages.append(build_teacher_prompt(p["problem"], 0, [float(box == p["answer"]), 1.0], [attempt, shown],
                                             None, p["answer"], rng))
        prefixes.append(prefix + " " if prefix else "")
        answers.append(f"The answer is \\boxed{{{p['answer']}}}.")
    prompts = tokenizer.apply_chat_template([[{"role": "user", "content": m}] for m in messages],
                                            add_generation_prompt=True, tokenize=False, enable_thinking=False)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    prefix_ids = [tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else [] for prefix in prefixes]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    examples = []
    for prompt, prefix, answer in zip(prompt_ids, prefix_ids, answer_ids):
        untrained = range(len(prefix))
        if kind == "practice":
            classes = search_token_classes([tokenizer.decode([i]) for i in answer])
            untrained = [k for k, label in enumerate(classes) if label == "try"]
        examples.append((prompt, prefix + answer + [tokenizer.eos_token_id], untrained))
    return examples


def train_tiny_search(out_dir, steps=TINY_SEARCH_SFT_STEPS, batch_size=TINY_SEARCH_SFT_BATCH, lr=TINY_SEARCH_SFT_LR,
                      hidden_size=TINY_SEARCH_HIDDEN, seed=0, log_every=250):
    """The supervised start of --model tiny-search (supervised_start): a teacher example's repeated
    student tries are not trained (search_supervised_examples)."""
    started = time.time()
    rng = random.Random(seed)
    problems = make_search_problems(steps * batch_size, seed=10_000 + seed)  # training side only
    tokenizer = search_tokenizer(problems[:2000])
    in_teacher_format = round(steps * TINY_SEARCH_TEACHER_SHARE) * batch_size
    in_practice = in_teacher_format + round((steps * batch_size - in_teacher_format) * SEARCH_PRACTICE_SHARE / batch_size) * batch_size
    batches = [examples[i:i + batch_size]
               for examples in (search_supervised_examples(tokenizer, problems[:in_teacher_format], rng, "teacher"),
                                search_supervised_examples(tokenizer, problems[in_teacher_format:in_practice], rng, "practice"),
                                search_supervised_examples(tokenizer, problems[in_practice:], rng, "student"))
               for i in range(0, len(examples), batch_size)]
    rng.shuffle(batches)
    return supervised_start(out_dir, tokenizer, batches, steps, lr, hidden_size, seed, log_every, started)


def tiny_search_path():
    """The cached tiny search model, trained on first use."""
    return cached_tiny_model("tiny-search", "search", os.path.join(TINY_CACHE, TINY_SEARCH_RECIPE), train_tiny_search)




# -----------------------------------------------------------------------------
# One step by hand: python tiny_tasks.py
#
# A real training run of the tiny search model, small enough to read: 4 problems x 8 rollouts a step.
# The gate holds lambda at 0 for its W = 5 warm-up steps (M6), so the worked step is step W + 1, the
# first with the AntiSD term on; the warm-up steps before it are real steps too, printed in one line
# each. Everything printed is what antisd.one_step computed and the update used.

def worked_step(model_name="tiny-search", seed=0, prompts_per_step=4, show=print):
    """Runs steps 1..W+1 of a tiny-search run and shows step W+1 in the order of Algorithm 1. Returns
    (what one_step returned, the batch, the rollout shown in detail)."""
    args = antisd.get_args(["--model", model_name, "--dataset", "search", "--prompts-per-step", str(prompts_per_step),
                            "--micro-batch-size", str(prompts_per_step * 8), "--seed", str(seed), "--device", "cpu"])
    device = torch.device("cpu")
    model, tokenizer = antisd.load_model(model_name, device)
    model.train()
    problems, _ = antisd.load_problems("search", seed)
    stream, world, timer = antisd.ProblemStream(len(problems), seed), antisd.World(device), antisd.PhaseTimer(device)
    optimizer, gate, rng = antisd.MasterAdamW(model, args.lr, world), antisd.make_gate(args), random.Random(seed)
    torch.manual_seed(seed)
    G = args.group_size
    show(f"{model_name}, seed {seed}: {prompts_per_step} problems x {G} rollouts per step, lr {args.lr:g}, "
         f"lambda_max {args.lambda_max}, warm-up W = {args.gate_warmup} steps")
    for step in range(1, args.gate_warmup + 2):
        batch = [problems[i] for i in stream.next(args.prompts_per_step)]
        done = antisd.one_step(model, tokenizer, batch, optimizer, gate, rng, world, timer, args)
        if step <= args.gate_warmup:
            show(f"step {step} (warm-up, lambda 0): reward {sum(done.rewards) / len(done.rewards):.3f}, "
                 f"H = median teacher entropy {done.terms['teacher_entropy_median']:.4f}")
    # the rollout shown: the first one that checks a box, in a group whose rewards differ (A_seq != 0)
    mixed = [i for i in range(len(done.texts)) if len(set(done.rewards[i - i % G:i - i % G + G])) > 1]
    row = next((i for i in mixed if search_deliberates(done.texts[i])), mixed[0] if mixed else 0)
    first = row - row % G
    item = batch[row // G]
    show(f"\n===== step {step}, problem {row // G + 1} of {len(batch)}: {item['problem']}   (gold {item['answer']})")
    show("\n1. rollouts sampled from the student (T = 1), 2. rewards, 3. group advantages A_seq (M2):")
    for i in range(first, first + G):
        text = " ".join(done.texts[i].split())
        text = text if len(text) <= 110 else text[:107] + "..."
        show(f"   {'>' if i == row else ' '} rollout {i - first + 1}: reward {done.rewards[i]:.0f}  "
             f"A_seq {float(done.seq_adv[i]):+.3f}  {text}")
    prompt_text = tokenizer.decode(done.teacher_prompts[row])
    show(f"\n4. the teacher's prompt for rollout {row - first + 1} (M7): the student's, plus a correct sibling "
         f"and feedback on this rollout:\n   " + prompt_text.replace("\n", "\n   ").rstrip())
    stats, terms = done.stats, done.terms
    lam, length = terms["lam"], int(done.mask[row].sum())
    warm = ", ".join(f"{h:.4f}" for h in gate.history)
    show(f"\n5. the gate (M6): warm-up H = [{warm}], H_warm = median = {gate.h_warm:.4f}, "
         f"tau_down = {args.tau_ratio} * H_warm = {gate.tau_down:.4f}; this step H = "
         f"{terms['teacher_entropy_median']:.4f}: gate {'on' if terms['gate_on'] else 'off'}, lambda = {lam:g}")
    show(f"\n6. per token of rollout {row - first + 1}: s = student log-prob, t = teacher log-prob, u = t - s (M1), "
         f"-phi(u) (M4), A = A_seq + lambda * -phi(u) (M5)")
    show(f"   {'token':<12} {'class':<7} {'s':>8} {'t':>8} {'u':>8} {'-phi(u)':>8} {'A':>8}")
    pieces = [tokenizer.decode([token]) for token in done.responses[row]]
    for k, (piece, label) in enumerate(zip(pieces, search_token_classes(pieces))):
        show(f"   {piece!r:<12} {label:<7} {float(stats['logp'][row, k]):8.3f} {float(stats['t_logp'][row, k]):8.3f} "
             f"{float(terms['u'][row, k]):8.3f} {float(terms['a'][row, k]):8.3f} {float(terms['advantages'][row, k]):8.3f}")
    show(f"   ({length} tokens; the 'try' rows are the decision to check a box)")
    update = done.update
    show(f"\n7. the update (M2): loss {update['losses'][0]:.5f}, gradient norm {update['grad_norms'][0]:.4f} "
         f"(clipped to {antisd.GRAD_CLIP}), {update['epochs_applied']} AdamW step applied")
    return done, batch, row


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="One step of the tiny search model by hand")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="tiny-search", help="tiny-search, or tiny-random (untrained: shapes only)")
    options = parser.parse_args()
    sys.modules.setdefault("tiny_tasks", sys.modules[__name__])
    antisd.run_as_script(worked_step, options.model, options.seed)
