"""The peer side of bench/peers.py: torch-rechub's MMOE, PLE and ESMM trained on the project's examples.

Runs under the benchmark's own virtualenv (``.bench/peers-venv``, torch-rechub and its pinned torch),
never under the project's: it imports no ``mtl_core``. bench/peers.py writes the data and starts it:

    .bench/peers-venv/bin/python bench/peers_rechub.py --data peer.npz --out DIR [--epochs 2 --seed 0 ...]

The data (``--data``, an .npz written by bench/peers.py): per split (train, valid, holdout) the
impression rows' categorical codes (``<split>.cat.<name>``, the project's vocabulary indices), the
standardised numeric matrix (``<split>.numeric``), the text index (``<split>.text``: a row of
``text_matrix``, the whole-title sentence vectors, row 0 = no text) and two labels per row
(``<split>.labels``: clicked, clicked and bought); ``cat_names``/``cat_sizes``/``cat_side`` describe the
categorical features (``cat_side``: "user" or "item", for ESMM's two feature lists).

Every model gets the same inputs: one ``SparseFeature`` of ``--embed-dim`` per categorical feature, the
numeric matrix as one ``DenseFeature`` and the 384-d sentence vector as another, and is trained by the
library's ``MTLTrainer`` (its DataLoader, loss and per-epoch validation) with AdamW:

* ``mmoe``: ``MMOE`` with ``--experts`` experts of ``[--expert-dim]`` and towers of ``[--tower-dim]``; labels
  (click, click-and-buy): its second head is p(ctcvr).
* ``ple``: ``PLE`` with one level, ``--experts`` task-specific and ``--shared-experts`` shared experts.
* ``esmm``: the library's ``ESMM`` reads only sparse features (it reshapes their embeddings), so a subclass,
  ``DenseESMM``, concatenates the dense inputs to them; its towers are ``[--expert-dim, --tower-dim]``
  (the library's ESMM has no shared bottom: each tower sees the shared embeddings). Outputs (cvr, ctr,
  ctcvr); the trainer's ESMM loss (ctr and ctcvr over all impressions) applies since it is an ``ESMM``.

The trainer evaluates on the validation split after every epoch; patience is set above the epochs so it
never stops early, and after ``fit`` the weights of its best epoch (by validation ctr AUC, which its
EarlyStopper keeps) are restored. Writes ``<out>/<system>.npy`` (holdout probabilities: mmoe/ple [n, 2]
= ctr, ctcvr; esmm [n, 3] = cvr, ctr, ctcvr) and ``<out>/timing.json`` (per system: the process CPU seconds
and wall seconds of ``trainer.fit`` alone, training rows, epochs, steps).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--systems", nargs="+", default=["mmoe", "ple", "esmm"], choices=["mmoe", "ple", "esmm"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--embed-dim", type=int, default=16)
    parser.add_argument("--expert-dim", type=int, default=64)
    parser.add_argument("--tower-dim", type=int, default=32)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--shared-experts", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = np.load(args.data, allow_pickle=False)
    timing = {}
    for system in args.systems:
        probs, timing[system] = train_one(system, data, args)
        np.save(args.out / f"{system}.npy", probs)
        print(f"rechub_{system}: {json.dumps(timing[system])}", file=sys.stderr, flush=True)
    (args.out / "timing.json").write_text(json.dumps(timing, indent=2))


def inputs(data, split: str, cat_names: list[str], text_matrix: np.ndarray) -> dict[str, np.ndarray]:
    """The library's input form: one array per feature name (indexed row by row by its TorchDataset)."""
    x = {name: data[f"{split}.cat.{name}"] for name in cat_names}
    x["numeric"] = data[f"{split}.numeric"]
    x["text"] = text_matrix[data[f"{split}.text"]]
    return x


