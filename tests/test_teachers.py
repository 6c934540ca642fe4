"""Teachers: timm / module / ensemble / store specs, checkpoints, identities and the store teacher."""

import logging
import math
import sys

import numpy as np
import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from store_helpers import manifest, records_for, write_epoch

from logit_store import create_store
from logit_store.sparse import rebuild_log_probs, rebuild_probs
from teachers import TeacherError, create_teacher
from teachers.checkpoint import CheckpointError, file_sha256, state_dict_sha256
from teachers.clip_teacher import create_open_clip_model
from teachers.ensemble import EnsembleTeacher
from teachers.live import ModelTeacher
from teachers.store_teacher import StoreTeacher

SPEC = "timm:test_resnet"
NC = 10


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def teacher(seed: int = 0, spec: str = SPEC, num_classes: int | None = NC, **kwargs) -> ModelTeacher:
    torch.manual_seed(seed)
    return create_teacher(spec, num_classes=num_classes, **kwargs)


def save(state_dict: dict, path) -> str:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return str(path)


# ---- timm teachers -----------------------------------------------------------------------------


def test_timm_teacher_output_eval_and_determinism(images):
    t = teacher()
    out = t.logits(images)
    assert out.shape == (2, NC) and out.dtype == torch.float32 and out.device == images.device
    assert t.num_classes == NC and t.spec == SPEC
    assert not any(m.training for m in t.model.modules())
    torch.testing.assert_close(t.logits(images), out, rtol=0, atol=0)
    # eval mode: batch norm uses running statistics, so a row does not depend on the rest of its batch
    torch.testing.assert_close(t.logits(images[:1]), out[:1], rtol=1e-5, atol=1e-5)
    assert not out.requires_grad


def test_logits_are_usable_as_a_loss_target(images):
    out = teacher().logits(images)
    assert not out.is_inference()
    student = torch.zeros(2, NC, requires_grad=True)
    (student * out).sum().backward()  # saves `out` for backward, which an inference tensor refuses
    torch.testing.assert_close(student.grad, out)


def test_num_classes_from_the_model():
    assert teacher(num_classes=None).num_classes == 1000  # timm's default head
    with pytest.raises(TeacherError, match=r"has 7 classes, but num_classes=10"):
        create_teacher("module:teacher_factories:fixed_net", num_classes=10)


