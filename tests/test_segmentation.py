"""Segmentation teachers (issue 14): task plumbing, per-pixel methods, mIoU, mask eval data and
`dafl-compress --task segmentation` end to end, on a tiny U-Net trained in a few seconds."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cli.main import main
from compress_toolbox import CompressConfig, compress, plan_student
from compress_toolbox.distillation import distill
from compress_toolbox.distillation.losses import information_entropy_loss, kd_loss, one_hot_loss
from compress_toolbox.errors import DaflError
from compress_toolbox.export.writer import export_onnx, export_pt2, export_student
from compress_toolbox.load.teacher import Teacher, load_teacher
from compress_toolbox.tasks import as_samples
from compress_toolbox.tasks.evaldata import EvalDataError, load_eval_data, score
from compress_toolbox.tasks.segmetrics import score_masks
from model_zoo.segmentation import UNet

SHAPE = (1, 16, 16)
CLASSES = 4
FAST = ["--iters", "60", "--batch-size", "16", "--no-progress", "--threads", "1"]


def scenes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark noisy 16x16 canvases with up to three squares; a square's brightness is its class."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(count, 1, 16, 16, generator=g) * 0.2
    y = torch.zeros(count, 16, 16, dtype=torch.long)
    for i in range(count):
        for cls in (1, 2, 3):
            if torch.rand(1, generator=g) < 0.7:
                side = int(torch.randint(4, 8, (1,), generator=g))
                top, left = torch.randint(0, 16 - side, (2,), generator=g).tolist()
                x[i, 0, top : top + side, left : left + side] = 0.25 * cls + 0.1 * torch.rand(
                    1, generator=g
                )
                y[i, top : top + side, left : left + side] = cls
    return x, y


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    """A tiny U-Net (BatchNorm, concatenating skips) that segments the scenes well."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = UNet(CLASSES, 1, (8, 16))
    x, y = scenes(400, 0)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        index = torch.randint(len(x), (16,))
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def files(unet, tmp_path_factory):
    """The teacher as torch's default ONNX, legacy ONNX, TorchScript and .pt2; eval masks."""
    root = tmp_path_factory.mktemp("seg")
    export_onnx(unet, SHAPE, root / "seg.onnx")
    export_onnx(unet, SHAPE, root / "seg_legacy.onnx", opset=17)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(unet, torch.rand(2, *SHAPE)).save(str(root / "seg.ts"))
    export_pt2(unet, SHAPE, root / "seg.pt2")
    x, y = scenes(48, 1)
    y[:, 0, :] = 255  # the top row ignored
    np.savez(root / "masks.npz", x=(x[:, 0] * 255).to(torch.uint8).numpy(),
             y=y.to(torch.uint8).numpy())  # fmt: skip
    return root


def test_miou_on_a_hand_made_mask_set():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 255]]])
    predictions = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 1]]])  # the 255 pixel counts nowhere
    scores = score_masks(predictions, labels, 4)
    # class 0: tp 2, fp 1 (a 2 predicted 0), fn 1 -> 2/4; class 1: tp 2, fp 1 -> 2/3;
    # class 2: tp 1, fn 1 -> 1/2; class 3: absent from both -> no IoU, not in the mean
    assert scores.per_class_iou[:3] == pytest.approx([0.5, 2 / 3, 0.5])
    assert scores.per_class_iou[3] is None
    assert scores.mean_iou == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert scores.pixel_accuracy == pytest.approx(5 / 7)
    assert score(predictions, labels) == pytest.approx(scores.mean_iou)
    assert score(torch.tensor([1, 2]), torch.tensor([1, 0])) == 0.5  # classifiers: accuracy


def test_pixel_losses_treat_each_pixel_as_a_sample():
    logits = torch.randn(2, 5, 3, 4)
    flat = as_samples(logits)
    assert flat.shape == (24, 5) and torch.equal(flat[1], logits[0, :, 0, 1])
    other = torch.randn(2, 5, 3, 4)
    flat_kd = kd_loss(flat, as_samples(other), 4.0)
    assert kd_loss(logits, other, 4.0) == pytest.approx(float(flat_kd))
    assert one_hot_loss(logits) == pytest.approx(float(one_hot_loss(flat)))
    # entropy of the class distribution over all pixels of the batch: balanced pixels -> -1
    balanced = F.one_hot(torch.arange(24).reshape(2, 3, 4) % 2, 2).movedim(-1, 1) * 50.0
    assert information_entropy_loss(balanced, 2.0) == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("name", ["seg.onnx", "seg_legacy.onnx", "seg.ts", "seg.pt2"])
