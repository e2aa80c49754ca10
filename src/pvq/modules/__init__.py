"""The torch modules a quantized model runs: QuantLinear (packed codes and their rotations),
activation quantizers, and the embedding and head kept in their stored 16-bit dtype."""
