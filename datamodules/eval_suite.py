"""The offline evaluation suite: lm-eval task YAMLs over local jsonl files, built deterministically.

Every item's answer is computed by the program that writes it (arithmetic, unit conversions, a
string transformation, a planted number) or is the original text (the cloze tasks); no answer
comes from a model. Items use their own seed, no item repeats within a task, and the cloze tasks
read only text reserved for evaluation (``is_eval_topic``, ``is_eval_file``), which the training
corpus skips, so training cannot overlap the suite.

A task is kept only if the embedded teacher passes it (``PASS_MARGIN``: at least chance + 0.2 on a
log-likelihood task, 0.5 on a generation task; ``experiments.suite_pilot`` measures it and writes
``docs/results/suite_pilot/``): a task the teacher cannot do cannot tell students apart.

    task            domain   kind            chance  what
    xd_arith_mc     math     log-likelihood  0.25    "What is 37 - 8?" with four candidate numbers
    xd_arith_gen    math     generation      0       "What is 7 times 8?" (three solved items first)
    xd_code_mc      code     log-likelihood  0.25    the identifier that comes next in held-out stdlib code
    xd_stem_mc      STEM     log-likelihood  0.25    unit conversions, speed/distance/time, atom counts
    xd_instruct_gen chat     generation      0       a checkable instruction (lowercase, plural, a digit...)
    xd_cloze_mc     general  log-likelihood  0.25    the true next word of held-out documentation text
    xd_needle_<L>   long ctx log-likelihood  0       a 5-digit number planted in L tokens of held-out prose,
                                                     always at least L/2 tokens before the question: scored
                                                     as "greedy decoding gives exactly the number"

The needle tasks are the memory claim: a student whose window is shorter than L/2 can only answer
from its mLSTM memory (``NeedleSettings``; a fresh SWA-only conversion scores 0 on them). They are
built per tokenizer, since their lengths are counted in its tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUITE_VERSION = 6  # 6: needle target with its space; solved examples in arith_mc and instruct_gen
TASKS = ("xd_arith_mc", "xd_arith_gen", "xd_code_mc", "xd_stem_mc", "xd_instruct_gen", "xd_cloze_mc")
NEEDLE_PREFIX = "xd_needle_"
DOMAINS = {"xd_arith_mc": "math", "xd_arith_gen": "math", "xd_code_mc": "code", "xd_stem_mc": "stem",
           "xd_instruct_gen": "chat", "xd_cloze_mc": "general"}
SEED = 20261123
CHOICES = 4
# What a model scores by guessing: 1 / choices for multiple choice, 0 for exact answers.
LOGLIKELIHOOD_CHANCE = 1.0 / CHOICES
# A task stays in the suite when the teacher's pilot score reaches chance + this margin.
PASS_MARGIN = {"loglikelihood": 0.2, "generation": 0.5}


@dataclass
class SuiteSize:
    """How many items the embedded suite holds (the suite's cost on a CPU grows with them)."""

    mc_items: int = 300
    """Items of each multiple-choice task (cheap: one short forward per choice)."""
    gen_items: int = 100
    """Items of each generation task (``xd_instruct_gen`` has at most 142 distinct items, ``xd_arith_gen`` 121)."""
    needle_items: int = 40
    """Items of each needle length (one forward over the whole context each)."""
    needle_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    """Context lengths in the teacher's tokens; 4x, 8x and 16x a 64-token window. Give lengths of
    at least 4x the student's window (a 512-token window: 2048, 4096, 8192)."""

    def __post_init__(self):
        for name in ("mc_items", "gen_items", "needle_items"):
            if getattr(self, name) < 1:
                raise ValueError(f"SuiteSize.{name}={getattr(self, name)} is invalid; allowed values: >= 1")
        bad = [n for n in self.needle_lengths if n < 64]
        if bad:
            raise ValueError(f"SuiteSize.needle_lengths has {bad}; allowed values: context lengths >= 64 tokens")

    def tasks(self) -> list[str]:
        """Every task of the suite at this size, the needle lengths last."""
        return [*TASKS, *(needle_task(n) for n in self.needle_lengths)]


def needle_task(length: int) -> str:
    return f"{NEEDLE_PREFIX}{length}"


def task_info(task: str) -> dict:
    """Domain, kind and chance score of one of the suite's tasks."""
    if task.startswith(NEEDLE_PREFIX):
        return {"domain": "long-context", "kind": "loglikelihood", "chance": 0.0}
    if task not in DOMAINS:
        raise ValueError(f"{task!r} is not a task of the embedded suite ({', '.join(TASKS)}, {NEEDLE_PREFIX}<length>)")
    generation = task.endswith("_gen")
    return {"domain": DOMAINS[task], "kind": "generation" if generation else "loglikelihood",
            "chance": 0.0 if generation else LOGLIKELIHOOD_CHANCE}


def is_suite_task(task: str) -> bool:
    return task in DOMAINS or (task.startswith(NEEDLE_PREFIX) and task[len(NEEDLE_PREFIX):].isdigit())


def _stable_fifth(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 5 == 0


def is_eval_topic(name: str) -> bool:
    """Python documentation topics reserved for evaluation (one in five, by a stable hash)."""
    return _stable_fifth(name)


def is_eval_file(relative_path: str) -> bool:
    """Standard-library source files reserved for evaluation (one in five, by a stable hash of the
    path relative to the standard library)."""
    return _stable_fifth("code:" + relative_path)


def asked(question: str) -> str:
    """The question an item asks: its last paragraph (the solved examples some tasks show first
    are not part of the item's identity)."""
    return question.split("\n\n")[-1]


def _distinct(task: str, maker, rng: random.Random, n: int) -> list[dict]:
    """n items of ``maker`` asking distinct questions (a repeated item adds no information)."""
    items, seen = [], set()
    for _ in range(50 * n):
        item = maker(rng)
        identity = asked(item["question"])
        if identity not in seen:
            seen.add(identity)
            items.append(item)
            if len(items) == n:
                return items
    raise ValueError(f"{task} has only {len(items)} distinct items, fewer than the {n} asked for; lower SuiteSize")


def _choices(rng: random.Random, answer: int, spread: int = 10) -> tuple[list[str], int]:
    # stored without a leading space: lm-eval puts its target delimiter (one space) between the
    # prompt and each choice
    options = {answer}
    while len(options) < CHOICES:
        options.add(answer + rng.randint(1, spread) * rng.choice([-1, 1]))
    options = sorted(options, key=lambda _: rng.random())
    return [str(o) for o in options], options.index(answer)


def small_arithmetic(rng) -> tuple[int, str, int, int]:
    """a op b with the small operands a 135M model can do: sums and differences to 50, one-digit products."""
    op = rng.choice(["+", "-", "*"])
    a, b = (rng.randint(2, 9), rng.randint(2, 9)) if op == "*" else (rng.randint(2, 50), rng.randint(2, 50))
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b, {"+": a + b, "-": a - b, "*": a * b}[op]


def arith_mc(rng):
    """Two solved problems, then the one asked (the teacher's pilot: 0.53 without them, 0.76 with)."""
    a, op, b, ans = small_arithmetic(rng)
    solved = []
    while len(solved) < 2:
        sa, sop, sb, sans = small_arithmetic(rng)
        if (sa, sop, sb) != (a, op, b):
            solved.append(f"Question: What is {sa} {sop} {sb}?\nAnswer: {sans}")
    choices, label = _choices(rng, ans, spread=5)
    question = "\n\n".join([*solved, f"Question: What is {a} {op} {b}?\nAnswer:"])
    return {"question": question, "choices": choices, "label": label}


def arith_gen(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return {"question": f"Question: What is {a} times {b}?\nAnswer:", "answer": str(a * b)}


def code_mc(rng, lines_by_file: list[tuple[str, list[str]]]):
    """The identifier that comes next in a reserved standard-library file, after four lines of it."""
    name, lines = lines_by_file[rng.randrange(len(lines_by_file))]
    identifiers = sorted({w for line in lines for w in IDENTIFIER.findall(line)})
    for _ in range(100):
        i = rng.randrange(4, len(lines))
        words = list(IDENTIFIER.finditer(lines[i]))
        if len(words) < 2 or len(identifiers) < 2 * CHOICES:
            continue
        target = words[rng.randrange(1, len(words))]
        options = {target.group()}
        while len(options) < CHOICES:
            options.add(rng.choice(identifiers))
        options = sorted(options, key=lambda _: rng.random())
        # the choice follows the code directly (no delimiter); trailing spaces of the prompt move
        # to the continuation when it is scored (callbacks.harness)
        prompt = "\n".join(lines[i - 4:i] + [lines[i][: target.start()]])
        return {"question": prompt, "choices": options, "label": options.index(target.group()), "file": name}
    return code_mc(rng, lines_by_file)


IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{3,}\b")


def reserved_code_files() -> list[tuple[str, list[str]]]:
    """(path, non-blank lines) of the standard-library files reserved for evaluation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo"}
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        if skip & set(path.relative_to(root).parts) or path.name.startswith(("_", "test")) or not is_eval_file(rel):
            continue
        try:
            lines = [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (UnicodeDecodeError, OSError):
            continue
        if len(lines) >= 20:
            out.append((rel, lines))
    return out


ATOMS = {"C": "carbon", "H": "hydrogen", "O": "oxygen", "N": "nitrogen"}


def stem_mc(rng):
    kind = rng.choice(["convert", "speed", "atoms"])
    if kind == "convert":
        value, (unit, big, factor) = rng.randint(2, 90), rng.choice([("metres", "kilometres", 1000),
                                                                     ("minutes", "hours", 60),
                                                                     ("grams", "kilograms", 1000),
                                                                     ("seconds", "minutes", 60)])
        q, ans = f"How many {unit} are there in {value} {big}?", value * factor
    elif kind == "speed":
        speed, hours = rng.randint(20, 120), rng.randint(2, 6)
        q, ans = f"A train moves at a constant {speed} km per hour for {hours} hours. How many km does it travel?", speed * hours
    else:
        counts = {"C": rng.randint(1, 6), "H": rng.randint(2, 14), "O": rng.randint(0, 3), "N": rng.randint(0, 2)}
        formula = "".join(f"{el}{c if c > 1 else ''}" for el, c in counts.items() if c)
        el = rng.choice([e for e, c in counts.items() if c])
        q, ans = f"How many {ATOMS[el]} atoms are in one molecule of {formula}?", counts[el]
    choices, label = _choices(rng, ans, spread=max(2, ans // 5))
    return {"question": f"Question: {q}\nAnswer:", "choices": choices, "label": label}


# nouns whose plural adds an s
WORDS = ["river", "garden", "planet", "bridge", "forest", "window", "candle", "rocket", "button", "pencil",
         "orange", "castle", "mirror", "tunnel", "basket", "dragon", "violin", "table", "chair", "flower",
         "bottle", "jacket", "ladder", "pillow", "rabbit", "hammer", "kitten", "teacher", "doctor", "farmer",
         "market", "wallet", "ticket", "helmet", "carpet", "blanket", "pocket", "camera", "island", "anchor"]
WORDS += ["cookie", "spoon", "lamp", "desk", "bird", "boat", "coat", "road", "star", "tree", "cloud", "door",
          "book", "apple", "horse", "shirt", "train", "plant", "glove", "drum"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


INSTRUCTION_KINDS = ("lower", "plural", "digit", "word")


def _instruction(kind: str, word: str, n: int) -> tuple[str, str]:
    return {
        "lower": (f"Write the word '{word.upper()}' in lowercase letters.", word),
        "plural": (f"Write the plural of the word '{word}'.", word + "s"),
        "digit": (f"Write the number '{NUMBER_WORDS[n]}' as a digit.", str(n)),
        "word": (f"Write the number {n} as a word.", NUMBER_WORDS[n]),
    }[kind]


def instruct_gen(rng):
    """An instruction whose answer a program checks, after two solved ones of the same kind (the
    response format is the instruction's, not a neighbour's). Kinds the teacher follows in its pilot
    (60 items, two solved examples of the same kind): lowercase 0.9, plural, digit and word 1.0;
    uppercase 0.43, first letter 0.29, repeat-n-times and yes/no comparisons were dropped."""
    kind = rng.choice(INSTRUCTION_KINDS)
    word, n = rng.choice(WORDS), rng.randint(0, 10)
    instruction, answer = _instruction(kind, word, n)
    solved = []
    while len(solved) < 2:
        other = _instruction(kind, rng.choice(WORDS), rng.randint(0, 10))
        if other[0] != instruction and other not in solved:
            solved.append(other)
    paragraphs = [f"Instruction: {q}\nResponse: {a}" for q, a in solved] + [f"Instruction: {instruction}\nResponse:"]
    return {"question": "\n\n".join(paragraphs), "answer": answer}


PROSE = r"[A-Za-z0-9 ,.;:'\"()-]+"  # sentences of words and punctuation only (no code)
PRINTABLE = r"[\x20-\x7e]+"


def _held_out_sentences(min_words: int, max_words: int, pattern: str) -> list[str]:
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[name] for name in sorted(topics.topics) if is_eval_topic(name))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))]
    return [s for s in sentences if min_words <= len(s.split()) <= max_words and re.fullmatch(pattern, s)]


def _cloze_items(rng, n):
    # documentation sentences, inline code included (one item per sentence: 421 of them)
    sentences = _held_out_sentences(8, 60, PRINTABLE)
    vocab = sorted({w for s in sentences for w in s.split() if w.isalpha() and len(w) > 3})
    items, seen = [], set()
    for s in rng.sample(sentences, len(sentences)):
        if len(items) == n:
            break
        words = s.rstrip(".").split()
        cut = rng.randint(len(words) // 2, len(words) - 1)
        target, question = words[cut], " ".join(words[:cut])
        if not target.isalpha() or question in seen:
            continue
        seen.add(question)
        options = {target}
        while len(options) < CHOICES:
            options.add(rng.choice(vocab))
        options = sorted(options, key=lambda _: rng.random())
        items.append({"question": question, "choices": options, "label": options.index(target)})
    if len(items) < n:
        raise ValueError(f"xd_cloze_mc has only {len(items)} distinct items, fewer than the {n} asked for; lower SuiteSize.mc_items")
    return items


NEEDLE = "The secret number is {key}."
NEEDLE_QUESTION = "\n\nQuestion: What is the secret number?\nAnswer: The secret number is"


def needle_items(rng, tokenizer, length: int, n: int) -> list[dict]:
    """n haystacks of held-out prose about ``length`` tokens long, each with a 5-digit number planted
    between 16 tokens after the start and half the context before the question."""
    sentences = _held_out_sentences(5, 60, PROSE)
    sizes = [len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in sentences]
    question_tokens = len(tokenizer(NEEDLE_QUESTION, add_special_tokens=False)["input_ids"])
    items, keys = [], set()
    while len(items) < n:
        key = rng.randint(10000, 99999)
        if key in keys:
            continue
        keys.add(key)
        start, picked, total = rng.randrange(len(sentences)), [], question_tokens
        while total < length:
            index = (start + len(picked)) % len(sentences)
            picked.append(index)
            total += sizes[index]
        before = [sum(sizes[j] for j in picked[:i]) for i in range(len(picked) + 1)]
        # sentence boundaries where the needle is past the first 16 tokens (the sinks) and at least
        # half the context before the question (far outside any window shorter than length / 2)
        slots = [i for i in range(1, len(picked)) if before[i] >= 16 and total - before[i] >= length // 2]
        slot = rng.choice(slots)
        text = [sentences[j] for j in picked]
        text.insert(slot, NEEDLE.format(key=key))
        items.append({"question": " ".join(text) + NEEDLE_QUESTION, "answer": str(key),
                      "tokens_after_needle": total - before[slot]})
    return items


def _yaml(task, path, output_type, extra: dict) -> dict:
    info = task_info(task)
    return {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": output_type, "doc_to_text": "{{question}}", **extra,
            "metadata": {"version": SUITE_VERSION, **info}}


def _mc_yaml(task, path, target_delimiter=" "):
    return _yaml(task, path, "multiple_choice", {
        "doc_to_choice": "choices", "doc_to_target": "label", "target_delimiter": target_delimiter,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})


def _needle_yaml(task, path):
    # acc of a log-likelihood request is lm-eval's is_greedy: greedy decoding gives exactly the
    # answer's tokens (one forward, no generation). lm-eval adds target_delimiter only to
    # multiple-choice targets, so the space before the number is part of the target here
    return _yaml(task, path, "loglikelihood", {
        "doc_to_target": " {{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})


NUMBER_FILTER = [{"function": "regex", "regex_pattern": r"(-?\d+)"}, {"function": "take_first"}]
STRIP_FILTER = [{"function": "regex", "regex_pattern": r"^\s*(.*?)\s*$"}, {"function": "take_first"}]


def _gen_yaml(task, path, max_gen_toks, num_fewshot=0, numeric=False):
    return _yaml(task, path, "generate_until", {
        "num_fewshot": num_fewshot, "fewshot_delimiter": "\n\n", "target_delimiter": " ",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False},
        # numeric answers: the first number generated (as GSM8K-style tasks grade); text: stripped
        "filter_list": [{"name": "number" if numeric else "strip", "filter": NUMBER_FILTER if numeric else STRIP_FILTER}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": False, "ignore_punctuation": False}]})


def _write_task(out: Path, task: str, rows: list[dict], spec: dict) -> None:
    import yaml

    (out / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def suite_items(task: str, n: int) -> list[dict]:
    """The first n items of one of the fixed (tokenizer-free) tasks; a larger n extends, never
    reshuffles, a smaller one (each task draws from its own seeded stream)."""
    rng = random.Random(SEED * 100 + TASKS.index(task))
    if task == "xd_cloze_mc":
        return _cloze_items(rng, n)
    if task == "xd_code_mc":
        files = reserved_code_files()
        return _distinct(task, lambda r: code_mc(r, files), rng, n)
    makers = {"xd_arith_mc": arith_mc, "xd_arith_gen": arith_gen, "xd_stem_mc": stem_mc, "xd_instruct_gen": instruct_gen}
    return _distinct(task, makers[task], rng, n)


def build_suite(out_dir, size: SuiteSize | None = None, tokenizer=None) -> Path:
    """Write every task's jsonl and YAML under ``out_dir`` (idempotent); returns the folder to give
    lm-eval as ``include_path``. The needle tasks need the teacher's ``tokenizer`` (their lengths
    are in its tokens); without one only the fixed tasks are built."""
    from models.storage import atomic_directory_write, json_text

    size = size or SuiteSize()
    key = {"version": SUITE_VERSION, **asdict(size)}
    if tokenizer is not None:
        from .tokenization import tokenizer_fingerprint

        key["tokenizer"] = tokenizer_fingerprint(tokenizer)
    else:
        key["needle_lengths"] = []
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(out_dir) / f"v{SUITE_VERSION}-{digest}"
    if (out / "complete").is_file():
        return out

    def write(tmp: Path):
        # the YAMLs name the data files in the final folder, which ``tmp`` becomes
        for task in TASKS:
            generation = task.endswith("_gen")
            rows = suite_items(task, size.gen_items if generation else size.mc_items)
            if generation:
                # solved items first, so the answer format is clear: lm-eval's three few-shot items
                # for arithmetic; the instruction task shows two of the item's own kind in its prompt
                spec = _gen_yaml(task, out / f"{task}.jsonl", 8,
                                 num_fewshot=3 if task == "xd_arith_gen" else 0, numeric=task == "xd_arith_gen")
            else:
                spec = _mc_yaml(task, out / f"{task}.jsonl", target_delimiter="" if task == "xd_code_mc" else " ")
            _write_task(tmp, task, rows, spec)
        for length in key["needle_lengths"]:
            task = needle_task(length)
            rows = needle_items(random.Random(SEED * 1000 + length), tokenizer, length, size.needle_items)
            _write_task(tmp, task, rows, _needle_yaml(task, out / f"{task}.jsonl"))
        (tmp / "size.json").write_text(json_text(key))
        (tmp / "complete").write_text("ok")

    return atomic_directory_write(out, write)
