"""The synthetic arithmetic task, answer extraction, the packaged metric, question/answer and TRL-format prompt data,
user metrics, generation lengths from the data, the teacher-student divergence and the checks around a run."""

from __future__ import annotations

import ast
import copy
import json
import random
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset

from sparse_opd.tasks import (
    LEVELS,
    DivergenceResult,
    EvalResult,
    answers_are_numbers,
    arithmetic_dataset,
    evaluate_model,
    extract_answer,
    generalized_jsd,
    generate_problems,
    generation_length,
    has_working,
    is_correct,
    load_metric,
    load_scorer,
    make_problem,
    prepare_dataset,
    prepare_prompt_dataset,
    prepare_qa_dataset,
    reference_value,
    regression_line,
    strip_calculator_annotations,
    teacher_student_divergence,
    teacher_warnings,
)
from sparse_opd.tasks.divergence import completion_divergence
from sparse_opd.tasks.generation import tokenize_prompts
from sparse_opd.tasks.lengths import quantile
from tests.helpers import ROOT
from tests.helpers.tiny_opd import tiny_llama, tiny_tokenizer

# Grade-school math rows in the benchmark's own format (written for these tests): a worked solution with calculator
# annotations and a final '#### n'.
GSM8K_ROWS = [
    {"question": "A bakery sells muffins for $3 each. On Monday it sold 24 muffins and on Tuesday it sold twice as "
                 "many. How much money did the bakery make from muffins on the two days?",
     "answer": "On Tuesday the bakery sold 24 * 2 = <<24*2=48>>48 muffins.\nIn total it sold 24 + 48 = <<24+48=72>>72 "
               "muffins.\nSo it made 72 * 3 = $<<72*3=216>>216.\n#### 216"},
    {"question": "Lena has 5 boxes of pencils with 12 pencils in each box. She gives 17 pencils to her classmates. "
                 "How many pencils does she have left?",
     "answer": "Lena has 5 * 12 = <<5*12=60>>60 pencils.\nAfter giving some away she has 60 - 17 = <<60-17=43>>43 "
               "pencils.\n#### 43"},
    {"question": "A train travels 180 miles in 3 hours. At the same speed, how many miles does it travel in 5 hours?",
     "answer": "The train travels 180 / 3 = <<180/3=60>>60 miles per hour.\nIn 5 hours it travels 60 * 5 = "
               "<<60*5=300>>300 miles.\n#### 300"},
    {"question": "Omar saved $1,250 in January and spent $375 of it on a bike. He then earned $90 mowing lawns. How "
                 "much money does he have now?",
     "answer": "After buying the bike Omar has 1250 - 375 = <<1250-375=875>>875 dollars.\nAfter mowing lawns he has "
               "875 + 90 = <<875+90=965>>965 dollars.\n#### 965"},
]


# ------------------------------------------------------------------------------------------------ synthetic task
@pytest.mark.parametrize("level", sorted(LEVELS))
def test_problem_answer_equals_replaying_its_worked_steps(level):
    rng = random.Random(level)
    for _ in range(200):
        problem = make_problem(rng, level)
        assert len(problem.steps) == LEVELS[level]["steps"]
        value = None
        for step in problem.steps:
            lhs, result = step.split(" = ")
            a, op, b = lhs.split(" ")
            a, b, result = int(a), int(b), int(result)
            assert value is None or a == value, "each step starts from the previous result"
            expected = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            assert op != "/" or a % b == 0, "divisions are exact"
            assert result == expected >= 0
            value = result
        assert problem.answer == value
        assert problem.solution.endswith(f"Answer: {value}")


def test_splits_are_reproducible_and_test_problems_are_not_in_train():
    a = arithmetic_dataset("test", 50, 2)
    b = arithmetic_dataset("test", 50, 2)
    assert a["prompt"] == b["prompt"] and a["answer"] == b["answer"]
    train_questions = {p.question for p in generate_problems(10_000, 2, 1_000)}
    test_questions = {row[0]["content"].split("\n")[0] for row in a["prompt"]}
    assert not test_questions & train_questions
    assert arithmetic_dataset("validation", 50, 2)["prompt"] != a["prompt"]


