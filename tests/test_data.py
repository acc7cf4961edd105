import gzip
import json
import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
from transformers import PreTrainedTokenizerFast

from spinlearn import data
from spinlearn.data import (
    TokenBlockDataset,
    calibration_blocks,
    eval_windows,
    load_text,
    tokenize_concat,
)

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Rotations make outliers spread across channels.\nA second line in the same paragraph.",
    "Quantization to four bits needs care; 1234 numbers too!",
    "Short one.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on a tiny text, with a BOS token prepended (like Llama's)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(DOCS * 5, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


# --------------------------------------------------------------------------- load_text


def test_txt_file_is_read_in_paragraphs(tmp_path, cache):
    path = tmp_path / "train.txt"
    path.write_text("\n\n".join(DOCS) + "\n")
    texts = load_text(str(path), cache_dir=cache)
    assert [t.strip() for t in texts] == DOCS
    assert "\n\n".join(texts).strip() == path.read_text().strip()


def test_jsonl_json_and_parquet_give_the_same_documents(tmp_path, cache):
    records = [{"text": d, "id": i} for i, d in enumerate(DOCS)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "b.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    for name in ("a.jsonl", "b.json", "c.parquet", "d.jsonl.gz"):
        assert load_text(str(tmp_path / name), cache_dir=cache) == DOCS, name


def test_custom_text_field_and_missing_field_message(tmp_path, cache):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"content": d, "lang": "en"}) + "\n" for d in DOCS))
    assert load_text(str(path), text_field="content", cache_dir=cache) == DOCS
    with pytest.raises(ValueError, match=r"no column 'text'.*\['content', 'lang'\].*text_field"):
        load_text(str(path), cache_dir=cache)


def test_glob_reads_matching_files_in_sorted_order(tmp_path, cache):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"part{i}.txt").write_text(doc + "\n")
    (tmp_path / "notes.md").write_text("not data")
    texts = load_text(str(tmp_path / "part*.txt"), cache_dir=cache)
    assert [t.strip() for t in texts] == DOCS


def test_missing_file_names_the_path_and_the_hub_names(tmp_path):
    missing = str(tmp_path / "nope" / "*.txt")
    with pytest.raises(FileNotFoundError, match="nope") as err:
        load_text(missing)
    assert "wikitext2" in str(err.value) and "c4" in str(err.value)


def test_unknown_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"data\.csv.*\.txt.*\.jsonl.*\.parquet"):
        load_text(str(path))


BAD_FILES = {
    "empty_txt": ("a.txt", b"", r"data file '.*a.txt' is empty"),
    "empty_jsonl": ("a.jsonl", b"", r"data file '.*a.jsonl' is empty"),
    "whitespace": ("a.txt", b"  \n\n \n", r"'.*a.txt' holds no text"),
    "binary": ("a.txt", b"\x7fELF\x02\x01\x00\x00garbage", r"'.*a.txt' is binary, not text \(a NUL byte at offset 6\)"),
    "latin1": ("a.txt", "café au lait\n".encode("latin-1"), r"'.*a.txt' is not UTF-8 text \(byte 0xe9 near offset 3\).*iconv"),
    "latin1_at_end_gz": ("a.txt.gz", gzip.compress("café".encode("latin-1")), r"'.*a.txt.gz' is not UTF-8 text"),
    "broken_gz": ("a.jsonl.gz", b"\x1f\x8b\x08\x00garbage", r"'.*a.jsonl.gz' cannot be read or decompressed"),
    "bad_json": ("a.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"cannot read data file '.*a.jsonl': "),
    "not_parquet": ("a.parquet", b"PAR1 then nothing", r"'.*a.parquet' is not a complete parquet file"),
    "no_documents": ("a.jsonl", b'{"text": ""}\n{"text": null}\n', r"'.*a.jsonl' holds no text \(column 'text'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_unreadable_data_file_is_one_line_naming_it(case, tmp_path, cache):
    name, content, pattern = BAD_FILES[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=pattern) as err:
        load_text(str(tmp_path / name), cache_dir=cache)
    assert "\n" not in str(err.value)


def test_a_bad_file_in_a_glob_is_named(tmp_path, cache):
    (tmp_path / "a.txt").write_text("fine text\n")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"'.*b.txt' is not UTF-8"):
        load_text(str(tmp_path / "*.txt"), cache_dir=cache)


def test_mixed_kinds_in_one_glob_and_a_directory_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "y"}) + "\n")
    with pytest.raises(ValueError, match="different kinds"):
        load_text(str(tmp_path / "*"))
    with pytest.raises(ValueError, match="directory"):
        load_text(str(tmp_path))


