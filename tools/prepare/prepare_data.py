#!/usr/bin/env python3
"""Tokenise training data with a Hugging Face tokenizer into an mmoc token file (docs/data-format.md).

    prepare_data.py --tokenizer MODEL_DIR|tokenizer.json INPUT... -o train.bin [--fit pad|pack]
                    [--jsonl-out train.jsonl] [--chat-template FILE] [--vocab-size N] ...

INPUT: JSONL (one JSON object a line) or Parquet files. Each record is one of
  {"text": ...}                  every token labelled (a bos the tokenizer adds is not), eos appended, labelled;
  {"document": ..., "summary"}   the XSum template: "Summarize:\\n{document}\\nSummary:" masked (-100), then
                                 " " + summary and eos labelled; the document is what is cut first when the
                                 example is longer than the sequence;
  {"messages": [{"role", "content"}, ...]}
                                 the tokenizer's chat template; only the assistant turns are labelled (the text
                                 the template adds for each assistant message after its generation prompt, its
                                 end-of-turn token included). Each example ends with eos.
mmoc-run --data train.bin reads the output memory-mapped; --jsonl-out also writes the same examples as
pre-tokenised JSONL ({"input_ids", "labels", "truncate"}), mmoc-run's small-data form: both train on the same
rows. Bad input (an unknown tokenizer, an empty record, a chat record without an assistant turn, a token id at or
above --vocab-size, ...) stops with one message naming the file and record, exit code 2, and nothing written.
Needs transformers/tokenizers (and pyarrow for Parquet) from the mmoc venv; works offline.
"""
import argparse
import hashlib
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmoc_tokfile  # noqa: E402

DEFAULT_PROMPT = "Summarize:\n{document}\nSummary:"
BATCH = 512


class PrepError(Exception):
    """A user's error: one message, exit code 2."""


# ---- tokenizer -----------------------------------------------------------------------------------------
def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


class Tok:
    """The HF tokenizer plus what the tool derives from it: eos, the bos prefix, the identity."""

    def __init__(self, spec, chat_template_file=None, eos_token=None):
        if not os.path.exists(spec):
            raise PrepError(f"--tokenizer {spec}: no such file or folder (unknown tokenizer; prepare_data works offline: "
                            "give a folder holding tokenizer.json, e.g. a downloaded model, or a tokenizer.json file)")
        try:
            import transformers
            from transformers import AutoTokenizer, PreTrainedTokenizerFast
            transformers.logging.set_verbosity_error()
        except ImportError as e:
            raise PrepError(f"transformers is not installed ({e}); run tools/setup.sh and use its venv's python")
        folder = spec if os.path.isdir(spec) else None
        if folder is None and os.path.basename(spec) == "tokenizer.json" and \
                os.path.exists(os.path.join(os.path.dirname(spec) or ".", "tokenizer_config.json")):
            folder = os.path.dirname(spec) or "."
        try:
            if folder is not None:
                tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            else:
                tok = PreTrainedTokenizerFast(tokenizer_file=spec)
        except Exception as e:  # transformers raises many kinds for a file that is not a tokenizer
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PrepError(f"--tokenizer {spec}: cannot load a Hugging Face tokenizer (unknown tokenizer): {msg}")
        if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
            raise PrepError(f"--tokenizer {spec}: not a fast (tokenizer.json) tokenizer")
        self.tok = tok
        self.spec = spec
        tj = os.path.join(folder, "tokenizer.json") if folder else spec
        self.sha256 = sha256_file(tj) if os.path.isfile(tj) else \
            hashlib.sha256(tok.backend_tokenizer.to_str().encode("utf-8")).digest()
        self.vocab_size = len(tok)
        if eos_token is not None:
            ids = tok.convert_tokens_to_ids([eos_token])
            if not ids or ids[0] is None or ids[0] == tok.unk_token_id or eos_token not in tok.get_vocab():
                raise PrepError(f"--eos-token {eos_token!r} is not a token of {spec}")
            self.eos_id, self.eos_token = ids[0], eos_token
        else:
            self.eos_id, self.eos_token = tok.eos_token_id, tok.eos_token
        if self.eos_id is None:
            raise PrepError(f"--tokenizer {spec}: has no eos token (tokenizer_config.json eos_token); give --eos-token")
        # The bos the tokenizer itself adds (its post-processor): Llama-3 <|begin_of_text|>, Qwen nothing.
        with_sp = tok("x", add_special_tokens=True)["input_ids"]
        without = tok("x", add_special_tokens=False)["input_ids"]
        k = next((i for i in range(len(with_sp) - len(without) + 1) if with_sp[i:i + len(without)] == without), 0)
        self.bos_prefix = list(with_sp[:k])
        self.bos_id = self.bos_prefix[0] if len(self.bos_prefix) == 1 else -1
        self.template = None
        if chat_template_file:
            try:
                with open(chat_template_file, encoding="utf-8") as f:
                    self.template = f.read()
            except OSError as e:
                raise PrepError(f"--chat-template {chat_template_file}: {e.strerror}")
        elif isinstance(getattr(tok, "chat_template", None), str):
            self.template = tok.chat_template
        self.generation_tags = bool(self.template and re.search(r"\{%-?\s*generation\s*-?%\}", self.template))
        # SentencePiece-style tokenizers put a space before the first word themselves ("▁x"): no separator then.
        first = tok.convert_ids_to_tokens(without[:1])
        self.adds_prefix_space = bool(first) and isinstance(first[0], str) and first[0].startswith("\u2581")

    def encode(self, texts, offsets=False):
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=offsets)
        return enc["input_ids"], (enc["offset_mapping"] if offsets else None)

    def render(self, messages, add_generation_prompt):
        return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def identity(self):
        return {"name": os.path.basename(os.path.normpath(self.spec)), "path": self.spec,
                "class": type(self.tok).__name__, "vocab_size": self.vocab_size,
                "bos_token": self.tok.convert_ids_to_tokens(self.bos_id) if self.bos_id >= 0 else None,
                "bos_prefix_ids": self.bos_prefix, "eos_token": self.eos_token, "eos_id": self.eos_id,
                "tokenizer_json_sha256": self.sha256.hex(),
                "chat_template_sha256": hashlib.sha256(self.template.encode("utf-8")).hexdigest() if self.template else None}


