"""Tests for antisd.py, antisd_kernels.py and eval.py: CPU, offline, tiny models, exact expectations.

Each test is named after the failure it prevents and compares against something independent: a
float64 brute force, a one-sequence-at-a-time forward, an enumeration. Tests that use the real
Qwen3 tokenizer or benchmark files read ../shared/hub and skip when it is absent.

The sections follow a training step, then the kernels, the evaluation and the infrastructure:
  Step 1. sampling: antisd.generate, student prompts
  Step 2. reward: antisd.verify, clean_gold (then hedged boxes, graded cases, bounded time)
  Step 3. group advantages
  Step 4. scoring: teacher prompts, then antisd.score's alignment under padding
  Step 5. the entropy gate
  Step 6. per-token advantages
  Step 7. the update: policy_loss, policy_gradient, MasterAdamW
  The whole loop: end to end, per-method runs, logged numbers
  antisd_kernels.py: float64 definition, torch reference, fused kernels, layout, chunked lm_head
  eval.py: metrics, loading, sampling and the command line
  Infrastructure: data, model, checker worker, logging, checkpoints, tiny models, FSDP2, CLI
  The reference step: real steps of the loop, one process and two, against reference_step.py
"""

import importlib.metadata
import os


def version_of(package):
    """(major, minor) of an installed package, or None."""
    try:
        return tuple(int(part) for part in importlib.metadata.version(package).split(".")[:2])
    except importlib.metadata.PackageNotFoundError:
        return None


# Triton 3.6's interpreter turns a loop bound into an int with int() of a one-element array, which
# numpy 2.4 refuses (Triton 3.7 squeezes the array first). Only the interpreter runs that code, never
# the compiled kernels; with that pair installed the Triton tests skip, and say why.
INTERPRETER_BROKEN = (version_of("triton") or (99, 0)) < (3, 7) and (version_of("numpy") or (0, 0)) >= (2, 4)
NO_INTERPRETER = ("Triton's CPU interpreter: needs TRITON_INTERPRET=1 before antisd_kernels.py is imported"
                  + (", and does not run with triton < 3.7 and numpy >= 2.4" if INTERPRETER_BROKEN else ""))
import torch

# On a CUDA machine the Triton tests run the compiled kernels on the GPU; elsewhere the interpreter runs
# them on the CPU (TRITON_INTERPRET=1 must be set before antisd_kernels.py is imported)
if not INTERPRETER_BROKEN and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import collections
import errno
import functools
import importlib
import inspect
import io
import itertools
import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import weakref
from fractions import Fraction
from pathlib import Path

import datasets
import pytest
from hypothesis import example, given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import antisd
import tiny_tasks
import antisd_kernels
import reference_step

# Property tests (hypothesis): the same examples on every run, as every other test here, and no example
# database written next to the code
settings.register_profile("antisd", derandomize=True, database=None, deadline=None)
settings.load_profile("antisd")

evaluation = importlib.import_module("eval")  # `import eval` would shadow the builtin eval

if antisd_kernels.INTERPRETED:
    # Triton imports triton.experimental.gluon at its first kernel launch (to specialise the arguments),
    # and that import asserts that the interpreter is on, reading TRITON_INTERPRET at that moment. It is
    # switched off below, so the first launch would fail in any test run before the `token_stats_path`
    # fixture has switched it on again: import it now, while it is still on, whichever test runs first.
    try:
        importlib.import_module("triton.experimental.gluon")
    except ImportError:   # a Triton without Gluon: nothing to import
        pass

# The interpreter is slow per program: by default CPU tensors take the torch reference, the kernel
# tests call antisd_kernels.token_stats_triton directly, and the `token_stats_path` fixture sends a few
# model-level tests (scoring alignment, micro-batching, the full estimator) through the kernel too.
os.environ["TRITON_INTERPRET"] = "0"

HERE = Path(__file__).resolve().parent
HUB = HERE.parent / "shared" / "hub"
QWEN3_TOKENIZER = HUB / "Qwen3-tokenizer"
BENCH_DIR = HUB / "bench"   # real copies of the benchmarks, when present
EVAL_BENCHMARKS = ["math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench", "gsm8k"]


@pytest.fixture(params=["torch", "triton"])
def token_stats_path(request, monkeypatch):
    """Runs a test once through the torch reference and once through the Triton kernel."""
    if request.param == "triton":
        if not antisd_kernels.INTERPRETED:
            pytest.skip(NO_INTERPRETER)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = antisd.load_model("tiny-random", torch.device("cpu"))
    return model.eval(), tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# -----------------------------------------------------------------------------
# Step 1. sampling (antisd.generate, student prompts)

def test_a_finished_response_ends_with_its_stop_token(tiny):
    model, tokenizer = tiny
    stop_ids = set(antisd.stop_token_ids(model, tokenizer))
    torch.manual_seed(0)
    samples = antisd.generate(model, tokenizer, [antisd.student_prompt_ids(tokenizer, "1+1?", False)] * 64,
                              max_new_tokens=24, temperature=1.0, top_p=1.0, batch_size=64)
    assert any(not cut for _, cut in samples) and any(cut for _, cut in samples)
    for ids, cut in samples:
        assert not stop_ids & set(ids[:-1])
        if cut:
            assert len(ids) == 24 and ids[-1] not in stop_ids
        else:
            assert ids[-1] in stop_ids


@torch.no_grad()
def test_generation_ignores_the_left_padding_of_shorter_prompts_in_a_batch():
    """Greedy (top_p -> 0 keeps only the most likely token) over one batch of prompts of three widths:
    each row must be the greedy continuation of its prompt alone, checked under teacher forcing by one
    unpadded forward (every response token is the most likely one after its own prefix), and equal to
    generating that prompt alone. A row that attended to its left padding, or whose positions counted
    the padding, would continue differently."""
    model, tokenizer = tiny_tasks.build_tiny(seed=3)
    for p in model.parameters():  # sharper than the default init, so that greedy rollouts differ by prompt
        if p.dim() == 2:
            p.normal_(0, 0.3)
    model.eval()
    problems = ["1+1?", "What is 17 * 23, plus 5?", "A much longer problem: " + "x " * 20, "2*3?"]
    prompts = [antisd.student_prompt_ids(tokenizer, p, False) for p in problems]
    assert len({len(p) for p in prompts}) == 3
    stop_ids = set(antisd.stop_token_ids(model, tokenizer))
    samples = antisd.generate(model, tokenizer, prompts, 8, 1.0, 1e-6, len(prompts))
    assert len({tuple(ids) for ids, _ in samples}) > 1
    for prompt, (response, cut) in zip(prompts, samples):
        top = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double().topk(2)
        assert top.indices[:, 0].tolist() == response
        assert (top.values[:, 0] - top.values[:, 1]).min() > 1e-3   # no near-tie that float noise could flip
        assert (len(response) == 8 and response[-1] not in stop_ids) if cut else response[-1] in stop_ids
    assert [antisd.generate(model, tokenizer, [p], 8, 1.0, 1e-6, 1)[0] for p in prompts] == samples


@pytest.fixture
def counted_compilation(monkeypatch):
    """Compiles with a backend that only counts graphs (inductor on a CPU takes minutes) and returns
    the list it appends to: one entry per compiled graph."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    monkeypatch.setattr(antisd, "COMPILE_OPTIONS", {"backend": counting_backend, "mode": None,
                                                    "fullgraph": False, "dynamic": False})
    yield graphs
    torch._dynamo.reset()


def test_compiled_rollouts_equal_eager_ones_greedy_and_sampled_across_weight_updates_compiling_once(
        counted_compilation):
    """The compiled static-cache path must give exactly the tokens of transformers' eager
    dynamic-cache path: greedy (top_p -> 0 keeps only the most likely token), also after an in-place
    weight update (an optimizer step), with a padded last batch and new prompt widths; and sampled
    (temperature, top-p: the same logits processors and random draws under one seed). The decode
    step is compiled once for all of it."""
    model, tokenizer = tiny_tasks.build_tiny(seed=3)
    with torch.no_grad():  # sharper than the default init, so that greedy rollouts differ by prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.eval()
    prompts = [antisd.student_prompt_ids(tokenizer, f"What is {7 * i} + {i * i}?" + " x" * i, False)
               for i in range(5)]
    other_widths = [antisd.student_prompt_ids(tokenizer, q, False) for q in ["1+1", "a much longer problem " * 6]]

    def both(prompts, temperature=1.0, top_p=1e-6, seed=0):
        runs = []
        for compiled in (False, True):
            torch.manual_seed(seed)
            runs.append(antisd.generate(model, tokenizer, prompts, 8, temperature, top_p, 2, compiled=compiled))
        return runs

    eager, compiled = both(prompts)            # 5 prompts, batches of 2: the last one is padded
    assert compiled == eager
    assert len({tuple(ids) for ids, _ in eager}) > 1
    with torch.no_grad():                      # an optimizer step: the same tensors, new values
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    eager_after, compiled_after = both(prompts)
    assert eager_after != eager                # the update changed the rollouts...
    assert compiled_after == eager_after       # ...and the compiled path saw it
    eager_other, compiled_other = both(other_widths)   # other prompt widths, fewer prompts
    assert compiled_other == eager_other
    eager_sampled, compiled_sampled = both(prompts[:4], temperature=0.9, top_p=0.95, seed=11)
    assert compiled_sampled == eager_sampled
    assert eager_sampled != eager_after[:4]    # really sampled
    assert len(counted_compilation) == 1, "the decode step was compiled again"


def sharp_tiny_model():
    """tiny-random with weights of std 0.3 instead of 0.02: its next-token distributions depend on the
    context, so greedy rollouts differ by prompt and a temperature changes every log-prob."""
    model, tokenizer = antisd.load_model("tiny-random", torch.device("cpu"))   # seeded; one thread, as in a run
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model, tokenizer


def one_loop_step(model, tokenizer, *flags):
    """antisd.one_step, as the loop runs it, on two arith problems x 4 rollouts with these flags (no gate:
    the -phi(u) term is on). The update's gradient is recorded, not applied (RecordingOptimizer, Step 7).
    Returns (what one_step returned, {parameter name: gradient})."""
    args = step_args("--dataset", "arith", "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6",
                     "--micro-batch-size", "8", "--gate", "none", *flags)
    device, optimizer = torch.device("cpu"), RecordingOptimizer(model)
    torch.manual_seed(0)
    done = antisd.one_step(model, tokenizer, tiny_tasks.make_arith_problems(2, seed=0), optimizer, antisd.make_gate(args),
                           random.Random(0), antisd.World(device), antisd.PhaseTimer(device), args)
    return done, optimizer.grads[0]


def test_training_rollouts_are_sampled_with_the_top_p_flag():
    """--top-p near 0 keeps only the likeliest token: every rollout the loop samples is then the greedy
    continuation of its prompt, checked by one unpadded forward. At --top-p 1 the same step's rollouts
    of one problem differ, so the check could fail."""
    model, tokenizer = sharp_tiny_model()
    greedy, _ = one_loop_step(model, tokenizer, "--top-p", "1e-6")
    for prompt, response in zip(greedy.student_prompts, greedy.responses):
        with torch.no_grad():
            top = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double().topk(2)
        assert top.indices[:, 0].tolist() == response
        assert (top.values[:, 0] - top.values[:, 1]).min() > 1e-3   # no near-tie that float noise could flip
    sampled, _ = one_loop_step(model, tokenizer, "--top-p", "1.0")
    assert all(len({tuple(r) for r in sampled.responses[g:g + 4]}) > 1 for g in (0, 4))


def test_sampling_keeps_the_whole_vocabulary_whatever_the_models_own_top_k(tiny):
    # rollouts must come from pi_theta itself: with Qwen3's generation_config top_k=20 leaking in, no
    # token outside the 20 likeliest could ever be sampled. At T = 50 the untrained model's next-token
    # distribution over its 320 entries is nearly flat, so 256 draws hit far more than 20 tokens
    model, tokenizer = tiny
    torch.manual_seed(0)
    prompt = antisd.student_prompt_ids(tokenizer, "1 + 1", False)
    own_top_k, model.generation_config.top_k = model.generation_config.top_k, 20  # 20: what Qwen3 ships
    try:
        first_tokens = {ids[0] for ids, _ in antisd.generate(model, tokenizer, [prompt] * 256, 1, 50.0, 1.0, 256)}
    finally:
        model.generation_config.top_k = own_top_k
    assert len(first_tokens) > 60


# -----------------------------------------------------------------------------
# Step 2. reward (antisd.verify, clean_gold)

def test_boxed_extraction_keeps_nested_braces():
    assert antisd.last_boxed(r"so \boxed{\frac{1}{2}} and later \boxed{\sqrt{\frac{a}{b}}}.") == r"\sqrt{\frac{a}{b}}"
    assert antisd.last_boxed(r"\boxed{3} then a cut-off \boxed{\frac{1}{") == "3"
    assert antisd.last_boxed("no box here") is None


@pytest.mark.parametrize("response, gold", [
    (r"The answer is \boxed{\frac{1}{2}}.", "0.5"),
    (r"\boxed{0.5}", r"\frac12"),
    (r"\boxed{\dfrac{3}{4}}", "3/4"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3,\frac{\pi}{2})"),
    (r"\boxed{25}", "025"),
    (r"\boxed{1000}", "1,000"),
    (r"\boxed{x(x+2)}", "x^2+2x"),
    (r"<think>maybe \boxed{7}</think> Final: \boxed{12}", "12"),
])
def test_equivalent_answers_earn_reward(response, gold):
    assert antisd.verify(response, antisd.clean_gold(gold)) == 1.0


@pytest.mark.parametrize("response, gold", [
    (r"\boxed{71}", "70"),
    (r"\boxed{\frac{1}{3}}", "0.5"),
    ("The answer is 70.", "70"),                                # no boxed answer
    (r"<think>so it is \boxed{70}", "70"),                       # thinking never finished
    (r"<think>\boxed{70}</think> so the answer is \boxed{71}", "70"),  # only the final answer counts
])
def test_wrong_or_missing_answers_earn_nothing(response, gold):
    assert antisd.verify(response, antisd.clean_gold(gold)) == 0.0


def test_a_box_inside_the_thinking_block_is_not_the_answer():
    for response in ["<think>maybe \\boxed{2}</think>\n\nI am not sure.", "maybe \\boxed{2}\n</think>\n\nNo idea."]:
        assert antisd.extract_boxed(response) is None
        assert antisd.verify(response, "2") == 0.0
    assert antisd.verify("<think>maybe \\boxed{3}</think> so \\boxed{2}", "2") == 1.0


def test_unparsable_gold_never_earns_reward():
    for gold in [None, "", "   ", [], "$$"]:
        assert antisd.clean_gold(gold) is None
        assert antisd.verify(r"\boxed{}", antisd.clean_gold(gold)) == 0.0
        assert antisd.verify(r"\boxed{0}", antisd.clean_gold(gold)) == 0.0
    assert antisd.verify(r"\boxed{5}", None) == 0.0


def test_gold_answers_of_every_type_are_normalised():
    assert antisd.clean_gold(27.0) == "27"
    assert antisd.clean_gold(70) == "70"
    assert antisd.clean_gold("Janet sells 9 eggs.\n#### 1,080") == "1080"
    assert antisd.clean_gold(["$\\frac{1}{2 n+2}$"]) == "\\frac{1}{2 n+2}"
    assert antisd.verify(r"\boxed{4.5\times 10^{33}}", antisd.clean_gold("4.5e33")) == 1.0
    assert antisd.verify(r"\boxed{4.5}", antisd.clean_gold("4.5e33")) == 0.0


def test_space_separated_thousands_are_one_number_only_in_groups_of_three():
    assert antisd.normalise_math("1 000") == "1000"
    assert antisd.normalise_math("1 000 000") == "1000000"
    assert antisd.normalise_math("12 000") == "12000"
    for kept in ["1 00", "1 0000", "1 2345", "3.1 000", "1 000.5"]:   # not a thousands group: left alone
        assert antisd.normalise_math(kept) == kept
    for response, gold in [("\\boxed{1 000}", "1000"), ("\\boxed{1 000 000}", "1000000"), ("\\boxed{12 000}", "12000"),
                           ("\\boxed{1000}", "1 000")]:
        assert antisd.verify(response, antisd.clean_gold(gold)) == 1.0, (response, gold)
    for response, gold in [("\\boxed{1 00}", "100"), ("\\boxed{1 0000}", "10000"), ("\\boxed{1 000}", "1"),
                           ("\\boxed{1 000}", "0")]:
        assert antisd.verify(response, antisd.clean_gold(gold)) == 0.0, (response, gold)


def test_gold_of_any_other_type_is_no_gold():
    for gold in [{"a": 1}, float("nan"), float("inf"), True, object(), ("1",)]:
        assert antisd.clean_gold(gold) is None, gold
    assert antisd.verify("\\boxed{nan}", antisd.clean_gold(float("nan"))) == 0.0
    assert antisd.clean_gold(10 ** 400) == "1" + "0" * 400     # a big int is still an exact gold


def test_gold_with_several_boxes_is_kept_whole():
    gold = antisd.clean_gold("Both: \\(\\boxed{1}\\) and \\(\\boxed{-2}\\).")
    assert antisd.verify("\\boxed{-2, 1}", gold) == 1.0
    assert antisd.verify("\\boxed{-2}", gold) == 0.0            # not only its last box
    assert antisd.clean_gold("\\boxed{1} no, it is \\boxed{2}") is None  # prose between boxes: no reading


def test_a_missing_gold_rewards_no_answer_not_even_one_that_spells_none():
    for response in [r"\boxed{None}", r"\boxed{none}", r"\boxed{0}"]:
        assert antisd.verify(response, None) == 0.0


@pytest.mark.parametrize("response, gold, reward", [
    ("\\boxed{1}", "1 - \\frac{1}{\\mathrm{e}}", 0.0),
    ("\\boxed{1-\\frac{1}{e}}", "1 - \\frac{1}{\\mathrm{e}}", 1.0),
    ("\\boxed{3}", "3\\mathrm{e}", 0.0),
    ("\\boxed{3e}", "3\\mathrm{e}", 1.0),
    ("\\boxed{1000}", "1{,}000", 1.0),
    ("\\boxed{27}", 27.0, 1.0),
])
def test_verify_on_a_raw_gold_agrees_with_verify_on_its_cleaned_gold(response, gold, reward):
    assert antisd.verify(response, gold) == reward
    assert antisd.verify(response, antisd.clean_gold(gold)) == reward


# pieces of golds as benchmarks write them: numbers, LaTeX, GSM8K's '####', boxes, units, stray '$', a
# final '.' (spacing commands, '\$' and \mathrm{e} are left out: see the test after this one)
GOLD_PIECES = ["1", "25", "-3", "0.5", "4.5", "000", "e", "E", "+", "-", " ", ",", "$", "\\frac{1}{2}", "\\sqrt{2}", "x",
               "\\pi", "\\boxed{", "}", "{", "####", "\\,", "%", "\\text{ cm}", "(", ")", " and ", "\\infty", "^{2}", "\n"]


@settings(max_examples=80)
@given(st.one_of(st.integers(-10**20, 10**20), st.floats(), st.tuples(
    st.lists(st.sampled_from(GOLD_PIECES), max_size=6), st.sampled_from(["", ".", "$.", " ."])).map(lambda t: "".join(t[0]) + t[1])))
def test_a_cleaned_gold_cleans_to_itself(gold):
    # verify cleans a gold again (clean_gold_once) after load_problems or eval.py cleaned it: the second
    # pass must leave it as the first left it, or the gold checked is not the gold cleaned
    once = antisd.clean_gold(gold)
    assert once is None or antisd.clean_gold(once) == once


# Golds that a second cleaning changed, found by the property test above: each is now cleaned to a
# fixed point in one pass (whitespace collapsed again after spacing commands, trailing '.' and '$'
# stripped layer by layer, e-notation read once)
@pytest.mark.parametrize("gold", [
    "1~~1",            # spacing commands (~, \;) and a dropped \$ left two spaces
    "5 \\$ 6",          # '5  6', then '5 6'
    "10^{3}. .",       # one pass stripped one trailing '.': '10^{3}.', then '10^{3}'
    "5.$",             # '$' was stripped after the '.': '5.', then '5'
    "2\\mathrm{e}3",    # \mathrm{e} became e after the e-notation rule ran: '2e3', then '2 \times 10^{3}'
])
def test_a_gold_is_cleaned_to_a_fixed_point_in_one_pass(gold):
    once = antisd.clean_gold(gold)
    assert antisd.clean_gold(once) == once


# -----------------------------------------------------------------------------
# Step 2, reward: hedged and malformed boxes, and the cases users reported

# every example a user found: wrong answers the checker once paid for, right ones it refused
# (response, gold as the dataset gives it, reward)
REPORTED_CASES = [
    ("\\boxed{\n3\\sqrt{13}\n}", "3", 0.0),                  # a newline inside the box hid part of it
    ("\\boxed{\n(1, 2)\n}", "2", 0.0),
    ("\\boxed{\n\\sqrt{2}\n}", "\\sqrt{2}", 1.0),
    ("\\boxed{6$ $5}", "5", 0.0),                            # '$' splits the box
    ("\\boxed{3 \\\\ 2}", "2", 0.0),                         # a line break splits it
    ("\\boxed{3 \\end{document} 2}", "2", 0.0),
    ("\\boxed{\\text{answer: } 2 \\text{ no wait } 3}", "2", 0.0),
    ("\\boxed{6 = 5}", "5", 0.0),                            # an equation between two different numbers
    ("So \\boxed{5} and then \\boxed{6", "5", 0.0),          # the last box is cut off
    ("\\boxed{1}", "1 - \\frac{1}{\\mathrm{e}}", 0.0),       # \mathrm{e} is Euler's number, not a unit
    ("\\boxed{3}", "3\\mathrm{e}", 0.0),
    ("\\boxed{(2, 2)} and \\boxed{(6, 2)}", "(2, 2), (6, 2)", 1.0),  # several boxes, together the answer
    ("\\boxed{10\\,000}", "10000", 1.0),                     # thin spaces as thousands separators
    ("\\boxed{1\\,000}", "1000", 1.0),
]


@pytest.mark.parametrize("response, gold, reward", REPORTED_CASES)
def test_reported_hedges_earn_nothing_and_reported_right_answers_earn_reward(response, gold, reward):
    assert antisd.verify(response, antisd.clean_gold(gold)) == reward


# one box, two answers: ways we found that math-verify reads "<wrong> <sep> <right>" as the right one
# (each of these scored 1 for gold 5 before these rules)
@pytest.mark.parametrize("answer", [
    "6 \\to 5", "6 \\rightarrow 5", "6 \\Rightarrow 5", "6 \\implies 5", "6 \\iff 5", "6 \\mapsto 5",
    "6 \\longrightarrow 5", "6 \\Leftarrow 5", "6 \\lor 5", "6 \\vee 5", "6 \\land 5", "\\cancel{6} 5", "\\sout{6} 5",
    "\\not 6 5", "6 \\hline 5", "6 \\cr 5", "6 \\\\[2pt] 5", "6 \\newline 5", "6 ~ 5", "6 \\> 5", "6 \\hspace{1em} 5",
    "6 \\equiv 5", "6 \\sim 5", "6 \\mid 5", "6 \\in 5", "6 \\cup 5", "6 \\setminus 5", "\\boxed{6} 5", "\\boxed{5} 6",
    "6 \\text{ or } 5", "6 \\text{ no wait } 5", "5 \\text{ (or 6)}", "6 \\text{ (not 5)}", "6 % 5", "x = 5+5 = 5",
    "6$ $5", "\\begin{cases} 6 \\\\ 5 \\end{cases}", "\\begin{aligned} 6 \\\\ 5 \\end{aligned}", "\\tag{6} 5", "\\label{6} 5",
    "\\color{red}{6} 5", "\\textcolor{white}{6} 5", "6 \\dots 5", "6 \\vdots 5", "6 | 5", "\\left. 6 \\right| 5", "6 \\propto 5",
    "6 \\subset 5", "6 \\ll 5", "6 := 5", "6 \\bmod 5", "\\operatorname{6} 5", "6 \\par 5", "6 \\linebreak 5", "6 \\enspace 5",
    "6 & 5", "{6 \\atop 5}", "\\fbox{6} 5", "6 \\xrightarrow{x} 5",
])
def test_one_box_holding_two_answers_earns_nothing(answer):
    assert antisd.verify("\\boxed{" + answer + "}", "5") == 0.0
    assert antisd.verify("\\boxed{" + answer + "}", "6") == 0.0


@pytest.mark.parametrize("response", ["\\boxed{6} or \\boxed{5}", "\\boxed{6}. No wait: \\boxed{5}", "\\boxed{6}\\boxed{5}",
                                      "\\boxed{5} and \\boxed{6}"])
def test_several_boxes_are_one_answer_not_a_choice(response):
    assert antisd.verify(response, "5") == 0.0
    assert antisd.verify("\\boxed{5}, \\boxed{5}", "5") == 1.0  # a repeated box counts once


# -----------------------------------------------------------------------------
# Step 2, reward: numbers as Minerva writes them: small ones, and scientific notation

# Minerva's golds go down to 1.325e-27, and math-verify rounds to six decimal places: without a rule of
# their own, 0.0 and any nearby number would earn the reward for every gold below 5e-7.
# (gold as the file writes it, boxed answer)
SMALL_GOLD_WRONG_ANSWERS = [
    ("2.88e-19", "0.0"), ("2.88e-19", "0"), ("2.88e-19", "2.89 \\times 10^{-19}"), ("2.88e-19", "0.000000000000000000289"),
    ("1e-8", "0.0"), ("1e-8", "0.00000002"), ("1e-8", "E = 0.0"), ("1.77e-6", "0.0000015"), ("1.77e-6", "1.8 \\times 10^{-6}"),
    ("0.0000001", "0.0"), ("6.5e-2", "0.0651"), ("\\frac{1}{3000}", "0.000333"),   # 3 digits of an exact value
]
SMALL_GOLD_RIGHT_ANSWERS = [
    ("2.88e-19", "0.000000000000000000288"), ("2.88e-19", "2.88 \\times 10^{-19}"), ("1e-8", "0.00000001"), ("1e-8", "10^{-8}"),
    ("1e-8", "E = 10^{-8}"), ("1.77e-6", "1.770 \\times 10^{-6}"), ("6.5e-2", "0.065"), ("6.5e-2", "\\frac{13}{200}"),
    ("-3e-5", "-0.00003"), ("\\frac{1}{3000}", "0.000333333"), ("\\frac{1}{3}", "0.333333"),
    ("5\\%", "5"), ("5\\%", "0.05"),                                 # a percentage: math-verify's reading
]


@pytest.mark.parametrize("gold, answer", SMALL_GOLD_WRONG_ANSWERS)
def test_zero_or_a_nearby_number_does_not_match_a_small_gold(gold, answer):
    assert antisd.verify("\\boxed{" + answer + "}", gold) == 0.0


@pytest.mark.parametrize("gold, answer", SMALL_GOLD_RIGHT_ANSWERS)
def test_a_small_gold_is_matched_by_its_value_to_six_significant_digits(gold, answer):
    assert antisd.verify("\\boxed{" + answer + "}", gold) == 1.0


# Minerva writes its golds in scientific notation (4.5e33, 8.7e8); a model may answer in any of the ways a
# number is written. 3e stays 3 times Euler's e: the e of a number has digits right after it.
# (gold as the file writes it, boxed answer)
SAME_NUMBER_WRITTEN_TWO_WAYS = [
    ("4.5e33", "4.5e33"), ("4.5e33", "4.5e+33"), ("4.5e33", "4.5E33"), ("4.5e33", "4.5\\times 10^{33}"),
    ("4.5e33", "4.5 \\cdot 10^{33}"), ("4.5e33", "4500000000000000000000000000000000"), ("4.5e33", "45 \\times 10^{32}"),
    ("4.5e33", "4.50 \\times 10^{33}"), ("4.5e+33", "4.5e33"), ("4.5\\times 10^{33}", "4.5e33"),
    ("4.5 \\cdot 10^{33}", "4500000000000000000000000000000000"), ("4500000000000000000000000000000000", "4.5e33"),
    ("8.7e8", "870000000"), ("870000000", "8.7e8"), ("8.7e8", "8.7 \\times 10^{8}"), ("8.7e8", "870,000,000"),
    ("1.70e4", "17000"), ("1.4903e4", "14903"), ("2.88e-19", "2.88e-19"), ("1.325e-27", "1.325 \\times 10^{-27}"),
    ("0.2", "2e-1"), ("3e", "3e"), ("3e", "3 \\cdot e"), ("3\\mathrm{e}", "3e"), ("2\\mathrm{e}-1", "2e - 1"), ("E", "E"),
]
DIFFERENT_NUMBERS_OR_NO_NUMBER = [
    ("4.5e33", "4.6e33"), ("4.5e33", "4.6 \\times 10^{33}"), ("4.5e33", "4500000000000000000000000000000001"),
    ("4.5e33", "4.5"), ("4.5e33", "4.5e3"), ("4.5e33", "4.5e33 = 5"), ("4.5e33", "5 = 4.5e33"), ("8.7e8", "8.7"),
    ("8.7e8", "870000001"), ("2.88e-19", "2.89e-19"), ("1e33", "e33"), ("3e", "3"), ("3e", "3e0"), ("3\\mathrm{e}", "3"),
    ("2\\mathrm{e}-1", "0.2"), ("2\\mathrm{e}-1", "2e-1"),   # written without spaces, 2e-1 is the number 0.2
]


@pytest.mark.parametrize("gold, answer", SAME_NUMBER_WRITTEN_TWO_WAYS)
def test_a_number_in_scientific_notation_earns_reward_however_it_is_written(gold, answer):
    assert antisd.verify("\\boxed{" + answer + "}", gold) == 1.0
    assert antisd.verify("\\boxed{" + answer + "}", antisd.clean_gold(gold)) == 1.0


@pytest.mark.parametrize("gold, answer", DIFFERENT_NUMBERS_OR_NO_NUMBER)
def test_scientific_notation_never_merges_two_numbers_or_reads_eulers_e_as_one(gold, answer):
    assert antisd.verify("\\boxed{" + answer + "}", gold) == 0.0
    assert antisd.verify("\\boxed{" + answer + "}", antisd.clean_gold(gold)) == 0.0


# -----------------------------------------------------------------------------
# Step 2, reward: graded cases from other projects' suites

# Equivalence cases, written by us from other graders' test suites; the rules were designed on these.
# (gold, boxed answer, reward). Where our rule differs from the source's expectation, the line says why.
TUNED_CASES = [
    # hendrycks/math modeling/math_equivalence_test.py
    ("\\tfrac{1}{2} + \\frac1{72}", "\\frac{1}{2} + 2/3", 0), ("10, 4, 2", "4, 12, 2", 0),
    ("\\tfrac{1}{2} +\\! \\frac1{72}", "\\dfrac{1}{2} +\\frac{1}{72}", 1), ("10\\text{ units}", "10 ", 1),
    ("10\\text{ units}", "100 ", 0), ("10", "\\$10", 1), ("\\left(x-2\\right)\\left(x+2\\right)", "(x-2)(x+2)", 1),
    ("0.1", ".1", 1), ("10\\%", "10", 1), ("10\\sqrt{3} + \\sqrt4", "10\\sqrt3 + \\sqrt{4}", 1), ("\\frac34i", "\\frac{3}{4}i", 1),
    ("\\tfrac83", "\\frac{8}{3}", 1), ("5x - 7y + 11z + 4 = 0", "x + y - z + 2 = 0", 0), ("1/2", "\\frac{1}{2}", 1),
    # the order of a list: hendrycks says "10, 4, -2" != "4, 10, -2", MARIO_EVAL says "1, 2, 3" == "1, 3, 2". We
    # follow MARIO_EVAL (math-verify reads a bare list as a set): MATH's "enter all solutions, separated by
    # commas" answers are sets; an answer whose order matters is a tuple in parentheses, and tuples stay ordered
    ("10, 4, -2", "4, 10, -2", 1), ("0.1, 4, 2", "4, .1, 2", 1), ("1, 2, 3", "1, 3, 2", 1), ("(1, 2, 3)", "(1, 3, 2)", 0),
    # MARIO-Math-Reasoning/MARIO_EVAL math_evaluation/tests/test_is_equiv.py
    ("\\{x, x - 1\\}", "\\{x - 1, x\\}", 1), ("11,\\! 111,\\! 111,\\! 100", "11111111100", 1), ("11111111100", "11,\\! 111,\\! 111,\\! 100", 1),
    ("1\\frac12", "1.5", 1), ("2\\frac58", "2.625", 1), (".1, 4.0", "0.1, 4", 1), ("10\\%", "0.1", 1),
    ("7, -2, \\text{ and } -5", "-5,-2,7", 1), ("-5,-2,7", "7, -2, \\text{ and } -5", 1), ("[1, 2, 3]", "(1, 3, 2)", 0),
    ("[x, x + 1]", "[x + 1, x]", 0), ("\\tfrac23 +\\frac1{72}", "\\dfrac{2}{3} +\\frac{1}{72}", 1),
    ("\\frac{\\sqrt{17}}{17}", "\\frac{\\sqrt{17}}{17}", 1), ("\\frac{\\sqrt{3}}{2}", "0.8660254037844386", 1),
    ("10 \\text{cm}", "10", 1), ("10\\text{ cm}^2", "10", 1), ("10\\text{ cm}^{2}", "10", 1), ("10 square units", "10", 1),
    ("(2x+3)(2x -1)(2x+1)", "(2x - 1)(2x + 1)(2x + 3)", 1),
    ("\\begin{pmatrix} 1 & 1/2 \\\\ 1/3 & 4 \\end{pmatrix}", "\\begin{pmatrix} 1 & 0.5 \\\\ 1/3 & 4 \\end{pmatrix}", 1),
    ("x \\in [0.5, \\infty)", "[1/2, \\infty)", 1), ("[-3,2]", "(-3,2)", 0), ("[1, 2)", "[x, y)", 0),
    ("x = 1, y = 2, z = 3", "1, 2, 3", 1), ("f(x) = 2x + 3", "2x + 3", 1),
    # ... where we refuse what MARIO_EVAL accepts: the exact value is asked for, so a 4-digit decimal of pi
    # or of 1/432 is not it (math-verify compares to 6 digits); "1 1/2" is also a product; y = ... names
    # another function than f(x) = ...; times of day and words outside \text{} are not parsed
    ("40\\pi", "125.663", 0), ("\\frac13, \\sqrt3, \\pi", "1/3, 1.732, 3.1416", 0), ("2.314814814815 \\times 10^{-3}", "\\frac{1}{432}", 0),
    ("1 1/2", "1.5", 0), ("f(x) = 2x + 3", "y = 2x + 3", 0), ("20:34", "20:34:00", 0), ("10 weeks", "10", 0),
    # ... and accept what it refuses: units are dropped, so "10m" is 10 (see the known limits in README)
    ("10m", "10", 1), ("10cm", "10", 1),
    # NVIDIA/NeMo-Skills tests/test_math_equal.py, both orders as there
    ("5", "5.0", 1), ("1/2", "0.5", 1), ("918\\frac{1}{2}", "918.5", 1), ("918.5", "918\\frac{1}{2}", 1),
    ("x^2+2x+1", "x^2 + 2*x - (-1)", 1), ("y = x^2+2x+1", "2x+ 1+x^2", 1),
    ("odd", "\\text{odd}", 1), ("\\text{odd}", "odd", 1), ("E", "\\mathrm{E}", 1), ("A", "\\textbf{A}", 1), ("f'", "f'", 1),
    (".185", "0.185", 1), ("17\\text{ any text}", "17", 1), ("\\$10", "10", 1), ("10", "10\\%", 1), ("2.5", "\\frac{5}{2}", 1),
    ("(r+5)(r+5)", "(r+5)^2", 1), ("\\begin{pmatrix}0&0&0\\\\0&1&0\\\\0&0&1\\end{pmatrix}",
                                   "\\begin{bmatrix} 0 & 0 & 0 \\\\ 0 & 1 & 0 \\\\ 0 & 0 & 1 \\end{bmatrix}", 1),
    ("5", "5.001", 0), ("x^2+2x+1", "x^3+2x+1", 0), ("odd", "\\text{oddd}", 0), ("E", "\\mathrm{E}*2", 0),
    ("\\sqrt{67},-\\sqrt{85}", "\\sqrt{67}", 0), ("\\sqrt{67}", "\\sqrt{67},-\\sqrt{85}", 0),
    # ... where we refuse what NeMo-Skills accepts: an approximation that is not equal, and a choice with prose
    ("\\frac{\\sqrt{3}}{3}", "\\frac{\\sqrt{3}}{3} \\approx 0.577", 0), ("C", "C. x = 42", 0),
]


@pytest.mark.parametrize("gold, answer, reward", TUNED_CASES)
def test_equivalence_cases_from_other_graders(gold, answer, reward):
    assert antisd.verify("\\boxed{" + answer + "}", antisd.clean_gold(gold)) == reward


# Held out: graded cases from huggingface/Math-Verify's own test suite (the 0.9.0 release, tests/*.py),
# NOT used to design the rules above. Taken mechanically: cases with math-verify's default settings;
# a prediction holding a \boxed{} is the response as written, any other prediction is boxed after its
# outer $...$ is removed; left out are predictions of free prose or inline $...$ without a box (our
# reward requires a box), golds of prose without a box, and anything over 200 characters.
# (gold, response, expected by Math-Verify's tests)
HELD_OUT_CASES = [
    # test_all.py test_number_extraction
    ('-5', '\\boxed{-5}', 1),
    ('7425000', '\\boxed{7,425,000}', 1),
    ('1000', '\\boxed{1 000}', 1),
    ('1000', '\\boxed{1000.0}', 1),
    ('1000.0', '\\boxed{1,000.0}', 1),
    ('1000.99', '\\boxed{1000,99}', 1),
    ('1,22', '\\boxed{1.22}', 1),
    ('0.4', '\\boxed{.4}', 1),
    ('1000.99', '\\boxed{1,000.99}', 1),
    ('1000.99', '\\boxed{the number is not 10 which is 1,000.99€}', 1),
    ('1000.99', '\\boxed{so the number is 10 which is 1,000.99m²}', 1),
    ('1000.99', "\\boxed{not it's not 10 it's 1,000.99m²}", 1),
    ('0,111', '\\boxed{0.111}', 1),
    ('2', '\\boxed{AZYUK2A}', 0),
    # test_all.py test_simple_fraction_notation
    ('10/9', '\\boxed{\\frac{10}{9}}', 1),
    ('-10/9', '\\boxed{-\\frac{10}{9}}', 1),
    # test_all.py test_sets_handling
    ('$[0,1)$', '\\boxed{[0,1)}', 1),
    ('$[0,9)$', '\\boxed{[0,1)}', 0),
    ('$(0,9)$', '\\boxed{[0,9)}', 0),
    ('$1$', '\\boxed{-[0,1)}', 0),
    # test_all.py test_latex_notation
    ('$1/3$', '\\boxed{\\frac13}', 1),
    ('$1$', '\\boxed{\\frac3{3}}', 1),
    ('$\\sqrt{3}$', '\\boxed{\\sqrt3}', 1),
    ('$1/3$', '\\boxed{\\cfrac{1}{3}}', 1),
    ('$1/3$', '\\boxed{\\dfrac{1}{3}}', 1),
    ('$1/3$', '\\boxed{\\tfrac{1}{3}}', 1),
    ('$1/3$', '\\boxed{1/3}', 1),
    ('$1/3$', '\\boxed{\\left( \\frac{1}{3} \\right)}', 1),
    ('$1/3$', '$\\boxed{\\frac{1}{3}}$', 1),
    ('$1/3$', '\\boxed{\\frac{1}{3} \\text{meters}}', 1),
    ('$1/3$', '\\boxed{\\frac{1}{3} \\textbf{meters}}', 1),
    ('$1/3$', '\\boxed{k = \\frac{1}{3}}', 1),
    # test_all.py test_percent_notation
    ('$28\\%$', '\\boxed{28 percent}', 1),
    ('$28\\%$', '\\boxed{28 pct}', 1),
    ('$28\\%$', '\\boxed{28 %}', 1),
    ('$28\\%$', '$\\boxed{28}$ pct', 1),
    ('$28\\%$', '$\\boxed{28 pct}', 1),
    ('$28\\%$', '$\\boxed{28 percent}', 1),
    ('$28\\%$', '$\\boxed{28 percentage}', 1),
    ('$28\\%$', '\\boxed{28}', 1),
    ('$0.28$', '\\boxed{28}', 0),
    ('$28/100$', '\\boxed{28}', 0),
    ('$28$', '\\boxed{28/100}', 0),
    ('$\\frac{28}{100}$', '\\boxed{28}', 0),
    ('$28*\\frac{1}{100}$', '\\boxed{28}', 0),
    # test_all.py test_latex_notation_math
    ('$2-2p$', 'Since $x<2$, it follows that $|x-2|=2-x$. If $2-x=p$, then $x=2-p$. Thus $x-p=\\boxed{2-2p}$.', 1),
    ('\\boxed{\n\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}\n}.\n\\end{align*}', '\\boxed{\n\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}\n}.\n\\end{align*}', 1),
    ('$\\frac{14}{3}$', '$f(-2)+f(-1)+f(0)=\\frac{3(-2)-2}{-2-2}+\\frac{3(-1)-2}{-1-2}+\\frac{3(0)-2}{0-2}=\\frac{-8}{-4}+\\frac{-5}{-3}+\\frac{-2}{-2}=2+\\frac{5}{3}+1=\\boxed{\\frac{14}{3}}$', 1),
    ('$3\\sqrt{13}$', 'We use the distance formula:  \\begin{align*} \\sqrt{(2 - (-4))^2 + ((-6) - 3)^2} &= \\sqrt{6^2 + (-9)^2}\\\\ & = \\sqrt{36 + 81}\\\\ & = \\sqrt{117} = \\boxed{3\\sqrt{13}}. \\end{align*}', 1),
    ('$2$', 'Of the two-digit perfect squares, only $4^2=16$ and $6^2=36$ end in $6$. Thus, there are $\\boxed{2}$ distinct possible values for $B$.', 1),
    ('$90^\\circ$', 'Therefore, \\begin{align*} \\angle BAC &= \\angle BAD + \\angle DAC \\\\ &= 50^\\circ+40^\\circ \\\\ &= \\boxed{90^\\circ}. \\end{align*}', 1),
    ('$(6,31,-1)$', 'Let $\\alpha$ be a root of $x^3 - 3x^2 + 4x - 1 = 0,$ so $\\alpha^3 = 3 \\alpha^2 - 4 \\alpha + 1.$ Then solving the system of equations, we find $(p,q,r) = \\boxed{(6,31,-1)}.$', 1),
    ('$1 \\pm \\sqrt{19}$', 'This simplifies to $64y + 1920 = 0,$ so $y = -30.$ Then $x^2 - 2x - 48 = -30,$ or $x^2 - 2x - 18 = 0.$ By the quadratic formula, $x = \\boxed{1 \\pm \\sqrt{19}}.$', 1),
    ('$3 \\pm 2 \\sqrt{2}$', 'This gives us $x^2 + 1 = 6x,$ or $x^2 - 6x + 1 = 0.$ By the quadratic formula, the roots are $x = \\boxed{3 \\pm 2 \\sqrt{2}}.$', 1),
    ('$\\{1\\pm\\sqrt{5},-2\\}$', 'The roots of $P(x)$ are $-2$ and $1 \\pm \\sqrt{5}$, so the answer is $\\boxed{\\{1\\pm\\sqrt{5},-2\\}}.$', 1),
    ('$2 \\sin b \\cos a$', 'By sum-to-product,\n\\[\\sin (a + b) - \\sin (a - b) = \\boxed{2 \\sin b \\cos a}.\\]', 1),
    ('$125$ miles', 'The distance is $\\boxed{125\\textnormal{ miles}}.$', 1),
    ('$[-1, -\\frac{1}{2}) \\cup (-\\frac{1}{2}, 0) \\cup (0, 1) \\cup (1, \\infty)$', 'The solution set is $\\boxed{[-1, -\\tfrac12) \\cup (-\\tfrac12, 0) \\cup (0, 1) \\cup (1, \\infty)}.$', 1),
    ('$\\sqrt{2}+\\sqrt{5}$', 'The answer is $\\boxed{\\sqrt 2+\\sqrt 5}$', 1),
    ('$\\frac{9}{4}\\pi$', 'Therefore $\\boxed{\\frac94\\pi}$.', 1),
    ('x \\in \\boxed{\\{-1\\} \\cup [0,7)}.$', 'x \\in \\boxed{\\{-1\\} \\cup [0,7)}.$', 1),
    # test_all.py test_relations_math
    ('$x \\leq 5$', '\\boxed{5 \\geq x}', 1),
    ('$x \\geq 5$', '\\boxed{5 \\leq x}', 1),
    ('$x = 11$', '\\boxed{x = 5+5+1 = 7 =11}', 1),
    ('$7 = 11a+c$', '\\boxed{11a+c}', 0),
    ('$x = 1/3$', '\\boxed{x = 5+5+1 = 1/3 \\approx 11}', 1),
    ('$11$', '\\boxed{x=11}', 1),
    ('$11$', '\\boxed{x\\approx11}', 1),
    ('$1/3$', '\\boxed{x=1/3\\approx1.3}', 1),
    ('$x < 1$', '\\boxed{-x > -1}', 1),
    ('$x < 1$', '\\boxed{x > -1}', 0),
    ('$x <= 1$', '\\boxed{-x >= -1}', 1),
    ('$a +3z = 0$', '\\boxed{0}', 0),
    ('$1 = \\zzz = x = 0$', '\\boxed{0}', 1),
    ('$2x + z = 1$', '\\boxed{1}', 0),
    ('$a^2 + b = 0$', '\\boxed{0}', 0),
    ('$k=1$', '\\boxed{1}', 1),
    ('$1$', '\\boxed{k=1}', 1),
    ('$z = 1 + 1 = 2$', '\\boxed{z = 3+3 = 2}', 1),
    ('$2x+4y-3=0$', '\\boxed{y=-\\frac{1}{2}x+\\frac{3}{4}}', 1),
    ('$x^2/4 + y^2/3 = 1$', '\\boxed{x^2/16 + y^2/12 = 1/4}', 1),
    # test_all.py test_complex_math_expressions
    ('$\\frac{1}{12}$', '\\boxed{0.0833333333333333}', 1),
    ('$(1,\\frac{9}{2})$', '\\boxed{(1,4.5)}', 1),
    ('$\\frac{x+2}{7}$', '\\boxed{\\frac{x}{7}+\\frac{2}{7}}', 1),
    ('$\\tan^2(y)+1$', '\\boxed{\\sec^2(y)}', 1),
    ('$\\begin{pmatrix}-\\\x0crac{7}{4}&-2\\\\4&\\frac{1}{4}\\\\\\end{pmatrix}$', '\\boxed{\\begin{pmatrix}-\\\x0crac{7}{4}&-2\\\\4&\\frac{1}{4}\\\\\\end{pmatrix}}', 1),
    ('$34x+45y-20z+100=0$', '\\boxed{-34x-45y+20z-100=0}', 1),
    ('$\\frac{\\sqrt{\\sqrt{11}+\\sqrt{194}}}{15+2\\sqrt{33}}$', '\\boxed{\\frac{\\sqrt{\\sqrt{11}+\\sqrt{194}}}{2\\sqrt{33}+15}}', 1),
    ('$(a+5)(b+2)$', '\\boxed{(+5)(b+2)}', 0),
    ('$2$', '\\boxed{\\frac{1+\\sqrt{5}}{2}}', 0),
    ('$4$', '\\boxed{\\frac{34}{16}+\\frac{\\sqrt{1358}}{16}}', 0),
    ('$1\\sqrt{19}$', '\\boxed{1}', 0),
    ('$x+2n+1$', '\\boxed{x+1}', 0),
    # test_all.py test_math_extraction_additional_cases
    ('$(3,1)$', '\\boxed{{1,3}}', 0),
    ('$(1,3)$', '\\boxed{{1,3}}', 1),
    ('$[-4,0]$', 'Thus, the values of \\( k \\) for which the quadratic has real roots are: \\[ \\boxed{[-4, 0]} \\]', 1),
    ('\\(\\boxed{\\text{C}}\\).', '$\\boxed{\\text{(C)}}.$', 1),
    (' So the answer is: \\[ \\boxed{11111111100} \\]', 'is $\\boxed{11,\\! 111,\\! 111,\\! 100}$', 1),
    (' So the answer is: \\[ \\boxed{32349} \\]', 'is $\\boxed{32,\\! 349}$', 1),
    (' So the answer is: \\[ \\boxed{32349} \\]', 'is $\\boxed{32, 349}$', 0),
    ('Thus, the domain of the function \\( f(x) \\) is: \\[ \\boxed{(2, 12) \\cup (12, 102)} \\]', 'Thus, the answer is $x \\in \\boxed{(2,12) \\cup (12,102)}$', 1),
    ('$\\text{E}$', '\\boxed{E}', 1),
    ('$\\boxed{1}\\boxed{2}$', '$\\boxed{1,2}$', 1),
    # test_all.py test_set_rel_assymetry
    ('$-2 \\\\le x \\\\le 7$', '\\boxed{x \\in [-2,7]}', 1),
    ('$x \\in [-2,7]$', '\\boxed{-2 \\\\le x \\\\le 7}', 0),
    # test_all.py test_sqrt_precision
    ('$4$', '\\boxed{4\\sqrt{2}}', 0),
    # test_all.py test_symbols
    ('$\text{13}$', '\\boxed{13}', 0),
    # test_boxed.py test_boxed
    ('$\\\\boxed{35 cm} ++++++ \\\\boxed{4}$', '\\boxed{{35 cm,4}}', 1),
    ('SoHi YES.\\n\\n could answer therefore\\\\boxed{840}.,but let me put this after explain.\\n\\n**Final Answer**\\n\\\\boxed{840}', '\\boxed{840}', 1),
    # test_numina_cases.py test_numina_cases
    ('$(37,3,3,13),(17,3,3,7),(3,37,3,13),(3,17,3,7),(3,3,2,3)$', '$\\boxed{(3, 37, 3, 13), (3, 17, 3, 7), (3, 3, 2, 3), (3,17,3,7), (17,3,3,7), (37,3,3,13)}$', 1),
    ('$(p,q)=(3,2)$', '\\boxed{(3,2)}', 1),
    ('$(0;0;0),(0;-2;0),(0;0;6),(0;-2;6),(4;0;0),(4;-2;0),(4;0;6),(4;-2;6)$', '\\boxed{(4, 0, 6), (4, -2, 6), (0, 0, 6), (0, -2, 6), (4, 0, 0), (4, -2, 0), (0, 0, 0), (0, -2, 0)}', 1),
    ('$1\\leq|z|\\leq \\frac{3}{2}$', '\\boxed{z \\in \\left[-\\frac{3}{2}, -1\\right] \\cup \\left[1, \\frac{3}{2}\\right]}', 1),
    ('$-12;-11;-10;-8;-7;-6$', '$\\boxed{\\{-12, -11, -10, -8, -7, -6\\}}$', 1),
    ('$AB=4,CD=5$', '$\\boxed{4, 5}$', 1),
    ('$(11,7)or(7,11)$', '$\\boxed{(7,11),\\ (11,7)}$', 1),
    ('$S_{MBCN}:S=7:32$', '$\\boxed{7:32}$', 1),
    ('$\\frac{NO}{BO}=\\frac{1}{\\sqrt{6}}$', '\\boxed{\\frac{1}{\\sqrt{6}}}', 1),
    ('$p=5,q=2;p=7,q=2$', '\\boxed{(5,2),(7,2)}', 1),
    ('$(p,q,r)=(3,2,7)$', '\\boxed{(3,2,7)}', 1),
    ('$V_{1}:V_{2}=11:21$', '\\boxed{11:21}', 1),
    ('$(2,1),(1,2),(-1,-20),(-20,-1)$', 'solutions are:\n\n\\[\n\\boxed{(1, 2)}, \\boxed{(2, 1)}, \\boxed{(-1, -20)}, \\boxed{(-20, -1)}\n\\]', 1),
    ('\\(\\boxed{1}\\) and \\(\\boxed{-2}\\).', '$\\boxed{-2,1}$.', 1),
    ('$\\text{odd}$', '\\boxed{odd}', 1),
    ('$\\text{e}$', '\\boxed{e}', 1),
    ('$\\text{E}$', '\\boxed{E}', 1),
    ('$d$', '\\boxed{\\text{E}}', 0),
    ('$1$ and $2$ and $3$', '$\\boxed{1,2,3}$', 1),
    ('$(37,3,3),(17,3,3,7),(3,37,3,13),(3,17,3,7),(3,3,2,3)$', '$\\boxed{(3, 37, 3, 13), (3, 17, 3, 7), (3, 3, 2, 3), (3,17,3,7), (17,3,3,7), (37,3,3,13)}$', 0),
    ('$(p,q)=(3,2)$', '$\\boxed{(3, 2)}$', 1),
    ('\\boxed{x = -5,\\ p = \\frac{14}{3}} ', '$\\boxed{-5, \\frac{14}{3}}$', 1),
    ('\\boxed{a=4,\\,-8,\\,-10}', '$\\boxed{-10,-8,4}$', 1),
    ('\\\\boxed{W(n) = 1 \\\\text{ and } W(n) = -1', '\\boxed{W(x)=1orW(x)=-1}', 1),
    ('$21,16$ or $11$', '\\boxed{21,16,11}', 1),
    ('\\n\\n\\[ \\boxed{p = -1 \\text{ and } p = \\dfrac{15}{8}} \\]', '\\boxed{p=-1,p=\\frac{15}{8}}', 1),
    ('$0<f(x)<1$', '\\boxed{(0,1)}', 1),
    ('\\(\\boxed{6 \\text{ and } 8}\\)', '$\\boxed{6,8}$', 1),
    ('$\\text{Even}$', '\\boxed{Even}', 1),
    # test_open_thoughts.py test_open_thoughts
    ('$$\\boxed{2}, \\boxed{3}, \\boxed{5}, \\boxed{7}, \\boxed{13}$$', '\\boxed{{2, 3, 5, 7, 13}}', 1),
    ('$$f(y) = y$$', '\\boxed{f(y) = y}', 1),
    ('$$-793 < a < 10$$', '\\boxed{(-793, 10)}', 1),
    ('$$\\text{The midpoints form a regular hexagon}$$', '\\boxed{\\text{The midpoints form a regular hexagon}}', 1),
    ('$$a_3 = 2, a_{37} = 19$$', '$$\\boxed{a_{37} = 19, \\quad a_3 = 2}$$', 1),
    ('$$(2, 2), (1, 3), (3, 3)$$', '$$\\boxed{(2, 2), (1, 3), (3, 3)}$$', 1),
    ('$$(1, +\\infty)$$', '\\boxed{(1, +\\infty)}', 1),
    ('$$x = \\frac{1}{2}, x = \\frac{-1 \\pm \\sqrt{13}}{4}$$', '$$\\boxed{x = \\frac{1}{2}, x = \\frac{-1 \\pm \\sqrt{13}}{4}}$$', 1),
    ('$$0.06 \\text{ yuan}$$', '$$\\boxed{0.06 \\text{ yuan}}$$', 1),
    ('$$(5, 8), (8, 5)$$', '$$\\boxed{(x, y) = (5, 8) \\quad \\text{and} \\quad (8, 5)}$$', 1),
    ('$$667$$', '$$\\boxed{667}$$', 1),
    ('$$6 \\text{ and } 8$$', '$$\\boxed{6 \\text{ and } 8}$$', 1),
    ('$$(2, 2), (6, 2)$$', '$$\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}$$', 1),
    ('$$(98, 2), (99, 503)$$', '$$\\boxed{(98, 2)} \\quad \\text{and} \\quad \\boxed{(99, 503)}$$', 1),
    ('$$(3, 3), (1, 1)$$', '$$\\boxed{(3, 3)} \\text{ for part (a) and } \\boxed{(1, 1)}$$', 1),
    ('$$k \\ge 2$$', '$$\\boxed{k \\ge 2}$$', 1),
    ('$$k = 45, n = 2$$', '$$\\boxed{k = 45} \\quad \\text{and} \\quad \\boxed{n = 2}$$', 1),
    ('$${1,2,3}$$', '\\boxed{1} and \\boxed{2} and \\boxed{3}', 1),
    ('$${1,2,3}$$', '\\boxed{1},\\boxed{2},\\boxed{3}', 1),
    ('$$|AB|=1$$', '\\boxed{1}', 1),
    ('$$A:B=1$$', '\\boxed{1}', 1),
    ('$$f(x)=1$$', '\\boxed{1}', 1),
    ('$x_{1}=10^{\\frac{-5+\\sqrt{13}}{6}},\\quadx_{2}=10^{\\frac{-5-\\sqrt{13}}{6}}$', '$\\boxed{10^{\\frac{\\sqrt{13} - 5}{6}}} \\quad \\text{and} \\quad \\boxed{10^{-\\frac{5 + \\sqrt{13}}{6}}}$', 1),
    ('$y_{1}=-2 x^{2}+4 x+3, y_{2}=3 x^{2}+12 x+10$', '\\($y_1 = \\boxed{-2(x - 1)^2 + 5} \\) and \\( y_2 = \\boxed{3(x + 2)^2 - 2} \\) ', 1),
    ('\\boxed{1} papers and \\boxed{2} bins', '$\\boxed{1,2}$', 1),
    ('\\boxed{1} no no no no no \\boxed{2}', '$\\boxed{1,2}$', 0),
    # test_yujianll.py test_string_extraction
    ('$n=1, 2, 3$', '\\boxed{n=1, 2, 3}', 1),
    ('$n=2, 3, 4$', '\\boxed{n=1, 2, 3}', 0),
    ('$D = (0, 1)$', '\\boxed{D = (0, 1)}', 1),
    ('$D = (0, 1)$', '\\boxed{D = (0, 1.5)}', 0),
    ('$F_n = \\sum_{k=0}^{n-1} F_k F_{n-k-1}$', '\\boxed{F_n = \\sum_{k=0}^{n-2} F_k F_{n-k-2}}', 0),
    ('$F_n = \\sum_{k=0}^{n-1} F_k F_{n-k-1}$', '\\boxed{F_n = \\sum_{k=0}^{n-1} F_{n-k-1} F_k}', 1),
    ('$19, 46, and 82$', '\\boxed{19, 46, \\text{ and } 82}', 1),
    ('$19, 46, and 82$', '\\boxed{21, 36, and 82}', 0),
    ('$1 - \\frac{1}{\\mathrm{e}}$', '\\boxed{1 - \\frac{1}{\\mathrm{e}}}', 1),
    ('$1 - \\frac{1}{\\mathrm{e}}$', '\\boxed{1 + \\frac{1}{\\mathrm{e}}}', 1),
    ('$\\pm 2021$', '\\boxed{2021}', 0),
    ('$\\pm 2021$', '\\boxed{{-2021, 2021}}', 1),
    ('$12:00$', '\\boxed{1:00}', 0),
    ('$12:00$', '\\boxed{12:00}', 1),
]


# Where we overrule Math-Verify's expected outcome: each response states something false, and the rules
# above refuse it on purpose (a relation between two different numbers is not an answer, and 1 + 1/e is
# not 1 - 1/e). A human grader would mark these wrong.
OVERRULED_HELD_OUT = {
    ("$1 - \\frac{1}{\\mathrm{e}}$", "\\boxed{1 + \\frac{1}{\\mathrm{e}}}"): 0,   # the sign differs
    ("$x = 11$", "\\boxed{x = 5+5+1 = 7 =11}"): 0,                                  # asserts 7 = 11
    ("$x = 1/3$", "\\boxed{x = 5+5+1 = 1/3 \\approx 11}"): 0,                      # asserts 11 = 1/3
    ("$1/3$", "\\boxed{x=1/3\\approx1.3}"): 0,                                      # 1/3 is not about 1.3
    ("$z = 1 + 1 = 2$", "\\boxed{z = 3+3 = 2}"): 0,                                  # asserts 6 = 2
}


def test_held_out_grader_cases_no_wrong_answer_rewarded_and_most_agree():
    """Measured when written (the rules above, frozen before this set was scored the last time): 168 of
    178 agree with Math-Verify's labels (94.4%), 173 of 178 (97.2%) once the five labels above are
    overruled; no false positive either way. Plain math-verify agrees on 175/178 of its own tests. The
    other disagreements are refusals by rule: a decimal comma ("1,22" could be a list), prose between
    different boxes in a gold, a box reading "W(x)=1orW(x)=-1"."""
    assert all(key[:2] in {case[:2] for case in HELD_OUT_CASES} for key in OVERRULED_HELD_OUT)
    rewards = [antisd.verify(response, antisd.clean_gold(gold)) for gold, response, _ in HELD_OUT_CASES]
    expected = [OVERRULED_HELD_OUT.get((gold, response), label) for gold, response, label in HELD_OUT_CASES]
    false_positives = [case for case, reward, want in zip(HELD_OUT_CASES, rewards, expected) if reward == 1.0 and want == 0]
    assert not false_positives
    agreement = sum(reward == want for reward, want in zip(rewards, expected)) / len(HELD_OUT_CASES)
    assert agreement >= 0.95, agreement


# -----------------------------------------------------------------------------
# Step 2, reward: bounded time

@pytest.mark.parametrize("answer", [r"9^{9^{9^{9}}}", "9^9^9^9", r"\dfrac{5^{(5^{(5^{(5^5)})} - 4)} - 5}{16}",
                                    "1+" * 50_000 + "1"])
def test_pathological_answers_are_judged_wrong_in_bounded_time(answer, monkeypatch):
    import time
    monkeypatch.setattr(antisd, "VERIFY_SECONDS", 1.0)
    start = time.time()
    assert antisd.verify(f"\\boxed{{{answer}}}", "1") == 0.0
    assert time.time() - start < antisd.VERIFY_SECONDS + 2
    assert antisd.verify(r"\boxed{2}", "2") == 1.0     # the checker still works afterwards


def test_a_check_stopped_for_time_says_so_on_stderr(monkeypatch, capsys):
    # a power tower no checker finishes (a limit of 0 s is not enough: on a loaded machine the worker
    # can answer "2 = 2" before the parent's poll(0) runs)
    monkeypatch.setattr(antisd, "VERIFY_SECONDS", 0.5)
    assert antisd.verify(r"\boxed{9^{9^{9^{9}}}}", "1") == 0.0
    assert "answer check ran past 0.5 s (or killed the checker) and counts as wrong: verify '9^{9^{9^{9}}}'" in capsys.readouterr().err
    monkeypatch.setattr(antisd, "VERIFY_SECONDS", 5.0)
    assert antisd.verify(r"\boxed{2}", "2") == 1.0
    assert "answer check" not in capsys.readouterr().err  # a check in time is silent


def test_a_check_costs_milliseconds_not_a_parse_per_rule():
    antisd.verify("\\boxed{1}", "1")  # the worker is started
    started = time.perf_counter()
    for k in range(30):
        assert antisd.verify(f"So $x = \\boxed{{\\frac{{{k}}}{{{k + 1}}}}}$.", f"{k}/{k + 1}") == 1.0
    per_check = (time.perf_counter() - started) / 30
    assert per_check < 0.05, per_check  # measured 10-12 ms on a loaded 2-core CPU, the same as before these rules


# -----------------------------------------------------------------------------
# Step 3. group advantages (antisd.group_advantages)

def test_group_advantages_are_z_scores_within_each_group():
    rewards = [1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1]
    adv = antisd.group_advantages(rewards, group_size=4)
    for g in range(3):
        group = torch.tensor(rewards[4 * g:4 * g + 4], dtype=torch.float64)
        if group.std() == 0:
            assert torch.all(adv[4 * g:4 * g + 4] == 0)
        else:
            mean = sum(group.tolist()) / 4
            sample_std = math.sqrt(sum((r - mean) ** 2 for r in group.tolist()) / 3)
            expected = (group - mean) / sample_std
            assert torch.allclose(adv[4 * g:4 * g + 4].double(), expected, atol=1e-5)


@given(st.integers(2, 8).flatmap(lambda group_size: st.lists(
    st.lists(st.integers(0, 3), min_size=group_size, max_size=group_size), min_size=1, max_size=4)), st.randoms())
def test_group_advantages_have_zero_mean_and_unit_std_in_each_group_and_follow_a_permutation(groups, shuffler):
    group_size = len(groups[0])
    advantages = antisd.group_advantages([float(r) for group in groups for r in group], group_size).double()
    for group, adv in zip(groups, advantages.view(-1, group_size)):
        if len(set(group)) == 1:
            assert torch.all(adv == 0)                                    # no signal: no advantage
        else:
            assert abs(float(adv.mean())) < 1e-6 and float(adv.std()) == pytest.approx(1.0, abs=1e-5)
    # permuted rollouts within each group and permuted groups: the same advantages, permuted the same way
    order = [[g * group_size + k for k in shuffler.sample(range(group_size), group_size)]
             for g in shuffler.sample(range(len(groups)), len(groups))]
    permuted = antisd.group_advantages([float(groups[i // group_size][i % group_size]) for row in order for i in row],
                                       group_size).double()
    assert torch.allclose(permuted, advantages[[i for row in order for i in row]], atol=1e-6)


# -----------------------------------------------------------------------------
# Step 4. scoring: teacher prompts and antisd.score (alignment under padding)

def test_teacher_never_sees_the_rollout_itself():
    texts = ["attempt zero \\boxed{1}", "attempt one \\boxed{2}", "attempt two \\boxed{2}", "attempt three"]
    rewards = [0.0, 1.0, 1.0, 0.0]
    seen = {i: set() for i in range(4)}
    rng = random.Random(0)
    for _ in range(50):
        for i in range(4):
            prompt = antisd.build_teacher_prompt("What is 1+1?", i, rewards, texts, "ref solution", "2", rng)
            seen[i] |= {j for j in range(4) if texts[j] in prompt}
            assert texts[i] not in prompt
            assert ("Your answer is correct." in prompt) == (rewards[i] == 1)
            assert ("Your answer is incorrect." in prompt) == (rewards[i] == 0)
    assert seen[0] == {1, 2} and seen[3] == {1, 2}   # both correct siblings get chosen
    assert seen[1] == {2} and seen[2] == {1}


def test_teacher_falls_back_to_reference_solution_then_gold():
    texts = ["only correct one \\boxed{2}", "wrong \\boxed{3}"]
    rng = random.Random(0)
    own = antisd.build_teacher_prompt("P", 0, [1.0, 0.0], texts, "the reference solution", "2", rng)
    assert "the reference solution" in own and texts[0] not in own
    wrong = antisd.build_teacher_prompt("P", 1, [1.0, 0.0], texts, "the reference solution", "2", rng)
    assert texts[0] in wrong
    no_ref = antisd.build_teacher_prompt("P", 0, [0.0, 0.0], texts, None, "2", rng)
    assert "\\boxed{2}" in no_ref


def test_sibling_thinking_is_removed_and_template_matches_method():
    texts = ["<think>secret scratch work</think>\n\nclean \\boxed{2}", "x"]
    prompt = antisd.build_teacher_prompt("What is 1+1?", 1, [1.0, 0.0], texts, None, "2", random.Random(0))
    assert "secret scratch work" not in prompt
    assert prompt == (antisd.student_message("What is 1+1?")
                      + "\nYour previous attempt:\n\nclean \\boxed{2}\n\n"
                      + "\nPrevious assessment: Your answer is incorrect.\n"
                      + "\n\nNow solve this problem step by step.\n")


def test_thinking_is_removed_from_a_sibling_even_without_an_opener():
    # templates that open <think> in the prompt (Qwen3 *-Thinking-2507) leave only </think> in the response
    assert antisd.strip_thinking("long secret reasoning\n</think>\n\nclean \\boxed{2}") == "clean \\boxed{2}"
    assert antisd.strip_thinking("<think>a</think> b <think>c</think>\nd") == "d"
    assert antisd.strip_thinking("no thinking \\boxed{2}") == "no thinking \\boxed{2}"
    prompt = antisd.build_teacher_prompt("1+1?", 1, [1.0, 0.0], ["scratch work</think>\n\nso \\boxed{2}", "x"],
                                         None, "2", random.Random(0))
    assert "scratch work" not in prompt and "so \\boxed{2}" in prompt


def test_only_the_solution_is_truncated_never_the_problem(tiny):
    _, tokenizer = tiny
    problem = "A very long problem statement. " * 200
    solution = "step " * 2000
    prompt = antisd.build_teacher_prompt(problem, 0, [0.0], ["x"], solution, "1", random.Random(0),
                                         tokenizer, max_solution_tokens=40)
    assert problem in prompt
    shown = prompt.split("Your previous attempt:\n\n")[1].split("\n\n\nPrevious assessment")[0]
    assert len(tokenizer(shown, add_special_tokens=False)["input_ids"]) == 40
    assert solution.startswith(shown)


def test_a_solution_over_the_teachers_budget_keeps_its_first_tokens(tiny):
    _, tokenizer = tiny
    solution = " ".join(f"w{k}" for k in range(300))   # no two stretches alike: its head is not its tail
    assert len(tokenizer(solution, add_special_tokens=False)["input_ids"]) == len(solution)  # a token per byte
    assert antisd.truncate_to_tokens(tokenizer, solution, 40) == solution[:40]
    assert antisd.truncate_to_tokens(tokenizer, solution, len(solution)) == solution
    prompt = antisd.build_teacher_prompt("What is 1+1?", 0, [0.0], ["x"], solution, "2", random.Random(0),
                                         tokenizer, max_solution_tokens=40)
    shown = prompt.split("Your previous attempt:\n\n")[1].split("\n\n\nPrevious assessment")[0]
    assert shown == solution[:40] == "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w1"


# -----------------------------------------------------------------------------
# Step 4, scoring alignment: batched, padded scoring == one unpadded sequence at a time

def one_at_a_time_logp(model, prompt, response, temperature=1.0):
    """log p(response_j | prompt, response_<j) at a temperature, and the entropy of that distribution, from a
    single unpadded forward, float64 softmax."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature    # [R, V]
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def check_alignment(model, tokenizer, problems, responses, enable_thinking):
    student = [antisd.student_prompt_ids(tokenizer, p, enable_thinking) for p in problems]
    teacher_messages = [antisd.build_teacher_prompt(p, 0, [0.0], ["x"], "The solution is 42 because of "
                                                    + "reasons " * (3 * k), "42", random.Random(0))
                        for k, p in enumerate(problems)]
    teacher = [antisd.render_prompt(tokenizer, m, enable_thinking) for m in teacher_messages]
    assert len({len(p) for p in student}) > 1 and len({len(r) for r in responses}) > 1  # real padding
    stats = antisd.score(model, student, teacher, responses, tokenizer.pad_token_id,
                         micro_batch_size=len(responses), temperature=1.0)
    for i, response in enumerate(responses):
        s_ref, h_ref = one_at_a_time_logp(model, student[i], response)
        t_ref, th_ref = one_at_a_time_logp(model, teacher[i], response)
        n = len(response)
        assert torch.allclose(stats["logp"][i, :n].double(), s_ref, atol=1e-5)
        assert torch.allclose(stats["t_logp"][i, :n].double(), t_ref, atol=1e-5)
        assert torch.allclose(stats["entropy"][i, :n].double(), h_ref, atol=1e-4)
        assert torch.allclose(stats["t_entropy"][i, :n].double(), th_ref, atol=1e-4)
        assert torch.all(stats["logp"][i, n:] == 0)   # nothing scored past the end
    return student, teacher