# --------------------------------------------------------------------------- hub names offline


def _assert_fails_fast(source="wikitext2", match="local files"):
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=match) as err:
        load_text(source)
    assert time.perf_counter() - start < 1.0
    assert "data.train=" in str(err.value)


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_name_fails_fast_in_offline_mode(monkeypatch, var):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(data, "_hub_reachable", lambda *a, **k: pytest.fail("no probe needed when offline"))
    _assert_fails_fast(match=var)


def test_hub_name_fails_fast_when_probe_fails(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(data.datasets, "load_dataset", lambda *a, **k: pytest.fail("must not try the hub"))
    _assert_fails_fast("c4", match="unreachable")


def test_hub_name_fails_fast_when_sockets_fail(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    _assert_fails_fast(match="unreachable")


def test_probe_is_bounded_even_if_connecting_hangs(monkeypatch):
    release = threading.Event()

    def hang(*args, **kwargs):  # like a DNS lookup that never answers
        release.wait(10)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    try:
        assert data._hub_reachable(timeout=0.2) is False
        assert time.perf_counter() - start < 0.5
    finally:
        release.set()


@pytest.mark.parametrize(
    "source, split, expected_args, expected_kwargs",
    [
        ("wikitext2", "test", ("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "test"}),
        (
            "c4",
            "validation",
            ("allenai/c4",),
            {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "split": "validation"},
        ),
    ],
)
def test_hub_names_map_to_the_known_datasets(monkeypatch, source, split, expected_args, expected_kwargs):
    monkeypatch.setattr(data, "_check_hub_available", lambda source: None)
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return data.datasets.Dataset.from_dict({"text": ["a", None, "b"]})

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
    assert load_text(source, split=split) == ["a", "b"]
    assert calls == [(expected_args, expected_kwargs)]


def test_hub_name_with_unknown_split_is_refused(monkeypatch):
    monkeypatch.setattr(data, "_check_hub_available", lambda source: None)
    with pytest.raises(ValueError, match=r"'c4' has splits \['train', 'validation'\], not 'test'"):
        load_text("c4", split="test")


# --------------------------------------------------------------------------- tokenize_concat


def test_tokenize_concat_joins_with_blank_lines_and_adds_bos_once(tokenizer):
    ids = tokenize_concat(DOCS, tokenizer)
    reference = tokenizer("\n\n".join(DOCS))["input_ids"]  # the GPTQ recipe, in one call
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids.tolist() == reference
    assert ids.tolist().count(tokenizer.bos_token_id) == 1 and ids[0].item() == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "\n\n".join(DOCS)


@pytest.mark.parametrize("chunk_chars", [1, 30, 80])
def test_chunked_tokenization_equals_one_shot(tokenizer, chunk_chars):
    reference = tokenize_concat(DOCS, tokenizer)
    assert torch.equal(tokenize_concat(DOCS, tokenizer, chunk_chars=chunk_chars), reference)


def test_tokenize_concat_rejects_a_bare_string_and_empty_input(tokenizer):
    with pytest.raises(TypeError, match="single str"):
        tokenize_concat("just text", tokenizer)
    with pytest.raises(ValueError, match="empty"):
        tokenize_concat([], tokenizer)


# --------------------------------------------------------------------------- blocks and windows


def test_calibration_blocks_are_seeded_windows_of_the_tokens():
    tokens = torch.arange(1000) * 7 + 3  # distinct values reveal each window's offset
    blocks = calibration_blocks(tokens, nsamples=8, seqlen=32, seed=0)
    assert blocks.shape == (8, 32) and blocks.dtype == torch.long
    for row in blocks:
        start = (row[0].item() - 3) // 7
        assert torch.equal(row, tokens[start : start + 32])
    assert torch.equal(calibration_blocks(tokens, 8, 32, seed=0), blocks)
    assert not torch.equal(calibration_blocks(tokens, 8, 32, seed=1), blocks)


def test_calibration_blocks_do_not_touch_the_global_rng():
    tokens = torch.arange(500)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    calibration_blocks(tokens, 4, 16, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_calibration_blocks_reach_both_ends_of_the_text():
    whole = calibration_blocks(torch.arange(64), nsamples=1, seqlen=64, seed=0)
    assert torch.equal(whole[0], torch.arange(64))
    # 65 tokens hold two windows of 64 (starting at 0 or 1); over 40 seeds both must show up.
    starts = {calibration_blocks(torch.arange(65), 1, 64, seed=s)[0, 0].item() for s in range(40)}
    assert starts == {0, 1}


def test_calibration_blocks_too_short_says_what_it_has_and_what_works():
    tokens = torch.arange(100)
    with pytest.raises(ValueError) as err:
        calibration_blocks(tokens, nsamples=4, seqlen=32, seed=0)
    msg = str(err.value)
    for part in ("100 tokens", "4 x 32", "128", "nsamples <= 3", "seqlen <= 25"):
        assert part in msg, (part, msg)
    with pytest.raises(ValueError, match=r"has 10 tokens.*at least 32 tokens"):
        calibration_blocks(torch.arange(10), nsamples=1, seqlen=32, seed=0)


@pytest.mark.parametrize("bad", [dict(nsamples=0), dict(seqlen=-1), dict(nsamples=2.0)])
def test_calibration_blocks_validate_sizes(bad):
    kwargs = dict(nsamples=2, seqlen=4, seed=0) | bad
    with pytest.raises(ValueError, match="positive int"):
        calibration_blocks(torch.arange(100), **kwargs)


def test_eval_windows_are_consecutive_and_drop_the_remainder():
    tokens = torch.arange(103)
    windows = eval_windows(tokens, 10)
    assert windows.shape == (10, 10)
    assert torch.equal(windows.flatten(), tokens[:100])
    with pytest.raises(ValueError, match="has 7 tokens.*seqlen 10"):
        eval_windows(torch.arange(7), 10)
    with pytest.raises(ValueError, match="1-D integer"):
        eval_windows(torch.zeros(2, 50, dtype=torch.long), 10)


def test_token_block_dataset_feeds_input_ids_and_labels():
    blocks = torch.arange(24).reshape(3, 8)
    ds = TokenBlockDataset(blocks)
    assert len(ds) == 3
    item = ds[1]
    assert torch.equal(item["input_ids"], blocks[1]) and torch.equal(item["labels"], blocks[1])
    item["labels"][0] = -100  # a collator masking labels must not change the inputs
    assert ds[1]["input_ids"][0].item() == 8
    batch = torch.utils.data.default_collate([ds[0], ds[2]])
    assert torch.equal(batch["input_ids"], blocks[[0, 2]])
    with pytest.raises(ValueError, match="2-D integer"):
        TokenBlockDataset(torch.zeros(3, 4))


def test_end_to_end_from_file_to_blocks(tmp_path, cache, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(DOCS * 10))
    tokens = tokenize_concat(load_text(str(path), cache_dir=cache), tokenizer)
    blocks = calibration_blocks(tokens, nsamples=4, seqlen=16, seed=3)
    windows = eval_windows(tokens, 16)
    assert blocks.shape == (4, 16) and windows.shape == (tokens.numel() // 16, 16)
    assert int(tokens.max()) < len(tokenizer)


def test_token_ids_beyond_the_model_vocabulary_are_refused_naming_the_key():
    from spinlearn.data import check_token_ids

    check_token_ids(torch.tensor([[0, 5, 9]]), 10, what="data.train", model="M")  # in range: nothing to say
    check_token_ids(None, 10, what="data.eval", model="M")
    for ids, bad in ((torch.tensor([[0, 10]]), 10), (torch.tensor([[-1, 3]]), -1)):
        with pytest.raises(ValueError, match=rf"data\.train: token id {bad} is outside the vocabulary of M \(10 "):
            check_token_ids(ids, 10, what="data.train", model="M")
