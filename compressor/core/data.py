"""Calibration and training data: plain text (packed) or Alpaca-format instructions.

* ``.txt``: UTF-8 prose, tokenized and packed into fixed windows (loss on every token).
* ``.jsonl`` / ``.json``: rows with ``instruction`` / ``input`` / ``output`` (Alpaca format),
  rendered with the tokenizer's chat template (or the Alpaca prompt), loss on the response only.
* anything else with ``--online``: a Hugging Face dataset name (``text`` column, or Alpaca columns).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from compressor.core.errors import NaspruneError

IGNORE = -100
PACKAGE_DATA = (
    Path(__file__).resolve().parents[1] / "data"
)  # public-domain texts shipped with the package (builtin:NAME)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{inp_note}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{inp}### Response:\n"
)


@dataclass
class TokenizedData:
    """Fixed-length examples. ``labels`` is -100 where no loss is taken (prompt, padding)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    kind: str
    source: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def supervised_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def subset(self, index) -> TokenizedData:
        return TokenizedData(
            self.input_ids[index], self.labels[index], self.attention_mask[index], self.kind, self.source
        )


def read_source(data: str, online: bool = False) -> tuple[str, object]:
    """('text', str) or ('instruct', list of dicts)."""
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix in (".jsonl", ".json"):
            return "instruct", _read_instructions(path)
        try:
            return "text", path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise NaspruneError(f"{path} is not UTF-8 text; give a .txt file or an Alpaca .jsonl") from None
    if not online:
        raise NaspruneError(
            f"data '{data}' is not a file; give a .txt or Alpaca .jsonl, or a hub dataset name with --online"
        )
    return _read_hub_dataset(data)


