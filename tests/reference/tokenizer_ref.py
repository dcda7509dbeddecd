"""tokenizer_ref.py - an independent Python model of Hugging Face tokenizers'
handling of a Llama-2-kind tokenizer.json, plus a tiny BPE trainer that makes
one.

Encoding (what tokenizers does for Llama 2's tokenizer.json):
  1. Added tokens (<unk>, <s>, </s>; "normalized": false) are matched in the raw
     text first, leftmost-longest; the text between them is encoded on its own.
  2. Each non-empty piece is normalized: "▁" prepended (never to an empty
     piece), every " " replaced by "▁". No pre-tokenizer: a piece is one word.
  3. The word starts as one symbol per Unicode character: the character's id
     when the vocab has it, else one <0xNN> token per UTF-8 byte (byte
     fallback).
  4. Merges are applied one at a time: among all adjacent symbol pairs that
     have a merge, the one with the lowest rank (its index in "merges"),
     leftmost on ties; the pair becomes the merged token.
Decoding (Llama 2's decoder Sequence): each token's "▁" becomes " "; runs of
<0xNN> tokens become their bytes decoded as UTF-8 (one U+FFFD per byte token
when invalid); tokens are joined; one leading " " is stripped.
"""
import collections
import re

SPACE = "\u2581"  # ▁
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_RE = re.compile(r"^<0x([0-9A-F]{2})>$")


def byte_token(b):
    return "<0x%02X>" % b


def train(corpus, n_merges):
    """Learns a SentencePiece-style BPE vocabulary from corpus lines: each line
    is normalized like the encoder does it and split into words that each
    start with "▁"; merges never cross a word. The most frequent pair wins,
    ties broken by the lexicographically smallest pair, so training is
    deterministic. Returns (vocab list, merges list of (a, b))."""
    words = collections.Counter()
    for line in corpus.split("\n"):
        if not line.strip():
            continue
        norm = SPACE + line.replace(" ", SPACE)
        for w in re.findall(SPACE + "[^" + SPACE + "]*|[^" + SPACE + "]+", norm):
            words[w] += 1
    chars = collections.Counter()
    for w, n in words.items():
        for ch in w:
            chars[ch] += n
    vocab = list(SPECIALS) + [byte_token(b) for b in range(256)]
    vocab += [c for c, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))]
    seqs = {w: list(w) for w in words}
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        (a, b), cnt = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if cnt < 2:
            break
        merges.append((a, b))
        if a + b not in vocab:
            vocab.append(a + b)
        for w in seqs:
            s = seqs[w]
            out = []
            i = 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return vocab, merges


class Tokenizer:
    def __init__(self, vocab, merges, added=SPECIALS):
        self.vocab = list(vocab)
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        self.rank = {(a, b): r for r, (a, b) in enumerate(merges)}
        self.added = sorted(added, key=len, reverse=True)

    def split_added(self, text):
        """Yields (piece, is_added) in order, added tokens matched
        leftmost-longest."""
        i = 0
        start = 0
        while i < len(text):
            hit = None
            for t in self.added:
                if text.startswith(t, i):
                    hit = t
                    break
            if hit is None:
                i += 1
                continue
            if i > start:
                yield text[start:i], False
            yield hit, True
            i += len(hit)
            start = i
        if start < len(text):
            yield text[start:], False

    def bpe(self, piece):
        norm = SPACE + piece.replace(" ", SPACE)
        syms = []
        for ch in norm:
            if ch in self.ids:
                syms.append(ch)
            else:
                syms.extend(byte_token(b) for b in ch.encode("utf-8"))
        while True:
            best = None
            for i in range(len(syms) - 1):
                r = self.rank.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            syms[i:i + 2] = [syms[i] + syms[i + 1]]
        return syms

    def encode_tokens(self, text):
        toks = []
        for piece, is_added in self.split_added(text):
            if is_added:
                toks.append(piece)
            elif piece:
                toks.extend(self.bpe(piece))
        return toks

    def encode(self, text):
        """Token ids without BOS (add_special_tokens=False)."""
        return [self.ids[t] for t in self.encode_tokens(text)]

    def decode(self, ids, skip_special=False):
        toks = [self.vocab[i] for i in ids]
        if skip_special:
            toks = [t for t in toks if t not in SPECIALS]
        out = []
        pending = []

        def flush():
            if pending:
                try:
                    out.append(bytes(pending).decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(pending))
                pending.clear()

        for t in toks:
            m = BYTE_RE.match(t)
            if m:
                pending.append(int(m.group(1), 16))
                continue
            flush()
            out.append(t.replace(SPACE, " "))
        flush()
        s = "".join(out)
        return s[1:] if s.startswith(" ") else s

    def to_json(self, merges):
        """The tokenizer.json dict, laid out as Llama 2's file is."""
        added = [{"id": self.ids[t], "content": t, "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True} for t in SPECIALS]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]},
            "pre_tokenizer": None,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<s>", "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": "<unk>",
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": True,
                "byte_fallback": True,
                "vocab": {t: i for i, t in enumerate(self.vocab)},
                "merges": ["%s %s" % (a, b) for a, b in merges]}}