def train_one(system: str, data, args) -> tuple[np.ndarray, dict]:
    from torch.utils.data import DataLoader
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE, PLE
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import PredictDataset, TorchDataset

    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    cat_names = [str(n) for n in data["cat_names"]]
    sizes = dict(zip(cat_names, map(int, data["cat_sizes"]), strict=True))
    sides = dict(zip(cat_names, map(str, data["cat_side"]), strict=True))
    text_matrix = data["text_matrix"]
    sparse = {name: SparseFeature(name, vocab_size=sizes[name], embed_dim=args.embed_dim) for name in cat_names}
    dense = [
        DenseFeature("numeric", embed_dim=data["train.numeric"].shape[1]),
        DenseFeature("text", text_matrix.shape[1]),
    ]
    features = [*sparse.values(), *dense]
    expert = {"dims": [args.expert_dim], "dropout": args.dropout}
    tower = {"dims": [args.tower_dim], "dropout": args.dropout}
    if system == "mmoe":
        model = MMOE(features, ["classification"] * 2, args.experts, expert, [tower, tower])
    elif system == "ple":
        model = PLE(features, ["classification"] * 2, 1, args.experts, args.shared_experts, expert, [tower, tower])
    else:
        towers = {"dims": [args.expert_dim, args.tower_dim], "dropout": args.dropout}
        model = dense_esmm()(
            [sparse[n] for n in cat_names if sides[n] == "user"],
            [sparse[n] for n in cat_names if sides[n] != "user"],
            dense,
            towers,
            towers,
        )

    def labels(split: str) -> np.ndarray:
        y = data[f"{split}.labels"].astype(np.float32)  # clicked, clicked and bought
        # ESMM's outputs are (cvr, ctr, ctcvr); its loss reads ctr and ctcvr, its validation every column,
        # so the cvr column gets the only cvr label defined on every impression: clicked and bought.
        return np.column_stack([y[:, 1], y[:, 0], y[:, 1]]) if system == "esmm" else y

    train_loader = DataLoader(
        TorchDataset(inputs(data, "train", cat_names, text_matrix), labels("train")),
        batch_size=args.batch_size,
        shuffle=True,
    )
    valid_loader = DataLoader(
        TorchDataset(inputs(data, "valid", cat_names, text_matrix), labels("valid")),
        batch_size=args.batch_size,
        shuffle=False,
    )
    n_tasks = 3 if system == "esmm" else 2
    with tempfile.TemporaryDirectory(prefix="rechub-") as model_path:
        trainer = MTLTrainer(
            model,
            ["classification"] * n_tasks,
            optimizer_fn=torch.optim.AdamW,
            optimizer_params={"lr": args.lr, "weight_decay": args.weight_decay},
            n_epoch=args.epochs,
            earlystop_taskid=1 if system == "esmm" else 0,  # ctr
            earlystop_patience=args.epochs + 1,  # never stops early: every system trains every epoch
            device="cpu",
            model_path=model_path,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.fit(train_loader, valid_loader)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    rows = len(train_loader.dataset)
    del train_loader, valid_loader  # the per-row text vectors of train and valid: free them before the holdout's
    if trainer.early_stopper.best_weights is not None:
        model.load_state_dict(trainer.early_stopper.best_weights)
    holdout_loader = DataLoader(
        PredictDataset(inputs(data, "holdout", cat_names, text_matrix)), batch_size=8192, shuffle=False
    )
    probs = np.asarray(trainer.predict(model, holdout_loader), dtype=np.float64)
    timing = {
        "cpu_seconds": round(cpu, 2),
        "wall_seconds": round(wall, 2),
        "training_rows": rows,
        "epochs": args.epochs,
        "steps": args.epochs * math.ceil(rows / args.batch_size),
        "best_valid_ctr_auc": round(float(trainer.early_stopper.best_auc), 4),
    }
    return probs, timing


def dense_esmm():
    """torch-rechub's ESMM with dense inputs beside the sparse ones (the library's reads sparse ones only)."""
    from torch_rechub.basic.layers import MLP
    from torch_rechub.models.multi_task import ESMM

    class DenseESMM(ESMM):
        def __init__(self, user_features, item_features, dense_features, cvr_params, ctr_params):
            super().__init__(user_features, item_features, cvr_params, ctr_params)
            self.dense_features = dense_features
            self.tower_dims += sum(feature.embed_dim for feature in dense_features)
            self.tower_cvr = MLP(self.tower_dims, **cvr_params)
            self.tower_ctr = MLP(self.tower_dims, **ctr_params)

        def forward(self, x):
            # As ESMM.forward (user and item embeddings concatenated), with the dense values appended.
            parts = [
                self.embedding(x, features, squeeze_dim=True) for features in (self.user_features, self.item_features)
            ]
            parts.append(self.embedding(x, self.dense_features, squeeze_dim=True))
            tower_input = torch.cat(parts, dim=1)
            cvr_pred = torch.sigmoid(self.tower_cvr(tower_input))
            ctr_pred = torch.sigmoid(self.tower_ctr(tower_input))
            return torch.cat([cvr_pred, ctr_pred, torch.mul(ctr_pred, cvr_pred)], dim=1)

    return DenseESMM


if __name__ == "__main__":
    main()
