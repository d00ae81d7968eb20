"""Teacher–student training: the engine, the losses, the teacher (provisioned and frozen), checkpoints."""
from .checkpoint import CheckpointWriteError, atomic_torch_save, load_training_checkpoint
from .engine import Engine, EngineConfig, EpochHook, NonFiniteLossError, TrainingStopped, predict, seed_everything
from .losses import DistillationLoss, kd_kl_loss
from .teacher import FrozenTeacher, TeacherSource, obtain_teacher, teacher_cache_key, weights_sha256

__all__ = [
    "Engine", "EngineConfig", "EpochHook", "NonFiniteLossError", "TrainingStopped", "predict", "seed_everything",
    "DistillationLoss", "kd_kl_loss", "FrozenTeacher", "TeacherSource", "obtain_teacher", "teacher_cache_key",
    "weights_sha256", "atomic_torch_save", "load_training_checkpoint",
    "CheckpointWriteError",
]