def test_images_must_be_float():
    with pytest.raises(TeacherError, match="floating-point"):
        teacher().logits(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_unknown_timm_name_is_named_with_close_names():
    with pytest.raises(TeacherError, match=r"'resnt18'.*close names: .*resnet18"):
        create_teacher("timm:resnt18", num_classes=NC)


def test_unknown_prefix_and_option():
    with pytest.raises(TeacherError, match=r"'resnet18' has no known prefix.*timm:resnet18"):
        create_teacher("resnet18")
    with pytest.raises(TeacherError, match=r"timm could not create 'test_resnet'.*unexpected keyword argument 'foo'"):
        create_teacher(f"{SPEC}?foo=1")  # other options are the model's keyword arguments


def test_pretrained_failure_is_wrapped(monkeypatch, tmp_path):
    calls = []

    def offline(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(TeacherError, match=r"could not be loaded.*no network.*\?file=PATH or --checkpoint") as err:
        create_teacher(f"{SPEC}?pretrained=1", num_classes=NC)
    assert "test_resnet" in str(err.value) and calls == [True]
    with pytest.raises(TeacherError, match="not both"):
        create_teacher(f"{SPEC}?pretrained=1", num_classes=NC, checkpoint=tmp_path / "x.pth")


# ---- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_round_trip(tmp_path, images, suffix):
    source = teacher(seed=1)
    path = save(source.model.state_dict(), tmp_path / f"w{suffix}")
    fresh = teacher(seed=2)
    assert not torch.allclose(fresh.logits(images), source.logits(images))
    loaded = teacher(seed=2, checkpoint=path)
    torch.testing.assert_close(loaded.logits(images), source.logits(images), rtol=0, atol=0)
    assert loaded.weights_sha256 == file_sha256(path)


@pytest.mark.parametrize("nest", ["model", "state_dict", "model_ema"])
def test_checkpoint_nested_with_module_prefix(tmp_path, images, nest):
    source = teacher(seed=1)
    wrapped = {f"module.{k}": v for k, v in source.model.state_dict().items()}
    path = save({nest: wrapped, "epoch": 7}, tmp_path / "ddp.pth")
    loaded = teacher(seed=2, checkpoint=path)
    torch.testing.assert_close(loaded.logits(images), source.logits(images), rtol=0, atol=0)


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    state = teacher(num_classes=5).model.state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(3)
    path = save(state, tmp_path / "five.pth")
    with pytest.raises(CheckpointError) as err:
        teacher(checkpoint=path)
    msg = str(err.value)
    assert "five.pth" in msg and "\n" not in msg  # one line
    assert "fc.weight: checkpoint [5, 96] vs model [10, 96]" in msg
    assert "fc.bias: checkpoint [5] vs model [10]" in msg
    assert "missing keys" in msg and "layer1.0.conv1.weight" in msg
    assert "unexpected keys" in msg and "extra.weight" in msg


class Payload:
    """A pickled object whose unpickling would run code; weights_only must refuse it."""

    ran = False

    def __setstate__(self, state):
        Payload.ran = True


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": teacher().model.state_dict(), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth.*weights_only=True") as err:
        teacher(checkpoint=path)
    assert "Payload" in str(err.value)
    assert not Payload.ran


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.pth does not exist"):
        teacher(checkpoint=tmp_path / "missing.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"w\.npz: unknown file type '\.npz'"):
        teacher(checkpoint=tmp_path / "w.npz")
    torch.save({"state_dict": {"fc.weight": 3}}, tmp_path / "notensor.pth")
    with pytest.raises(CheckpointError, match=r"notensor\.pth is not a state dict: fc\.weight"):
        teacher(checkpoint=tmp_path / "notensor.pth")


def test_weights_sha256_identity(tmp_path):
    a = save(teacher(seed=1).model.state_dict(), tmp_path / "a.safetensors")
    b = save(teacher(seed=2).model.state_dict(), tmp_path / "b.safetensors")
    first, second = teacher(seed=3, checkpoint=a), teacher(seed=4, checkpoint=a)
    assert first.weights_sha256 == second.weights_sha256 == file_sha256(a)
    assert teacher(checkpoint=b).weights_sha256 != first.weights_sha256
    # without a checkpoint the identity is the state dict's: stable for the same weights, else different
    assert teacher(seed=5).weights_sha256 == teacher(seed=5).weights_sha256
    assert teacher(seed=5).weights_sha256 != teacher(seed=6).weights_sha256
    random_init = teacher(seed=5)
    assert random_init.weights_sha256 == state_dict_sha256(random_init.model.state_dict())
    assert random_init.describe() == {"spec": SPEC, "weights_sha256": random_init.weights_sha256, "num_classes": NC}


# ---- module: teachers ------------------------------------------------------------------------------


def test_module_teacher(tmp_path, images):
    t = create_teacher("module:teacher_factories:tiny_net", num_classes=4)
    assert t.num_classes == 4 and t.logits(images).shape == (2, 4)
    assert not t.model.training
    torch.testing.assert_close(t.logits(images), t.logits(images), rtol=0, atol=0)  # dropout is off
    path = save(t.model.state_dict(), tmp_path / "tiny.safetensors")
    other = create_teacher("module:teacher_factories:tiny_net", num_classes=4, checkpoint=path)
    torch.testing.assert_close(other.logits(images), t.logits(images), rtol=0, atol=0)
    fixed = create_teacher("module:teacher_factories:fixed_net")  # no num_classes anywhere: one forward pass
    assert fixed.num_classes == 7 and fixed.logits(images).shape == (2, 7)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("module:teacher_factories:not_a_module", "returned a str, expected an nn.Module"),
        ("module:teacher_factories:NOT_CALLABLE", "is a int, not a callable"),
        ("module:teacher_factories:nope", "has no attribute 'nope'"),
        ("module:no_such_pkg.mod:f", "cannot import module 'no_such_pkg.mod'"),
        ("module:teacher_factories", "expected 'module:package.module:factory'"),
    ],
)
def test_module_teacher_errors(spec, match):
    with pytest.raises(TeacherError, match=match):
        create_teacher(spec)


