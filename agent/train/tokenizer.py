"""Stage 5, tokenizer: a Telugu(+English) SentencePiece model for Moshi's text stream
-> tokenizer/tokenizer.model + tokenizer.vocab + tokenizer.json (stats), and `resize_text_vocab`, which
swaps a loaded LMModel's text vocabulary for the new one.

Text comes from the align stage (the SPEAKER_MAIN words of each alignment JSON, joined per file: what
the model will have to write) and/or plain-text corpora (one sentence per line). Everything is NFC
(records.clean_text). The model keeps Moshi's special ids, unk=0 bos=1 eos=2 pad=3: Moshi pads its
text stream with 3 and marks the end of padding with 0, so those ids must mean the same in any
vocabulary it is trained on. `hard_vocab_limit` is off, so a small corpus gives a smaller vocabulary
than asked for (tokenizer.json says the real size), and training is deterministic (one thread, input
not shuffled, seeded). A rerun whose sentences and settings are unchanged reuses the model.

Moshi's English tokenizer splits Telugu into single characters or <unk>, which at 12.5 text tokens
per second cannot keep up with speech; J-Moshi (Japanese) replaced the text vocabulary and kept every
other weight. `resize_text_vocab` does the same: only `text_emb`, `depformer_text_emb` and
`text_linear` change size, and their new rows start from the old ones where the old vocabulary had
the same piece (copied), from the mean of the old pieces spelling it (composed), or from the mean.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece
import torch
from torch import nn

from agent.train.align import MAIN_SPEAKER  # the only label whose words become the text stream
from agent.train.common import Report, StageRun, Summary, UsageError, atomic_write_json, fingerprint, read_manifest
from agent.train.records import AlignedRecord, RecordError, Word, clean_text

if TYPE_CHECKING:
    from moshi.models.lm import LMModel

TOKENIZER_FILE, VOCAB_FILE, INFO = "tokenizer.model", "tokenizer.vocab", "tokenizer.json"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3  # Moshi: 3 = text padding, 0 = end of padding
SPECIAL_IDS = (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
MODEL_TYPES = ("unigram", "bpe", "char", "word")
TELUGU_BLOCK = (0x0C00, 0x0C7F)
TRAINER_VERSION = 1  # bump when the trainer options below change what a model means
SPACE = "\u2581"  # SentencePiece's word-boundary mark


@dataclass
class TokenizerConfig:
    inp: Path | None = None  # align's manifest.jsonl (None: text_files only)
    out: Path = field(kw_only=True)  # required; keyword-only so that `inp` can default to None
    text_files: list[Path] = field(default_factory=list)  # plain text, one sentence per line
    vocab_size: int = 8000
    model_type: str = "unigram"
    character_coverage: float = 1.0
    base_tokenizer: Path | None = None  # the base model's SentencePiece file: only for the overlap stats
    seed: int = 0
    force: bool = False
    quiet: bool = False

    def settings(self) -> dict:
        return {"vocab_size": self.vocab_size, "model_type": self.model_type,
                "character_coverage": self.character_coverage, "seed": self.seed,
                "trainer_version": TRAINER_VERSION, "sentencepiece": sentencepiece.__version__}


@dataclass
class Corpus:
    sentences: list[str] = field(default_factory=list)
    inputs: list[dict] = field(default_factory=list)  # {"path", "sha256", "sentences"} per file read
    audio_seconds: float = 0.0

    def digest(self) -> str:
        h = hashlib.sha256()
        for s in self.sentences:
            h.update(s.encode("utf-8") + b"\n")
        return h.hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def is_telugu(ch: str) -> bool:
    return TELUGU_BLOCK[0] <= ord(ch) <= TELUGU_BLOCK[1]


def alignment_text(data: Any) -> tuple[str | None, int]:
    """(the SPEAKER_MAIN words of a moshi-finetune alignment JSON joined, malformed entries dropped).
    Raises ValueError when the file is not an alignment file at all."""
    if not isinstance(data, dict) or not isinstance(data.get("alignments"), list):
        raise ValueError('not an alignment file: needs {"alignments": [[word, [start, end], speaker], ...]}')
    words, bad = [], 0
    for entry in data["alignments"]:
        try:
            if not isinstance(entry, (list, tuple)) or len(entry) < 3:
                raise RecordError(f"bad alignment entry {entry!r}")
            word = Word.parse(entry[:2])
        except RecordError:
            bad += 1
            continue
        if entry[2] == MAIN_SPEAKER:
            words.append(word)
    words.sort(key=lambda w: w.start)
    return clean_text(" ".join(w.text for w in words)), bad


def _read_aligned(config: TokenizerConfig, report: Report, corpus: Corpus) -> None:
    manifest = Path(config.inp)  # type: ignore[arg-type]
    records = read_manifest(manifest, AlignedRecord, report)
    corpus.inputs.append({"path": str(manifest), "sha256": _sha(manifest.read_bytes()), "sentences": 0})
    for record in records:
        path = manifest.parent / record.alignment
        try:
            raw = path.read_bytes()
            text, bad = alignment_text(json.loads(raw.decode("utf-8")))
        except FileNotFoundError:
            report.skip(record.id, str(path), "alignment file not found")
            continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            report.skip(record.id, str(path), f"unreadable alignment file: {exc}")
            continue
        if bad:
            report.note(record.id, str(path), f"malformed alignment entries dropped: {bad}")
        if not text:
            report.skip(record.id, str(path), "no agent words (no SPEAKER_MAIN entries)")
            continue
        corpus.sentences.append(text)
        corpus.inputs.append({"path": str(path), "sha256": _sha(raw), "sentences": 1})
        corpus.audio_seconds += record.duration


def _read_text(path: Path, report: Report, corpus: Corpus) -> None:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"text file {path} does not exist")
    raw = path.read_bytes()
    count = 0
    for number, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = clean_text(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            report.skip(f"{path.name}:{number}", str(path), f"malformed line: not UTF-8 ({exc.reason})")
            continue
        if text:
            corpus.sentences.append(text)
            count += 1
    corpus.inputs.append({"path": str(path), "sha256": _sha(raw), "sentences": count})


def read_corpus(config: TokenizerConfig, report: Report) -> Corpus:
    """The training sentences: the align manifest's agent text (one per dialogue), then each text file's lines."""
    corpus = Corpus()
    if config.inp is not None:
        _read_aligned(config, report, corpus)
    for path in config.text_files:
        _read_text(path, report, corpus)
    return corpus


def _check(config: TokenizerConfig) -> None:
    if config.inp is None and not config.text_files:
        raise UsageError("the tokenizer needs text: give --in (align's manifest.jsonl) and/or --text FILE")
    if config.model_type not in MODEL_TYPES:
        raise UsageError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {config.model_type!r}")
    if config.vocab_size <= len(SPECIAL_IDS):
        raise UsageError(f"--vocab-size must be more than {len(SPECIAL_IDS)} (the special pieces), "
                         f"got {config.vocab_size}")
    if not 0 < config.character_coverage <= 1:
        raise UsageError(f"--character-coverage must be in (0, 1], got {config.character_coverage}")
    if config.base_tokenizer is not None and not Path(config.base_tokenizer).is_file():
        raise UsageError(f"base tokenizer {config.base_tokenizer} does not exist")


def train_model(sentences: list[str], prefix: Path, config: TokenizerConfig) -> None:
    """SentencePiece training to <prefix>.model/.vocab with Moshi's special ids, deterministic."""
    sentencepiece.set_random_generator_seed(config.seed)
    longest = max(len(s.encode("utf-8")) for s in sentences)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=config.vocab_size,
            model_type=config.model_type, character_coverage=config.character_coverage,
            hard_vocab_limit=False, byte_fallback=False,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
            num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
            # A dialogue's agent text is one sentence; the default 4192-byte cap would silently drop long ones.
            max_sentence_length=max(4192, longest + 1),
            minloglevel=2 if config.quiet else 1)
    except RuntimeError as exc:
        hint = (" (raise --vocab-size, or lower --character-coverage)" if "required_chars" in str(exc) else "")
        raise UsageError(f"SentencePiece could not train: {exc}{hint}") from exc