def test_dataset_columns_and_privileged_prompt_contents():
    ds = arithmetic_dataset("train", 6, [1, 3], teacher_context="both", num_examples_in_context=2)
    assert set(ds.column_names) == {"prompt", "answer", "teacher_prompt", "solution", "level"}
    assert sorted(ds["level"]) == [1, 1, 1, 3, 3, 3]
    row = ds[0]
    student, teacher = row["prompt"][-1]["content"], row["teacher_prompt"][-1]["content"]
    assert row["solution"] not in student, "the student never sees the reference solution"
    assert row["solution"] in teacher and teacher.count("Example problem:") == 2
    assert teacher.endswith(student), "the teacher sees the same question, last"


def test_bad_task_arguments_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="level"):
        arithmetic_dataset("train", 4, 7)
    with pytest.raises(ValueError, match="split"):
        arithmetic_dataset("dev", 4, 1)
    with pytest.raises(ValueError, match="teacher context"):
        arithmetic_dataset("train", 4, 1, teacher_context="hints")


# ------------------------------------------------------------------------------------------------ answers
@pytest.mark.parametrize(
    "completion, value, form",
    [
        ("3 + 4 = 7\nAnswer: 7", 7, "strict"),
        ("**Answer:** 18", 18, "strict"),
        ("Answer: 2.50", Fraction(5, 2), "strict"),
        ("Answer: 5. Wait, Answer: 6", 6, "strict"),
        ("Answer: 5. Wait, the answer is 6", 6, "stated"),
        ("The answer is $1,250.", 1250, "stated"),
        ("The final answer is: 18.", 18, "stated"),
        ("so #### 42", 42, "stated"),
        ("\\boxed{-3}", -3, "stated"),
        ("so the total is \\boxed{\\$1{,}000}", 1000, "stated"),
        ("Tuesday: 48 muffins, total 72, so 72 * 3 = 216 dollars.", 216, "last_number"),
        ("She had 10 - 5 left", 5, "last_number"),
        ("It is -5 degrees", -5, "last_number"),
        ("no number here", None, "none"),
    ],
)
def test_extract_answer_finds_the_benchmark_answer_and_its_form(completion, value, form):
    extracted = extract_answer(completion)
    assert extracted.value == (None if value is None else Fraction(value))
    assert extracted.form == form
    assert extracted.well_formatted is (form == "strict")


def test_reference_values_and_correctness():
    assert reference_value("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == 72
    assert reference_value(3) == 3 and reference_value("1,000") == 1000
    assert is_correct("Answer: 72", "#### 72") and not is_correct("Answer: 71", "72")
    assert is_correct("so she has 72 clips", "72"), "the last number counts, as the benchmark's users score it"
    with pytest.raises(ValueError, match="not a number"):
        reference_value("seventy-two")


def test_calculator_annotations_are_stripped_and_the_text_kept():
    assert strip_calculator_annotations(GSM8K_ROWS[0]["answer"]).splitlines()[0] == (
        "On Tuesday the bakery sold 24 * 2 = 48 muffins.")
    assert has_working(GSM8K_ROWS[1]["answer"])
    assert not has_working("Answer: 43") and not has_working("#### 43") and not has_working("The answer is 43.")


def test_metric_loads_by_local_path_and_scores_flexible_and_strict():
    metric = load_metric()
    scores = metric.compute(
        predictions=["2 + 3 = 5\nAnswer: 5", "I think 7", "Answer: 9", "nothing"], references=["5", "7", "8", "1"]
    )
    assert scores == {"accuracy": 0.5, "strict_accuracy": 0.25, "format_error_rate": 0.5, "num_examples": 4}


def test_metric_scores_gsm8k_style_completions_as_the_benchmark_does():
    completions = [
        "Tuesday: 24 * 2 = 48 muffins. Total 72 muffins, 72 * 3 = 216 dollars.",  # right, no statement
        "Lena has 60 pencils and gives 17 away. The answer is 43.",  # right, stated
        "60 miles per hour, so 300 miles.\nAnswer: 300",  # right, strict
        "875 + 90 = <<875+90=955>>955\n#### 955",  # wrong, stated
    ]
    scores = load_metric().compute(predictions=completions, references=[r["answer"] for r in GSM8K_ROWS],
                                   per_example=True)
    assert scores["correct"] == [True, True, True, False]
    assert scores["accuracy"] == 0.75 and scores["strict_accuracy"] == 0.25 and scores["format_error_rate"] == 0.75


# ------------------------------------------------------------------------------------------------ question/answer data
def test_prepare_qa_dataset_on_a_local_gsm8k_style_json(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [*GSM8K_ROWS, {"question": "What is 10 - 4?", "answer": "6"}]))
    ds = prepare_qa_dataset(load_dataset("json", data_files=str(path))["train"])
    assert ds["answer"] == ["216", "43", "300", "965", "6"]
    assert ds["worked_solution"] == [True, True, True, True, False]
    assert ds["solution"][1] == ("Lena has 5 * 12 = 60 pencils.\nAfter giving some away she has 60 - 17 = 43 "
                                 "pencils.\nAnswer: 43")
    assert ds["solution"][4] == "Answer: 6"
    teacher = ds[0]["teacher_prompt"][-1]["content"]
    assert "<<" not in teacher and "So it made 72 * 3 = $216.\nAnswer: 216" in teacher
    assert ds[0]["prompt"][-1]["content"].startswith(GSM8K_ROWS[0]["question"])
    with pytest.raises(ValueError, match="answer_column"):
        prepare_qa_dataset(load_dataset("json", data_files=str(path))["train"], answer_column="final")


