"""The Cream method (recipes/cream/): search on the trainer, board, selection within the FLOPs budget, export,
and the retraining as a follow-up run."""

from __future__ import annotations

import csv
import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from store_helpers import manifest, write_epoch
from train_helpers import make_method, run_cli, small_digits, write_recipe

from distill.augment import PRESETS
from distill.data import create_dataset
from distill.recipe import RecipeError
from distill.run import run_recipe
from distill.trainer import FAULT_AFTER_STEPS
from logit_store import create_store
from recipes.cream.board import MetaMatchingNetwork, PrioritizedBoard, evaluate_path, update_board
from recipes.cream.method import SearchState
from students.supernet import Supernet, SupernetConfig, export, path_flops

NUM_CLASSES = 10
BUDGET = 3.5  # MFLOPs: the tiny supernet's paths span 2.0-5.9 at 32 px, about half are over


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cream")
    return {"root": root, **small_digits(root)}


@pytest.fixture(scope="module")
def store(data):
    """A synthetic logit store saved for the small training folder, basic augmentation, seed 0, 2 epochs."""
    train_set = create_dataset(data["train"])
    m = manifest(
        num_samples=len(train_set), num_classes=NUM_CLASSES, k=3, epochs=2, global_seed=0,
        dataset={"fingerprint": train_set.fingerprint()}, augmentation=PRESETS["basic"].manifest_entry(),
    )  # fmt: skip
    out = data["root"] / "outer.zarr"
    created = create_store(str(out), m)
    for epoch in range(2):
        write_epoch(created, epoch)
    return out


def cream_recipe(data, output_dir, **changes) -> dict:
    """Tiny sizes: 128 training ids (every 5th of 160 held out), 8 steps per epoch; the board keeps every path."""
    recipe = {
        "method": "cream",
        "student": {"model": "cream_supernet", "kwargs": {"tiny": True}},
        "data": {"train": data["train"], "val": data["val"], "img_size": 32},
        "epochs": 2, "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.005}, "log_every": 1,
        "loss": {"flops_budget": BUDGET, "board_size": 32, "board_start_epoch": 0, "meta_update_every": 4,
                 "heldout_every": 5, "heldout_batch_size": 16},
        "then": [{"name": "retrain", "method": "supervised", "epochs": 1, "batch_size": 16, "log_every": 2}],
        "output_dir": str(output_dir),
    }  # fmt: skip
    for key, value in changes.items():
        node = recipe
        *parents, leaf = key.split("__")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[leaf] = value
    return recipe


def metric(out, name: str) -> list[float]:
    with open(out / "metrics.csv", newline="") as f:
        return [float(v) for _, n, v in list(csv.reader(f))[1:] if n == name]


# ---- end to end ------------------------------------------------------------------------------------------


