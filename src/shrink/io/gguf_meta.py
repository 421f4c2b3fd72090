"""GGUF metadata for an exported model: the architecture from the Hugging Face config, and the tokenizer
either copied from the GGUF file the model came from or built from its Hugging Face tokenizer."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..core.errors import ShrinkError

# llama.cpp's converter names a byte-level BPE tokenizer's pre-tokenizer (how text is split before merges) by
# the SHA-256 of str(tokenizer.encode(CHECK_TEXT)); llama.cpp then splits text by that name's rules. The text
# is the converter's own, so that the same tokenizer gives the same hash here.
CHECK_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
# hashes shrink identifies by itself, each checked against a GGUF file llama.cpp's converter wrote (tests)
KNOWN_PRE = {"855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm"}  # SmolLM, SmolLM2

_COPIED = ("general.", "tokenizer.")
_NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or {}
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _check_rope(config) -> None:
    params = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in (None, "default"):
        raise ShrinkError(f"rope scaling {kind!r} in config.json is not exported to GGUF yet")


def add_architecture(writer, config) -> None:
    """The `<arch>.*` keys llama.cpp and transformers read, from the Hugging Face config."""
    _check_rope(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:  # a mixture of experts (as llama.cpp's converter writes them)
        writer.add_expert_count(int(experts))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
        if getattr(config, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        if getattr(config, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))


def copy_tokenizer(writer, src: Path, config) -> str | None:
    """Copy the source file's `general.*` and `tokenizer.*` keys (name, licence, vocabulary, merges, special
    tokens, chat template). Returns why not (and copies nothing) when its vocabulary does not fit."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        return "it has no tokenizer"
    if len(tokens.data) != config.vocab_size:
        return f"its vocabulary has {len(tokens.data)} tokens, the model {config.vocab_size}"
    for f in reader.fields.values():
        if not f.name.startswith(_COPIED) or f.name in _NOT_COPIED:
            continue
        main = f.types[0]
        sub = f.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), main, sub_type=sub)
    return None


def pre_tokenizer_hash(tokenizer) -> str:
    """The hash llama.cpp's converter names `tokenizer`'s pre-tokenizer by (see CHECK_TEXT)."""
    import hashlib

    return hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def _converter_table() -> dict[str, str]:
    """{hash: pre-tokenizer name} from llama.cpp's converter where one is on this machine
    ($SHRINK_LLAMA_CPP_DIR, or ~/.cache/llama.cpp-*, as scripts/setup.sh --llama-cpp and the benchmarks
    build it): read as data, never run."""
    import re

    from ..core.switches import llama_cpp_dirs

    table = {}
    for d in llama_cpp_dirs():
        for f in (d / "conversion" / "base.py", d / "convert_hf_to_gguf.py"):
            try:
                text = f.read_text(encoding="utf-8")
            except OSError:
                continue
            table.update(re.findall(r'chkhsh == "([0-9a-f]{64})":\s*(?:#[^\n]*\n\s*)*res = "([^"]+)"', text))
    return table


def pre_tokenizer_name(tokenizer) -> tuple[str | None, str]:
    """(the name llama.cpp's converter gives `tokenizer`'s pre-tokenizer, or None when neither shrink nor a
    converter on this machine knows it; the hash it was identified by)."""
    h = pre_tokenizer_hash(tokenizer)
    return KNOWN_PRE.get(h) or _converter_table().get(h), h


def build_tokenizer(writer, tokenizer, config) -> str:
    """The `tokenizer.*` keys from a Hugging Face fast tokenizer with a byte-level BPE model (GPT-2 style,
    as Llama 3, SmolLM and Qwen2 use): tokens by id, their types, merges, special tokens and the chat
    template (read by gguf-py's SpecialVocab from the saved tokenizer), and the pre-tokenizer named as
    llama.cpp's converter names it (pre_tokenizer_name; "default" when unknown). Returns what was said
    about the pre-tokenizer."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ShrinkError("the model's tokenizer is not a fast (tokenizer.json) tokenizer; GGUF export builds the "
                          "vocabulary from tokenizer.json, or copies it from a source GGUF file")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ShrinkError(f"the model's tokenizer is {model.get('type')!r}; GGUF export builds byte-level BPE "
                          "vocabularies only, or copies one from a source GGUF file")
    vocab = {**model.get("vocab", {}), **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    by_id = {i: t for t, i in vocab.items()}
    if max(by_id, default=-1) >= config.vocab_size:
        raise ShrinkError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's vocabulary of "
                          f"{config.vocab_size}")
    added = {t["content"]: t.get("special", False) for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(config.vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added.get(tok) else
                         gguf.TokenType.USER_DEFINED if tok in added else gguf.TokenType.NORMAL)
    pre, h = pre_tokenizer_name(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=config.vocab_size).add_to_gguf(writer, quiet=True)
    # said outright, as the converter says them: llama.cpp's defaults differ by pre-tokenizer
    written = {k for kv in writer.kv_data for k in kv}
    if gguf.Keys.Tokenizer.ADD_BOS not in written:
        probe, bos = tokenizer.encode("a"), tokenizer.bos_token_id
        writer.add_add_bos_token(bos is not None and bool(probe) and probe[0] == bos)
    if gguf.Keys.Tokenizer.ADD_PREFIX not in written:
        writer.add_add_space_prefix(False)  # byte-level BPE marks spaces itself
    if pre:
        return f"pre-tokenizer {pre!r}, identified as llama.cpp's converter identifies it"
    import warnings

    warnings.warn(f"the tokenizer's pre-tokenizer is not one shrink or a llama.cpp converter here can name (hash "
                  f"{h[:12]}...): written as 'default', so llama.cpp may split text into other tokens than the "
                  "tokenizer does; export from the GGUF file the model came from, or check the file with "
                  "shrink compare ORIGINAL OUT.gguf --runtime llama.cpp", stacklevel=4)
    return f"pre-tokenizer not identified (hash {h[:12]}...): written as 'default'"


def write_metadata(writer, config, tokenizer, src: Path | None) -> tuple[str, list[str]]:
    """Architecture keys from `config`; name and tokenizer from `src` (a GGUF file) when its vocabulary
    fits, else built from `tokenizer`. Returns where the tokenizer came from, and notes."""
    notes = []
    add_architecture(writer, config)
    if src is not None:
        why = copy_tokenizer(writer, src, config)
        if why is None:
            return f"tokenizer and names copied from {src}", notes
        notes.append(f"tokenizer not copied from {src}: {why}")
    if tokenizer is None:
        raise ShrinkError("the model has no tokenizer to write into the GGUF file (llama.cpp needs one); load it "
                          "from a folder with its tokenizer, or give source_gguf=")
    said = build_tokenizer(writer, tokenizer, config)
    writer.add_name(getattr(config, "_name_or_path", None) or type(config).__name__.replace("Config", ""))
    notes.append(f"tokenizer built from the Hugging Face tokenizer ({said})")
    return "tokenizer built from the Hugging Face tokenizer", notes