def test_formats_import_derive_and_export(files, tmp_path, name):
    teacher = load_teacher(files / name)
    assert teacher.analysis.output_shape == (CLASSES, 16, 16) and teacher.max_rel_diff < 1e-4
    plan = plan_student(teacher, CompressConfig.from_options(task="segmentation", init="teacher"))
    assert plan.analysis.output_shape == (CLASSES, 16, 16)
    assert plan.analysis.params < 0.4 * teacher.analysis.params
    exported = export_student(plan.module, SHAPE, tmp_path)  # verified with onnxruntime
    assert exported.max_rel_diff < 1e-4 and (tmp_path / "student.onnx").is_file()


@pytest.mark.parametrize("method", ["dafl", "dafl-seg", "adversarial", "dfad", "bn-prior", "noise"])
def test_each_method_runs_per_pixel(unet, method):
    teacher = Teacher.from_module(unet, SHAPE)
    student = plan_student(
        teacher, CompressConfig.from_options(task="segmentation", init="fresh")
    ).module
    result = distill(teacher, student, task="segmentation", method=method, iters=4,
                     batch_size=8, progress=False, threads=1, health_every=2)  # fmt: skip
    losses = [v for row in result.history for k, v in row.items() if k.startswith("loss_")]
    assert result.method == method and losses and all(math.isfinite(v) for v in losses)
    assert result.health is not None and 1 <= result.health.classes <= CLASSES


def test_a_fresh_student_trains_at_segmentations_own_rate(unet, tmp_path):
    """The fast preset's student_lr_by_task: 1e-2 for segmentation, 5e-3 elsewhere."""
    from compress_toolbox.distillation.trainer import CHECKPOINT_NAME

    teacher = Teacher.from_module(unet, SHAPE)
    student = plan_student(
        teacher, CompressConfig.from_options(task="segmentation", init="fresh")
    ).module
    distill(teacher, student, task="segmentation", method="dafl-seg", iters=2, batch_size=8,
            progress=False, threads=1, checkpoint_dir=tmp_path)  # fmt: skip
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["student_rates"] == [1e-2, 1e-4]


def test_class_conditional_method_is_refused_and_auto_picks_dafl_seg(unet):
    teacher = Teacher.from_module(unet, SHAPE)  # keeps BatchNorm: bn-prior for a classifier
    student = plan_student(
        teacher, CompressConfig.from_options(task="segmentation", init="fresh")
    ).module
    result = distill(teacher, student, task="segmentation", iters=2, batch_size=4, progress=False)
    assert result.method == "dafl-seg" and "segmentation benchmark" in result.method_reason
    with pytest.raises(DaflError, match="every pixel"):
        distill(teacher, student, task="segmentation", method="conditional", iters=2,
                progress=False)  # fmt: skip


