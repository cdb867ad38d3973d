"""HarnessLM against hand computations, and lm-eval end to end offline on a tiny model."""

import pytest
import torch
import torch.nn.functional as F

from callbacks import HarnessLM, evaluate_model, primary_scores
from callbacks.scoring import resolve_tasks, to_unit_scale
from models import HybridConfig, convert_to_hybrid, generate
from tests.conftest import make_teacher
from tests.fixtures import make_tokenizer


class Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def student():
    return convert_to_hybrid(make_teacher("llama"), HybridConfig(window=4, sink_tokens=1)).eval()


def hand_loglikelihood(model, tok, context, cont):
    """(sum of log p(continuation), greedy flag) from one unpadded forward of context + continuation."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    full = tok(context + cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    total = sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full)))
    return total, all(logp[i - 1].argmax().item() == full[i] for i in range(len(ctx), len(full)))


@pytest.mark.parametrize("model_kind", ["student", "teacher"])
def test_loglikelihood_equals_hand_computation(student, model_kind):
    model = student if model_kind == "student" else make_teacher("llama")
    tok = make_tokenizer()
    lm = HarnessLM(model, tok, batch_size=2)
    reqs = [Req("w1 w2 w3", " w4 w5"), Req("w7", " w8"), Req("w9 w10 w11 w12 w13", " w14")]
    got = lm.loglikelihood(reqs)
    for req, (total, greedy) in zip(reqs, got):
        expected, expected_greedy = hand_loglikelihood(model, tok, *req.args)
        assert total == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy


# Multiple-choice items (contexts of 2 to 6 tokens, 2 to 4 choices of 1 to 3 tokens, one context
# with a trailing space) interleaved with single requests, and the model's greedy continuation as
# one more choice. Sorted longest first with batch_size=2, the first batch holds two items whose
# choices are all one token (no continuation forward).
SHARED = {
    "w10 w11 w12 w13 w14 w15": [" w16", " w17"],
    "w20 w21 w22 w23 w24": [" w25", " w26", " w27", " w28"],
    "w1 w2 w3": [" w4", " w5 w6", " w7 w8 w9"],
    "w30 w31 ": ["w32 w33", "w34", "w35 w36 w37", "w38"],
}
SINGLE = [("w40 w41", " w42 w43"), ("w44", " w45"), ("w50 w51 w52 w53 w54 w55 w56 w57", " w58 w59")]


def greedy_choice(model, tok, context, n):
    """The model's own greedy n-token continuation of ``context``, as text (its greedy flag is True)."""
    ids = tok(context, add_special_tokens=False)["input_ids"]
    for _ in range(n):
        with torch.no_grad():
            ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
    return " " + " ".join(tok.convert_ids_to_tokens(ids[-n:]))


def mixed_requests(model, tok):
    reqs = [Req(context, choice) for context, choices in SHARED.items() for choice in choices]
    reqs.append(Req("w1 w2 w3", greedy_choice(model, tok, "w1 w2 w3", 2)))
    for position, args in zip((1, 5, 9), SINGLE):
        reqs.insert(position, Req(*args))
    return reqs


@pytest.mark.parametrize("model_kind", ["student", "teacher"])
def test_shared_context_scores_equal_hand_computation(student, model_kind):
    model = student if model_kind == "student" else make_teacher("llama")
    tok = make_tokenizer()
    reqs = mixed_requests(model, tok)
    got = HarnessLM(model, tok, batch_size=2).loglikelihood(reqs)
    for req, (total, greedy) in zip(reqs, got):
        expected, expected_greedy = hand_loglikelihood(model, tok, *req.args)
        assert total == pytest.approx(expected, abs=1e-4), req.args
        assert greedy == expected_greedy, req.args
    assert got[-1][1]  # the greedy choice, appended last


@pytest.mark.parametrize("model_kind", ["student", "teacher"])
def test_shared_context_runs_each_context_once(student, model_kind):
    model = student if model_kind == "student" else make_teacher("llama")
    tok = make_tokenizer()
    lm = HarnessLM(model, tok, batch_size=8)
    fed = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(tuple((args[0] if args else kwargs["input_ids"]).shape)),
        with_kwargs=True)
    try:
        choices = SHARED["w30 w31 "]
        lm.loglikelihood([Req("w30 w31 ", choice) for choice in choices])
        # the 2-token context once, then the 4 continuations minus their last token (at most 2)
        assert fed == [(1, 2), (len(choices), 2)]
        reqs = mixed_requests(model, tok)
        fed.clear()
        lm.loglikelihood(reqs)
        shared_tokens = sum(rows * width for rows, width in fed)
        fed.clear()
        lm._score([lm._encode_pair(*req.args) for req in reqs])
        assert shared_tokens < sum(rows * width for rows, width in fed)
    finally:
        hook.remove()