def test_the_loop_scores_student_and_teacher_at_the_temperature_flag():
    """Step 4 of one loop step at --temperature 1.7: every student and teacher log-prob and entropy is
    the one of the distribution at T = 1.7, from one unpadded forward per rollout. At T = 1 they differ."""
    model, tokenizer = sharp_tiny_model()
    done, _ = one_loop_step(model, tokenizer, "--temperature", "1.7")
    moved = 0.0
    with torch.no_grad():
        for i, response in enumerate(done.responses):
            n = len(response)
            for prompts, logp, entropy in ((done.student_prompts, "logp", "entropy"),
                                           (done.teacher_prompts, "t_logp", "t_entropy")):
                expected_logp, expected_entropy = one_at_a_time_logp(model, prompts[i], response, temperature=1.7)
                assert torch.allclose(done.stats[logp][i, :n].double(), expected_logp, atol=1e-5), (i, logp)
                assert torch.allclose(done.stats[entropy][i, :n].double(), expected_entropy, atol=1e-4), (i, entropy)
                moved = max(moved, float((one_at_a_time_logp(model, prompts[i], response)[0] - expected_logp).abs().max()))
    assert moved > 0.1


@torch.no_grad()
def test_teacher_scores_exactly_the_sampled_tokens_under_left_padding(tiny, token_stats_path):
    model, tokenizer = tiny
    problems = ["What is 1+1?", "A much longer problem: compute 17 * 23 and then add 5 to it.", "2*3?"]
    torch.manual_seed(0)
    samples = antisd.generate(model, tokenizer,
                              [antisd.student_prompt_ids(tokenizer, p, False) for p in problems],
                              max_new_tokens=12, temperature=1.0, top_p=1.0, batch_size=3)
    responses = [ids for ids, _ in samples]
    responses[1] = responses[1][:3]   # make the lengths differ for certain
    check_alignment(model, tokenizer, problems, responses, enable_thinking=False)


@pytest.mark.skipif(not QWEN3_TOKENIZER.exists(), reason="needs ../shared/hub/Qwen3-tokenizer")
@pytest.mark.parametrize("enable_thinking", [False, True])
@torch.no_grad()
def test_alignment_with_the_real_qwen3_tokenizer(enable_thinking):
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(str(QWEN3_TOKENIZER))
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16)).eval()
    problems = ["What is 1+1?", "Let $x^2 = 49$ with $x > 0$. Find $x$.", "Compute $\\frac{3}{4} + \\frac{1}{4}$."]
    answers = ["<think>\nadd them\n</think>\n\nIt is \\boxed{2}.", "So \\boxed{7}.", "\\boxed{1}"]
    responses = [tokenizer(a, add_special_tokens=False)["input_ids"] + [151645] for a in answers]
    student, teacher = check_alignment(model, tokenizer, problems, responses, enable_thinking)
    # student and teacher prompts end in the same assistant header, thinking mode included
    tail = [151644, 77091, 198] + ([151667, 271, 151668, 271] if not enable_thinking else [])
    for s, t in zip(student, teacher):
        assert s[-len(tail):] == tail and t[-len(tail):] == tail
        assert s[-len(tail) - 1] == t[-len(tail) - 1] == 198   # "<|im_end|>\n" before it


# -----------------------------------------------------------------------------
# Step 5. the entropy gate (antisd.EntropyGate)

def test_gate_calibrates_then_switches_off_and_on():
    gate = antisd.EntropyGate(warmup=3, tau_ratio=0.9, lambda_max=0.5)
    # warm-up: lambda 0, H_warm = median(2.0, 1.0, 3.0) = 2.0, tau_down = 1.8
    assert [gate.update(h) for h in (2.0, 1.0, 3.0)] == [0.0, 0.0, 0.0]
    assert gate.h_warm == 2.0 and abs(gate.tau_down - 1.8) < 1e-12
    assert gate.update(1.85) == 0.5          # above tau_down: on
    assert gate.update(1.79) == 0.0          # below tau_down: off
    assert gate.update(1.95) == 0.0          # between thresholds: stays off (hysteresis)
    saved = json.loads(json.dumps(gate.state_dict()))
    assert gate.update(2.0) == 0.5           # back at H_warm: on
    assert gate.update(1.81) == 0.5          # between thresholds: stays on
    restored = antisd.EntropyGate(warmup=3, tau_ratio=0.9, lambda_max=0.5)
    restored.load_state_dict(saved)
    assert [restored.update(h) for h in (2.0, 1.81, 1.0)] == [0.5, 0.5, 0.0]


def test_gate_closes_strictly_below_tau_down_and_reopens_at_h_warm():
    gate = antisd.EntropyGate(warmup=1, tau_ratio=0.5, lambda_max=0.5)
    assert gate.update(2.0) == 0.0 and gate.tau_down == 1.0    # exact in binary
    assert [gate.update(h) for h in (1.0, 0.999, 1.999, 2.0)] == [0.5, 0.0, 0.0, 0.5]


def test_the_median_of_an_even_count_is_the_mean_of_the_two_middle_values():
    assert antisd.median(torch.tensor([4.0, 1.0, 3.0, 2.0])) == 2.5
    assert antisd.median(torch.tensor([[3.0], [1.0], [2.0]])) == 2.0
    gate = antisd.EntropyGate(warmup=2, tau_ratio=0.5)
    gate.update(1.0), gate.update(2.0)
    assert gate.h_warm == 1.5 and gate.tau_down == 0.75


def step_args(*flags):
    return antisd.get_args(["--model", "tiny-random", *flags])


def hand_made_stats(t_entropy=(1.0, 2.0, 10.0, 3.0)):
    """Two rollouts of 3 and 1 tokens. Values past each end are junk that must never count."""
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -7.0, -7.0]])
    t_logp = torch.tensor([[-0.5, -4.0, -0.5], [-1.0, 9.0, 9.0]])
    h = torch.tensor([[t_entropy[0], t_entropy[1], t_entropy[2]], [t_entropy[3], 99.0, 99.0]])
    student_entropy = torch.tensor([[5.0, 5.0, 5.0], [5.0, 0.0, 0.0]])
    return {"logp": logp, "t_logp": t_logp, "t_entropy": h, "entropy": student_entropy}, mask


def test_gate_follows_the_teachers_median_entropy_and_is_off_during_warm_up():
    args = step_args("--gate-warmup", "2")
    gate = antisd.EntropyGate(args.gate_warmup, args.tau_ratio, args.lambda_max)
    seq_adv = torch.zeros(2)
    # teacher entropies 1, 2, 10, 3 on the response tokens (99 past the end): median (2 + 3) / 2 = 2.5;
    # the student's entropy is 5 everywhere, so a gate reading it would never close
    calm, mask = hand_made_stats()
    collapsed, _ = hand_made_stats(t_entropy=(0.5, 1.0, 1.0, 2.0))        # median 1.0 < 0.93 * 2.5
    logged = []
    for stats in (calm, calm, calm, collapsed):
        out = antisd.gate_and_advantages(stats, mask, seq_adv, gate, args)
        logged.append((out["gate_signal"], out["teacher_entropy_median"], out["gate_on"], out["lam"]))
    assert logged == [(2.5, 2.5, False, 0.0), (2.5, 2.5, False, 0.0), (2.5, 2.5, True, 0.5), (1.0, 1.0, False, 0.0)]
    assert gate.h_warm == 2.5
    # --gate perplexity: exp(-mean teacher log-prob of the sampled tokens), M8
    out = antisd.gate_and_advantages(calm, mask, seq_adv, None, step_args("--gate", "perplexity"))
    assert abs(out["gate_signal"] - math.exp((0.5 + 4.0 + 0.5 + 1.0) / 4)) < 1e-6