class DictOutput(nn.Module):
    """A torchvision-style segmentation model: returns {"out": ..., "aux": ...}."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return {"out": out, "aux": out * 0.5}


def test_dict_output_teacher_and_task_refusals(unet, files, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_pt2(DictOutput(unet).eval(), SHAPE, tmp_path / "dict.pt2")
    result = compress(
        tmp_path / "dict.pt2", CompressConfig.from_options(task="segmentation", dry_run=True)
    )
    assert result.plan.analysis.output_shape == (CLASSES, 16, 16)
    assert isinstance(result.teacher.module(torch.rand(2, *SHAPE)), torch.Tensor)
    with pytest.raises(DaflError, match=r"--task classification needs \(N, K\).*--task segm"):
        compress(
            files / "seg.onnx", CompressConfig.from_options(task="classification", dry_run=True)
        )
    with pytest.raises(DaflError, match="fit no detection head layout"):
        compress(files / "seg.onnx", CompressConfig.from_options(task="detection", dry_run=True))


def test_mask_folder_eval_data(files, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    x, y = scenes(3, 2)
    for i in range(3):
        Image.fromarray((x[i, 0] * 255).to(torch.uint8).numpy()).save(images / f"{i}.png")
        Image.fromarray(y[i].to(torch.uint8).numpy(), mode="L").save(masks / f"{i}.png")
    data = load_eval_data(images, SHAPE, num_classes=CLASSES, task="segmentation")
    assert data.x.shape == (3, 1, 16, 16) and torch.equal(data.y, y)
    assert torch.allclose(data.x, (x * 255).to(torch.uint8).float() / 255)


def _bad_masks(files, tmp_path) -> dict[str, tuple]:
    x, y = scenes(4, 3)
    xs = (x[:, 0] * 255).to(torch.uint8).numpy()
    np.savez(tmp_path / "small.npz", x=xs, y=y[:, :8, :8].numpy().astype(np.uint8))
    big = y.numpy().astype(np.uint8)
    big[0, 3, 3] = 7
    np.savez(tmp_path / "label7.npz", x=xs, y=big)
    folder = tmp_path / "folder"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.fromarray(xs[0]).save(folder / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "masks" / "a.png")
    return {"small.npz": "(N, H, W)", "label7.npz": "mask label 7", "a.png": "mask is 8x8"}


def test_bad_masks_exit_2_with_one_line(files, tmp_path, capsys):
    for name, message in _bad_masks(files, tmp_path).items():
        data = tmp_path / "folder" if name == "a.png" else tmp_path / name
        code = main([str(files / "seg.onnx"), "--task", "segmentation", "--eval-data", str(data),
                     "--out", str(tmp_path / "out"), *FAST])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert name in err and message in err, (name, err)
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    with pytest.raises(EvalDataError, match="no mask folder"):
        load_eval_data(tmp_path / "folder" / "masks", SHAPE, task="segmentation")


def test_cli_segmentation_end_to_end(files, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([str(files / "seg.onnx"), "--task", "segmentation", "--eval-data",
                 str(files / "masks.npz"), "--out", str(out), *FAST])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    seg = report["segmentation"]
    assert report["status"] == "ok" and report["task"] == "segmentation"
    assert seg["teacher"]["mean_iou"] > 0.8  # the teacher does segment the scenes
    assert 0.5 * seg["teacher"]["mean_iou"] <= seg["student"]["mean_iou"] <= 1
    assert report["student"]["mean_iou"] == seg["student"]["mean_iou"]
    markdown = (out / "report.md").read_text()
    assert "mean IoU on eval data" in markdown and "Per-class IoU" in markdown
    assert (out / "samples.png").stat().st_size > 1000
    for name in ("student.onnx", "student.pt2", "curves.png", "history.csv"):
        assert (out / name).is_file(), name
    # the figure is measured on student.onnx: recompute it with onnxruntime
    from compress_toolbox.export.writer import onnx_predictions

    data = load_eval_data(files / "masks.npz", SHAPE, num_classes=CLASSES, task="segmentation")
    predictions = onnx_predictions(out / "student.onnx", data.x)
    assert score(predictions, data.y) == pytest.approx(seg["student"]["mean_iou"])


def test_shift_and_flip_moves_each_image_by_its_own_offset():
    """Each image comes back rolled (and maybe mirrored) by its own offset, nothing else."""
    from compress_toolbox.distillation.generator import shift_and_flip

    torch.manual_seed(0)
    raw = torch.rand(16, 1, *SHAPE[1:])
    moved = shift_and_flip(raw)
    offsets = set()
    for i in range(16):
        found = [(dy, dx, flip) for dy in range(16) for dx in range(16) for flip in (0, 1)
                 if torch.equal(moved[i], torch.roll(raw[i], (dy, dx), (-2, -1)).flip(-1)
                                if flip else torch.roll(raw[i], (dy, dx), (-2, -1)))]  # fmt: skip
        assert found, i
        offsets.add(found[0])
    assert len(offsets) > 8  # each image its own offset, not one for the batch


def test_crop_and_flip_moves_each_image_a_little_without_wrapping():
    """Each image comes back moved by at most 1/8 of its size (edge pixels repeated into the
    gap, nothing wrapped round) and maybe mirrored, each by its own offset."""
    from compress_toolbox.distillation.generator import crop_and_flip

    torch.manual_seed(0)
    raw = torch.rand(32, 1, 16, 16)
    moved = crop_and_flip(raw)
    index = torch.arange(16)

    def shifted(image, dy, dx, flip):
        cols = (index - dx).clamp(0, 15)
        cols = 15 - cols if flip else cols
        return image[:, (index - dy).clamp(0, 15)][:, :, cols]

    offsets = set()
    for i in range(32):
        found = [(dy, dx, flip) for dy in range(-2, 3) for dx in range(-2, 3) for flip in (0, 1)
                 if torch.equal(moved[i], shifted(raw[i], dy, dx, flip))]  # fmt: skip
        assert found, i
        offsets.add(found[0])
    assert len(offsets) > 10  # each image its own offset, not one for the batch


def test_photometric_jitter_gives_mid_tones_in_the_domain():
    """Black-and-white images (what a DAFL generator makes) come back with mid-tones, blur or
    noise, each image its own, inside the teacher's domain, with gradients to the input; a
    generator whose output is not pixels (domain None) is left alone."""
    from compress_toolbox.distillation.generator import jitter_photometric
    from compress_toolbox.domain import InputDomain

    torch.manual_seed(0)
    pixels = (torch.rand(32, 1, 16, 16) > 0.5).float().requires_grad_()
    out = jitter_photometric(pixels, InputDomain())
    assert out.min() >= 0 and out.max() <= 1
    assert ((out > 0.05) & (out < 0.95)).float().mean() > 0.5  # mid-tones, not black and white
    assert len({round(float(v), 4) for v in out.detach().mean((1, 2, 3))}) > 16  # per image
    out.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    normalised = InputDomain(mean=(0.5,), std=(0.25,))
    model_in = jitter_photometric(normalised.to_model(pixels.detach()), normalised)
    assert model_in.min() >= -2 - 1e-5 and model_in.max() <= 2 + 1e-5  # (0 - .5)/.25 .. 2
    assert torch.equal(jitter_photometric(pixels, None), pixels)


def test_generated_images_are_augmented_as_the_task_asks(unet):
    """A segmentation teacher sees each generated image moved about and jittered (the task's
    augmentations); a classifier sees it moved a little and mirrored, not jittered."""
    from compress_toolbox.distillation.methods import get_method
    from compress_toolbox.distillation.methods.base import MethodContext
    from compress_toolbox.distillation.presets import get_preset
    from compress_toolbox.domain import InputDomain

    def method(task):
        ctx = MethodContext(teacher=unet, student=unet, input_shape=SHAPE, num_classes=CLASSES,
                            domain=InputDomain(), preset=get_preset("fast"),
                            device=torch.device("cpu"), final_layer="head", task=task)  # fmt: skip
        return get_method("dafl")(ctx)

    torch.manual_seed(0)
    z = torch.randn(16, get_preset("fast").latent_dim)
    seg = method("segmentation")
    assert seg.augmentations == ("shift_and_flip", "photometric")
    seg.generator.eval()
    raw, seen = seg.generator(z), seg._images(z, None)
    assert seen.shape == raw.shape and not torch.equal(seen, raw)
    assert seen.min() >= 0 and seen.max() <= 1
    classifier = method("classification")
    assert classifier.augmentations == ("crop_and_flip",)
    classifier.generator.eval()
    raw, seen = classifier.generator(z), classifier._images(z, None)
    assert seen.shape == raw.shape and not torch.equal(seen, raw)
    assert set(seen.unique().tolist()) <= set(raw.unique().tolist())  # moved, not jittered


def test_a_preset_may_choose_the_augmentations(unet):
    """``Preset.augmentations`` replaces the task's choice; an unknown name is refused."""
    from compress_toolbox.distillation.methods import get_method
    from compress_toolbox.distillation.methods.base import MethodContext
    from compress_toolbox.distillation.presets import get_preset
    from compress_toolbox.domain import InputDomain
    from compress_toolbox.errors import DaflError

    preset = get_preset("fast").with_options(augmentations=["crop_and_flip"])
    ctx = MethodContext(teacher=unet, student=unet, input_shape=SHAPE, num_classes=CLASSES,
                        domain=InputDomain(), preset=preset, device=torch.device("cpu"),
                        final_layer="head", task="segmentation")  # fmt: skip
    assert get_method("dafl")(ctx).augmentations == ("crop_and_flip",)
    with pytest.raises(DaflError, match="unknown augmentation"):
        get_preset("fast").with_options(augmentations=("rotate",))


