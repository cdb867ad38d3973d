import json

import pytest
import torch

from datamodules import DataSource, TextDataModule
from datamodules.loader import ResumableDataLoader
from datamodules.tokenization import encode_chat, pack
from models.targets import IGNORE
from tests.fixtures import make_tokenizer, write_corpus, write_teacher


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_teacher(root / "teacher")
    return root, write_corpus(root / "corpus")


def make_dm(env, tmp_path, **kw):
    root, corpus = env
    sources = kw.pop("sources", [DataSource(str(corpus["text"]))])
    return TextDataModule(tokenizer=str(root / "teacher"), sources=sources, seq_len=16, batch_size=2,
                          cache_dir=str(tmp_path / "cache"), **kw)


def test_packing_with_eos_separators():
    examples = [([5, 6, 7, 2], [True] * 4), ([8, 9, 2], [True] * 3), ([10, 11, 2], [False, True, True])]
    blocks = list(pack(examples, 4))
    assert [b[0].tolist() for b in blocks] == [[5, 6, 7, 2], [8, 9, 2, 10]]
    assert blocks[1][1].tolist() == [8, 9, 2, IGNORE]


def test_chat_loss_only_on_assistant_tokens():
    tok = make_tokenizer()
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"},
                {"role": "user", "content": "w5"}, {"role": "assistant", "content": "w6"}]
    ids, mask = encode_chat(tok, messages)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained.split() == ["w3", "w4", "<eos>", "w6", "<eos>"]


def test_split_is_deterministic_and_disjoint(env, tmp_path):
    # document i repeats word i, so every token tells which document it came from
    corpus = tmp_path / "unique.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join([f"w{i}"] * 24)}) + "\n" for i in range(90)))
    src = [DataSource(str(corpus))]
    a = make_dm(env, tmp_path / "a", sources=src, val_fraction=0.2, max_val_blocks=None)
    b = make_dm(env, tmp_path / "b", sources=src, val_fraction=0.2, max_val_blocks=None)
    a.setup("fit"), b.setup("fit")
    assert torch.equal(a.train_set.tensors["input_ids"], b.train_set.tensors["input_ids"])
    eos = a.tokenizer.eos_token_id
    train_tokens = set(a.train_set.tensors["input_ids"].flatten().tolist()) - {eos}
    val_tokens = set(a.val_set.tensors["input_ids"].flatten().tolist()) - {eos}
    assert val_tokens and train_tokens and not train_tokens & val_tokens
    assert 0.1 < len(val_tokens) / 90 < 0.3
    assert a.train_set.tensors["input_ids"].shape[1] == 16


def test_second_run_reads_the_cache(env, tmp_path, monkeypatch):
    make_dm(env, tmp_path).setup("fit")
    import datamodules.text as text

    monkeypatch.setattr(text, "encode_text", lambda *a: pytest.fail("tokenised again despite the cache"))
    dm = make_dm(env, tmp_path)
    dm.setup("fit")
    assert len(dm.train_set) > 0


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "no_sidecar"])
def test_a_data_cache_that_does_not_verify_is_rebuilt_naming_the_file(env, tmp_path, damage):
    first = make_dm(env, tmp_path)
    first.setup("fit")
    (cache,) = (tmp_path / "cache").glob("*.safetensors")
    sidecar = cache.with_name(cache.name + ".sha256.json")
    assert sidecar.is_file()
    data = cache.read_bytes()
    if damage == "truncated":
        cache.write_bytes(data[:100])
        expected = rf"{cache} does not match .*sha256.json: it has 100 bytes"
    elif damage == "overwritten":  # the header parses, the tokens are wrong: only the digest sees it
        cache.write_bytes(data[:-64] + bytes(64))
        expected = rf"{cache} does not match .*its SHA-256"
    else:  # a kill between the cache's rename and its sidecar
        sidecar.unlink()
        expected = rf"{sidecar} is missing"
    again = make_dm(env, tmp_path)
    with pytest.warns(UserWarning, match=expected + ".*Rebuilding it from the source"):
        again.setup("fit")
    assert torch.equal(again.train_set.tensors["input_ids"], first.train_set.tensors["input_ids"])
    from safetensors.torch import load_file

    from models.storage import verify_file

    assert verify_file(cache, "") and load_file(str(cache))["train_input_ids"].shape[0] > 0  # rewritten whole


def test_mixture_weights(env, tmp_path):
    _, corpus = env
    sources = [DataSource(str(corpus["text"]), name="text", weight=3.0),
               DataSource(str(corpus["chat"]), name="chat", format="chat", weight=1.0)]
    dm = make_dm(env, tmp_path, sources=sources, mixture_blocks=80)
    dm.setup("fit")
    counts = torch.bincount(dm.train_set.tensors["source"], minlength=2).tolist()
    assert counts == [60, 20]
    chat_labels = dm.train_set.tensors["labels"][dm.train_set.tensors["source"] == 1]
    assert (chat_labels == IGNORE).any() and (chat_labels != IGNORE).any()


def test_streaming_gives_the_same_blocks(env, tmp_path):
    dm = make_dm(env, tmp_path)
    dm.setup("fit")
    stream = make_dm(env, tmp_path, streaming=True)
    stream.setup("fit")
    streamed = torch.stack([b["input_ids"] for b in stream.train_set])
    assert torch.equal(streamed, dm.train_set.tensors["input_ids"])


def test_bad_sources_are_named(env, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        make_dm(env, tmp_path, sources=[DataSource(str(tmp_path / "nope.jsonl"))]).setup("fit")
    _, corpus = env
    with pytest.raises(ValueError, match="body"):
        make_dm(env, tmp_path, sources=[DataSource(str(corpus["text"]), text_field="body")]).setup("fit")
    with pytest.raises(ValueError, match="format"):
        DataSource("x.jsonl", format="markdown")


def test_resumable_loader_continues_where_it_stopped():
    data = [{"x": torch.tensor(i)} for i in range(20)]
    full = [b["x"].tolist() for b in ResumableDataLoader(data, batch_size=3, seed=1)]
    loader = ResumableDataLoader(data, batch_size=3, seed=1)
    it = iter(loader)
    first = [next(it)["x"].tolist() for _ in range(2)]
    state = loader.state_dict()
    resumed = ResumableDataLoader(data, batch_size=3, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert first + [b["x"].tolist() for b in resumed] == full


def test_capped_validation_takes_an_equal_spread_share_of_every_source():
    import torch

    from datamodules.text import balanced_validation

    def source(tag, n):
        ids = torch.full((n, 3), tag) + torch.arange(n)[:, None] * 100
        return {"val_input_ids": ids, "val_labels": ids.clone()}

    out = balanced_validation([source(1, 10), source(2, 1), source(3, 6)], cap=7)
    tags = (out["input_ids"][:, 0] % 100).tolist()
    assert sorted(tags) == [1, 1, 1, 2, 3, 3, 3]  # the one-block source gives its one, the others share the rest
    first = out["input_ids"][:3, 0].tolist()
    assert first == [1, 401, 901]  # blocks 0, 4 (4.5 rounds to even) and 9: spread, not the first three
    assert torch.equal(balanced_validation([source(1, 4)], cap=None)["input_ids"], source(1, 4)["val_input_ids"])
