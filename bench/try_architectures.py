"""neuslice used as a user would on model-library architectures the test suite does not build (Phi: in another
configuration; Swin, Swin-V2, BEiT, RegNet, MobileNetV2, PoolFormer and MobileViT have tests of their own since, in
other configurations).

Each architecture is built offline from a tiny config (random weights, ``transformers`` installed) and run
through the public API: ``removable_layers``, ``profile`` (ens: every statistic, padded batches), a semantic
slice (taylor, Θ = 0.7) serving two classes, ``restructure`` in mask and physical mode (outputs compared,
parameters removed against ``compression_rate``) and a ``Profiler`` around three AdamW steps. A failure is
reported with its message, not hidden. Run:

    python bench/try_architectures.py [NAME ...]      # table to stdout and bench/results/try_architectures.md
    python bench/try_architectures.py --device cuda    # the same on a GPU: bench/results/try_architectures_cuda.md
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

import neuslice
from neuslice.engine.calls import logits_of, to_device

K = 3
# Known not to work yet, reported but not counted as a failure of this script (none at present).
EXPECTED_FAIL: set = set()


def _text(seed: int, pad_left: bool = False, per_token: bool = False, k: int = K, b: int = 6, t: int = 12):
    """Token ids 5..99 with lengths in [t/2, t], padded right (or left); labels per sample or per token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (b, t), generator=g)
    lens = torch.randint(t // 2, t + 1, (b,), generator=g)
    lens[0] = t
    ar = torch.arange(t)
    am = ((ar[None] >= (t - lens)[:, None]) if pad_left else (ar[None] < lens[:, None])).long()
    x = {"input_ids": ids * am + (1 - am), "attention_mask": am}
    if per_token:
        y = torch.randint(0, k, (b, t), generator=g)
        y[am == 0] = -100
        return x, y
    return x, torch.randint(0, k, (b,), generator=g)


def _image(seed: int, b: int = 6):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(b, 3, 32, 32, generator=g)}, torch.randint(0, K, (b,), generator=g)


def _archs() -> Dict[str, Tuple[Callable[[], torch.nn.Module], Callable[[int], tuple], int]]:
    """name -> (model builder, batch(seed), number of classes)."""
    import transformers as tf
    text = dict(vocab_size=100, num_labels=K)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    drop = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    dec = dict(small, num_key_value_heads=2, pad_token_id=1, max_position_embeddings=64)
    vis = dict(image_size=32, num_channels=3, num_labels=K)
    return {
        "distilbert": (lambda: tf.DistilBertForSequenceClassification(tf.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=48, dropout=0.0, attention_dropout=0.0, **text)), _text, K),
        "roberta": (lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(
            max_position_embeddings=64, **small, **drop, **text)), _text, K),
        "albert (shared layers)": (lambda: tf.AlbertForSequenceClassification(tf.AlbertConfig(
            embedding_size=16, classifier_dropout_prob=0.0, **small, **drop, **text)), _text, K),
        "electra": (lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(
            embedding_size=16, **small, **drop, **text)), _text, K),
        "deberta-v2": (lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
            max_position_embeddings=64, **small, **drop, **text)), _text, K),
        "qwen2 (left-padded)": (lambda: tf.Qwen2ForSequenceClassification(tf.Qwen2Config(**dec, **text)),
                                lambda s: _text(s, pad_left=True), K),
        "mistral": (lambda: tf.MistralForSequenceClassification(tf.MistralConfig(**dec, **text)), _text, K),
        "phi (partial rotary)": (lambda: tf.PhiForSequenceClassification(tf.PhiConfig(
            pad_token_id=1, max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
            **small, **text)), _text, K),
        "distilbert tokens (-100)": (lambda: tf.DistilBertForTokenClassification(tf.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=48, dropout=0.0, attention_dropout=0.0, **text)),
            lambda s: _text(s, per_token=True), K),
        "qwen2 causal LM (K = vocab)": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
            vocab_size=100, tie_word_embeddings=False, **dec)), lambda s: _text(s, per_token=True, k=100), 100),
        "deit": (lambda: tf.DeiTForImageClassification(tf.DeiTConfig(patch_size=4, **small, **drop, **vis)),
                 _image, K),
        "convnext": (lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
            hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, drop_path_rate=0.0, **vis)), _image, K),
        "swin (windowed attention)": (lambda: tf.SwinForImageClassification(tf.SwinConfig(
            patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4, drop_path_rate=0.0,
            **drop, **vis)), _image, K),
        "beit (layer scale, relative position bias)": (lambda: tf.BeitForImageClassification(tf.BeitConfig(
            patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            use_relative_position_bias=True, **vis)), _image, K),
        "dinov2": (lambda: tf.Dinov2ForImageClassification(tf.Dinov2Config(
            patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, **vis)),
            _image, K),
        "levit": (lambda: tf.LevitForImageClassification(tf.LevitConfig(
            hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8], **vis)),
            _image, K),
        "resnet (bottleneck)": (lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck", **vis)), _image, K),
        "regnet (grouped convolutions)": (lambda: tf.RegNetForImageClassification(tf.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, **vis)), _image, K),
        "mobilenet-v2 (same padding, depthwise)": (lambda: tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config(
            depth_multiplier=0.25, **vis)), _image, K),
        "efficientnet (squeeze-excitation)": (lambda: tf.EfficientNetForImageClassification(tf.EfficientNetConfig(
            width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320, **vis)), _image, K),
        "poolformer": (lambda: tf.PoolFormerForImageClassification(tf.PoolFormerConfig(
            hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_channels=3, num_labels=K)), _image, K),
        "swinv2 (position-bias MLP)": (lambda: tf.Swinv2ForImageClassification(tf.Swinv2Config(
            patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=4, drop_path_rate=0.0,
            **drop, **vis)), _image, K),
        "mobilevit (unfolded patches)": (lambda: tf.MobileViTForImageClassification(tf.MobileViTConfig(
            hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], **vis)), _image, K),
    }


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return "the CPU"