def test_perplexity_gate_reopens_only_at_1_07_times_its_warm_up_value():
    # M8: the official code's gate reopens at 1.07 x the warm-up perplexity; the entropy gate at 1.0 x
    gate = antisd.make_gate(step_args("--gate", "perplexity", "--gate-warmup", "1"))
    gate.update(10.0)                           # warm-up: H_warm = 10, tau_down = 9.3
    assert gate.update(9.0) == 0.0              # below tau_down: closes
    assert gate.update(10.6) == 0.0             # back above H_warm but below 10.7: stays closed
    assert gate.update(10.8) == gate.lambda_max  # above 10.7: reopens
    entropy_gate = antisd.make_gate(step_args("--gate-warmup", "1"))
    entropy_gate.update(10.0)
    entropy_gate.update(9.0)
    assert entropy_gate.update(10.0) == entropy_gate.lambda_max
    assert antisd.make_gate(step_args("--method", "grpo")) is None
    assert antisd.make_gate(step_args("--gate", "none")) is None


# -----------------------------------------------------------------------------
# Step 6. per-token advantages (antisd_advantage, token_advantages, gate_and_advantages)

def test_antisd_advantage_matches_method_values_and_bound():
    u = torch.tensor([-20.0, -1.0, 0.0, 1.0, 5.0], dtype=torch.float64)
    expected = torch.tensor([0.346574, 0.189943, 0.0, -0.310057, -2.156784], dtype=torch.float64)
    assert torch.allclose(antisd.antisd_advantage(u), expected, atol=1e-6)
    very_negative = antisd.antisd_advantage(torch.tensor([-1e4, -50.0], dtype=torch.float64))
    assert torch.all(very_negative <= 0.5 * math.log(2) + 1e-12)
    assert abs(float(very_negative[0]) - 0.5 * math.log(2)) < 1e-12


@example(20.0, 20.000000001)
@given(st.floats(-60, 60), st.floats(-60, 60))
def test_minus_phi_is_bounded_decreasing_of_the_opposite_sign_and_minus_u_over_4_near_0(u, v):
    minus_phi = lambda x, dtype=torch.float64: float(antisd.antisd_advantage(torch.tensor(x, dtype=dtype)))
    assert minus_phi(u) <= math.log(2) / 2                                       # M4's bound
    low, high = min(u, v), max(u, v)
    assert minus_phi(low, torch.float32) >= minus_phi(high, torch.float32)      # decreasing, in training's float32
    # in float64, torch's softplus returns u itself above u = 20, 5e-10 below log1p(exp(20)): -phi steps up there
    assert minus_phi(low) >= minus_phi(high) - 1e-9
    assert minus_phi(u) * u <= 0 and (abs(u) < 1e-6 or minus_phi(u) != 0)       # the sign of -u
    if abs(u) < 1e-2:  # -phi(u) = -u/4 - u^2/16 + O(u^4)
        assert abs(minus_phi(u) + u / 4) <= 1.01 * u * u / 16 + 1e-15


def test_antisd_term_has_the_opposite_sign_of_default_sd():
    u = torch.linspace(-6, 6, 25)
    seq_adv = torch.zeros(1)
    antisd_adv, _ = antisd.token_advantages(seq_adv, u[None], 0.5, "antisd", "jsd", "add")
    sd_adv, _ = antisd.token_advantages(seq_adv, u[None], 0.5, "sd", "jsd", "add")
    nonzero = u != 0
    assert torch.all(torch.sign(antisd_adv[0][nonzero]) == -torch.sign(sd_adv[0][nonzero]))
    rkl, _ = antisd.token_advantages(seq_adv, u[None], 0.5, "antisd", "rkl", "add")
    assert torch.allclose(rkl[0], -0.5 * u)
    grpo, _ = antisd.token_advantages(torch.tensor([1.5]), u[None], 0.5, "grpo", "jsd", "add")
    assert torch.all(grpo == 1.5)
    mult, a = antisd.token_advantages(torch.tensor([2.0]), u[None], 0.5, "antisd", "jsd", "mult")
    assert torch.allclose(mult[0], 2.0 * (1 + 0.5 * a[0]))


def official_term_by_hand(u_rows):
    """M8's term, one token at a time in float64: u_rows is a list of lists (the response tokens)."""
    flat = [u for row in u_rows for u in row]
    mean_u = sum(flat) / len(flat)
    sigma = math.sqrt(sum((u - mean_u) ** 2 for u in flat) / (len(flat) - 1))
    out = []
    for row in u_rows:
        kept = [abs(u) <= 2 * sigma for u in row]
        a = [-0.5 * (math.log1p(math.exp(max(-5.0, min(5.0, u)))) - math.log(2)) for u in row]
        values = [x for x, k in zip(a, kept) if k]
        mean = sum(values) / len(values) if values else 0.0
        std = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out.append([max(-5.0, min(5.0, (x - mean) / (std + 1e-6))) if k else 0.0 for x, k in zip(a, kept)])
    return out


def test_official_term_matches_a_token_by_token_float64_reference():
    # row 0: one token far out (|u| > 2 sigma, zeroed) and u past +-5 (clamped); row 1: forty equal
    # tokens and one other, whose z-score (40 / sqrt(41) = 6.2) is clipped to 5; row 2: one token
    rows = [[0.3, -1.2, -60.0, 0.8, -0.1, 7.0, 6.0], [0.2] * 40 + [-0.9], [-0.4]]
    width = max(len(row) for row in rows)
    u = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        u[i, :len(row)], mask[i, :len(row)] = torch.tensor(row, dtype=torch.float64), True
    u[~mask] = 123.0  # junk past each end never counts: token_advantages receives u * mask, but this must not matter
    got = antisd.official_antisd_term(u, mask)
    expected = official_term_by_hand(rows)
    assert got[0, 2] == 0 and got[1, 40] == 5.0 and got[2, 0] == 0  # the three edge cases did occur
    for i, row in enumerate(expected):
        assert torch.allclose(got[i, :len(row)], torch.tensor(row, dtype=torch.float64), atol=1e-9), i
    assert torch.all(got[~mask] == 0)
    # through the loop's path: lambda * term on top of A_seq, and the paper's term is the default
    stats, small_mask = hand_made_stats()
    official = antisd.gate_and_advantages(stats, small_mask, torch.tensor([1.0, -1.0]), None,
                                          step_args("--term", "official", "--gate", "none"))
    by_hand = official_term_by_hand([[0.5, -2.0, 0.0], [2.0]])
    assert abs(float(official["advantages"][0, 0]) - (1.0 + 0.5 * by_hand[0][0])) < 1e-6
    assert abs(float(official["a"][0, 1]) - by_hand[0][1]) < 1e-6 and float(official["a"][1, 0]) == 0.0
    paper = antisd.gate_and_advantages(stats, small_mask, torch.tensor([1.0, -1.0]), None, step_args("--gate", "none"))
    assert abs(float(paper["a"][1, 0]) - (-0.5 * (math.log1p(math.exp(2.0)) - math.log(2)))) < 1e-6


def test_continuous_lambda_is_per_rollout_from_the_teachers_perplexity_after_the_warm_up():
    args = step_args("--term", "official", "--gate", "perplexity", "--lambda-form", "continuous", "--gate-warmup", "1")
    gate = antisd.make_gate(args)
    stats, mask = hand_made_stats()
    seq_adv = torch.tensor([1.0, -1.0])
    warm = antisd.gate_and_advantages(stats, mask, seq_adv, gate, args)   # warm-up: lambda 0, A_seq alone
    assert warm["lam"] == 0.0 and torch.equal(warm["advantages"], torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]]))
    # by hand: the batch perplexity exp(-(-0.5 - 4 - 0.5 - 1) / 4) = exp(1.5) is the warm-up value, tau = 0.93 of it;
    # rollout 0's perplexity is exp(5/3), rollout 1's exp(1)
    tau = 0.93 * math.exp(1.5)
    by_hand = [min(0.5, max(0.0, 0.2 * math.log(min(3.0, max(0.5, math.exp(x) / tau))))) for x in (5 / 3, 1.0)]
    assert by_hand[0] > 0 and by_hand[1] == 0.0  # rollout 1's perplexity is below tau: no term
    out = antisd.gate_and_advantages(stats, mask, seq_adv, gate, args)
    term = official_term_by_hand([[0.5, -2.0, 0.0], [2.0]])
    for i, row in enumerate(term):
        for t, a in enumerate(row):
            assert abs(float(out["advantages"][i, t]) - (float(seq_adv[i]) + by_hand[i] * a)) < 1e-6, (i, t)
    assert abs(out["lam"] - sum(by_hand) / 2) < 1e-6
    # a perplexity far above tau is capped at 0.2 log 3, and lambda_max caps that in turn
    assert abs(float(antisd.continuous_lambda(torch.tensor([[-9.0]]), torch.tensor([[True]]), 1.0, 0.5)) - 0.2 * math.log(3)) < 1e-6
    assert float(antisd.continuous_lambda(torch.tensor([[-9.0]]), torch.tensor([[True]]), 1.0, 0.1)) == pytest.approx(0.1)


def test_step_advantages_use_u_as_teacher_minus_student_log_prob():
    stats, mask = hand_made_stats()
    seq_adv = torch.tensor([1.0, -1.0])
    # u = t - s on the 4 response tokens, by hand: 0.5, -2.0, 0.0 | 2.0
    u_by_hand = {(0, 0): 0.5, (0, 1): -2.0, (0, 2): 0.0, (1, 0): 2.0}
    terms = {"antisd": lambda u: -0.5 * (math.log1p(math.exp(u)) - math.log(2)),   # -phi(u), M4
             "sd": lambda u: u}                                                        # +u, M3
    for method, term in terms.items():
        out = antisd.gate_and_advantages(stats, mask, seq_adv, None, step_args("--method", method, "--gate", "none"))
        assert out["lam"] == 0.5 and out["gate_on"] and out["jsd_weight"] == 0.0
        for (i, t), u in u_by_hand.items():
            assert abs(float(out["u"][i, t]) - u) < 1e-6
            assert abs(float(out["advantages"][i, t]) - (float(seq_adv[i]) + 0.5 * term(u))) < 1e-6, (method, i, t)
        assert torch.all(out["u"][~mask] == 0) and torch.all(out["advantages"][~mask] == 0)
    grpo = antisd.gate_and_advantages(None, mask, seq_adv, None, step_args("--method", "grpo"))
    assert grpo["lam"] == 0.0 and not grpo["gate_on"]
    assert torch.equal(grpo["advantages"], torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]]))


def test_full_estimator_ascends_the_jsd_with_weight_lambda():
    stats, mask = hand_made_stats()
    seq_adv = torch.tensor([1.0, -1.0])
    out = antisd.gate_and_advantages(stats, mask, seq_adv, None, step_args("--estimator", "full", "--gate", "none"))
    # policy_gradient's loss is surrogate - jsd_weight * JSD: a positive weight ascends the JSD (M4)
    assert out["jsd_weight"] == 0.5 and out["a"] is None
    assert torch.equal(out["advantages"], torch.tensor([[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]]))


def test_full_estimator_has_no_jsd_term_during_warm_up_or_while_the_gate_is_off():
    args = step_args("--estimator", "full", "--gate-warmup", "1")
    gate = antisd.make_gate(args)
    seq_adv = torch.tensor([0.5, -0.5])
    stats, mask = hand_made_stats(t_entropy=(4.0, 4.0, 4.0, 4.0))
    assert antisd.gate_and_advantages(stats, mask, seq_adv, gate, args)["jsd_weight"] == 0.0   # warm-up
    assert antisd.gate_and_advantages(stats, mask, seq_adv, gate, args)["jsd_weight"] == args.lambda_max
    stats, mask = hand_made_stats(t_entropy=(1.0, 1.0, 1.0, 1.0))  # the teacher's entropy collapsed
    assert antisd.gate_and_advantages(stats, mask, seq_adv, gate, args)["jsd_weight"] == 0.0


# -----------------------------------------------------------------------------
# Step 7. the update (policy_loss, policy_gradient, MasterAdamW)