def _in_vocab(sp: sentencepiece.SentencePieceProcessor, piece: str) -> int | None:
    """The id of `piece` in `sp`, or None (piece_to_id answers unk for unknown pieces)."""
    index = sp.piece_to_id(piece)
    return index if sp.id_to_piece(index) == piece else None


def _normal_ids(sp: sentencepiece.SentencePieceProcessor) -> list[int]:
    return [i for i in range(sp.vocab_size()) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))]


def tokenizer_stats(sp: sentencepiece.SentencePieceProcessor, sentences: list[str],
                    base: sentencepiece.SentencePieceProcessor | None) -> dict:
    """Vocabulary size, corpus size, Telugu coverage and fertility, overlap with the base vocabulary, a sample."""
    encoded = sp.encode(sentences)
    pieces = sum(len(x) for x in encoded)
    unk = sum(x.count(UNK_ID) for x in encoded)
    chars = "".join(sentences)
    telugu_chars = [ch for ch in chars if is_telugu(ch)]
    distinct = sorted(set(telugu_chars))
    covered = [ch for ch in distinct if UNK_ID not in sp.encode(ch)]
    te_words = [w for s in sentences for w in s.split() if any(is_telugu(ch) for ch in w)]
    te_pieces = sum(len(x) for x in sp.encode(te_words)) if te_words else 0
    normal = _normal_ids(sp)
    stats: dict[str, Any] = {
        "vocab_size": sp.vocab_size(),
        "special_ids": {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()},
        "sentences": len(sentences),
        "characters": len(chars),
        "pieces": pieces,
        "unk_rate": round(unk / pieces, 6) if pieces else 0.0,
        "telugu": {
            "characters": len(telugu_chars),
            "share": round(len(telugu_chars) / max(1, sum(1 for ch in chars if not ch.isspace())), 4),
            "distinct": len(distinct),
            "distinct_covered": len(covered),
            # Distinct Telugu code points of the corpus the tokenizer writes without <unk>.
            "coverage": round(len(covered) / len(distinct), 4) if distinct else None,
            "missing": [f"U+{ord(ch):04X} {unicodedata.name(ch, '?')}" for ch in distinct if ch not in covered][:20],
            "vocab_pieces": sum(1 for i in normal if any(is_telugu(ch) for ch in sp.id_to_piece(i))),
            # Text tokens per Telugu word: Moshi writes one per 80 ms frame, so this bounds speaking rate.
            "pieces_per_word": round(te_pieces / len(te_words), 3) if te_words else None,
        },
    }
    if base is not None:
        shared = [i for i in normal if _in_vocab(base, sp.id_to_piece(i)) is not None]
        stats["base"] = {"vocab_size": base.vocab_size(), "shared_pieces": len(shared),
                         "shared_fraction": round(len(shared) / len(normal), 4) if normal else 0.0,
                         "new_pieces": len(normal) - len(shared)}
    sample = next((s for s in sentences if any(is_telugu(ch) for ch in s)), sentences[0] if sentences else "")
    stats["sample"] = {"text": sample, "pieces": sp.encode(sample, out_type=str), "ids": sp.encode(sample)}
    if base is not None:
        stats["sample"]["base_pieces"] = len(base.encode(sample))
    return stats


