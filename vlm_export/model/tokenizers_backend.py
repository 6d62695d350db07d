"""A saved tokenizer run without importing transformers: a fast tokenizer on the `tokenizers`
library, a LLaMA SentencePiece tokenizer on `sentencepiece`.

Importing transformers costs ~1-1.4 s of every `vlm-export run` on this machine (it scans its
800+ model modules before a tokenizer class is reachable), more than a one-token answer takes.
`TokenizersBackend` offers the part of transformers' `PreTrainedTokenizerFast` API that
`TextTokenizer` and prompt rendering call, doing what transformers 4.57 does for each call:

    __call__(text, add_special_tokens, split_special_tokens)   tokenization_utils_fast._batch_encode_plus:
                                                               no truncation or padding, `encode_special_tokens`
                                                               set from split_special_tokens, then encode
    decode(ids, skip_special_tokens, clean_up_...=False)       tokenization_utils_fast._decode
    __len__, added_tokens_decoder, unk_token_id                the tokenizer's vocabulary with added tokens
    apply_chat_template(..., tokenize=False)                   utils/chat_template_utils._compile_jinja_template
                                                               and render_jinja_template: the same sandboxed
                                                               Jinja environment, with special_tokens_map as
                                                               template variables

`SentencePieceBackend` does the same for transformers' slow `LlamaTokenizer` (legacy=True), the
tokenizer of MobileVLM checkpoints and of `tiny`.

A tokenizer folder gets one of these backends only where the export proved it equal to transformers
on that folder (`check`, written to CHECK_FILE beside the tokenizer files); any other folder loads
through transformers as before.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

CHECK_FILE = "tokenizers_check.json"  # in the tokenizer folder: the export's proof (below)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(token) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def _special_tokens(directory: Path, config: dict | None = None) -> tuple[dict[str, str], list[str]]:
    """A saved tokenizer's special tokens as transformers' `special_tokens_map` holds them: the named
    ones (`bos_token`, ...: special_tokens_map.json over tokenizer_config.json's) and the additional ones."""
    mapping = directory / "special_tokens_map.json"
    saved = {**{k: v for k, v in (config or {}).items() if k in SPECIAL_TOKENS or k == "additional_special_tokens"},
             **(json.loads(mapping.read_text()) if mapping.is_file() else {})}
    named = {k: _content(saved[k]) for k in SPECIAL_TOKENS if saved.get(k) is not None}
    return named, [_content(t) for t in saved.get("additional_special_tokens") or []]


def _template_variables(named: dict[str, str], additional: list[str]) -> dict:
    return {**named, **({"additional_special_tokens": additional} if additional else {})}


class TokenizersBackend:
    """`directory`: a fast tokenizer saved by transformers' `save_pretrained` (tokenizer.json,
    special_tokens_map.json). Raises OSError/ValueError when tokenizer.json cannot be read."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self._tokenizer.no_truncation()  # transformers sets both per call; without arguments: none
        self._tokenizer.no_padding()
        named, additional = _special_tokens(directory)
        self.special_tokens_map = _template_variables(named, additional)
        unk = named.get("unk_token")
        self.unk_token_id = self._tokenizer.token_to_id(unk) if unk is not None else None

    def __call__(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> dict:
        self._tokenizer.encode_special_tokens = split_special_tokens
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def added_tokens_decoder(self) -> dict:
        """id -> tokenizers.AddedToken (`.content`, `.special`), as transformers returns it."""
        return self._tokenizer.get_added_tokens_decoder()

    def decode(self, ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        if clean_up_tokenization_spaces:
            raise ValueError("TokenizersBackend decodes without transformers' space clean-up only")
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, conversation: list[dict], chat_template: str, add_generation_prompt: bool = False,
                            tokenize: bool = False) -> str:
        return _render(self, conversation, chat_template, add_generation_prompt, tokenize)


@dataclass(frozen=True)
class _AddedToken:
    content: str
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


class SentencePieceBackend:
    """A LLaMA SentencePiece tokenizer saved by transformers' slow `LlamaTokenizer` (tokenizer.model,
    tokenizer_config.json) with `legacy=True`, on the `sentencepiece` library: what transformers
    4.57's `PreTrainedTokenizer.tokenize` (added tokens split out with their strip rules, the rest
    `sp.encode`d chunk by chunk), `build_inputs_with_special_tokens`, `_decode` and
    `LlamaTokenizer.convert_tokens_to_string` do. Raises ValueError for other settings (legacy=False,
    lower-casing) and OSError when the files cannot be read."""

    def __init__(self, directory: Path):
        import sentencepiece as spm

        directory = Path(directory)
        config = json.loads((directory / "tokenizer_config.json").read_text())
        if config.get("legacy") is False or config.get("do_lower_case") or config.get("tokenizer_class") != "LlamaTokenizer":
            raise ValueError("only LLaMA SentencePiece tokenizers with legacy=True")
        self._sp = spm.SentencePieceProcessor(**(config.get("sp_model_kwargs") or {}))
        self._sp.Load(str(directory / "tokenizer.model"))
        self._add_bos, self._add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
        self._add_prefix_space = config.get("add_prefix_space", True)
        self.added_tokens_decoder = {int(i): _AddedToken(**{k: t[k] for k in ("content", "special", "lstrip", "rstrip", "single_word") if k in t})
                                     for i, t in config.get("added_tokens_decoder", {}).items()}
        self._added = {t.content: i for i, t in self.added_tokens_decoder.items()}
        named, additional = _special_tokens(directory, config)
        self.special_tokens_map = _template_variables(named, additional)
        self._all_special = [*named.values(), *additional]
        self._all_special_ids = {self._token_id(t) for t in self._all_special}
        self._legacy_added = (set(self._added) - set(self._all_special)) | {t for t in additional if self._token_id(t) >= self._sp.get_piece_size()}
        self.unk_token_id = self._token_id(named["unk_token"]) if "unk_token" in named else None
        pieces = {self._token(i) for i in range(self._sp.get_piece_size())}
        self._length = len(pieces | set(self._added))
        names = sorted(self._added, key=len, reverse=True)  # leftmost-longest, as transformers' Trie.split
        self._pattern = re.compile("|".join(map(re.escape, names))) if names else None

    def _token_id(self, token: str) -> int:
        return self._added[token] if token in self._added else self._sp.piece_to_id(token)

    def _token(self, index: int) -> str:
        return self.added_tokens_decoder[index].content if index in self.added_tokens_decoder else self._sp.id_to_piece(index)

    def _split(self, text: str, split_special_tokens: bool) -> list[str]:
        if split_special_tokens or self._pattern is None:
            return [text]
        pieces, start = [], 0
        for match in self._pattern.finditer(text):
            pieces += [text[start:match.start()], match.group()]
            start = match.end()
        pieces.append(text[start:])
        return pieces if start else [text]

    def _tokenize(self, text: str, split_special_tokens: bool) -> list[str]:
        chunks = self._split(text, split_special_tokens)
        no_split = set() if split_special_tokens else set(self._added)
        for i, chunk in enumerate(chunks):
            if chunk not in no_split:
                continue
            token = self.added_tokens_decoder[self._added[chunk]]
            left, right = (chunks[i - 1] if i > 0 else None), (chunks[i + 1] if i < len(chunks) - 1 else None)
            if token.rstrip and right:
                chunks[i + 1] = right.lstrip()
            if token.lstrip and left:
                chunks[i - 1] = left.rstrip()
            if token.single_word and left and left[-1] != " ":
                chunks[i - 1] += chunk
                chunks[i] = ""
            elif token.single_word and right and right[0] != " ":
                chunks[i] += right
                chunks[i + 1] = ""
        tokens = []
        for chunk in chunks:
            if chunk:
                tokens.extend([chunk] if chunk in no_split else self._sp.encode(chunk, out_type=str))
        return tokens

    def __call__(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> dict:
        ids = [self._token_id(t) for t in self._tokenize(text, split_special_tokens)]
        if add_special_tokens:
            bos, eos = self.special_tokens_map.get("bos_token"), self.special_tokens_map.get("eos_token")
            ids = ([self._token_id(bos)] if self._add_bos and bos else []) + ids + ([self._token_id(eos)] if self._add_eos and eos else [])
        return {"input_ids": ids}

    def __len__(self) -> int:
        return self._length

    def _tokens_to_string(self, tokens: list[str]) -> str:
        if tokens[0].startswith("\u2581") and self._add_prefix_space:
            tokens[0] = tokens[0][1:]
        current, out, previous_special = [], "", False
        for i, token in enumerate(tokens):
            if token in self._all_special:
                if not previous_special and i != 0:
                    out += " "
                out += self._sp.decode(current) + token
                previous_special, current = True, []
            else:
                if previous_special and i == 1 and self._add_prefix_space and not token.startswith("\u2581"):
                    out += " "
                current.append(token)
                previous_special = False
        return out + self._sp.decode(current)

    def decode(self, ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        if clean_up_tokenization_spaces:
            raise ValueError("SentencePieceBackend decodes without transformers' space clean-up only")
        tokens = [self._token(int(i)) for i in ids if not (skip_special_tokens and int(i) in self._all_special_ids)]
        texts, current = [], []
        for token in tokens:
            if skip_special_tokens and token in self._all_special:
                continue
            if token in self._legacy_added:
                if current and (text := self._tokens_to_string(current)):
                    texts.append(text)
                current = []
                texts.append(token)
            else:
                current.append(token)
        if current:
            texts.append(self._tokens_to_string(current))
        return " ".join(texts)  # _decode's default spaces_between_special_tokens=True

    def apply_chat_template(self, conversation: list[dict], chat_template: str, add_generation_prompt: bool = False,
                            tokenize: bool = False) -> str:
        return _render(self, conversation, chat_template, add_generation_prompt, tokenize)


BACKENDS = {"tokenizers": TokenizersBackend, "sentencepiece": SentencePieceBackend}


def _render(backend, conversation: list[dict], chat_template: str, add_generation_prompt: bool, tokenize: bool) -> str:
    if tokenize:
        raise ValueError("templates render to text only here (tokenize=False)")
    return _compiled(chat_template).render(messages=conversation, tools=None, documents=None,
                                           add_generation_prompt=add_generation_prompt, **backend.special_tokens_map)


@functools.lru_cache(maxsize=8)
def _compiled(chat_template: str):
    """transformers 4.57's Jinja environment for chat templates, less its `{% generation %}` tag
    (assistant-token masks, which rendering never asks for: a template using it fails to compile
    here, and the export's check then keeps that folder on transformers)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env.from_string(chat_template)


def backend_for(directory: Path) -> str:
    """The BACKENDS entry a saved tokenizer folder would use: its fast tokenizer.json, else its
    SentencePiece model."""
    return "tokenizers" if (Path(directory) / "tokenizer.json").is_file() else "sentencepiece"


def open_proven(directory: Path):
    """The backend the export proved on `directory` (CHECK_FILE). Raises ValueError when it proved none."""
    proof = json.loads((Path(directory) / CHECK_FILE).read_text())
    if proof.get("passed") is not True or proof.get("backend") not in BACKENDS:
        raise ValueError(f"{directory / CHECK_FILE} proves no backend")
    return BACKENDS[proof["backend"]](directory)


def proven(directory: Path) -> bool:
    """Whether the export proved a backend on `directory` (a CHECK_FILE that passed)."""
    proof = Path(directory) / CHECK_FILE
    return proof.is_file() and json.loads(proof.read_text()).get("passed") is True


def check(directory: Path, hf, texts: list[str], conversations: list[list[dict]], chat_template: str | None) -> dict:
    """Whether `backend_for(directory)` equals `hf` (the transformers tokenizer the runtime would
    load from that folder) on every call the runtime makes: `texts` encoded with and without
    special tokens, with control strings split or not, decoded back (special tokens skipped); the
    vocabulary size, added tokens and unk id; `conversations` rendered with `chat_template` (None:
    no template to check). -> {"backend", "passed": bool, "texts": n, "mismatches": [first 5]}."""
    mismatches, name = [], backend_for(directory)
    try:
        backend = BACKENDS[name](directory)
    except Exception as exc:  # noqa: BLE001 (any failure to load means: keep transformers)
        return {"backend": name, "passed": False, "texts": 0, "mismatches": [f"cannot load: {str(exc).splitlines()[0][:200]}"]}
    if len(backend) != len(hf) or backend.unk_token_id != hf.unk_token_id:
        mismatches.append(f"vocabulary {len(backend)} vs {len(hf)}, unk {backend.unk_token_id} vs {hf.unk_token_id}")
    ours = {i: (t.content, t.special) for i, t in backend.added_tokens_decoder.items()}
    if ours != {i: (t.content, t.special) for i, t in hf.added_tokens_decoder.items()}:
        mismatches.append("added tokens differ")
    for text in texts:
        for special in (True, False):
            for split in (False, True):
                got = backend(text, add_special_tokens=special, split_special_tokens=split)["input_ids"]
                expected = list(hf(text, add_special_tokens=special, split_special_tokens=split)["input_ids"])
                if got != expected:
                    mismatches.append(f"ids of {text[:40]!r} (special {special}, split {split})")
                elif backend.decode(got, skip_special_tokens=True) != hf.decode(
                        expected, skip_special_tokens=True, clean_up_tokenization_spaces=False):
                    mismatches.append(f"decoded {text[:40]!r}")
    if chat_template:
        for conversation in conversations:
            try:
                got = backend.apply_chat_template(conversation, chat_template, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 (a template this environment cannot render: keep transformers)
                got = f"error: {exc}"
            if got != hf.apply_chat_template(conversation, chat_template=chat_template, add_generation_prompt=True, tokenize=False):
                mismatches.append(f"chat template on {len(conversation)} message(s)")
    return {"backend": name, "passed": not mismatches, "texts": len(texts), "mismatches": mismatches[:5]}