def test_health_checks_use_few_canvases(unet, monkeypatch):
    """A health check judges the class histogram of whole canvases (H*W pixel samples each):
    the task's 32 canvases, not a classifier's 256 images."""
    from compress_toolbox.distillation.methods.base import GeneratorMethod
    from compress_toolbox.tasks import get_task

    sizes = []
    original = GeneratorMethod.sample

    def sample(self, n):
        sizes.append(n)
        return original(self, n)

    monkeypatch.setattr(GeneratorMethod, "sample", sample)
    teacher = Teacher.from_module(unet, SHAPE)
    student = plan_student(
        teacher, CompressConfig.from_options(task="segmentation", init="fresh")
    ).module
    distill(teacher, student, task="segmentation", method="dafl", iters=2, batch_size=4,
            progress=False, threads=1, health_every=1)  # fmt: skip
    # sample(2) sizes the batch to memory; then two checks and the last one, of 32 canvases
    assert get_task("segmentation").health_samples == 32 and sizes[1:] == [32, 32, 32]


class PlainIsClass(nn.Module):
    """Answers class ``plain`` on dark pixels and class 1 on bright ones (above 0.6)."""

    def __init__(self, plain: int, classes: int = CLASSES) -> None:
        super().__init__()
        self.plain, self.classes = plain, classes

    def forward(self, x):
        bright = (x[:, 0] > 0.6).long()
        labels = torch.where(bright.bool(), torch.ones_like(bright), torch.full_like(bright,
                                                                                   self.plain))
        return F.one_hot(labels, self.classes).movedim(-1, 1).float() * 10.0


