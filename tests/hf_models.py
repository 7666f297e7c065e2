"""Tiny Hugging Face transformers built offline from their configs (random weights), shared by the
transformer tests: a BERT-like encoder, a GPT-2-like, a Llama-like (grouped-query attention) and a Phi-like
(partial rotary) decoder, and a ViT. ``transformers`` is a test dependency only; a test module using these calls
``pytest.importorskip("transformers")`` first.

Each builder returns ``(model, batch)``: the model in eval mode (dropout off), and a function
``batch(b, t, pad=0, seed=0)`` giving model inputs for ``b`` samples (a dict for the text models, with
``attention_mask`` when ``pad`` > 0: the last ``pad`` positions of every other sample are padding).
"""
from __future__ import annotations

import torch

VOCAB = 96
HIDDEN = 32
HEADS = 4
FFN = 48
LAYERS = 2
CLASSES = 3


def _text_batch(pad_side: str = "right"):
    def batch(b: int, t: int, pad: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        if pad:
            for i in range(0, b, 2):
                if pad_side == "right":
                    mask[i, t - pad:] = 0
                else:
                    mask[i, :pad] = 0
            ids = ids.masked_fill(mask == 0, 0)
        return {"input_ids": ids, "attention_mask": mask}
    return batch


def _eval(model):
    torch.manual_seed(0)
    model.eval()
    return model


def bert(num_labels: int = CLASSES, token: bool = False):
    """BERT-like encoder: BertForSequenceClassification (or ...ForTokenClassification)."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=FFN, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cls = tf.BertForTokenClassification if token else tf.BertForSequenceClassification
    return _eval(cls(cfg)), _text_batch("right")


def gpt2(num_labels: int = CLASSES):
    """GPT-2-like decoder: GPT2ForSequenceClassification (fused qkv ``c_attn``, HF ``Conv1D`` layers)."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=64,
                        num_labels=num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _eval(tf.GPT2ForSequenceClassification(cfg)), _text_batch("right")


def llama(num_labels: int = CLASSES):
    """Llama-like decoder with grouped-query attention (4 query heads, 2 key/value heads), SwiGLU MLP."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=2, intermediate_size=FFN, max_position_embeddings=64,
                         num_labels=num_labels, pad_token_id=0)
    return _eval(tf.LlamaForSequenceClassification(cfg)), _text_batch("right")


def phi(num_labels: int = CLASSES):
    """Phi-like decoder: partial rotary embeddings, ``fc1``/``fc2`` MLP, ``dense`` out projection. Its
    ``rotary_ndims`` (head_dim × 0.5 = 4) equals the head count, as in Phi-2 (32 heads, head_dim 80 × 0.4):
    an attribute that must not change when heads are removed."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.PhiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       intermediate_size=FFN, max_position_embeddings=64, num_labels=num_labels, pad_token_id=0,
                       partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    return _eval(tf.PhiForSequenceClassification(cfg)), _text_batch("right")


def vit(num_labels: int = CLASSES):
    """ViT: ViTForImageClassification on 16×16 RGB images, 4×4 patches (16 tokens + CLS)."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, intermediate_size=FFN, num_labels=num_labels,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def batch(b: int, t: int = 0, pad: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(b, 3, 16, 16, generator=g)
    return _eval(tf.ViTForImageClassification(cfg)), batch


ARCHITECTURES = {"bert": bert, "gpt2": gpt2, "llama": llama, "phi": phi, "vit": vit}