def run_tokenizer(config: TokenizerConfig) -> Summary:
    _check(config)
    run = StageRun("tokenizer", config.out, config.force, config.quiet)
    out, report, markers = run.out, run.report, run.markers
    corpus = read_corpus(config, report)
    if not corpus.sentences:
        raise UsageError("no text to train the tokenizer on (every input was empty or skipped: see report.jsonl)")
    model_path, vocab_path = out / TOKENIZER_FILE, out / VOCAB_FILE
    signature = fingerprint(corpus.digest(), config.settings())
    reused = markers.load("tokenizer", signature) is not None
    if not reused:
        prefix = out / f".tokenizer.{os.getpid()}.tmp"
        train_model(corpus.sentences, prefix, config)
        # Model and vocab are renamed into place, then the marker: a killed run leaves no half-file and retrains.
        os.replace(f"{prefix}.model", model_path)
        os.replace(f"{prefix}.vocab", vocab_path)
        markers.save("tokenizer", signature, [model_path, vocab_path], {"corpus": corpus.digest()})
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    base = (sentencepiece.SentencePieceProcessor(model_file=str(config.base_tokenizer))
            if config.base_tokenizer is not None else None)
    stats = tokenizer_stats(sp, corpus.sentences, base)
    if stats["vocab_size"] < config.vocab_size:
        report.note("tokenizer", str(model_path), f"vocabulary smaller than asked: {stats['vocab_size']} pieces, "
                    f"{config.vocab_size} requested (the corpus cannot fill it)")
    if stats["unk_rate"] > 0:
        report.note("tokenizer", str(model_path), f"<unk> in {stats['unk_rate']:.2%} of the corpus's pieces "
                    "(characters left out by --character-coverage)")
    info = {"tokenizer": TOKENIZER_FILE, "sha256": _sha(model_path.read_bytes()), "fingerprint": signature,
            "requested_vocab_size": config.vocab_size, "settings": config.settings(),
            "base_tokenizer": str(config.base_tokenizer) if config.base_tokenizer else None,
            **stats, "inputs": corpus.inputs}
    atomic_write_json(out / INFO, info)
    return report.finish(len(corpus.sentences), 0 if reused else 1, 1 if reused else 0, corpus.audio_seconds)


