"""Builders the tests share: tiny models from configs, a word-level tokenizer, random text."""

import torch


def widen(model):
    """The model in eval mode with its matrices redrawn at std 0.2: random init is tiny (std 0.02), and
    wider weights make quantization error visible and outputs differ."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def tiny_llama(seed: int = 0, tie: bool = True):
    """A 2-layer Llama built from a config: hidden 64, MLP 128, vocab 96."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return widen(LlamaForCausalLM(cfg))


class MLP(torch.nn.Module):
    """A plain PyTorch classifier: 64 -> 128 -> 128 -> 10."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 128)
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


WORDS = ("the a of to and in is was for on that with as by at from it be has are said year new market "
         "bank shares growth sales profit rise fall price company firm deal money tax oil rate economy "
         "government jobs trade china us uk chief analyst report quarter percent".split())


def tiny_tokenizer():
    """A word-level tokenizer over a few dozen words, ids below the tiny models' vocabulary of 96."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def word_text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g).tolist())
