"""Untrusted input, third round: YAML alias bombs and malformed `--set` values, weights from elsewhere that name
a download, metadata nested without end, and a full disk under distill-eval's digits cache."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import huggingface_hub
import huggingface_hub.file_download
import pytest
import timm
import timm.models._builder
import timm.models._factory
import timm.models._hub
import torch.hub
from PIL import Image
from train_helpers import base_recipe, small_digits

from distill import cli
from distill.checkpoint import check_output_dir, save_weights
from distill.errors import RecipeError
from distill.files import MAX_ALIAS_VALUES, MAX_DEPTH
from distill.recipe import load_recipe_file

MODEL = "test_convnext"  # timm's registry gives it hf_hub_id 'timm/...': pretrained=True would fetch it
EVIL_URL = "https://weights.example.invalid/planted.pth"


def one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def alias_bomb(levels: int = 9) -> str:
    """Each level a list of nine aliases of the one before: 9**levels strings once expanded, a few lines here."""
    lines = ["    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines)


def recipe_text(kwargs_block: str) -> str:
    return (
        "method: supervised\nstudent:\n  model: test_vit\n  kwargs:\n"
        f"{kwargs_block}\ndata: {{train: a, val: b}}\nepochs: 1\nbatch_size: 1\noutput_dir: out\n"
    )


# ---- 1. YAML: alias bombs, cycles, depth, malformed --set values -----------------------------------------


def test_an_alias_bomb_in_a_recipe_is_refused_at_load_as_one_line(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(recipe_text(alias_bomb()))
    # refused while loading, before anything walks the 387 million values (it used to take minutes and GBs)
    with pytest.raises(RecipeError, match=rf"recipe {path}: .*more than {MAX_ALIAS_VALUES} values"):
        load_recipe_file(path)
    err = one_line_error(capsys, cli.train([str(path)]))
    assert str(path) in err and "alias bomb" in err


def test_aliases_of_a_published_recipe_still_load():
    # the published prune recipe repeats its zero_shot section and a schedule by alias
    recipe = load_recipe_file(Path(__file__).parent.parent / "recipes/configs/tinyclip_prune_digits.yaml")
    assert recipe["then"][0]["loss"]["zero_shot"] == recipe["loss"]["zero_shot"]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("    loop: &loop [1, *loop]", "alias *loop inside its own anchor"),  # a cycle: walking it never ends
        ("    deep: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH} levels"),
        ("    deeper: " + "[" * 5000 + "]" * 5000, f"nested deeper than {MAX_DEPTH} levels"),  # a RecursionError
    ],
)
def test_a_cyclic_or_deeply_nested_recipe_is_one_line(tmp_path, capsys, block, message):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(block))
    err = one_line_error(capsys, cli.train([str(path)]))
    assert str(path) in err and message in err


@pytest.mark.parametrize(
    "value",
    ["[unclosed", "{a: 1", "!!python/object:os.system {}", "!!python/object/apply:os.system [echo pwned]"],
)
def test_a_malformed_set_value_is_one_line_naming_the_item(tmp_path, capsys, value):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text("    a: 1"))
    err = one_line_error(capsys, cli.train([str(path), "--set", f"student.kwargs={value}"]))
    assert f"--set 'student.kwargs={value}': expected a YAML value" in err


def test_an_alias_bomb_in_an_augmentation_file_is_one_line_exit_2_at_once(tmp_path, capsys):
    views = tmp_path / "views.yaml"
    views.write_text(f"hflip: 0.5\nextra:\n{alias_bomb()}\n")
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text("    a: 1") + f"augmentation: {views}\n")
    started = time.perf_counter()
    err = one_line_error(capsys, cli.train([str(path)]))
    assert time.perf_counter() - started < 2  # refused while loading, before anything walks the values
    assert f"augmentation: {views}: not valid YAML: " in err and "alias bomb" in err, err


def test_an_alias_bomb_in_a_save_config_file_is_one_error_line_exit_2_at_once(tmp_path, capsys):
    config = tmp_path / "save.yaml"
    config.write_text(f"teacher: timm:test_vit\ndata: digits\nout: s.zarr\nepochs: 1\naug:\n{alias_bomb()}\n")
    started = time.perf_counter()
    with pytest.raises(SystemExit) as stop:
        cli.save_logits(["--config", str(config)])
    assert time.perf_counter() - started < 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("distill-save-logits: error:")]
    assert stop.value.code == 2 and "Traceback" not in err and len(errors) == 1, err  # after argparse's usage
    assert f"--config {config}: not valid YAML: " in errors[0] and "alias bomb" in errors[0], err


def test_an_alias_bomb_in_the_recipe_of_a_run_to_resume_is_refused_naming_it(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_3").mkdir(parents=True)
    (out / "recipe.yaml").write_text(recipe_text(alias_bomb()))
    with pytest.raises(RecipeError, match=rf"^{out / 'recipe.yaml'}: not valid YAML: .*\(an alias bomb\?\)"):
        check_output_dir(out, {})


def test_a_recipe_file_that_is_not_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("method: [supervised\nepochs: 1\n")
    err = one_line_error(capsys, cli.train([str(path)]))
    assert f"recipe {path}: not valid YAML" in err and "line " in err


# ---- 2. distill-eval fetches nothing for weights from elsewhere --------------------------------------------


@pytest.fixture
def no_network(monkeypatch, tmp_path) -> list[str]:
    """Every way timm, torch.hub and huggingface_hub fetch (and any socket connection) records the attempt and
    fails; the torch hub cache is an empty folder of the test's."""
    attempts: list[str] = []

    def refuse(name: str) -> Any:
        def fetch(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{name}{args[:2]}")
            raise ConnectionRefusedError(f"test: no network ({name})")

        return fetch

    targets = [
        (torch.hub, "download_url_to_file"),
        (torch.hub, "load_state_dict_from_url"),
        (timm.models._builder, "load_state_dict_from_url"),
        (timm.models._builder, "download_cached_file"),
        (timm.models._builder, "load_state_dict_from_hf"),
        (timm.models._factory, "load_model_config_from_hf"),
        (timm.models._hub, "download_url_to_file"),
        (timm.models._hub, "hf_hub_download"),
        (huggingface_hub, "hf_hub_download"),
        (huggingface_hub.file_download, "hf_hub_download"),
        (socket.socket, "connect"),
        (socket, "create_connection"),
    ]
    for module, name in targets:
        monkeypatch.setattr(module, name, refuse(f"{getattr(module, '__name__', module)}.{name}"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return attempts


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, str]:
    return small_digits(tmp_path_factory.mktemp("digits"))


def planted_weights(folder: Path, digits: dict[str, str], student: dict[str, Any], recipe: str | None = None) -> Path:
    """`folder/model.safetensors`: a real test_convnext's weights, carrying a recipe whose student is `student`
    (or the raw metadata text `recipe`), as weights from elsewhere would."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = base_recipe(digits, folder / "run", student=student)
    metadata = {"format": "pt", "num_classes": "10", "distill.recipe": recipe or json.dumps(raw)}
    save_weights(timm.create_model(MODEL, num_classes=10), folder / "model.safetensors", metadata)
    return folder / "model.safetensors"


def evaluate(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    rc = cli.evaluate([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pretrained": True, "pretrained_cfg_overlay": {"url": EVIL_URL, "hf_hub_id": None}},  # a planted URL
        {"pretrained": True},  # timm's own source for the model: the hub
        {"pretrained": True, "pretrained_cfg": {"hf_hub_id": "evil/weights", "url": EVIL_URL, "num_classes": 10}},
    ],
)
def test_weights_naming_a_download_are_scored_from_their_own_bytes(tmp_path, capsys, digits, no_network, kwargs):
    weights = planted_weights(tmp_path / "elsewhere", digits, {"model": MODEL, "kwargs": kwargs})
    rc, out, err = evaluate(capsys, weights)
    assert no_network == [] and not (tmp_path / "torch-home").exists()
    assert rc == 0, err
    assert json.loads(out)["images"] == 60


def test_a_hub_named_student_is_built_from_the_config_beside_its_weights(tmp_path, capsys, digits, no_network):
    weights = planted_weights(tmp_path / "elsewhere", digits, {"model": "hf-hub:evil/planted"})
    rc, _, err = evaluate(capsys, weights)  # no config.json: refused, nothing fetched
    assert rc == 2 and "hf-hub:evil/planted" in err and "config.json" in err and no_network == [], err
    config = {"architecture": MODEL, "num_classes": 10, "model_args": {}, "pretrained_cfg": {"hf_hub_id": "evil/x"}}
    (weights.parent / "config.json").write_text(json.dumps(config | {"pretrained_cfg": {"url": EVIL_URL}}))
    rc, out, err = evaluate(capsys, weights)
    assert rc == 0 and json.loads(out)["images"] == 60 and no_network == [], err
    (weights.parent / "config.json").write_text(json.dumps(config | {"architecture": "hf-hub:evil/again"}))
    rc, _, err = evaluate(capsys, weights)  # a config naming another source is refused, not followed
    assert rc == 2 and "expected timm's model config" in err and no_network == [], err


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_DEPTH} levels"),  # json.loads: RecursionError
        ('{"a": ' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH} levels"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a recipe mapping"),
    ],
)
def test_metadata_nested_without_end_is_one_line_naming_the_weights(tmp_path, capsys, digits, recipe, message):
    weights = planted_weights(tmp_path / "elsewhere", digits, {"model": MODEL}, recipe=recipe)
    rc, _, err = evaluate(capsys, weights)
    assert rc == 2 and f"{weights}: metadata distill.recipe: {message}" in err and len(err.splitlines()) == 1, err


def test_an_alias_bomb_in_a_run_folders_recipe_is_one_line(tmp_path, capsys, digits):
    weights = planted_weights(tmp_path / "run", digits, {"model": MODEL})
    (weights.parent / "recipe.yaml").write_text(recipe_text(alias_bomb()))
    rc, _, err = evaluate(capsys, weights)
    assert rc == 2 and str(weights.parent / "recipe.yaml") in err and "alias bomb" in err, err


# ---- 3. a full disk under distill-eval's digits cache ---------------------------------------------------


def test_a_full_disk_writing_the_digits_cache_is_one_line_naming_the_file(tmp_path, capsys, digits, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DISTILL_CACHE", str(cache))
    weights = planted_weights(tmp_path / "elsewhere", digits, {"model": MODEL})
    save, calls = Image.Image.save, []

    def full_at_the_third(image: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write: no file named
        save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_at_the_third)
    rc, _, err = evaluate(capsys, weights, "--data", "digits")
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"disk full: cannot write {calls[2]}" in err
    assert sorted(p.name for p in cache.iterdir()) == []  # no half-built digits folder left


def test_a_runs_recipe_reads_back_as_it_was_written(tmp_path):
    """A string that looks like a number without a dot ('1e3': a run's name, a tag) is written quoted, so the
    run's saved recipe reads back equal and a resume never takes it for another recipe."""
    from distill.checkpoint import saved_recipe, write_recipe

    recipe = {"output_dir": "1e3", "tag": "2E-5", "optimizer": {"lr": 3e-4, "weight_decay": 1e5}, "then": ["1e3"]}
    write_recipe(tmp_path, recipe, fresh=False)
    assert saved_recipe(tmp_path) == recipe
