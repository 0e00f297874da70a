"""--task detection: head layouts, decoding + NMS, COCOeval mAP, eval-data refusals, the
distillation loss, and a tiny YOLOv8-style ONNX teacher run end to end in a few seconds into a
drop-in student.onnx (the teacher's names, ranks, shapes and dtypes, checked in onnxruntime)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import one_error_line, run_cli
from torch import nn

from compress_toolbox.tasks.detection.data import save_detection_npz
from compress_toolbox.tasks.detection.decode import Detections, decode
from compress_toolbox.tasks.detection.heads import HeadLayout, recognise
from compress_toolbox.tasks.detection.loss import detection_kd_loss
from compress_toolbox.tasks.detection.metrics import GroundTruth, mean_average_precision
from compress_toolbox.tasks.detection.scenes import SceneSpec, compose_scenes, digit_objects
from compress_toolbox.tasks.detection.signature import signature
from compress_toolbox.tasks.detection.tiny_model import TinyYolo
from compress_toolbox.tasks.detection.training import export_detector

SIZE, CLASSES = 32, 3  # (N, 7, 20) outputs: 16 locations at stride 8, 4 at stride 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny untrained YOLOv8-style teacher exported as users ship it, and scenes of digits."""
    folder = tmp_path_factory.mktemp("detection")
    torch.manual_seed(0)
    export_detector(TinyYolo(CLASSES, 3, 8, SIZE), folder / "det.onnx", SIZE)
    objects, labels = digit_objects()
    keep = labels < CLASSES
    scenes = compose_scenes(objects[keep], labels[keep], 12, SceneSpec(size=SIZE, scales=(8, 16)))
    save_detection_npz(folder / "scenes.npz", scenes.images, scenes.boxes, scenes.labels)
    return folder, scenes


def _yolov8(boxes_cxcywh: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """One image's (A, 4) boxes and (A, K) scores as a (1, 4 + K, A) raw output."""
    return torch.cat([boxes_cxcywh, scores], 1).T[None]


def test_head_layouts_are_recognised_from_the_shape():
    assert recognise((14, 80)) == HeadLayout("yolov8", 10)
    assert recognise((2100, 85)) == HeadLayout("yolov5", 80)
    for shape in ((10, 10), (4, 80), (80, 5), (3, 14, 80), (80,)):
        assert recognise(shape) is None, shape


def test_yolov5_layout_multiplies_objectness_into_class_scores():
    out = torch.tensor([[[10.0, 10, 4, 4, 0.5, 0.2, 0.8]] * 12])  # (1, A=12, 5 + 2)
    layout = recognise(tuple(out.shape[1:]))
    assert layout.name == "yolov5" and layout.num_classes == 2
    assert torch.allclose(layout.class_scores(out)[0, 0], torch.tensor([0.1, 0.4]))


def test_decoding_keeps_the_best_of_overlapping_boxes_of_one_class():
    boxes = torch.tensor([[10.0, 10, 8, 8], [10.5, 10, 8, 8], [10.5, 10, 8, 8], [30, 30, 6, 6]])
    scores = torch.tensor([[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.0, 0.0001]])
    (found,) = decode(_yolov8(boxes, scores), HeadLayout("yolov8", 2), score_threshold=0.01)
    assert found.labels.tolist() == [0, 1]  # the second box of class 0 suppressed, class 1 kept
    assert torch.allclose(found.boxes[0], torch.tensor([6.0, 6, 14, 14]))


def test_map_of_a_perfect_prediction_is_one_and_of_a_shifted_one_less():
    truths = [GroundTruth(torch.tensor([[2.0, 2, 12, 12], [20, 20, 30, 28]]), torch.tensor([0, 1])),
              GroundTruth(torch.tensor([[5.0, 5, 15, 20]]), torch.tensor([1]))]  # fmt: skip
    perfect = [Detections(t.boxes, torch.ones(len(t.labels)), t.labels) for t in truths]
    scores = mean_average_precision(perfect, truths, 2)
    assert scores.map_50 == pytest.approx(1.0) and scores.map_50_95 == pytest.approx(1.0)
    shifted = [Detections(d.boxes + 3.0, d.scores, d.labels) for d in perfect]
    moved = mean_average_precision(shifted, truths, 2)
    assert moved.map_50_95 < 0.6 and moved.map_50 <= 1.0
    nothing = [Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))] * 2
    assert mean_average_precision(nothing, truths, 2).map_50 == 0.0