# ---------------------------------------------------------------------------------------------
# Swapping a loaded model's text vocabulary
# ---------------------------------------------------------------------------------------------

COPIED, COMPOSED, MEAN = "copied", "composed", "mean"


def _composition(old: sentencepiece.SentencePieceProcessor, piece: str, old_card: int) -> list[int]:
    """Old ids spelling `piece` (its text encoded by the old tokenizer), without <unk> or control ids."""
    text = piece.replace(SPACE, " ")
    if not text.strip():
        return []
    ids = old.encode(text)
    if not piece.startswith(SPACE) and ids and old.id_to_piece(ids[0]) == SPACE:
        ids = ids[1:]  # the encoder's dummy word-start prefix: the piece continues a word
    return [i for i in ids if i < old_card and not (old.is_unknown(i) or old.is_control(i))]


def row_plan(old: sentencepiece.SentencePieceProcessor | None, new: sentencepiece.SentencePieceProcessor,
             old_card: int) -> list[tuple[str, list[int]]]:
    """For each new id: ("copied", [old id]), ("composed", [old ids]) or ("mean", [])."""
    plan: list[tuple[str, list[int]]] = []
    for i in range(new.vocab_size()):
        if i in SPECIAL_IDS:
            plan.append((COPIED, [i]))
            continue
        if old is None:
            plan.append((MEAN, []))
            continue
        piece = new.id_to_piece(i)
        same = _in_vocab(old, piece)
        if same is not None and same < old_card and same not in SPECIAL_IDS:
            plan.append((COPIED, [same]))
            continue
        parts = _composition(old, piece, old_card)
        plan.append((COMPOSED, parts) if parts else (MEAN, []))
    return plan


def _new_rows(weight: torch.Tensor, plan: list[tuple[str, list[int]]], old_card: int,
              initial: bool) -> torch.Tensor:
    """The resized weight (rows = token ids; `initial`: one more row, the text initial token, at the end)."""
    w = weight.detach()
    rows = len(plan) + (1 if initial else 0)
    mean = w[:old_card].float().mean(0)  # over the old vocabulary, not the initial-token row
    out = mean.to(w.dtype).expand(rows, *w.shape[1:]).clone()
    copied = [(i, ids[0]) for i, (kind, ids) in enumerate(plan) if kind == COPIED]
    if copied:
        dst, src = zip(*copied)
        out[list(dst)] = w[list(src)]  # exact copies: bit-identical rows
    composed = [(i, ids) for i, (kind, ids) in enumerate(plan) if kind == COMPOSED]
    if composed:
        seg = torch.tensor([n for n, (_, ids) in enumerate(composed) for _ in ids], device=w.device)
        flat = torch.tensor([j for _, ids in composed for j in ids], device=w.device)
        sums = torch.zeros((len(composed), *w.shape[1:]), dtype=torch.float32, device=w.device)
        sums.index_add_(0, seg, w[flat].float())
        counts = torch.tensor([len(ids) for _, ids in composed], dtype=torch.float32, device=w.device)
        out[[i for i, _ in composed]] = (sums / counts.view(-1, *[1] * (w.dim() - 1))).to(w.dtype)
    if initial:
        out[-1] = w[old_card]
    return out


def _replace(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(tensor, requires_grad=old.requires_grad))


def resize_text_vocab(lm: LMModel, old: sentencepiece.SentencePieceProcessor | None,
                      new: sentencepiece.SentencePieceProcessor) -> dict:
    """Swap `lm`'s (a moshi LMModel) text vocabulary for `new`'s in place; every other weight is kept.

    Changes `text_emb` and `depformer_text_emb` (text_card + 1 rows, the last being the text initial
    token) and `text_linear` (text_card outputs, and its bias), then `lm.text_card`, from which moshi
    derives everything else (the initial token id, LMGen's checks). Per new id: Moshi's specials 0..3
    copy their old rows; a piece the old vocabulary has copies its row (bit-identical); otherwise the
    mean of the old rows of `old.encode(piece)` (without <unk>), else the mean of all old rows. The
    initial-token row is always copied. `old=None`: specials copied, the rest the mean.

    Call it on a plain model, before LoRA wrapping and before building the optimizer (the parameters
    are new objects): LoRA-wrapped or quantized layers raise ValueError. Returns counts over the new
    vocabulary's ids, {"copied", "composed", "mean", "old_card", "new_card"} (copied + composed +
    mean == new_card). A saved config must carry the new `text_card`.
    """
    old_card, new_card = int(lm.text_card), int(new.vocab_size())
    linear, embeddings = _text_layers(lm, new)
    if old is not None and old.vocab_size() > old_card:
        raise ValueError(f"the old tokenizer has {old.vocab_size()} pieces but the model only {old_card}: "
                         "not this model's tokenizer")
    plan = row_plan(old, new, old_card)
    with torch.no_grad():
        for emb in embeddings:
            _replace(emb, "weight", _new_rows(emb.weight, plan, old_card, initial=True))
            emb.num_embeddings = new_card + 1  # also the demux modulus when a second text stream is muxed in
        _replace(linear, "weight", _new_rows(linear.weight, plan, old_card, initial=False))
        if linear.bias is not None:
            _replace(linear, "bias", _new_rows(linear.bias, plan, old_card, initial=False))
        linear.out_features = new_card
    lm.text_card = new_card
    counts = {kind: sum(1 for k, _ in plan if k == kind) for kind in (COPIED, COMPOSED, MEAN)}
    return {**counts, "old_card": old_card, "new_card": new_card}


