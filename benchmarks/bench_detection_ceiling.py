"""What a detection student could reach with the teacher's own training scenes: the ceiling that
bench_detection.py's data-free student is measured against.

The same derived student as ``dafl-compress --task detection`` builds (half width, from the
teacher's weights), the fast preset's fine-tuning learning rate on a cosine schedule over the
budget, the task's batch (16) and its KD loss on the raw head output; only the inputs differ:
the scenes the teacher was trained on (recomposed from the same seed; boxes and labels unused)
instead of generated ones. Scored as bench_detection.py scores (mAP@0.5 by COCOeval on the
held-out scenes), here on the torch student.

    python benchmarks/bench_detection.py --out /tmp/bench_detection        # the teacher first
    python benchmarks/bench_detection_ceiling.py --data /tmp/bench_detection/data --budget 300

A data-free student near this ceiling has no more to gain from better generated scenes at this
budget; far below it, the generated scenes are what limit it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_ceiling import train_on_images  # noqa: E402 - after the path it needs


def _teacher_and_student(teacher_path: Path, seed: int):
    """The teacher as ``dafl-compress --task detection`` loads it, its bound task, the student."""
    from dataclasses import replace

    from compress_toolbox import CompressConfig
    from compress_toolbox.load.teacher import load_teacher
    from compress_toolbox.pipeline import fit_teacher_to_task
    from compress_toolbox.student.plan import plan_student

    config = CompressConfig.from_options(task="detection", seed=seed)
    teacher = load_teacher(teacher_path)
    config = replace(config, task=config.task.bound_to(teacher))
    teacher = fit_teacher_to_task(teacher, config.task)
    return teacher, config.task, plan_student(teacher, config)


def run(args: argparse.Namespace) -> dict:
    """Train the derived student on the teacher's training scenes; mAP@0.5 of both."""
    import torch

    from compress_toolbox.distillation.presets import PRESETS
    from compress_toolbox.domain import InputDomain
    from compress_toolbox.tasks.detection.decode import decode
    from compress_toolbox.tasks.detection.metrics import mean_average_precision
    from compress_toolbox.tasks.detection.scenes import SceneSpec, compose_scenes, digit_objects

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = Path(args.data)
    teacher, task, plan = _teacher_and_student(data / "teacher.onnx", args.seed)
    objects, labels = digit_objects()
    cut = int(len(objects) * 0.8)  # as make_benchmark: the eval scenes' digits held out
    scenes = compose_scenes(objects[:cut], labels[:cut], args.train_scenes,
                            SceneSpec(size=args.size), seed=args.scene_seed)  # fmt: skip
    images = torch.from_numpy(scenes.images).float() / 255.0
    preset = PRESETS["fast"]
    steps = train_on_images(teacher.module, plan.module, images, args.budget,
                            preset.student_rates(plan.from_teacher), task.batch_size,
                            lambda s, t: task.distillation_loss(s, t, 1.0))  # fmt: skip
    student = plan.module.eval()
    layout, k = task.head, task.head.num_classes
    domain = InputDomain.from_options(None, None, teacher.input_shape)
    eval_data = task.load_eval_data(data / "scenes.npz", teacher.input_shape, domain, k)
    with torch.no_grad():
        t_map = mean_average_precision(decode(teacher.module(eval_data.x), layout),
                                       eval_data.truths, k).map_50  # fmt: skip
        s_map = mean_average_precision(decode(student(eval_data.x), layout),
                                       eval_data.truths, k).map_50  # fmt: skip
    return {"teacher_map_50": t_map, "student_map_50": s_map, "map_50_ratio": s_map / t_map,
            "steps": steps, "budget_s": args.budget, "seed": args.seed,
            "student_kind": plan.kind}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/tmp/bench_detection/data",
                        help="bench_detection.py's data folder (teacher.onnx, scenes.npz)")
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scene-seed", type=int, default=0,
                        help="bench_detection.py's --seed: its training scenes")
    parser.add_argument("--train-scenes", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    figures = run(parser.parse_args())
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