def test_search_select_retrain_end_to_end(data, store):
    out = data["root"] / "run"
    recipe = cream_recipe(
        data, out, teacher={"source": f"store:{store}"}, loss__kd_weight=0.5, loss__retrain_init="supernet"
    )
    recipe["then"][0] |= {"method": "tinyvit", "teacher": {"source": f"store:{store}"}}  # retrained from the store
    proc = run_cli("distill-train", [str(write_recipe(data["root"] / "cream.yaml", recipe))], data["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    config = SupernetConfig.tiny()

    # The board is in the run's log (printed and in train.log), best first, with held-out scores and MFLOPs; the
    # budget excludes some of it.
    for log in (proc.stdout, (out / "train.log").read_text()):
        assert "Cream board, best first" in log and "<- chosen" in log and "(over budget)" in log
    board = summary["board"]
    assert len(board) >= 5 and [r["rank"] for r in board] == list(range(1, len(board) + 1))
    assert all(a["heldout_top1"] >= b["heldout_top1"] for a, b in itertools.pairwise(board))
    assert any(r["mflops"] > BUDGET for r in board) and any(r["mflops"] <= BUDGET for r in board)
    for r in board:
        assert r["flops"] == path_flops(config, r["path"], 32, NUM_CLASSES) and r["within_budget"] == (
            r["mflops"] <= BUDGET
        )
        assert r["heldout_top1"] * 16 == pytest.approx(round(r["heldout_top1"] * 16))  # on the 16-image batch

    # The chosen path is the best-scoring board path within the budget, and its FLOPs are path_flops'.
    best_within = next(r for r in board if r["mflops"] <= BUDGET)
    assert summary["path"] == best_within["path"] and [r["chosen"] for r in board].count(True) == 1
    assert summary["heldout_top1"] == best_within["heldout_top1"]
    assert summary["flops"] == path_flops(config, summary["path"], 32, NUM_CLASSES) <= BUDGET * 1e6
    assert summary["mflops"] == summary["flops"] / 1e6 and summary["flops_budget_mflops"] == BUDGET
    assert summary["path_params"] == best_within["params"] < summary["params"]  # the path vs the supernet

    # The search ran its steps on the trainer, with the board, meta updates and the outer store KD.
    assert summary["steps"] == 16 and summary["meta_updates"] == 3 and summary["images_per_s"] > 0
    assert summary["heldout_samples"] == 32 and summary["teacher_source"] == f"store:{store}"
    assert len(metric(out, "train/store_kd")) == 16 and len(metric(out, "train/m")) > 0
    assert len(metric(out, "train/meta_heldout_loss")) == 3

    # The retraining ran from the exported weights, and its accuracy is reported.
    retrain = json.loads((out / "retrain" / "summary.json").read_text())
    assert 0 <= retrain["top1"] <= retrain["top5"] <= 100 and retrain["student"] == "cream_path"
    assert retrain["method"] == "tinyvit" and retrain["teacher_source"] == f"store:{store}"
    assert retrain["params"] == summary["path_params"] and (out / "retrain" / "model.safetensors").exists()
    student = yaml.safe_load((out / "retrain" / "recipe.yaml").read_text())
    assert student["student"]["checkpoint"] == str(out / "path.safetensors")
    assert student["student"]["kwargs"]["path"] == summary["path"]

    # path.safetensors is the chosen path exported from the saved supernet (BN statistics recalibrated on all
    # 128 training ids: 20 batches of 16 are more than there are), and loads into timm's cream_path.
    supernet = Supernet(config, NUM_CLASSES)
    supernet.load_state_dict(load_file(out / "model.safetensors"))
    exported = export(supernet, summary["path"]).state_dict()
    saved = load_file(out / "path.safetensors")
    statistics = {k for k in saved if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert saved.keys() == exported.keys() and all(
        torch.equal(saved[k], exported[k]) for k in saved.keys() - statistics
    )
    assert summary["bn_recalibration_images"] == 128 and not torch.equal(
        saved["stem.0.bn.running_mean"], exported["stem.0.bn.running_mean"]
    )
    assert student["student"]["kwargs"]["drop_rate"] == 0.2  # the retrain configs' dropout
    model = timm.create_model("cream_path", num_classes=NUM_CLASSES, **student["student"]["kwargs"])
    model.load_state_dict(saved)


# ---- the training step -----------------------------------------------------------------------------------


class _Memorizer(nn.Module):
    """Predicts the class written in pixel (0, 0, 0), scaled by a trainable weight: right on the training
    batch (where that pixel holds the label), wrong on the held-out one."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(5.0))

    def forward(self, x: torch.Tensor, path: object) -> torch.Tensor:
        return self.scale * F.one_hot(x[:, 0, 0, 0].long(), NUM_CLASSES).float()


def _cream(model: nn.Module, board: PrioritizedBoard, heldout, epoch: int = 0, **loss):
    """The Cream method in the state its `setup` leaves it, on a stand-in context at `epoch`, step 0 (the
    context's `step` list holds the global step)."""
    method = make_method("cream", {"flops_budget": 10.0, "board_start_epoch": 0} | loss, epochs=2)
    method.config, method.img_size, method.device = SupernetConfig.tiny(), 32, torch.device("cpu")
    method.weights = method._sampling_weights(method.config)
    method.heldout, method.flops = heldout, lambda path: 1
    method._heldout_batch = lambda update: heldout  # the held-out stream: this batch every time
    method.meta = MetaMatchingNetwork(NUM_CLASSES)
    method.meta_images = heldout[0][:4]
    method.meta_optimizer = torch.optim.Adam(method.meta.parameters())
    method.search = SearchState(0, board)
    step, optimizer = [0], torch.optim.SGD(model.parameters(), lr=0.01)
    method.context = SimpleNamespace(
        step=step, global_step=lambda: step[0], epoch=lambda: epoch, param_groups=lambda: optimizer.param_groups
    )
    return method


def test_step_sends_the_heldout_score_to_the_board():
    labels = torch.arange(8) % NUM_CLASSES
    train_images, heldout_images = torch.zeros(8, 3, 4, 4), torch.zeros(8, 3, 4, 4)
    train_images[:, 0, 0, 0] = labels.float()  # memorized: 100% on the training batch
    heldout_images[:, 0, 0, 0] = ((labels + 1) % NUM_CLASSES).float()  # 0% held out
    model = _Memorizer()
    board = PrioritizedBoard(size=2)
    method = _cream(model, board, (heldout_images, labels))
    batch = {"image": train_images, "label": labels, "id": torch.arange(8), "epoch": torch.zeros(8, dtype=torch.long)}

    method.path = (0,) * 6
    logs = method.after_step(model, batch)
    assert logs["admitted"] == 1.0 and board[0].path == (0,) * 6
    assert evaluate_path(model, (0,) * 6, train_images, labels)[0] == 1.0
    assert board[0].heldout_score == 0.0  # the held-out batch's score, not the training batch's 1.0
    torch.testing.assert_close(board[0].outputs, model(heldout_images, None).detach())  # its outputs, on that batch

    # A full board (held-out 1.0 and 0.5) refuses the path: its held-out 0.0 is worse; its training 1.0 is not.
    update_board(board, _ConstantModel(labels), (1,) * 6, (heldout_images, labels), flops=1)
    update_board(board, _ConstantModel(labels[:4].repeat(2)), (2,) * 6, (heldout_images, labels), flops=1)
    assert [e.path for e in board] == [(1,) * 6, (2,) * 6]
    method.path = (3,) * 6
    assert method.after_step(model, batch)["admitted"] == 0.0 and (3,) * 6 not in board

    # Before the board is in use (board_start_epoch) the path is neither scored nor offered.
    early = _cream(model, board, (heldout_images, labels), epoch=0, board_start_epoch=1)
    early.path = (4,) * 6
    assert early.after_step(model, batch) == {}


class _ConstantModel(nn.Module):
    """Answers fixed labels for any input."""

    def __init__(self, answers: torch.Tensor) -> None:
        super().__init__()
        self.answers = answers

    def forward(self, x: torch.Tensor, path: object) -> torch.Tensor:
        return F.one_hot(self.answers, NUM_CLASSES).float()


class _RecordingTeacher:
    def __init__(self) -> None:
        self.calls: list[tuple[int, list[int]]] = []

    def logits(self, images: torch.Tensor, epoch: int, ids: torch.Tensor) -> torch.Tensor:
        self.calls.append((epoch, ids.tolist()))
        return torch.zeros(len(images), NUM_CLASSES)


def test_step_mixes_the_board_teacher_meta_update_and_store_kd():
    torch.manual_seed(0)
    model = Supernet(SupernetConfig.tiny(), NUM_CLASSES).train()
    heldout = (torch.randn(6, 3, 16, 16), torch.arange(6))
    board = PrioritizedBoard(size=3)
    for path in [(0,) * 6, (5,) * 6]:
        update_board(board, model, path, heldout, flops=1)
    teacher = _RecordingTeacher()
    method = _cream(model, board, heldout, meta_update_every=2, kd_weight=0.5)
    batch = {
        "image": torch.randn(4, 3, 16, 16), "label": torch.arange(4), "id": torch.tensor([7, 3, 9, 1]),
        "epoch": torch.full((4,), 1),
    }  # fmt: skip

    losses = method.loss(model, batch, teacher)
    # the meta update ran on step 0 (a board exists); m is sigmoid(-best score)
    assert method.search.meta_updates == 1 and "meta_heldout_loss" in losses
    assert method.choose_teacher(model, method.path)[0] in board.entries and 0 < losses["m"] < 1
    assert teacher.calls == [(1, [7, 3, 9, 1])]  # the store is read at the batch's (epoch, ids)
    assert losses["store_kd"] >= np.log(NUM_CLASSES) - 1e-5  # soft CE against a uniform store distribution
    method.context.step[0] = 1
    method.loss(model, batch, teacher)
    assert method.search.meta_updates == 1  # every 2 steps: not on step 1


# ---- recipe checks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"loss__flops_budget": "small"}, r"loss\.flops_budget: expected a number"),
        ({"loss__sampling": "uniform", "loss__choice_weights": [1] * 6}, r"loss\.choice_weights: give them .*prior"),
        ({"loss__choice_weights": [1, 2]}, r"loss\.choice_weights: expected 6"),
        ({"loss__meta_slice": 17}, r"loss\.meta_slice: 17 images, but the held-out batch has 16"),
        ({"loss__admission_margin": -1}, r"loss\.admission_margin: expected a value >= 0"),
        ({"loss__heldout": "test"}, r"loss\.heldout: expected one of \['train', 'val'\]"),
        ({"loss__board_start_epoch": 2}, r"loss\.board_start_epoch: expected 0 \.\. 1 .*got 2"),
        (
            {"student__kwargs__config": {"stage_depths": [2, 0, 2]}},
            r"student\.kwargs: cream_supernet: every stage needs at least one layer",
        ),
        ({"student__kwargs__config": {"depth": 3}}, r"student\.kwargs: cream_supernet: unknown supernet config"),
        ({"student": {"model": "resnet18"}}, r"student\.model: method cream trains a supernet"),
        ({"then__0__epoch": 1}, r"then\[0\]\.epoch: unknown key"),
        ({"then__0__loss": {"smoothing": 0.1}}, r"then\[0\]\.loss\.smoothing: unknown key"),
        ({"augmentation": "tinyvit-mix"}, r"augmentation: the search trains on hard labels"),
        ({"mixed_precision": "bf16"}, r"mixed_precision: the search runs in float32"),
        ({"grad_accum": 2}, r"grad_accum: the search samples one path per optimizer step"),
    ],
)
def test_recipe_errors_name_the_key(data, tmp_path, change, message):
    with pytest.raises(RecipeError, match=message):
        run_recipe(cream_recipe(data, tmp_path / "run", **change))
    assert not (tmp_path / "run").exists()  # nothing written for a recipe that cannot run


def test_a_budget_under_every_board_path_is_an_error(data, tmp_path):
    # (every tiny path has more than 1.9 MFLOPs; a 2-step search)
    recipe = cream_recipe(data, tmp_path / "run", loss__flops_budget=1.0, epochs=1, batch_size=64)
    with pytest.raises(RecipeError, match=r"loss\.flops_budget: no board path is within 1 MFLOPs"):
        run_recipe(recipe)
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "retrain").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 1}, r"store field global_seed is 0 but the recipe's seed .* gives 1"),
        ({"epochs": 3}, r"^epochs: 3 training epochs but the store .* holds 2"),
        ({"augmentation": "none"}, r"store field augmentation\.hash"),
    ],
)
def test_outer_store_is_checked_naming_the_field(data, store, tmp_path, change, message):
    recipe = cream_recipe(data, tmp_path / "run", teacher={"source": f"store:{store}"}) | change
    with pytest.raises(RecipeError, match=message):
        run_recipe(recipe)
    assert not (tmp_path / "run").exists()


