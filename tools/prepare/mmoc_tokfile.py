"""mmoc token files (docs/data-format.md): a streaming writer and a memory-mapped reader, numpy only.

The C++ reader is engine/data/token_file.cpp; both follow docs/data-format.md byte for byte.
"""
import hashlib
import json
import mmap
import os
import struct

import numpy as np

MAGIC = b"MMOCTOKS"
VERSION = 1
HEADER_BYTES = 256
ALIGN = 4096
IGNORE = -100
FIT_MODES = {"pad": 0, "pack": 1}

# magic, version, header_bytes, token_bytes, fit, vocab_size, num_tokens, num_docs, bos_id, eos_id, max_token_id,
# num_labelled, tokens/mask/offsets/docinfo/meta offsets, meta_bytes, file_bytes, content sha256, tokenizer sha256
HEADER = struct.Struct("<8s4I3Q2q2Q7Q32s32s56x")
assert HEADER.size == HEADER_BYTES


class FormatError(Exception):
    """A token file that is not one, or is truncated or corrupt."""


def align_up(v):
    return (v + ALIGN - 1) // ALIGN * ALIGN


def layout(num_tokens, num_docs, token_bytes, meta_bytes):
    """Section offsets and the file size (every section page-aligned, in this order)."""
    tokens = ALIGN
    mask = align_up(tokens + num_tokens * token_bytes)
    offsets = align_up(mask + (num_tokens + 7) // 8)
    docinfo = align_up(offsets + (num_docs + 1) * 8)
    meta = align_up(docinfo + num_docs * 8)
    return {"tokens": tokens, "mask": mask, "offsets": offsets, "docinfo": docinfo, "meta": meta,
            "file_bytes": meta + meta_bytes}


def token_bytes_for(vocab_size):
    return 2 if vocab_size <= 1 << 16 else 4


class Writer:
    """Streams documents into a token file: `add` each document, then `finish` (or `abort`).

    The file is written under a temporary name beside `path` and renamed into place by `finish`; nothing is
    left behind by `abort` or a crash before it (except the temporary files, which `abort` removes).
    """

    FLUSH_TOKENS = 1 << 20

    def __init__(self, path, vocab_size, bos_id, eos_id, fit, tokenizer_sha256=b"\0" * 32):
        if fit not in FIT_MODES:
            raise ValueError(f"fit must be pad or pack, got {fit!r}")
        self.path = path
        self.vocab_size, self.bos_id, self.eos_id, self.fit = vocab_size, bos_id, eos_id, fit
        self.tokenizer_sha256 = tokenizer_sha256
        self.token_bytes = token_bytes_for(vocab_size)
        self.dtype = np.dtype("<u2") if self.token_bytes == 2 else np.dtype("<u4")
        self.tmp = f"{path}.tmp{os.getpid()}"
        self.mask_tmp = f"{path}.mask.tmp{os.getpid()}"
        self.f = open(self.tmp, "w+b")
        self.f.seek(ALIGN)
        self.mf = open(self.mask_tmp, "w+b")  # one byte per token until finish() packs them
        self.sha = hashlib.sha256()
        self.num_tokens = 0
        self.num_labelled = 0
        self.max_token_id = 0
        self.offsets = [0]
        self.docinfo = []
        self._ids, self._mask = [], []

    def add(self, ids, mask, trunc=(0, 0)):
        """One document: ids (ints), mask (truthy = labelled), truncatable range [b, e) relative to it."""
        n = len(ids)
        if n == 0 or len(mask) != n:
            raise ValueError("a document needs ids and a mask of the same non-zero length")
        if ids[-1] != self.eos_id:
            raise ValueError("a document must end with eos")
        b, e = trunc
        if not 0 <= b <= e <= n:
            raise ValueError(f"truncatable range {trunc} outside the document's {n} tokens")
        self._ids.extend(ids)
        self._mask.extend(1 if m else 0 for m in mask)
        self.num_tokens += n
        self.offsets.append(self.num_tokens)
        self.docinfo.extend((b, e))
        if len(self._ids) >= self.FLUSH_TOKENS:
            self._flush()

    def _flush(self):
        if not self._ids:
            return
        a = np.asarray(self._ids, dtype=np.int64)
        if a.min() < 0 or a.max() >= self.vocab_size:
            raise ValueError("token id outside the vocabulary")
        self.max_token_id = max(self.max_token_id, int(a.max()))
        t = a.astype(self.dtype).tobytes()
        self.f.write(t)
        self.sha.update(t)
        m = np.asarray(self._mask, dtype=np.uint8)
        self.num_labelled += int(m.sum())
        self.mf.write(m.tobytes())
        self._ids, self._mask = [], []

    def finish(self, meta):
        self._flush()
        if len(self.offsets) < 2:
            raise ValueError("no documents")
        meta_b = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        num_docs = len(self.offsets) - 1
        lay = layout(self.num_tokens, num_docs, self.token_bytes, len(meta_b))
        # mask: pack 8 tokens per byte, least significant bit first
        self.f.seek(lay["mask"])
        self.mf.flush()
        self.mf.seek(0)
        chunk = 8 << 20
        while True:
            m = self.mf.read(chunk)
            if not m:
                break
            packed = np.packbits(np.frombuffer(m, dtype=np.uint8), bitorder="little").tobytes()
            self.f.write(packed)
            self.sha.update(packed)
        off = np.asarray(self.offsets, dtype="<u8").tobytes()
        self.f.seek(lay["offsets"])
        self.f.write(off)
        self.sha.update(off)
        di = np.asarray(self.docinfo, dtype="<u4").tobytes()
        self.f.seek(lay["docinfo"])
        self.f.write(di)
        self.sha.update(di)
        self.f.seek(lay["meta"])
        self.f.write(meta_b)
        self.f.truncate(lay["file_bytes"])
        hdr = HEADER.pack(MAGIC, VERSION, HEADER_BYTES, self.token_bytes, FIT_MODES[self.fit], self.vocab_size,
                          self.num_tokens, num_docs, self.bos_id, self.eos_id, self.max_token_id, self.num_labelled,
                          lay["tokens"], lay["mask"], lay["offsets"], lay["docinfo"], lay["meta"], len(meta_b),
                          lay["file_bytes"], self.sha.digest(), self.tokenizer_sha256)
        self.f.seek(0)
        self.f.write(hdr)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.mf.close()
        os.unlink(self.mask_tmp)
        os.replace(self.tmp, self.path)
        return {"num_tokens": self.num_tokens, "num_docs": num_docs, "num_labelled": self.num_labelled,
                "max_token_id": self.max_token_id, "file_bytes": lay["file_bytes"], "token_bytes": self.token_bytes}

    def abort(self):
        for f in (self.f, self.mf):
            try:
                f.close()
            except Exception:
                pass
        for p in (self.tmp, self.mask_tmp):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


class TokenFile:
    """A token file, memory-mapped: header fields as attributes, numpy views of the sections."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
            if head[:8] != MAGIC:
                raise FormatError(f"{path}: not an mmoc token file")
            if len(head) < HEADER_BYTES:
                raise FormatError(f"{path}: truncated: {len(head)} bytes, less than the header")
            (_, self.version, _, self.token_bytes, fit, self.vocab_size, self.num_tokens, self.num_docs, self.bos_id,
             self.eos_id, self.max_token_id, self.num_labelled, o_tok, o_mask, o_off, o_doc, o_meta, meta_bytes,
             self.file_bytes, self.content_sha256, self.tokenizer_sha256) = HEADER.unpack(head)
            if self.version != VERSION:
                raise FormatError(f"{path}: version {self.version} is not supported")
            if size != self.file_bytes:
                raise FormatError(f"{path}: {'truncated' if size < self.file_bytes else 'corrupt'}: the header "
                                  f"describes {self.file_bytes} bytes, the file has {size}")
            self.fit = "pack" if fit == 1 else "pad"
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = memoryview(self._mm)
        dt = np.dtype("<u2") if self.token_bytes == 2 else np.dtype("<u4")
        self.tokens = np.frombuffer(buf, dtype=dt, count=self.num_tokens, offset=o_tok)
        packed = np.frombuffer(buf, dtype=np.uint8, count=(self.num_tokens + 7) // 8, offset=o_mask)
        self.mask = np.unpackbits(packed, bitorder="little")[: self.num_tokens].astype(bool)
        self.offsets = np.frombuffer(buf, dtype="<u8", count=self.num_docs + 1, offset=o_off)
        self.docinfo = np.frombuffer(buf, dtype="<u4", count=2 * self.num_docs, offset=o_doc).reshape(-1, 2)
        self.meta = json.loads(bytes(buf[o_meta:o_meta + meta_bytes]).decode("utf-8"))
        self.sections = {"tokens": (o_tok, self.num_tokens * self.token_bytes),
                         "mask": (o_mask, (self.num_tokens + 7) // 8),
                         "offsets": (o_off, (self.num_docs + 1) * 8), "docinfo": (o_doc, self.num_docs * 8)}

    def document(self, d):
        """(ids, labels, (trunc_begin, trunc_end)) of document d; labels -100 where the mask is clear."""
        b, e = int(self.offsets[d]), int(self.offsets[d + 1])
        ids = self.tokens[b:e].astype(np.int64)
        labels = np.where(self.mask[b:e], ids, IGNORE)
        return ids.tolist(), labels.tolist(), tuple(int(v) for v in self.docinfo[d])

    def verify_sha256(self):
        h = hashlib.sha256()
        for name in ("tokens", "mask", "offsets", "docinfo"):
            o, n = self.sections[name]
            h.update(self._mm[o:o + n])
        return h.digest() == self.content_sha256