# ---- ensembles ---------------------------------------------------------------------------------


def test_ensemble_is_log_mean_softmax(tmp_path, images):
    a = save(teacher(seed=1).model.state_dict(), tmp_path / "a.pth")
    b = save(teacher(seed=2, spec="module:teacher_factories:tiny_net").model.state_dict(), tmp_path / "b.safetensors")
    ens = create_teacher(f"ensemble:{SPEC}@{a},module:teacher_factories:tiny_net@{b}", num_classes=NC)
    assert isinstance(ens, EnsembleTeacher) and ens.num_classes == NC
    members = [teacher(checkpoint=a), teacher(spec="module:teacher_factories:tiny_net", checkpoint=b)]
    probs = torch.stack([m.logits(images).softmax(-1) for m in members]).mean(0)
    out = ens.logits(images)
    assert out.shape == (2, NC) and out.dtype == torch.float32
    torch.testing.assert_close(out, probs.log(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.softmax(-1), probs, rtol=1e-5, atol=1e-7)
    # identity: member specs without the paths, weights hash from the members' checkpoints
    desc = ens.describe()
    assert desc["spec"] == f"ensemble:{SPEC},module:teacher_factories:tiny_net"
    assert [m["weights_sha256"] for m in desc["members"]] == [file_sha256(a), file_sha256(b)]
    c = save(teacher(seed=3, spec="module:teacher_factories:tiny_net").model.state_dict(), tmp_path / "c.pth")
    other = create_teacher(f"ensemble:{SPEC}@{a},module:teacher_factories:tiny_net@{c}", num_classes=NC)
    assert other.describe()["spec"] == desc["spec"] and other.weights_sha256 != ens.weights_sha256
    weighted = create_teacher(f"ensemble:{SPEC}@{a}*3,module:teacher_factories:tiny_net@{b}", num_classes=NC)
    probs = [m.logits(images).softmax(-1) for m in members]
    torch.testing.assert_close(weighted.logits(images).exp(), 0.75 * probs[0] + 0.25 * probs[1], rtol=1e-5, atol=1e-7)
    assert [m["weight"] for m in weighted.describe()["members"]] == [0.75, 0.25]
    assert weighted.describe()["spec"] == f"ensemble:{SPEC}*3,module:teacher_factories:tiny_net*1"
    assert weighted.weights_sha256 != ens.weights_sha256


def test_ensemble_errors(tmp_path):
    with pytest.raises(TeacherError, match=r"disagree on num_classes.*fixed_net: 7.*tiny_net: 10"):
        create_teacher("ensemble:module:teacher_factories:fixed_net,module:teacher_factories:tiny_net")
    with pytest.raises(TeacherError, match="takes no checkpoint"):
        create_teacher(f"ensemble:{SPEC}", NC, checkpoint=tmp_path / "a.pth")
    with pytest.raises(TeacherError, match="cannot be nested"):
        create_teacher(f"ensemble:ensemble:{SPEC}", NC)
    with pytest.raises(TeacherError, match="malformed member"):
        create_teacher(f"ensemble:{SPEC}@", NC)


# ---- store teacher ---------------------------------------------------------------------------------

STORE_N = 256
TEACHER_ENTRY = {"spec": "timm:resnet50", "weights_sha256": "ab" * 32, "num_classes": 50}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("teachers") / "store.zarr"
    s = create_store(path, manifest(num_samples=STORE_N, teacher=dict(TEACHER_ENTRY)))
    write_epoch(s, 0)  # epoch 1 of 2 is left uncommitted
    return path


def test_store_teacher_rebuilds_stored_records(store):
    t = create_teacher(f"store:{store}")
    assert isinstance(t, StoreTeacher) and t.num_classes == 50
    assert t.describe() == TEACHER_ENTRY
    ids = np.array([5, 200, 0, 77])
    images = torch.zeros(len(ids), 3, 8, 8)
    out = t.logits(images, 0, torch.from_numpy(ids))
    assert out.shape == (4, 50) and out.dtype == torch.float32 and out.device == images.device
    rec = records_for(t.store.manifest, 0, ids)  # what was written, computed independently of the store
    sparse = (
        torch.from_numpy(rec.values),
        torch.from_numpy(rec.indices.astype(np.int64)),
        torch.from_numpy(rec.tail_lse),
    )
    torch.testing.assert_close(out.softmax(-1), rebuild_probs(*sparse, num_classes=50), rtol=1e-5, atol=1e-7)
    for temperature in (2.0, 4.0):
        torch.testing.assert_close(
            (out / temperature).log_softmax(-1),
            rebuild_log_probs(*sparse, num_classes=50, temperature=temperature),
            rtol=1e-5,
            atol=1e-5,
        )
    assert math.isclose(float(out.exp().sum(-1)[0]), 1.0, rel_tol=1e-5)


def test_store_teacher_errors_name_epoch_and_ids(store):
    t = StoreTeacher(store)
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(TeacherError, match=r"epoch 1, ids \[3, 4\].*not committed"):
        t.logits(images, 1, torch.tensor([3, 4]))
    with pytest.raises(TeacherError, match=r"epoch 9, ids \[3, 4\].*outside the store's epochs"):
        t.logits(images, 9, torch.tensor([3, 4]))
    with pytest.raises(TeacherError, match=rf"epoch 0, ids \[3, {STORE_N}\].*out of range"):
        t.logits(images, 0, torch.tensor([3, STORE_N]))
    with pytest.raises(TeacherError, match="need the epoch and the sample ids"):
        t.logits(images, None, torch.tensor([3, 4]))
    with pytest.raises(TeacherError, match="need the epoch and the sample ids"):
        t.logits(images, 0)
    with pytest.raises(TeacherError, match="2 images but 3 ids"):
        t.logits(images, 0, torch.tensor([3, 4, 5]))
    with pytest.raises(TeacherError, match="holds 50 classes, but num_classes=10"):
        create_teacher(f"store:{store}", num_classes=10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_teachers_return_float32_on_the_images_device(images, store):
    t = teacher(device="cuda")
    assert next(t.model.parameters()).is_cuda
    out = t.logits(images.cuda())  # bfloat16 autocast inside, float32 out
    assert out.is_cuda and out.dtype == torch.float32
    ref = teacher().logits(images)
    assert (out.cpu() - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-2
    assert t.logits(images).device.type == "cpu"
    stored = StoreTeacher(store).logits(torch.zeros(2, 3, 8, 8, device="cuda"), 0, torch.tensor([1, 2]))
    assert stored.is_cuda and stored.dtype == torch.float32


# ---- teachers the timm way ---------------------------------------------------------------------------


@pytest.fixture
def pretrained_file(tmp_path):
    """A stand-in for timm's cached pretrained weights: a 1000-class test_vit, as a local file."""
    torch.manual_seed(5)
    model = timm.create_model("test_vit")
    path = tmp_path / "test_vit_pretrained.safetensors"
    save_file(model.state_dict(), str(path))
    return model.eval(), path


def test_a_pretrained_head_of_another_class_count_is_refused_or_mapped(pretrained_file, tmp_path, images):
    model, path = pretrained_file
    with pytest.raises(TeacherError, match=r"has 1000 classes but the data has 3: give \?class_map=FILE"):
        create_teacher(f"timm:test_vit?file={path}", num_classes=3)
    class_map = tmp_path / "map.txt"
    class_map.write_text("7\n0\n999\n")  # data class 0 is the teacher's 7, class 1 its 0, class 2 its 999
    mapped = create_teacher(f"timm:test_vit?file={path}&class_map={class_map}", num_classes=3)
    with torch.no_grad():
        expected = model(images)[:, [7, 0, 999]]
    assert mapped.num_classes == 3 and mapped.describe()["class_indices"] == [7, 0, 999]
    torch.testing.assert_close(mapped.logits(images), expected)
    full = create_teacher(f"timm:test_vit?file={path}", num_classes=1000)  # the same classes: no map needed
    torch.testing.assert_close(full.logits(images), model(images).detach())
    with pytest.raises(TeacherError, match=r"class_map .* has 3 lines, the data 4 classes"):
        create_teacher(f"timm:test_vit?file={path}&class_map={class_map}", num_classes=4)


def test_model_kwargs_in_the_spec(images):
    teacher = create_teacher("timm:test_vit?drop_path_rate=0.25&global_pool=avg", num_classes=NC)
    assert teacher.model.global_pool == "avg" and teacher.model.blocks[-1].drop_path1.drop_prob == 0.25
    assert teacher.spec == "timm:test_vit?drop_path_rate=0.25&global_pool=avg"  # part of a store's identity


def test_timm_training_checkpoint_loads_its_ema_weights_safely(tmp_path, images):
    import argparse

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=NC)
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 9, "arch": "test_vit", "args": argparse.Namespace(lr=0.1, model="test_vit"),
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "state_dict_ema": ema, "metric": 71.2}, path)  # fmt: skip
    loaded = create_teacher("timm:test_vit", num_classes=NC, checkpoint=path)
    reference = timm.create_model("test_vit", num_classes=NC).eval()
    reference.load_state_dict(ema)
    torch.testing.assert_close(loaded.logits(images), reference(images).detach())  # as timm loads it: the EMA


