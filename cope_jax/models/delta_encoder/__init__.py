from cope_jax.models.delta_encoder.modeling import DeltaEncoder, DeltaEncoderConfig, DeltaPretrainer, QueryTransformer

__all__ = ["DeltaEncoder", "DeltaEncoderConfig", "DeltaPretrainer", "QueryTransformer"]
