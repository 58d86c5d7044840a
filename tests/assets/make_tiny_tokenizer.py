"""Regenerate tests/assets/tiny_tokenizer/: a 1,024-token byte-level BPE for tests.

Tests that only need *a* tokenizer (pipeline, bundle, DDP plumbing) use this instead of SmolLM2's
49,152-token one, whose 49152 x hidden embedding otherwise dominates compute, ONNX size and DDP traffic.
It mirrors SmolLM2's layout: byte-level BPE (no normalizer, no prefix space, nothing added around a
sequence), the same 17 special tokens at ids 0-16 (unk <|endoftext|> = 0, bos <|im_start|> = 1,
eos = pad <|im_end|> = 2) and SmolLM2-Instruct's chat template, so text packing, Alpaca and chat
rendering, generation and decoding all work as with the real model.

Trained on the package's public-domain training text (compressor/data/northanger_abbey.txt, Jane
Austen), not on the validation or test texts. Deterministic: the same `tokenizers` version writes
byte-identical files (checked by running it twice, with one and with several threads).

    .venv/bin/python tests/assets/make_tiny_tokenizer.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 1024
ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "tiny_tokenizer"
CORPUS = [ROOT / "compressor" / "data" / "northanger_abbey.txt"]  # named, so new data files change nothing
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
]
# SmolLM2-135M-Instruct's template (Apache-2.0), verbatim
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_MAP = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # one line at a time, in a fixed order: the word counts (and so the merges) do not depend on threads
    lines = [line for path in CORPUS for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return tok


def to_json(tok: Tokenizer) -> str:
    """Indented like ``to_str(pretty=True)`` but one merge a line (half the size, still diffable)."""
    data = json.loads(tok.to_str())
    merges = data["model"]["merges"]
    data["model"]["merges"] = "@MERGES@"
    text = json.dumps(data, indent=2, ensure_ascii=False)
    rows = ",\n".join("      " + json.dumps(m, ensure_ascii=False) for m in merges)
    text = text.replace('"@MERGES@"', "[\n" + rows + "\n    ]") + "\n"
    assert Tokenizer.from_str(text).to_str() == tok.to_str()
    return text


def main() -> int:
    missing = [str(p) for p in CORPUS if not p.is_file()]
    if missing:
        print(f"corpus file missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    tok = build()
    (OUT / "tokenizer.json").write_text(to_json(tok), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        **SPECIAL_MAP,
        "chat_template": CHAT_TEMPLATE,
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (OUT / "special_tokens_map.json").write_text(json.dumps(SPECIAL_MAP, indent=2) + "\n", encoding="utf-8")
    sizes = ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(OUT.iterdir()))
    print(f"wrote {OUT} ({VOCAB_SIZE} tokens; {sizes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
