"""Plain ``torch.nn`` model parts (no Lightning here)."""

from .schedule import LayerSchedule, ScheduleConfig, config_name
from .spec import BackboneSpec, TextSpec, VisionSpec, tiny_backbone
from .visor import LoadReport, VisorModel, left_pad

__all__ = [
    "BackboneSpec", "LayerSchedule", "LoadReport", "ScheduleConfig", "TextSpec", "VisionSpec", "VisorModel",
    "config_name", "left_pad", "tiny_backbone",
]