# ------------------------------------------------------------------------------------------------ TRL prompt formats
def test_text_prompts_without_answers_keep_only_prompts():
    ds = prepare_dataset(Dataset.from_list([{"prompt": "Write a haiku about rain."}, {"prompt": "Name a prime."}]))
    assert ds.column_names == ["prompt"] and ds["prompt"][1] == "Name a prime."
    assert "no reference answers" in ds.info.description
    assert not answers_are_numbers(ds)


def test_conversational_prompt_completion_rows_get_text_references_and_a_privileged_prompt():
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
             "completion": [{"role": "assistant", "content": "Paris."}]}]
    ds = prepare_dataset(Dataset.from_list(rows))
    assert ds[0]["prompt"] == rows[0]["prompt"] and ds[0]["answer"] == "Paris."
    teacher = ds[0]["teacher_prompt"]
    assert teacher[0] == rows[0]["prompt"][0] and teacher[-1]["content"].startswith("Reference answer")
    assert teacher[-1]["content"].endswith("Capital of France?") and "Paris." in teacher[-1]["content"]
    assert "completion" not in ds.column_names and not answers_are_numbers(ds)


def test_messages_rows_split_into_prompt_and_numeric_reference():
    rows = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}],
             "id": i} for i, r in enumerate(GSM8K_ROWS)]
    ds = prepare_dataset(Dataset.from_list(rows))
    assert ds[1]["prompt"] == [{"role": "user", "content": GSM8K_ROWS[1]["question"]}]
    assert ds["answer"] == ["216", "43", "300", "965"] and answers_are_numbers(ds)
    assert ds["id"] == [0, 1, 2, 3] and "messages" not in ds.column_names
    assert ds[1]["solution"].endswith("60 - 17 = 43 pencils.\nAnswer: 43")


def test_own_teacher_prompt_column_is_kept():
    rows = [{"prompt": "2+2?", "answer": "4", "teacher_prompt": "Hint: it is even. 2+2?"}]
    assert prepare_dataset(Dataset.from_list(rows))["teacher_prompt"] == ["Hint: it is even. 2+2?"]


def test_no_usable_prompt_column_is_one_line_naming_the_columns_and_flags():
    with pytest.raises(ValueError) as err:
        prepare_dataset(Dataset.from_list([{"text": "hi", "label": 1}]), name="data.jsonl")
    message = str(err.value)
    assert "\n" not in message and "data.jsonl has no usable prompt column (columns: ['text', 'label'])" in message
    assert "--prompt_column" in message and "--question_column" in message
    with pytest.raises(ValueError, match="no column 'instruction'"):
        prepare_dataset(Dataset.from_list([{"prompt": "hi"}]), prompt_column="instruction")
    with pytest.raises(ValueError, match=r"has no column 'q' \(columns: \['question', 'answer'\]\); pass the right "
                                         r"--question_column"):
        prepare_dataset(Dataset.from_list([{"question": "2 + 3?", "answer": 5}]), question_column="q")
    with pytest.raises(ValueError, match="row 0 of 'prompt' is a list, neither text nor a list of chat messages"):
        prepare_prompt_dataset(Dataset.from_list([{"prompt": ["hi", "there"]}]))


def test_rows_without_a_reference_are_skipped_and_counted_or_refused():
    ds = Dataset.from_list([{"prompt": "a?", "answer": "1"}, {"prompt": "b?", "answer": ""}])
    kept = prepare_prompt_dataset(ds)
    assert kept["prompt"] == ["a?"] and "1 without one skipped" in kept.info.description
    with pytest.raises(ValueError, match="1 of 2 rows have no reference answer"):
        prepare_prompt_dataset(ds, on_missing="error")