# ---- input -----------------------------------------------------------------------------------------------
def read_records(path):
    """Yields (where, record): where = "file:line" (JSONL, 1-based) or "file: row N" (Parquet, 0-based)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise PrepError(f"{path}: cannot read: {e.strerror}")
    if magic == b"PAR1" or path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PrepError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow, or tools/setup.sh)")
        try:
            pf = pq.ParquetFile(path)
            row = 0
            for batch in pf.iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    yield f"{path}: row {row}", rec
                    row += 1
        except PrepError:
            raise
        except Exception as e:
            raise PrepError(f"{path}: not a readable Parquet file ({e})")
        return
    with open(path, encoding="utf-8", newline="") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise PrepError(f"{path}:{lineno + 1}: not UTF-8 ({e.reason})")
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
            if not isinstance(rec, dict):
                raise PrepError(f"{path}:{lineno}: a line must be a JSON object, got {type(rec).__name__}")
            yield f"{path}:{lineno}", rec


# ---- examples ----------------------------------------------------------------------------------------------
class Builder:
    def __init__(self, tok, args):
        self.tok = tok
        self.a = args
        self.limit = args.vocab_size or tok.vocab_size
        if "{document}" not in args.prompt_template or args.prompt_template.count("{document}") != 1:
            raise PrepError(f"--prompt-template must contain {{document}} exactly once: {args.prompt_template!r}")
        if args.summary_separator is None:
            self.sep = "" if tok.adds_prefix_space else " "
        else:
            self.sep = args.summary_separator
        self.counts = {"text": 0, "summary": 0, "chat": 0}

    def kind(self, where, rec):
        a = self.a
        if a.messages_key in rec:
            return "chat"
        if a.document_key in rec or a.summary_key in rec:
            return "summary"
        if a.text_key in rec:
            return "text"
        if "input_ids" in rec:
            raise PrepError(f"{where}: a pre-tokenised record: give such JSONL to mmoc-run --data directly")
        raise PrepError(f"{where}: none of \"{a.text_key}\", \"{a.document_key}\"+\"{a.summary_key}\" or "
                        f"\"{a.messages_key}\" in the record (keys: {', '.join(sorted(rec)) or 'none'})")

    @staticmethod
    def string(where, rec, key):
        v = rec.get(key)
        if v is None:
            raise PrepError(f"{where}: missing \"{key}\"")
        if not isinstance(v, str):
            raise PrepError(f"{where}: \"{key}\" is not a string")
        if not v.strip():
            raise PrepError(f"{where}: empty record: \"{key}\" is empty")
        return v

    def batch(self, items):
        """items: [(where, record)] -> [(where, ids, mask, trunc)] in the same order."""
        out = [None] * len(items)
        texts, summaries, chats = [], [], []
        for i, (where, rec) in enumerate(items):
            k = self.kind(where, rec)
            self.counts[k] += 1
            if k == "text":
                texts.append((i, self.string(where, rec, self.a.text_key)))
            elif k == "summary":
                if self.a.document_key not in rec:
                    raise PrepError(f"{where}: \"{self.a.summary_key}\" without \"{self.a.document_key}\"")
                if self.a.summary_key not in rec:
                    raise PrepError(f"{where}: \"{self.a.document_key}\" without \"{self.a.summary_key}\"")
                summaries.append((i, self.string(where, rec, self.a.document_key),
                                  self.string(where, rec, self.a.summary_key)))
            else:
                chats.append((i, rec[self.a.messages_key]))
        tok = self.tok
        eos = tok.eos_id
        if texts:
            ids, _ = tok.encode([t for _, t in texts])
            for (i, _), e in zip(texts, ids):
                if not e:
                    raise PrepError(f"{items[i][0]}: empty record: \"{self.a.text_key}\" encodes to no tokens")
                out[i] = (tok.bos_prefix + e + [eos], [0] * len(tok.bos_prefix) + [1] * (len(e) + 1), (0, 0))
        if summaries:
            tmpl = self.a.prompt_template
            at = tmpl.index("{document}")
            prompts = [tmpl.replace("{document}", d) for _, d, _ in summaries]
            p_ids, p_off = tok.encode(prompts, offsets=True)
            c_ids, _ = tok.encode([self.sep + s for _, _, s in summaries])
            for (i, d, _), pi, po, ci in zip(summaries, p_ids, p_off, c_ids):
                nb = len(tok.bos_prefix)
                inside = [t for t, (s, _) in enumerate(po) if at <= s < at + len(d)]
                trunc = (nb + inside[0], nb + inside[-1] + 1) if inside else (0, 0)
                ids = tok.bos_prefix + pi + ci + [eos]
                out[i] = (ids, [0] * (nb + len(pi)) + [1] * (len(ci) + 1), trunc)
        for i, messages in chats:
            out[i] = self.chat(items[i][0], messages) + ((0, 0),)
        result = []
        for (where, _), (ids, mask, trunc) in zip(items, out):
            big = max(ids)
            if big >= self.limit:
                t = ids.index(big)
                raise PrepError(f"{where}: token id {big} ({tok.tok.convert_ids_to_tokens(big)!r}, token {t}) is not below "
                                f"the vocabulary size {self.limit}" + (" (--vocab-size)" if self.a.vocab_size else ""))
            result.append((where, ids, mask, trunc))
        return result

    def chat(self, where, messages):
        tok = self.tok
        if tok.template is None:
            raise PrepError(f"{where}: a chat record, but tokenizer {tok.spec} has no chat template (--chat-template FILE)")
        if not isinstance(messages, list) or not messages:
            raise PrepError(f"{where}: empty record: \"{self.a.messages_key}\" is " +
                            ("empty" if isinstance(messages, list) else f"not a list ({type(messages).__name__})"))
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise PrepError(f"{where}: message {j} is not an object with a string \"role\"")
            if "content" not in m and "tool_calls" not in m:
                raise PrepError(f"{where}: message {j} ({m['role']}) has no \"content\"")
            if m["role"] == "assistant" and isinstance(m.get("content"), str) and not m["content"].strip() \
                    and not m.get("tool_calls"):
                raise PrepError(f"{where}: message {j}: empty assistant turn")
        turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise PrepError(f"{where}: a chat record without an assistant turn (roles: "
                            f"{', '.join(m['role'] for m in messages)}): nothing to train on")

        def render(msgs, gen):
            try:
                return tok.render(msgs, gen)
            except Exception as e:
                raise PrepError(f"{where}: the chat template failed: {type(e).__name__}: {e}")

        if tok.generation_tags:
            try:
                r = tok.tok.apply_chat_template(messages, chat_template=tok.template, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            except Exception as e:
                raise PrepError(f"{where}: the chat template failed: {type(e).__name__}: {e}")
            ids, mask = list(r["input_ids"]), [int(v) for v in r["assistant_masks"]]
        else:
            full = render(messages, False)
            spans = []
            for j in turns:
                p, q = render(messages[:j], True), render(messages[:j + 1], False)
                if not (q.startswith(p) and full.startswith(q)):
                    raise PrepError(f"{where}: cannot locate assistant message {j}: the chat template renders the "
                                    "conversation differently when more messages follow (add {% generation %} tags to it)")
                spans.append((len(p), len(q)))
            enc, off = tok.encode([full], offsets=True)
            ids = enc[0]
            mask = [int(any(a <= s < b for a, b in spans)) for s, _ in off[0]]
        if not ids:
            raise PrepError(f"{where}: empty record: the chat template rendered nothing")
        # End with eos: whitespace the template puts after a final eos is dropped, else eos is appended.
        eos = tok.eos_id
        j = len(ids)
        while j > 0 and ids[j - 1] != eos and not tok.tok.decode([ids[j - 1]]).strip():
            j -= 1
        if j > 0 and ids[j - 1] == eos:
            ids, mask = ids[:j], mask[:j]
        else:
            ids, mask = ids + [eos], mask + [int(messages[-1]["role"] == "assistant")]
        if not any(mask):
            raise PrepError(f"{where}: no assistant token is labelled (the template renders no assistant text)")
        return ids, mask


# ---- main ----------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See docs/data-format.md.")
    ap.add_argument("inputs", nargs="+", help="JSONL or Parquet files")
    ap.add_argument("-o", "--output", required=True, help="token file to write (mmoc-run --data)")
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (+ tokenizer_config.json) or a tokenizer.json")
    ap.add_argument("--chat-template", help="Jinja chat template file (default: the tokenizer's)")
    ap.add_argument("--eos-token", help="eos token (default: the tokenizer's)")
    ap.add_argument("--vocab-size", type=int, default=0, help="the model's vocab_size: every id must be below it "
                                                               "(default: the tokenizer's length)")
    ap.add_argument("--fit", choices=("pad", "pack"), default="pad", help="mmoc-run's default fit mode for the file")
    ap.add_argument("--jsonl-out", help="also write the examples as pre-tokenised JSONL")
    ap.add_argument("--prompt-template", default=DEFAULT_PROMPT, help="summary records' prompt, with {document}")
    ap.add_argument("--summary-separator", default=None,
                    help="text between the prompt and the summary (default: ' ', '' for tokenizers that add a prefix space)")
    ap.add_argument("--text-key", default="text")
    ap.add_argument("--document-key", default="document")
    ap.add_argument("--summary-key", default="summary")
    ap.add_argument("--messages-key", default="messages")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    out_dir = os.path.dirname(os.path.abspath(a.output))
    writer = jsonl = None
    jsonl_tmp = f"{a.jsonl_out}.tmp{os.getpid()}" if a.jsonl_out else None
    try:
        if not os.path.isdir(out_dir):
            raise PrepError(f"-o {a.output}: folder {out_dir} does not exist")
        if a.vocab_size < 0:
            raise PrepError("--vocab-size must be positive")
        for p in a.inputs:
            if not os.path.isfile(p):
                raise PrepError(f"{p}: no such input file")
        tok = Tok(a.tokenizer, a.chat_template, a.eos_token)
        b = Builder(tok, a)
        if tok.eos_id >= b.limit:
            raise PrepError(f"the eos id {tok.eos_id} is not below --vocab-size {b.limit}")
        file_vocab = b.limit  # every id is below it: the model's vocab_size when given, else the tokenizer's
        writer = mmoc_tokfile.Writer(a.output, file_vocab, tok.bos_id, tok.eos_id, a.fit, tok.sha256)
        if jsonl_tmp:
            jsonl = open(jsonl_tmp, "w", encoding="utf-8", newline="\n")
        inputs = []
        for path in a.inputs:
            n = 0
            pending = []

            def flush():
                for where, ids, mask, trunc in b.batch(pending):
                    writer.add(ids, mask, trunc)
                    if jsonl:
                        rec = {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}
                        if trunc[1] > trunc[0]:
                            rec["truncate"] = list(trunc)
                        jsonl.write(json.dumps(rec, separators=(",", ":")) + "\n")
                pending.clear()

            for where, rec in read_records(path):
                pending.append((where, rec))
                n += 1
                if len(pending) >= BATCH:
                    flush()
            flush()
            if n == 0:
                raise PrepError(f"{path}: no records")
            inputs.append({"path": path, "records": n})
        meta = {"format": "mmoc-tokens", "version": mmoc_tokfile.VERSION, "created_by": "tools/prepare/prepare_data.py",
                "tokenizer": tok.identity(), "vocab_size": file_vocab, "fit": a.fit, "inputs": inputs, "records": b.counts,
                "prompt_template": a.prompt_template, "summary_separator": b.sep,
                "chat_mask": None if not b.counts["chat"] else ("generation-tags" if tok.generation_tags else "template-prefixes")}
        if jsonl:
            jsonl.flush()
            os.fsync(jsonl.fileno())
            jsonl.close()
            jsonl = None
        st = writer.finish(meta)
        writer = None
        if jsonl_tmp:
            os.replace(jsonl_tmp, a.jsonl_out)
        if not a.quiet:
            kinds = ", ".join(f"{v} {k}" for k, v in b.counts.items() if v)
            print(f"prepare_data: wrote {a.output}: {st['num_docs']} documents ({kinds}), {st['num_tokens']} tokens "
                  f"({st['num_labelled']} labelled), uint{8 * st['token_bytes']}, vocab {file_vocab}, fit {a.fit}, "
                  f"{st['file_bytes']} bytes" + (f"; and {a.jsonl_out}" if a.jsonl_out else ""))
        return 0
    except PrepError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    finally:
        if writer is not None:
            writer.abort()
        if jsonl is not None:
            jsonl.close()
        if jsonl_tmp and os.path.exists(jsonl_tmp):
            os.unlink(jsonl_tmp)


if __name__ == "__main__":
    sys.exit(main())