def _read_instructions(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        rows = (
            json.loads(text)
            if path.suffix == ".json"
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as e:
        raise NaspruneError(f"{path} is not valid JSON lines (line {e.lineno}: {e.msg})") from None
    if not rows or not all(isinstance(r, dict) and "instruction" in r and "output" in r for r in rows):
        raise NaspruneError(f"{path}: every row needs 'instruction' and 'output' (Alpaca format; 'input' optional)")
    return rows


def _read_hub_dataset(name: str) -> tuple[str, object]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001
        raise NaspruneError(
            f"cannot load dataset '{name}' from the hub ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from None
    if "instruction" in ds.column_names and "output" in ds.column_names:
        return "instruct", [dict(r) for r in ds]
    if "text" in ds.column_names:
        return "text", "\n\n".join(ds["text"])
    raise NaspruneError(f"dataset '{name}' has neither a 'text' column nor Alpaca columns ({ds.column_names})")


def pack_text(tokenizer, text: str, seq_len: int, max_tokens: int | None = None, source: str = "") -> TokenizedData:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise NaspruneError(f"{source or 'text'} has {len(ids)} tokens, fewer than one window of {seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len)
    return TokenizedData(windows, windows.clone(), torch.ones_like(windows), "text", source)


def calibration_text(data: str, online: bool) -> str:
    """The text of ``data`` (a path, ``builtin:NAME``, or a hub dataset with ``online``): plain text as
    it is, Alpaca rows as their instruction, input and output lines, one row a paragraph."""
    kind, content = read_source(resolve_data(data), online)
    if kind != "text":
        content = "\n\n".join(
            "\n".join(str(r.get(k, "")) for k in ("instruction", "input", "output") if r.get(k)) for r in content
        )
    return content


def calibration_windows(tokenizer, data: str, seq_len: int, tokens: int, online: bool = False) -> torch.Tensor:
    """Full windows ``[N, seq_len]`` of the first ``tokens`` tokens of :func:`calibration_text` (the tail
    that fills no window is dropped): the one definition of calibration tokens. Closed-form repair
    (``RepairConfig.tokens`` / ``seq_len``) and static quantization (16 x 128) each choose their sizes."""
    return pack_text(tokenizer, calibration_text(data, online), seq_len, tokens, source="held-out text").input_ids


def render_instruction(tokenizer, row: dict, prompt_format: str) -> tuple[str, str]:
    """(prompt, response) strings for one Alpaca row."""
    instruction, inp, output = row["instruction"], row.get("input") or "", row["output"]
    if prompt_format == "chat":
        content = instruction + (f"\n\n{inp}" if inp else "")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return prompt, output + (tokenizer.eos_token or "")
    prompt = ALPACA_PROMPT.format(
        inp_note=", paired with an input that provides further context" if inp else "",
        instruction=instruction,
        inp=f"### Input:\n{inp}\n\n" if inp else "",
    )
    return prompt, output + (tokenizer.eos_token or "")


def tokenize_instructions(
    tokenizer,
    rows: list[dict],
    seq_len: int,
    prompt_format: str = "auto",
    max_examples: int | None = None,
    source: str = "",
) -> TokenizedData:
    """Right-padded examples; loss only on the response (prompt and padding labels are -100)."""
    if prompt_format == "auto":
        prompt_format = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids_out, labels_out, mask_out = [], [], []
    for row in rows[:max_examples] if max_examples else rows:
        prompt, response = render_instruction(tokenizer, row, prompt_format)
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        r = tokenizer(response, add_special_tokens=False).input_ids
        if len(p) >= seq_len - 8:
            continue  # prompt alone fills the window: nothing to learn from
        ids = (p + r)[:seq_len]
        labels = ([IGNORE] * len(p) + r)[:seq_len]
        n = len(ids)
        ids_out.append(ids + [pad] * (seq_len - n))
        labels_out.append(labels + [IGNORE] * (seq_len - n))
        mask_out.append([1] * n + [0] * (seq_len - n))
    if not ids_out:
        raise NaspruneError(f"no instruction example of {source} fits in {seq_len} tokens; raise --seq-len")
    return TokenizedData(torch.tensor(ids_out), torch.tensor(labels_out), torch.tensor(mask_out), "instruct", source)


def load_data(
    tokenizer, data: str, seq_len: int, max_tokens: int | None = None, online: bool = False, prompt_format: str = "auto"
) -> TokenizedData:
    if tokenizer is None:
        raise NaspruneError("this model has no tokenizer; save one next to the checkpoint (tokenizer.json)")
    kind, content = read_source(data, online)
    if kind == "text":
        return pack_text(tokenizer, content, seq_len, max_tokens, source=str(data))
    max_examples = max(1, max_tokens // seq_len) * 4 if max_tokens else None
    out = tokenize_instructions(tokenizer, content, seq_len, prompt_format, max_examples, source=str(data))
    if max_tokens:  # keep whole examples until the token budget is met
        keep = int((out.attention_mask.sum(1).cumsum(0) <= max_tokens).sum().clamp(min=1))
        out = out.subset(slice(0, keep))
    return out


def resolve_data(ref: str) -> str:
    """``builtin:NAME`` -> the path of a public-domain text shipped in ``compressor/data/``; other refs unchanged."""
    if ref.startswith("builtin:"):
        path = PACKAGE_DATA / f"{ref.split(':', 1)[1]}.txt"
        if not path.is_file():
            known = sorted(p.stem for p in PACKAGE_DATA.glob("*.txt"))
            raise NaspruneError(f"no built-in text '{ref}'; built-in texts: {', '.join('builtin:' + k for k in known)}")
        return str(path)
    return ref


def _role_text(ref: str) -> str | None:
    """The text of a local data ref (plain text, or the rendered fields of a .jsonl); None for hub datasets."""
    path = Path(resolve_data(ref)).expanduser()
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    if path.suffix == ".jsonl":
        parts = []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                parts.extend(str(v) for v in row.values() if isinstance(v, str))
        text = "\n".join(parts)
    return " ".join(text.split())


def _shares_text(a: str, b: str, probes: int = 8, length: int = 200) -> bool:
    """True when ``b`` contains passages of ``a`` (probes spread over ``a``): catches an excerpt of
    the training text used as test text, not only the same file twice."""
    if len(a) < length or len(b) < length:
        return a == b and bool(a)
    step = max(1, (len(a) - length) // probes)
    return any(a[i : i + length] in b for i in range(0, len(a) - length + 1, step)[:probes])


def check_data_roles(calibration: str, train: str, validation: str, test: str) -> None:
    """Refuse (one line) a configuration whose validation or test data overlaps another role.

    Calibration and training may share data (both shape the weights); validation must not overlap
    them, and test must overlap nothing. Local files are compared by content (passages), so a test
    excerpt of a training novel is caught too; hub datasets are compared by name."""
    roles = {"calibration": calibration, "train": train, "validation": validation, "test": test}
    pairs = [
        ("validation", "calibration"),
        ("validation", "train"),
        ("test", "calibration"),
        ("test", "train"),
        ("test", "validation"),
    ]
    texts: dict[str, str | None] = {}
    for role, ref in roles.items():
        texts[role] = _role_text(ref)
    for held, other in pairs:
        a, b = roles[held], roles[other]
        same_ref = resolve_data(a) == resolve_data(b)
        ta, tb = texts[held], texts[other]
        if same_ref or (ta and tb and (_shares_text(ta, tb) or _shares_text(tb, ta))):
            raise NaspruneError(
                f"data roles overlap: {held} ({a}) shares text with {other} ({b}); {held} data must be "
                "text no other stage reads — choose a separate file"
            )
