#!/usr/bin/env python3
"""Test of tools/prepare/prepare_data.py and the token files it writes (run with the mmoc venv's python).

    prepare_test.py <source dir> <mmoc-data> [<mmoc-run> <mmoc-compile>]

Trains two tiny byte-level BPE tokenizers here (HF `tokenizers`, no network): a Qwen-like one (ChatML template,
eos <|im_end|>, no bos) and a Llama-3-like one (bos added by its post-processor, eos <|eot_id|>, a template with
{% generation %} tags). Then:
  - the three record kinds (text, document/summary, chat) from JSONL and Parquet: the tokens, loss mask and
    truncatable ranges in the file are checked against the tokenizer called directly (and against HF's own
    assistant mask where the template has generation tags); Parquet gives the same content as JSONL; re-running
    gives the same bytes;
  - the C++ reader (mmoc-data) agrees: `check` verifies the Python writer's SHA-256, and the batches read from the
    token file equal those read from the same examples as pre-tokenised JSONL (--jsonl-out), pad and pack, across
    epochs, and after a resume from a saved iterator state;
  - bad input: exit code 2, one stderr line naming the file and record, nothing written;
  - with mmoc-run: a tiny plan trained for a few steps on the token file and on the JSONL gives the same losses
    (pad and pack), --resume continues exactly, and bad token files stop mmoc-run with exit code 2.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

SRC = os.path.abspath(sys.argv[1])
MMOC_DATA = os.path.abspath(sys.argv[2])
RUN = os.path.abspath(sys.argv[3]) if len(sys.argv) > 4 else None
COMPILE = os.path.abspath(sys.argv[4]) if len(sys.argv) > 4 else None
PREP = os.path.join(SRC, "tools/prepare/prepare_data.py")
XSUM = os.path.join(SRC, "data/sample/xsum_sample.jsonl")
sys.path.insert(0, os.path.join(SRC, "tools/prepare"))
import mmoc_tokfile  # noqa: E402

FAILS = []
T0 = time.time()


def check(cond, what):
    if not cond:
        FAILS.append(what)
        print("FAIL: " + what, flush=True)
    return cond


def sh(args, timeout=300):
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MMOC_DEVICE"):
        env.pop(k, None)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)


def must(p, what):
    if p.returncode != 0:
        print(f"{what} failed (rc {p.returncode})\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}", flush=True)
        sys.exit(1)
    return p


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def prepare(*args, subprocess_=False):
    """prepare_data.py with these arguments: in this process (transformers is imported once), or as a command."""
    if subprocess_:
        return sh([sys.executable, PREP, *args])
    import contextlib
    import io
    import prepare_data
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = prepare_data.main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
    return Result(rc, out.getvalue(), err.getvalue())


def write_jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# ---- tokenizers ------------------------------------------------------------------------------------------
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3ISH = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
             "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}"
             "{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>"]


def make_tokenizers(tmp):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    corpus = []
    with open(XSUM, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            corpus += [r["document"], r["summary"]]
    corpus += ["How do I bake bread? Mix flour, water, yeast and salt.", "Zürich naïve café — ✓"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    qwen = os.path.join(tmp, "tok-qwenish")
    os.makedirs(qwen)
    tok.save(os.path.join(qwen, "tokenizer.json"))
    with open(os.path.join(qwen, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "chat_template": CHATML}, f)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    llama = os.path.join(tmp, "tok-llamaish")
    os.makedirs(llama)
    tok.save(os.path.join(llama, "tokenizer.json"))
    with open(os.path.join(llama, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                   "chat_template": LLAMA3ISH}, f)
    plain = os.path.join(tmp, "tok-notemplate")
    os.makedirs(plain)
    shutil.copy(os.path.join(qwen, "tokenizer.json"), plain)
    with open(os.path.join(plain, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}, f)
    return qwen, llama, plain


def load_tok(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# ---- inputs ----------------------------------------------------------------------------------------------
def records():
    with open(XSUM, encoding="utf-8") as f:
        xs = [json.loads(l) for l in f][:40]
    text = [{"text": r["document"]} for r in xs[:12]] + [{"text": "Zürich naïve café — ✓ and a tab\there."}]
    summ = [{"document": r["document"], "summary": r["summary"], "id": r["id"]} for r in xs]
    chats = []
    for i, r in enumerate(xs[:16]):
        m = [{"role": "user", "content": "Summarise this: " + r["document"].split("\n")[0]},
             {"role": "assistant", "content": r["summary"]}]
        if i % 3 == 0:
            m = [{"role": "system", "content": "You are brief."}] + m
        if i % 4 == 1:
            m += [{"role": "user", "content": "Shorter?"}, {"role": "assistant", "content": r["summary"].split(",")[0]}]
        if i % 5 == 2:
            m += [{"role": "user", "content": "Thanks."}]  # ends with a user turn
        chats.append({"messages": m})
    return text, summ, chats


def labelled_runs(ids, mask):
    """Contiguous labelled id runs."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def main():
    tmp = tempfile.mkdtemp(prefix="mmoc-prep-")
    try:
        run_all(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"prepare_test: {len(FAILS)} failure(s), {time.time() - T0:.1f} s")
    return 1 if FAILS else 0