# ------------------------------------------------------------------------------------------------ generation length
class WordTokenizer:
    """Counts words: enough to check the length arithmetic exactly."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_quantile_is_nearest_rank():
    assert [quantile([40, 10, 30, 20], q) for q in (0.25, 0.5, 0.75, 0.95, 1.0)] == [10, 20, 30, 40, 40]


def test_generation_length_from_reference_solutions():
    references = ["w " * 100] * 19 + ["w " * 200]
    length = generation_length(WordTokenizer(), references, fallback=80)
    assert length.max_new_tokens == 182  # ceil(1.5 * 100) + 32: the 95th percentile of 20 is the 19th value
    assert "95th percentile of 20 reference solutions (100 tokens)" in length.reason
    capped = generation_length(WordTokenizer(), references, fallback=80, q=1.0, cap=256)
    assert capped.max_new_tokens == 256 and "capped at 256" in capped.reason  # 1.5 * 200 + 32 = 332
    fallback = generation_length(WordTokenizer(), references[:3], fallback=80)
    assert fallback.max_new_tokens == 80 and "fallback" in fallback.reason


def test_generation_length_of_gsm8k_rows_uses_the_solutions_the_teacher_sees():
    ds = prepare_dataset(Dataset.from_list(GSM8K_ROWS * 2))
    worked = [s for s, w in zip(ds["solution"], ds["worked_solution"]) if w]
    length = generation_length(WordTokenizer(), worked, fallback=80)
    longest = max(len(s.split()) for s in worked)  # q=0.95 of 8 values is the largest
    assert length.max_new_tokens == -(-3 * longest // 2) + 32


# ------------------------------------------------------------------------------------------------ evaluation
def test_evaluate_model_scores_every_row_in_order():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    ds = arithmetic_dataset("test", 6, 1)
    result = evaluate_model(model, tokenizer, ds, batch_size=4, max_new_tokens=4)
    assert result.num_examples == 6 and len(result.completions) == 6
    expected = [float(is_correct(c, a)) for c, a in zip(result.completions, ds["answer"])]
    assert result.correct == expected and result.accuracy == sum(expected) / 6
    assert result.strict_accuracy <= result.accuracy and 0 <= result.format_error_rate <= 1


def test_chat_template_options_and_the_generation_context_come_from_the_caller(monkeypatch):
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    seen, entered = [], []
    render = tokenizer.apply_chat_template

    def spy(*args, **kwargs):
        seen.append(kwargs.get("enable_thinking"))
        return render(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", spy)

    class Context:
        def __init__(self, m):
            entered.append(m)

        def __enter__(self):
            return None

        def __exit__(self, *exc):
            entered.append("exit")

    ds = arithmetic_dataset("test", 3, 1)
    evaluate_model(model, tokenizer, ds, max_new_tokens=2, chat_template_kwargs={"enable_thinking": False},
                   generation_context=Context)
    assert seen == [False, False, False] and entered == [model, "exit"]


def test_tasks_do_not_import_the_tuner():
    root = ROOT / "sparse_opd" / "tasks"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "tuner" not in (node.module or ""), f"{path.name} imports {node.module}"


# ------------------------------------------------------------------------------------------------ user metrics
def write_metric_module(folder: Path) -> Path:
    """A local `evaluate` module: exact match of stripped strings, with per-example scores."""
    folder.mkdir()
    (folder / "exact.py").write_text(textwrap.dedent('''
        import datasets
        import evaluate


        class Exact(evaluate.Metric):
            def _info(self):
                return evaluate.MetricInfo(
                    description="exact match", citation="", inputs_description="",
                    features=datasets.Features({"predictions": datasets.Value("string"),
                                                "references": datasets.Value("string")}))

            def _compute(self, predictions, references):
                scores = [float(p.strip() == r.strip()) for p, r in zip(predictions, references)]
                return {"exact_match": sum(scores) / len(scores), "scores": scores}
    '''))
    return folder


def test_a_local_evaluate_module_scores_by_path(tmp_path):
    scorer = load_scorer(str(write_metric_module(tmp_path / "exact")))
    scores = scorer(["Paris ", "Rome", "x"], ["Paris", "Madrid", "x"])
    assert scores.headline == "exact_match" and scores.score == pytest.approx(2 / 3)
    assert scores.per_example == [1.0, 0.0, 1.0]


def test_a_callable_metric_by_module_path_is_called_with_the_completions(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "CALLS = []\n"
        "def first_word(predictions, references):\n"
        "    CALLS.append((list(predictions), list(references)))\n"
        "    return [float(p.split()[:1] == r.split()[:1]) for p, r in zip(predictions, references)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    ds = Dataset.from_list([{"prompt": "Ava has", "answer": "apples"}, {"prompt": "Ben has", "answer": "coins"}])
    result = evaluate_model(model, tokenizer, ds, max_new_tokens=3, metric="my_metrics:first_word")
    calls = sys.modules["my_metrics"].CALLS
    assert calls == [(result.completions, ["apples", "coins"])]
    expected = [float(c.split()[:1] == [a]) for c, a in zip(result.completions, ["apples", "coins"])]
    assert result.correct == expected and result.accuracy == sum(expected) / 2
    assert result.metric == "my_metrics:first_word" and result.format_error_rate is None


@pytest.mark.parametrize(
    "spec, message",
    [("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"), ("os:sep", "not a callable"),
     ("json:nothing_here", "has no attribute 'nothing_here'")],
)
def test_bad_metric_names_fail_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message):
        load_scorer(spec)


def test_a_missing_local_metric_folder_says_what_to_name(tmp_path):
    with pytest.raises(ValueError, match="could not be loaded from the local module.*package.module:function"):
        load_scorer(str(tmp_path / "nowhere"))  # a path that exists not: evaluate finds no script there


# ------------------------------------------------------------------------------------------------ divergence
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_is_the_divergence_trl_trains_on(beta, temperature):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # contract: TRL's own per-token loss

    torch.manual_seed(0)
    h_s, h_t = torch.randn(5, 8), torch.randn(5, 8)
    w_s, w_t = torch.randn(11, 8), torch.randn(11, 8)
    trl_per_token, _ = ChunkedDivergenceFunction.apply(h_s, w_s, None, h_t, w_t, None, beta, temperature)
    ours = generalized_jsd(h_s @ w_s.T, h_t @ w_t.T, beta, temperature)
    torch.testing.assert_close(ours, trl_per_token, rtol=1e-5, atol=1e-6)
    assert (ours > 0).all()


def test_generalized_jsd_endpoints_are_the_two_kl_divergences():
    torch.manual_seed(1)
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    p, q = s.softmax(-1), t.softmax(-1)
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), (p * (p / q).log()).sum(-1))
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), (q * (q / p).log()).sum(-1))
    with pytest.raises(ValueError, match="same vocabulary"):
        generalized_jsd(s, t[:, :5])


def tiny_gpt2(tokenizer, seed: int):
    """Absolute position embeddings: a left-padded batch scores right only with positions taken from the mask."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tokenizer), n_positions=128,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_completion_divergence_is_the_same_batched_with_padding_as_alone(make):
    tokenizer = tiny_tokenizer()
    student, teacher = make(tokenizer, seed=0).eval(), make(tokenizer, seed=1).eval()  # GPT-2 has dropout
    prompts = tokenize_prompts(tokenizer, [[{"role": "user", "content": "Ava has 3 apples"}], "Ben finds 12 coins ."])
    teacher_prompts = tokenize_prompts(tokenizer, ["Reference solution : 3", [{"role": "user", "content": "Ben"}]])
    completions = [tokenizer("3 + 4 = 7")["input_ids"],
                   tokenizer("Answer : 12")["input_ids"] + [tokenizer.eos_token_id]]
    batched = completion_divergence(student, teacher, prompts, teacher_prompts, completions, tokenizer.pad_token_id,
                                    beta=0.5, temperature=1.0, batch_size=2)
    for i in range(2):  # each alone, unpadded, by a plain forward
        ids_s = torch.tensor([prompts[i] + completions[i]])
        ids_t = torch.tensor([teacher_prompts[i] + completions[i]])
        k = len(completions[i])
        with torch.no_grad():
            s_logits = student(ids_s).logits[0, -k - 1 : -1]
            t_logits = teacher(ids_t).logits[0, -k - 1 : -1]
        expected = generalized_jsd(s_logits, t_logits, beta=0.5)
        assert batched[i][1] == k
        assert batched[i][0] == pytest.approx(float(expected.sum()), rel=1e-4)


