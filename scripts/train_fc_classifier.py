"""Fine-tune the fact-checker that the ``fc`` experiment edits (the original's ``model.pt``).

    python -m scripts.train_fc_classifier                        # embedded MiniLM on the embedded claim set
    python -m scripts.train_fc_classifier --epochs 3 -- seed=1   # Hydra overrides after --, as for python -m run
    python -m scripts.train_fc_classifier -- +model=bert-base data.path=/data/fever model.pt=/ckpt/bert-fc.pt

The run's own config (``+experiment=fc``, ``+model=minilm`` unless another ``+model=`` is given, and the
overrides) picks the model, the data and the output path: the classifier (``models.BertClassifier``: the
whole encoder and its one-logit head) is trained with AdamW on the train claims, each epoch on a fresh seeded
choice among every claim and its rephrasings, with their true labels. It reports train and validation
accuracy and writes the state dict atomically to ``model.pt`` (for ``+model=minilm``:
``<cache_dir>/classifiers/minilm-l6-fc-seed<seed>.pt``), with the metrics next to it (``.json``).
``python -m run +alg=mend +experiment=fc +model=minilm`` with the same overrides then loads it.

Exit status: 0 done; 2 a clear error (model, data, config), logged as one line.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from config_schema import compose_config
from data_classes.fc import FCDataset
from errors import ConfigError, UserError
from models import get_model, get_tokenizer
from utils import atomic_torch_save, seed_everything, write_json

LOG = logging.getLogger("train_fc_classifier")


def compose(overrides: list[str]):
    extra = [] if any(o.startswith("+model=") for o in overrides) else ["+model=minilm"]
    return compose_config(["+experiment=fc", *extra, *overrides])


def _views(dataset, epoch: int, seed: int) -> tuple[list[str], list[int]]:
    """One text per claim for this epoch: the claim or one of its rephrasings (seeded), with its true label."""
    rng = np.random.default_rng([seed, 0xFC, epoch])
    texts = []
    for r in dataset.records:
        options = [r["input"], *r["rephrases"]]
        texts.append(options[int(rng.integers(len(options)))])
    return texts, list(dataset.gold)


def accuracy(model, tokenizer, texts, labels, batch_size: int, max_length: int) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[s : s + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).reshape(-1)
            y = torch.tensor(labels[s : s + batch_size])
            correct += int(((logits > 0).long() == y).sum())
    return correct / max(1, len(texts))


def train(cfg, epochs: int, lr: float, batch_size: int, weight_decay: float) -> dict:
    if cfg.model.kind != "classifier":
        raise ConfigError(f"model {cfg.model.name!r} is of kind {cfg.model.kind}; the fact-checker needs a classifier.")
    out = cfg.model.pt
    if not out:
        raise ConfigError("model.pt is null: set model.pt=<path> to say where the fine-tuned classifier goes.")
    out = os.path.expanduser(str(out))
    cache_dir = os.path.expanduser(cfg.cache_dir)
    seed_everything(cfg.seed)
    model_cfg = OmegaConf.merge(cfg.model, {"pt": None})  # start from the pre-trained encoder
    model = get_model(model_cfg, cache_dir)
    tokenizer = get_tokenizer(cfg.model, cache_dir)
    train_set, val_set = (
        FCDataset(tokenizer, cfg.data, split, seed=cfg.seed, cache_dir=cache_dir, model=model)
        for split in ("train", "validation")
    )
    max_length = train_set.max_length
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_batches = math.ceil(len(train_set) / batch_size)
    total = epochs * n_batches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / max(1, total)))
    LOG.info(
        "Fine-tuning %s on %d train claims (%d validation): %d epochs of %d batches of %d, AdamW lr %g.",
        cfg.model.name,
        len(train_set),
        len(val_set),
        epochs,
        n_batches,
        batch_size,
        lr,
    )
    start = time.time()
    history = []
    for epoch in range(epochs):
        texts, labels = _views(train_set, epoch, cfg.seed)
        order = np.random.default_rng([cfg.seed, 0xFC, 1000 + epoch]).permutation(len(texts))
        model.train()
        losses = []
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            enc = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            y = torch.tensor([labels[i] for i in idx], dtype=torch.float32)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).reshape(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        val_acc = accuracy(model, tokenizer, val_set.claims, val_set.gold, 64, max_length)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_acc": val_acc})
        LOG.info(
            "epoch %d: train loss %.4f, validation accuracy %.3f (%.0f s)",
            epoch + 1,
            np.mean(losses),
            val_acc,
            time.time() - start,
        )

    rephrases = [val_set.rephrase(i) for i in range(len(val_set))]
    metrics = {
        "train_acc": accuracy(model, tokenizer, train_set.claims, train_set.gold, 64, max_length),
        "val_acc": accuracy(model, tokenizer, val_set.claims, val_set.gold, 64, max_length),
        "val_acc_rephrase": accuracy(model, tokenizer, rephrases, val_set.gold, 64, max_length),
        "val_positive_fraction": float(np.mean(val_set.gold)),
        "n_train": len(train_set),
        "n_validation": len(val_set),
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": int(cfg.seed),
        "model": cfg.model.name,
        "data": str(train_set.source.parent),
        "seconds": time.time() - start,
        "history": history,
    }
    model.eval()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(state, out)
    write_json(metrics, out + ".json")
    LOG.info(
        "Fact-checker accuracy: train %.3f, validation %.3f (rephrased claims %.3f; %.0f%% of validation claims "
        "are true). Saved to %s (%.0f s).",
        metrics["train_acc"],
        metrics["val_acc"],
        metrics["val_acc_rephrase"],
        100 * metrics["val_positive_fraction"],
        out,
        metrics["seconds"],
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m run (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        cfg = compose(args.overrides)
        train(cfg, args.epochs, args.lr, args.batch_size, args.weight_decay)
    except UserError as e:
        LOG.error("%s", e)
        return 2
    except Exception as e:  # omegaconf / hydra errors on bad overrides
        if type(e).__module__.startswith(("omegaconf", "hydra")):
            LOG.error("%s", " ".join(str(e).split()))
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