def test_truncated_requests_leave_their_group(student):
    tok = make_tokenizer()
    lm = HarnessLM(student, tok, max_length=6)
    # with 6 tokens of input at most, the 3-token choice is cut from the left (scored alone), the
    # other two still share their 5-token context
    reqs = [Req("w20 w21 w22 w23 w24", choice) for choice in (" w25", " w26 w27", " w28 w29 w30")]
    expected = lm._score([lm._encode_pair(*req.args) for req in reqs])
    got = lm.loglikelihood(reqs)
    for (total, greedy), (expected_total, expected_greedy) in zip(got, expected):
        assert total == pytest.approx(expected_total, abs=1e-4)
        assert greedy == expected_greedy


def test_loglikelihood_rolling_sums_every_token(student):
    tok = make_tokenizer()
    text = " ".join(f"w{i}" for i in range(3, 20))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seq = torch.tensor([[tok.eos_token_id] + ids])
    with torch.no_grad():
        logp = F.log_softmax(student(seq).logits[0].float(), -1)
    # one window: every token conditioned on EOS + all previous tokens, from a single forward
    expected = sum(logp[i, ids[i]].item() for i in range(len(ids)))
    assert HarnessLM(student, tok, max_length=64).loglikelihood_rolling([Req(text)])[0] == pytest.approx(expected, abs=1e-4)
    # several windows of at most 6 tokens: each window is scored from its own forward
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    expected = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, tok.eos_token_id, 6, 1)):
        window = torch.tensor([(ctx + cont)[:-1]])
        with torch.no_grad():
            lp = F.log_softmax(student(window).logits[0].float(), -1)
        n = window.shape[1]
        expected += sum(lp[n - len(cont) + j, cont[j]].item() for j in range(len(cont)))
    got = HarnessLM(student, tok, max_length=6).loglikelihood_rolling([Req(text)])[0]
    assert got == pytest.approx(expected, abs=1e-4)


def test_generate_until_matches_greedy_generation_and_stops(student):
    tok = make_tokenizer()
    lm = HarnessLM(student, tok, batch_size=3)
    prompts = ["w1 w2", "w3 w4 w5 w6", "w7"]
    out = lm.generate_until([Req(p, {"until": [], "max_gen_toks": 5}) for p in prompts])
    for p, text in zip(prompts, out):
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        expected = tok.decode(generate(student, ids, 5, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:],
                              skip_special_tokens=True)
        assert text == expected
    first_word = out[0].split()[0] if out[0].split() else None
    if first_word:
        stopped = lm.generate_until([Req(prompts[0], {"until": [first_word], "max_gen_toks": 5})])[0]
        assert first_word not in stopped


def test_simple_evaluate_offline_on_a_local_task(student, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scores, results = evaluate_model(student, make_tokenizer(), ["xd_arith_mc", "xd_instruct_gen"], limit=8,
                                     cache_dir=tmp_path)
    assert set(scores) == {"xd_arith_mc", "xd_instruct_gen"}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert results["results"]["xd_arith_mc"]["acc,none"] == scores["xd_arith_mc"]


def test_offline_hub_task_fails_fast_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="hellaswag") as err:
        resolve_tasks(["hellaswag"], None, tmp_path)
    assert "offline" in str(err.value)
    with pytest.raises(ValueError, match="no_such_task"):
        resolve_tasks(["no_such_task"], None, tmp_path)


def test_primary_metric_extraction_and_conversions():
    results = {"results": {"t1": {"alias": "t1", "acc,none": 0.25, "acc_stderr,none": 0.1, "acc_norm,none": 0.5},
                           "t2": {"word_perplexity,none": 4.0, "bits_per_byte,none": 1.0}},
               "configs": {"t1": {"metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
                           "t2": {"metric_list": [{"metric": "word_perplexity"}]}},
               "higher_is_better": {"t1": {"acc": True}, "t2": {"word_perplexity": False}}}
    assert primary_scores(results) == {"t1": 0.25, "t2": 0.25}
    assert to_unit_scale("bits_per_byte", 1.0, False) == 0.5
    with pytest.raises(ValueError, match="0-1 scale"):
        to_unit_scale("acc", 37.0, True)