def test_teacher_student_divergence_is_zero_against_itself_and_reproducible():
    tokenizer = tiny_tokenizer()
    student = tiny_llama(tokenizer, seed=0)
    prompts = arithmetic_dataset("test", 4, 1)["prompt"]
    state = torch.get_rng_state()
    same = teacher_student_divergence(student, copy.deepcopy(student), tokenizer, prompts, max_new_tokens=6,
                                      batch_size=3)
    assert torch.equal(state, torch.get_rng_state()), "the caller's random state is left as it was"
    assert same.mean == pytest.approx(0.0, abs=1e-6) and same.num_prompts == 4 and same.num_tokens >= 4
    other = tiny_llama(tokenizer, seed=1)
    first = teacher_student_divergence(student, other, tokenizer, prompts, max_new_tokens=6, num_samples=2)
    again = teacher_student_divergence(student, other, tokenizer, prompts, max_new_tokens=6, num_samples=2)
    assert first.per_prompt == again.per_prompt and first.mean > 0.01 and len(first.completions) == 8
    assert first.mean == pytest.approx(sum(first.per_prompt) / 4)
    assert str(first).startswith("KL(student || teacher) ")


def test_base_weights_teacher_through_disable_adapter_equals_a_copy_of_the_base():
    from peft import LoraConfig, get_peft_model

    tokenizer = tiny_tokenizer()
    base = tiny_llama(tokenizer, seed=0)
    base_copy = copy.deepcopy(base)
    student = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ds = arithmetic_dataset("test", 3, 1)
    kwargs = {"teacher_prompts": ds["teacher_prompt"], "max_new_tokens": 5, "seed": 3}
    by_context = teacher_student_divergence(student, student.disable_adapter, tokenizer, ds["prompt"], **kwargs)
    by_model = teacher_student_divergence(student, base_copy, tokenizer, ds["prompt"], **kwargs)
    assert by_context.per_prompt == pytest.approx(by_model.per_prompt, rel=1e-5)
    assert by_context.mean > 0