def test_loss_is_the_batch_token_mean_of_the_clipped_surrogate():
    new = torch.tensor([[0.0, -1.0, -2.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1.5, -1.0], [-0.5, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 2.0, -1.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss, clipped = antisd.policy_loss(new, old, adv, mask, total_tokens=4, clip=0.2)
    ratios = [1.0, math.exp(0.5), math.exp(-1.0), 1.0]
    advs = [1.0, 2.0, -1.0, 3.0]
    expected = -sum(min(r * a, min(max(r, 0.8), 1.2) * a) for r, a in zip(ratios, advs)) / 4
    assert abs(loss.item() - expected) < 1e-6
    assert int(clipped) == 2


def test_clip_fraction_counts_only_tokens_where_the_clip_binds():
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    mask = torch.ones_like(advantages, dtype=torch.bool)
    loss, binding = antisd.policy_loss(ratios.log(), torch.zeros_like(ratios), advantages, mask, 5, clip=0.2)
    # min() keeps 1.2 * 1 (clipped), 1.5 * -1, 0.5 * 1, 0.8 * -1 (clipped), 1.1 * 1
    assert int(binding) == 2
    assert abs(loss.item() - -(1.2 - 1.5 + 0.5 - 0.8 + 1.1) / 5) < 1e-6


def fixed_batch(tokenizer, seed=0):
    g = random.Random(seed)
    prompts = [antisd.student_prompt_ids(tokenizer, f"What is {k}+{k}?" + " pad" * g.randint(0, 5), False) for k in range(4)]
    responses = [[g.randrange(0, 255) for _ in range(g.randint(2, 9))] + [tokenizer.eos_token_id] for _ in range(4)]
    lengths = torch.tensor([len(r) for r in responses])
    mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    advantages = torch.randn(4, int(lengths.max()), generator=torch.Generator().manual_seed(seed)) * mask
    return prompts, responses, advantages, mask


def test_gradient_does_not_depend_on_micro_batch_size(tiny, token_stats_path):
    model, tokenizer = tiny
    prompts, responses, advantages, mask = fixed_batch(tokenizer)
    old_logp = antisd.score(model, prompts, None, responses, tokenizer.pad_token_id, 4, 1.0)["logp"] - 0.05 * mask
    grads = []
    for micro_batch_size in (1, 4):
        model.zero_grad(set_to_none=True)
        loss, _ = antisd.policy_gradient(model, prompts, responses, advantages, mask, old_logp,
                                         tokenizer.pad_token_id, micro_batch_size, clip=0.2, temperature=1.0)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    assert grads[0].norm() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_full_estimator_gradient_is_the_exact_jsd_gradient(tiny, token_stats_path):
    model, tokenizer = tiny
    prompts, responses, _, mask = fixed_batch(tokenizer, seed=3)
    teacher = [antisd.render_prompt(tokenizer, antisd.build_teacher_prompt(
        f"What is {k}+{k}?", 0, [0.0, 1.0], ["x", f"\\boxed{{{2 * k}}}"], None, str(2 * k), random.Random(0)), False)
        for k in range(4)]
    model.zero_grad(set_to_none=True)
    antisd.policy_gradient(model, prompts, responses, torch.zeros(mask.shape), mask, None, tokenizer.pad_token_id,
                           2, 0.2, 1.0, teacher_prompts=teacher, jsd_weight=0.5)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    # reference: one unpadded sequence at a time, JSD in float64 over the whole vocabulary,
    # loss = -0.5 * (sum of JSD over all tokens) / (token count), teacher under stop-gradient
    model.zero_grad(set_to_none=True)
    total = int(mask.sum())
    for prompt, teacher_prompt, response in zip(prompts, teacher, responses):
        student_logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double()
        with torch.no_grad():
            teacher_logits = model(input_ids=torch.tensor([teacher_prompt + response])).logits[0, len(teacher_prompt) - 1:-1].double()
        logp, logq = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
        logm = torch.logaddexp(logp, logq) - math.log(2)
        jsd = 0.5 * (logq.exp() * (logq - logm)).sum(-1) + 0.5 * (logp.exp() * (logp - logm)).sum(-1)
        (-0.5 * jsd.sum() / total).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    assert expected.norm() > 0
    assert torch.allclose(got.double(), expected.double(), rtol=1e-3, atol=1e-8), (got.double() - expected).norm() / expected.norm()


def test_policy_gradient_raises_the_probability_of_rewarded_tokens():
    model, tokenizer = tiny_tasks.build_tiny(seed=1)
    model.train()
    prompt = antisd.student_prompt_ids(tokenizer, "Say a digit.", False)
    digits = set(tokenizer("0123456789", add_special_tokens=False)["input_ids"])
    assert len(digits) == 10

    def digit_probability():
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
        return float(logp[sorted(digits)].exp().sum())

    optimizer = antisd.MasterAdamW(model, lr=3e-3)
    before = digit_probability()
    torch.manual_seed(0)
    for _ in range(6):
        samples = antisd.generate(model, tokenizer, [prompt] * 128, 1, 1.0, 1.0, 128)
        responses = [ids for ids, _ in samples]
        rewards = [float(r[0] in digits) for r in responses]
        seq_adv = antisd.group_advantages(rewards, group_size=128)
        mask = torch.ones(128, 1, dtype=torch.bool)
        antisd.policy_gradient(model, [prompt] * 128, responses, seq_adv[:, None], mask, None,
                               tokenizer.pad_token_id, 32, 0.2, 1.0)
        optimizer.clip_gradients(1.0)
        optimizer.step()
    after = digit_probability()
    assert after > 2 * before, (before, after)


def test_bf16_weights_still_move_with_a_tiny_learning_rate():
    def train(optimizer_step, layer):
        before = layer.weight.detach().float().clone()
        for _ in range(60):
            layer.weight.grad = torch.ones_like(layer.weight)
            optimizer_step()
        return float((layer.weight.detach().float() - before).abs().max())

    naive = torch.nn.Linear(4, 4, bias=False).bfloat16()
    torch.nn.init.constant_(naive.weight, 0.01)
    plain_adamw = torch.optim.AdamW(naive.parameters(), lr=1e-6, weight_decay=0.0)
    # the failure being prevented: 60 steps of ~1e-6 each vanish in bf16 (spacing at 0.01 is 6e-5)
    assert train(plain_adamw.step, naive) == 0.0
    layer = torch.nn.Linear(4, 4, bias=False).bfloat16()
    torch.nn.init.constant_(layer.weight, 0.01)
    master = antisd.MasterAdamW(layer, lr=1e-6)
    assert train(lambda: (master.clip_gradients(1e9), master.step()), layer) > 3e-5


def test_gradient_clipping_of_bf16_weights_acts_on_the_float32_masters():
    model, tokenizer = tiny_tasks.build_tiny(seed=0)
    model = model.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in params)
    ids = torch.tensor([antisd.student_prompt_ids(tokenizer, "What is 2+2?", False)])
    model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
    grads = [p.grad.double().clone() for p in params]     # bf16 gradients, exactly representable in float64
    true_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    assert true_norm > 0
    optimizer = antisd.MasterAdamW(model, lr=1e-3)
    max_norm = true_norm / 4
    returned = optimizer.clip_gradients(max_norm)
    assert returned == pytest.approx(true_norm, rel=1e-5)
    assert all(p.grad is None for p in params)            # the gradients moved onto the masters
    masters = [m.grad.double() for m in optimizer.master]
    assert all(m.dtype == torch.float32 for m in optimizer.master)
    assert math.sqrt(sum(float(g.pow(2).sum()) for g in masters)) == pytest.approx(max_norm, rel=1e-5)
    for g, m in zip(grads, masters):                      # the same direction: every gradient scaled by 1/4
        torch.testing.assert_close(m, g / 4, rtol=1e-5, atol=1e-12)


def test_master_weights_survive_a_save_and_load_exactly():
    def bf16_layer():
        torch.manual_seed(0)
        return torch.nn.Linear(8, 8).bfloat16()

    def train(layer, optimizer, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            for p in layer.parameters():
                p.grad = torch.randn(p.shape, generator=g).bfloat16()
            optimizer.clip_gradients(1.0)
            optimizer.step()

    straight = bf16_layer()
    straight_optimizer = antisd.MasterAdamW(straight, lr=1e-3)
    train(straight, straight_optimizer, 3, seed=1)
    saved = io.BytesIO()                        # as in a checkpoint: serialised at once
    torch.save(straight_optimizer.state_dict(), saved)
    train(straight, straight_optimizer, 3, seed=2)

    resumed = bf16_layer()                      # fresh bf16 weights: the masters must come from the save
    resumed_optimizer = antisd.MasterAdamW(resumed, lr=1e-3)
    saved.seek(0)
    resumed_optimizer.load_state_dict(torch.load(saved))
    train(resumed, resumed_optimizer, 3, seed=2)
    for a, b, ma, mb in zip(straight.parameters(), resumed.parameters(), straight_optimizer.master, resumed_optimizer.master):
        assert torch.equal(a, b) and torch.equal(ma, mb) and ma.dtype == torch.float32


def test_weights_made_non_finite_by_an_update_are_never_applied():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4).to(torch.bfloat16)
    layer.weight.data.fill_(1e4)
    before = layer.weight.detach().clone()
    optimizer = antisd.MasterAdamW(layer, lr=1e37)   # a finite lr that passes validation; 1e4 * lr * 0.01 overflows
    layer(torch.ones(1, 4, dtype=torch.bfloat16)).sum().backward()
    optimizer.clip_gradients(1.0)
    with pytest.raises(antisd.UserError, match="infinite or NaN .* lower --lr"):
        optimizer.step()
    assert torch.equal(layer.weight, before)


class RecordingOptimizer:
    """Stands in for MasterAdamW: keeps each epoch's gradients and applies nothing."""

    def __init__(self, model):
        self.model, self.grads = model, []

    def clip_gradients(self, max_norm):
        self.grads.append({name: p.grad.clone() for name, p in self.model.named_parameters() if p.grad is not None})
        return 0.0

    def step(self):
        self.zero_grad()

    def zero_grad(self):
        self.model.zero_grad(set_to_none=True)


class FakeRank:
    """One rank of a two-process world, without processes: its own rows, and sums that are local."""

    def __init__(self, rank, size=2):
        self.rank, self.size = rank, size

    rows = antisd.World.rows

    def sum(self, value):
        return value


def test_each_process_divides_its_loss_by_the_whole_batchs_token_count(tiny):
    # two ranks' losses and gradients, each from update_policy on its own rows, must add up to one
    # process's on all rows: each divides by the global token count, not by its own
    model, tokenizer = tiny
    args = step_args("--method", "grpo", "--micro-batch-size", "2")
    prompts = [antisd.student_prompt_ids(tokenizer, f"{k} + {k} = ?", False) for k in range(4)]
    responses = [tokenizer(text)["input_ids"] for text in ("1", "2 2 2 2 2 2", "3 3", "4 4 4 4 4 4 4 4 4")]
    mask = antisd.response_mask(responses, "cpu")
    terms = {"advantages": torch.tensor([[1.0], [-0.5], [0.25], [2.0]]).expand(mask.shape) * mask, "jsd_weight": 0.0}

    def run(world, rows):
        optimizer = RecordingOptimizer(model)
        update = antisd.update_policy(model, optimizer, prompts[rows], responses[rows], terms, mask, None, None,
                                      tokenizer.pad_token_id, world, args)
        return update["losses"][0], optimizer.grads[0]

    one_loss, one_grads = run(FakeRank(0, 1), slice(0, 4))
    (loss0, grads0), (loss1, grads1) = run(FakeRank(0), slice(0, 2)), run(FakeRank(1), slice(2, 4))
    assert int(mask[:2].sum()) != int(mask[2:].sum())  # else a per-rank count would pass too
    assert loss0 + loss1 == pytest.approx(one_loss, rel=1e-5)
    for name, grad in one_grads.items():
        torch.testing.assert_close(grads0[name] + grads1[name], grad, rtol=1e-4, atol=1e-7)


def test_the_loops_update_differentiates_the_log_probs_at_the_temperature_flag():
    """Step 7 of one loop step at --temperature 1.7: one epoch at the scoring weights has ratio 1, so its
    gradient is that of -sum A_t log p_T(y_t) / (batch tokens) at T = 1.7, by hand one unpadded sequence
    at a time. An update at T = 1 differentiates other log-probs, and with old log-probs scored at
    another temperature the ratio is not 1 and the clip binds."""
    model, tokenizer = sharp_tiny_model()
    done, grads = one_loop_step(model, tokenizer, "--temperature", "1.7")
    model.zero_grad(set_to_none=True)
    total_tokens = int(done.mask.sum())
    for i, (prompt, response) in enumerate(zip(done.student_prompts, done.responses)):
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double()
        logp = torch.log_softmax(logits / 1.7, dim=-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        (-(done.terms["advantages"][i, :len(response)].double() * logp).sum() / total_tokens).backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert done.update["clipped_tokens"] == 0 and torch.cat([g.flatten() for g in expected.values()]).norm() > 0
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7)


def test_an_epoch_with_a_non_finite_gradient_norm_is_not_applied(tiny):
    # a finite loss can still have an infinite gradient (an overflow in the backward): that epoch is
    # dropped, its gradients cleared, and no optimizer step is taken
    model, tokenizer = tiny
    args = step_args("--method", "grpo", "--micro-batch-size", "2", "--ppo-epochs", "2")
    prompts = [antisd.student_prompt_ids(tokenizer, "2 + 2", False)] * 2
    responses = [tokenizer("4")["input_ids"], tokenizer("5 5")["input_ids"]]
    mask = antisd.response_mask(responses, "cpu")
    terms = {"advantages": torch.tensor([[1.0], [-1.0]]).expand(mask.shape) * mask, "jsd_weight": 0.0}
    calls = []

    class InfiniteNorm:
        def clip_gradients(self, max_norm):
            calls.append("clip")
            return float("inf")

        def step(self):
            calls.append("step")

        def zero_grad(self):
            calls.append("zero_grad")
            model.zero_grad(set_to_none=True)

    update = antisd.update_policy(model, InfiniteNorm(), prompts, responses, terms, mask, None, None,
                                  tokenizer.pad_token_id, FakeRank(0, 1), args)
    assert calls == ["clip", "zero_grad"]  # the first epoch ends the update; nothing is applied
    assert update["epochs_applied"] == 0 and update["grad_norms"] == [float("inf")]
    assert all(p.grad is None for p in model.parameters())


# -----------------------------------------------------------------------------
# The whole loop: end to end, per-method runs, logged numbers

METRIC_KEYS = ["reward_mean", "groups_with_signal", "response_length_mean", "response_length_max",
               "truncation_rate", "u_mean", "u_std", "u_frac_negative", "u_p01", "u_p99", "sd_term_mean",
               "teacher_entropy_median", "student_entropy_median", "jsd_mean", "gate_signal", "lambda",
               "h_warm", "tau_down", "loss", "grad_norm", "clip_fraction", "seconds_generate",
               "seconds_score", "seconds_update", "generated_tokens_per_second", "peak_gpu_memory_gb"]


@pytest.mark.parametrize("method", ["antisd", "sd", "grpo"])
def test_cpu_demo_runs_end_to_end_and_its_checkpoint_loads(method, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    antisd.main(["--model", "tiny-random", "--dataset", "arith", "--steps", "3", "--method", method,
                 "--gate-warmup", "2", "--out-dir", str(tmp_path)])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for line in lines:
        for key in METRIC_KEYS:
            assert isinstance(line[key], (int, float)) and math.isfinite(line[key]), (key, line[key])
    if method == "antisd":
        assert [line["lambda"] for line in lines] == [0.0, 0.0, 0.5]   # warm-up of 2 steps
        assert lines[2]["teacher_entropy_median"] > 0 and lines[2]["jsd_mean"] > 0
    rollouts = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert rollouts and {"response", "reward", "most_negative_u", "most_positive_u"} <= set(rollouts[0])
    checkpoint = tmp_path / "checkpoint-3"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert model.config.vocab_size == 320 and tokenizer.eos_token == "<|im_end|>"


def test_full_estimator_and_evaluation_during_training_run_end_to_end(tmp_path):
    data_dir = tmp_path / "bench"
    data_dir.mkdir()
    (data_dir / "aime24.jsonl").write_text("".join(json.dumps({"id": i, "problem": f"What is {i}+{i}?", "answer": f"{2 * i:03d}"}) + "\n" for i in range(3)))
    antisd.main(["--model", "tiny-random", "--dataset", "arith", "--steps", "2", "--estimator", "full", "--gate-warmup", "1",
                 "--eval-every", "2", "--eval-benchmarks", "aime24", "--eval-n", "2", "--eval-limit", "2",
                 "--eval-data-dir", str(data_dir), "--out-dir", str(tmp_path / "run")])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and 0.0 <= lines[0]["eval/aime24/avg@2"] <= 1.0  # the starting model
    lines = lines[1:]
    assert not any(key.startswith("eval/") for key in lines[0])
    assert lines[1]["lambda"] == 0.5 and math.isfinite(lines[1]["loss"]) and lines[1]["grad_norm"] > 0
    for key in ["eval/aime24/avg@2", "eval/aime24/pass@2", "eval/aime24/maj@2", "eval/mean/avg@2"]:
        assert 0.0 <= lines[1][key] <= 1.0
    assert lines[1]["eval/aime24/problems"] == 2


def small_run(tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {k}+{k}?", "answer": str(2 * k)}) + "\n" for k in range(4)))
    return ["--model", "tiny-random", "--device", "cpu", "--dataset", str(data), "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "8", "--gate-warmup", "1"]


def test_ppo_epochs_log_the_mean_loss_all_clipped_tokens_and_partial_updates(tmp_path, monkeypatch):
    # scripted per-epoch (loss, clipped tokens); the real gradient is still computed and applied
    scripted = iter([(1.0, 3), (3.0, 5), (2.0, 1), (float("nan"), 2)])
    real = antisd.policy_gradient
    monkeypatch.setattr(antisd, "policy_gradient", lambda *a, **k: (real(*a, **k), next(scripted))[1])
    out_dir = tmp_path / "run"
    antisd.main(small_run(tmp_path) + ["--steps", "2", "--ppo-epochs", "2", "--out-dir", str(out_dir)])
    first, second = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = [line["response_length_mean"] * 8 for line in (first, second)]
    assert first["loss"] == 2.0 and abs(first["clip_fraction"] - 8 / (2 * tokens[0])) < 1e-12
    assert first["update_applied"] is True and first["epochs_applied"] == 2
    assert second["loss"] is None and abs(second["clip_fraction"] - 3 / (2 * tokens[1])) < 1e-12
    assert second["update_applied"] is True and second["epochs_applied"] == 1   # epoch 1 was applied
    # throughput of generation: response tokens (stop tokens included) per second of generate()
    for line, n in zip((first, second), tokens):
        assert "tokens_per_second" not in line
        assert abs(line["generated_tokens_per_second"] * line["seconds_generate"] - n) < 1e-6 * n
    assert first["gate_on"] == 0.0 and first["lambda"] == 0.0 and second["gate_on"] == 1.0   # warm-up of 1


def test_full_estimator_logs_no_per_token_term(tmp_path):
    antisd.main(small_run(tmp_path) + ["--steps", "1", "--estimator", "full", "--out-dir", str(tmp_path / "run")])
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert line["sd_term_mean"] is None and line["jsd_mean"] > 0


def test_in_loop_evaluation_samples_at_the_papers_eval_settings_not_the_training_ones(tmp_path, monkeypatch):
    real_evaluate, seen = evaluation.evaluate, []

    def spy(*call_args, **call_kwargs):
        bound = inspect.signature(real_evaluate).bind(*call_args, **call_kwargs)
        seen.append((bound.arguments["n"], bound.arguments["temperature"], bound.arguments["top_p"]))
        return real_evaluate(*call_args, **call_kwargs)

    monkeypatch.setattr(evaluation, "evaluate", spy)
    antisd.main(["--model", "tiny-random", "--dataset", "arith", "--steps", "1", "--eval-every", "1",
                 "--eval-benchmarks", "arith", "--eval-limit", "2", "--eval-n", "2", "--temperature", "1.3",
                 "--top-p", "0.9", "--out-dir", str(tmp_path / "run")])
    assert seen == [(2, 0.7, 0.95), (2, 0.7, 0.95)]  # step 0 and step 1, at M9's evaluation settings


@pytest.mark.parametrize("thinking", [True, False])
def test_the_loop_renders_student_and_teacher_prompts_with_the_same_thinking_mode(tmp_path, monkeypatch, thinking):
    real_render, seen = antisd.render_prompt, []

    def spy(tokenizer, message, enable_thinking):
        seen.append(("Your previous attempt" in message, enable_thinking))
        return real_render(tokenizer, message, enable_thinking)

    monkeypatch.setattr(antisd, "render_prompt", spy)
    antisd.main(["--model", "tiny-random", "--dataset", "arith", "--steps", "1", "--out-dir", str(tmp_path / "run")]
                + (["--enable-thinking"] if thinking else []))
    teacher = [mode for is_teacher, mode in seen if is_teacher]
    student = [mode for is_teacher, mode in seen if not is_teacher]
    assert len(teacher) == len(student) == 16  # 2 problems x 8 rollouts, each rendered once as each
    assert set(teacher) == set(student) == {thinking}


def parser_of_get_args(argv):
    """The argparse parser antisd.get_args builds for argv (a tiny model's defaults are set on it)."""
    parsers, real_parse_args = [], argparse.ArgumentParser.parse_args

    def keep(parser, *args, **kwargs):
        parsers.append(parser)
        return real_parse_args(parser, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", keep)
        antisd.get_args(argv)
    return parsers[-1]


def spy_on(monkeypatch, module, names):
    """Replaces each named function (or class) of module by one that calls it and records the call:
    {name: [{argument: value, ..., "returned": what it returned}, ...]}, in call order."""
    calls = {name: [] for name in names}
    for name in names:
        real = getattr(module, name)

        def spy(*args, _name=name, _real=real, _signature=inspect.signature(real), **kwargs):
            bound = _signature.bind(*args, **kwargs)
            bound.apply_defaults()
            returned = _real(*args, **kwargs)
            calls[_name].append({**bound.arguments, "returned": returned})
            return returned
        monkeypatch.setattr(module, name, spy)
    return calls


def called(seen, name, argument):
    """The value of `argument` in every recorded call of `name`; the function must have been called."""
    assert seen[name], f"{name} was never called"
    return [call[argument] for call in seen[name]]


# Where each setting of the command line is meant to arrive: the functions the loop calls with it, spied on
# during antisd.main
WIRED_TO = ["pick_device", "load_problems", "load_model", "ProblemStream", "MasterAdamW", "EntropyGate", "one_step",
            "render_prompt", "generate", "group_advantages", "score", "token_advantages", "official_antisd_term",
            "continuous_lambda", "policy_gradient", "save_checkpoint"]
WIRED_TO_EVAL = ["load_benchmark", "evaluate"]
# flags that a run of a few steps cannot show, each with the test that checks it
FLAGS_CHECKED_ELSEWHERE = {
    "resume": "test_resumed_run_ends_exactly_where_an_uninterrupted_run_does",   # continues --out-dir's run
}


def wiring_runs(tmp_path):
    """[(flags, {flag: check of the recorded calls})]: every flag of antisd.py gets a value other than its
    default in one of these runs, and is checked there. The methods' options exclude each other: four runs."""
    data_dir = tmp_path / "bench"
    data_dir.mkdir()
    write_jsonl(data_dir / "aime24.jsonl", [{"problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(3)])
    small = {"model": "tiny-random", "dataset": "arith", "device": "cpu", "steps": 2, "gate_warmup": 1,
             "prompts_per_step": 2, "group_size": 2, "micro_batch_size": 4, "max_new_tokens": 4}
    # 2 steps x 3 problems x 3 rollouts, warm-up 1 (the term is on at step 2), 2 epochs, evaluation at steps 0 and 2
    loop = {"model": "tiny-random", "dataset": "arith", "device": "cpu", "enable_thinking": True,
            "divergence": "rkl", "compose": "mult", "lambda_max": 0.3, "gate": "perplexity", "gate_warmup": 1,
            "tau_ratio": 0.9, "prompts_per_step": 3, "group_size": 3, "max_new_tokens": 5, "temperature": 1.3,
            "top_p": 0.9, "gen_batch_size": 4, "steps": 2, "lr": 2e-3, "clip": 0.1, "ppo_epochs": 2,
            "micro_batch_size": 3, "seed": 5, "eval_every": 2, "eval_benchmarks": "aime24", "eval_n": 2,
            "eval_limit": 2, "eval_data_dir": str(data_dir), "out_dir": str(tmp_path / "loop"), "save_every": 1}
    evaluated = lambda seen: [[p["problem"] for p in benchmarks["aime24"]] for benchmarks in called(seen, "evaluate", "benchmarks")]
    loop_checks = {
        "model": lambda seen: called(seen, "load_model", "name") == ["tiny-random"],
        "dataset": lambda seen: called(seen, "load_problems", "name") == ["arith"],
        "device": lambda seen: called(seen, "pick_device", "requested") == ["cpu"]
                               and called(seen, "load_model", "device") == [torch.device("cpu")],
        "enable_thinking": lambda seen: set(called(seen, "render_prompt", "enable_thinking")) == {True}   # student, teacher
                                        and set(called(seen, "evaluate", "enable_thinking")) == {True},
        "divergence": lambda seen: set(called(seen, "token_advantages", "divergence")) == {"rkl"},
        "compose": lambda seen: set(called(seen, "token_advantages", "compose")) == {"mult"},
        "lambda_max": lambda seen: called(seen, "EntropyGate", "lambda_max") == [0.3]
                                   and called(seen, "token_advantages", "lam") == [0.0, 0.3],
        "gate": lambda seen: called(seen, "EntropyGate", "reopen_ratio") == [1.07],    # perplexity's, M8
        "gate_warmup": lambda seen: called(seen, "EntropyGate", "warmup") == [1],
        "tau_ratio": lambda seen: called(seen, "EntropyGate", "tau_ratio") == [0.9],
        "prompts_per_step": lambda seen: [len(set(map(tuple, prompts))) for prompts in called(seen, "generate", "prompt_ids")] == [3, 3],
        "group_size": lambda seen: called(seen, "group_advantages", "group_size") == [3, 3] and all(
            set(collections.Counter(map(tuple, prompts)).values()) == {3} for prompts in called(seen, "generate", "prompt_ids")),
        "max_new_tokens": lambda seen: called(seen, "generate", "max_new_tokens") == [5, 5]
                                       and called(seen, "evaluate", "max_new_tokens") == [5, 5],
        "temperature": lambda seen: set(called(seen, "generate", "temperature")) == set(called(seen, "score", "temperature"))
                                    == set(called(seen, "policy_gradient", "temperature")) == {1.3},
        "top_p": lambda seen: set(called(seen, "generate", "top_p")) == {0.9},
        "gen_batch_size": lambda seen: set(called(seen, "generate", "batch_size")) == {4}
                                       and set(called(seen, "evaluate", "batch_size")) == {4},
        "steps": lambda seen: len(seen["one_step"]) == 2,
        "lr": lambda seen: [optimizer.optimizer.param_groups[0]["lr"] for optimizer in called(seen, "MasterAdamW", "returned")] == [2e-3],
        "clip": lambda seen: set(called(seen, "policy_gradient", "clip")) == {0.1},
        "ppo_epochs": lambda seen: len(seen["policy_gradient"]) == 2 * 2,
        "micro_batch_size": lambda seen: set(called(seen, "score", "micro_batch_size")) == {3}
                                         and set(called(seen, "policy_gradient", "micro_batch_size")) == {3},
        "seed": lambda seen: called(seen, "load_problems", "seed") == called(seen, "ProblemStream", "seed") == [5]
                             and set(called(seen, "evaluate", "seed")) == {5},
        "eval_every": lambda seen: len(seen["evaluate"]) == 2,                     # before step 1, after step 2
        "eval_benchmarks": lambda seen: called(seen, "load_benchmark", "name") == ["aime24"],
        "eval_n": lambda seen: set(called(seen, "evaluate", "n")) == {2},
        "eval_limit": lambda seen: called(seen, "load_benchmark", "limit") == [2]
                                   and evaluated(seen) == [["What is 0+0?", "What is 1+1?"]] * 2,
        "eval_data_dir": lambda seen: called(seen, "load_benchmark", "data_dir") == [str(data_dir)]
                                      and evaluated(seen)[0][0] == "What is 0+0?",
        "out_dir": lambda seen: set(called(seen, "save_checkpoint", "out_dir")) == {str(tmp_path / "loop")}
                                and len((tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()) == 3,
        "save_every": lambda seen: called(seen, "save_checkpoint", "step") == [1, 2],
    }
    return [
        (loop, loop_checks),
        ({**small, "term": "official", "lambda_form": "continuous", "gate": "perplexity", "out_dir": str(tmp_path / "official")},
         {"term": lambda seen: set(called(seen, "token_advantages", "term")) == {"official"}
                               and len(seen["official_antisd_term"]) == 2,
          "lambda_form": lambda seen: len(seen["continuous_lambda"]) == 1}),       # after the warm-up
        ({**small, "estimator": "full", "out_dir": str(tmp_path / "full")},
         {"estimator": lambda seen: called(seen, "policy_gradient", "jsd_weight") == [0.0, 0.5] and not seen["token_advantages"]}),
        ({**small, "method": "sd", "out_dir": str(tmp_path / "sd")},
         {"method": lambda seen: set(called(seen, "token_advantages", "method")) == {"sd"}}),
    ]


def test_every_flag_reaches_the_code_it_sets(tmp_path, monkeypatch):
    """Each flag of antisd.get_args (read from its parser, so a new flag cannot be missed) is set to another
    value than its default in a short run of antisd.main, and the functions meant to receive it are
    spied on to see that it arrived: the sampling, the scoring, the advantages, the gate, the update, the
    in-loop evaluation, the data and the checkpoints. Or the flag is listed with the test that checks it."""
    parser = parser_of_get_args(["--model", "tiny-random"])   # the defaults of a tiny-random run
    actions = {action.dest: action for action in parser._actions if not isinstance(action, argparse._HelpAction)}
    checked = set()
    for flags, checks in wiring_runs(tmp_path):
        argv = []
        for dest, value in flags.items():
            option = actions[dest].option_strings[0]
            argv += [option] if isinstance(actions[dest], argparse._StoreTrueAction) else [option, str(value)]
        with monkeypatch.context() as patch:
            seen = {**spy_on(patch, antisd, WIRED_TO), **spy_on(patch, evaluation, WIRED_TO_EVAL)}
            antisd.main(argv)
        for dest, check in checks.items():
            assert flags[dest] != parser.get_default(dest), f"{actions[dest].option_strings[0]} is set to its default"
            assert check(seen), f"{actions[dest].option_strings[0]} {flags[dest]} did not reach the code it sets"
            checked.add(dest)
    assert all(callable(globals().get(test)) for test in FLAGS_CHECKED_ELSEWHERE.values())
    unchecked = set(actions) - checked - set(FLAGS_CHECKED_ELSEWHERE)
    assert not unchecked, f"flags no test checks: {sorted(unchecked)} (add them to wiring_runs, or to FLAGS_CHECKED_ELSEWHERE)"


def test_step_metrics_are_hand_counts_of_the_steps_rollouts():
    args = step_args("--method", "grpo", "--group-size", "4", "--prompts-per-step", "2", "--micro-batch-size", "4")
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]   # one group with signal, one without
    responses = [[5] * n for n in (1, 2, 3, 4, 5, 6, 7, 8)]
    truncated = [False] * 6 + [True, True]
    mask = antisd.response_mask(responses, "cpu")
    terms = antisd.gate_and_advantages(None, mask, antisd.group_advantages(rewards, 4), None, args)
    update = {"losses": [0.25, 0.75], "grad_norms": [1.0, 3.0], "clipped_tokens": 9, "epochs_applied": 2}
    timer = antisd.PhaseTimer(torch.device("cpu"))
    for phase in ("generate", "score", "update"):
        with timer(phase):
            pass
    record = antisd.step_metrics(7, rewards, truncated, mask, None, terms, update, None, timer, args)
    assert record["step"] == 7
    assert record["reward_mean"] == 5 / 8
    assert record["groups_with_signal"] == 1 / 2
    assert record["response_length_mean"] == 36 / 8 and record["response_length_max"] == 8
    assert record["truncation_rate"] == 2 / 8
    assert record["loss"] == 0.5 and record["grad_norm"] == 2.0
    assert record["clip_fraction"] == 9 / (36 * 2)
    assert record["update_applied"] is True and record["epochs_applied"] == 2
    assert record["u_mean"] == 0.0 and record["lambda"] == 0.0 and record["gate_on"] == 0.0
    assert "deliberation_rate" not in record and "check_error_rate" not in record  # search only

    # the search task's two metrics: rollout i is of problem i // G, so each text is checked against its own boxes
    args.dataset = "search"
    boxes = [[3, 8, 6, 1, 5, 2, 7, 9, 4, 3, 1, 2], [6, 8, 3, 1, 5, 2, 7, 9, 4, 3, 1, 2]]   # C, then A holds 6
    batch = [{"problem": tiny_tasks.search_problem_text(values, 4, 10)} for values in boxes]
    right_for_first = "try A: 3+4=7 no. try B: 8+4=12 no. try C: 6+4=10 yes. The answer is \\boxed{C}."
    texts = [right_for_first] * 2 + ["The answer is \\boxed{E}."] * 2 + [right_for_first] + ["try A: 6+4=10 yes."] * 3
    record = antisd.step_metrics(7, rewards, truncated, mask, None, terms, update, None, timer, args, texts, batch)
    assert record["deliberation_rate"] == 6 / 8
    assert record["check_error_rate"] == 2 / 12  # rollout 4 is of the second problem, where A holds 6 and C 3


# -----------------------------------------------------------------------------
# antisd_kernels.py: the torch reference, the fused Triton kernels and the chunked lm_head, against float64

IGNORE = -100

# The Triton tests run on the CPU through the interpreter (or on a GPU when one is present and the
# interpreter is switched off). The interpreter only applies if TRITON_INTERPRET=1 was set before
# antisd_kernels.py was first imported (see the top of this file).
if antisd_kernels.INTERPRETED:
    DEVICE = "cpu"
elif antisd_kernels.HAS_TRITON and torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None
needs_triton = pytest.mark.skipif(DEVICE is None, reason="needs triton and either a GPU or " + NO_INTERPRETER)
# Compiled for a GPU, exp2 and log2 are the hardware's approximate ones (a few float32 ulps each, where
# the interpreter computes them exactly in numpy): the float32 parts of the value tolerances widen by
# this factor on a GPU. An estimate from those error bounds, not yet measured on a card.
APPROX = 4.0 if DEVICE == "cuda" else 1.0

# One vocabulary block per row where possible: the interpreter is slow per block, fast per element.
BLOCK_CAP = 65536


def block_for(V):
    return min(1 << (V - 1).bit_length(), BLOCK_CAP) if DEVICE == "cpu" else None


# -----------------------------------------------------------------------------
# antisd_kernels.py: independent float64 definition (deliberately not calling antisd_kernels.py)

def stats_float64(logits, targets, teacher_logits, beta, temperature):
    """Float64 brute force of the five statistics, differentiable through `logits`."""
    valid = targets != IGNORE
    idx = targets.clamp(min=0)[:, None]
    log_p = torch.log_softmax(logits.double() / temperature, dim=-1)
    p = log_p.exp()
    out = {"logp": log_p.gather(1, idx)[:, 0], "entropy": -(p * log_p).sum(-1)}
    if teacher_logits is not None:
        log_q = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
        q = log_q.exp()
        log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log(1.0 - beta))
        out["t_logp"] = log_q.gather(1, idx)[:, 0]
        out["t_entropy"] = -(q * log_q).sum(-1)
        out["jsd"] = beta * (q * (log_q - log_m)).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)
    return {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in out.items()}


def run(fn, logits, targets, teacher, upstream, **kwargs):
    """Outputs (float64 copies) and the gradient of sum(upstream * output) over logp/entropy/jsd."""
    leaf = logits.detach().clone()
    if fn is stats_float64:          # keep the exact gradient in float64 (no rounding to the input dtype)
        leaf = leaf.double().cpu()
        upstream = {k: v.cpu() for k, v in upstream.items()}
    leaf.requires_grad_()
    out = fn(leaf, targets, teacher, **kwargs)
    names = [n for n in ("logp", "entropy", "jsd") if n in out]
    grad, = torch.autograd.grad([out[n] for n in names], leaf, [upstream[n].to(out[n]) for n in names])
    return {k: v.detach().double().cpu() for k, v in out.items()}, grad, out


def make_rows(V, dtype, seed, device="cpu"):
    """Five kinds of rows: ordinary, ignored, huge |logits| (~3e4), a near-certain target (+30
    above the rest), and a teacher identical to the student. Returns logits, targets, teacher."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(5, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(5, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (5,), generator=g)
    y[1] = IGNORE
    s[2] = (torch.randn(V, generator=g, dtype=torch.float64) * 1e4).clamp(-3e4, 3e4)
    t[2] = (torch.randn(V, generator=g, dtype=torch.float64) * 1e4).clamp(-3e4, 3e4)
    s[3, y[3]] = s[3].max() + 30
    t[3, y[3]] = t[3].max() + 25
    t[4] = s[4]
    return s.to(dtype).to(device), y.to(device), t.to(dtype).to(device)


def random_upstream(n, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, generator=g).to(device) for name in ("logp", "entropy", "jsd")}


def max_err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


# -----------------------------------------------------------------------------
# antisd_kernels.py: the torch reference against float64

@pytest.mark.parametrize("with_teacher", [True, False])
def test_torch_reference_matches_float64_on_peaked_and_huge_logit_rows(with_teacher):
    V, beta, T = 1000, 0.3, 0.7
    logits, targets, teacher = make_rows(V, torch.float32, seed=1)
    teacher = teacher if with_teacher else None
    up = random_upstream(5, seed=2)
    chunked = functools.partial(antisd_kernels.token_stats_torch, chunk_rows=2)   # several chunks per call
    out, grad, _ = run(chunked, logits, targets, teacher, up, beta=beta, temperature=T)
    ref, ref_grad, _ = run(stats_float64, logits, targets, teacher, up, beta=beta, temperature=T)
    assert set(out) == set(ref)
    for name in ref:
        # float32 rounding of z / T costs up to ~|z| * 6e-8 ~ 3e-3 on the 3e4-scale row
        assert torch.allclose(out[name], ref[name], rtol=1e-5, atol=5e-3), name
    assert grad.dtype == torch.float32
    assert torch.allclose(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert grad[1].abs().max() == 0          # ignored row


def test_jsd_gradient_formula_matches_autograd_in_float64():
    """The closed form used by the fused backward:
    d jsd / dz = (1-beta) p_S (log p_S - log M - KL(p_S || M)) / T."""
    V, beta, T = 257, 0.3, 0.7
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(4, V, generator=g, dtype=torch.float64) * 3).requires_grad_()
    zt = torch.randn(4, V, generator=g, dtype=torch.float64) * 3
    targets = torch.zeros(4, dtype=torch.long)
    jsd = stats_float64(z, targets, zt, beta, T)["jsd"]
    auto, = torch.autograd.grad(jsd.sum(), z)
    with torch.no_grad():
        log_p = torch.log_softmax(z / T, -1)
        log_q = torch.log_softmax(zt / T, -1)
        log_m = torch.log(beta * log_q.exp() + (1 - beta) * log_p.exp())
        kl_s = (log_p.exp() * (log_p - log_m)).sum(-1, keepdim=True)
        closed = (1 - beta) * log_p.exp() * (log_p - log_m - kl_s) / T
    assert torch.allclose(auto, closed, rtol=1e-10, atol=1e-14)


def test_torch_token_stats_keeps_memory_bounded_by_chunks():
    # the backward recomputes chunk by chunk: autograd keeps only the inputs, not [N, V] temporaries
    logits = torch.randn(64, 1000, requires_grad=True)
    targets = torch.randint(0, 1000, (64,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = antisd_kernels.token_stats_torch(logits, targets, torch.randn(64, 1000), chunk_rows=16)
    assert sum(saved) <= 2 * 64 * 1000 + 64      # logits and teacher logits, nothing more
    out["jsd"].sum().backward()
    assert logits.grad.shape == logits.shape


# -----------------------------------------------------------------------------
# antisd_kernels.py: fused kernels against float64

CASES = [(V, dtype) for V in (1000, 32003) for dtype in (torch.float32, torch.bfloat16)]
CASES += [(151936, torch.float32), (151936, torch.bfloat16), (1000, torch.float16)]


@needs_triton
@pytest.mark.parametrize("V,dtype", CASES, ids=[f"V{v}-{str(d)[6:]}" for v, d in CASES])
def test_triton_values_and_gradients_match_float64_incl_peaked_huge_and_ignored_rows(V, dtype):
    beta, T = 0.3, 0.7
    logits, targets, teacher = make_rows(V, dtype, seed=V, device=DEVICE)
    if V == 151936:        # keep the interpreter fast: ordinary, ignored, huge, peaked rows only
        logits, targets, teacher = logits[:4], targets[:4], teacher[:4]
    up = random_upstream(len(targets), seed=V + 1, device=DEVICE)
    out, grad, raw = run(antisd_kernels.token_stats_triton, logits, targets, teacher, up, beta=beta,
                         temperature=T, block=block_for(V))
    ref, ref_grad, _ = run(antisd_kernels.token_stats_torch, logits, targets, teacher, up, beta=beta,
                           temperature=T)
    exact, exact_grad, _ = run(stats_float64, logits, targets, teacher, up, beta=beta, temperature=T)

    assert all(v.dtype == torch.float32 and v.shape == targets.shape for v in raw.values())
    assert set(out) == set(exact)
    for name in exact:
        err, ref_err = max_err(out[name], exact[name]), max_err(ref[name], exact[name])
        # No worse than the float32 torch reference, up to two float32 ulps of the largest value:
        # on the huge-logit row logp reaches ~1e5 nats, where one ulp is already 8e-3.
        two_ulps = 2.5e-7 * APPROX * exact[name].abs().max().item()
        assert err <= 1.05 * ref_err + 2e-5 * APPROX + two_ulps, (name, err, ref_err)
        assert torch.allclose(out[name], exact[name], rtol=3e-7 * APPROX, atol=2e-5 * APPROX), name
    ignored = targets.cpu() == IGNORE
    assert all((out[name][ignored] == 0).all() for name in out)

    assert grad.dtype == dtype and grad.shape == logits.shape
    err, ref_err = max_err(grad, exact_grad), max_err(ref_grad, exact_grad)
    assert err <= 1.05 * ref_err + 1e-7, (err, ref_err)
    # elementwise: one rounding to the logits' dtype on top of float32-accurate values
    rel = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}[dtype]
    scale = exact_grad.abs().amax(-1, keepdim=True)
    assert ((grad.double().cpu() - exact_grad).abs() <= rel * exact_grad.abs() + 1e-6 * scale + 1e-7).all()
    assert (grad.cpu()[ignored] == 0).all()


@needs_triton
def test_triton_gradient_matches_float64_at_confident_targets():
    """p(target) ~ 1 - 1e-13: the target entry's gradient a (1 - p) must be formed in float32 and
    rounded once; a bf16 softmax would give garbage there."""
    V, T = 4099, 1.0
    g = torch.Generator().manual_seed(7)
    base = torch.randn(3, V, generator=g, dtype=torch.float64)
    targets = torch.tensor([5, 17, 4000])
    base[torch.arange(3), targets] = base.max() + 30
    for dtype in (torch.float32, torch.bfloat16):
        logits = base.to(dtype)
        up = random_upstream(3, seed=8)
        up["logp"] = torch.tensor([1.0, -2.0, 0.5])
        _, grad, _ = run(antisd_kernels.token_stats_triton, logits.to(DEVICE), targets.to(DEVICE), None,
                         {k: v.to(DEVICE) for k, v in up.items()}, temperature=T, block=block_for(V))
        _, ref_grad, _ = run(antisd_kernels.token_stats_torch, logits, targets, None, up, temperature=T)
        _, exact, _ = run(stats_float64, logits, targets, None, up, beta=0.5, temperature=T)
        at_target = grad.cpu().double()[torch.arange(3), targets]
        exact_target = exact[torch.arange(3), targets]
        assert (at_target - exact_target).abs().max() <= 1e-6
        assert max_err(grad, exact) <= 1.05 * max_err(ref_grad, exact) + 1e-9


@needs_triton
def test_triton_default_temperature_and_beta_without_teacher():
    V = 32003
    logits, targets, _ = make_rows(V, torch.bfloat16, seed=11, device=DEVICE)
    up = random_upstream(5, seed=12, device=DEVICE)
    out, grad, raw = run(antisd_kernels.token_stats_triton, logits, targets, None, up, block=block_for(V))
    exact, exact_grad, _ = run(stats_float64, logits, targets, None, up, beta=0.5, temperature=1.0)
    assert set(raw) == {"logp", "entropy"}
    for name in exact:
        assert torch.allclose(out[name], exact[name], rtol=1e-6 * APPROX, atol=2e-5 * APPROX), name
    scale = exact_grad.abs().amax(-1, keepdim=True)
    # + 1e-7 absolute: (1 - p) at a near-certain target is below float32 resolution (upstream ~ 1)
    assert ((grad.double().cpu() - exact_grad).abs() <= 2.0 ** -8 * exact_grad.abs() + 1e-6 * scale + 1e-7).all()


# -----------------------------------------------------------------------------
# antisd_kernels.py: layout, partial upstream gradients, write coverage

@needs_triton
def test_triton_handles_strided_rows_from_sliced_and_reshaped_views():
    B, S, V, pad = 2, 3, 1003, 37
    g = torch.Generator().manual_seed(21)
    wide = (torch.randn(B, S, V + pad, generator=g) * 2).to(DEVICE).requires_grad_()
    teacher_wide = (torch.randn(B * S, V + 2 * pad, generator=g) * 2).to(DEVICE)
    logits = wide[..., :V].flatten(0, 1)             # [6, V] view, row stride V + pad
    teacher = teacher_wide[:, pad:pad + V]            # row stride V + 2 pad, offset start
    assert logits.stride(0) == V + pad and teacher.stride(0) == V + 2 * pad
    targets = torch.tensor([3, IGNORE, 1002, 0, 500, 7], device=DEVICE, dtype=torch.int32)
    up = random_upstream(6, seed=22, device=DEVICE)
    out = antisd_kernels.token_stats_triton(logits, targets, teacher, 0.4, 1.3, block=block_for(V))
    torch.autograd.backward([out["logp"], out["entropy"], out["jsd"]],
                            [up["logp"], up["entropy"], up["jsd"]])
    dense = logits.detach().contiguous()
    out_c, grad_c, _ = run(antisd_kernels.token_stats_triton, dense, targets, teacher.contiguous(), up,
                           beta=0.4, temperature=1.3, block=block_for(V))
    for name in out_c:
        assert torch.equal(out[name].detach().double().cpu(), out_c[name]), name
    assert torch.equal(wide.grad[..., :V].flatten(0, 1), grad_c)
    assert (wide.grad[..., V:] == 0).all()


@needs_triton
@pytest.mark.parametrize("used", [("logp",), ("entropy",), ("jsd",), ("logp", "jsd")])
def test_triton_gradient_with_some_outputs_unused_matches_reference(used):
    V = 1000
    logits, targets, teacher = make_rows(V, torch.float32, seed=31)
    results = []
    for fn, kw in ((antisd_kernels.token_stats_triton, {"block": block_for(V)}), (antisd_kernels.token_stats_torch, {})):
        leaf = logits.to(DEVICE).requires_grad_()
        out = fn(leaf, targets.to(DEVICE), teacher.to(DEVICE), 0.3, 0.7, **kw)
        # .sum() hands the backward an expanded (stride 0) upstream gradient
        sum(out[name].sum() * (i + 1) for i, name in enumerate(used)).backward()
        results.append(leaf.grad.cpu())
    assert torch.allclose(results[0], results[1], rtol=1e-4, atol=1e-7)


@needs_triton
def test_triton_writes_every_output_and_gradient_element(monkeypatch):
    """Outputs, saved row statistics and the gradient are allocated NaN-filled: any element the
    kernels forget to write (ignored rows, the ragged last block, unused teacher slots) shows up."""
    monkeypatch.setattr(antisd_kernels, "_poison", True)
    V = 1003
    logits, targets, teacher = make_rows(V, torch.bfloat16, seed=41, device=DEVICE)
    up = random_upstream(5, seed=42, device=DEVICE)
    for t in (teacher, None):
        for block in (block_for(V), 256):            # one block per row, and a ragged last block
            out, grad, raw = run(antisd_kernels.token_stats_triton, logits, targets, t, up, beta=0.3,
                                 temperature=0.7, block=block)
            assert all(not v.isnan().any() for v in raw.values())
            assert not grad.isnan().any()
            assert (grad[1] == 0).all()              # ignored row


@needs_triton
def test_triton_small_block_matches_single_block():
    """Many blocks per row exercise the online rescaling (the max moves between blocks)."""
    V = 5000
    logits, targets, teacher = make_rows(V, torch.float32, seed=51, device=DEVICE)
    logits[0] = torch.linspace(-5, 20, V, device=DEVICE)          # max keeps moving to the right
    up = random_upstream(5, seed=52, device=DEVICE)
    one, g_one, _ = run(antisd_kernels.token_stats_triton, logits, targets, teacher, up, block=8192)
    many, g_many, _ = run(antisd_kernels.token_stats_triton, logits, targets, teacher, up, block=512)
    for name in one:
        assert torch.allclose(one[name], many[name], rtol=1e-5, atol=1e-5), name
    assert torch.allclose(g_one, g_many, rtol=1e-5, atol=1e-8)


@needs_triton
def test_triton_empty_batch_and_all_ignored_rows():
    V = 100
    empty = torch.zeros(0, V, device=DEVICE, requires_grad=True)
    out = antisd_kernels.token_stats_triton(empty, torch.zeros(0, dtype=torch.long, device=DEVICE), empty.detach())
    assert all(v.shape == (0,) for v in out.values())
    logits = torch.randn(3, V, device=DEVICE, requires_grad=True)
    targets = torch.full((3,), IGNORE, device=DEVICE)
    out = antisd_kernels.token_stats_triton(logits, targets, torch.randn(3, V, device=DEVICE))
    assert all((v == 0).all() for v in out.values())
    (out["logp"] + out["entropy"] + out["jsd"]).sum().backward()
    assert (logits.grad == 0).all()


@needs_triton
def test_teacher_gets_no_gradient_and_teacher_stats_are_not_differentiable():
    V = 300
    logits = torch.randn(2, V, device=DEVICE, requires_grad=True)
    teacher = torch.randn(2, V, device=DEVICE, requires_grad=True)
    out = antisd_kernels.token_stats_triton(logits, torch.tensor([1, 2], device=DEVICE), teacher)
    assert not out["t_logp"].requires_grad and not out["t_entropy"].requires_grad
    out["jsd"].sum().backward()
    assert teacher.grad is None and logits.grad is not None


def test_token_stats_dispatch_follows_device_and_interpreter_flag(monkeypatch):
    calls = []
    monkeypatch.setattr(antisd_kernels, "token_stats_triton", lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(antisd_kernels, "token_stats_torch", lambda *a, **k: calls.append("torch"))
    x, y = torch.randn(2, 5), torch.tensor([0, 1])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    antisd_kernels.token_stats(x, y)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    antisd_kernels.token_stats(x, y)
    assert calls == ["torch", "triton" if antisd_kernels.INTERPRETED else "torch"]


@needs_triton
def test_triton_out_of_range_target_gives_nan_instead_of_reading_outside_the_row():
    V = 100
    logits = torch.randn(3, V, device=DEVICE)
    targets = torch.tensor([V, 5, V + 1000], device=DEVICE)
    out = antisd_kernels.token_stats_triton(logits, targets, logits + 1)
    assert out["logp"][[0, 2]].isnan().all() and out["t_logp"][[0, 2]].isnan().all()
    assert torch.isfinite(out["logp"][1]) and torch.isfinite(out["entropy"]).all()


# -----------------------------------------------------------------------------
# antisd_kernels.py: logits projected from the hidden states chunk by chunk (the chunked lm_head)

def float64_stats(logits, targets, teacher_logits, beta, temperature):
    """The five statistics in float64 by their definitions, all rows at once."""
    logp_all = torch.log_softmax(logits.double() / temperature, -1)
    t_logp_all = torch.log_softmax(teacher_logits.double() / temperature, -1)
    mix = beta * t_logp_all.exp() + (1 - beta) * logp_all.exp()
    valid = targets != antisd_kernels.IGNORE_INDEX
    pick = lambda table: table.gather(-1, targets.clamp(min=0)[:, None])[:, 0] * valid
    kl = lambda lp: (lp.exp() * (lp - mix.log())).sum(-1)
    return {"logp": pick(logp_all), "entropy": -(logp_all.exp() * logp_all).sum(-1) * valid,
            "t_logp": pick(t_logp_all), "t_entropy": -(t_logp_all.exp() * t_logp_all).sum(-1) * valid,
            "jsd": (beta * kl(t_logp_all) + (1 - beta) * kl(logp_all)) * valid}


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_lm_head_stats_equal_the_unchunked_path_and_float64_in_values_and_gradients(tied, token_stats_path):
    N, H, V, beta, temperature = 13, 8, 50, 0.3, 0.7
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(V, H, generator=g)).requires_grad_()
    extra = torch.randn(N, H, generator=g).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[2, 9]] = antisd_kernels.IGNORE_INDEX
    teacher_hidden = torch.randn(N, H, generator=g)
    upstream = {name: torch.randn(N, generator=g) for name in ("logp", "entropy", "jsd")}

    def run(stats_of, dtype=torch.float32):
        # tied: the hidden states depend on the weight too (an embedding lookup), as with tied embeddings
        w, x = weight.to(dtype), extra.to(dtype)
        hidden = x + w[ids] if tied else x
        out = stats_of(hidden, w, teacher_hidden.to(dtype))
        loss = sum((out[name].to(dtype) * up.to(dtype)).sum() for name, up in upstream.items())
        grads = torch.autograd.grad(loss, [weight, extra])
        return {k: v.detach().double() for k, v in out.items()}, [gr.double() for gr in grads]

    chunked, chunked_grads = run(lambda h, w, t: antisd_kernels.lm_head_token_stats(h, w, targets, t, beta, temperature,
                                                                            chunk_rows=4))
    whole, whole_grads = run(lambda h, w, t: antisd_kernels.token_stats_torch(h @ w.T, targets, t @ w.T, beta, temperature))
    # the teacher is a constant (M1): no gradient through its logits, although they use the same weight
    exact, exact_grads = run(lambda h, w, t: float64_stats(h @ w.T, targets, t @ w.detach().T, beta, temperature),
                             torch.float64)
    for name in antisd_kernels.STAT_NAMES:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunked[name], exact[name], rtol=1e-4, atol=1e-4)
    for got, same_path, reference in zip(chunked_grads, whole_grads, exact_grads):
        torch.testing.assert_close(got, same_path, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)
    assert chunked["t_logp"][[2, 9]].abs().sum() == 0 and chunked["jsd"][[2, 9]].abs().sum() == 0


class PeakLiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of every CPU tensor storage that an op creates while the mode is on, and
    forgets them when the storage is freed: `peak` is the most that was alive at once. Exact and
    deterministic, unlike the process's resident memory, which depends on the allocator and on
    whatever else the process does. Backward ops are seen too (the mode follows autograd)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.alive = 0, 0, set()

    def _freed(self, key, nbytes):
        self.alive.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.alive:      # a view of a storage already counted
                continue
            self.alive.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, nbytes)
        return out


def test_chunked_lm_head_memory_stays_flat_as_rows_grow_while_unchunked_memory_grows():
    H, V = 16, 4096
    weight = torch.randn(V, H).requires_grad_()

    def peak_mb(rows, chunk_rows):
        hidden = torch.randn(rows, H).requires_grad_()
        targets, teacher = torch.randint(0, V, (rows,)), torch.randn(rows, H)
        with PeakLiveTensorBytes() as memory:
            out = antisd_kernels.lm_head_token_stats(hidden, weight, targets, teacher, chunk_rows=chunk_rows)
            (out["logp"] + out["entropy"] + out["jsd"]).sum().backward()
        return memory.peak / 2**20

    small, large = 128, 1024                      # one [large, V] float32 tensor is 16 MB
    chunked = [peak_mb(rows, 64) for rows in (small, large)]
    unchunked = [peak_mb(rows, rows) for rows in (small, large)]
    # chunked: only the [N] outputs, [N, H] gradient and the like grow with N (a few KB per row)
    assert chunked[1] <= 1.1 * chunked[0], (chunked, unchunked)
    # unchunked: at least two [N, V] float32 tensors grow with N: 2 x (1024 - 128) x 4096 x 4 bytes = 28 MB
    assert unchunked[1] - unchunked[0] >= 28, (chunked, unchunked)


# -----------------------------------------------------------------------------
# eval.py: metrics against brute force, benchmark loading on the real files, sampling, the command line

# -----------------------------------------------------------------------------
# eval.py: pass@k, avg@n, maj@n

def test_pass_at_k_matches_enumeration_of_all_k_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))  # samples 0..c-1 are the correct ones
                brute = sum(any(i < c for i in subset) for subset in subsets) / len(subsets)
                assert evaluation.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_stays_exact_where_binomials_would_overflow_a_float():
    n, c, k = 2000, 3, 1024  # C(2000, 1024) ~ 1e600
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert evaluation.pass_at_k(32, 5, 1) == pytest.approx(5 / 32, abs=1e-15)  # pass@1 is the accuracy


def test_metric_names_are_literal_and_values_match_a_hand_count():
    # 2 problems x 4 samples: c = 1 and c = 4
    records = [
        {"correct": [1.0, 0.0, 0.0, 0.0], "extracted": ["5", None, "6", "6"], "majority_correct": 0.0,
         "truncated": [False, True, False, False], "lengths": [10, 16, 12, 2]},
        {"correct": [1.0, 1.0, 1.0, 1.0], "extracted": ["1", "1", "1", "1"], "majority_correct": 1.0,
         "truncated": [False, False, False, False], "lengths": [4, 4, 4, 4]},
    ]
    metrics = evaluation.benchmark_metrics(records, 4)
    assert list(metrics) == ["problems", "avg@4", "pass@1", "pass@2", "pass@4", "maj@4",
                             "no_box", "truncated", "mean_length"]
    assert metrics["problems"] == 2
    assert metrics["avg@4"] == pytest.approx((1 / 4 + 1) / 2)
    assert metrics["pass@1"] == pytest.approx(metrics["avg@4"])
    assert metrics["pass@2"] == pytest.approx((1 / 2 + 1) / 2)  # 3 of the 6 pairs hold the one correct sample
    assert metrics["pass@4"] == pytest.approx(1.0)
    assert metrics["maj@4"] == pytest.approx(0.5)
    assert metrics["no_box"] == pytest.approx(1 / 8)
    assert metrics["truncated"] == pytest.approx(1 / 8)
    assert metrics["mean_length"] == pytest.approx(56 / 8)
    assert list(evaluation.benchmark_metrics(records[:1] * 1, 4)) == list(metrics)
    # n that is not a power of two: pass@k for k = 1, 2, 4 only
    assert [m for m in evaluation.benchmark_metrics(
        [{**records[1], "correct": [1.0] * 6, "extracted": ["1"] * 6, "truncated": [False] * 6, "lengths": [1] * 6}], 6)
        if m.startswith("pass@")] == ["pass@1", "pass@2", "pass@4"]


def test_mean_is_unweighted_over_benchmarks_and_counts_all_problems():
    per_benchmark = {"a": {"problems": 10, "avg@2": 0.2}, "b": {"problems": 30, "avg@2": 0.6}}
    assert evaluation.mean_metrics(per_benchmark) == {"problems": 40, "avg@2": pytest.approx(0.4)}


def test_majority_vote_counts_equivalent_answers_written_differently_as_one():
    # \frac12, 0.5 and \dfrac{1}{2} are one answer with 3 votes; "3" has 2
    answers = ["3", "\\frac12", "0.5", "3", "\\dfrac{1}{2}"]
    correct = [0.0, 1.0, 1.0, 0.0, 1.0]
    assert evaluation.majority_is_correct(answers, correct) == 1.0


def test_majority_vote_tie_goes_to_the_answer_seen_first():
    assert evaluation.majority_is_correct(["3", "0.5", "\\frac{1}{2}", "3"], [0.0, 1.0, 1.0, 0.0]) == 0.0
    assert evaluation.majority_is_correct(["0.5", "3", "3", "\\frac{1}{2}"], [1.0, 0.0, 0.0, 1.0]) == 1.0


def test_responses_without_a_box_do_not_vote():
    assert evaluation.majority_is_correct([None, None, None, "7"], [0.0, 0.0, 0.0, 1.0]) == 1.0
    assert evaluation.majority_is_correct([None, None], [0.0, 0.0]) == 0.0


@given(st.lists(st.booleans(), min_size=1, max_size=12).flatmap(
    lambda correct: st.tuples(st.just(correct), st.integers(1, len(correct)))))
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample(case):
    correct, k = case  # the correct samples anywhere among the n, not only first
    subsets = list(itertools.combinations(correct, k))
    brute = sum(any(subset) for subset in subsets) / len(subsets)
    assert evaluation.pass_at_k(len(correct), sum(correct), k) == pytest.approx(brute, abs=1e-12)


@given(st.lists(st.one_of(st.none(), st.integers(0, 8)), max_size=10), st.integers(0, 2))
def test_majority_vote_is_the_most_voted_answer_class_the_first_seen_on_a_tie(answers, gold_class):
    # a stand-in for verified equivalence: two answers are the same when they are equal mod 3
    same = lambda answer, other: answer % 3 == other % 3
    correct = [float(a is not None and a % 3 == gold_class) for a in answers]
    classes = [a % 3 for a in answers if a is not None]                    # None: no box, no vote
    votes = collections.Counter(classes)
    winner = max(votes, key=lambda c: (votes[c], -classes.index(c))) if votes else None
    assert evaluation.majority_is_correct(answers, correct, same=same) == float(winner == gold_class)


# -----------------------------------------------------------------------------
# eval.py: loading: each benchmark's own fields, hub and local

def test_local_files_map_each_benchmarks_own_fields(tmp_path):
    write_jsonl(tmp_path / "amc23.jsonl", [{"id": 0, "problem": "P", "answer": 27.0, "question": "P"}])
    write_jsonl(tmp_path / "aime24.jsonl", [{"problem": "P", "answer": "025"}])
    write_jsonl(tmp_path / "minerva_math.jsonl", [{"problem": "P", "solution": "so \\boxed{1} no, \\boxed{4.5e33}", "idx": 0}])
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "P", "answer": "2 * 500 = <<2*500=1000>>1000\n#### 1,000"}])
    write_jsonl(tmp_path / "olympiadbench.jsonl", [{"question": "P", "final_answer": ["$\\frac{1}{2 n+2}$"]}])
    expected = {"amc23": "\\boxed{27}", "aime24": "\\boxed{25}", "minerva_math": "\\boxed{4.5\\times 10^{33}}",
                "gsm8k": "\\boxed{1000}", "olympiadbench": "\\boxed{\\frac{1}{2n+2}}"}
    for name, response in expected.items():
        [item] = evaluation.load_benchmark(name, data_dir=tmp_path)
        assert item["problem"] == "P"
        assert antisd.verify(response, item["answer"]) == 1.0, (name, item["answer"])
    # the e-notation gold must not shrink to its mantissa
    [minerva] = evaluation.load_benchmark("minerva_math", data_dir=tmp_path)
    assert antisd.verify("\\boxed{4.5}", minerva["answer"]) == 0.0


def test_hub_schemas_map_each_benchmarks_own_columns(monkeypatch):
    hub_rows = {  # one row per benchmark in the hub's schema (facts.md 2), which differs from the local files
        ("math-ai/amc23", None, "test"): {"id": 0, "question": "P", "answer": 27.0, "url": "u"},
        ("math-ai/minervamath", None, "test"): {"question": "P", "answer": "1.6"},
        ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"): {"id": 1, "question": "P", "final_answer": ["$2$"]},
        ("openai/gsm8k", "main", "test"): {"question": "P", "answer": "x\n#### 18"},
        ("MathArena/hmmt_feb_2025", None, "train"): {"problem_idx": 1, "problem": "P", "answer": "\\frac{1}{2}"},
    }
    calls = []

    def fake_load_dataset(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        return datasets.Dataset.from_list([hub_rows[(hub_id, config, split)]])

    monkeypatch.setattr(evaluation.datasets, "load_dataset", fake_load_dataset)
    golds = {"amc23": "27", "minerva_math": "1.6", "olympiadbench": "2", "gsm8k": "18", "hmmt25": "0.5"}
    for name, gold in golds.items():
        [item] = evaluation.load_benchmark(name)
        assert item["problem"] == "P"
        assert antisd.verify("\\boxed{" + gold + "}", item["answer"]) == 1.0, (name, item["answer"])
    assert calls == list(hub_rows)


def test_missing_field_error_names_benchmark_file_and_field(tmp_path):
    write_jsonl(tmp_path / "amc23.jsonl", [{"question": "P", "answer": 27.0}])  # the hub's column name, not the local one
    with pytest.raises(ValueError, match=r"amc23.*amc23\.jsonl.*'problem'"):
        evaluation.load_benchmark("amc23", data_dir=tmp_path)
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "P", "answer": "no final answer line"}])
    with pytest.raises(ValueError, match=r"gsm8k.*'answer'"):
        evaluation.load_benchmark("gsm8k", data_dir=tmp_path)


def test_unparsable_gold_is_skipped_with_a_warning_not_scored_as_a_miss(tmp_path, capsys):
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "P0", "answer": "#### 3"}, {"question": "P1", "answer": "lost"},
                                           {"question": "P2", "answer": "#### 5"}])
    assert [p["problem"] for p in evaluation.load_benchmark("gsm8k", data_dir=tmp_path)] == ["P0", "P2"]
    assert "skipped 1 of 3" in capsys.readouterr().err


def test_missing_file_or_unreachable_hub_error_says_what_to_pass(tmp_path, monkeypatch):
    with pytest.raises(antisd.UserError, match=r"aime25.*aime25\.jsonl"):
        evaluation.load_benchmark("aime25", data_dir=tmp_path)

    def offline(*args, **kwargs):  # what datasets raises with HF_DATASETS_OFFLINE=1 and nothing cached
        raise ConnectionError("Couldn't reach 'math-ai/aime25' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(evaluation.datasets, "load_dataset", offline)
    with pytest.raises(antisd.UserError, match=r"aime25.*math-ai/aime25.*--data-dir"):
        evaluation.load_benchmark("aime25")
    with pytest.raises(ValueError, match="unknown benchmark"):
        evaluation.load_benchmark("aime2025", data_dir=tmp_path)


def test_limit_keeps_the_first_k_problems_in_file_order(tmp_path):
    write_jsonl(tmp_path / "aime25.jsonl", [{"problem": f"P{i}", "answer": i, "id": str(i)} for i in range(5)])
    assert [p["problem"] for p in evaluation.load_benchmark("aime25", data_dir=tmp_path, limit=3)] == ["P0", "P1", "P2"]


def test_eval_negative_limit_is_refused_instead_of_dropping_the_last_problem(tmp_path):
    write_jsonl(tmp_path / "aime24.jsonl", [{"problem": f"P{i}", "answer": i} for i in range(3)])
    assert len(evaluation.load_benchmark("aime24", data_dir=tmp_path, limit=None)) == 3
    with pytest.raises(antisd.UserError, match="limit must be at least 1"):
        evaluation.load_benchmark("aime24", data_dir=tmp_path, limit=-1)


@pytest.fixture(scope="module")
def real_benchmarks():
    """Every real benchmark file present, as eval.py loads it, and the golds that, boxed, are not
    judged equal to themselves: computed once (about 30 s of parsing real golds) for the tests below."""
    found = {}
    for name in EVAL_BENCHMARKS:
        if (BENCH_DIR / f"{name}.jsonl").is_file():
            started = time.time()
            problems = evaluation.load_benchmark(name, data_dir=BENCH_DIR)
            misses = [p["answer"] for p in problems if antisd.verify("\\boxed{" + p["answer"] + "}", p["answer"]) != 1.0]
            found[name] = problems, misses, time.time() - started
    return found


@pytest.mark.parametrize("name", EVAL_BENCHMARKS)
def test_every_real_gold_answer_verifies_against_itself(name, real_benchmarks):
    """The real benchmark files load, and each gold, boxed, is judged equal to itself: catches
    wrong column mapping and gold formats that the parser cannot read (a problem nobody can solve)."""
    if name not in real_benchmarks:
        pytest.skip(f"no {BENCH_DIR}/{name}.jsonl")
    problems, misses, seconds = real_benchmarks[name]
    assert len(problems) == len(antisd.read_jsonl(BENCH_DIR / f"{name}.jsonl")), "some rows were skipped"
    print(f"{name}: {len(problems) - len(misses)}/{len(problems)} golds verify against themselves ({seconds:.1f} s)")
    assert not misses, f"{name}: {len(misses)} golds do not verify against themselves, e.g. {misses[:5]}"


@pytest.mark.parametrize("name", EVAL_BENCHMARKS)
def test_every_real_gold_boxed_as_the_file_writes_it_earns_reward(name):
    """A model that boxes a gold exactly as the file writes it (Minerva's 4.5e33; OlympiadBench's less the
    $ that delimit its math and a final full stop) earns the reward. load_benchmark hands out cleaned golds,
    so the rows are read here with eval.py's own field rules, and verify gets the raw gold: both sides'
    normalisation must agree."""
    path = BENCH_DIR / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"no {path}")
    started = time.time()
    _, gold_field, gold_rule = evaluation.BENCHMARKS[name]["local_fields"]
    golds = [evaluation.GOLD_RULES[gold_rule](row[gold_field]) for row in antisd.read_jsonl(path)]
    golds = [gold[0] if isinstance(gold, list) else gold for gold in golds]  # OlympiadBench: a list of one
    written = [re.sub(r"(?<!\\)\$", "", str(gold)).strip().removesuffix(".") for gold in golds]
    misses = [gold for gold, answer in zip(golds, written) if antisd.verify("\\boxed{" + answer + "}", gold) != 1.0]
    print(f"{name}: {len(golds) - len(misses)}/{len(golds)} golds as written earn reward ({time.time() - started:.1f} s)")
    assert not misses, f"{name}: {len(misses)} golds as written earn nothing, e.g. {misses[:5]}"


# golds of the real files that math-verify could read as a bare number, so that number would score as
# correct: (benchmark, row, the gold as written, a wrong answer). The strict expected failures are
# still misread today; the day they are handled they pass, pytest reports it, and the mark must go.
still_misread = pytest.mark.xfail(strict=True, reason="math-verify misreads this gold")
MISREAD_GOLDS = [
    ("olympiadbench", 76, "$(-\\infty, 0) \\cup\\{1\\}$.", "0"),   # fixed: a trailing '.' kept the '$' in
    ("minerva_math", 268, "\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}", "\\frac{2}{3}"),  # fixed: read as 2/3 inside \boxed{}
    pytest.param("olympiadbench", 73, "$f(x)=a x+b$, where $b$ is an arbitrary integer, ... $\\mho(a)=0$", "0",
                 marks=still_misread),                                  # prose, read as 0
    pytest.param("olympiadbench", 117, "$6m$", "6", marks=still_misread),  # m (a variable) taken for metres
    pytest.param("minerva_math", 104, "\\frac{37}{4} m", "\\frac{37}{4}", marks=still_misread),  # likewise
    pytest.param("minerva_math", 261, "\\hbar \\omega(v+1 / 2)-\\frac{E_{0}^{2} e^{2}}{2 m \\omega^{2}}", "2",
                 marks=still_misread),                                  # read as 2
]


@pytest.mark.parametrize("name, row, written, wrong", MISREAD_GOLDS)
def test_a_misread_gold_does_not_accept_a_bare_number(name, row, written, wrong, real_benchmarks):
    if name not in real_benchmarks:
        pytest.skip(f"no {BENCH_DIR}/{name}.jsonl")
    gold = real_benchmarks[name][0][row]["answer"]
    assert antisd.verify("\\boxed{" + gold + "}", gold) == 1.0
    assert antisd.verify("\\boxed{" + wrong + "}", gold) == 0.0, f"{written} accepts {wrong}"


# -----------------------------------------------------------------------------
# eval.py: sampling on the tiny model: in process and through the command line

def test_evaluate_restores_training_mode_and_leaves_the_callers_rng_alone():
    model, tokenizer = antisd.load_model("tiny-random", torch.device("cpu"))
    benchmarks = {"toy": [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}]}
    settings = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=3, enable_thinking=False, seed=7)
    model.train()
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    results, samples = evaluation.evaluate(model, tokenizer, benchmarks, **settings)
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert set(results) == {"benchmarks", "mean"} and set(results["benchmarks"]) == {"toy"}
    assert [len(s["responses"]) for s in samples] == [2, 2]
    _, again = evaluation.evaluate(model, tokenizer, benchmarks, **settings)
    assert [s["responses"] for s in again] == [s["responses"] for s in samples]  # same seed, same samples


def test_command_line_on_tiny_model_writes_results_and_one_sample_line_per_problem(tmp_path, capsys):
    data_dir = tmp_path / "bench"
    data_dir.mkdir()
    write_jsonl(data_dir / "aime24.jsonl", [{"id": 60 + i, "problem": f"What is {i}+{i}?", "answer": f"{2 * i:03d}",
                                             "solution": "s", "url": "u", "question": "q"} for i in range(3)])
    write_jsonl(data_dir / "minerva_math.jsonl", [{"problem": f"Compute {i}.", "solution": f"\\boxed{{{i}e3}}",
                                                   "type": "t", "idx": i} for i in range(3)])
    out_dir = tmp_path / "out"
    # in process (a second interpreter would import torch again): the same argv, the same main
    evaluation.main(["--model", "tiny-random", "--device", "cpu", "--data-dir", str(data_dir),
                     "--benchmarks", "aime24,minerva_math", "--limit", "2", "--n", "2", "--max-new-tokens", "16",
                     "--batch-size", "3", "--out-dir", str(out_dir)])
    assert "| mean |" in capsys.readouterr().out

    results = json.loads((out_dir / "results.json").read_text())
    assert results["model"] == "tiny-random" and results["settings"]["seed"] == 0
    assert {"torch", "transformers", "datasets", "math-verify"} <= set(results["versions"])
    keys = ["problems", "avg@2", "pass@1", "pass@2", "maj@2", "no_box", "truncated", "mean_length"]
    for name in ["aime24", "minerva_math", "mean"]:
        metrics = results["mean"] if name == "mean" else results["benchmarks"][name]
        assert list(metrics) == keys
        assert all(0.0 <= metrics[k] <= 1.0 for k in keys[1:-1]), metrics
        assert 0 < metrics["mean_length"] <= 16
    assert results["benchmarks"]["aime24"]["problems"] == 2 and results["mean"]["problems"] == 4

    lines = (out_dir / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert all(len(json.loads(line)["responses"]) == 2 for line in lines)


def test_the_n_samples_of_a_problem_are_separate_draws(tiny):
    # avg@n and pass@k assume n independent samples: n copies of one draw would be avg@1 n times over.
    # The untrained model at T = 1 spreads over its 320 tokens, so 8 tokens from separate streams differ
    model, tokenizer = tiny
    problems = [{"problem": f"What is {k} + {k}?", "answer": str(2 * k)} for k in range(3)]
    _, samples = evaluation.evaluate(model, tokenizer, {"toy": problems}, 4, 1.0, 1.0, 8, 4, False, 0)
    for sample in samples:
        assert len(set(sample["responses"])) == 4, sample["responses"]


def test_each_problem_is_scored_on_its_own_samples(monkeypatch):
    # a stub generator answers each prompt with its own problem's number: any mix-up of samples between
    # problems shows as a wrong answer or a response filed under another problem
    model, tokenizer = tiny_tasks.build_tiny()
    problems = [{"problem": f"What is {k} times one?", "answer": str(k)} for k in range(1, 8)]

    def own_answer(model, tokenizer, prompt_ids, *rest, **kwargs):
        texts = [tokenizer.decode(ids) for ids in prompt_ids]
        numbers = [re.search(r"What is (\d+) times one", text).group(1) for text in texts]
        return [(tokenizer(f"\\boxed{{{k}}}")["input_ids"] + [tokenizer.eos_token_id], False) for k in numbers]

    monkeypatch.setattr(evaluation, "sample_batch", own_answer)
    results, samples = evaluation.evaluate(model, tokenizer, {"toy": problems[:3], "other": problems[3:]}, 3,
                                           0.7, 0.95, 8, 4, False, 0)
    assert [s["answer"] for s in samples] == [p["answer"] for p in problems]
    for sample in samples:
        assert sample["responses"] == [f"\\boxed{{{sample['answer']}}}"] * 3
    assert results["benchmarks"]["toy"]["avg@3"] == results["benchmarks"]["other"]["avg@3"] == 1.0


def test_majority_vote_of_evaluate_counts_the_extracted_answers_not_the_response_texts(monkeypatch):
    # five scripted responses to a problem whose gold is 5. By hand: their answers 7, 5, 7, 5, 5 give 5
    # three votes of five. The texts around the boxes differ, so a vote on whole texts would give the
    # two identical responses \boxed{7} the majority
    model, tokenizer = tiny_tasks.build_tiny()
    texts = ["\\boxed{7}", "So \\boxed{5}.", "\\boxed{7}", "Hence \\boxed{5}", "It is \\boxed{5}, surely."]
    sampled = collections.Counter()

    def scripted(model, tokenizer, prompt_ids, *rest):  # the k-th sample of a prompt answers texts[k]
        outputs = []
        for prompt in map(tuple, prompt_ids):
            outputs.append((tokenizer(texts[sampled[prompt]])["input_ids"] + [tokenizer.eos_token_id], False))
            sampled[prompt] += 1
        return outputs

    monkeypatch.setattr(evaluation, "sample_batch", scripted)
    results, [sample] = evaluation.evaluate(model, tokenizer, {"toy": [{"problem": "What is 2+3?", "answer": "5"}]},
                                            5, 0.7, 0.95, 8, 8, False, 0)
    assert sample["responses"] == texts and sample["extracted"] == ["7", "5", "7", "5", "5"]
    assert sample["majority_correct"] == 1.0 and results["benchmarks"]["toy"]["maj@5"] == 1.0
    assert results["benchmarks"]["toy"]["avg@5"] == 3 / 5


def test_a_problems_samples_do_not_depend_on_the_benchmarks_before_it_or_on_the_limit(tiny):
    # the same search problems evaluated after 3 arith problems, after 1, and alone with --limit 2: each
    # draws the same samples (a stream per benchmark, problem and sample: sample_generator)
    model, tokenizer = tiny
    settings = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, batch_size=4, enable_thinking=False, seed=3)
    arith, search = evaluation.load_benchmark("arith", limit=3), evaluation.load_benchmark("search", limit=3)
    assert evaluation.load_benchmark("search", limit=2) == search[:2]

    def responses(benchmarks, name):
        _, samples = evaluation.evaluate(model, tokenizer, benchmarks, **settings)
        return [s["responses"] for s in samples if s["benchmark"] == name]

    after_three = responses({"arith": arith, "search": search}, "search")
    assert responses({"arith": arith[:1], "search": search}, "search") == after_three
    assert responses({"search": search[:2]}, "search") == after_three[:2]
    assert responses({"arith": arith[:1], "search": search}, "arith") == responses({"arith": arith}, "arith")[:1]
    assert len({tuple(r) for r in after_three}) == 3   # samples that differ by problem: the check has power


# resumable evaluation


EVAL = ["--model", "tiny-random", "--device", "cpu", "--benchmarks", "arith", "--n", "2", "--max-new-tokens", "24",
        "--batch-size", "2"]


def with_flag(argv, flag, value):
    """argv with flag set to value (replaced where it is, else appended)."""
    if flag not in argv:
        return argv + [flag, value]
    at = argv.index(flag)
    return argv[:at + 1] + [value] + argv[at + 2:]


def comparable(out_dir):
    report = json.loads((out_dir / "results.json").read_text())
    del report["seconds"], report["settings"]["out_dir"]
    return report, (out_dir / "samples.jsonl").read_text()


def test_a_killed_evaluation_resumes_to_the_results_of_an_uninterrupted_one(tmp_path, capsys):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    samples = killed / "samples.jsonl"
    process = subprocess.Popen([sys.executable, str(HERE / "eval.py")] + EVAL + ["--limit", "60", "--out-dir", str(killed)],
                               env=FAST, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: samples.exists() and samples.read_text().count("\n") >= 3, process)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    kept = samples.read_text().count("\n")
    assert 3 <= kept < 60 and not (killed / "results.json").exists()
    with open(samples, "a") as f:
        f.write('{"benchmark": "arith", "index": 59, "probl')       # a line torn by the kill
    with pytest.raises(antisd.UserError, match="holds an unfinished evaluation .*pass --resume"):
        evaluation.main(EVAL + ["--limit", "60", "--out-dir", str(killed)])
    for flag, value, named in [("--n", "4", "--n 2 -> 4"), ("--seed", "1", "--seed 0 -> 1"),
                               ("--temperature", "1.0", "--temperature 0.7 -> 1.0"), ("--limit", "50", "--limit 60 -> 50"),
                               ("--max-new-tokens", "30", "--max-new-tokens 24 -> 30"),
                               ("--model", "tiny", "--model 'tiny-random' -> 'tiny'")]:
        argv = with_flag(EVAL + ["--limit", "60"], flag, value)
        with pytest.raises(antisd.UserError, match="refusing to resume the evaluation .*" + re.escape(named)):
            evaluation.main(argv + ["--out-dir", str(killed), "--resume"])
    capsys.readouterr()
    evaluation.main(EVAL + ["--limit", "60", "--out-dir", str(killed), "--resume"])
    assert f"{kept} of 60 problems done" in capsys.readouterr().out
    evaluation.main(EVAL + ["--limit", "60", "--out-dir", str(straight)])
    assert comparable(killed) == comparable(straight)


def disk_full_at(monkeypatch, file_name, marker):
    """os.write fails as on a full disk for the write of `marker` into a file named file_name; every
    other write goes through."""
    real_write = os.write

    def write(fd, data):
        if marker in data and os.readlink(f"/proc/self/fd/{fd}").endswith(file_name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", write)


def test_a_finished_evaluation_is_replaced_by_a_new_one_without_resume(tmp_path, monkeypatch):
    """As --out-dir's help says: without --resume a finished evaluation is replaced. The new one, stopped
    after its first problem and resumed, ends with the results, samples and settings of the same
    evaluation run in an empty folder."""
    argv = with_flag(with_flag(EVAL, "--max-new-tokens", "8"), "--limit", "3")
    replaced, fresh = tmp_path / "replaced", tmp_path / "fresh"
    evaluation.main(argv + ["--out-dir", str(replaced)])
    assert (replaced / "results.json").exists()
    new = with_flag(argv, "--seed", "1")
    real_check, checked = evaluation.check_problem, []

    def stop_at_the_second_problem(*problem):  # as a kill would, once the first problem is kept
        if checked:
            raise KeyboardInterrupt
        checked.append(problem)
        return real_check(*problem)

    monkeypatch.setattr(evaluation, "check_problem", stop_at_the_second_problem)
    with pytest.raises(KeyboardInterrupt):
        evaluation.main(new + ["--out-dir", str(replaced)])
    monkeypatch.setattr(evaluation, "check_problem", real_check)
    assert len((replaced / "samples.jsonl").read_text().splitlines()) == 1   # the new evaluation's first problem only
    evaluation.main(new + ["--out-dir", str(replaced), "--resume"])
    evaluation.main(new + ["--out-dir", str(fresh)])
    assert comparable(replaced) == comparable(fresh)
    assert (replaced / "settings.json").read_text() == (fresh / "settings.json").read_text()


def test_an_evaluation_on_a_full_disk_ends_in_one_paragraph_keeping_the_problems_written(tmp_path, capsys, monkeypatch):
    disk_full_at(monkeypatch, "samples.jsonl", b'"index": 2,')  # the third problem
    out_dir = tmp_path / "out"
    code, text = failure_message(capsys, evaluation.main, EVAL + ["--limit", "4", "--batch-size", "1",
                                                                 "--out-dir", str(out_dir)])
    assert re.fullmatch(rf"error: could not write problem 2 of arith to {out_dir}/samples\.jsonl \(No space left on "
                        rf"device\); {out_dir} has [\d.,]+ [MG]B free; the problems before it are kept: free some space, "
                        rf"then pass --resume", text), text
    kept = [json.loads(line)["index"] for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert 2 not in kept and sorted(kept) == sorted(set(kept))      # whole lines, each problem once


def test_a_problems_samples_do_not_depend_on_the_problems_sampled_before_it_or_its_batch():
    model, tokenizer = antisd.load_model("tiny-random", torch.device("cpu"))
    problems = {"toy": [{"problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(5)]}
    settings = dict(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, enable_thinking=False, seed=3)
    _, together = evaluation.evaluate(model, tokenizer, problems, batch_size=15, **settings)
    _, one_by_one = evaluation.evaluate(model, tokenizer, problems, batch_size=1, **settings)
    assert [s["responses"] for s in together] == [s["responses"] for s in one_by_one]
    done = {("toy", i): together[i] for i in (0, 1, 3)}           # a resumed evaluation: only 2 and 4 are sampled
    new = []
    _, resumed = evaluation.evaluate(model, tokenizer, problems, batch_size=4, done=done, on_problem=new.append, **settings)
    assert [s["index"] for s in new] == [2, 4] and resumed == together
    _, other_seed = evaluation.evaluate(model, tokenizer, problems, batch_size=15, **{**settings, "seed": 4})
    assert [s["responses"] for s in other_seed] != [s["responses"] for s in together]


def test_per_sample_sampling_draws_from_the_tempered_top_p_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]])
    temperature, top_p = 0.7, 0.9
    probs = torch.softmax(logits[0] / temperature, dim=0).double()
    keep = torch.cumsum(probs, 0) - probs < top_p                  # the smallest prefix holding top_p
    expected = torch.where(keep, probs, 0) / probs[keep].sum()
    generator = torch.Generator().manual_seed(0)
    sampler = evaluation.PerSampleSampling([generator], temperature, top_p)
    draws = 20000
    counts = torch.zeros(5, dtype=torch.float64)
    for _ in range(draws):
        counts[int(sampler(None, logits.clone()).argmax())] += 1
    assert torch.allclose(counts / draws, expected, atol=4 * (0.25 / draws) ** 0.5)


# -----------------------------------------------------------------------------
# eval.py against a reference: results.json recomputed from samples.jsonl, samples redrawn by hand

def reference_results(samples, n):
    """results.json's metrics from samples.jsonl, computed apart from eval.py: avg@n, pass@k over
    every k-subset, maj@n by counting votes pairwise, the unweighted mean over benchmarks."""
    per_benchmark = {}
    for name in dict.fromkeys(s["benchmark"] for s in samples):
        rows = [s for s in samples if s["benchmark"] == name]
        metrics = {"problems": len(rows), f"avg@{n}": sum(sum(r["correct"]) / n for r in rows) / len(rows)}
        for k in [2 ** i for i in range(n.bit_length())]:
            metrics[f"pass@{k}"] = sum(
                sum(any(r["correct"][i] for i in subset) for subset in itertools.combinations(range(n), k))
                / math.comb(n, k) for r in rows) / len(rows)
        majority = 0.0
        for r in rows:
            votes = [sum(other == answer for other in r["extracted"]) if answer is not None else 0
                     for answer in r["extracted"]]
            majority += r["correct"][votes.index(max(votes))] if max(votes) > 0 else 0.0
        metrics[f"maj@{n}"] = majority / len(rows)
        metrics["no_box"] = sum(a is None for r in rows for a in r["extracted"]) / (n * len(rows))
        metrics["truncated"] = sum(t for r in rows for t in r["truncated"]) / (n * len(rows))
        metrics["mean_length"] = sum(sum(r["lengths"]) for r in rows) / (n * len(rows))
        per_benchmark[name] = metrics
    mean = {key: sum(m[key] for m in per_benchmark.values()) / len(per_benchmark) for key in per_benchmark[name]}
    mean["problems"] = sum(m["problems"] for m in per_benchmark.values())
    return per_benchmark, mean


@torch.no_grad()
def redraw_by_hand(model, tokenizer, prompt, generator, temperature, top_p, max_new_tokens):
    """One sample drawn one token at a time, unpadded: logits / T, the top-p nucleus, then the argmax of
    log p plus Gumbel noise from the sample's own generator (one uniform draw per vocabulary entry)."""
    ids, stops = list(prompt), set(antisd.stop_token_ids(model, tokenizer))
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float() / temperature
        ascending = logits.sort()
        outside = ascending.values.softmax(-1).cumsum(-1) <= 1 - top_p      # the nucleus holds the rest
        outside[-1] = False
        logits[ascending.indices[outside]] = -math.inf
        uniform = torch.rand(logits.shape[0], generator=generator)
        token = int((torch.log_softmax(logits, -1) - torch.log(-torch.log(uniform))).argmax())
        ids.append(token)
        if token in stops:
            break
    return ids[len(prompt):]


def test_results_json_is_what_a_reference_computes_from_samples_jsonl_drawn_at_the_evaluations_settings(
        tmp_path, monkeypatch):
    # tiny-random boxes nothing: answers and verdicts that vary with the response, consistent with each other
    monkeypatch.setattr(antisd, "extract_boxed", lambda text: "ABC"[len(text) % 3] if len(text) % 4 else None)
    monkeypatch.setattr(antisd, "verify", lambda response, gold: float(
        response[7:-1] == gold if response.startswith("\\boxed{") else len(response) % 3 == 0 and len(response) % 4 > 0))
    argv = ["--model", "tiny-random", "--device", "cpu", "--benchmarks", "arith,search", "--limit", "3", "--n", "4",
            "--temperature", "0.8", "--top-p", "0.9", "--max-new-tokens", "12", "--batch-size", "5", "--seed", "3",
            "--out-dir", str(tmp_path)]
    evaluation.main(argv)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / "results.json").read_text())
    per_benchmark, mean = reference_results(samples, 4)
    assert len(samples) == 6 and 0 < results["mean"]["avg@4"] < 1 and 0 < results["mean"]["maj@4"]  # the data vary
    assert results["benchmarks"].keys() == per_benchmark.keys()
    for name, metrics in per_benchmark.items():
        assert results["benchmarks"][name] == pytest.approx(metrics, abs=1e-12), name
    assert results["mean"] == pytest.approx(mean, abs=1e-12)
    # each sample is what the evaluation's own settings draw: T 0.8, top-p 0.9, its seed, problem and number
    model, tokenizer = antisd.load_model("tiny-random", torch.device("cpu"))
    model.eval()
    for sample in samples[::3]:
        prompt = antisd.student_prompt_ids(tokenizer, sample["problem"], False)
        for j in (0, 3):
            generator = evaluation.sample_generator(3, sample["benchmark"], sample["index"], j, "cpu")
            ids = redraw_by_hand(model, tokenizer, prompt, generator, 0.8, 0.9, 12)
            assert antisd.decode_response(tokenizer, ids) == sample["responses"][j]
            assert len(ids) == sample["lengths"][j]


# -----------------------------------------------------------------------------
# Infrastructure: data loading, the model, the checker worker, logging, checkpoints, resuming and
# failures, the tiny models and the laptop demo, torchrun + FSDP2, the command line

SMALL_RUN = ["--model", "tiny-random", "--gate-warmup", "1", "--device", "cpu", "--prompts-per-step", "2",
             "--group-size", "2", "--micro-batch-size", "4", "--max-new-tokens", "8"]


def failure_message(capsys, main, argv):
    """What the command line shows for argv: (exit status, text), through the scripts' one wrapper."""
    with pytest.raises(SystemExit) as raised:
        antisd.run_command(main, argv)
    code, err = raised.value.code, capsys.readouterr().err
    return code, (code if isinstance(code, str) else err)


FAST = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(HERE)}


def wait_for(condition, process, seconds=120):
    """Polls until condition() holds; fails with the process's output if it ends first."""
    deadline = time.time() + seconds
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the process ended first:\n{process.stdout.read()[-3000:]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


# -----------------------------------------------------------------------------
# Infrastructure: data loading

def test_unparsable_gold_rows_are_dropped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"problem": "1+1?", "answer": "2"},
            {"problem": "no answer in the solution", "solution": "we give up"},
            {"problem": "2+2?", "solution": r"so \boxed{4}"},
            {"question": "3+3?", "answer": "It is 6.\n#### 6"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    problems, dropped = antisd.load_problems(str(path), seed=0)
    assert dropped == 1
    assert [p["answer"] for p in problems] == ["2", "4", "6"]
    assert problems[2]["solution"].endswith(r"\boxed{6}.")


def test_hub_rows_of_each_training_set_become_problems():
    dapo = ("Solve the following math problem step by step. The last line of your response should be of the "
            "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
            "Let $x$ be 3.\n\nCompute $x^2$.\n\nRemember to put your answer on its own line after \"Answer:\".")
    assert antisd.dapo_problem(dapo) == "Let $x$ be 3.\n\nCompute $x^2$."
    gsm8k = antisd.problem_from_row({"question": "Q?", "answer": "16 - 3 = <<16-3=13>>13 eggs.\n#### 1,300"}, "gsm8k")
    assert gsm8k == {"problem": "Q?", "answer": "1300", "solution": "16 - 3 = 13 eggs.\nThe answer is \\boxed{1300}."}
    math_row = antisd.problem_from_row({"problem": "P", "level": "Level 1", "type": "Algebra",
                                        "solution": "So $x = \\boxed{\\frac{1}{2}}$."}, "math")
    assert math_row["answer"] == "\\frac{1}{2}" and math_row["solution"].startswith("So $x")


def test_dapo_keeps_one_row_of_each_repeated_problem(monkeypatch):
    # DAPO-Math-17k repeats each problem about 100 times, each copy in DAPO's own instruction
    def hub_row(problem, answer):
        return {"data_source": "math_dapo", "reward_model": {"ground_truth": answer, "style": "rule"},
                "prompt": [{"role": "user", "content": antisd.DAPO_PREFIX + " The last line of your response should "
                            "be of the form Answer: $Answer.\n\n" + problem + antisd.DAPO_SUFFIX}]}

    golds = {"What is 1+1?": "2", "Compute 3 * 4.": "12", "Find 10 - 7.": "3"}
    order = ["What is 1+1?", "Compute 3 * 4.", "What is 1+1?", "Find 10 - 7.", "Compute 3 * 4.", "What is 1+1?"]
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: asked.append(args) or datasets.Dataset.from_list(
        [hub_row(problem, golds[problem]) for problem in order]))
    problems, dropped = antisd.load_problems("dapo", seed=0)
    assert asked == [("BytedTsinghua-SIA/DAPO-Math-17k", None)] and dropped == 0
    # by hand: each problem once, in the order of its first row
    assert [(p["problem"], p["answer"]) for p in problems] == [("What is 1+1?", "2"), ("Compute 3 * 4.", "12"),
                                                               ("Find 10 - 7.", "3")]


@pytest.mark.parametrize("content, message", [
    ('{"problem": "1+1?", "answer": "2"}\n\n{"problem": "2+2?", "answer": 4\n', r"bad\.jsonl, line 3: invalid JSON"),
    ('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n', r"bad\.jsonl, line 2: missing field 'answer'"),
    ('{"answer": "2"}\n', r"bad\.jsonl, line 1: missing field 'problem'"),
    ('{"problem": "1+1?", "answer": ""}\n{"problem": "2+2?", "solution": "no box"}\n', r"all 2 rows were dropped"),
])
def test_bad_jsonl_names_the_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        antisd.load_problems(str(path), seed=0)


def test_oversized_problem_or_solution_is_refused_at_load_time_naming_row_and_field(tmp_path, capsys):
    big = "x" * (antisd.MAX_TEXT_CHARS + 1)
    fine = "y" * antisd.MAX_TEXT_CHARS
    write_jsonl(tmp_path / "problem.jsonl", [{"problem": fine, "answer": "1"}, {"problem": big, "answer": "1"}])
    write_jsonl(tmp_path / "solution.jsonl", [{"problem": "P", "solution": fine + big + "\\boxed{1}"}])
    start = time.time()
    with pytest.raises(antisd.UserError, match=r"problem\.jsonl, line 2: field 'problem' has 100,001 characters"):
        antisd.load_problems(str(tmp_path / "problem.jsonl"), seed=0)
    with pytest.raises(antisd.UserError, match=r"solution\.jsonl, line 1: field 'solution' has 200,010 characters"):
        antisd.load_problems(str(tmp_path / "solution.jsonl"), seed=0)
    write_jsonl(tmp_path / "math500.jsonl", [{"problem": big, "answer": "1"}])
    with pytest.raises(antisd.UserError, match=r"math500\.jsonl line 1: field 'problem' has 100,001 characters"):
        evaluation.load_benchmark("math500", data_dir=tmp_path)
    assert time.time() - start < 5


def test_each_epoch_is_a_new_permutation_of_the_problems_and_resumes_where_it_stopped():
    stream = antisd.ProblemStream(10, seed=0)
    epochs = [stream.next(10) for _ in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)  # every problem once per epoch
    assert len({tuple(epoch) for epoch in epochs}) == 3               # a new order each epoch
    assert antisd.ProblemStream(10, seed=1).next(10) != epochs[0]     # and per seed
    half = antisd.ProblemStream(10, seed=0)
    first = half.next(14)                                            # across an epoch's end
    resumed = antisd.ProblemStream(10, seed=0)
    resumed.load_state_dict(half.state_dict())
    assert first + resumed.next(16) == epochs[0] + epochs[1] + epochs[2]


# -----------------------------------------------------------------------------
# Infrastructure: the checker worker

def test_checker_worker_survives_ctrl_c_and_ends_on_terminate_under_the_runs_signal_handlers():
    """A worker (re)started in the step loop inherits its handlers: with them, Ctrl-C would score the
    check in flight 0, and multiprocessing's terminate-then-join at exit would wait forever."""
    import signal
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),   # KeyboardInterrupt
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *a: None)}               # finish the step
    try:
        process, connection = antisd._start_verifier()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        os.kill(process.pid, signal.SIGINT)
        connection.send(("verify", "2", "2"))
        assert connection.poll(10) and connection.recv() is True
        process.terminate()
        process.join(5)
        assert not process.is_alive(), "the worker ignored SIGTERM"
    finally:
        process.kill()
        process.join()


def test_killed_run_leaves_no_checker_worker_and_releases_its_output_pipe(tmp_path):
    """kill -9 of the trainer: the answer-checking worker must exit too, and must not hold the
    trainer's stdout, or `python antisd.py | tee log` would never return."""
    import signal
    # golds that are not plain numbers, so that loading them starts the worker
    write_jsonl(tmp_path / "data.jsonl", [{"problem": "1+1?", "answer": "\\frac{4}{2}"}, {"problem": "2+2?", "answer": "\\frac{8}{2}"}])
    process = subprocess.Popen([sys.executable, str(HERE / "antisd.py"), *SMALL_RUN, "--dataset", str(tmp_path / "data.jsonl"),
                                "--steps", "1000", "--out-dir", str(tmp_path / "run")], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    if not children.exists():
        process.kill()
        pytest.skip("needs Linux /proc to find the worker")
    for line in process.stdout:   # the worker has checked every gold of the dataset by then
        if line.startswith(b"dataset "):
            break
    workers = [int(pid) for pid in children.read_text().split()]
    assert workers, "the checker worker did not start"

    def running(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    try:
        os.kill(process.pid, signal.SIGKILL)
        killed = time.time()
        process.communicate(timeout=30)           # end of file on the pipe: no process holds it any more
        pipe_seconds = time.time() - killed
        while any(running(pid) for pid in workers) and time.time() < killed + 10:
            time.sleep(0.1)
        assert not any(running(pid) for pid in workers), "the checker worker outlived its parent"
        assert pipe_seconds < 10
    finally:   # a failing run must not leave the orphan behind either
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


# -----------------------------------------------------------------------------
# Infrastructure: logging: torn logs, rollouts and their token view, the comparison table

def test_torn_last_log_line_is_dropped_and_a_killed_rewrite_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": step, "loss": 0.5}) + "\n" for step in (1, 2, 3))
    path.write_text(whole + '{"step": 4, "lo')   # killed while writing step 4
    real_replace = os.replace

    def killed(src, dst):
        raise KeyboardInterrupt("killed during the rewrite")
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        antisd.keep_log_lines_up_to(str(path), 2)
    assert path.read_text() == whole + '{"step": 4, "lo'          # the old file, whole
    monkeypatch.setattr(os, "replace", real_replace)
    antisd.keep_log_lines_up_to(str(path), 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert path.read_text().endswith("\n") and not list(tmp_path.glob("*.tmp"))
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')           # damage inside the file is not a torn end
    with pytest.raises(antisd.UserError, match=r"metrics\.jsonl, line 2: not a log line"):
        antisd.keep_log_lines_up_to(str(path), 2)


def test_rollouts_keep_every_token_with_its_u_and_tokens_html_colours_them(tmp_path):
    out = tmp_path / "run"
    antisd.main(["--model", "tiny-random", "--dataset", "arith", "--steps", "2", "--method", "sd", "--group-size", "2",
                 "--prompts-per-step", "2", "--micro-batch-size", "4", "--max-new-tokens", "12", "--out-dir", str(out)])
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    _, tokenizer = tiny_tasks.build_tiny()
    for r in rollouts:
        joined = "".join(text for text, _ in r["tokens"])  # a random model emits broken UTF-8: compare the rest
        assert joined.replace("\ufffd", "") == (r["response"] + "<|im_end|>" * (not r["truncated"])).replace("\ufffd", "")
        us = [u for _, u in r["tokens"]]
        assert min(us) == pytest.approx(r["most_negative_u"][0][1], abs=1e-3) and max(us) == pytest.approx(r["most_positive_u"][0][1], abs=1e-3)
        assert any(u != 0 for u in us)  # sd scores a teacher
    evaluation.show_tokens(str(out), str(tmp_path / "view"))
    page = (tmp_path / "view" / "tokens.html").read_text()
    spans = re.findall(r'<span title="u = ([-+.\d]+)" style="background:rgb\((\d+),(\d+),(\d+)\)">', page)
    assert len(spans) == sum(len(r["tokens"]) for r in rollouts)
    for u, red, green, blue in spans:
        u, red, blue = float(u), int(red), int(blue)
        if abs(u) >= 0.01:  # blue for negative u, red for positive; a shade of white near 0
            assert (blue == 255 and red < 255) if u < 0 else (red == 255 and blue < 255), (u, red, blue)
        else:
            assert min(red, blue) >= 250
    assert "step 1" in page and "step 2" in page and "legend" in page


def test_compare_table_numbers_equal_metrics_jsonl_and_the_figure_is_written(tmp_path):
    runs = []
    for name, rewards in [("grpo", [0.1, 0.5, 0.3]), ("antisd", [0.2, 0.1, 0.4])]:
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": 0, "eval/arith/avg@4": 0.25, "eval/mean/avg@4": 0.25}]
        for step, reward in enumerate(rewards, 1):
            lines.append({"step": step, "reward_mean": reward, "response_length_mean": 40.0 + step, "u_mean": -0.1 * step,
                          "u_p01": -2.0, "u_p99": 1.0, "jsd_mean": 0.01, "teacher_entropy_median": 0.5,
                          "student_entropy_median": 0.6, "lambda": 0.5, "gate_on": 1.0})
        lines[3]["eval/mean/avg@4"] = 0.5 if name == "grpo" else 0.125
        write_jsonl(run / "metrics.jsonl", lines)
        runs.append(str(run))
    evaluation.compare_runs(runs, str(tmp_path / "out"))
    assert (tmp_path / "out" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = {}
    for row in (tmp_path / "out" / "compare.md").read_text().splitlines()[2:]:
        run, metric, first, best, last = [cell.strip() for cell in row.strip("|").split("|")]
        table[run, metric] = (first, best, last)
    assert table["grpo", "reward_mean"] == ("0.1000 (step 1)", "0.5000 (step 2)", "0.3000 (step 3)")
    assert table["antisd", "reward_mean"] == ("0.2000 (step 1)", "0.4000 (step 3)", "0.4000 (step 3)")
    assert table["grpo", "eval/mean/avg@4"] == ("0.2500 (step 0)", "0.5000 (step 3)", "0.5000 (step 3)")
    assert table["antisd", "eval/mean/avg@4"] == ("0.2500 (step 0)", "0.2500 (step 0)", "0.1250 (step 3)")
    assert table["antisd", "u_mean"] == ("-0.1000 (step 1)", "", "-0.3000 (step 3)")


# -----------------------------------------------------------------------------
# Infrastructure: checkpoints, resuming and failures

TIMING_KEYS = {"seconds_generate", "seconds_score", "seconds_update", "generated_tokens_per_second"}
TINY_RUN = ["--model", "tiny-random", "--dataset", "arith", "--gate-warmup", "1", "--device", "cpu"]


def metrics_lines(out_dir):
    lines = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def weights(path):
    from safetensors.torch import load_file
    return load_file(str(Path(path) / "model.safetensors"))


def test_resumed_run_ends_exactly_where_an_uninterrupted_run_does(tmp_path, capsys):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    antisd.main(TINY_RUN + ["--steps", "4", "--save-every", "2", "--lr", "1e-3", "--out-dir", str(straight)])
    antisd.main(TINY_RUN + ["--steps", "2", "--lr", "1e-3", "--out-dir", str(interrupted)])
    capsys.readouterr()
    antisd.main(TINY_RUN + ["--steps", "4", "--lr", "1e-3", "--out-dir", str(interrupted), "--resume"])
    assert f"resumed from {interrupted / 'checkpoint-2'}: continuing at step 3" in capsys.readouterr().out
    assert metrics_lines(straight) == metrics_lines(interrupted)   # steps 1-4, lambda > 0 from step 2
    assert [line["lambda"] for line in metrics_lines(straight)] == [0.0, 0.5, 0.5, 0.5]
    a, b = weights(straight / "checkpoint-4"), weights(interrupted / "checkpoint-4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = weights(straight / "checkpoint-2")
    assert any(not torch.equal(before[k], a[k]) for k in a)          # the steps did change the weights


def test_resume_with_other_settings_is_refused_naming_the_difference(tmp_path):
    antisd.main(TINY_RUN + ["--steps", "1", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--method 'antisd' -> 'grpo'"):
        antisd.main(TINY_RUN + ["--steps", "2", "--method", "grpo", "--out-dir", str(tmp_path), "--resume"])
    with pytest.raises(SystemExit, match="pass --resume to continue it"):
        antisd.main(TINY_RUN + ["--steps", "2", "--out-dir", str(tmp_path)])


def test_resume_refuses_a_changed_term_and_reads_a_checkpoint_from_before_term_existed(tmp_path):
    run = TINY_RUN + ["--max-new-tokens", "4", "--out-dir", str(tmp_path)]
    antisd.main(run + ["--steps", "1"])
    state_file = tmp_path / "checkpoint-1" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    for key in ("term", "lambda_form"):  # as written before these settings existed
        del state["args"][key]
    torch.save(state, state_file)
    with pytest.raises(SystemExit, match=r"--term 'paper' -> 'official'"):
        antisd.main(run + ["--steps", "2", "--resume", "--term", "official"])
    antisd.main(run + ["--steps", "2", "--resume"])  # a checkpoint without the new settings ran with their defaults
    assert [line["step"] for line in metrics_lines(tmp_path)] == [1, 2]


def test_every_setting_either_defines_the_run_or_may_change_on_resume():
    # a new flag must be put on one side: defining (refused when changed on resume) or not
    may_change = {"gen_batch_size", "steps", "micro_batch_size", "eval_every", "eval_benchmarks", "eval_n",
                  "eval_limit", "eval_data_dir", "out_dir", "save_every", "resume", "device"}
    settings = set(vars(step_args()))
    assert settings - may_change == set(antisd.RUN_DEFINING) - {"dataset_fingerprint"}
    assert set(antisd.RUN_DEFINING_ADDED) <= set(antisd.RUN_DEFINING)


def test_resume_restores_the_sibling_choice_of_the_teacher_prompts(tmp_path, monkeypatch):
    # the tiny model never earns reward by itself: half the rollouts are declared correct, so that the
    # teacher's solution is a sibling drawn at random (M7), and that draw changes u, the loss and the weights
    monkeypatch.setattr(antisd, "verify", lambda text, gold: float(sum(map(ord, text)) % 2))
    prompts = []
    real_build = antisd.build_teacher_prompt
    monkeypatch.setattr(antisd, "build_teacher_prompt", lambda *a, **k: prompts.append(real_build(*a, **k)) or prompts[-1])
    run = small_run(tmp_path) + ["--lr", "1e-3"]
    antisd.main(run + ["--steps", "2", "--out-dir", str(tmp_path / "straight")])
    straight_prompts, prompts[:] = prompts[8:], []
    antisd.main(run + ["--steps", "1", "--out-dir", str(tmp_path / "resumed")])
    prompts[:] = []
    antisd.main(run + ["--steps", "2", "--out-dir", str(tmp_path / "resumed"), "--resume"])
    assert any("Your answer is correct." in p for p in straight_prompts)
    assert prompts == straight_prompts                                   # step 2 saw the same siblings
    assert metrics_lines(tmp_path / "straight") == metrics_lines(tmp_path / "resumed")
    for name in ("rollouts.jsonl",):
        assert (tmp_path / "straight" / name).read_text() == (tmp_path / "resumed" / name).read_text()


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    real_replace = os.replace
    saves = []

    def replace_then_die(src, dst):
        saves.append(dst)
        if len(saves) == 2:   # the second save dies after its temporary folder is written
            raise KeyboardInterrupt("killed during save")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        antisd.main(TINY_RUN + ["--steps", "3", "--save-every", "1", "--out-dir", str(tmp_path)])
    monkeypatch.setattr(os, "replace", real_replace)
    assert antisd.list_checkpoints(tmp_path) == [str(tmp_path / "checkpoint-1")]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-1")
    antisd.main(TINY_RUN + ["--steps", "2", "--out-dir", str(tmp_path), "--resume"])
    assert [line["step"] for line in metrics_lines(tmp_path)] == [1, 2]


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    antisd.main(TINY_RUN + ["--steps", "4", "--save-every", "1", "--out-dir", str(tmp_path)])
    assert antisd.list_checkpoints(tmp_path) == [str(tmp_path / "checkpoint-3"), str(tmp_path / "checkpoint-4")]
    assert not list(tmp_path.glob("*.tmp"))


def test_nan_steps_are_not_applied_and_stop_the_run(tmp_path, monkeypatch):
    antisd.main(TINY_RUN + ["--steps", "1", "--out-dir", str(tmp_path)])
    good = weights(tmp_path / "checkpoint-1")
    real_loss = antisd.policy_loss
    monkeypatch.setattr(antisd, "policy_loss",
                        lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), real_loss(*a, **k)[1]))
    with pytest.raises(SystemExit, match="3 consecutive steps had a non-finite loss"):
        antisd.main(TINY_RUN + ["--steps", "10", "--save-every", "1", "--out-dir", str(tmp_path), "--resume"])
    lines = metrics_lines(tmp_path)
    assert [line["update_applied"] for line in lines] == [True, False, False, False]
    assert lines[1]["loss"] is None   # written as null, not NaN
    assert antisd.list_checkpoints(tmp_path)[-1] == str(tmp_path / "checkpoint-3")
    after = weights(tmp_path / "checkpoint-3")   # saved after two refused steps: weights unchanged
    assert all(torch.equal(good[k], after[k]) for k in good)


@pytest.mark.parametrize("phase, flag", [("generate", "--gen-batch-size 16"), ("policy_gradient", "--micro-batch-size 8")])
def test_out_of_memory_names_the_flag_to_lower(tmp_path, monkeypatch, phase, flag):
    def run_out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(antisd, phase, run_out_of_memory)
    with pytest.raises(SystemExit, match=f"with {flag}: lower {flag.split()[0]}"):
        antisd.main(TINY_RUN + ["--steps", "1", "--out-dir", str(tmp_path)])


def test_interrupted_run_saves_and_says_how_to_resume(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    out_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "antisd.py", *TINY_RUN, "--steps", "1000", "--out-dir", str(out_dir)],
                               cwd=Path(__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = out_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    steps = len(metrics.read_text().splitlines())
    assert f"stopped after step {steps}, saved {out_dir / f'checkpoint-{steps}'}" in output
    assert "--resume" in output
    assert antisd.list_checkpoints(out_dir) == [str(out_dir / f"checkpoint-{steps}")]


# a finished two-step run on a small local dataset, with a checkpoint after each step; tests copy it
@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("two_step_run")
    write_jsonl(base / "data.jsonl", [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(8)])
    cwd = os.getcwd()
    os.chdir(base)   # relative paths: a copy of the folder is the same run
    try:
        antisd.main(SMALL_RUN + ["--dataset", "data.jsonl", "--steps", "2", "--save-every", "1", "--lr", "1e-3",
                                 "--out-dir", "run"])
    finally:
        os.chdir(cwd)
    return base


def copy_of(run, tmp_path, monkeypatch):
    import shutil
    shutil.copytree(run, tmp_path / "copy")
    monkeypatch.chdir(tmp_path / "copy")
    return Path("run")


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("damage, named", [
    (lambda c: truncate(c / "trainer_state.pt"), r"checkpoint-2/trainer_state\.pt cannot be read"),
    (lambda c: truncate(c / "model.safetensors"), r"checkpoint-2/model\.safetensors cannot be read"),
    (lambda c: (c / "model.safetensors").unlink(), r"checkpoint-2: model\.safetensors missing"),
    (lambda c: (c / "config.json").unlink(), r"checkpoint-2: config\.json missing"),
    (lambda c: (c / "tokenizer.json").unlink(), r"checkpoint-2: tokenizer\.json missing"),
    (lambda c: (c / "trainer_state.pt").unlink(), r"checkpoint-2: trainer_state\.pt missing"),
    (lambda c: truncate(c / "config.json"), r"checkpoint-2/config\.json cannot be read"),
])
def test_each_kind_of_damaged_checkpoint_is_named(two_step_run, tmp_path, monkeypatch, damage, named):
    run = copy_of(two_step_run, tmp_path, monkeypatch)
    damage(run / "checkpoint-2")
    with pytest.raises(antisd.UserError, match=named):
        antisd.load_checkpoint(str(run / "checkpoint-2"), torch.device("cpu"))
    state, model, tokenizer = antisd.load_checkpoint(str(run / "checkpoint-1"), torch.device("cpu"))
    assert state["step"] == 1 and tokenizer.padding_side == "left"


def test_resume_falls_back_from_a_damaged_checkpoint_and_redoes_its_step_exactly(two_step_run, tmp_path,
                                                                                 monkeypatch, capsys):
    run = copy_of(two_step_run, tmp_path, monkeypatch)
    logged = metrics_lines(run)
    saved = weights(run / "checkpoint-2")
    truncate(run / "checkpoint-2" / "trainer_state.pt")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward_me')                      # and a torn line from the kill
    capsys.readouterr()
    antisd.main(SMALL_RUN + ["--dataset", "data.jsonl", "--steps", "2", "--save-every", "1", "--lr", "1e-3",
                             "--out-dir", "run", "--resume"])
    out, err = capsys.readouterr()
    assert "checkpoint run/checkpoint-2 is damaged: run/checkpoint-2/trainer_state.pt cannot be read" in err
    assert "resumed from run/checkpoint-1: continuing at step 2" in out
    assert metrics_lines(run) == logged                         # step 2 redone, bit for bit
    again = weights(run / "checkpoint-2")
    assert all(torch.equal(saved[k], again[k]) for k in saved)

    for checkpoint in ("checkpoint-1", "checkpoint-2"):         # none whole: say which files
        (run / checkpoint / "config.json").unlink()
    code, text = failure_message(capsys, antisd.main, SMALL_RUN + ["--dataset", "data.jsonl", "--steps", "3",
                                                                    "--lr", "1e-3", "--out-dir", "run", "--resume"])
    assert re.search(r"no checkpoint is whole: run/checkpoint-2: config\.json missing; "
                     r"run/checkpoint-1: config\.json missing", code), code


class WritesAFileWhenUnpickled:
    """A pickled object that runs code when loaded: what a shared or downloaded checkpoint could hold."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "the payload ran"))


def test_a_trainer_state_holding_code_is_never_run_and_counts_as_damaged(two_step_run, tmp_path, monkeypatch, capsys):
    run = copy_of(two_step_run, tmp_path, monkeypatch)
    witness = tmp_path / "payload-ran"
    state_file = run / "checkpoint-2" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["extra"] = WritesAFileWhenUnpickled(witness)
    torch.save(state, state_file)
    with pytest.raises(antisd.UserError, match=r"checkpoint-2/trainer_state\.pt cannot be read"):
        antisd.load_checkpoint(str(run / "checkpoint-2"), torch.device("cpu"))
    antisd.main(SMALL_RUN + ["--dataset", "data.jsonl", "--steps", "2", "--save-every", "1", "--lr", "1e-3",
                             "--out-dir", "run", "--resume"])
    assert "resumed from run/checkpoint-1" in capsys.readouterr().out   # the one before it, whole
    assert not witness.exists()


def test_resume_on_an_edited_dataset_is_refused(two_step_run, tmp_path, monkeypatch):
    run = copy_of(two_step_run, tmp_path, monkeypatch)
    rows = antisd.read_jsonl("data.jsonl")
    rows[5]["answer"] = "11"
    write_jsonl(Path("data.jsonl"), rows)
    with pytest.raises(SystemExit, match=r"different settings: the problems of --dataset \(fingerprint\) '\w+' -> '\w+'"):
        antisd.main(SMALL_RUN + ["--dataset", "data.jsonl", "--steps", "3", "--lr", "1e-3", "--out-dir", "run", "--resume"])
    assert antisd.list_checkpoints(run) == ["run/checkpoint-1", "run/checkpoint-2"]


# one run per --out-dir

RUN = SMALL_RUN + ["--dataset", "arith", "--save-every", "1"]


def test_a_second_run_into_a_busy_out_dir_is_refused_naming_the_holder_and_a_killed_run_does_not_block_resume(
        tmp_path, capsys):
    out_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(HERE / "antisd.py")] + RUN + ["--steps", "100000", "--out-dir", str(out_dir)],
                             env=FAST, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (out_dir / "checkpoint-1").is_dir(), first)
        for again in ([], ["--resume"]):
            code, text = failure_message(capsys, antisd.main, RUN + ["--steps", "1", "--out-dir", str(out_dir)] + again)
            assert text.startswith(f"error: --out-dir {out_dir} is in use by another run: process {first.pid} on ")
            assert "\n" not in text.strip()
        assert first.poll() is None                                 # the first run goes on
        os.kill(first.pid, signal.SIGKILL)                          # and dies without letting go of anything
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    assert str(first.pid) in (out_dir / antisd.LOCK_FILE).read_text()   # its pid stays in the file
    capsys.readouterr()
    antisd.main(RUN + ["--steps", "2", "--out-dir", str(out_dir), "--resume"])
    assert "resumed from" in capsys.readouterr().out
    assert (out_dir / antisd.LOCK_FILE).read_text().startswith(f"{os.getpid()} on ")


# a full disk

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def short_write(*args, **kwargs):  # what torch.save raises on a full disk
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 876992 vs 876880")


@pytest.mark.parametrize("failure, reason", [(enospc, r"No space left on device \[errno 28\]"),
                                             (short_write, r"RuntimeError: \[enforce fail at inline_container")])
def test_a_save_on_a_full_disk_ends_in_one_paragraph_and_leaves_no_partial_checkpoint(tmp_path, capsys, monkeypatch,
                                                                                     failure, reason):
    real_save, saves = torch.save, []

    def save_fills_the_disk(state, path, *args, **kwargs):
        saves.append(path)
        if "checkpoint-2" in str(path):
            failure()
        return real_save(state, path, *args, **kwargs)
    monkeypatch.setattr(antisd.torch, "save", save_fills_the_disk)
    run = tmp_path / "run"
    code, text = failure_message(capsys, antisd.main, RUN + ["--steps", "3", "--out-dir", str(run)])
    assert re.fullmatch(rf"error: could not write checkpoint-2 \({run}/checkpoint-2\.tmp: {reason}.*\); {run} has "
                        rf"[\d.,]+ [MG]B free of [\d.,]+ [MG]B and a checkpoint takes [\d.]+ MB; the newest whole checkpoint "
                        rf"is {run}/checkpoint-1: free some space \(or move --out-dir\), then --resume continues from "
                        rf"it \(the partial checkpoint-2\.tmp was removed\)", text), text
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-1"]


def test_a_log_write_on_a_full_disk_ends_in_one_paragraph(tmp_path, capsys, monkeypatch):
    disk_full_at(monkeypatch, "metrics.jsonl", b'"step": 2,')
    run = tmp_path / "run"
    code, text = failure_message(capsys, antisd.main, RUN + ["--steps", "3", "--out-dir", str(run)])
    assert text.startswith(f"error: could not write the log line of step 2 ({run}/metrics.jsonl: No space left on "
                           f"device [errno 28]); {run} has "), text
    assert text.endswith(f"the newest whole checkpoint is {run}/checkpoint-1: free some space (or move --out-dir), "
                         f"then --resume continues from it"), text
    assert [line["step"] for line in metrics_lines(run)] == [1]


def test_a_real_full_disk_ends_in_one_paragraph_and_frees_the_partial_checkpoint(tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        run = disk / "run"
        code, text = failure_message(capsys, antisd.main, RUN + ["--steps", "10", "--out-dir", str(run)])
        assert re.match(rf"error: could not write checkpoint-(\d+) \({run}/checkpoint-\1\.tmp: ", text), text
        newest = antisd.list_checkpoints(str(run))[-1]
        assert f"the newest whole checkpoint is {newest}:" in text and "was removed" in text
        assert not list(run.glob("*.tmp"))
        free = float(re.search(r"has ([\d.]+) MB free", text).group(1))
        assert abs(free - shutil.disk_usage(run).free / 2**20) < 0.1   # measured after the removal
    finally:
        held = getattr(antisd, "_held_locks", {})
        for path in [p for p in held if p.startswith(str(disk))]:  # this process's lock on the run
            held.pop(path).close()
        subprocess.run(["umount", str(disk)], check=True)


# checkpoints written by another version


def edit_state(path, edit):
    state = torch.load(path, weights_only=False)
    edit(state)
    torch.save(state, path)


@pytest.mark.parametrize("edit, named", [
    (lambda s: s.pop("gate"), r"missing 'gate'"),
    (lambda s: s.update(new_field=1), r"unexpected 'new_field'"),
    (lambda s: s.update(step="2"), r"'step' is a str, expected int"),
    (lambda s: s.update(format=1), r"written by an older format \(1\) than this antisd\.py reads \(2\)$"),
    (lambda s: s.update(format=3), r"written by a newer format \(3\)"),
])
def test_a_trainer_state_of_another_version_is_named(two_step_run, tmp_path, monkeypatch, edit, named):
    run = copy_of(two_step_run, tmp_path, monkeypatch)
    edit_state(run / "checkpoint-2" / "trainer_state.pt", edit)
    with pytest.raises(antisd.UserError, match=r"checkpoint-2/trainer_state\.pt does not fit this version of "
                                               r"antisd\.py \(format 2\): .*" + named):
        antisd.load_checkpoint(str(run / "checkpoint-2"), torch.device("cpu"))


def test_a_trainer_state_written_before_formats_were_recorded_still_loads(two_step_run, tmp_path, monkeypatch):
    run = copy_of(two_step_run, tmp_path, monkeypatch)
    edit_state(run / "checkpoint-2" / "trainer_state.pt", lambda s: s.pop("format"))
    state, _, _ = antisd.load_checkpoint(str(run / "checkpoint-2"), torch.device("cpu"))
    assert state["step"] == 2
    assert antisd.CHECKPOINT_FORMAT == 2 and set(antisd.TRAINER_STATE_TYPES) - set(state) == {"format"}


def test_resume_falls_back_from_a_trainer_state_of_another_version_and_redoes_its_step(two_step_run, tmp_path,
                                                                                     monkeypatch, capsys):
    run = copy_of(two_step_run, tmp_path, monkeypatch)
    logged, saved = metrics_lines(run), weights(run / "checkpoint-2")
    edit_state(run / "checkpoint-2" / "trainer_state.pt", lambda s: s.pop("gate"))
    capsys.readouterr()
    argv = SMALL_RUN + ["--dataset", "data.jsonl", "--steps", "2", "--save-every", "1", "--lr", "1e-3", "--out-dir", "run"]
    antisd.main(argv + ["--resume"])
    out, err = capsys.readouterr()
    assert ("checkpoint run/checkpoint-2 is damaged: run/checkpoint-2/trainer_state.pt does not fit this version "
            "of antisd.py (format 2): missing 'gate'; trying the one before it") in err
    assert "resumed from run/checkpoint-1: continuing at step 2" in out
    assert metrics_lines(run) == logged
    again = weights(run / "checkpoint-2")
    assert all(torch.equal(saved[k], again[k]) for k in saved)
    for checkpoint in ("checkpoint-1", "checkpoint-2"):             # none whole: one paragraph naming both
        edit_state(run / checkpoint / "trainer_state.pt", lambda s: s.pop("stream"))
    code, text = failure_message(capsys, antisd.main, argv + ["--steps", "3", "--resume"])
    assert text == ("error: --resume: no checkpoint is whole: run/checkpoint-2/trainer_state.pt does not fit this "
                    "version of antisd.py (format 2): missing 'stream'; run/checkpoint-1/trainer_state.pt does not "
                    "fit this version of antisd.py (format 2): missing 'stream'"), text


# -----------------------------------------------------------------------------
# Infrastructure: trust what is loaded and what is reported

def saved_tiny_model(folder, seed=0, pickled=False):
    model, tokenizer = tiny_tasks.build_tiny(seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if pickled:  # as older transformers wrote them (transformers 5 writes safetensors only)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("script", ["antisd", "eval"])
def test_a_model_folder_with_only_pickled_weights_is_refused_in_one_paragraph(tmp_path, capsys, script):
    folder = saved_tiny_model(tmp_path / "pickled", pickled=True)
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    argv = (TINY_RUN[2:] + ["--model", str(folder), "--steps", "1", "--eval-every", "0", "--out-dir", str(tmp_path / "run")]
            if script == "antisd" else EVAL[2:] + ["--model", str(folder), "--limit", "2", "--out-dir", str(tmp_path / "e")])
    code, text = failure_message(capsys, antisd.main if script == "antisd" else evaluation.main, argv)
    assert re.fullmatch(r"error: --model .*pickled: its weights are only in a pickle \(pytorch_model\.bin\), which can "
                        r"run code when it is loaded, so it is not read\. .*", code)


@pytest.mark.parametrize("script", ["antisd", "eval"])
def test_a_model_folder_with_nan_weights_is_refused_naming_it(tmp_path, capsys, script):
    model, tokenizer = tiny_tasks.build_tiny(seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    tokenizer.save_pretrained(tmp_path / "nan")
    argv = (TINY_RUN[2:] + ["--model", str(tmp_path / "nan"), "--steps", "1", "--eval-every", "0", "--out-dir", str(tmp_path / "run")]
            if script == "antisd" else EVAL[2:] + ["--model", str(tmp_path / "nan"), "--limit", "2", "--out-dir", str(tmp_path / "e")])
    code, text = failure_message(capsys, antisd.main if script == "antisd" else evaluation.main, argv)
    assert re.fullmatch(r"error: --model .*nan: 1 weight tensor\(s\) hold NaN or inf values "
                        r"\(model\.layers\.1\.mlp\.up_proj\.weight\): the model is damaged", code), code


def test_a_checkpoint_with_non_finite_master_weights_counts_as_damaged(two_step_run, tmp_path, monkeypatch, capsys):
    run = copy_of(two_step_run, tmp_path, monkeypatch)
    state_file = run / "checkpoint-2" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["optimizer"]["master"][4][0] = float("inf")
    torch.save(state, state_file)
    antisd.main(SMALL_RUN + ["--dataset", "data.jsonl", "--steps", "2", "--save-every", "1", "--lr", "1e-3",
                             "--out-dir", "run", "--resume"])
    out, err = capsys.readouterr()
    assert "checkpoint run/checkpoint-2 is damaged: run/checkpoint-2/trainer_state.pt: the float32 master " \
           "weights hold NaN or inf values" in err
    assert "resumed from run/checkpoint-1: continuing at step 2" in out


def test_resume_with_steps_at_or_below_the_newest_checkpoint_says_so_instead_of_done(two_step_run, tmp_path,
                                                                                    monkeypatch, capsys):
    run = copy_of(two_step_run, tmp_path, monkeypatch)
    argv = SMALL_RUN + ["--dataset", "data.jsonl", "--save-every", "1", "--lr", "1e-3", "--out-dir", "run", "--resume"]
    logged = metrics_lines(run)
    antisd.main(argv + ["--steps", "2"])
    out = capsys.readouterr().out
    assert "the run is complete: run/checkpoint-2 is step 2 of --steps 2; nothing to do" in out and "done:" not in out
    code, text = failure_message(capsys, antisd.main, argv + ["--steps", "1"])
    assert code == ("error: --resume --steps 1: the newest whole checkpoint, run/checkpoint-2, is already at step 2; "
                    "nothing was run. Pass --steps 3 or more to train further, or use run/checkpoint-2 as it is")
    assert metrics_lines(run) == logged and sorted(os.listdir(run)) == sorted(os.listdir(two_step_run / "run"))


@pytest.mark.parametrize("damage, missing", [(lambda path: path.unlink(), "1-2"),
                                             (lambda path: path.write_text(path.read_text().splitlines()[0] + "\n"), "2")])
def test_a_resumed_run_names_the_steps_its_log_is_missing(two_step_run, tmp_path, monkeypatch, capsys, damage, missing):
    run = copy_of(two_step_run, tmp_path, monkeypatch)
    damage(run / "metrics.jsonl")
    antisd.main(SMALL_RUN + ["--dataset", "data.jsonl", "--steps", "3", "--save-every", "1", "--lr", "1e-3",
                             "--out-dir", "run", "--resume"])
    err = capsys.readouterr().err
    assert (f"warning: run/metrics.jsonl has no line for step(s) {missing}, which the checkpoint has already trained: "
            f"the resumed log will have a gap there") in err
    assert [line["step"] for line in metrics_lines(run)] == ([3] if missing == "1-2" else [1, 3])
    assert antisd.step_ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"


def test_two_evaluations_never_share_an_out_dir(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, antisd; antisd.lock_out_dir(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(tmp_path / "e")],
                              env=FAST, cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, text = failure_message(capsys, evaluation.main, EVAL + ["--limit", "2", "--out-dir", str(tmp_path / "e")])
        assert code.startswith(f"error: --out-dir {tmp_path / 'e'} is in use by another run: process {holder.pid} on ")
        assert not (tmp_path / "e" / "samples.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_resumed_evaluation_refuses_a_model_whose_weights_changed(tmp_path, capsys):
    folder = saved_tiny_model(tmp_path / "model", seed=0)
    argv = EVAL[2:] + ["--model", str(folder), "--limit", "3", "--out-dir", str(tmp_path / "e")]
    evaluation.main(argv)
    (tmp_path / "e" / "results.json").unlink()                       # as if killed before the end
    evaluation.main(argv + ["--resume"])                             # the same model: accepted
    saved_tiny_model(tmp_path / "model", seed=1)                     # another model in the same folder
    code, text = failure_message(capsys, evaluation.main, argv + ["--resume"])
    assert re.fullmatch(rf"error: refusing to resume the evaluation in {re.escape(str(tmp_path / 'e'))}: --model "
                        rf".*model is not the model it started with \(its weights or config changed: fingerprint "
                        rf"[0-9a-f]{{16}} -> [0-9a-f]{{16}}\); evaluate it into another --out-dir", code), code


def one_paragraph(capsys, main, argv):
    code, text = failure_message(capsys, main, argv)
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code and "Traceback" not in code, code
    return code


def test_bad_inputs_to_eval_and_antisd_are_one_paragraph_each(tmp_path, capsys):
    (tmp_path / "not_a_run").mkdir()
    assert "not_a_run: no metrics.jsonl" in one_paragraph(capsys, evaluation.main, ["--compare", str(tmp_path / "not_a_run")])
    assert "not_a_run: no rollouts.jsonl" in one_paragraph(capsys, evaluation.main, ["--show", str(tmp_path / "not_a_run")])
    write_jsonl(tmp_path / "not_a_run" / "rollouts.jsonl", [{"step": 1, "reward": 0, "problem": "p", "response": "x"}])
    assert "no rollout has per-token u" in one_paragraph(capsys, evaluation.main, ["--show", str(tmp_path / "not_a_run")])
    assert "arith: the benchmark has 500 problems; a limit of 600" in one_paragraph(
        capsys, evaluation.main, EVAL + ["--limit", "600", "--out-dir", str(tmp_path / "e600")])
    assert "arith: the benchmark has 500 problems; a limit of 600" in one_paragraph(
        capsys, antisd.main, TINY_RUN + ["--steps", "1", "--eval-every", "1", "--eval-benchmarks", "arith",
                                         "--eval-limit", "600", "--out-dir", str(tmp_path / "r600")])
    evaluation.main(EVAL + ["--limit", "2", "--out-dir", str(tmp_path / "e")])
    (tmp_path / "e" / "settings.json").write_text("[1, 2]")
    assert "settings.json holds a JSON list, not the settings of an evaluation" in one_paragraph(
        capsys, evaluation.main, EVAL + ["--limit", "2", "--out-dir", str(tmp_path / "e"), "--resume"])


@pytest.mark.parametrize("damage", ["tokenizer.json", "config.json", "model.safetensors"])
def test_a_damaged_file_of_a_model_folder_is_one_paragraph_in_both_scripts(tmp_path, capsys, damage):
    folder = saved_tiny_model(tmp_path / "model")
    (folder / damage).write_bytes((folder / damage).read_bytes()[:100])
    for main, argv in [(antisd.main, TINY_RUN[2:] + ["--model", str(folder), "--steps", "1", "--eval-every", "0",
                                                     "--out-dir", str(tmp_path / "run")]),
                       (evaluation.main, EVAL[2:] + ["--model", str(folder), "--limit", "2", "--out-dir", str(tmp_path / "e")])]:
        assert re.match(r"error: --model .*model: could not load it \(from its local folder\)", one_paragraph(capsys, main, argv))


def test_run_logs_of_another_shape_are_named_by_compare_and_show(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", [{"step": 1, "reward_mean": 0.5}, {"reward_mean": 0.7}])
    assert "metrics.jsonl, line 2: not a metrics line of antisd.py (no integer 'step')" in one_paragraph(
        capsys, evaluation.main, ["--compare", str(run), "--out-dir", str(tmp_path / "out")])
    write_jsonl(run / "rollouts.jsonl", [{"step": 1, "reward": 1, "problem": "p", "tokens": [["a", 0.5]]},
                                         {"step": 2, "reward": 0, "problem": "p", "tokens": [["a", "b", 1]]}])
    assert "rollouts.jsonl, line 2: not a rollout line of antisd.py" in one_paragraph(
        capsys, evaluation.main, ["--show", str(run), "--out-dir", str(tmp_path / "out")])


@pytest.mark.parametrize("row, reason", [('{"problem": "1+1?", "answer": ' + "7" * 5000 + '}', r"Exceeds the limit \(4300 digits\)"),
                                         ('{"problem": "1+1?", "answer": ' + "[" * 100_000 + "]" * 100_000 + '}', "nested too deeply")])
def test_a_row_that_json_cannot_read_is_one_paragraph_through_every_reader(tmp_path, capsys, row, reason):
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_text('{"problem": "2+2?", "answer": "4"}\n' + row + "\n")
    (data / "math500.jsonl").write_text((data / "rows.jsonl").read_text())
    expected = r"rows\.jsonl, line 2: JSON that cannot be read \(.*" + reason
    assert re.search(expected, one_paragraph(capsys, antisd.main, TINY_RUN[:2] + TINY_RUN[4:] + [
        "--dataset", str(data / "rows.jsonl"), "--steps", "1", "--out-dir", str(tmp_path / "run")]))
    assert re.search(expected.replace("rows", "math500"), one_paragraph(capsys, evaluation.main, EVAL[:4] + [
        "--benchmarks", "math500", "--data-dir", str(data), "--out-dir", str(tmp_path / "e")]))
    assert re.search(expected.replace("rows", "math500"), one_paragraph(capsys, antisd.main, TINY_RUN + [
        "--steps", "1", "--eval-every", "1", "--eval-benchmarks", "math500", "--eval-data-dir", str(data),
        "--out-dir", str(tmp_path / "run2")]))


# -----------------------------------------------------------------------------
# Failures found by the program: every write of a run fails in turn
#
# FailingWrites counts the file-system writes a run makes under its output folder (opening a file to
# write or append, os.write, renaming into place, creating a folder, torch.save, a safetensors save)
# and makes the N-th raise OSError. For every N a run reaches, the run must end in one paragraph
# naming the path and the cause, and the folder must then resume (or start again, where nothing was
# saved) to exactly where an uninterrupted run ends. The points are found at run time: a new write
# is covered without a new test. README's test command tries a spread subset; ANTISD_EVERY_FAULT=1
# tries every point with every errno (python -m pytest -q test_antisd.py -k every_write).

def what_the_command_line_shows(main, argv, capsys):
    """(the one-paragraph message, or None when main returned; stderr) of main(argv) through run_command.
    Any other exception is reported as a traceback: what these tests look for."""
    capsys.readouterr()
    try:
        antisd.run_command(main, argv)
        message = None
    except SystemExit as stop:
        message = str(stop.code)
    except Exception as exc:  # noqa: BLE001
        message = f"traceback: {type(exc).__name__}: {exc}"
    return message, capsys.readouterr().err


WRITE_ERRORS = [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EIO]


class FailingWrites:
    def __init__(self, monkeypatch, root, fail_at=None, error=errno.ENOSPC):
        import builtins
        import safetensors.torch
        import transformers.modeling_utils
        self.root, self.fail_at, self.error, self.seen = str(Path(root).resolve()), fail_at, error, []
        fd_path = lambda fd: os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) else fd
        writing = lambda mode: any(c in mode for c in "wax+")
        for owner, name, path_of in [
                (builtins, "open", lambda a, k: a[0] if writing(a[1] if len(a) > 1 else k.get("mode", "r")) else None),
                (os, "write", lambda a, k: fd_path(a[0])),
                (os, "replace", lambda a, k: a[1]), (os, "rename", lambda a, k: a[1]),
                (os, "makedirs", lambda a, k: a[0]), (os, "mkdir", lambda a, k: a[0]),
                (torch, "save", lambda a, k: a[1] if len(a) > 1 else k.get("f")),
                (safetensors.torch, "save_file", lambda a, k: a[1] if len(a) > 1 else k.get("filename")),
                (transformers.modeling_utils, "safe_save_file", lambda a, k: a[1] if len(a) > 1 else k.get("filename"))]:
            monkeypatch.setattr(owner, name, self.counted(name, getattr(owner, name), path_of))

    def counted(self, name, real, path_of):
        def write(*args, **kwargs):
            path = path_of(args, kwargs)
            if name in ("makedirs", "mkdir") and os.path.isdir(path):
                path = None  # an existing folder: nothing is written (os.makedirs itself ignores the error)
            if isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(self.root + os.sep):
                self.seen.append((name, os.path.relpath(os.path.abspath(path), self.root)))
                if len(self.seen) == self.fail_at:
                    raise OSError(self.error, os.strerror(self.error), os.fspath(path))
            return real(*args, **kwargs)
        return write


FAULT_RUN = TINY_RUN + ["--steps", "3", "--save-every", "2", "--eval-every", "2", "--eval-benchmarks", "arith",
                        "--eval-limit", "2", "--eval-n", "2", "--max-new-tokens", "8"]
FAULT_EVAL = EVAL + ["--limit", "3"]


def training_result(out):
    return metrics_lines(out), {name: value.tolist() for name, value in weights(out / "checkpoint-3").items()}


def evaluation_result(out):
    results = json.loads((out / "results.json").read_text())
    return results["benchmarks"], results["mean"], (out / "samples.jsonl").read_text()


def interrupted_evaluation(out):
    evaluation.main(FAULT_EVAL + ["--out-dir", str(out)])
    (out / "results.json").unlink()                                  # as if killed after the first problem
    (out / "samples.jsonl").write_text((out / "samples.jsonl").read_text().splitlines()[0] + "\n")


@functools.lru_cache(maxsize=None)
def logged_run():
    """A finished run's folder, made once, for --compare and --show to read."""
    out = Path(tempfile.mkdtemp()) / "logged"
    antisd.main(FAULT_RUN + ["--out-dir", str(out)])
    return out


def compare_and_show(out):
    evaluation.main(["--compare", str(out.parent / "logged"), "--show", str(out.parent / "logged"), "--out-dir", str(out)])


# scenario: (what runs before the faults, the command that meets them, the command that recovers, what
# must then equal an uninterrupted run's)
FAULT_SCENARIOS = {
    "training": (lambda out: None, lambda out: antisd.main(FAULT_RUN + ["--out-dir", str(out)]),
                 lambda out: antisd.main(FAULT_RUN + ["--out-dir", str(out)] + (
                     ["--resume"] if antisd.list_checkpoints(str(out)) else [])), training_result),
    "resumed training": (lambda out: antisd.main(FAULT_RUN + ["--steps", "2", "--out-dir", str(out)]),  # the last --steps counts
                         lambda out: antisd.main(FAULT_RUN + ["--out-dir", str(out), "--resume"]),
                         lambda out: antisd.main(FAULT_RUN + ["--out-dir", str(out), "--resume"]), training_result),
    "evaluation": (lambda out: None, lambda out: evaluation.main(FAULT_EVAL + ["--out-dir", str(out)]),
                   lambda out: evaluation.main(FAULT_EVAL + ["--out-dir", str(out)] + (
                       ["--resume"] if (out / "samples.jsonl").exists() and not (out / "results.json").exists() else [])),
                   evaluation_result),
    "resumed evaluation": (interrupted_evaluation, lambda out: evaluation.main(FAULT_EVAL + ["--out-dir", str(out), "--resume"]),
                           lambda out: evaluation.main(FAULT_EVAL + ["--out-dir", str(out), "--resume"]), evaluation_result),
    "compare and show": (lambda out: shutil.copytree(logged_run(), out.parent / "logged"), compare_and_show,
                         compare_and_show, lambda out: ((out / "compare.md").read_text(),
                                                        (out / "tokens.html").read_text().replace(str(out.parent), ""))),
}


def every_write_points(total, scenario):
    """All points with ANTISD_EVERY_FAULT=1, else the first and the last (and for training the middle),
    the errors taking turns (README's test command stays within its time)."""
    if os.environ.get("ANTISD_EVERY_FAULT") == "1":
        return [(n, error) for n in range(1, total + 1) for error in WRITE_ERRORS]
    chosen = sorted({1, (total + 1) // 2, total} if scenario == "training" else {1, total})
    return [(n, WRITE_ERRORS[(k + len(scenario)) % len(WRITE_ERRORS)]) for k, n in enumerate(chosen)]


@pytest.mark.parametrize("scenario", list(FAULT_SCENARIOS))
def test_every_write_can_fail_in_one_paragraph_and_the_folder_then_ends_where_an_uninterrupted_run_ends(
        tmp_path, monkeypatch, capsys, scenario):
    prepare, command, recover, result = FAULT_SCENARIOS[scenario]
    baseline = tmp_path / "baseline" / "out"
    baseline.parent.mkdir()
    prepare(baseline)
    with monkeypatch.context() as patch:
        counter = FailingWrites(patch, baseline.parent)
        command(baseline)
    expected, total = result(baseline), len(counter.seen)
    assert total >= 3, counter.seen   # the fixture sees the writes
    problems = []
    for n, error in every_write_points(total, scenario):
        folder = tmp_path / f"fail-{n}-{errno.errorcode[error]}"
        out = folder / "out"
        folder.mkdir()
        prepare(out)
        with monkeypatch.context() as patch:
            faults = FailingWrites(patch, folder, fail_at=n, error=error)
            message, err = what_the_command_line_shows(command, out, capsys)
        message = message or "(no failure: exit 0)"
        if len(faults.seen) < n:  # a fault met earlier than expected: the same run wrote less
            problems.append(f"write {n}: the run made only {len(faults.seen)} writes ({message!r})")
            continue
        operation, path = faults.seen[n - 1]
        named = (Path(os.path.relpath(folder / path, out)).parts or (".",))[0]  # the run's file or folder
        if not (message.startswith("error: ") and "\n" not in message and "Traceback" not in err
                and os.strerror(error) in message and (named in message if named != "." else str(out) in message)):
            problems.append(f"write {n} ({operation} {path}, {errno.errorcode[error]}): {message!r} {err[-300:]!r}")
            continue
        try:
            recover(out)
            capsys.readouterr()
            if result(out) != expected:
                problems.append(f"write {n} ({operation} {path}): the folder does not end where an uninterrupted run ends")
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            problems.append(f"write {n} ({operation} {path}): the run after the fault failed: {type(exc).__name__}: {exc}")
    assert not problems, "\n".join(problems)


# -----------------------------------------------------------------------------
# Failures found by the program: every file a resumed run reads, damaged in turn
#
# The files are found at run time: every file of the run's folder (logs, lock, each checkpoint's
# model, tokenizer and trainer state) and its dataset. Each damage must leave the run either exactly as
# with the intact file (damage that does not matter, or a damaged checkpoint replaced by the one
# before it), or stopped before any training in one paragraph naming the file; a log that loses lines
# may continue only with a warning naming it. README's test command damages one file of each name;
# ANTISD_EVERY_FAULT=1 applies every damage to every file.

def first_field_of_another_type(path):
    """The first field of a .json file, or of the first line of a .jsonl file, wrapped in a list."""
    lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
    row = json.loads(lines[0])
    row[next(iter(row))] = [row[next(iter(row))]]
    path.write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")


FILE_DAMAGES = {
    "empty": lambda path: path.write_bytes(b""),
    "cut at a third": lambda path: path.write_bytes(path.read_bytes()[:path.stat().st_size // 3]),
    "cut at two thirds": lambda path: path.write_bytes(path.read_bytes()[:2 * path.stat().st_size // 3]),
    "random bytes": lambda path: path.write_bytes(random.Random(path.name).randbytes(max(64, path.stat().st_size))),
    "JSON of another type": lambda path: path.write_text("[1, 2]\n"),
    "a field of another type": lambda path: (first_field_of_another_type(path) if path.suffix in (".json", ".jsonl")
                                             else path.write_text('{"step": "three"}\n')),
    "a folder": lambda path: (path.unlink(), path.mkdir()),
    "a dangling link": lambda path: (path.unlink(), path.symlink_to(path.parent / "nowhere")),
}
RESUME_ONE_MORE = SMALL_RUN + ["--dataset", "data.jsonl", "--steps", "3", "--save-every", "1", "--lr", "1e-3",
                               "--out-dir", "run", "--resume"]


@pytest.fixture(scope="module")
def resumed_one_more(two_step_run, tmp_path_factory):
    """(metrics, weights) of two_step_run resumed for a third step, with nothing damaged or moved."""
    with pytest.MonkeyPatch.context() as patch:
        run = copy_of(two_step_run, tmp_path_factory.mktemp("intact"), patch)
        antisd.main(RESUME_ONE_MORE)
        return metrics_lines(run), weights(run / "checkpoint-3")


def damage_points(files):
    if os.environ.get("ANTISD_EVERY_FAULT") == "1":
        return [(path, damage) for path in files for damage in FILE_DAMAGES]
    one_of_each_name = {path.name: path for path in files}.values()   # the newest checkpoint's, where two have it
    return [(path, list(FILE_DAMAGES)[k % len(FILE_DAMAGES)]) for k, path in enumerate(sorted(one_of_each_name))]


def test_every_file_a_resumed_run_reads_can_be_damaged_and_is_named_or_harmless(two_step_run, resumed_one_more, tmp_path,
                                                                               monkeypatch, capsys):
    expected = resumed_one_more
    files = sorted(path.relative_to(two_step_run) for path in Path(two_step_run).rglob("*") if path.is_file())
    assert {"data.jsonl", "run/metrics.jsonl", "run/checkpoint-2/trainer_state.pt"} <= {str(f) for f in files}
    problems = []
    for relative, damage in damage_points(files):
        run = copy_of(two_step_run, tmp_path / f"{str(relative).replace('/', '_')}-{damage.replace(' ', '_')}", monkeypatch)
        FILE_DAMAGES[damage](Path(relative))
        message, err = what_the_command_line_shows(antisd.main, RESUME_ONE_MORE, capsys)
        what = f"{relative}, {damage}"
        if message is None:
            same = (run / "checkpoint-3").exists() and metrics_lines(run) == expected[0] and all(
                torch.equal(value, expected[1][name]) for name, value in weights(run / "checkpoint-3").items())
            if not same and not (relative.suffix == ".jsonl" and f"warning: {relative}" in err):
                problems.append(f"{what}: the run went on and ended elsewhere than with the intact file")
        elif not (message.startswith("error: ") and "\n" not in message and "Traceback" not in err
                  and (relative.name in message or relative.parent.name in message)):
            problems.append(f"{what}: {message!r} {err[-300:]!r}")
        elif (run / "checkpoint-3").exists():
            problems.append(f"{what}: stopped only after training ({message!r})")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def interrupted_local_evaluation(tmp_path_factory):
    """An evaluation of three local math500 problems, killed after its first problem: a folder to resume."""
    base = tmp_path_factory.mktemp("interrupted_evaluation")
    (base / "data").mkdir()
    write_jsonl(base / "data" / "math500.jsonl", [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)])
    cwd = os.getcwd()
    os.chdir(base)   # relative paths: a copy of the folder is the same evaluation
    try:
        evaluation.main(RESUME_EVALUATION[:-1])
    finally:
        os.chdir(cwd)
    (base / "e" / "results.json").unlink()
    (base / "e" / "samples.jsonl").write_text((base / "e" / "samples.jsonl").read_text().splitlines()[0] + "\n")
    return base


RESUME_EVALUATION = EVAL[:4] + EVAL[6:] + ["--benchmarks", "math500", "--data-dir", "data", "--out-dir", "e", "--resume"]


def test_every_file_a_resumed_evaluation_reads_can_be_damaged_and_is_named_or_harmless(
        interrupted_local_evaluation, tmp_path, monkeypatch, capsys):
    base = interrupted_local_evaluation
    shutil.copytree(base, tmp_path / "intact")
    monkeypatch.chdir(tmp_path / "intact")
    evaluation.main(RESUME_EVALUATION)
    expected = evaluation_result(Path("e"))
    files = sorted(path.relative_to(base) for path in base.rglob("*") if path.is_file())
    assert {"data/math500.jsonl", "e/settings.json", "e/samples.jsonl"} <= {str(f) for f in files}
    problems = []
    for relative, damage in damage_points(files):
        folder = tmp_path / f"{str(relative).replace('/', '_')}-{damage.replace(' ', '_')}"
        shutil.copytree(base, folder)
        monkeypatch.chdir(folder)
        FILE_DAMAGES[damage](Path(relative))
        message, err = what_the_command_line_shows(evaluation.main, RESUME_EVALUATION, capsys)
        if message is None:
            if evaluation_result(Path("e")) != expected:
                problems.append(f"{relative}, {damage}: the evaluation went on and ended elsewhere than with the intact file")
        elif not (message.startswith("error: ") and "\n" not in message and "Traceback" not in err
                  and (relative.name in message or relative.parent.name in message)):
            problems.append(f"{relative}, {damage}: {message!r} {err[-300:]!r}")
        elif Path("e/results.json").exists():
            problems.append(f"{relative}, {damage}: stopped only after evaluating ({message!r})")
    assert not problems, "\n".join(problems)


# -----------------------------------------------------------------------------
# The world moving under a run: between a run and its --resume, its files change the way users change them

def move_run(run):
    run.parent.joinpath("elsewhere").mkdir()
    run.rename(run.parent / "elsewhere" / "run")
    return "elsewhere/run"


def link_run(run):
    run.rename(run.parent / "real-run")
    run.symlink_to(run.parent / "real-run")
    return "run"


def link_checkpoint(run):
    (run / "checkpoint-2").rename(run.parent / "checkpoint-2-on-other-storage")
    (run / "checkpoint-2").symlink_to((run.parent / "checkpoint-2-on-other-storage").resolve())
    return "run"


def link_dataset(run):
    Path("data.jsonl").rename("data-copy.jsonl")
    Path("data.jsonl").symlink_to(Path("data-copy.jsonl").resolve())
    return "run"


def remove_dataset(run):
    Path("data.jsonl").unlink()
    return "run"


def edit_dataset(run):
    Path("data.jsonl").write_text(Path("data.jsonl").read_text().replace('"answer": "2"', '"answer": "3"'))
    return "run"


def remove_run(run):
    shutil.rmtree(run)
    return "run"


def read_only_run(run):
    for folder in [run, *run.iterdir()]:
        if folder.is_dir():
            folder.chmod(0o555)
    return "run"


# change: what a user did; outcome: "resumes" (to where an uninterrupted run ends) or the message's start
WORLD_CHANGES = [(move_run, "resumes"), (link_run, "resumes"), (link_checkpoint, "resumes"), (link_dataset, "resumes"),
                 (remove_dataset, "error: --dataset data.jsonl: file not found"),
                 (edit_dataset, "refusing to resume run/checkpoint-2 with different settings: the problems of --dataset"),
                 (remove_run, "--resume: no checkpoint in --out-dir run"),
                 (read_only_run, "error: --out-dir run: not writable")]


@pytest.mark.parametrize("change, outcome", WORLD_CHANGES, ids=[change.__name__ for change, _ in WORLD_CHANGES])
def test_a_run_whose_files_moved_resumes_or_is_refused_saying_what_changed(two_step_run, resumed_one_more, tmp_path,
                                                                         monkeypatch, capsys, change, outcome):
    if change is read_only_run and os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    expected = resumed_one_more
    run = copy_of(two_step_run, tmp_path / change.__name__, monkeypatch)
    out = Path(change(run))                                # where the run's folder is now
    argv = RESUME_ONE_MORE + ["--out-dir", str(out)]       # the last --out-dir counts
    if outcome != "resumes":
        code, text = failure_message(capsys, antisd.main, argv)
        assert str(code).startswith(outcome) and "\n" not in str(code) and "Traceback" not in text, code
        return
    antisd.main(argv)
    assert metrics_lines(out) == expected[0]
    assert all(torch.equal(value, expected[1][name]) for name, value in weights(out / "checkpoint-3").items())


# -----------------------------------------------------------------------------
# Failures found by the program: every stop signal, at moments spread over a run's whole life
#
# Ctrl-C (SIGINT), a job scheduler's stop (SIGTERM) and the terminal closing (SIGHUP), sent to
# antisd.py and to eval.py at fractions of an uninterrupted run's wall time (start-up, loading, the
# steps, a save, the end). Each must end without a traceback, in one line naming the signal outside
# the step loop (inside it, the step is finished and saved), and the folder must then resume (or start
# again, where nothing was saved) to exactly where the uninterrupted run ends. README's test command
# sends one signal to antisd.py; ANTISD_EVERY_FAULT=1 sends each of the three to both at nine moments.

SIGNAL_RUN = TINY_RUN + ["--steps", "4", "--save-every", "2", "--max-new-tokens", "8"]
SIGNAL_EVAL = EVAL + ["--limit", "6"]


def run_and_signal(script, argv, signum, after):
    """(exit status, stdout + stderr) of `python script argv`, sent signum `after` seconds in (unless done)."""
    process = subprocess.Popen([sys.executable, str(HERE / script), *argv], cwd=HERE, env=FAST,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        process.wait(timeout=after)
    except subprocess.TimeoutExpired:
        process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    return process.returncode, output


def signal_points(script):
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    if os.environ.get("ANTISD_EVERY_FAULT") == "1":
        return [(signum, k / 10) for signum in signals for k in range(1, 10)]
    return [(signal.SIGTERM, 0.6)] if script == "antisd.py" else []  # eval.py's: with ANTISD_EVERY_FAULT=1


@pytest.mark.parametrize("script", ["antisd.py", "eval.py"])
def test_every_stop_signal_at_any_moment_ends_cleanly_and_the_folder_ends_where_an_uninterrupted_run_ends(
        tmp_path, script):
    if not signal_points(script):
        pytest.skip("eval.py's signals are sent with ANTISD_EVERY_FAULT=1 (README's test command keeps to its time)")
    argv = SIGNAL_RUN if script == "antisd.py" else SIGNAL_EVAL
    started = time.time()
    code, output = run_and_signal(script, argv + ["--out-dir", str(tmp_path / "whole")], signal.SIGINT, 600)
    seconds = time.time() - started
    assert code == 0, output
    result = training_result if script == "antisd.py" else evaluation_result
    checkpoint = "checkpoint-4"
    expected = (metrics_lines(tmp_path / "whole"), weights(tmp_path / "whole" / checkpoint)) \
        if script == "antisd.py" else evaluation_result(tmp_path / "whole")
    problems = []
    for signum, fraction in signal_points(script):
        name = signal.Signals(signum).name
        out = tmp_path / f"signal-{signum}-at-{fraction}"  # not the signal's name: the output is searched for it
        code, output = run_and_signal(script, argv + ["--out-dir", str(out)], signum, fraction * seconds)
        lines = [line for line in output.splitlines() if name in line]
        if "Traceback" in output or (code != 0 and not any(f"interrupted ({name}): stopped at once" in line
                                                           for line in lines)):
            problems.append(f"{name} at {fraction:.0%}: exit {code}, {output[-400:]!r}")
            continue
        if code == 0 and lines:  # stopped in the loop: the step was finished and saved
            if not any(f"{name}: finishing this step, then saving" in line for line in lines):
                problems.append(f"{name} at {fraction:.0%}: {lines!r} {output[-300:]!r}")
                continue
        if script == "antisd.py":
            done = (out / checkpoint).exists()
            if not done:
                antisd.main(argv + ["--out-dir", str(out)] + (["--resume"] if antisd.list_checkpoints(str(out)) else []))
            got = metrics_lines(out), weights(out / checkpoint)
            same = got[0] == expected[0] and all(torch.equal(got[1][k], expected[1][k]) for k in expected[1])
        else:
            if not (out / "results.json").exists():
                evaluation.main(argv + ["--out-dir", str(out)] + (["--resume"] if (out / "samples.jsonl").exists() else []))
            same = result(out) == expected
        if not same:
            problems.append(f"{name} at {fraction:.0%}: the folder does not end where an uninterrupted run ends")
    assert not problems, "\n".join(problems)


# -----------------------------------------------------------------------------
# Infrastructure: the tiny models and the laptop demo (the arith task and its held-out benchmark)

def test_arith_problems_are_seeded_and_their_solutions_are_correct():
    first, again = tiny_tasks.make_arith_problems(50, seed=3), tiny_tasks.make_arith_problems(50, seed=3)
    assert first == again
    for item in first:
        assert antisd.verify(item["solution"], item["answer"]) == 1.0


def arith_numbers(problem_text):
    """(start, boxes, per_box, given), read back from the problem's words."""
    return tuple(int(n) for n in re.findall(r"\d+", problem_text))


def test_arith_benchmark_never_shares_a_problem_with_training():
    benchmark = evaluation.load_benchmark("arith", limit=500)
    assert len(benchmark) == 500 == len({item["problem"] for item in benchmark})
    held_out = {arith_numbers(item["problem"]) for item in benchmark}
    training = {arith_numbers(item["problem"]) for seed in (0, 1, 2) for item in tiny_tasks.make_arith_problems(2000, seed)}
    supervised = {arith_numbers(item["problem"])  # the default supervised start
                  for item in tiny_tasks.make_arith_problems(tiny_tasks.TINY_SFT_STEPS * tiny_tasks.TINY_SFT_BATCH, seed=10_000)}
    assert held_out.isdisjoint(training) and held_out.isdisjoint(supervised)
    assert all(tiny_tasks.arith_is_held_out(numbers) for numbers in held_out)
    every_tuple = list(itertools.product(range(1, 15), range(2, 5), range(2, 5), range(1, 10)))
    assert 0.18 < sum(map(tiny_tasks.arith_is_held_out, every_tuple)) / len(every_tuple) < 0.22  # a fifth is held out
    start, boxes, per_box, given = arith_numbers(benchmark[0]["problem"])
    assert int(benchmark[0]["answer"]) == start + boxes * per_box - given


def test_slipped_solutions_compute_each_step_correctly_and_are_judged_wrong():
    item = tiny_tasks.make_arith_problems(1, seed=4)[0]
    start, boxes, per_box, given = item["numbers"]
    for slips, expected in [((False, False), start + boxes * per_box - given), ((True, False), start + boxes + per_box - given),
                            ((False, True), start + boxes * per_box + given), ((True, True), start + boxes + per_box + given)]:
        text, answer = tiny_tasks.arith_solution(item["name"], item["thing"], item["numbers"], slips)
        assert answer == expected and antisd.last_boxed(text) == str(expected)
        assert antisd.verify(text, item["answer"]) == float(slips == (False, False))


def test_supervised_start_lowers_the_response_loss_and_is_trained_only_once(tmp_path, monkeypatch):
    import torch.nn.functional as F
    calls, full_start = [], tiny_tasks.train_tiny_arith

    def small_start(path):
        calls.append(path)
        return full_start(path, steps=30, batch_size=8, lr=1e-2, hidden_size=32, log_every=0)

    monkeypatch.setattr(tiny_tasks, "TINY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tiny_tasks, "train_tiny_arith", small_start)
    model, tokenizer = antisd.load_model("tiny", torch.device("cpu"))
    antisd.load_model("tiny", torch.device("cpu"))  # the second load reads the cache
    assert len(calls) == 1 and (tmp_path / "cache" / tiny_tasks.TINY_ARITH_RECIPE / "model.safetensors").exists()
    assert tokenizer.tokenize(" 1234") == ["Ġ1", "2", "3", "4"]  # one digit per token
    problems = tiny_tasks.make_arith_problems(8, seed=99)
    students = tiny_tasks.supervised_examples(tokenizer, problems, random.Random(0), as_teacher=False)
    teachers = tiny_tasks.supervised_examples(tokenizer, problems, random.Random(0), as_teacher=True)
    examples = students + teachers
    # the prompts are the ones RL will use, token for token, though tokenized in one batch
    assert [prompt for prompt, _ in students] == [antisd.student_prompt_ids(tokenizer, p["problem"], False) for p in problems]
    rng = random.Random(0)
    for p, (prompt, response) in zip(problems, teachers):
        slips = (rng.random() < tiny_tasks.SLIP_RATE, rng.random() < tiny_tasks.SLIP_RATE)
        sloppy, answer = tiny_tasks.arith_solution(p["name"], p["thing"], p["numbers"], slips)
        message = antisd.build_teacher_prompt(p["problem"], 0, [float(answer == int(p["answer"]))], [sloppy],
                                              p["solution"], p["answer"], rng)
        assert prompt == antisd.render_prompt(tokenizer, message, False)
        assert response == tokenizer(p["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def response_loss(m):  # one example at a time, no padding: mean cross-entropy of the response tokens
        losses = []
        with torch.no_grad():
            for prompt, response in examples:
                logits = m(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]  # [R, V]
                losses.append(F.cross_entropy(logits, torch.tensor(response)))
        return float(torch.stack(losses).mean())

    untrained = type(model)(model.config)
    assert response_loss(model) < response_loss(untrained) - 1.0


# the tiny search task: a check that pays, and the search benchmark

def test_every_search_problem_has_exactly_one_right_box_and_its_solution_finds_it():
    for p in tiny_tasks.make_search_problems(300, seed=3) + tiny_tasks.make_search_problems(100, seed=4, held_out=True):
        right = [box for box, value in zip(tiny_tasks.SEARCH_BOXES, p["values"]) if value + p["addend"] == p["target"]]
        assert right == [p["answer"]]  # enumeration of the boxes
        assert p["problem"] == (f"Boxes: {' '.join(f'{b}={v}' for b, v in zip(tiny_tasks.SEARCH_BOXES, p['values']))}. "
                                f"Which box plus {p['addend']} makes {p['target']}?")
        assert antisd.verify(p["solution"], p["answer"]) == 1.0
        tries = tiny_tasks.SEARCH_TRY.findall(p["solution"])
        assert len(tries) == tiny_tasks.SEARCH_BOXES.index(p["answer"]) + 1 and tries[-1][-1] == "yes"
        assert all(verdict == "no" for *_, verdict in tries[:-1])


def test_search_solution_by_hand():
    values, addend, target = [3, 8, 6, 1, 5, 2], 4, 10
    text, box = tiny_tasks.search_solution(values, addend, target, tries=2, guess="E")
    assert (text, box) == ("try A: 3+4=7 no. try B: 8+4=12 no. The answer is \\boxed{E}.", "E")
    text, box = tiny_tasks.search_solution(values, addend, target, tries=6)
    assert text.endswith("try C: 6+4=10 yes. The answer is \\boxed{C}.") and box == "C"
    assert antisd.verify(text, "C") == 1.0 and antisd.verify("The answer is \\boxed{E}.", "C") == 0.0
    problem = {"values": values, "addend": addend, "target": target}
    assert tiny_tasks.search_check_errors("try A: 3+4=7 no. try B: 8+4=12 yes.", problem) == (2, 1)  # wrong verdict
    assert tiny_tasks.search_check_errors("try A: 6+4=10 yes.", problem) == (1, 1)                    # wrong number
    assert tiny_tasks.search_check_errors("try A: 3+4=8 no.", problem) == (1, 1)                      # wrong sum


def test_search_fields_read_back_what_the_generator_wrote():
    for p in tiny_tasks.make_search_problems(300, seed=8) + tiny_tasks.make_search_problems(100, seed=8, held_out=True):
        assert tiny_tasks.search_fields(p["problem"]) == {k: p[k] for k in ("values", "addend", "target")}


@settings(max_examples=40)
@given(st.integers(1, 30), st.integers(-2**40, 2**40), st.booleans())
def test_generated_search_problems_have_one_right_box_read_back_from_their_text_on_their_side_of_the_split(
        count, seed, held_out):
    problems = tiny_tasks.make_search_problems(count, seed, held_out)
    assert len(problems) == count and problems == tiny_tasks.make_search_problems(count, seed, held_out)  # seeded
    for p in problems:
        right = [box for box, value in zip(tiny_tasks.SEARCH_BOXES, p["values"]) if value + p["addend"] == p["target"]]
        assert right == [p["answer"]] and len(p["values"]) == 12 and set(p["values"]) <= set(range(1, 10))
        assert tiny_tasks.search_fields(p["problem"]) == {k: p[k] for k in ("values", "addend", "target")}
        assert tiny_tasks.search_is_held_out(p["values"], p["addend"], p["answer"]) == held_out


def test_check_error_rate_counts_wrong_check_lines_over_all_responses():
    problem = tiny_tasks.search_problem_text([3, 8, 6, 1, 5, 2, 7, 9, 4, 3, 1, 2], 4, 10)
    texts = ["try A: 3+4=7 no. try B: 8+4=12 no. try C: 6+4=10 yes. The answer is \\boxed{C}.",  # 3 right
             "try A: 3+4=8 no. try B: 9+4=13 no. The answer is \\boxed{C}.",  # a wrong sum, a misread number
             "The answer is \\boxed{E}."]                                      # no check
    assert tiny_tasks.search_check_error_rate(texts, [problem] * 3) == 2 / 5
    assert tiny_tasks.search_check_error_rate(texts[2:], [problem]) is None  # no check: no rate, not a perfect one


def test_student_format_tries_at_the_given_rate_and_guesses_only_untried_boxes():
    problems = tiny_tasks.make_search_problems(2000, seed=5)
    rng = random.Random(0)
    first_decisions, guesses_untried = [], True
    for p in problems:
        text, box, tries = tiny_tasks.search_student_solution(p, rng, try_rate=0.4)
        first_decisions.append(tries > 0)
        assert tiny_tasks.search_deliberates(text) == (tries > 0)
        if "yes." not in text:  # a guess: never a box the response already ruled out
            guesses_untried &= box in tiny_tasks.SEARCH_BOXES[tries:]
    assert guesses_untried and abs(sum(first_decisions) / len(problems) - 0.4) < 0.04


def test_token_classes_mark_the_decision_to_check_and_the_unchecked_answer():
    pieces = ["try", " A", ":", " 3", "+", "4", "=", "7", " no", ".", " The", " answer", " is",
              " \\", "boxed", "{", "E", "}."]
    assert tiny_tasks.search_token_classes(pieces) == ["try"] + ["check"] * 9 + ["guess"] * 8
    pieces = ["try", " A", ":", " 6", "+", "4", "=", "10", " yes", ".", " The", " answer", " is",
              " \\", "boxed", "{", "A", "}.", ""]
    assert tiny_tasks.search_token_classes(pieces) == ["try"] + ["check"] * 9 + ["answer"] * 8 + ["other"]
    assert tiny_tasks.search_token_classes(["The", " answer", " is", " \\", "boxed", "{", "B", "}."]) == ["guess"] * 8
    assert tiny_tasks.search_deliberation_rate(["try A: 3+4=7 no. The answer is \\boxed{E}.", "The answer is \\boxed{E}."]) == 0.5


def test_the_deliberation_rate_counts_a_check_that_follows_other_text():
    # by hand: responses 1-3 check a box, wherever the check stands; 4 never checks; 5 only speaks of trying
    texts = ["try A: 3+4=7 no. The answer is \\boxed{E}.",
             "Let me check one. try C: 6+4=10 yes. The answer is \\boxed{C}.",
             "The answer is \\boxed{E}. Or is it? try B: 8+4=12 no.",
             "The answer is \\boxed{E}.",
             "I could try A, but the answer is \\boxed{A}."]
    assert tiny_tasks.search_deliberation_rate(texts) == 3 / 5
    problem = tiny_tasks.search_problem_text([3, 8, 6, 1, 5, 2, 7, 9, 4, 3, 1, 2], 4, 10)
    assert antisd.search_metrics(texts, [{"problem": problem}], group_size=5)["deliberation_rate"] == 3 / 5  # as logged


def test_the_u_by_token_class_table_scores_each_rollout_against_its_own_problems_teacher(monkeypatch):
    """search_pmi_by_class (the task's Figure 2), by hand: rollout i is of problems[i // G]; its u is the
    teacher's log-prob minus the student's, one unpadded forward each, the teacher seeing its own
    problem with the reference solution (no rollout is right, M7); the table is each token class's
    count, mean u and share of u < 0."""
    model, tokenizer = sharp_tiny_model()
    problems, group_size = tiny_tasks.make_search_problems(2, seed=1), 3
    sampled, real_generate = [], tiny_tasks.generate
    monkeypatch.setattr(tiny_tasks, "generate", lambda *a, **k: sampled.extend(real_generate(*a, **k)) or sampled)
    table, summary, texts = tiny_tasks.search_pmi_by_class(model, tokenizer, problems, group_size, max_new_tokens=8)
    assert summary["reward"] == 0.0

    def u_of(i, problem):
        response = sampled[i][0]
        student = antisd.student_prompt_ids(tokenizer, problem["problem"], False)
        message = antisd.build_teacher_prompt(problem["problem"], i % group_size, [0.0] * group_size,
                                              texts[i - i % group_size:][:group_size], problem["solution"],
                                              problem["answer"], None)
        teacher = antisd.render_prompt(tokenizer, message, False)
        return one_at_a_time_logp(model, teacher, response)[0] - one_at_a_time_logp(model, student, response)[0]

    by_class = {}
    with torch.no_grad():
        for i, (response, _) in enumerate(sampled):
            u = u_of(i, problems[i // group_size])
            for label, value in zip(tiny_tasks.search_token_classes([tokenizer.decode([t]) for t in response]), u.tolist()):
                by_class.setdefault(label, []).append(value)
        assert (u_of(0, problems[1]) - u_of(0, problems[0])).abs().max() > 0.01   # another problem's teacher gives another u
    assert sorted(table) == sorted(by_class)
    for label, values in by_class.items():
        count, mean_u, share_negative = table[label]
        assert count == len(values)
        assert mean_u == pytest.approx(sum(values) / len(values), abs=1e-5)
        assert share_negative == pytest.approx(sum(v < 0 for v in values) / len(values), abs=1.01 / len(values))


def test_search_benchmark_never_occurs_in_training():
    benchmark = {p["problem"] for p in evaluation.offline_benchmark("search", evaluation.OFFLINE_BENCHMARK_SIZE)}
    training = {p["problem"] for p in antisd.load_problems("search", 0)[0]}
    training |= {p["problem"] for p in tiny_tasks.make_search_problems(  # the supervised start's
        tiny_tasks.TINY_SEARCH_SFT_STEPS * tiny_tasks.TINY_SEARCH_SFT_BATCH, seed=10_000)}
    assert len(benchmark) == evaluation.OFFLINE_BENCHMARK_SIZE and not benchmark & training
    # and the split itself: about one problem in five, over an enumeration of one addend's problems
    held_out = [tiny_tasks.search_is_held_out(values, 4, box) for values in itertools.permutations(range(1, 8), 6)
                for box in "AC"]  # (any tuples: the hash does not know which are problems)
    assert 0.17 < sum(held_out) / len(held_out) < 0.23


@pytest.fixture(scope="module")
def small_search_cache(tmp_path_factory):
    """A tiny-search model from a few supervised steps, in a cache of its own (the real one is never built)."""
    cache = tmp_path_factory.mktemp("cache")
    tiny_tasks.train_tiny_search(str(cache / tiny_tasks.TINY_SEARCH_RECIPE), steps=4, batch_size=8, hidden_size=32, log_every=0)
    return cache


def test_tiny_search_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    calls, full_start = [], tiny_tasks.train_tiny_search

    def small_start(path):
        calls.append(path)
        return full_start(path, steps=3, batch_size=4, hidden_size=32, log_every=0)

    monkeypatch.setattr(tiny_tasks, "TINY_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_tasks, "train_tiny_search", small_start)
    antisd.load_model("tiny-search", torch.device("cpu"))
    antisd.load_model("tiny-search", torch.device("cpu"))
    assert len(calls) == 1 and (tmp_path / tiny_tasks.TINY_SEARCH_RECIPE / "model.safetensors").exists()


def test_teacher_examples_train_only_the_answer_after_the_students_tries(small_search_cache):
    model, tokenizer = antisd.load_model(str(small_search_cache / tiny_tasks.TINY_SEARCH_RECIPE), torch.device("cpu"))
    problems = tiny_tasks.make_search_problems(50, seed=7)
    examples = tiny_tasks.search_supervised_examples(tokenizer, problems, random.Random(0), "teacher")
    for p, (prompt, response, untrained) in zip(problems, examples):
        assert list(untrained) == list(range(len(untrained)))  # a prefix: the student's tries
        trained = tokenizer.decode(response[len(untrained):], skip_special_tokens=True)
        assert trained == f"The answer is \\boxed{{{p['answer']}}}."
        shown = tokenizer.decode(response[:len(untrained)])
        assert "yes" not in shown and len(tiny_tasks.SEARCH_TRY.findall(shown)) == shown.count("try")
        assert "Your previous attempt" in tokenizer.decode(prompt)
    assert max(len(untrained) for _, _, untrained in examples) > 20  # the teacher also sees long searches
    students = tiny_tasks.search_supervised_examples(tokenizer, problems, random.Random(0), "student")
    assert all(len(untrained) == 0 for _, _, untrained in students)
    assert [prompt for prompt, _, _ in students] == [antisd.student_prompt_ids(tokenizer, p["problem"], False) for p in problems]


def test_practice_examples_are_whole_searches_with_only_their_decisions_untrained(small_search_cache):
    model, tokenizer = antisd.load_model(str(small_search_cache / tiny_tasks.TINY_SEARCH_RECIPE), torch.device("cpu"))
    problems = tiny_tasks.make_search_problems(50, seed=8)
    for p, (prompt, response, untrained) in zip(problems, tiny_tasks.search_supervised_examples(
            tokenizer, problems, random.Random(0), "practice")):
        assert tokenizer.decode(response, skip_special_tokens=True) == p["solution"]  # the whole search
        assert [tokenizer.decode([response[k]]).strip() for k in untrained] == ["try"] * (tiny_tasks.SEARCH_BOXES.index(p["answer"]) + 1)
        assert prompt == antisd.student_prompt_ids(tokenizer, p["problem"], False)


def test_supervised_start_learns_nothing_from_an_untrained_position(tmp_path, small_search_cache):
    """The last response token is only a target: with it untrained, changing it leaves the step unchanged."""
    _, tokenizer = antisd.load_model(str(small_search_cache / tiny_tasks.TINY_SEARCH_RECIPE), torch.device("cpu"))
    prompt, response = [5, 6, 7], [8, 9, 10, 11]

    def weights_after_one_step(last_token, untrained):
        out = tmp_path / f"{last_token}-{len(untrained)}"
        tiny_tasks.supervised_start(str(out), tokenizer, [[(prompt, response[:-1] + [last_token], untrained)]], 1, 1e-2,
                                32, 0, 0, time.time())
        model, _ = antisd.load_model(str(out), torch.device("cpu"))
        return torch.cat([w.flatten() for w in model.state_dict().values()])

    last = len(response) - 1
    assert torch.equal(weights_after_one_step(11, [last]), weights_after_one_step(12, [last]))
    assert not torch.equal(weights_after_one_step(11, []), weights_after_one_step(12, []))


def test_the_supervised_start_mixes_teacher_practice_and_student_examples_in_its_shares(monkeypatch):
    seen = {}
    monkeypatch.setattr(tiny_tasks, "supervised_start", lambda out_dir, tokenizer, batches, *rest: seen.update(
        tokenizer=tokenizer, batches=batches))
    tiny_tasks.train_tiny_search("unused", steps=20, batch_size=4, hidden_size=32, log_every=0)

    def kind(prompt, untrained):
        return ("teacher" if "Your previous attempt" in seen["tokenizer"].decode(prompt)
                else "practice" if len(untrained) else "student")

    kinds = [{kind(prompt, untrained) for prompt, _, untrained in batch} for batch in seen["batches"]]
    assert all(len(k) == 1 for k in kinds)  # one kind a batch: short prompts are not padded to the teacher's
    counts = collections.Counter(k.pop() for k in kinds)
    teacher = round(20 * tiny_tasks.TINY_SEARCH_TEACHER_SHARE)
    practice = round((20 - teacher) * tiny_tasks.SEARCH_PRACTICE_SHARE)
    assert counts == {"teacher": teacher, "practice": practice, "student": 20 - teacher - practice}


@pytest.mark.parametrize("method", ["grpo", "sd", "antisd"])
def test_tiny_search_runs_each_method_and_logs_held_out_accuracy_and_deliberation(method, small_search_cache,
                                                                                 tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_tasks, "TINY_CACHE", str(small_search_cache))
    out = tmp_path / method
    antisd.main(["--model", "tiny-search", "--method", method, "--steps", "2", "--prompts-per-step", "2",
                 "--group-size", "4", "--max-new-tokens", "16", "--micro-batch-size", "8", "--eval-every", "1",
                 "--eval-limit", "3", "--eval-n", "1", "--gate-warmup", "1", "--out-dir", str(out)])
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert all("eval/search/avg@1" in line for line in lines)
    assert all(0.0 <= line["deliberation_rate"] <= 1.0 for line in lines[1:])
    assert all(line["check_error_rate"] is None or 0.0 <= line["check_error_rate"] <= 1.0 for line in lines[1:])


def test_compare_by_group_averages_runs_that_differ_only_by_seed(tmp_path):
    for name, accuracy in [("grpo-s0", [0.1, 0.5]), ("grpo-s1", [0.3, 0.7]), ("sd-s0", [0.2, 0.0])]:
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for step, value in zip((0, 10), accuracy):
                f.write(json.dumps({"step": step, "eval/mean/avg@4": value, "reward_mean": value}) + "\n")
    evaluation.compare_groups([str(tmp_path / n) for n in ("grpo-s0", "grpo-s1", "sd-s0")], str(tmp_path / "out"))
    table = (tmp_path / "out" / "compare-groups.md").read_text()
    assert "| grpo | 2 | eval/mean/avg@ | 0.200 (step 0, 0.100-0.300) | 0.600 (step 10, 0.500-0.700) |" in table
    assert "| sd | 1 | eval/mean/avg@ | 0.200 (step 0, 0.200-0.200) | 0.000 (step 10, 0.000-0.000) |" in table
    assert (tmp_path / "out" / "compare-groups.png").exists()



def test_compare_by_group_averages_only_the_steps_every_run_of_the_group_logged(tmp_path, capsys):
    # grpo-s0 ran 30 steps, evaluated every 10 and logged the deliberation rate; grpo-s1 stopped at
    # step 20, evaluated every 5 and logged no deliberation rate; sd-s0 evaluated at 0 and 10
    logs = {"grpo-s0": [(0, 0.1), (10, 0.3), (20, 0.5), (30, 0.9)],
            "grpo-s1": [(0, 0.3), (5, 0.2), (10, 0.5), (15, 0.4), (20, 0.7)],
            "sd-s0": [(0, 0.2), (10, 0.4)]}
    for name, points in logs.items():
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "metrics.jsonl",
                    [{"step": step, "eval/mean/avg@4": value, "reward_mean": value,
                      **({"deliberation_rate": 0.25} if name != "grpo-s1" and step == 10 else {})} for step, value in points])
    evaluation.main(["--compare", *(str(tmp_path / name) for name in logs), "--by-group", "--out-dir", str(tmp_path / "out")])
    # by hand: grpo at steps 0, 10, 20 (both runs), first 0.2 = (0.1 + 0.3) / 2, last 0.6 = (0.5 + 0.7) / 2;
    # sd at 0 and 10; no grpo deliberation rate: grpo-s1 never logged one
    grpo, sd = "| grpo | 2 | {} | 0.200 (step 0, 0.100-0.300) | 0.600 (step 20, 0.500-0.700) |", \
               "| sd | 1 | {} | 0.200 (step 0, 0.200-0.200) | 0.400 (step 10, 0.400-0.400) |"
    assert (tmp_path / "out" / "compare-groups.md").read_text().splitlines() == [
        "| group | runs | metric | first | last |", "|---|---|---|---|---|",
        grpo.format("eval/mean/avg@"), sd.format("eval/mean/avg@"), grpo.format("reward_mean"), sd.format("reward_mean"),
        "| sd | 1 | deliberation_rate | 0.250 (step 10, 0.250-0.250) | 0.250 (step 10, 0.250-0.250) |"]

# -----------------------------------------------------------------------------
# Infrastructure: several processes (torchrun + FSDP2)

TWO_RANKS = '''
import argparse, json, os, sys
import torch
sys.path.insert(0, {here!r})
import antisd
import tiny_tasks

out = {out!r}
batch = torch.load(os.path.join(out, "batch.pt"))
world = antisd.World(torch.device("cpu"))
model, tokenizer = tiny_tasks.build_tiny(seed=0)
model = antisd.shard_model(model, world, torch.device("cpu"))
optimizer = antisd.MasterAdamW(model, 1e-3, world)
mine = world.rows(len(batch["responses"]))
stats = antisd.score(model, batch["prompts"][mine], batch["teacher_prompts"][mine], batch["responses"][mine],
                     tokenizer.pad_token_id, 1, 1.0)
stats = {{name: world.gather(value) for name, value in stats.items()}}
args = argparse.Namespace(**batch["args"])
terms = antisd.gate_and_advantages(stats, batch["mask"], batch["seq_adv"], None, args)
total_tokens = int(batch["mask"].sum())
loss, clipped = antisd.policy_gradient(model, batch["prompts"][mine], batch["responses"][mine],
                                       terms["advantages"][mine], batch["mask"][mine], stats["logp"][mine],
                                       tokenizer.pad_token_id, 1, 0.2, 1.0, total_tokens=total_tokens)
grad_norm = optimizer.clip_gradients(1e9)
grads = {{name: torch.cat(world.gather([m.grad])) for (name, _), m in zip(model.named_parameters(), optimizer.master)}}
if world.rank == 0:
    torch.save({{"grads": grads, "gate_signal": terms["gate_signal"], "total_tokens": total_tokens,
                "loss": world.sum(loss), "grad_norm": grad_norm}}, os.path.join(out, "two_ranks.pt"))
else:
    world.sum(loss)
run = ["--model", "tiny-random", "--dataset", "arith", "--device", "cpu", "--prompts-per-step", "2", "--group-size", "2",
       "--max-new-tokens", "6", "--micro-batch-size", "2", "--out-dir", os.path.join(out, "run")]
antisd.main(run + ["--steps", "1"])
antisd.main(run + ["--steps", "2", "--resume"])
'''


def test_two_processes_give_one_process_gradient_gate_signal_and_token_count_and_resume_their_run(tmp_path):
    model, tokenizer = tiny_tasks.build_tiny(seed=0)
    prompts, responses, _, mask = fixed_batch(tokenizer)
    teacher_prompts = [prompt + tokenizer.encode(f"hint {k}: the answer is {k}") for k, prompt in enumerate(prompts)]
    args = dict(method="antisd", gate="none", estimator="token", divergence="jsd", term="paper", compose="add", lambda_max=0.5)
    seq_adv = antisd.group_advantages([1.0, 0.0, 0.0, 1.0], 2)
    torch.save({"prompts": prompts, "teacher_prompts": teacher_prompts, "responses": responses, "mask": mask,
                "seq_adv": seq_adv, "args": args}, tmp_path / "batch.pt")
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(here=str(HERE), out=str(tmp_path)))
    launched = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--standalone", str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    try:  # meanwhile, the same step in this one process
        stats = antisd.score(model, prompts, teacher_prompts, responses, tokenizer.pad_token_id, 1, 1.0)
        terms = antisd.gate_and_advantages(stats, mask, seq_adv, None, argparse.Namespace(**args))
        loss, _ = antisd.policy_gradient(model, prompts, responses, terms["advantages"], mask, stats["logp"],
                                         tokenizer.pad_token_id, 1, 0.2, 1.0)
        one = {name: p.grad for name, p in model.named_parameters()}
        output, _ = launched.communicate(timeout=300)
    finally:
        if launched.poll() is None:
            launched.kill()
    assert launched.returncode == 0, output[-3000:]
    two = torch.load(tmp_path / "two_ranks.pt")
    assert two["total_tokens"] == int(mask.sum())
    assert two["gate_signal"] == pytest.approx(terms["gate_signal"], rel=1e-6)
    assert two["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert set(two["grads"]) == set(one)
    for name, grad in one.items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in one.values()))
    assert two["grad_norm"] == pytest.approx(norm, rel=1e-4)
    # the two-process run: one metrics line per step across a resume, a checkpoint from_pretrained loads
    run = tmp_path / "run"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(run / "checkpoint-2")
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert (run / "checkpoint-2" / "trainer_state-rank1.pt").exists()
    with pytest.raises(antisd.UserError, match="written by 2 process"):
        antisd.main(["--model", "tiny-random", "--dataset", "arith", "--device", "cpu", "--prompts-per-step", "2",
                     "--group-size", "2", "--max-new-tokens", "6", "--micro-batch-size", "2", "--out-dir", str(run),
                     "--steps", "3", "--resume"])


BUILD_ONCE = """
import os, sys, time, torch
sys.path.insert(0, {here!r})
import antisd
import tiny_tasks
tiny_tasks.TINY_CACHE = {cache!r}
def stand_in_start(path):  # slow enough that a rank which did not wait would find nothing
    open(os.path.join({out!r}, "trained-by-rank" + os.environ["RANK"]), "w").close()
    time.sleep(1.0)
    os.makedirs(path)
tiny_tasks.train_tiny_arith = stand_in_start
world = antisd.World(torch.device("cpu"))
print("rank", world.rank, "found", os.path.isdir(tiny_tasks.tiny_arith_path()), flush=True)
"""


def test_torchrun_builds_the_tiny_model_once_on_rank_0_while_the_others_wait(tmp_path):
    import socket
    script = tmp_path / "build_once.py"
    script.write_text(BUILD_ONCE.format(here=str(HERE), cache=str(tmp_path / "cache"), out=str(tmp_path)))
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the two processes torchrun would start, with its environment (the launcher itself adds nothing here)
    ranks = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**FAST, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in (0, 1)]
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert sorted(p.name for p in tmp_path.glob("trained-by-rank*")) == ["trained-by-rank0"]
    for rank, output in enumerate(outputs):
        assert f"rank {rank} found True" in output, output


# -----------------------------------------------------------------------------
# Infrastructure: the command line: bad input is one paragraph without a traceback

@pytest.mark.parametrize("argv, message", [
    (["--dataset", "nope"], "expected one of math, gsm8k, dapo, arith, search, or a path"),
    (["--model", "not a model"], "expected 'tiny', 'tiny-search', 'tiny-random', a local checkpoint directory, or a hub id"),
    (["--micro-batch-size", "5"], r"--prompts-per-step \* --group-size = 16 must be divisible by --micro-batch-size \(5\)"),
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--estimator", "full", "--method", "grpo"], "--estimator full is the JSD gradient itself"),
    (["--dataset", "missing.jsonl"], "--dataset missing.jsonl: file not found"),
    (["--dataset", "math"], "--dataset math: could not load DigitalLearningGmbH/MATH-lighteval"),  # offline
])
def test_bad_flags_are_refused_with_a_message_naming_them(tmp_path, capsys, argv, message):
    import re
    with pytest.raises((SystemExit, ValueError)) as raised:
        antisd.main(TINY_RUN + ["--steps", "1", "--out-dir", str(tmp_path)] + argv)
    assert re.search(message, str(raised.value) + capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["--method", "sd", "--estimator", "full"], "--estimator full .* needs --method antisd"),
    (["--estimator", "full", "--ppo-epochs", "2"], "--estimator full needs --ppo-epochs 1"),
    (["--method", "grpo", "--divergence", "rkl"], "--divergence has no effect with --method grpo"),
    (["--method", "grpo", "--compose", "mult", "--lambda-max", "0.3"], "--compose, --lambda-max have no effect with --method grpo"),
    (["--method", "grpo", "--gate", "entropy"], "--gate has no effect with --method grpo"),
    (["--method", "sd", "--divergence", "rkl"], "--divergence has no effect with --method sd"),
    (["--method", "grpo", "--term", "official"], "--term has no effect with --method grpo"),
    (["--method", "sd", "--term", "official"], "--term official .* needs --method antisd"),
    (["--term", "official", "--divergence", "rkl"], "--term official .* --divergence jsd"),
    (["--term", "official", "--estimator", "full"], "--term official .* --estimator token"),
    (["--lambda-form", "continuous"], "--lambda-form continuous .* needs --method antisd, --gate perplexity"),
    (["--method", "grpo", "--lambda-form", "continuous"], "--lambda-form has no effect with --method grpo"),
])
def test_flags_without_effect_in_the_chosen_method_are_refused(capsys, argv, message):
    import re
    with pytest.raises(SystemExit):
        step_args(*argv)
    assert re.search(message, capsys.readouterr().err)
    for accepted in (["--method", "grpo", "--gate", "none"], ["--method", "sd", "--compose", "mult"]):
        step_args(*accepted)


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "{tmp}/latin1.jsonl"], r"latin1\.jsonl, line 2: not UTF-8 text \(byte 0xe9"),
    (["--dataset", "{tmp}/folder.jsonl"], r"folder\.jsonl: cannot read it \(Is a directory\)"),
    (["--dataset", "{tmp}/empty.jsonl"], r"empty\.jsonl: the file holds no rows"),
    (["--dataset", "{tmp}/list.jsonl"], r"list\.jsonl, line 1: expected a JSON object, got list"),
    (["--out-dir", "{tmp}/a_file"], r"--out-dir .*a_file: cannot create it \(File exists\)"),
    (["--out-dir", "{tmp}/a_file/run"], r"--out-dir .*a_file/run: cannot create it \(Not a directory\)"),
    (["--device", "bogus"], r"--device 'bogus': expected cuda, cuda:N or cpu"),
    (["--lr", "nan"], r"--lr must be a finite number, got nan"),
    (["--lr=inf"], r"--lr must be a finite number, got inf"),
    (["--clip=nan"], r"--clip must be a finite number, got nan"),
    (["--temperature", "nan"], r"--temperature must be a finite number"),
    (["--clip", "nan"], r"--clip must be a finite number"),
    (["--lambda-max", "nan"], r"--lambda-max must be a finite number"),
    (["--top-p=-inf"], r"--top-p must be a finite number"),
])
def test_bad_input_to_antisd_is_one_paragraph_without_a_traceback(tmp_path, capsys, argv, message):
    (tmp_path / "latin1.jsonl").write_bytes(b'{"problem": "1+1?", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    (tmp_path / "a_file").write_text("")
    argv = SMALL_RUN + ["--dataset", "arith", "--steps", "1", "--out-dir", str(tmp_path / "run")] + \
        [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, text = failure_message(capsys, antisd.main, argv)
    assert code != 0 and re.search(message, text), (code, text)
    assert "Traceback" not in text and not (isinstance(code, str) and "\n" in code)   # one paragraph


def test_cuda_device_without_a_gpu_is_refused_by_name(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, text = failure_message(capsys, antisd.main, SMALL_RUN + ["--dataset", "arith", "--device", "cuda:0"])
    assert code.startswith("error: --device cuda:0: no CUDA GPU")


@pytest.mark.parametrize("argv, message", [
    (["--benchmarks", "aime2024"], r"unknown benchmark 'aime2024'; known: math500"),
    (["--data-dir", "{tmp}/nowhere"], r"aime24: the data folder .*nowhere does not exist"),
    (["--benchmarks", "amc23"], r"amc23\.jsonl line 3 has no field 'problem'"),        # the file's own line number
    (["--model", "{tmp}/no_such_checkpoint"], r"--model .*no_such_checkpoint: could not load it \(no such local folder"),
    (["--temperature", "0"], r"--temperature must be a finite number > 0"),
    (["--temperature", "nan"], r"--temperature must be a finite number > 0"),
    (["--top-p", "0"], r"--top-p in \(0, 1\], got 0.7 and 0.0"),
    (["--max-new-tokens", "0"], r"--max-new-tokens must be at least 1"),
    (["--benchmarks", ""], r"--benchmarks names no benchmark"),
    (["--limit", "-1"], r"--limit must be >= 0 \(0: all problems\), got -1"),
    (["--out-dir", "{tmp}/aime24.jsonl"], r"--out-dir .*aime24\.jsonl: cannot create it"),
])
def test_bad_input_to_eval_is_one_paragraph_without_a_traceback(tmp_path, capsys, argv, message):
    write_jsonl(tmp_path / "aime24.jsonl", [{"problem": "P", "answer": "1"}])
    (tmp_path / "amc23.jsonl").write_text('{"problem": "P", "answer": 1}\n\n{"question": "P", "answer": 2}\n')
    argv = ["--model", "tiny-random", "--device", "cpu", "--data-dir", str(tmp_path), "--benchmarks", "aime24",
            "--out-dir", str(tmp_path / "out")] + [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, text = failure_message(capsys, evaluation.main, argv)
    assert code != 0 and re.search(message, text), (code, text)
    assert "Traceback" not in text


def test_scripts_run_their_main_through_the_one_wrapper(tmp_path, capsys, monkeypatch):
    """The __main__ blocks themselves: an expected failure exits with the message only."""
    import runpy
    for script, argv in [("antisd.py", ["--model", "tiny-random", "--dataset", str(tmp_path / "missing.jsonl"), "--out-dir", str(tmp_path)]),
                         ("eval.py", ["--data-dir", str(tmp_path), "--benchmarks", "aime24"])]:
        monkeypatch.setattr(sys, "argv", [script] + argv)
        with pytest.raises(SystemExit) as raised:
            runpy.run_path(str(HERE / script), run_name="__main__")
        assert isinstance(raised.value.code, str) and raised.value.code.startswith("error: "), raised.value.code


def test_a_real_bug_keeps_its_traceback_and_ctrl_c_at_start_up_does_not(tmp_path, capsys, monkeypatch):
    def bug(*args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(antisd, "load_problems", bug)
    argv = SMALL_RUN + ["--dataset", "arith", "--out-dir", str(tmp_path)]
    with pytest.raises(ZeroDivisionError):
        antisd.run_command(antisd.main, argv)

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(antisd, "load_problems", interrupted)
    code, text = failure_message(capsys, antisd.main, argv)
    assert code == 130 and text.startswith("interrupted (SIGINT): stopped at once")

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(antisd, "load_problems", out_of_memory)
    code, text = failure_message(capsys, antisd.main, argv)
    assert code.startswith("CUDA out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): lower the batch sizes")


@pytest.mark.parametrize("flags", [["--eval-benchmarks", "nosuch"],
                                   ["--eval-benchmarks", "math500", "--eval-data-dir", "/nonexistent"]])
def test_an_error_raised_inside_eval_during_training_is_one_paragraph(tmp_path, flags):
    # `python antisd.py` runs the file as __main__: eval.py's `import antisd` must get that module, or
    # eval's UserError is another class than the one run_command catches, and a traceback follows
    result = subprocess.run([sys.executable, "antisd.py", "--model", "tiny-random", "--dataset", "arith", "--steps", "1",
                             "--eval-every", "1", *flags, "--out-dir", str(tmp_path / "run")],
                            cwd=HERE, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and "\n" not in result.stderr.strip(), result.stderr
    assert ("nosuch" if "nosuch" in flags else "/nonexistent") in result.stderr


# -----------------------------------------------------------------------------
# The reference step: the fast loop checked against Algorithm 1 written the obvious way
#
# A real step of antisd.one_step, then reference_step.py (one rollout at a time, float64) on the same
# rollouts, number by number: each rollout's problem and reward, teacher prompt, per-token statistics
# and advantages, every logged metric, the loss, the gradient and the updated weights.

def decisive_tiny_model():
    """tiny-random, made so that every path of a step matters. Untrained it is nearly uniform: u is a few
    hundredths, and a rollout could have come from any prompt. Every RMSNorm weight x 4 lets the prompt
    decide: u spans about -2.4..2.2, where -phi(u) bends and M8's 2 sigma cut leaves tokens out, and
    most rollouts scored under another problem's prompt leave its top-p nucleus (8 to 11 of 12, each
    moved to the next group). Eight more stop tokens give rollouts of many lengths up to the cap."""
    model, tokenizer = antisd.load_model("tiny-random", torch.device("cpu"))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.mul_(4.0)
    model.generation_config.eos_token_id += list(range(100, 108))
    return model.train(), tokenizer


# each gold says how its group fares (scripted_reward): all correct, all wrong (the teacher then sees the
# dataset's solution, or without one the gold), and mixed
REFERENCE_PROBLEMS = [{"problem": "What is 1 + 1?", "answer": "every", "solution": ""},
                      {"problem": "Name a prime.", "answer": "none", "solution": "2 is a prime."},
                      {"problem": "Three", "answer": "none", "solution": ""},
                      {"problem": "How many legs has a spider, or so?", "answer": "some", "solution": "Eight."}]


def scripted_reward(monkeypatch, verdicts=None):
    """The tiny model never earns reward by itself: gold "every" rewards every rollout, "none" none, and
    "some" two of every three texts in the order it first sees them (remembered in `verdicts`, so that
    the reference, asking again, gets the same). Both the loop and the reference call antisd.verify."""
    verdicts = {} if verdicts is None else verdicts

    def verify(text, gold):
        if gold == "some":
            return verdicts.setdefault(text, float(len(verdicts) % 3 != 2))
        return float(gold == "every")
    monkeypatch.setattr(antisd, "verify", verify)


# the run's shape: micro-batches of 4 and generation batches of 5 cut across groups of 3
REFERENCE_SHAPE = ["--device", "cpu", "--prompts-per-step", "4", "--group-size", "3", "--micro-batch-size", "4",
                   "--gen-batch-size", "5", "--max-new-tokens", "16"]
# what the method reads besides its defaults: the same values on the command line and in the reference
REFERENCE_FLAGS = dict(gate_warmup=1, lr=1e-4, temperature=0.9, top_p=0.95)


def reference_command_line(flags):
    """What a user types for a case: the model, the run's shape, REFERENCE_FLAGS and the case's flags."""
    return ["--model", "tiny-random", *REFERENCE_SHAPE, *flags,
            *[part for key, value in REFERENCE_FLAGS.items() for part in (f"--{key.replace('_', '-')}", str(value))]]


# each case: the flags a user types, the reference's settings for them (reference_step.settings), steps.
# Two steps where a gate is on: the first is its warm-up (lambda 0), the second has lambda > 0.
REFERENCE_CASES = {
    "grpo": (["--method", "grpo"], dict(method="grpo"), 1),
    "sd": (["--method", "sd"], dict(method="sd"), 1),               # no gate: lambda from the first step
    "antisd": ([], dict(), 2),                                      # the default method
    # the perplexity of 12 short rollouts moves by 10% from step to step: tau_down at half of H_warm
    # keeps the gate open for the per-rollout lambda
    "official": (["--term", "official", "--lambda-form", "continuous", "--gate", "perplexity", "--tau-ratio", "0.5"],
                 dict(term="official", lambda_form="continuous", gate="perplexity", tau_ratio=0.5), 2),
    "full": (["--estimator", "full"], dict(estimator="full"), 2),  # the exact JSD gradient, off in warm-up
}

# Tolerances. antisd.py scores and updates in float32, the reference in float64 (its forward included).
# The largest differences seen, over every case in one process and two: 4e-5 in a per-token value;
# 2.5e-6 (relative) in a logged metric, 1.3e-5 in the gradient norm, which sums every element of the
# gradient; 3.1e-5 of its largest element in the gradient, up to 2.7e-4 in a second epoch, which starts
# from weights that the first one's undetermined steps (below) moved apart. Each tolerance is ten times
# that or more: a value sent to the wrong row, group or mask moves the same numbers by 2e-4 (the
# teacher's median entropy logged as the student's) to 1.
TOKEN_ATOL = 4e-4      # per token: s, H_S, t, H_T, JSD, u, the term, A
METRIC_RTOL = 3e-5     # every logged metric and the loss; 1e-6 absolute near 0 (the loss: a mean of
                       # advantages of both signs, relative 2e-5 seen)
GRAD_NORM_RTOL = 3e-4  # the logged gradient norm
GRADIENT_RTOL = 3e-4   # the clipped gradient, of its largest element; ten times that in a later epoch
# AdamW's first step moves a weight by lr * g / (|g| + 1e-8), nearly lr * sign(g): a gradient element
# within float32 rounding of 0 has no determined sign, and its weight may move by up to 2 lr the other
# way (up to 13 of the 94,592 here move by more than lr / 100). So: every weight within 2 lr per epoch
# (+ its float32 spacing) of the reference's, and the update as a whole within 3% of the reference's
# in norm (0.4% seen); an update lost, doubled or of the wrong sign is off by 100% or more.
UPDATE_RTOL = 3e-2
MACHINE_METRICS = {"seconds_generate", "seconds_score", "seconds_update", "generated_tokens_per_second",
                   "peak_gpu_memory_gb", "peak_gpu_memory_gb_generate", "peak_gpu_memory_gb_score",
                   "peak_gpu_memory_gb_update"}  # what the machine measured, not what the step computed


def spy_on_clipped_gradients(optimizer):
    """Keeps, after each clip, the gradient the optimizer applies: [per epoch: per parameter]. Under
    torchrun each process keeps its own shard."""
    clipped, clip = [], optimizer.clip_gradients

    def spy(max_norm):
        norm = clip(max_norm)
        clipped.append([master.grad.clone() for master in optimizer.master])
        return norm
    optimizer.clip_gradients = spy
    return clipped


def check_step_against_reference(done, record, gradients, weights_before, weights_after, reference, lr, group_size):
    """One step of the loop (what one_step returned, its metrics line, the gradients applied, the weights
    before and after) against the reference's step on the same rollouts."""
    rollouts = reference.rollouts
    assert len(rollouts) == len(done.responses)
    for i, r in enumerate(rollouts):
        assert done.student_prompts[i] == r.student_prompt, f"rollout {i} is not of problem {i // group_size}"
        assert r.sampled_from_own_prompt, f"rollout {i} was not sampled from its own problem's prompt"
        assert (done.responses[i], done.texts[i], done.rewards[i], done.truncated[i]) == \
               (r.response, r.text, r.reward, r.truncated), f"rollout {i}"
        assert float(done.seq_adv[i]) == pytest.approx(r.seq_adv, abs=1e-6), f"A_seq of rollout {i}"
        assert (done.teacher_prompts and done.teacher_prompts[i]) == r.teacher_prompt, f"teacher prompt {i}"
        length = len(r.response)
        assert int(done.mask[i].sum()) == length and not done.mask[i, length:].any()
        per_token = {"u": done.terms["u"], "a": done.terms["a"], "advantages": done.terms["advantages"],
                     **(done.stats or {})}
        for name, values in per_token.items():
            if values is None:
                assert r.a is None, f"{name} of rollout {i}"
                continue
            torch.testing.assert_close(values[i, :length].double(), getattr(r, name), rtol=0, atol=TOKEN_ATOL,
                                       msg=lambda m: f"{name} of rollout {i}: {m}")
            assert not values[i, length:].any(), f"{name} of rollout {i} past its end"
    assert set(record) - MACHINE_METRICS == set(reference.metrics) | {"step"}
    for key, expected in reference.metrics.items():
        if isinstance(expected, float):
            rtol = GRAD_NORM_RTOL if key == "grad_norm" else METRIC_RTOL
            assert record[key] == pytest.approx(expected, rel=rtol, abs=1e-6), key
        else:
            assert record[key] == expected, key
    assert done.update["losses"] == pytest.approx(reference.losses, rel=METRIC_RTOL, abs=1e-6)
    assert len(gradients) == len(reference.gradients) == done.update["epochs_applied"]
    for epoch, (fast, slow) in enumerate(zip(gradients, reference.gradients)):
        tolerance = GRADIENT_RTOL * (1 if epoch == 0 else 10) * max(float(g.abs().max()) for g in slow)
        for k, (g_fast, g_slow) in enumerate(zip(fast, slow)):
            torch.testing.assert_close(g_fast.double(), g_slow, rtol=0, atol=tolerance,
                                       msg=lambda m: f"epoch {epoch + 1}, gradient of parameter {k}: {m}")
    fast_update, reference_update = [], []
    for name, slow in reference.weights.items():
        before, after = weights_before[name].double(), weights_after[name].double()
        spacing = after.abs() * 2.0 ** -23
        assert ((after - slow).abs() <= 2 * lr * len(gradients) + spacing).all(), name
        fast_update.append((after - before).flatten())
        reference_update.append((slow - before).flatten())
    fast_update, reference_update = torch.cat(fast_update), torch.cat(reference_update)
    assert float((fast_update - reference_update).norm()) <= UPDATE_RTOL * float(reference_update.norm())


def run_loop_and_reference(monkeypatch, flags, settings, steps):
    """Steps of the loop as the command line sets it up, each checked against the reference's. Returns
    what the last step computed, in both."""
    scripted_reward(monkeypatch)
    args = antisd.get_args(reference_command_line(flags))
    model, tokenizer = decisive_tiny_model()
    device = torch.device("cpu")
    world, timer = antisd.World(device), antisd.PhaseTimer(device)
    optimizer, gate = antisd.MasterAdamW(model, args.lr, world), antisd.make_gate(args)
    rng = random.Random(1)  # not seeded with --seed: each step must draw from the generator it is given
    gradients = spy_on_clipped_gradients(optimizer)
    reference = reference_step.ReferenceRun(model, reference_step.settings(**{**REFERENCE_FLAGS, **settings}))
    torch.manual_seed(0)
    for step in range(1, steps + 1):
        sibling_rng = random.Random()
        sibling_rng.setstate(rng.getstate())  # the generator as the step finds it
        weights_before = {name: value.clone() for name, value in model.state_dict().items()}
        gradients.clear()
        done = antisd.one_step(model, tokenizer, REFERENCE_PROBLEMS, optimizer, gate, rng, world, timer, args)
        record = antisd.step_metrics(step, done.rewards, done.truncated, done.mask, done.stats, done.terms,
                                     done.update, gate, timer, args, done.texts, REFERENCE_PROBLEMS)
        G = args.group_size
        slow = reference.step(weights_before, tokenizer, REFERENCE_PROBLEMS,
                              [done.responses[p * G:(p + 1) * G] for p in range(len(REFERENCE_PROBLEMS))], [sibling_rng])
        check_step_against_reference(done, record, gradients, weights_before, model.state_dict(), slow, args.lr, G)
    return done, slow


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_the_loop_computes_algorithm_1_written_the_obvious_way(case, monkeypatch):
    flags, settings, steps = REFERENCE_CASES[case]
    done, slow = run_loop_and_reference(monkeypatch, flags, settings, steps)
    # every path mattered: all-correct, all-wrong and mixed groups, lengths from short to the cap,
    # micro-batches and generation batches across groups, lambda > 0 wherever there is a term
    groups = [done.rewards[k:k + 3] for k in range(0, 12, 3)]
    assert groups[0] == [1.0] * 3 and groups[1] == groups[2] == [0.0] * 3 and sorted(groups[3]) == [0.0, 1.0, 1.0]
    assert any(done.truncated) and not all(done.truncated) and len({len(r) for r in done.responses}) > 2
    assert slow.metrics["lambda"] > 0 or case == "grpo"


TWO_RANK_STEP = '''
import os, random, sys
import torch
sys.path.insert(0, {here!r})
import antisd

out = {out!r}
given = torch.load(os.path.join(out, "given.pt"))
verdicts = {{}}
def verify(text, gold):  # scripted_reward's
    if gold == "some":
        return verdicts.setdefault(text, float(len(verdicts) % 3 != 2))
    return float(gold == "every")
antisd.verify = verify
args = antisd.get_args(given["argv"])
device = torch.device("cpu")
world, timer = antisd.World(device), antisd.PhaseTimer(device)
model, tokenizer = antisd.load_model("tiny-random", device)
with torch.no_grad():  # decisive_tiny_model's
    for name, weight in model.named_parameters():
        if "norm" in name:
            weight.mul_(4.0)
model.generation_config.eos_token_id += list(range(100, 108))
weights_before = {{name: value.clone() for name, value in model.state_dict().items()}}
model = antisd.shard_model(model, world, device).train()
optimizer, gate = antisd.MasterAdamW(model, args.lr, world), antisd.make_gate(args)
rng = random.Random(args.seed + world.rank)  # as main() seeds them
torch.manual_seed(args.seed + world.rank)
rng_state, clipped, clip = rng.getstate(), [], optimizer.clip_gradients
def spy(max_norm):  # spy_on_clipped_gradients, each process's shards gathered
    norm = clip(max_norm)
    clipped.append([torch.cat(world.gather([master.grad])) for master in optimizer.master])
    return norm
optimizer.clip_gradients = spy
done = antisd.one_step(model, tokenizer, given["problems"], optimizer, gate, rng, world, timer, args)
record = antisd.step_metrics(1, done.rewards, done.truncated, done.mask, done.stats, done.terms, done.update, gate,
                             timer, args, done.texts, given["problems"])
weights_after = antisd.full_state_dict(model, torch.float32)
ranks = world.gather([{{"rng_state": rng_state, "verdicts": verdicts}}])
done.student_prompts, done.teacher_prompts = world.gather(done.student_prompts), world.gather(done.teacher_prompts)
if world.rank == 0:
    torch.save({{"done": vars(done), "record": record, "clipped": clipped, "before": weights_before,
                "after": weights_after, "ranks": ranks}}, os.path.join(out, "two_ranks.pt"))
world.dist.barrier()
sys.stdout.flush()
os._exit(0)  # all is saved: at Python's exit a C++ thread of torch.distributed sometimes aborts (SIGABRT)
'''


def test_two_processes_compute_algorithm_1_on_their_rows_and_update_as_one(tmp_path, monkeypatch):
    # torchrun, gloo: each process samples, rewards and scores its own two problems (its own sibling
    # draws, from its own generator), and updates on its own rows; the reference computes the step in
    # one process, rollout by rollout, from the rollouts both processes gathered. The options the
    # single-process cases leave out: M5's ablations, and a second epoch (old log-probs of each
    # process's own rows, a ratio away from 1 where the clip binds)
    flags = ["--divergence", "rkl", "--compose", "mult", "--ppo-epochs", "2", "--gate", "none"]
    settings = dict(divergence="rkl", compose="mult", ppo_epochs=2, gate="none")
    torch.save({"argv": reference_command_line(flags), "problems": REFERENCE_PROBLEMS}, tmp_path / "given.pt")
    script = tmp_path / "two_rank_step.py"
    script.write_text(TWO_RANK_STEP.format(here=str(HERE), out=str(tmp_path)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**FAST, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    two = torch.load(tmp_path / "two_ranks.pt", weights_only=False)
    scripted_reward(monkeypatch, {text: v for rank in two["ranks"] for text, v in rank["verdicts"].items()})
    model, tokenizer = decisive_tiny_model()
    reference = reference_step.ReferenceRun(model, reference_step.settings(**{**REFERENCE_FLAGS, **settings}))
    sibling_rngs = [random.Random() for _ in two["ranks"]]
    for sibling_rng, rank in zip(sibling_rngs, two["ranks"]):
        sibling_rng.setstate(rank["rng_state"])
    done, G = types.SimpleNamespace(**two["done"]), 3
    slow = reference.step(two["before"], tokenizer, REFERENCE_PROBLEMS,
                          [done.responses[p * G:(p + 1) * G] for p in range(len(REFERENCE_PROBLEMS))], sibling_rngs)
    check_step_against_reference(done, two["record"], two["clipped"], two["before"], two["after"], slow,
                                 REFERENCE_FLAGS["lr"], G)
    assert sorted(done.rewards[9:]) == [0.0, 1.0, 1.0] and slow.metrics["clip_fraction"] > 0


# -----------------------------------------------------------------------------
# The worked step (python tiny_tasks.py): what it prints is what the step computed and the update used

def test_the_worked_step_prints_the_numbers_the_update_used(monkeypatch):
    received = []
    real_update = antisd.update_policy

    def spy(model, optimizer, prompts, responses, terms, *rest):
        received.append(terms["advantages"].clone())
        return real_update(model, optimizer, prompts, responses, terms, *rest)
    monkeypatch.setattr(antisd, "update_policy", spy)
    lines = []
    done, batch, row = tiny_tasks.worked_step("tiny-random", seed=0, prompts_per_step=2, show=lines.append)
    text = "\n".join(lines)
    assert len(received) == 6 and "step 6, problem" in text and "lambda = 0.5" in text  # W = 5, then the term is on
    # 3: the group's advantages as printed are the z-scores of its printed rewards (float64, sample std)
    group = [m.groups() for m in (re.search(r"rollout \d: reward (\d)  A_seq ([-+]\d\.\d{3})", line) for line in lines) if m]
    assert len(group) == 8
    rewards = [float(r) for r, _ in group]
    mean, std = sum(rewards) / 8, (sum((r - sum(rewards) / 8) ** 2 for r in rewards) / 7) ** 0.5
    assert [float(a) for _, a in group] == pytest.approx([(r - mean) / (std + 1e-6) for r in rewards], abs=1e-3)
    # 6: every token row: u = t - s, -phi(u), and A = A_seq + lambda * -phi(u), recomputed from the printed
    # s and t in float64, and equal to the advantages the update received for that rollout
    rows = [line.split()[-5:] for line in lines[lines.index(next(l for l in lines if l.startswith("   token"))) + 1:]
            if re.fullmatch(r"(\s+-?\d+\.\d{3}){5}", line[-45:])]
    length = int(done.mask[row].sum())
    assert len(rows) == length > 0
    a_seq = float(group[row % 8][1])
    for k, (s, t, u, term, advantage) in enumerate(map(lambda r: [float(x) for x in r], rows)):
        assert u == pytest.approx(t - s, abs=2.5e-3)
        assert term == pytest.approx(-0.5 * (math.log1p(math.exp(u)) - math.log(2.0)), abs=2e-3)
        assert advantage == pytest.approx(a_seq + 0.5 * term, abs=2e-3)
        assert advantage == pytest.approx(float(received[-1][row, k]), abs=1e-3)


# -----------------------------------------------------------------------------
# README's code map: which lines of antisd.py hold each step

def code_map(source):
    """README's table, from antisd.py itself: for each numbered banner of Part I (and the loop), its
    first and last line and the functions and classes defined under it."""
    lines, rows, current = source.split("\n"), [], None
    part_two = next(k for k, line in enumerate(lines) if line.startswith("# Part II"))
    for k, line in enumerate(lines[:part_two]):
        banner = re.match(r"# (\d\. .*|The training loop.*)", line) if lines[k - 1].startswith("# ----") else None
        if banner:
            current = [banner.group(1).split(":")[0].split(" (")[0], k + 1, k + 1, []]
            rows.append(current)
        elif current:
            definition = re.match(r"(?:def|class) (\w+)", line)
            if definition:
                current[3].append(definition.group(1))
            if line.strip() and not line.startswith("# ===") and not line.startswith("# ----"):
                current[2] = k + 1
    table = ["| step | lines of antisd.py | what defines it |", "|---|---|---|"]
    table += [f"| {title} | {first}-{last} | {', '.join(f'`{name}`' for name in names)} |"
              for title, first, last, names in rows]
    return "\n".join(table)


def test_readme_code_map_gives_the_lines_antisd_py_has_now():
    expected = code_map((HERE / "antisd.py").read_text())
    assert expected.count("\n") >= 9 and "| 6. Per-token advantages |" in expected  # steps 1-7 and the loop were found
    assert expected in (HERE / "README.md").read_text(), "README's code map is stale; it should read:\n" + expected


# -----------------------------------------------------------------------------
# Installation: what a fresh clone on a new machine needs

# import names that a dependency may import although no package of that name is installed here
# (transformers 5.25 and later import Hugging Face's `kernels`; earlier ones do when it is installed)
KNOWN_IMPORT_NAMES = {"kernels"}


def test_no_module_of_the_repository_stands_in_for_a_package_its_dependencies_import():
    """Python puts the script's folder first on sys.path, so a top-level kernels.py here was imported
    by transformers in place of Hugging Face's `kernels` package, and every run failed. No top-level
    module of the repository may share its import name with the standard library, with any package
    installed in this environment, or with KNOWN_IMPORT_NAMES."""
    import importlib.metadata
    import pkgutil
    ours = {path.stem for path in HERE.glob("*.py")} | {path.name for path in HERE.iterdir()
                                                          if (path / "__init__.py").is_file()}
    elsewhere = [entry for entry in sys.path if entry and Path(entry).resolve() != HERE]
    taken = (set(sys.stdlib_module_names) | set(sys.builtin_module_names) | KNOWN_IMPORT_NAMES
             | set(importlib.metadata.packages_distributions())
             | {module.name for module in pkgutil.iter_modules(elsewhere)})
    assert "antisd" in ours and "torch" in taken and "json" in taken  # the two sides were found
    assert not ours & taken, f"these modules of the repository shadow installed or standard ones: {sorted(ours & taken)}"


def compile_triton_kernels_for_gpus(kernels_path, archs=(80, 90)):
    """Prints one JSON line per (kernel variant, arch) and returns 0 when every kernel fits, 1 when
    one does not, 77 when nothing could be checked (no triton, NVIDIA backend or ptxas).
    Self-contained (imports inside) so that a test can run its source with `python -c`."""
    import contextlib, importlib.util, io, json, os, re, tempfile, time, traceback

    def report(record):
        print(json.dumps(record), flush=True)

    def skip(reason):
        report({"skip": reason})
        return 77

    def count(pattern, log, default=None):   # a number from ptxas's report
        match = re.search(pattern, log)
        if match is None and default is None:
            raise ValueError(f"no {pattern!r} in the ptxas report:\n{log}")
        return int(match.group(1)) if match else default

    os.environ["TRITON_INTERPRET"] = "0"     # interpreted kernels cannot be compiled
    try:
        import triton
    except ImportError as exc:
        return skip(f"triton does not import: {exc}")
    from triton import knobs
    from triton.backends import backends
    if "nvidia" not in backends:
        return skip("Triton has no NVIDIA backend")
    try:
        knobs.nvidia.ptxas.path
    except RuntimeError as exc:              # "Cannot find ptxas"
        return skip(f"Triton's NVIDIA backend has no ptxas: {exc}")
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    spec = importlib.util.spec_from_file_location("antisd_kernels_aot", kernels_path)
    k = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(k)

    # Arguments as _TritonTokenStats.forward/backward pass them, for contiguous bf16 logits with
    # Qwen's vocabulary (the value of V and the strides decide Triton's divisibility specialisation).
    V = 151_936
    bf16, f32, i64 = (MockTensor(dtype) for dtype in (torch.bfloat16, torch.float32, torch.int64))
    floats = (k.LOG2E, 1.0, 0.5)                                   # scale, inv_temp, beta
    fwd_args = (bf16, V, bf16, V, i64, f32, f32, f32, f32, f32, f32, V, *floats)
    bwd_args = (bf16, V, bf16, V, i64, f32, f32, f32, f32, bf16, V, V, *floats)
    variants = [(k._token_stats_fwd_kernel, fwd_args,
                 dict(HAS_TEACHER=teacher, BLOCK=k.FWD_BLOCK, num_warps=k.FWD_WARPS))
                for teacher in (True, False)]
    variants += [(k._token_stats_bwd_kernel, bwd_args,
                  dict(USE_JSD=jsd, ROUND_BF16_BY_HAND=False, BLOCK=k.BWD_BLOCK, num_warps=k.BWD_WARPS))
                 for jsd in (True, False)]
    max_shared = {80: 166912, 90: 232448}    # opt-in bytes per block: A100 163 KB, H100 227 KB

    knobs.nvidia.dump_ptxas_log = True       # Triton then prints the report of its own `ptxas -v` run
    failed = False
    with tempfile.TemporaryDirectory() as cache:
        knobs.cache.dir = cache              # a fresh cache: every kernel is compiled, so ptxas reports
        for arch in archs:
            target = GPUTarget("cuda", arch, 32)
            backend = make_backend(target)
            for fn, args, kwargs in variants:
                record = {"kernel": fn.__name__, **kwargs, "arch": arch}
                try:
                    # The launcher's own binder turns the arguments into the signature, constexprs
                    # and attributes of a real launch, in the installed Triton's format.
                    bind = create_function_from_signature(fn.signature, fn.params, backend)
                    bound, specialization, options = bind(*args, **kwargs)
                    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                                          specialization, options)
                    log = io.StringIO()
                    start = time.perf_counter()
                    with contextlib.redirect_stdout(log):
                        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                                target=target, options=options.__dict__)
                    record["seconds"] = round(time.perf_counter() - start, 2)
                    log = log.getvalue()
                    record.update(registers=count(r"Used (\d+) registers", log),
                                  spill_stores=count(r"(\d+) bytes spill stores", log),
                                  spill_loads=count(r"(\d+) bytes spill loads", log),
                                  shared=kernel.metadata.shared,                   # Triton's (dynamic)
                                  static_smem=count(r"(\d+) bytes smem", log, 0))  # ptxas's, if any
                    record["problems"] = [problem for problem, bad in (
                        ("register spill", record["spill_stores"] or record["spill_loads"]),
                        ("over 255 registers", record["registers"] > 255),
                        (f"over {max_shared[arch]} bytes of shared memory",
                         record["shared"] + record["static_smem"] > max_shared[arch])) if bad]
                except Exception as exc:     # a compile error (or an unreadable ptxas report)
                    record["problems"] = ["".join(traceback.format_exception(exc, limit=0)).strip()]
                failed |= bool(record["problems"])
                report(record)
    return 1 if failed else 0


def test_triton_kernels_compile_for_a100_and_h100_without_spills():
    """Compiles every kernel variant that a GPU launches, with its BLOCK and num_warps, for sm_80 and
    sm_90 through Triton and its ptxas, no GPU needed, and fails on a compile error, a register
    spill, over 255 registers or more shared memory than the card gives a block. The compiler runs
    in a fresh interpreter with TRITON_INTERPRET=0 (this file turns the interpreter on, and
    interpreted kernels cannot be compiled): the function's own source, passed to `python -c`."""
    code = (inspect.getsource(compile_triton_kernels_for_gpus) + "\nimport sys\n"
            f"sys.exit(compile_triton_kernels_for_gpus({antisd_kernels.__file__!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 77:
        pytest.skip(records[-1]["skip"])
    assert proc.returncode in (0, 1) and len(records) == 8, proc.stdout + proc.stderr[-5000:]
    failures = [json.dumps({key: value for key, value in record.items() if key != "problems"}) + "\n"
                + "\n".join(record["problems"]) for record in records if record["problems"]]
    assert not failures, "\n\n".join(failures)
