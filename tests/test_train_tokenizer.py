"""Stage 5, tokenizer (agent/train/tokenizer.py): a SentencePiece model with Moshi's special ids from
plain text and from the align stage's alignment files, resumable; and the text-vocabulary swap on the
tiny LM (only the text layers change, shared pieces keep their rows, training forward and LMGen
streaming still run)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import sentencepiece
import torch
from moshi.conditioners import ConditionAttributes
from moshi.models import LMGen

from agent.models import build_tiny, tiny_tokenizer_path
from agent.train.common import UsageError
from agent.train.tokenizer import (
    TOKENIZER_FILE,
    TokenizerConfig,
    alignment_text,
    resize_text_vocab,
    row_plan,
    run_tokenizer,
)
from train_helpers import read_jsonl as _jsonl

ROOT = Path(__file__).resolve().parent.parent
ENGLISH = ["Hello, how are you today?", "The weather is very nice.", "I would like a cup of coffee, please.",
           "Thank you very much for your help.", "Moshi speaks Telugu and English.", "Okay, see you tomorrow."]
TEXT_LAYERS = ("text_emb.", "depformer_text_emb.", "text_linear.")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    lines = (ROOT / "assets/telugu_sentences.txt").read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines + ENGLISH) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def grown(corpus, tmp_path_factory) -> sentencepiece.SentencePieceProcessor:
    """A BPE vocabulary of 400 (the tiny model's is 152)."""
    out = tmp_path_factory.mktemp("bpe")
    run_tokenizer(TokenizerConfig(out=out, text_files=[corpus], vocab_size=400, model_type="bpe", quiet=True))
    return sentencepiece.SentencePieceProcessor(model_file=str(out / TOKENIZER_FILE))


def _tiny():
    return build_tiny(torch.device("cpu"), torch.float32)


def _conditions(model, batch: int):
    if model.lm.fuser is None:
        return None
    values = {name: options[0] for name, options in model.condition_values.items()}
    return model.lm.condition_provider.prepare_and_provide([ConditionAttributes(text=dict(values))] * batch)


def test_text_files_train_with_moshi_special_ids(corpus, tmp_path):
    out = tmp_path / "tok"
    summary = run_tokenizer(TokenizerConfig(out=out, text_files=[corpus], vocab_size=8000,
                                            base_tokenizer=tiny_tokenizer_path(), quiet=True))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / TOKENIZER_FILE))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert (out / "tokenizer.vocab").is_file()
    info = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    # A 53-line corpus cannot fill 8000 pieces: the real size is reported, with a note.
    assert info["vocab_size"] == sp.vocab_size() < 8000 and info["requested_vocab_size"] == 8000
    assert any("vocabulary smaller than asked" in x["reason"] for x in _jsonl(out / "report.jsonl"))
    assert summary.made == 1 and summary.reused == 0 and summary.kept == info["sentences"] == 47 + len(ENGLISH)
    assert info["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert info["telugu"]["coverage"] == 1.0 and info["unk_rate"] == 0.0 and info["telugu"]["vocab_pieces"] > 0
    assert 0 < info["base"]["shared_pieces"] <= info["vocab_size"] and info["base"]["vocab_size"] == 152
    sample = info["sample"]
    assert sample["ids"] == sp.encode(sample["text"]) and "".join(sample["pieces"]).replace("▁", " ").strip() \
        == sample["text"]
    assert json.loads((out / "summary.json").read_text())["stage"] == "tokenizer"


def _aligned(folder: Path, rid: str, alignments, raw: str | None = None) -> dict:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    if alignments is not None or raw is not None:
        text = raw if raw is not None else json.dumps({"alignments": alignments}, ensure_ascii=False)
        (folder / "data" / f"{rid}.json").write_text(text, encoding="utf-8")
    return {"id": rid, "path": f"data/{rid}.wav", "alignment": f"data/{rid}.json", "duration": 6.0,
            "agent_speaker": "kiran_te", "agent_voice": None, "emotion": "neutral", "licences": ["test"],
            "n_words": 3, "methods": {"given": 3}}


def test_align_manifest_gives_agent_words_and_bad_items_are_skipped(tmp_path):
    align = tmp_path / "align"
    main, other = "SPEAKER_MAIN", "SPEAKER_OTHER"
    good = [["నమస్కారం", [0.5, 1.1], main], ["qqzz", [1.2, 1.5], other],
            ["మీరు", [1.6, 1.9], main], ["bad"], ["ఎలా", [2.0, 2.3], main]]
    rows = [_aligned(align, "d1", good),
            _aligned(align, "d2", [["కాఫీ", [0.1, 0.4], main], ["కావాలి", [0.5, 0.9], main]]),
            _aligned(align, "missing", None),
            _aligned(align, "corrupt", None, raw="{not json"),
            _aligned(align, "useronly", [["xyz", [0.1, 0.4], other]])]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(2, '{"id": "broken", "path": ')
    (align / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    out = tmp_path / "tok"
    summary = run_tokenizer(TokenizerConfig(align / "manifest.jsonl", out=out, vocab_size=60, quiet=True))
    assert summary.kept == 2 and summary.skipped == 4 and summary.audio_hours == round(12.0 / 3600, 4)
    report = {x["item"]: x for x in _jsonl(out / "report.jsonl")}
    assert report["manifest.jsonl:3"]["reason"].startswith("malformed manifest line")
    assert report["missing"]["reason"] == "alignment file not found"
    assert report["corrupt"]["reason"].startswith("unreadable alignment file")
    assert report["useronly"]["reason"].startswith("no agent words")
    assert report["d1"]["action"] == "note" and "entries dropped: 1" in report["d1"]["reason"]
    info = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert info["sentences"] == 2 and info["characters"] == len("నమస్కారం మీరు ఎలా") + len("కాఫీ కావాలి")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / TOKENIZER_FILE))
    assert 0 in sp.encode("q")  # SPEAKER_OTHER's words never reached the trainer
    assert alignment_text({"alignments": good}) == ("నమస్కారం మీరు ఎలా", 1)


