"""A saved fast tokenizer run on the `tokenizers` library directly, without importing transformers.

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

A tokenizer folder gets this backend only where the export proved it equal to transformers on that
folder (`check`, written to CHECK_FILE beside the tokenizer files); any other folder loads through
transformers as before.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

CHECK_FILE = "tokenizers_check.json"  # in the tokenizer folder: the export's proof (below)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(token) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


class TokenizersBackend:
    """`directory`: a fast tokenizer saved by transformers' `save_pretrained` (tokenizer.json,
    special_tokens_map.json). Raises OSError/ValueError when tokenizer.json cannot be read."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self._tokenizer.no_truncation()  # transformers sets both per call; without arguments: none
        self._tokenizer.no_padding()
        mapping = directory / "special_tokens_map.json"
        saved = json.loads(mapping.read_text()) if mapping.is_file() else {}
        self.special_tokens_map = {k: _content(saved[k]) for k in SPECIAL_TOKENS if saved.get(k) is not None}
        if saved.get("additional_special_tokens"):
            self.special_tokens_map["additional_special_tokens"] = [_content(t) for t in saved["additional_special_tokens"]]
        unk = self.special_tokens_map.get("unk_token")
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
        if tokenize:
            raise ValueError("TokenizersBackend renders templates to text only (tokenize=False)")
        return _compiled(chat_template).render(messages=conversation, tools=None, documents=None,
                                               add_generation_prompt=add_generation_prompt, **self.special_tokens_map)


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


def check(directory: Path, hf, texts: list[str], conversations: list[list[dict]], chat_template: str | None) -> dict:
    """Whether TokenizersBackend on `directory` equals `hf` (the transformers tokenizer saved there)
    on every call the runtime makes: `texts` encoded with and without special tokens, with control
    strings split or not, decoded back (special tokens skipped); the vocabulary size, added tokens
    and unk id; `conversations` rendered with `chat_template` (None: no template to check).
    -> {"passed": bool, "texts": n, "mismatches": [what differed, first 5]}."""
    mismatches = []
    try:
        backend = TokenizersBackend(directory)
    except Exception as exc:  # noqa: BLE001 (any failure to load means: keep transformers)
        return {"passed": False, "texts": 0, "mismatches": [f"cannot load: {str(exc).splitlines()[0][:200]}"]}
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
    return {"passed": not mismatches, "texts": len(texts), "mismatches": mismatches[:5]}