def run_all(tmp):
    j = lambda *p: os.path.join(tmp, *p)
    qwen, llama, plain = make_tokenizers(tmp)
    text, summ, chats = records()
    f_text = write_jsonl(j("text.jsonl"), text)
    f_summ = write_jsonl(j("xsum.jsonl"), summ)
    f_chat = write_jsonl(j("chat.jsonl"), chats)
    tq = load_tok(qwen)
    eos_q = tq.convert_tokens_to_ids("<|im_end|>")

    # ---- the three kinds, Qwen-like tokenizer (no bos, ChatML without generation tags) -----------------------
    out = j("all.bin")
    p = must(prepare("--tokenizer", qwen, f_text, f_summ, f_chat, "-o", out, "--jsonl-out", j("all.jsonl"), "--fit", "pack",
                     subprocess_=True), "prepare (qwen-like)")
    check(p.stdout.startswith(f"prepare_data: wrote {out}: 69 documents (13 text, 40 summary, 16 chat)"), "summary line: " + p.stdout)
    tf = mmoc_tokfile.TokenFile(out)
    check((tf.num_docs, tf.token_bytes, tf.fit, tf.vocab_size, tf.eos_id, tf.bos_id) == (69, 2, "pack", 500, eos_q, -1),
          f"header: docs {tf.num_docs}, token bytes {tf.token_bytes}, fit {tf.fit}, vocab {tf.vocab_size}, eos {tf.eos_id}, bos {tf.bos_id}")
    check(tf.verify_sha256(), "content SHA-256 (Python) matches the header")
    with open(os.path.join(qwen, "tokenizer.json"), "rb") as f:
        check(tf.tokenizer_sha256 == hashlib.sha256(f.read()).digest(), "header's tokenizer SHA-256 is tokenizer.json's")
    check(tf.meta["tokenizer"]["eos_token"] == "<|im_end|>" and tf.meta["records"] == {"text": 13, "summary": 40, "chat": 16},
          f"metadata: {tf.meta.get('records')}")
    d = 0
    for r in text:  # text: every token labelled, eos appended
        ids, labels, trunc = tf.document(d)
        want = tq(r["text"], add_special_tokens=False)["input_ids"] + [eos_q]
        check(ids == want and labels == want and trunc == (0, 0), f"text record {d}: ids/labels")
        d += 1
    for r in summ:  # summary: prompt masked, " " + summary + eos labelled, the document is the truncatable range
        ids, labels, (tb, te) = tf.document(d)
        prompt = "Summarize:\n" + r["document"] + "\nSummary:"
        pi = tq(prompt, add_special_tokens=False)["input_ids"]
        si = tq(" " + r["summary"], add_special_tokens=False)["input_ids"]
        ok = ids == pi + si + [eos_q] and labels == [-100] * len(pi) + si + [eos_q]
        ok = ok and tq.decode(ids[tb:te]) == r["document"] and tq.decode(ids[:tb]) == "Summarize:\n"
        check(ok, f"summary record {d - 13}: ids/labels/truncatable range")
        d += 1
    for r in chats:  # chat: assistant turns labelled (content + <|im_end|> + "\n"), the final "\n" dropped
        ids, labels, trunc = tf.document(d)
        rendered = tq.apply_chat_template(r["messages"], tokenize=False)
        check(tq.decode(ids) == rendered.rstrip("\n"), f"chat record {d - 53}: the rendered conversation, final newline dropped")
        mask = [l != -100 for l in labels]
        got = [tq.decode(run) for run in labelled_runs(ids, mask)]
        want = [m["content"] + "<|im_end|>\n" for m in r["messages"] if m["role"] == "assistant"]
        if r["messages"][-1]["role"] == "assistant":
            want[-1] = want[-1][:-1]
        check("".join(got) == "".join(want), f"chat record {d - 53}: labelled text {got} != {want}")
        check(ids[-1] == eos_q and labels[-1] == (eos_q if r["messages"][-1]["role"] == "assistant" else -100),
              f"chat record {d - 53}: ends with eos, labelled only after an assistant turn")
        d += 1

    # C++ reader: check (verifies the SHA-256 the Python writer computed), info
    p = must(sh([MMOC_DATA, "check", out]), "mmoc-data check")
    check("content sha256 verified" in p.stdout, "mmoc-data check verifies the SHA-256: " + p.stdout)
    info = json.loads(must(sh([MMOC_DATA, "info", out]), "mmoc-data info").stdout)
    check(info["num_tokens"] == tf.num_tokens and info["meta"]["tokenizer"]["name"] == "tok-qwenish", "mmoc-data info")

    # batches from the token file == batches from the same examples as pre-tokenised JSONL
    for fit in ("pad", "pack"):
        for seq, seed in ((64, 0), (128, 5), (200, 1)):
            rows = tf.num_docs if fit == "pad" else -(-tf.num_tokens // seq)
            steps = rows // 6 + 2  # into the second epoch
            common = ["--seq", seq, "--microbatches", 3, "--mbs", 2, "--steps", steps, "--seed", seed, "--fit", fit]
            a = must(sh([MMOC_DATA, "batches", out, *common]), "batches .bin").stdout
            b = must(sh([MMOC_DATA, "batches", j("all.jsonl"), "--vocab", 500, *common]), "batches .jsonl").stdout
            lines = a.splitlines()
            check(len(lines) == steps and a == b, f"{fit}, seq {seq}, seed {seed}: token file and JSONL give the same {steps} batches")
            check(json.loads(lines[-1])["epoch"] >= 1, f"{fit}, seq {seq}: the steps run into epoch 1")
            if fit == "pad" and seq == 64:  # truncation happened and kept the summary: every row labels something
                labels = [l for ln in lines for mb in json.loads(ln)["labels"] for l in mb]
                check(sum(v != -100 for v in labels) > 0, "pad 64: labelled tokens present")
    # default fit: the file's (pack) vs an explicit --fit pack
    a = must(sh([MMOC_DATA, "batches", out, "--seq", 64, "--steps", 3]), "batches default fit").stdout
    b = must(sh([MMOC_DATA, "batches", out, "--seq", 64, "--steps", 3, "--fit", "pack"]), "batches --fit pack").stdout
    check(a == b, "without --fit a token file is read with its own fit mode")
    # exact resume from a saved iterator state, in a new process
    common = ["--seq", 96, "--microbatches", 2, "--mbs", 3, "--steps"]
    whole = must(sh([MMOC_DATA, "batches", out, *common, 9]), "9 steps").stdout.splitlines()
    first = must(sh([MMOC_DATA, "batches", out, *common, 4, "--state-out", j("st.json")]), "4 steps").stdout.splitlines()
    rest = must(sh([MMOC_DATA, "batches", out, *common, 5, "--state-in", j("st.json")]), "5 more").stdout.splitlines()
    check(first + rest == whole, "4 steps + saved state + 5 steps == 9 steps")

    # deterministic output; Parquet gives the same content as JSONL
    must(prepare("--tokenizer", qwen, f_text, f_summ, f_chat, "-o", j("again.bin"), "--fit", "pack", "-q"), "prepare again")
    t2 = mmoc_tokfile.TokenFile(j("again.bin"))
    check(t2.content_sha256 == tf.content_sha256, "re-running gives the same content")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        have_parquet = True
    except ImportError:
        have_parquet = False
        print("note: pyarrow missing, Parquet cases skipped")
        FAILS.append("pyarrow is in requirements.txt but not installed")
    if have_parquet:
        pq.write_table(pa.Table.from_pylist(text), j("text.parquet"))
        pq.write_table(pa.Table.from_pylist([{"document": r["document"], "summary": r["summary"]} for r in summ]),
                       j("xsum.parquet"))
        pq.write_table(pa.Table.from_pylist(chats), j("chat.parquet"))
        must(prepare("--tokenizer", qwen, j("text.parquet"), j("xsum.parquet"), j("chat.parquet"), "-o", j("pq.bin"), "--fit", "pack", "-q"),
             "prepare from Parquet")
        check(mmoc_tokfile.TokenFile(j("pq.bin")).content_sha256 == tf.content_sha256, "Parquet input: the same content as JSONL")

    # ---- Llama-3-like tokenizer: bos from its post-processor, template with generation tags ------------------
    tl = load_tok(llama)
    eos_l, bos_l = tl.convert_tokens_to_ids("<|eot_id|>"), tl.convert_tokens_to_ids("<|begin_of_text|>")
    must(prepare("--tokenizer", llama, f_text, f_chat, "-o", j("llama.bin"), "--jsonl-out", j("llama.jsonl")), "prepare (llama-like)")
    tl_f = mmoc_tokfile.TokenFile(j("llama.bin"))
    check((tl_f.bos_id, tl_f.eos_id, tl_f.fit) == (bos_l, eos_l, "pad"), "llama-like header: bos, eos, default fit pad")
    ids, labels, _ = tl_f.document(0)
    want = tl(text[0]["text"], add_special_tokens=False)["input_ids"]
    check(ids == [bos_l] + want + [eos_l] and labels == [-100] + want + [eos_l], "llama-like text: bos first (not labelled), eos last")
    for k, r in enumerate(chats):
        ids, labels, _ = tl_f.document(len(text) + k)
        ref = tl.apply_chat_template(r["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ref_ids, ref_mask = list(ref["input_ids"]), list(ref["assistant_masks"])
        if ref_ids[-1] != eos_l:  # the conversation ends with a user turn: eos appended, not labelled
            ref_ids, ref_mask = ref_ids + [eos_l], ref_mask + [0]
        check(ids == ref_ids and [l != -100 for l in labels] == [bool(m) for m in ref_mask],
              f"llama-like chat {k}: ids and mask equal HF's assistant mask")
        check(ids.count(bos_l) == 1 and ids[0] == bos_l, f"llama-like chat {k}: one bos")
    a = must(sh([MMOC_DATA, "batches", j("llama.bin"), "--seq", 80, "--mbs", 4, "--steps", 5]), "batches llama .bin").stdout
    b = must(sh([MMOC_DATA, "batches", j("llama.jsonl"), "--vocab", 500, "--seq", 80, "--mbs", 4, "--steps", 5]), "batches llama .jsonl").stdout
    check(a == b, "llama-like: token file and JSONL batches equal")

    # uint32 tokens when the model's vocabulary is larger than 65536
    must(prepare("--tokenizer", qwen, f_text, "-o", j("wide.bin"), "--vocab-size", 151936, "-q"), "prepare --vocab-size 151936")
    tw = mmoc_tokfile.TokenFile(j("wide.bin"))
    check(tw.token_bytes == 4 and tw.vocab_size == 151936 and tw.document(0)[0] == tf.document(0)[0], "uint32 tokens for a 151936 vocabulary")
    must(sh([MMOC_DATA, "check", j("wide.bin")]), "mmoc-data check uint32")
    print(f"good cases: {time.time() - T0:.1f} s", flush=True)

    # ---- bad input -----------------------------------------------------------------------------------------------
    outdir = j("bad")
    os.makedirs(outdir)
    target = os.path.join(outdir, "out.bin")
    with open(target, "w") as f:
        f.write("previous content\n")

    def bad(name, args, *needles, tok=qwen, subprocess_=False):
        p = prepare("--tokenizer", tok, *args, "-o", target, "--jsonl-out", os.path.join(outdir, "out.jsonl"),
                    subprocess_=subprocess_)
        err = p.stderr.strip().splitlines()
        check(p.returncode == 2, f"{name}: exit code 2, got {p.returncode} (stderr: {p.stderr.strip()[-500:]!r})")
        check(len(err) == 1 and err[0].startswith("prepare_data: error: "), f"{name}: one stderr line, got {err[-3:]}")
        for n in needles:
            check(n in p.stderr, f"{name}: message names {n!r}: {p.stderr.strip()!r}")
        check(sorted(os.listdir(outdir)) == ["out.bin"], f"{name}: nothing written: {os.listdir(outdir)}")
        with open(target) as f:
            check(f.read() == "previous content\n", f"{name}: the existing output is untouched")

    def bad_lines(name, lines, *needles, tok=qwen, subprocess_=False):
        path = j(name.replace(" ", "_") + ".jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        bad(name, [path], path, *needles, tok=tok, subprocess_=subprocess_)

    good = json.dumps(text[0])
    # as commands (the exit code of the script itself), then in this process
    bad("unknown tokenizer", [f_text], "--tokenizer", "nowhere/tokenizer", "unknown tokenizer", tok=j("nowhere", "tokenizer"),
        subprocess_=True)
    bad_lines("empty text", [good, good, '{"text": ""}'], ":3:", "empty", subprocess_=True)
    junk = j("junk-tok")
    os.makedirs(junk)
    with open(os.path.join(junk, "tokenizer.json"), "w") as f:
        f.write('{"this is": "not a tokenizer"}')
    bad("not a tokenizer", [f_text], "junk-tok", "cannot load", tok=junk)
    bad_lines("blank text", [good, '{"text": "  \\n "}'], ":2:", "empty")
    bad_lines("empty summary", [json.dumps(summ[0]), '{"document": "Some news.", "summary": ""}'], ":2:", "empty", "summary")
    bad_lines("empty messages", ['{"messages": []}'], ":1:", "empty")
    bad_lines("no assistant turn", [json.dumps(chats[0]), '{"messages": [{"role": "user", "content": "hi"}]}'], ":2:",
              "without an assistant turn")
    bad_lines("unknown record", [good, '{"title": "x", "body": "y"}'], ":2:", "none of")
    bad_lines("invalid JSON", [good, '{"text": "unterminated'], ":2:", "invalid JSON")
    bad_lines("summary without document", ['{"summary": "x"}'], ":1:", "without \"document\"")
    bad_lines("message without role", ['{"messages": [{"content": "hi"}]}'], ":1:", "role")
    bad_lines("pre-tokenised record", ['{"input_ids": [1, 2]}'], ":1:", "pre-tokenised")
    bad("token id >= --vocab-size", [f_text, "--vocab-size", "300"], "text.jsonl:1:", "token id", "vocabulary size 300")
    bad_lines("chat without a template", [json.dumps(chats[1])], ":1:", "no chat template", tok=plain)
    bad("missing input", [j("absent.jsonl")], "absent.jsonl", "no such input file")
    bad("unknown --eos-token", [f_text, "--eos-token", "<nope>"], "--eos-token", "<nope>")
    if have_parquet:
        pq.write_table(pa.Table.from_pylist([{"text": "fine"}, {"text": "also fine"}, {"text": ""}]), j("bad.parquet"))
        bad("Parquet empty record", [j("bad.parquet")], "bad.parquet: row 2", "empty")
    print(f"bad input: {time.time() - T0:.1f} s", flush=True)

    # a truncated token file: mmoc-data says so (exit 2)
    with open(out, "rb") as f:
        blob = f.read()
    with open(j("trunc.bin"), "wb") as f:
        f.write(blob[:len(blob) - 1000])
    p = sh([MMOC_DATA, "info", j("trunc.bin")])
    check(p.returncode == 2 and "trunc.bin: truncated" in p.stderr, f"truncated file: {p.returncode} {p.stderr.strip()!r}")

    if RUN:
        run_engine(tmp, out, j("all.jsonl"), j("trunc.bin"))


def run_engine(tmp, bin_path, jsonl_path, trunc_path):
    """mmoc-run trains on the token file exactly as on the JSONL; resume; errors."""
    j = lambda *p: os.path.join(tmp, *p)
    plan = j("sp.plan.json")
    must(sh([COMPILE, os.path.join(SRC, "configs/jobs/tiny-xsum-cpu.json"), "-o", plan, "--gpus", 1, "--v", 1,
             "--seq-len", 96, "--microbatches", 2, "--micro-batch-size", 2, "-q"]), "mmoc-compile tiny-sp1k")
    tiny = j("tiny.plan.json")
    must(sh([COMPILE, os.path.join(SRC, "configs/jobs/tiny-cpu.json"), "-o", tiny, "--gpus", 1, "--v", 1, "-q"]), "mmoc-compile tiny")

    def losses(data, steps, *extra):
        m = j(f"m{len(os.listdir(tmp))}.jsonl")
        must(sh([RUN, plan, "--data", data, "--steps", steps, "--metrics", m, "-q", *extra]), f"mmoc-run {os.path.basename(data)} {extra}")
        with open(m) as f:
            return [(r["loss"], r["tokens"]) for r in map(json.loads, f) if r]

    # the token file was prepared with --fit pack: that is its default; the JSONL needs --fit pack
    whole = losses(bin_path, 4)
    lj = losses(jsonl_path, 4, "--fit", "pack")
    check(len(whole) == 4 and whole == lj, f"pack: the same losses and token counts on the token file and the JSONL: {whole} vs {lj}")
    check(len(set(whole)) == 4, f"pack: four different batches: {whole}")
    lb = losses(bin_path, 2, "--fit", "pad", "--data-seed", 4)
    lj = losses(jsonl_path, 2, "--fit", "pad", "--data-seed", 4)
    check(len(lb) == 2 and lb == lj, f"pad: the same losses and token counts: {lb} vs {lj}")
    # exact resume: 4 steps == 2 steps, save, resume to 4
    ck = j("ck")
    must(sh([RUN, plan, "--data", bin_path, "--steps", 2, "--save", ck, "-q"]), "mmoc-run 2 steps --save")
    resumed = losses(bin_path, 4, "--resume", ck)
    check(resumed == whole[2:], f"--resume continues exactly: {resumed} vs {whole[2:]}")

    def bad(name, args, *needles, p=plan):
        r = sh([RUN, p, *args, "--steps", 1, "-q"])
        err = r.stderr.strip().splitlines()
        check(r.returncode == 2, f"mmoc-run {name}: exit code 2, got {r.returncode} ({r.stderr.strip()[-300:]!r})")
        check(len(err) == 1 and err[0].startswith("mmoc-run: "), f"mmoc-run {name}: one stderr line, got {err[-3:]}")
        for n in needles:
            check(n in r.stderr, f"mmoc-run {name}: message names {n!r}: {r.stderr.strip()!r}")

    bad("token file for a smaller vocabulary", ["--data", bin_path], bin_path, "vocabulary of 500", "vocab_size 101", p=tiny)
    bad("truncated token file", ["--data", trunc_path], trunc_path, "truncated")
    bad("--tokenizer with a token file", ["--data", bin_path, "--tokenizer", os.path.join(SRC, "data/sample/tokenizer.model")],
        "already tokenised")
    print(f"mmoc-run: {time.time() - T0:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