def test_rerun_reuses_and_a_changed_corpus_retrains(corpus, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_bytes(corpus.read_bytes())
    out = tmp_path / "tok"
    config = TokenizerConfig(out=out, text_files=[text], vocab_size=120, quiet=True)
    first = run_tokenizer(config)
    model = out / TOKENIZER_FILE
    stamp, content = model.stat().st_mtime_ns, model.read_bytes()
    again = run_tokenizer(config)
    assert (first.made, first.reused, again.made, again.reused) == (1, 0, 0, 1)
    assert model.stat().st_mtime_ns == stamp and model.read_bytes() == content
    # The same sentences written differently (NFC, blank lines, extra spaces) are the same corpus.
    text.write_text("\n\n" + text.read_text(encoding="utf-8").replace(" ", "  "), encoding="utf-8")
    assert run_tokenizer(config).reused == 1
    with text.open("a", encoding="utf-8") as f:
        f.write("పుస్తకం చదవడం నాకు చాలా ఇష్టం.\n")
    changed = run_tokenizer(config)
    assert (changed.made, changed.reused) == (1, 0) and changed.kept == first.kept + 1
    assert model.stat().st_mtime_ns != stamp
    smaller = TokenizerConfig(out=out, text_files=[text], vocab_size=100, quiet=True)
    assert run_tokenizer(smaller).made == 1  # a changed setting retrains
    assert run_tokenizer(smaller).reused == 1
    smaller.force = True
    assert run_tokenizer(smaller).made == 1
    assert not list(out.glob(".tokenizer.*"))  # no temp files left behind


def test_cli_entry(corpus, tmp_path):
    from agent.train.__main__ import main

    out = tmp_path / "cli"
    assert main(["tokenizer", "--text", str(corpus), "--out", str(out), "--vocab-size", "120", "--quiet"]) == 0
    assert json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["vocab_size"] == 120
    assert main(["tokenizer", "--out", str(tmp_path / "none"), "--quiet"]) == 2


def test_training_is_deterministic(corpus, tmp_path):
    for name in ("a", "b"):
        run_tokenizer(TokenizerConfig(out=tmp_path / name, text_files=[corpus], vocab_size=150, quiet=True))
    # Same pieces and scores (the .model also records its temporary path, so compare the .vocab).
    assert (tmp_path / "a/tokenizer.vocab").read_bytes() == (tmp_path / "b/tokenizer.vocab").read_bytes()


def test_usage_errors(corpus, tmp_path):
    with pytest.raises(UsageError, match="needs text"):
        run_tokenizer(TokenizerConfig(out=tmp_path / "a", quiet=True))
    with pytest.raises(UsageError, match="does not exist"):
        run_tokenizer(TokenizerConfig(out=tmp_path / "b", text_files=[tmp_path / "nope.txt"], quiet=True))
    with pytest.raises(UsageError, match="does not exist"):
        run_tokenizer(TokenizerConfig(tmp_path / "nope.jsonl", out=tmp_path / "c", quiet=True))
    with pytest.raises(UsageError, match="model-type"):
        run_tokenizer(TokenizerConfig(out=tmp_path / "d", text_files=[corpus], model_type="sentence", quiet=True))
    with pytest.raises(UsageError, match="vocab-size"):  # fewer pieces than the corpus has characters
        run_tokenizer(TokenizerConfig(out=tmp_path / "e", text_files=[corpus], vocab_size=20, quiet=True))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(UsageError, match="no text"):
        run_tokenizer(TokenizerConfig(out=tmp_path / "f", text_files=[empty], quiet=True))


def test_resize_keeps_shared_rows_and_other_weights(grown):
    model = _tiny()
    lm, old = model.lm, model.tokenizer
    before = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    grads = {k: p.requires_grad for k, p in lm.named_parameters()}
    old_card, new_card = lm.text_card, grown.vocab_size()
    assert old_card == old.vocab_size() == 152 and new_card == 400

    counts = resize_text_vocab(lm, old, grown)
    assert counts["old_card"] == old_card and counts["new_card"] == new_card == lm.text_card
    assert counts["copied"] + counts["composed"] + counts["mean"] == new_card
    assert counts["copied"] > 4 and counts["composed"] > 0
    assert lm.text_initial_token_id == new_card
    emb, dep, lin = lm.text_emb.weight, lm.depformer_text_emb.weight, lm.text_linear.weight
    assert emb.shape[0] == dep.shape[0] == new_card + 1 and lin.shape[0] == new_card
    assert lm.text_linear.out_features == new_card and lm.text_emb.num_embeddings == new_card + 1

    old_emb, old_dep, old_lin = (before["text_emb.weight"], before["depformer_text_emb.weight"],
                                 before["text_linear.weight"])
    shared = [(i, old.piece_to_id(grown.id_to_piece(i))) for i in range(4, new_card)
              if old.id_to_piece(old.piece_to_id(grown.id_to_piece(i))) == grown.id_to_piece(i)]
    assert len(shared) == counts["copied"] - 4
    for new_id, old_id in [(i, i) for i in range(4)] + shared:
        assert torch.equal(emb[new_id], old_emb[old_id]) and torch.equal(dep[new_id], old_dep[old_id])
        assert torch.equal(lin[new_id], old_lin[old_id])
    assert torch.equal(emb[new_card], old_emb[old_card]) and torch.equal(dep[new_card], old_dep[old_card])
    plan = row_plan(old, grown, old_card)
    new_id, parts = next((i, ids) for i, (kind, ids) in enumerate(plan) if kind == "composed")
    assert torch.allclose(emb[new_id], old_emb[parts].mean(0))

    after = lm.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        if not key.startswith(TEXT_LAYERS):
            assert torch.equal(after[key], value), key
    for key, p in lm.named_parameters():
        assert p.requires_grad == grads[key] and p.dtype == torch.float32, key


def test_resized_model_trains_and_streams(grown):
    model = _tiny()
    lm = model.lm
    resize_text_vocab(lm, model.tokenizer, grown)
    card = lm.text_card
    torch.manual_seed(0)
    B, T = 2, 12
    codes = torch.randint(0, lm.card, (B, lm.num_codebooks, T))
    codes[:, 0] = torch.randint(0, card, (B, T))
    lm.train()
    output = lm(codes, condition_tensors=_conditions(model, B))
    assert output.text_logits.shape == (B, 1, T, card)
    valid = output.text_logits[output.text_mask]
    loss = torch.nn.functional.cross_entropy(valid, codes[:, :1][output.text_mask])
    loss.backward()
    assert lm.text_emb.weight.grad.shape == (card + 1, lm.dim) and lm.text_linear.weight.grad.shape[0] == card

    lm.eval()
    gen = LMGen(lm, temp=0.8, temp_text=0.7, check=True, condition_tensors=_conditions(model, 1))
    texts = []
    with torch.no_grad(), gen.streaming(1):
        for _ in range(6):
            out = gen.step(torch.randint(0, lm.card, (1, lm.num_audio_codebooks // 2, 1)))
            if out is not None:
                assert out.shape == (1, lm.dep_q + 1, 1)
                texts.append(int(out[0, 0, 0]))
    assert texts and all(0 <= t < card for t in texts)


def test_resize_shrinks_without_old_tokenizer_and_keeps_dtype(corpus, tmp_path):
    run_tokenizer(TokenizerConfig(out=tmp_path, text_files=[corpus], vocab_size=100, quiet=True))
    small = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / TOKENIZER_FILE))
    lm = copy.deepcopy(_tiny().lm).to(torch.bfloat16)
    lm.text_emb.weight.requires_grad_(False)
    old_emb = lm.text_emb.weight.detach().clone()
    counts = resize_text_vocab(lm, None, small)
    assert counts == {"copied": 4, "composed": 0, "mean": 96, "old_card": 152, "new_card": 100}
    emb = lm.text_emb.weight
    assert emb.dtype == torch.bfloat16 and not emb.requires_grad and lm.text_linear.weight.requires_grad
    assert torch.equal(emb[:4], old_emb[:4]) and torch.equal(emb[100], old_emb[152])
    assert torch.equal(emb[4], old_emb[:152].float().mean(0).to(torch.bfloat16))
    assert torch.equal(emb[4], emb[99])


def test_resize_refuses_lora_and_foreign_tokenizers(grown, tmp_path):
    from moshi.modules.lora import replace_all_linear_with_lora

    model = _tiny()
    with pytest.raises(ValueError, match="not this model's tokenizer"):
        resize_text_vocab(model.lm, grown, grown)  # 400 pieces for a 152-row model
    replace_all_linear_with_lora(model.lm, rank=4, scaling=2.0)
    with pytest.raises(ValueError, match="LoRA"):
        resize_text_vocab(model.lm, model.tokenizer, grown)
    assert model.lm.text_card == 152
    sentencepiece.SentencePieceTrainer.train(  # a vocabulary without Moshi's padding id 3
        sentence_iterator=iter(ENGLISH * 5), model_prefix=str(tmp_path / "plain"), vocab_size=40,
        hard_vocab_limit=False, minloglevel=2)
    plain = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "plain.model"))
    with pytest.raises(ValueError, match="Moshi needs"):
        resize_text_vocab(_tiny().lm, None, plain)
