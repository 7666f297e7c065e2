"""The Profiler inside a Hugging Face Trainer, as users embed it (README, "The same in a training loop"): the
training step wrapped in ``profiler.batch``, with bf16 autocast, gradient accumulation and gradient checkpointing,
dynamic padding by the collator; then slicing and physical restructure of the trained model, whose forward the
Trainer leaves wrapped in bf16 autocast (accelerate's mixed precision)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import neuslice
from neuslice.engine.capture import call_model

import hf_models as H

pytestmark = pytest.mark.usefixtures("one_thread")


class _Rows(torch.utils.data.Dataset):
    """Token sequences of lengths 4-12 (dynamic padding by the collator), a label each."""

    def __init__(self, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for i in range(n):
            ids = torch.randint(3, H.VOCAB, (int(torch.randint(4, 13, (1,), generator=g)),), generator=g)
            self.rows.append({"input_ids": ids.tolist(), "labels": i % H.CLASSES})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _collate(rows):
    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        am[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": am, "labels": torch.tensor([r["labels"] for r in rows])}


def test_profiler_in_a_trainer_with_bf16_accumulation_and_checkpointing_then_physical_restructure(tmp_path):
    model, batch = H.bert()
    prof = neuslice.Profiler(model, H.CLASSES, metrics=("avg", "var", "taylor"))
    steps = []

    class ProfTrainer(transformers.Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            steps.append(int(inputs["attention_mask"].sum()))
            with prof.batch(inputs["labels"]):
                return super().training_step(model, inputs, num_items_in_batch)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2, num_train_epochs=1,
        learning_rate=1e-3, use_cpu=True, bf16=True, activation_checkpointing=True, report_to=[],
        save_strategy="no", logging_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True)
    data = _Rows()
    ProfTrainer(model=model, args=args, train_dataset=data, data_collator=_collate).train()
    assert len(steps) == len(data) // 8 and model.is_activation_checkpointing
    assert getattr(model, "_original_forward", None) is not None        # the forward left wrapped in autocast
    p = prof.profile()
    assert p.num_batches == len(steps) and float(p.counts.sum()) == len(data)
    assert p.layer_names == neuslice.profile(model, [(batch(2, 5), torch.arange(2))], H.CLASSES,
                                             progress=False).layer_names
    assert all(torch.isfinite(s).all() and s.abs().sum() > 0 for st in p.stats.values() for s in st.values())
    model.eval()
    x = batch(6, 7, pad=2)
    names = neuslice.removable_layers(model, x)
    s = neuslice.semantic_slice(neuslice.profile(model, [(x, torch.arange(6) % H.CLASSES)], H.CLASSES,
                                                 layers=names, progress=False), "taylor", 0.5)
    phys, rep = neuslice.restructure(model, s, [0, 2], example_inputs=x)
    masked, _ = neuslice.restructure(model, s, [0, 2], mode="mask")
    with torch.no_grad():
        ym, yp = call_model(masked, x).float(), call_model(phys, x).float()
    assert (yp - ym).abs().max() <= 8 * torch.finfo(torch.bfloat16).eps * ym.abs().max()
    assert rep.params < rep.original_params