def seg_scene_method(teacher: nn.Module):
    from compress_toolbox.distillation.methods import get_method
    from compress_toolbox.distillation.methods.base import MethodContext
    from compress_toolbox.distillation.presets import get_preset
    from compress_toolbox.domain import InputDomain

    ctx = MethodContext(teacher=teacher, student=teacher, input_shape=SHAPE, num_classes=CLASSES,
                        domain=InputDomain(), preset=get_preset("fast"),
                        device=torch.device("cpu"), final_layer=None,
                        task="segmentation")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no final layer: activation loss off
        return get_method("dafl-seg")(ctx)


def test_dafl_seg_cuts_what_the_teacher_calls_objects_and_pastes_it_masked():
    """dafl-seg's pieces: the teacher's background is what it answers on plain canvases (here
    class 2, not 0); each generated image is cut to the box of its other pixels with their
    mask, an image without any keeps whole; pasted, only the masked pixels land."""
    from compress_toolbox.distillation import scenes as scene_module

    method = seg_scene_method(PlainIsClass(plain=2))
    images = torch.zeros(2, 1, 16, 16)
    images[0, 0, 3:7, 5:12] = 1.0  # a bright 4 x 7 object
    images[0, 0, 4, 6] = 0.0  # a hole in it
    pieces, masks = method.scene_pieces(images, method.ctx.teacher(images))
    assert method.background == 2
    assert pieces[0].shape == (1, 4, 7) and masks[0].shape == (4, 7)
    assert masks[0].sum() == 27 and not masks[0][1, 1]
    assert pieces[1].shape == (1, 16, 16) and masks[1].all()
    torch.manual_seed(0)
    pieces, like = [torch.ones(1, 8, 8)] * 3, torch.zeros(3, 1, 32, 32)
    for masked, pasted in ((torch.zeros(8, 8, dtype=torch.bool), False),
                           (torch.ones(8, 8, dtype=torch.bool), True)):  # fmt: skip
        scenes_ = scene_module.compose_scenes(pieces, like, pixels=True, masks=[masked] * 3)
        assert scenes_.shape == (3, 1, 32, 32)
        assert bool((scenes_.flatten(1) == 1.0).any(1).all()) is pasted  # plain canvases < 1


def test_dafl_seg_batches_end_in_scenes_the_teacher_labels(unet, monkeypatch):
    """A quarter of each student batch is composed scenes, with the teacher's logits on them;
    the background it found is kept in the method's state (a resumed run asks no more)."""
    from compress_toolbox.distillation import scenes as scene_module

    monkeypatch.setattr(scene_module, "compose_scenes",
                        lambda pieces, like, **_: torch.full_like(like, 0.25))  # fmt: skip
    method = seg_scene_method(unet)
    batch = method.generate(8)
    scenes_ = round(8 * method.scene_share)
    assert scenes_ == 2 and batch.x.shape == (8, *SHAPE) and set(batch.losses) == {"oh", "ie"}
    assert batch.x[-scenes_:].eq(0.25).all() and not batch.x[:-scenes_].eq(0.25).all()
    with torch.no_grad():
        assert torch.allclose(batch.teacher_logits[-scenes_:], unet(batch.x[-scenes_:]),
                              atol=1e-5)  # fmt: skip
    resumed = seg_scene_method(unet)
    resumed.load_state_dict(method.state_dict())
    assert resumed.background == method.background is not None