def _logits(model, x):
    return logits_of(model(**x))


def try_one(build, batch, k: int, device: str = "cpu") -> Dict[str, object]:
    torch.manual_seed(0)
    model = build().eval().to(device)
    data = [to_device(batch(s), device) for s in range(3)]
    x = data[0][0]
    row: Dict[str, object] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = neuslice.removable_layers(model, x)
        row["removable"] = len(names)
        prof = neuslice.profile(model, data, k, layers=names, metrics=("ens",), progress=False)
    row["warnings"] = len(caught)
    present = [c for c in range(k) if float(prof.counts[c]) > 0]
    s = neuslice.semantic_slice(prof, "taylor", 0.7, classes=present)
    keep = present[:2]
    masked, _ = neuslice.restructure(model, s, keep, mode="mask")
    phys, rep = neuslice.restructure(model, s, keep, example_inputs=x)
    with torch.no_grad():
        a, b = phys(**data[1][0]), masked(**data[1][0])
    scale = b.abs().max()               # (a model library may zero-initialise its classifier: then absolute)
    row["phys vs mask (rel)"] = f"{((a - b).abs().max() / (scale if scale > 0 else 1)).item():.1e}"
    total = sum(p.numel() for p in model.parameters())
    row["params removed"] = f"{(total - rep.params) / total:.4f}"
    row["compression_rate"] = f"{s.compression_rate(model, keep):.4f}"
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    profiler = neuslice.Profiler(model, num_classes=k, metrics=("taylor", "avg"))
    for xb, yb in data:
        opt.zero_grad()
        with profiler.batch(yb, mask=xb["attention_mask"].bool() if "attention_mask" in xb else None):
            out = _logits(model, xb)
            F.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1), ignore_index=-100).backward()
        opt.step()
    row["Profiler layers"] = len(profiler.profile().layers)
    return row


def main(argv: List[str]) -> int:
    device = "cpu"
    if "--device" in argv:
        i = argv.index("--device")
        device, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    archs = _archs()
    which = argv or list(archs)
    cols = ["removable", "warnings", "phys vs mask (rel)", "params removed", "compression_rate", "Profiler layers"]
    lines = ["| architecture | " + " | ".join(cols) + " | result |", "|" + "---|" * (len(cols) + 2)]
    failed = 0
    for name in which:
        build, batch, k = archs[name]
        t0 = time.perf_counter()
        try:
            row, result = try_one(build, batch, k, device), "ok"
        except Exception as e:  # noqa: BLE001  (reported, never hidden)
            row, result = {}, f"{type(e).__name__}: {str(e)[:300]}"
            failed += name not in EXPECTED_FAIL
            result += " (known: not supported yet)" if name in EXPECTED_FAIL else ""
        lines.append(f"| {name} | " + " | ".join(str(row.get(c, "")) for c in cols)
                     + f" | {result} ({time.perf_counter() - t0:.1f} s) |")
        print(lines[-1], flush=True)
        if result == "ok" and name in EXPECTED_FAIL:
            print(f"  {name} works now: take it out of EXPECTED_FAIL")
    out = os.path.join(os.environ.get("NEUSLICE_RESULTS", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                         "results")),
                       "try_architectures.md" if device == "cpu" else f"try_architectures_{device}.md")
    if not argv:
        import transformers
        with open(out, "w") as f:
            f.write(f"# neuslice on architectures the tests do not build ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
                    f"`python bench/try_architectures.py{'' if device == 'cpu' else ' --device ' + device}` "
                    f"(on {_device_name(device)}; torch {torch.__version__}, transformers "
                    f"{transformers.__version__}); tiny configs, random weights, 3 batches of 6; 'params removed' "
                    "should equal 'compression_rate', 'phys vs mask' stay near 1e-7.\n\n" + "\n".join(lines) + "\n")
        print("wrote", out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
