"""The EAT / SSLAM model: encoder, CNN decoder, EMA teacher and objectives (ALGORITHM §2-§5), and the classifier."""

from sslam_fast.models.classifier import AudioClassifier
from sslam_fast.models.config import ModelConfig
from sslam_fast.models.decoder import CNNDecoder
from sslam_fast.models.encoder import EATEncoder
from sslam_fast.models.pretraining import PretrainingModel

__all__ = ["AudioClassifier", "CNNDecoder", "EATEncoder", "ModelConfig", "PretrainingModel"]