def test_module_teacher_from_the_working_directory(tmp_path, monkeypatch, images):
    (tmp_path / "my_nets.py").write_text(
        "import timm\ndef small(num_classes=10, depth=1):\n"
        "    return timm.create_model('test_vit', num_classes=num_classes, depth=depth)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    teacher = create_teacher("module:my_nets:small?depth=2", num_classes=NC)
    assert len(teacher.model.blocks) == 2
    with pytest.raises(TeacherError, match=r"cannot import module 'no_nets'.*set PYTHONPATH"):
        create_teacher("module:no_nets:small", num_classes=NC)


def test_open_clip_model_without_weights_drops_only_open_clips_warning(monkeypatch, caplog):
    random_init = "No pretrained weights loaded for model 'TinyCLIP-test'. Model initialized randomly."
    with caplog.at_level(logging.WARNING):  # open_clip alone warns, on the root logger
        open_clip.create_model("TinyCLIP-test")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("root", random_init)]
    caplog.clear()
    real = open_clip.create_model

    def create_and_log(*args, **kwargs):  # other code logging while the model is built is heard
        model = real(*args, **kwargs)
        logging.getLogger("another.library").warning("a library's warning")
        logging.warning("a root warning from elsewhere")
        return model

    monkeypatch.setattr(open_clip, "create_model", create_and_log)
    filters, disabled = list(logging.getLogger().filters), logging.root.manager.disable
    with caplog.at_level(logging.WARNING):
        create_open_clip_model("TinyCLIP-test")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("another.library", "a library's warning"),
        ("root", "a root warning from elsewhere"),
    ]
    assert logging.getLogger().filters == filters and logging.root.manager.disable == disabled  # restored