def test_the_kd_loss_is_lowest_for_the_teacher_itself_and_weighs_confident_locations():
    torch.manual_seed(0)
    layout = HeadLayout("yolov8", 3)
    teacher = torch.cat([torch.rand(2, 2, 20) * 32, 4 + torch.rand(2, 2, 20) * 8,
                         torch.rand(2, 3, 20) * 0.1], 1)  # fmt: skip
    teacher[:, 4, 5] = 0.95  # one confident object per image
    same = detection_kd_loss(teacher.clone(), teacher, layout)
    wrong_object, wrong_background = teacher.clone(), teacher.clone()
    wrong_object[:, :2, 5] += 6.0  # the object's box moved
    wrong_background[:, :2, 7] += 6.0  # a background location's box moved as much
    assert same < detection_kd_loss(wrong_background, teacher, layout)
    assert detection_kd_loss(wrong_background, teacher, layout) < detection_kd_loss(
        wrong_object, teacher, layout)


class TwoOutputs(nn.Module):
    """An SSD-style head: boxes and scores as separate outputs (not read yet)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 4, 1)

    def forward(self, x):
        y = self.conv(x).flatten(2)
        return y[:, :4].transpose(1, 2), torch.sigmoid(y[:, 4:]).transpose(1, 2)


def test_an_unknown_head_is_refused_in_one_line_naming_its_outputs(tmp_path, capsys):
    path = tmp_path / "ssd.onnx"
    torch.onnx.export(TwoOutputs().eval(), (torch.rand(1, 3, SIZE, SIZE),), str(path),
                      dynamo=False, opset_version=17, input_names=["images"],
                      output_names=["boxes", "scores"])  # fmt: skip
    assert run_cli(path, "--task", "detection", "--dry-run", "--out", tmp_path / "o") == 2
    one_error_line(capsys, "boxes (N, 64, 4)", "scores (N, 64, 4)", "no detection head layout")


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda a: a["boxes"].__setitem__((0, 2), 40.0), "outside its 32x32 image"),
        (lambda a: a["labels"].__setitem__(0, 7), "label 7 of box 0"),
        (lambda a: a.update(boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64),
                            counts=np.zeros_like(a["counts"])), "zero annotations"),  # fmt: skip
        (lambda a: a.pop("counts"), "missing counts"),
    ],
    ids=["box outside", "unknown label", "no annotation", "no counts"],
)
def test_bad_eval_data_exits_2_naming_the_file(files, tmp_path, capsys, change, needle):
    folder, _ = files
    with np.load(folder / "scenes.npz") as archive:
        arrays = {key: archive[key].copy() for key in archive.files}
    change(arrays)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    code = run_cli(folder / "det.onnx", "--task", "detection", "--eval-data", bad, "--iters", 1,
                   "--out", tmp_path / "o")  # fmt: skip
    assert code == 2
    one_error_line(capsys, str(bad), needle)


@pytest.mark.parametrize("layout", ["yolov8", "yolov5"])
def test_a_tiny_yolo_teacher_distils_into_a_drop_in_student(files, tmp_path, layout):
    folder, _ = files
    teacher_path = folder / "det.onnx"
    if layout == "yolov5":  # (N, A, 5 + K): objectness, locations before channels
        torch.manual_seed(0)
        teacher_path = export_detector(TinyYolo(CLASSES, 3, 8, SIZE, yolov5=True),
                                       tmp_path / "det5.onnx", SIZE)  # fmt: skip
    out = tmp_path / "out"
    code = run_cli(teacher_path, "--task", "detection", "--eval-data",
                   folder / "scenes.npz", "--iters", 6, "--threads", 1, "--out", out)  # fmt: skip
    assert code in (0, 3)  # an untrained teacher: the verdict may go either way
    teacher, student = (signature(p, (3, SIZE, SIZE)) for p in (teacher_path,
                                                                 out / "student.onnx"))  # fmt: skip
    assert student == teacher  # names, dtypes, declared ranks and symbolic dims, shapes at batch 2
    assert [o.name for o in onnx.load(str(out / "student.onnx")).graph.output] == ["output0"]
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "detection" and report["method"] == "dafl-det"
    for who in ("teacher", "student"):
        assert 0.0 <= report[who]["map_50"] <= 1.0 and report[who]["map_50_95"] is not None
    assert report["student"]["params"] <= 0.30 * report["teacher"]["params"]
    assert report["detection"]["head"] == layout and report["exported_as"]["same_as_teacher"]
    assert "mAP@0.5 on eval data" in (out / "report.md").read_text()


def test_without_eval_data_the_figure_is_fidelity_on_generated_inputs(files, tmp_path):
    folder, _ = files
    out = tmp_path / "out"
    code = run_cli(folder / "det.onnx", "--task", "detection", "--iters", 4, "--threads", 1,
                   "--out", out)  # fmt: skip
    assert code in (0, 3)
    report = json.loads((out / "report.json").read_text())
    fidelity = report["detection"]["fidelity_map_50"]
    assert fidelity is None or 0.0 <= fidelity <= 1.0
    assert report["student"]["fidelity_map_50"] == fidelity and "map_50" not in report["student"]
    assert "generated inputs" in report["detection"]["measured_on"]