def test_divergence_change_is_paired_over_prompts():
    before = DivergenceResult(0.5, 0.1, 3, 30, 1.0, 1.0, 0.0, per_prompt=[0.4, 0.5, 0.6])
    after = DivergenceResult(0.4, 0.1, 3, 30, 1.0, 1.0, 0.0, per_prompt=[0.3, 0.4, 0.5])
    change, se = after.change_from(before)
    assert change == pytest.approx(-0.1) and se == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ checks
def result(correct: list[int]) -> EvalResult:
    return EvalResult(sum(correct) / len(correct), 0.5, len(correct), 0.0, correct=[float(c) for c in correct])


def test_teacher_not_clearly_better_is_warned_with_its_paired_difference():
    student = result([1] * 3 + [0] * 61)
    clearly = result([1] * 20 + [0] * 44)
    assert teacher_warnings(student, clearly) == []
    close = result([1] * 5 + [0] * 59)  # +2 problems of 64: +3.1 +/- 2.2 points
    (line,) = teacher_warnings(student, close)
    assert line.startswith("warning: the teacher is not clearly better than the student (7.8% vs 4.7%, difference "
                           "+3.1 +/- 2.2 points, within 2 standard errors over 64 rows)")


def test_teacher_shown_only_final_answers_is_warned():
    student, teacher = result([0] * 10), result([1] * 10)
    answers_only = prepare_dataset(Dataset.from_list([{"question": "2 + 3?", "answer": "5"}] * 4))
    assert answers_only["worked_solution"] == [False] * 4
    (line,) = teacher_warnings(student, teacher, answers_only)
    assert "holds only final answers (none of 4 rows has a worked solution)" in line
    assert teacher_warnings(student, teacher, answers_only, privileged=False) == []
    assert teacher_warnings(student, teacher, prepare_dataset(Dataset.from_list(GSM8K_ROWS))) == []


def test_a_loss_beyond_noise_is_said_in_one_line_and_noise_is_not():
    before, after = result([1] * 10 + [0] * 54), result([1] * 2 + [0] * 62)
    assert regression_line(before, after) == (
        "Distillation hurt: accuracy fell from 15.6% to 3.1% (-12.5 +/- 4.2 points, paired over 64 rows, beyond 2 "
        "standard errors).")
    assert regression_line(result([1] * 3 + [0] * 61), result([0] * 64)) is None  # -4.7 +/- 2.7: within noise
    assert regression_line(after, before) is None
    worse = DivergenceResult(0.6, 0.0, 3, 30, 1.0, 1.0, 0.0, per_prompt=[0.5, 0.6, 0.7])
    base = DivergenceResult(0.5, 0.0, 3, 30, 1.0, 1.0, 0.0, per_prompt=[0.4, 0.5, 0.6])
    assert regression_line(base, worse).startswith("Distillation moved the student away from the teacher")
    assert regression_line(worse, base) is None