# The text layers a vocabulary swap replaces, by their names in moshi's LMModel. Human-1's model card calls
# the second one `depformer.emb.0` (the Depth Transformer's first-step embedding, i.e. the text token's);
# moshi's `depformer_emb.0` is a different tensor: the embedding of the agent's first audio codebook.
TEXT_LAYERS = ("text_emb", "depformer_text_emb", "text_linear")


def reinit_text_vocab(lm: LMModel, new: sentencepiece.SentencePieceProcessor, seed: int) -> dict:
    """Human-1's swap: `text_emb`, `depformer_text_emb` and `text_linear` replaced by freshly initialised
    weights sized for `new`, every other weight kept. The init is moshi's own (`LMModel._init_weights`:
    truncated normal, std 1/sqrt(fan-in) cut at 3 std, zero bias), drawn from `seed` so a rebuild is the
    same. Same preconditions as resize_text_vocab; returns {"reinitialised", "old_card", "new_card"}."""
    old_card, new_card = int(lm.text_card), int(new.vocab_size())
    linear, embeddings = _text_layers(lm, new)
    generator = torch.Generator().manual_seed(seed)

    def fresh(rows: int, fan_in: int, like: torch.Tensor) -> torch.Tensor:
        std = 1 / math.sqrt(fan_in)
        w = torch.empty(rows, like.shape[1], dtype=torch.float32)
        torch.nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        return w.to(device=like.device, dtype=like.dtype)

    with torch.no_grad():
        for emb in embeddings:
            _replace(emb, "weight", fresh(new_card + 1, emb.embedding_dim, emb.weight))
            emb.num_embeddings = new_card + 1
        _replace(linear, "weight", fresh(new_card, linear.in_features, linear.weight))
        if linear.bias is not None:
            _replace(linear, "bias", torch.zeros(new_card, dtype=linear.bias.dtype, device=linear.bias.device))
        linear.out_features = new_card
    lm.text_card = new_card
    return {"reinitialised": new_card, "old_card": old_card, "new_card": new_card}


def _text_layers(lm: LMModel, new: sentencepiece.SentencePieceProcessor) -> tuple[nn.Linear, list[nn.Embedding]]:
    """text_linear and the text embeddings, checked to be plain float layers of the model's text_card, and
    `new` checked to keep Moshi's special ids."""
    from moshi.modules.lora import LoRALinear

    old_card = int(lm.text_card)
    linear = lm.text_linear
    embeddings = [e for e in (lm.text_emb, lm.depformer_text_emb) if e is not None]
    if isinstance(linear, LoRALinear):
        raise ValueError("text_linear is LoRA-wrapped: call resize_text_vocab on the plain model, before "
                         "replace_all_linear_with_lora (or merge the LoRA weights back first)")
    if type(linear) is not nn.Linear or not all(isinstance(e, nn.Embedding) for e in embeddings):
        raise ValueError(f"cannot resize a text head of type {type(linear).__name__} (quantized?): "
                         "resize the plain float model")
    if linear.out_features != old_card or any(e.num_embeddings != old_card + 1 for e in embeddings):
        raise ValueError(f"text layers do not match text_card={old_card} (text_card_out differs?): "
                         f"text_linear {linear.out_features}, embeddings {[e.num_embeddings for e in embeddings]}")
    ids = (new.unk_id(), new.bos_id(), new.eos_id(), new.pad_id())
    if ids != SPECIAL_IDS:
        raise ValueError(f"the new tokenizer's unk/bos/eos/pad ids are {ids}, Moshi needs {SPECIAL_IDS} "
                         "(3 is its text padding): train it with this stage")
    return linear, embeddings