def test_heldout_split_is_disjoint_and_deterministic(data):
    train_set, val_set = create_dataset(data["train"]), create_dataset(data["val"])
    method = make_method("cream", {"flops_budget": 1.0, "heldout_every": 5, "board_start_epoch": 0})
    train_ids, heldout_set, heldout_ids = method.split(train_set, val_set)
    assert list(method.training_ids(train_set, val_set)) == list(train_ids)
    assert heldout_set is train_set and set(train_ids).isdisjoint(heldout_ids)
    assert list(heldout_ids) == list(range(0, 160, 5)) and len(train_ids) == 128
    method = make_method("cream", {"flops_budget": 1.0, "heldout": "val", "board_start_epoch": 0})
    train_ids, heldout_set, heldout_ids = method.split(train_set, val_set)
    assert list(method.training_ids(train_set, val_set)) == list(train_ids)
    assert heldout_set is val_set and len(train_ids) == 160 and len(heldout_ids) == 60


def test_retrain_store_is_checked_before_the_search(data, store, tmp_path):
    recipe = cream_recipe(data, tmp_path / "run")
    recipe["then"][0] |= {"method": "tinyvit", "seed": 1, "teacher": {"source": f"store:{store}"}}
    with pytest.raises(
        RecipeError, match=r"^then\.retrain: teacher\.source .*: store field global_seed is 0 .* gives 1"
    ):
        run_recipe(recipe)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_killed_during_its_retraining_resumes_the_retraining(data, tmp_path):
    out = tmp_path / "run"
    recipe = cream_recipe(data, out, then__0__checkpoint_every=1, then__0__epochs=2)
    path = write_recipe(tmp_path / "cream.yaml", recipe)
    killed = run_cli("distill-train", [str(path)], data["root"], env_extra={FAULT_AFTER_STEPS: "retrain:3"})
    assert killed.returncode == -9 and (out / "summary.json").exists()  # the search finished, then the kill
    assert (out / "retrain" / "checkpoints" / "step_00000003").exists()
    searched = (out / "summary.json").read_text()
    resumed = run_cli("distill-train", [str(path)], data["root"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Cream board" not in resumed.stdout and (out / "summary.json").read_text() == searched  # no new search
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert json.loads((out / "retrain" / "summary.json").read_text())["steps"] == 20  # 2 epochs of 160 / 16


def test_paths_are_drawn_with_the_reference_prior_by_default():
    def weights(**loss):
        method = make_method("cream", {"flops_budget": 1.0, "board_start_epoch": 0} | loss)
        return method._sampling_weights(SupernetConfig.tiny())

    # The reference's PRE_PROB, for k3e4, k3e6, k5e4, k5e6, k7e4, k7e6 at every layer.
    assert weights().tolist() == [0.05, 0.2, 0.05, 0.5, 0.05, 0.15]
    assert weights(skip_weight=0.3).tolist() == [0.05, 0.2, 0.05, 0.5, 0.05, 0.15, 0.3]
    assert weights(choice_weights=[1, 0, 0, 0, 0, 1]).tolist() == [1, 0, 0, 0, 0, 1]
    assert weights(sampling="uniform") is None
