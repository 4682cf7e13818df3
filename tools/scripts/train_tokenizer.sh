#!/usr/bin/env bash
# Trains the tiny sample SentencePiece model data/sample/tokenizer.model from data/sample/xsum_sample.jsonl
# with spm_train (Debian package `sentencepiece`), in the LLaMA-2 tokenizer.model format and settings:
#   BPE, byte_fallback (unknown characters become <0xNN> byte pieces, e.g. "\n" -> <0x0A>), split_digits,
#   identity normalisation, add_dummy_prefix, no whitespace squashing,
#   unk=0 "<unk>", bos=1 "<s>", eos=2 "</s>", pad=-1 (none, as LLaMA: mmoc pads with a configurable id and
#   masks padded positions with label -100).
# The vocabulary is small (default 1000) so the model file stays tiny. One thread and no input sampling keep
# the output reproducible on one spm version (re-running gives the same bytes; a different spm version may not).
# Usage: tools/scripts/train_tokenizer.sh [input.jsonl] [out_dir] [vocab_size]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
input="${1:-$here/data/sample/xsum_sample.jsonl}"
out="${2:-$here/data/sample}"
vocab="${3:-1000}"
command -v spm_train >/dev/null || { echo "train_tokenizer: spm_train not found (apt-get install sentencepiece)" >&2; exit 2; }
[ -r "$input" ] || { echo "train_tokenizer: cannot read $input (run tools/scripts/make_sample_data.py first)" >&2; exit 2; }
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# One training sentence per line: every line of each document, and each summary.
python3 - "$input" > "$tmp/corpus.txt" <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        if not line.strip():
            continue
        rec = json.loads(line)
        for key in ("document", "summary", "text"):
            for part in str(rec.get(key, "")).split("\n"):
                if part.strip():
                    print(part)
PY
# Relative paths: spm stores --input and --model_prefix inside the model, so a temp dir name would change its bytes.
(cd "$tmp" && spm_train --input=corpus.txt --model_prefix=tokenizer --model_type=bpe --vocab_size="$vocab" \
  --character_coverage=0.99995 --byte_fallback=true --split_digits=true --normalization_rule_name=identity \
  --add_dummy_prefix=true --remove_extra_whitespaces=false --allow_whitespace_only_pieces=true \
  --split_by_unicode_script=true --split_by_whitespace=true --max_sentencepiece_length=16 \
  --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --unk_piece="<unk>" --bos_piece="<s>" --eos_piece="</s>" \
  --num_threads=1 --input_sentence_size=0 --shuffle_input_sentence=false --minloglevel=2 \
  > spm_train.log 2>&1) || { cat "$tmp/spm_train.log" >&2; echo "train_tokenizer: spm_train failed" >&2; exit 1; }
# Write under a temporary name, then rename: nothing half-written.
cp "$tmp/tokenizer.model" "$out/.tokenizer.model.tmp" && mv -f "$out/.tokenizer.model.tmp" "$out/tokenizer.model"
echo "wrote $out/tokenizer.model (vocab $vocab)"
