"""Distillation and fine-tuning of the Theia encoder (plain Python: torch, transformers; no ROS).

Teachers (CLIP, DINOv2, ViT, SAM, Depth-Anything, or any registered :class:`TeacherSpec`) are run
once over the images and their feature maps cached on disk; the student (a Theia encoder with one
translator head per teacher) is then trained to predict the normalised maps and written in the
published checkpoint layout, so :func:`theia_ros.encoder.model.load_model` and everything built on it
read the result unchanged. Entry points: :func:`distill` and ``theia-ros distill``.
"""
from theia_ros.distill.cache import FeatureCache
from theia_ros.distill.sources import BagSource, FolderSource, build_index, split_items
from theia_ros.distill.student import build_student, denormalise, distill_loss, load_feature_stats, write_published
from theia_ros.distill.teachers import TEACHERS, Preprocess, Teacher, TeacherSpec, build_teacher, register_teacher
from theia_ros.distill.train import DistillConfig, DistillResult, distill

__all__ = [
    "TEACHERS", "Preprocess", "Teacher", "TeacherSpec", "build_teacher", "register_teacher",
    "FolderSource", "BagSource", "build_index", "split_items", "FeatureCache",
    "build_student", "distill_loss", "write_published", "load_feature_stats", "denormalise",
    "DistillConfig", "DistillResult", "distill",
]
