"""Tests for the model zoo registry, its builders and student selection."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compress_toolbox.load.analysis import analyse, count_params
from compress_toolbox.tasks import get_task
from model_zoo import ZooEntry, get_model, list_models, pick_student, register_model, registry
from model_zoo.registry import ESTIMATE_SLACK, ZooCost, get_entry

CLASSIFICATION = list_models("classification")
SEGMENTATION = list_models("segmentation")
DETECTION = list_models("detection")
YOLO = [name for name in DETECTION if get_entry(name).family == "yolo"]
TORCHVISION_DETECTION = sorted(set(DETECTION) - set(YOLO))  # decoded detections, no raw head


def _forward(model: nn.Module, x: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return model(x)


def _teacher(name: str, input_shape: tuple[int, int, int], num_outputs: int):
    model = get_model(
        name, num_classes=num_outputs, in_channels=input_shape[0], input_size=input_shape[1:]
    )
    return SimpleNamespace(
        model=model,
        input_shape=input_shape,
        num_outputs=num_outputs,
        analysis=analyse(model, input_shape),
    )


def test_expected_models_registered():
    assert {
        "lenet5",
        "lenet5_half",
        "hinton_mlp",
        "hinton_mlp_half",
        "resnet18",
        "resnet34",
        "wrn_16_2",
        "wrn_40_2",
        "mobilenet_v2",
        "vgg11_bn",
    } <= set(CLASSIFICATION)
    assert {"lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "unet_small"} <= set(
        SEGMENTATION
    )
    assert set(DETECTION) == {
        "ssdlite320_mobilenet_v3_large",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "yolo_pico",
        "yolo_nano",
        "yolo_small",
    }


def test_list_models_sorted_and_filtered():
    everything = list_models()
    assert everything == sorted(everything)
    assert sorted(CLASSIFICATION + SEGMENTATION + DETECTION) == everything
    for task, names in [
        ("classification", CLASSIFICATION),
        ("segmentation", SEGMENTATION),
        ("detection", DETECTION),
    ]:
        assert names == sorted(names)
        assert all(get_entry(name).task == task for name in names)


def test_unknown_model_and_task_errors_are_clear():
    with pytest.raises(ValueError, match=r"unknown zoo model 'nope'; known: .*lenet5"):
        get_model("nope", num_classes=10)
    with pytest.raises(ValueError, match="unknown zoo model"):
        get_entry("nope")
    with pytest.raises(ValueError, match="unknown task"):
        list_models("captioning")


def test_entry_fields():
    entry = get_entry("lenet5")
    assert isinstance(entry, ZooEntry)
    assert (entry.name, entry.task, entry.family) == ("lenet5", "classification", "lenet")
    assert entry.default_input == (1, 32, 32)
    assert entry.default_num_classes == 10
    assert get_entry("hinton_mlp").default_input == (1, 28, 28)
    assert get_entry("resnet18").default_input == (3, 32, 32)
    assert get_entry("ssdlite320_mobilenet_v3_large").default_input == (3, 320, 320)


def test_register_model_rejects_duplicates_and_bad_tasks():
    with pytest.raises(ValueError, match="already registered"):

        @register_model(
            task="classification", family="x", default_input=(1, 8, 8), default_num_classes=2,
            meta=ZooCost(params=1, macs=1),
        )
        def lenet5(*, num_classes, in_channels=3, input_size=None):
            return nn.Identity()

    with pytest.raises(ValueError, match="unknown task"):
        register_model(task="nope", family="x", default_input=(1, 8, 8), default_num_classes=2)
    with pytest.raises(ValueError, match="needs its cost"):
        register_model(task="classification", family="x", default_input=(1, 8, 8),
                       default_num_classes=2)  # fmt: skip


@pytest.mark.parametrize("name", list_models())
def test_cost_metadata_is_what_the_model_measures(name):
    """Each entry's ``meta`` is its model's parameter count and MACs at its default input (a
    changed builder must update its metadata)."""
    entry = get_entry(name)
    model = entry.build()
    assert count_params(model) == entry.meta.params
    assert analyse(model, entry.default_input).macs == entry.meta.macs


def _within(estimate: int, measured: int) -> bool:
    return measured / ESTIMATE_SLACK <= estimate <= measured * ESTIMATE_SLACK


_OTHER_INPUTS = [(1, 28, 28), (3, 64, 48), (3, 96, 96)]


@pytest.mark.parametrize("name", CLASSIFICATION + SEGMENTATION + YOLO)
def test_cost_estimates_hold_at_other_inputs(name):
    """``estimate`` (no model built) is within ESTIMATE_SLACK of the measured cost at other
    inputs and class counts (exact for the rules of LeNet-5 and the MLPs), as pick_student
    assumes."""
    entry = get_entry(name)
    for shape in _OTHER_INPUTS:
        model = entry.build(num_classes=7, in_channels=shape[0], input_size=shape[1:])
        measured = ZooCost(count_params(model), analyse(model, shape).macs)
        estimate = entry.estimate(num_classes=7, in_channels=shape[0], input_size=shape[1:])
        if entry.family in ("lenet", "mlp"):
            assert estimate == measured
        assert _within(estimate.params, measured.params), (shape, estimate, measured)
        assert _within(estimate.macs, measured.macs), (shape, estimate, measured)


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """The names of the zoo models built from now on, in order."""
    built: list[str] = []
    for name in list_models():
        entry = get_entry(name)

        def counting(*, _builder=entry.builder, _name=name, **kwargs):
            built.append(_name)
            return _builder(**kwargs)

        monkeypatch.setitem(registry._REGISTRY, name, replace(entry, builder=counting))
    return built


def test_pick_student_builds_only_the_model_it_picks(builds):
    teacher = _teacher("lenet5", (1, 32, 32), 10)
    builds.clear()
    assert pick_student("classification", teacher)[0] == "lenet5_half"
    assert builds == ["lenet5_half"]  # not the ResNets, WRNs, VGG, MobileNet, MLPs, LeNet-5
    teacher = _teacher("lraspp_mobilenet_v3_large", (1, 64, 64), 11)
    builds.clear()
    assert pick_student("segmentation", teacher)[0] == "unet_micro"
    assert builds == ["unet_micro", "lraspp_mobilenet_v3_small"]  # the two close to 1/4


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification_default_and_adapted(name):
    entry = get_entry(name)
    c, h, w = entry.default_input
    model = get_model(name, num_classes=entry.default_num_classes, in_channels=c)
    out = _forward(model, torch.randn(2, c, h, w))
    assert out.shape == (2, entry.default_num_classes)

    model = get_model(name, num_classes=7, in_channels=1, input_size=(h, w))
    out = _forward(model, torch.randn(3, 1, h, w))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification_other_input_size(name):
    """Every classifier also adapts to 28x28 RGB (MNIST-size, 3 channels)."""
    model = get_model(name, num_classes=5, in_channels=3, input_size=(28, 28))
    assert _forward(model, torch.randn(1, 3, 28, 28)).shape == (1, 5)


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_default_and_adapted(name):
    entry = get_entry(name)
    c, h, w = entry.default_input
    model = get_model(name, num_classes=entry.default_num_classes, in_channels=c)
    out = _forward(model, torch.randn(2, c, h, w))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, entry.default_num_classes, h, w)

    model = get_model(name, num_classes=7, in_channels=1, input_size=(64, 48))
    out = _forward(model, torch.randn(1, 1, 64, 48))
    assert out.shape == (1, 7, 64, 48)
    assert torch.isfinite(out).all()


def test_unet_odd_size_keeps_resolution():
    model = get_model("unet_small", num_classes=3, in_channels=3, input_size=(37, 50))
    assert _forward(model, torch.randn(1, 3, 37, 50)).shape == (1, 3, 37, 50)


@pytest.mark.parametrize("name", TORCHVISION_DETECTION)
def test_detection_eval_forward(name):
    model = get_model(name, num_classes=5)
    images = [torch.rand(3, 320, 320)]
    detections = _forward(model, images)
    assert isinstance(detections, list) and len(detections) == 1
    assert {"boxes", "labels", "scores"} <= set(detections[0])
    assert detections[0]["boxes"].shape[-1] == 4
    if len(detections[0]["labels"]):
        assert int(detections[0]["labels"].max()) < 5


@pytest.mark.parametrize("name", TORCHVISION_DETECTION)
def test_detection_adapts_in_channels(name):
    model = get_model(name, num_classes=3, in_channels=1)
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == 1
    assert len(model.transform.image_mean) == len(model.transform.image_std) == 1
    detections = _forward(model, [torch.rand(1, 320, 320)])
    assert len(detections) == 1 and "boxes" in detections[0]


def _widths(model: nn.Module) -> list[int]:
    return [
        m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]


def test_lenet5_widths():
    assert _widths(get_model("lenet5", num_classes=10, in_channels=1)) == [6, 16, 120, 84, 10]
    assert _widths(get_model("lenet5_half", num_classes=10, in_channels=1)) == [3, 8, 60, 42, 10]
    analysis = analyse(get_model("lenet5", num_classes=10, in_channels=1), (1, 32, 32))
    assert analysis.widths == [6, 16, 120, 84, 10]
    assert analysis.params == 61706  # the classic LeNet-5 parameter count


def test_lenet5_flatten_follows_input_size():
    model = get_model("lenet5", num_classes=10, in_channels=1, input_size=(28, 28))
    first_fc = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert first_fc.in_features == 16 * 4 * 4
    assert _forward(model, torch.randn(4, 1, 28, 28)).shape == (4, 10)
    with pytest.raises(ValueError, match="at least 14x14"):
        get_model("lenet5", num_classes=10, in_channels=1, input_size=(8, 8))


def test_hinton_mlp_widths():
    assert _widths(get_model("hinton_mlp", num_classes=10, in_channels=1)) == [1200, 1200, 10]
    assert _widths(get_model("hinton_mlp_half", num_classes=10, in_channels=1)) == [800, 800, 10]


def test_mobilenet_v2_stem_stride_depends_on_input_size():
    small = get_model("mobilenet_v2", num_classes=10, in_channels=1, input_size=(32, 32))
    large = get_model("mobilenet_v2", num_classes=10, in_channels=3, input_size=(96, 96))
    stem_small = next(m for m in small.modules() if isinstance(m, nn.Conv2d))
    stem_large = next(m for m in large.modules() if isinstance(m, nn.Conv2d))
    assert (stem_small.in_channels, stem_small.stride) == (1, (1, 1))
    assert (stem_large.in_channels, stem_large.stride) == (3, (2, 2))


def test_pick_student_classification():
    teacher = _teacher("lenet5", (1, 32, 32), 10)
    name, student = pick_student("classification", teacher)
    assert name == "lenet5_half"
    assert get_entry(name).task == "classification"
    out = _forward(student, torch.randn(2, *teacher.input_shape))
    assert out.shape == (2, teacher.num_outputs)


# Excluding the big CNNs keeps the pick_student tests below fast.
_BIG = {"mobilenet_v2", "resnet18", "resnet34", "vgg11_bn", "wrn_40_2"}


def test_pick_student_respects_exclude():
    teacher = _teacher("hinton_mlp", (1, 28, 28), 10)
    first, _ = pick_student("classification", teacher, exclude=_BIG)
    name, student = pick_student("classification", teacher, exclude={first, *_BIG})
    assert name != first  # the next closest to 1/4 of the teacher's MACs
    assert _forward(student, torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_pick_student_never_picks_a_bigger_model():
    teacher = _teacher("lenet5_half", (1, 32, 32), 10)
    with pytest.raises(ValueError, match="not smaller than the teacher"):
        pick_student("classification", teacher, exclude=_BIG)


def test_pick_student_segmentation():
    teacher = _teacher("unet_small", (3, 64, 64), 5)
    name, student = pick_student("segmentation", teacher)
    assert name in SEGMENTATION
    assert name == "unet_tiny"  # half width of the teacher: ~1/4 of its MACs
    out = _forward(student, torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5, 64, 64)


def test_pick_student_for_an_lraspp_teacher_is_the_micro_unet():
    # 1 channel, 64x64, 11 classes (the segmentation benchmark): LR-ASPP MobileNetV3-Large
    # 32.1 M MACs; unet_micro 9.3 M (0.29) is closer to 1/4 than the LR-ASPP Small's 10.0 M
    teacher = _teacher("lraspp_mobilenet_v3_large", (1, 64, 64), 11)
    name, student = pick_student("segmentation", teacher)
    assert name == "unet_micro"
    assert _forward(student, torch.randn(2, 1, 64, 64)).shape == (2, 11, 64, 64)


def test_pick_student_skips_models_that_cannot_run():
    # 10x10 is too small for LeNet-5; the others adapt.
    teacher = SimpleNamespace(
        input_shape=(1, 10, 10), num_outputs=4, analysis=SimpleNamespace(macs=4_000_000, params=0)
    )
    name, student = pick_student("classification", teacher, exclude=_BIG)
    assert name in {"hinton_mlp", "hinton_mlp_half", "wrn_16_2"}
    assert _forward(student, torch.randn(1, 1, 10, 10)).shape == (1, 4)


def test_pick_student_flat_features():
    teacher = _teacher("hinton_mlp", (1, 28, 28), 10)
    flat = SimpleNamespace(input_shape=(784,), num_outputs=10, analysis=teacher.analysis)
    name, student = pick_student("classification", flat, exclude=_BIG)
    assert name == "hinton_mlp_half"
    assert pick_student(get_task("classification"), flat, exclude=_BIG)[0] == name
    assert _forward(student, torch.randn(2, 784)).shape == (2, 10)


def test_pick_student_detection_falls_back_to_params():
    teacher = SimpleNamespace(
        input_shape=(3, 320, 320),
        num_outputs=4,
        analysis=SimpleNamespace(macs=10**9, params=4 * 3_500_000),
    )
    name, student = pick_student("detection", teacher)
    assert name == "ssdlite320_mobilenet_v3_large"  # ~3.4M params, closest to 14M / 4
    assert isinstance(_forward(student, [torch.rand(3, 320, 320)]), list)


@pytest.mark.parametrize("head, locations, anchors", [("yolov8", 60, 1), ("yolov5", 60, 1),
                                                     ("yolov5", 180, 3)])  # fmt: skip
def test_yolo_students_give_a_yolo_teachers_raw_head(head, locations, anchors):
    """4 classes at 64x48: 8x6 + 4x3 = 60 cells at strides 8 and 16 (YOLOv5: 3 anchors each);
    locations level by level, anchor slot by slot, row-major, as ultralytics lays them out; a
    location count no run of grids gives is refused."""
    model = get_model("yolo_pico", num_classes=4, in_channels=1, input_size=(64, 48), head=head,
                      locations=locations)  # fmt: skip
    for level in model.box:  # every box the same size: each centre is its cell's
        nn.init.zeros_(level[-1].weight), nn.init.zeros_(level[-1].bias)
    out = _forward(model, torch.rand(2, 1, 64, 48))
    rows = out.transpose(1, 2) if head == "yolov8" else out
    channels = {"yolov8": 4 + 4, "yolov5": 5 + 4}[head]  # box (and objectness), 4 scores
    assert rows.shape == (2, locations, channels)
    assert model.strides == (8, 16) and model.anchors == anchors
    cells = [(x, y) for y in range(4, 64, 8) for x in range(4, 48, 8)]  # stride 8, row-major
    centres = [tuple(c) for c in rows[0, : 48 * anchors, :2].tolist()]
    assert centres == cells * anchors
    with pytest.raises(ValueError, match="61 locations are no run of grids"):
        get_model("yolo_pico", num_classes=4, input_size=(64, 48), head=head, locations=61)


def _detector_teacher(model: nn.Module, input_shape: tuple[int, int, int]) -> SimpleNamespace:
    analysis = analyse(model, input_shape)
    return SimpleNamespace(input_shape=input_shape, num_outputs=analysis.num_outputs,
                           analysis=analysis)  # fmt: skip


def test_pick_student_for_a_yolo_teacher_gives_its_head_and_refuses_other_heads():
    from compress_toolbox.tasks.detection.tiny_model import TinyBoxesScores, TinyYolo

    teacher = _detector_teacher(TinyYolo(5, 3, 32, 96), (3, 96, 96))
    name, student = pick_student("detection", teacher)
    assert name in YOLO and _forward(student, torch.rand(1, 3, 96, 96)).shape[1:] == (9, 180)
    two_outputs = _detector_teacher(TinyBoxesScores(5, 3, 32), (3, 96, 96))
    two_outputs.analysis = replace(two_outputs.analysis, output_shape=(180, 13))  # as joined
    with pytest.raises(ValueError, match=r"no detection zoo .*yolov5 head, not boxes\+scores"):
        pick_student(_bound_detection(two_outputs), two_outputs)


def _bound_detection(teacher):
    """The detection task as bound to a two-output teacher (boxes and logits joined)."""
    from compress_toolbox.tasks.detection.heads import joined

    return replace(get_task("detection"), head=joined([("boxes", 8), ("scores", 5)], True))


def test_pick_student_none_works():
    teacher = SimpleNamespace(
        input_shape=(1, 10, 10), num_outputs=4, analysis=SimpleNamespace(macs=4_000_000, params=0)
    )
    with pytest.raises(ValueError, match="no classification zoo model works"):
        pick_student("classification", teacher, exclude=set(CLASSIFICATION))
    with pytest.raises(ValueError, match="unknown task"):
        pick_student("captioning", teacher)
